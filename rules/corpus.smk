rule synth_corpus:
    output:
        directory(f"{RESOURCES}/corpus/synthetic"),
    params:
        utterances_per_speaker=config["corpus"]["synthetic"]["utterances_per_speaker"],
        seed=config["corpus"]["synthetic"]["seed"],
    log:
        f"{RESULTS}/logs/synth_corpus.log",
    threads: 1
    script:
        "../workflow/scripts/synth_corpus.py"


rule manifest:
    input:
        corpus_input,
    output:
        manifest=f"{RESULTS}/corpus/manifest.tsv",
        summary=f"{RESULTS}/corpus/summary.tsv",
    params:
        root=corpus_root(),
        corpus={k: v for k, v in config["corpus"].items() if k != "synthetic"},
    log:
        f"{RESULTS}/logs/manifest.log",
    threads: 1
    script:
        "../workflow/scripts/manifest.py"


rule folds:
    input:
        f"{RESULTS}/corpus/manifest.tsv",
    output:
        f"{RESULTS}/corpus/folds.tsv",
    params:
        folds=config["folds"],
    log:
        f"{RESULTS}/logs/folds.log",
    threads: 1
    script:
        "../workflow/scripts/folds.py"
