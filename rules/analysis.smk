from serlens.analysis.registry import ANALYSES, analysis_params


def run_inputs(method_pattern):
    """Inputs every analysis of one run needs: the corpus tables, the weights and the run's files."""
    run = f"{RESULTS}/train/{{model}}/{method_pattern}/fold{{fold}}"
    inputs = {
        "manifest": f"{RESULTS}/corpus/manifest.tsv",
        "folds": f"{RESULTS}/corpus/folds.tsv",
        "weights": f"{RESULTS}/models/{{model}}.json",
        "head": f"{run}/head.safetensors",
        "metrics": f"{run}/metrics.json",
    }
    if method_pattern != "frozen":
        inputs["adapter"] = f"{run}/adapter"
    return inputs


# One rule per analysis and kind of run; each job writes one tidy TSV.
for analysis in ANALYSES.values():
    for method_pattern in ["lora_r{rank}"] if analysis.lora_only else ["frozen", "lora_r{rank}"]:
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
            params:
                name=analysis.name,
                method=lambda wildcards, mp=method_pattern: mp.format(**wildcards),
                run_dir=lambda wildcards, mp=method_pattern: f"{RESULTS}/train/{wildcards.model}/{mp.format(**wildcards)}/fold{wildcards.fold}",
                settings=analysis_params(config, analysis.name),
            log:
                f"{RESULTS}/logs/analysis/{{model}}/{method_pattern}/fold{{fold}}/{analysis.name}.log",
            threads: 1
            resources:
                mem_mb=model_resource("mem_mb"),
                runtime=model_resource("runtime"),
                gpu=model_resource("gpu"),
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
    params:
        ranks=config["lora"]["ranks"],
    log:
        f"{RESULTS}/logs/analysis/{{model}}/lora/fold{{fold}}/subspace.log",
    threads: 1
    script:
        "../workflow/scripts/subspace.py"
