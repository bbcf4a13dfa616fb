import glob

from serlens.report import jobs

# Tables and figures take seconds: they run in Snakemake's process (`run:`, local rules),
# generated from the analysis specs; nothing here is a hand-kept list of analyses.


# Fold-aggregated tables: one rule per analysis, mean and std over folds, n_folds and missing folds.
for spec in ANALYSES.values():

    rule:
        name:
            f"table_{spec.name}"
        input:
            analysis_runs(spec)[1],
        output:
            report(
                PATHS.table(CORPUS, spec.name),
                caption="../report/analysis_table.rst",
                category="Tables",
                subcategory="analyses, mean and std over folds",
                labels={"table": spec.name},
            ),
        log:
            log_of(PATHS.table(CORPUS, spec.name)),
        benchmark:
            bench_of(f"table_{spec.name}", PATHS.table(CORPUS, spec.name))
        localrule: True
        params:
            name=spec.name,
            run_keys=analysis_runs(spec)[0],
            resamples=config["significance"]["resamples"],
            seed=config["analysis_seed"],
        run:
            jobs.run("table", input, output, params, wildcards, log)

    for fig in spec.figures:

        rule:
            name:
                f"figure_{fig.name}"
            input:
                **tables_of(fig),
            output:
                png=figure(
                    PATHS.figure(
                        CORPUS, fig.name, "{model}" if fig.per_model else None
                    ),
                    fig.name,
                    fig.category,
                    "{model}" if fig.per_model else "all models",
                    **({"model": "{model}"} if fig.per_model else {"model": "all"}),
                ),
                svg=PATHS.figure(
                    CORPUS, fig.name, "{model}" if fig.per_model else None, "svg"
                ),
            log:
                log_of(
                    PATHS.figure(
                        CORPUS, fig.name, "{model}" if fig.per_model else None
                    )
                ),
            benchmark:
                bench_of(
                    f"figure_{fig.name}",
                    PATHS.figure(
                        CORPUS, fig.name, "{model}" if fig.per_model else None
                    ),
                )
            localrule: True
            params:
                name=fig.name,
                context=figure_context(fig.keys),
            run:
                jobs.run("figure", input, output, params, wildcards, log)


rule performance:
    input:
        manifest=PATHS.corpus(CORPUS, "manifest.tsv"),
        predictions=predictions()[1],
    output:
        performance=PATHS.table(CORPUS, "performance"),
        summary=report(
            PATHS.table(CORPUS, "performance_summary"),
            caption="../report/performance_table.rst",
            category="Tables",
            subcategory="performance",
            labels={"table": "performance summary"},
        ),
        significance=report(
            PATHS.table(CORPUS, "significance"),
            caption="../report/significance_table.rst",
            category="Tables",
            subcategory="performance",
            labels={"table": "significance"},
        ),
    log:
        log_of(PATHS.table(CORPUS, "performance")),
    benchmark:
        bench_of("performance", PATHS.table(CORPUS, "performance"))
    localrule: True
    params:
        run_keys=predictions()[0],
        classes=CLASSES,
        significance=config["significance"],
        seed=config["analysis_seed"],
    run:
        jobs.run("performance", input, output, params, wildcards, log)


rule confusion_table:
    input:
        predictions()[1],
    output:
        report(
            PATHS.table(CORPUS, "confusion"),
            caption="../report/confusion_table.rst",
            category="Tables",
            subcategory="performance",
            labels={"table": "confusion"},
        ),
    log:
        log_of(PATHS.table(CORPUS, "confusion")),
    benchmark:
        bench_of("confusion_table", PATHS.table(CORPUS, "confusion"))
    localrule: True
    params:
        run_keys=predictions()[0],
        classes=CLASSES,
    run:
        jobs.run("confusion", input, output, params, wildcards, log)


rule figure_performance:
    input:
        PATHS.table(CORPUS, "performance"),
    output:
        png=figure(
            PATHS.figure(CORPUS, "performance"),
            "performance",
            "Performance",
            "all models",
            figure="UAR and WAR",
        ),
        svg=PATHS.figure(CORPUS, "performance", None, "svg"),
    log:
        log_of(PATHS.figure(CORPUS, "performance")),
    benchmark:
        bench_of("figure_performance", PATHS.figure(CORPUS, "performance"))
    localrule: True
    params:
        models=MODELS,
        n_classes=len(CLASSES),
    run:
        jobs.run("performance_figure", input, output, params, wildcards, log)


rule figure_confusion:
    input:
        PATHS.table(CORPUS, "confusion"),
    output:
        png=figure(
            PATHS.figure(CORPUS, "confusion"),
            "confusion",
            "Performance",
            "all models",
            figure="confusion matrices",
        ),
        svg=PATHS.figure(CORPUS, "confusion", None, "svg"),
    log:
        log_of(PATHS.figure(CORPUS, "confusion")),
    benchmark:
        bench_of("figure_confusion", PATHS.figure(CORPUS, "confusion"))
    localrule: True
    params:
        models=MODELS,
        classes=CLASSES,
    run:
        jobs.run("confusion_figure", input, output, params, wildcards, log)


rule figure_training_curves:
    input:
        lambda w: histories(w)[1],
    output:
        png=figure(
            PATHS.figure(CORPUS, "training_curves", "{model}"),
            "training_curves",
            "Training curves",
            "{model}",
            model="{model}",
        ),
        svg=PATHS.figure(CORPUS, "training_curves", "{model}", "svg"),
    log:
        log_of(PATHS.figure(CORPUS, "training_curves", "{model}")),
    benchmark:
        bench_of(
            "figure_training_curves",
            PATHS.figure(CORPUS, "training_curves", "{model}"),
        )
    localrule: True
    params:
        run_keys=lambda w: histories(w)[0],
        n_classes=len(CLASSES),
    run:
        jobs.run("training_curves", input, output, params, wildcards, log)


# The rule graph, drawn without graphviz; reruns when the Snakefile or a rule file changes.
rule figure_rulegraph:
    input:
        snakefile=workflow.main_snakefile,
        rules=sorted(glob.glob(f"{workflow.basedir}/rules/*.smk")),
    output:
        png=figure(
            PATHS.figure(CORPUS, "rulegraph"), "rulegraph", "Rule graph", "workflow"
        ),
        svg=PATHS.figure(CORPUS, "rulegraph", None, "svg"),
        dot=PATHS.figure(CORPUS, "rulegraph", None, "dot"),
    log:
        log_of(PATHS.figure(CORPUS, "rulegraph")),
    benchmark:
        bench_of("figure_rulegraph", PATHS.figure(CORPUS, "rulegraph"))
    localrule: True
    conda:
        ENV
    threads: 1
    script:
        "../scripts/figure_rulegraph.py"
