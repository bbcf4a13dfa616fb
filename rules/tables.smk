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
        summary=report(
            f"{RESULTS}/tables/performance_summary.tsv",
            caption="../workflow/report/performance_table.rst",
            category="Tables",
            subcategory="performance",
            labels={"table": "performance summary"},
        ),
        significance=report(
            f"{RESULTS}/tables/significance.tsv",
            caption="../workflow/report/significance_table.rst",
            category="Tables",
            subcategory="performance",
            labels={"table": "significance"},
        ),
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
