from serlens.steps import log_to, resolve_model

log_to(snakemake.log[0])
resolve_model(snakemake.config, snakemake.wildcards.model, snakemake.output[0])
