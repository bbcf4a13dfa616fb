from serlens.report.tables import write_performance_tables
from serlens.steps import log_to

log_to(snakemake.log[0])
write_performance_tables(
    snakemake.params.results,
    snakemake.params.expected,
    snakemake.params.classes,
    snakemake.output.performance,
    snakemake.output.summary,
    snakemake.output.significance,
    resamples=snakemake.params.significance["resamples"],
    seed=snakemake.params.seed,
)
