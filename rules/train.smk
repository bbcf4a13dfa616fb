rule features:
    input:
        weights=f"{RESULTS}/models/{{model}}.json",
        manifest=f"{RESULTS}/corpus/manifest.tsv",
    output:
        f"{RESULTS}/features/{{model}}/pooled.safetensors",
    log:
        f"{RESULTS}/logs/features/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        audio=config["audio"],
        batch_size=config["train"]["feature_batch_size"],
    script:
        "../workflow/scripts/features.py"


rule train_frozen:
    input:
        manifest=f"{RESULTS}/corpus/manifest.tsv",
        folds=f"{RESULTS}/corpus/folds.tsv",
        weights=f"{RESULTS}/models/{{model}}.json",
        features=f"{RESULTS}/features/{{model}}/pooled.safetensors",
    output:
        **{
            f"{name}{suffix}": f"{RESULTS}/train/{{model}}/frozen/fold{{fold}}/{name}{suffix}.{ext}"
            for name, ext in [
                ("metrics", "json"),
                ("predictions", "tsv"),
                ("history", "tsv"),
                ("head", "safetensors"),
            ]
            for suffix in ("", "_wsum")
        },
    log:
        f"{RESULTS}/logs/train/{{model}}/frozen/fold{{fold}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        train=train_params("frozen"),
        seed=config["seed"],
    script:
        "../workflow/scripts/train.py"


rule train_lora:
    input:
        manifest=f"{RESULTS}/corpus/manifest.tsv",
        folds=f"{RESULTS}/corpus/folds.tsv",
        weights=f"{RESULTS}/models/{{model}}.json",
    output:
        metrics=f"{RESULTS}/train/{{model}}/lora_r{{rank}}/fold{{fold}}/metrics.json",
        predictions=f"{RESULTS}/train/{{model}}/lora_r{{rank}}/fold{{fold}}/predictions.tsv",
        history=f"{RESULTS}/train/{{model}}/lora_r{{rank}}/fold{{fold}}/history.tsv",
        head=f"{RESULTS}/train/{{model}}/lora_r{{rank}}/fold{{fold}}/head.safetensors",
        adapter=directory(
            f"{RESULTS}/train/{{model}}/lora_r{{rank}}/fold{{fold}}/adapter"
        ),
    log:
        f"{RESULTS}/logs/train/{{model}}/lora_r{{rank}}/fold{{fold}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        train=train_params("lora"),
        lora={k: v for k, v in config["lora"].items() if k != "ranks"},
        audio=config["audio"],
        seed=config["seed"],
    script:
        "../workflow/scripts/train.py"
