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
            analysis_table_files(spec),
        output:
            report(
                PATHS.table("{corpus}", spec.name),
                caption="../report/analysis_table.rst",
                category="{corpus} · tables",
                subcategory="analyses, mean and std over folds",
                labels={"table": spec.name},
            ),
        log:
            log_of(PATHS.table("{corpus}", spec.name)),
        benchmark:
            bench_of(f"table_{spec.name}", PATHS.table("{corpus}", spec.name))
        localrule: True
        params:
            name=spec.name,
            run_keys=analysis_table_keys(spec),
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
                        "{corpus}", fig.name, "{model}" if fig.per_model else None
                    ),
                    fig.name,
                    fig.category,
                    "{model}" if fig.per_model else "all models",
                    **({"model": "{model}"} if fig.per_model else {"model": "all"}),
                ),
                svg=PATHS.figure(
                    "{corpus}", fig.name, "{model}" if fig.per_model else None, "svg"
                ),
            log:
                log_of(
                    PATHS.figure(
                        "{corpus}", fig.name, "{model}" if fig.per_model else None
                    )
                ),
            benchmark:
                bench_of(
                    f"figure_{fig.name}",
                    PATHS.figure(
                        "{corpus}", fig.name, "{model}" if fig.per_model else None
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
        manifest=PATHS.corpus("{corpus}", "manifest.tsv"),
        predictions=prediction_files,
    output:
        performance=PATHS.table("{corpus}", "performance"),
        summary=report(
            PATHS.table("{corpus}", "performance_summary"),
            caption="../report/performance_table.rst",
            category="{corpus} · tables",
            subcategory="performance",
            labels={"table": "performance summary"},
        ),
        significance=report(
            PATHS.table("{corpus}", "significance"),
            caption="../report/significance_table.rst",
            category="{corpus} · tables",
            subcategory="performance",
            labels={"table": "significance"},
        ),
    log:
        log_of(PATHS.table("{corpus}", "performance")),
    benchmark:
        bench_of("performance", PATHS.table("{corpus}", "performance"))
    localrule: True
    params:
        run_keys=prediction_keys,
        classes=classes_of,
        significance=config["significance"],
        seed=config["analysis_seed"],
    run:
        jobs.run("performance", input, output, params, wildcards, log)


# What the paper's protocol adds (serlens.report.protocol): test-fold checkpoint selection
# read off every run, and the runs under methods.<name>.protocol against their honest twin.
rule protocol_gap:
    input:
        manifest=PATHS.corpus("{corpus}", "manifest.tsv"),
        predictions=protocol_prediction_files,
        test_epochs=lambda w: [
            p.replace("predictions.tsv", "test_epochs.tsv")
            for p in protocol_prediction_files(w)
        ],
    output:
        report(
            PATHS.table("{corpus}", "protocol_gap"),
            caption="../report/protocol_gap_table.rst",
            category="{corpus} · what this run says about the paper",
            subcategory="protocol gap",
            labels={"table": "protocol gap"},
        ),
    log:
        log_of(PATHS.table("{corpus}", "protocol_gap")),
    benchmark:
        bench_of("protocol_gap", PATHS.table("{corpus}", "protocol_gap"))
    localrule: True
    params:
        run_keys=lambda w: predictions(w.corpus, list(METHODS))[0],
        classes=classes_of,
        method_config={k: config[k] for k in ("lora", "train", "methods")},
        prefixes=lambda w: corpus_kind(CORPORA[w.corpus]["kind"]).dialog_prefixes,
        resamples=config["significance"]["resamples"],
        seed=config["analysis_seed"],
    run:
        jobs.run("protocol_gap", input, output, params, wildcards, log)


# The paper's claims as tested hypotheses (serlens.report.claims): one row per claim, model
# and LoRA method, with its statistic, interval, reference and verdict.
rule claims:
    input:
        significance=PATHS.table("{corpus}", "significance"),
        causal=analysis_table_files(ANALYSES["causal"]),
        ab=analysis_table_files(ANALYSES["ab_dynamics"]),
        lens=analysis_table_files(ANALYSES["logit_lens"]),
        cka=analysis_table_files(ANALYSES["cka"]),
        floor=analysis_table_files(ANALYSES["seed_floor"]),
    output:
        report(
            PATHS.table("{corpus}", "claims"),
            caption="../report/claims_table.rst",
            category="{corpus} · what this run says about the paper",
            subcategory="claims",
            labels={"table": "claims"},
        ),
    log:
        log_of(PATHS.table("{corpus}", "claims")),
    benchmark:
        bench_of("claims", PATHS.table("{corpus}", "claims"))
    localrule: True
    params:
        causal_keys=analysis_table_keys(ANALYSES["causal"]),
        ab_keys=analysis_table_keys(ANALYSES["ab_dynamics"]),
        lens_keys=analysis_table_keys(ANALYSES["logit_lens"]),
        cka_keys=analysis_table_keys(ANALYSES["cka"]),
        floor_keys=analysis_table_keys(ANALYSES["seed_floor"]),
        settings=config["claims"],
        resamples=config["significance"]["resamples"],
        seed=config["analysis_seed"],
    run:
        jobs.run("claims", input, output, params, wildcards, log)


rule confusion_table:
    input:
        prediction_files,
    output:
        report(
            PATHS.table("{corpus}", "confusion"),
            caption="../report/confusion_table.rst",
            category="{corpus} · tables",
            subcategory="performance",
            labels={"table": "confusion"},
        ),
    log:
        log_of(PATHS.table("{corpus}", "confusion")),
    benchmark:
        bench_of("confusion_table", PATHS.table("{corpus}", "confusion"))
    localrule: True
    params:
        run_keys=prediction_keys,
        classes=classes_of,
    run:
        jobs.run("confusion", input, output, params, wildcards, log)


rule figure_performance:
    input:
        PATHS.table("{corpus}", "performance"),
    output:
        png=figure(
            PATHS.figure("{corpus}", "performance"),
            "performance",
            "Performance",
            "all models",
            figure="UAR and WAR",
        ),
        svg=PATHS.figure("{corpus}", "performance", None, "svg"),
    log:
        log_of(PATHS.figure("{corpus}", "performance")),
    benchmark:
        bench_of("figure_performance", PATHS.figure("{corpus}", "performance"))
    localrule: True
    params:
        models=MODELS,
        n_classes=n_classes_of,
    run:
        jobs.run("performance_figure", input, output, params, wildcards, log)


rule figure_confusion:
    input:
        PATHS.table("{corpus}", "confusion"),
    output:
        png=figure(
            PATHS.figure("{corpus}", "confusion"),
            "confusion",
            "Performance",
            "all models",
            figure="confusion matrices",
        ),
        svg=PATHS.figure("{corpus}", "confusion", None, "svg"),
    log:
        log_of(PATHS.figure("{corpus}", "confusion")),
    benchmark:
        bench_of("figure_confusion", PATHS.figure("{corpus}", "confusion"))
    localrule: True
    params:
        models=MODELS,
        classes=classes_of,
    run:
        jobs.run("confusion_figure", input, output, params, wildcards, log)


rule figure_training_curves:
    input:
        lambda w: histories(w)[1],
    output:
        png=figure(
            PATHS.figure("{corpus}", "training_curves", "{model}"),
            "training_curves",
            "Training curves",
            "{model}",
            model="{model}",
        ),
        svg=PATHS.figure("{corpus}", "training_curves", "{model}", "svg"),
    log:
        log_of(PATHS.figure("{corpus}", "training_curves", "{model}")),
    benchmark:
        bench_of(
            "figure_training_curves",
            PATHS.figure("{corpus}", "training_curves", "{model}"),
        )
    localrule: True
    params:
        run_keys=lambda w: histories(w)[0],
        n_classes=n_classes_of,
    run:
        jobs.run("training_curves", input, output, params, wildcards, log)


# The rule graph, drawn without graphviz; reruns when the Snakefile or a rule file changes.
rule figure_rulegraph:
    input:
        snakefile=workflow.main_snakefile,
        rules=sorted(glob.glob(f"{workflow.basedir}/rules/*.smk")),
    output:
        png=figure(
            PATHS.figure(None, "rulegraph"), "rulegraph", "Rule graph", "workflow"
        ),
        svg=PATHS.figure(None, "rulegraph", None, "svg"),
        dot=PATHS.figure(None, "rulegraph", None, "dot"),
    log:
        log_of(PATHS.figure(None, "rulegraph")),
    benchmark:
        bench_of("figure_rulegraph", PATHS.figure(None, "rulegraph"))
    localrule: True
    conda:
        ENV
    threads: 1
    script:
        "../scripts/figure_rulegraph.py"
