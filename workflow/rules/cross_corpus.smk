from serlens.report import jobs

# Cross-corpus tests (config cross_corpus): each run trained on {train} scores every
# utterance of {test} over the classes both share (serlens.cross_corpus).


rule cross_eval:
    input:
        unpack(cross_eval_inputs),
    output:
        f"{CROSS_EVAL}/predictions.tsv",
    log:
        log_of(f"{CROSS_EVAL}/predictions.tsv"),
    benchmark:
        bench_of("cross_eval", f"{CROSS_EVAL}/predictions.tsv")
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        train_classes=lambda wildcards: CLASSES[wildcards.train],
        test_classes=lambda wildcards: CLASSES[wildcards.test],
        audio=config["audio"],
        batch_size=config["analysis"]["batch_size"],
    script:
        "../scripts/cross_eval.py"


rule cross_performance:
    input:
        manifest=PATHS.corpus("{test}", "manifest.tsv"),
        predictions=cross_prediction_files,
    output:
        performance=cross_table("performance"),
        summary=report(
            cross_table("performance_summary"),
            caption="../report/cross_corpus_table.rst",
            category="cross-corpus",
            subcategory="{train} to {test}",
            labels={"table": "performance summary"},
        ),
        significance=report(
            cross_table("significance"),
            caption="../report/significance_table.rst",
            category="cross-corpus",
            subcategory="{train} to {test}",
            labels={"table": "significance"},
        ),
    log:
        log_of(cross_table("performance")),
    benchmark:
        bench_of("cross_performance", cross_table("performance"))
    localrule: True
    params:
        run_keys=cross_prediction_keys,
        classes=shared_classes_of,
        significance=config["significance"],
        seed=config["analysis_seed"],
    run:
        jobs.run("performance", input, output, params, wildcards, log)


rule cross_confusion:
    input:
        cross_prediction_files,
    output:
        cross_table("confusion"),
    log:
        log_of(cross_table("confusion")),
    benchmark:
        bench_of("cross_confusion", cross_table("confusion"))
    localrule: True
    params:
        run_keys=cross_prediction_keys,
        classes=shared_classes_of,
    run:
        jobs.run("confusion", input, output, params, wildcards, log)


rule cross_figure_performance:
    input:
        cross_table("performance"),
    output:
        png=report(
            cross_figure("png"),
            caption="../report/cross_corpus_figure.rst",
            category="cross-corpus",
            subcategory="{train} to {test}",
            labels={"figure": "UAR and WAR"},
        ),
        svg=cross_figure("svg"),
    log:
        log_of(cross_figure("png")),
    benchmark:
        bench_of("cross_figure_performance", cross_figure("png"))
    localrule: True
    params:
        models=MODELS,
        n_classes=lambda wildcards: len(shared_classes_of(wildcards)),
    run:
        jobs.run("performance_figure", input, output, params, wildcards, log)
