# Tables and figures take seconds: run them where snakemake runs, not as cluster jobs.
localrules:
    confusion_table,
    figure_performance,
    figure_confusion,
    figure_training_curves,
    figure_contributions,
    figure_contributions_depth,
    figure_logit_lens,
    figure_probing,
    figure_spectra,
    figure_ab_dynamics,
    figure_cka,
    figure_rulegraph,
    aggregate_contributions,
    aggregate_logit_lens,
    aggregate_probing,
    aggregate_svd,
    aggregate_ab_dynamics,
    aggregate_cka,
    aggregate_subspace,


# Fold-aggregated tables: one rule per analysis, mean and std over folds, n_folds and missing folds.
for table in ANALYSIS_TABLES.values():
    if table.lora_only and not LORA_RANKS:
        continue

    rule:
        name:
            f"aggregate_{table.name}"
        input:
            analysis_runs(table.name)["input"],
        output:
            report(
                f"{RESULTS}/tables/{table.name}.tsv",
                caption="../workflow/report/analysis_table.rst",
                category="Tables",
                subcategory="analyses, mean and std over folds",
                labels={"table": table.name},
            ),
        log:
            f"{RESULTS}/logs/tables/{table.name}.log",
        conda:
            "../envs/serlens.yaml"
        threads: 1
        params:
            name=table.name,
            runs=analysis_runs(table.name)["keys"],
        script:
            "../workflow/scripts/aggregate.py"


rule confusion_table:
    input:
        PREDICTIONS["input"],
    output:
        report(
            f"{RESULTS}/tables/confusion.tsv",
            caption="../workflow/report/confusion_table.rst",
            category="Tables",
            subcategory="performance",
            labels={"table": "confusion"},
        ),
    log:
        f"{RESULTS}/logs/tables/confusion.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        name="confusion",
        runs=PREDICTIONS["keys"],
        classes=CLASSES,
    script:
        "../workflow/scripts/aggregate.py"


rule figure_performance:
    input:
        f"{RESULTS}/tables/performance.tsv",
    output:
        png=figure(
            f"{FIGURES}/performance.png",
            "performance",
            "Performance",
            "all models",
            figure="UAR and WAR",
        ),
        svg=f"{FIGURES}/performance.svg",
    log:
        f"{RESULTS}/logs/figures/performance.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        models=MODELS,
        n_classes=len(CLASSES),
    script:
        "../workflow/scripts/figure_performance.py"


rule figure_confusion:
    input:
        f"{RESULTS}/tables/confusion.tsv",
    output:
        png=figure(
            f"{FIGURES}/confusion.png",
            "confusion",
            "Performance",
            "all models",
            figure="confusion matrices",
        ),
        svg=f"{FIGURES}/confusion.svg",
    log:
        f"{RESULTS}/logs/figures/confusion.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        models=MODELS,
        classes=CLASSES,
    script:
        "../workflow/scripts/figure_confusion.py"


rule figure_training_curves:
    input:
        lambda w: training_histories(w)["input"],
    output:
        png=figure(
            f"{FIGURES}/training_curves/{{model}}.png",
            "training_curves",
            "Training curves",
            "{model}",
            model="{model}",
        ),
        svg=f"{FIGURES}/training_curves/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/training_curves/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        runs=lambda w: training_histories(w)["keys"],
        n_classes=len(CLASSES),
    script:
        "../workflow/scripts/figure_training_curves.py"


rule figure_contributions:
    input:
        f"{RESULTS}/tables/contributions.tsv",
    output:
        png=figure(
            f"{FIGURES}/contributions/{{model}}.png",
            "contributions",
            "Layer contributions",
            "{model}",
            model="{model}",
        ),
        svg=f"{FIGURES}/contributions/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/contributions/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    script:
        "../workflow/scripts/figure_contributions.py"


rule figure_contributions_depth:
    input:
        f"{RESULTS}/tables/contributions.tsv",
    output:
        png=figure(
            f"{FIGURES}/contributions_depth.png",
            "contributions_depth",
            "Layer contributions",
            "all models",
            model="all",
        ),
        svg=f"{FIGURES}/contributions_depth.svg",
    log:
        f"{RESULTS}/logs/figures/contributions_depth.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        models=MODELS,
    script:
        "../workflow/scripts/figure_contributions.py"


rule figure_logit_lens:
    input:
        f"{RESULTS}/tables/logit_lens.tsv",
    output:
        png=figure(
            f"{FIGURES}/logit_lens/{{model}}.png",
            "logit_lens",
            "Logit lens",
            "{model}",
            model="{model}",
        ),
        svg=f"{FIGURES}/logit_lens/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/logit_lens/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        n_classes=len(CLASSES),
    script:
        "../workflow/scripts/figure_logit_lens.py"


rule figure_probing:
    input:
        f"{RESULTS}/tables/probing.tsv",
    output:
        png=figure(
            f"{FIGURES}/probing/{{model}}.png",
            "probing",
            "Probing",
            "{model}",
            model="{model}",
        ),
        svg=f"{FIGURES}/probing/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/probing/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        n_classes=len(CLASSES),
    script:
        "../workflow/scripts/figure_probing.py"


rule figure_spectra:
    input:
        svd=f"{RESULTS}/tables/svd.tsv",
        subspace=f"{RESULTS}/tables/subspace.tsv",
    output:
        png=figure(
            f"{FIGURES}/spectra/{{model}}.png",
            "spectra",
            "LoRA spectra",
            "{model}",
            model="{model}",
        ),
        svg=f"{FIGURES}/spectra/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/spectra/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        intruder_epsilon=config["analysis"]["intruder_epsilon"],
    script:
        "../workflow/scripts/figure_spectra.py"


rule figure_ab_dynamics:
    input:
        f"{RESULTS}/tables/ab_dynamics.tsv",
    output:
        png=figure(
            f"{FIGURES}/ab_dynamics/{{model}}.png",
            "ab_dynamics",
            "A/B dynamics",
            "{model}",
            model="{model}",
        ),
        svg=f"{FIGURES}/ab_dynamics/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/ab_dynamics/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        energy_fraction=config["analysis"]["energy_fraction"],
    script:
        "../workflow/scripts/figure_ab_dynamics.py"


rule figure_cka:
    input:
        f"{RESULTS}/tables/cka.tsv",
    output:
        png=figure(
            f"{FIGURES}/cka/{{model}}.png", "cka", "CKA", "{model}", model="{model}"
        ),
        svg=f"{FIGURES}/cka/{{model}}.svg",
    log:
        f"{RESULTS}/logs/figures/cka/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    script:
        "../workflow/scripts/figure_cka.py"


# The rule graph, drawn without graphviz; reruns when the Snakefile or a rule file changes.
rule figure_rulegraph:
    input:
        snakefile=workflow.main_snakefile,
        rules=sorted(glob.glob(f"{workflow.basedir}/rules/*.smk")),
    output:
        png=figure(f"{FIGURES}/rulegraph.png", "rulegraph", "Rule graph", "workflow"),
        svg=f"{FIGURES}/rulegraph.svg",
        dot=f"{FIGURES}/rulegraph.dot",
    log:
        f"{RESULTS}/logs/figures/rulegraph.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    script:
        "../workflow/scripts/figure_rulegraph.py"
