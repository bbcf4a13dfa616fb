from serlens.report import jobs


rule features:
    input:
        weights=PATHS.weights("{model}"),
        manifest=PATHS.corpus("{corpus}", "manifest.tsv"),
    output:
        FEATURES,
    log:
        log_of(FEATURES),
    benchmark:
        bench_of("features", FEATURES)
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        audio=config["audio"],
        batch_size=config["train"]["feature_batch_size"],
    script:
        "../scripts/features.py"


# Heads on the cached features (frozen, frozen_wsum): a second each, so they run in
# Snakemake's own process (`run:`) rather than paying an interpreter start and torch import.
rule train_head:
    input:
        **CORPUS_TABLES,
        weights=PATHS.weights("{model}"),
        features=FEATURES,
    output:
        **{name.split(".")[0]: f"{RUN}/{name}" for name in RUN_FILES},
    log:
        log_of(RUN),
    benchmark:
        bench_of("train_head", RUN)
    wildcard_constraints:
        method=alternatives(methods_where(lambda m: m.uses_features)),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=train_settings,
        checkpoints=PATHS.checkpoints(
            "{corpus}", "{model}", "{method}", "{seed}", "{fold}"
        ),
    run:
        jobs.run("train_head", input, output, params, wildcards, log)


rule train_lora:
    input:
        **TRAIN_TABLES,
        weights=PATHS.weights("{model}"),
    output:
        **{name.split(".")[0]: f"{RUN}/{name}" for name in RUN_FILES},
        adapter=directory(f"{RUN}/adapter"),
        adapter_epochs=directory(f"{RUN}/adapter_epochs"),
    log:
        log_of(RUN),
    benchmark:
        bench_of("train_lora", RUN)
    wildcard_constraints:
        method=alternatives(methods_where(lambda m: m.has_adapter)),
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        settings=train_settings,
        checkpoints=PATHS.checkpoints(
            "{corpus}", "{model}", "{method}", "{seed}", "{fold}"
        ),
    script:
        "../scripts/train.py"


# Full fine-tuning: every encoder weight trains. The trained parameters are kept
# (encoder.safetensors) for the run's pass, or dropped once it has read them
# (train.keep_full_weights: false); the update of the method's targets stays (delta).
rule train_full:
    input:
        **TRAIN_TABLES,
        weights=PATHS.weights("{model}"),
    output:
        **{name.split(".")[0]: f"{RUN}/{name}" for name in RUN_FILES},
        encoder=(
            f"{RUN}/encoder.safetensors"
            if config["train"]["keep_full_weights"]
            else temp(f"{RUN}/encoder.safetensors")
        ),
        delta=f"{RUN}/delta.safetensors",
    log:
        log_of(RUN),
    benchmark:
        bench_of("train_full", RUN)
    wildcard_constraints:
        method=alternatives(methods_where(lambda m: m.kind == "full")),
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        settings=train_settings,
        checkpoints=PATHS.checkpoints(
            "{corpus}", "{model}", "{method}", "{seed}", "{fold}"
        ),
    script:
        "../scripts/train.py"
