rule performance:
    input:
        predictions=expand(
            f"{RESULTS}/train/{{model}}/{{method}}/fold{{fold}}/predictions.tsv",
            model=MODELS,
            method=METHODS,
            fold=FOLDS,
        ),
        wsum=expand(
            f"{RESULTS}/train/{{model}}/frozen/fold{{fold}}/predictions_wsum.tsv",
            model=MODELS,
            fold=FOLDS,
        ),
    output:
        performance=f"{RESULTS}/tables/performance.tsv",
        summary=f"{RESULTS}/tables/performance_summary.tsv",
        significance=f"{RESULTS}/tables/significance.tsv",
    log:
        f"{RESULTS}/logs/tables/performance.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        classes=CLASSES,
        results=lambda wildcards, output: str(Path(output.performance).parents[1]),
        expected={"models": MODELS, "methods": METHODS, "folds": FOLDS},
        significance=config["significance"],
        seed=config["seed"],
    script:
        "../workflow/scripts/performance.py"
