rule synth_corpus:
    output:
        directory(f"{RESOURCES}/corpus/synthetic"),
    log:
        f"{RESULTS}/logs/synth_corpus.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        utterances_per_speaker=config["corpus"]["synthetic"]["utterances_per_speaker"],
        seed=config["corpus"]["synthetic"]["seed"],
    script:
        "../workflow/scripts/synth_corpus.py"


rule manifest:
    input:
        corpus_input,
    output:
        manifest=f"{RESULTS}/corpus/manifest.tsv",
        summary=f"{RESULTS}/corpus/summary.tsv",
    log:
        f"{RESULTS}/logs/manifest.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        root=corpus_root(),
        corpus={k: v for k, v in config["corpus"].items() if k != "synthetic"},
    script:
        "../workflow/scripts/manifest.py"


rule folds:
    input:
        f"{RESULTS}/corpus/manifest.tsv",
    output:
        f"{RESULTS}/corpus/folds.tsv",
    log:
        f"{RESULTS}/logs/folds.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    params:
        dev=config["folds"]["dev"],
    script:
        "../workflow/scripts/folds.py"
