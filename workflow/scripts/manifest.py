from serlens.steps import log_to, make_manifest

log_to(snakemake.log[0])
make_manifest(
    snakemake.params.corpus,
    snakemake.params.root,
    snakemake.output.manifest,
    snakemake.output.summary,
)
