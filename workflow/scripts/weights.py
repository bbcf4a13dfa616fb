from serlens.steps import log_to, resolve_model

log_to(snakemake.log[0])
resolve_model(
    snakemake.params.source,
    snakemake.wildcards.model,
    snakemake.params.resources_dir,
    snakemake.output[0],
)
