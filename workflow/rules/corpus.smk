from serlens.corpus.registry import corpus_kind, corpus_root

CORPUS_KIND = corpus_kind(config["corpus"]["kind"])
CORPUS_ROOT = str(corpus_root(config["corpus"], RESOURCES))


rule synth_corpus:
    output:
        directory(f"{RESOURCES}/corpus/synthetic"),
    log:
        f"{PATHS.results}/logs/synth_corpus.log",
    benchmark:
        f"{PATHS.results}/benchmarks/synth_corpus.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    params:
        utterances_per_speaker=config["corpus"]["synthetic"]["utterances_per_speaker"],
        seed=config["corpus"]["synthetic"]["seed"],
        scripted_fraction=config["corpus"]["synthetic"]["scripted_fraction"],
    script:
        "../scripts/synth_corpus.py"


rule manifest:
    input:
        # a generated corpus is a rule output; a user's corpus is read where it lies
        CORPUS_ROOT if CORPUS_KIND.generated else [],
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
        root=lambda wildcards, input: input[0] if input else CORPUS_ROOT,
        corpus={k: v for k, v in config["corpus"].items() if k != "synthetic"},
    script:
        "../scripts/manifest.py"


rule folds:
    input:
        PATHS.corpus("{corpus}", "manifest.tsv"),
    output:
        PATHS.corpus("{corpus}", "folds.tsv"),
    log:
        log_of(PATHS.corpus("{corpus}", "folds.tsv")),
    benchmark:
        bench_of("folds", PATHS.corpus("{corpus}", "folds.tsv"))
    localrule: True
    conda:
        ENV
    threads: 1
    params:
        dev=config["folds"]["dev"],
    script:
        "../scripts/folds.py"
