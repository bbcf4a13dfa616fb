from serlens.analysis.registry import run_analysis
from serlens.steps import device_and_threads, log_to

log_to(snakemake.log[0])
device = device_and_threads(snakemake.threads)
run_analysis(
    snakemake.params.name,
    snakemake.config,
    model=snakemake.wildcards.model,
    method=snakemake.params.method,
    fold=int(snakemake.wildcards.fold),
    manifest=snakemake.input.manifest,
    folds=snakemake.input.folds,
    weights=snakemake.input.weights,
    run_dir=snakemake.params.run_dir,
    output=snakemake.output[0],
    features=snakemake.input.get("features"),
    device=device,
)
