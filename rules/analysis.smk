from serlens.analysis.registry import ANALYSES, analysis_params

# One rule per analysis and kind of run; each job writes one tidy TSV. The encoder runs on the
# job's GPU when the model's resources give it one (bench/gpu_analyses.py checks CPU = GPU).
for analysis in ANALYSES.values():
    for method_pattern in (
        ["lora_r{rank}"] if analysis.lora_only else ["frozen", "lora_r{rank}"]
    ):
        kind = "lora" if method_pattern != "frozen" else "frozen"

        rule:
            name:
                f"{analysis.name}_{kind}"
            input:
                **run_inputs(method_pattern),
                **(
                    {"features": f"{RESULTS}/features/{{model}}/pooled.safetensors"}
                    if analysis.name == "probing" and kind == "frozen"
                    else {}
                ),
            output:
                f"{RESULTS}/analysis/{{model}}/{method_pattern}/fold{{fold}}/{analysis.name}.tsv",
            log:
                f"{RESULTS}/logs/analysis/{{model}}/{method_pattern}/fold{{fold}}/{analysis.name}.log",
            conda:
                "../envs/serlens.yaml"
            threads: 1
            resources:
                mem_mb=model_resource("mem_mb"),
                runtime=model_resource("runtime"),
                gpu=model_resource("gpu"),
            params:
                name=analysis.name,
                method=lambda wildcards, mp=method_pattern: mp.format(**wildcards),
                run_dir=lambda wildcards, mp=method_pattern: f"{RESULTS}/train/{wildcards.model}/{mp.format(**wildcards)}/fold{wildcards.fold}",
                settings=analysis_params(config, analysis.name),
            script:
                "../workflow/scripts/analysis.py"


rule subspace_similarity:
    input:
        adapters=expand(
            f"{RESULTS}/train/{{{{model}}}}/lora_r{{rank}}/fold{{{{fold}}}}/adapter",
            rank=config["lora"]["ranks"],
        ),
    output:
        f"{RESULTS}/analysis/{{model}}/lora/fold{{fold}}/subspace.tsv",
    log:
        f"{RESULTS}/logs/analysis/{{model}}/lora/fold{{fold}}/subspace.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        ranks=config["lora"]["ranks"],
    script:
        "../workflow/scripts/subspace.py"
