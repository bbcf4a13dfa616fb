from pathlib import Path

from serlens.steps import log_to, train_run

log_to(snakemake.log[0])
train_run(
    snakemake.params.settings,
    model=snakemake.wildcards.model,
    method=snakemake.wildcards.method,
    seed=int(snakemake.wildcards.seed),
    fold=int(snakemake.wildcards.fold),
    manifest_path=snakemake.input.manifest,
    folds_path=snakemake.input.folds,
    weights_json=snakemake.input.weights,
    out_dir=Path(snakemake.output.metrics).parent,
    checkpoints=snakemake.params.checkpoints,
    features_path=snakemake.input.get("features"),
    threads=snakemake.threads,
)
