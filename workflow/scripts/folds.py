from serlens.steps import log_to, make_folds

log_to(snakemake.log[0])
make_folds(
    snakemake.params.dev,
    snakemake.input[0],
    snakemake.output.folds,
    grouping=snakemake.params.grouping,
    summary_out=snakemake.output.summary,
)
