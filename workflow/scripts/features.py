from serlens.steps import log_to, make_features

log_to(snakemake.log[0])
make_features(
    snakemake.params.audio,
    snakemake.params.batch_size,
    snakemake.input.weights,
    snakemake.input.manifest,
    snakemake.output[0],
    snakemake.threads,
)
