rule synth_corpus:
    output:
        directory(f"{RESOURCES}/corpus/{{name}}"),
    log:
        f"{PATHS.results}/logs/synth_corpus/{{name}}.log",
    benchmark:
        f"{PATHS.results}/benchmarks/synth_corpus/{{name}}.tsv"
    wildcard_constraints:
        name=alternatives(
            [n for n, spec in CORPORA.items() if corpus_kind(spec["kind"]).generated]
        ),
    localrule: True
    conda:
        ENV
    threads: 1
    params:
        utterances_per_speaker=synthetic_setting("utterances_per_speaker"),
        seed=synthetic_setting("seed"),
        scripted_fraction=synthetic_setting("scripted_fraction"),
    script:
        "../scripts/synth_corpus.py"


rule manifest:
    input:
        generated_root,
    output:
        manifest=PATHS.corpus("{corpus}", "manifest.tsv"),
        summary=PATHS.corpus("{corpus}", "summary.tsv"),
    log:
        log_of(PATHS.corpus("{corpus}", "manifest.tsv")),
    benchmark:
        bench_of("manifest", PATHS.corpus("{corpus}", "manifest.tsv"))
    localrule: True
    conda:
        ENV
    threads: 1
    params:
        root=read_root,
        corpus=corpus_spec,
    script:
        "../scripts/manifest.py"


rule folds:
    input:
        PATHS.corpus("{corpus}", "manifest.tsv"),
    output:
        folds=PATHS.corpus("{corpus}", "folds.tsv"),
        summary=PATHS.corpus("{corpus}", "fold_summary.tsv"),
    log:
        log_of(PATHS.corpus("{corpus}", "folds.tsv")),
    benchmark:
        bench_of("folds", PATHS.corpus("{corpus}", "folds.tsv"))
    localrule: True
    conda:
        ENV
    threads: 1
    params:
        dev=lambda wildcards: CORPORA[wildcards.corpus]["folds"]["dev"],
        grouping=lambda wildcards: corpus_kind(
            CORPORA[wildcards.corpus]["kind"]
        ).grouping,
    script:
        "../scripts/folds.py"


# The paper's dialog-prefix folds, for runs under protocol prefix_folds (serlens.methods).
rule folds_prefix:
    input:
        PATHS.corpus("{corpus}", "manifest.tsv"),
    output:
        folds=PATHS.corpus("{corpus}", "folds_prefix.tsv"),
        summary=PATHS.corpus("{corpus}", "fold_summary_prefix.tsv"),
    log:
        log_of(PATHS.corpus("{corpus}", "folds_prefix.tsv")),
    benchmark:
        bench_of("folds_prefix", PATHS.corpus("{corpus}", "folds_prefix.tsv"))
    localrule: True
    conda:
        ENV
    threads: 1
    params:
        dev=lambda wildcards: CORPORA[wildcards.corpus]["folds"]["dev"],
        grouping="prefix",
    script:
        "../scripts/folds.py"
