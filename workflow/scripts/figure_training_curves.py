from serlens.report.figures import load_histories, save, training_curves_figure
from serlens.steps import log_to

log_to(snakemake.log[0])
# params.runs holds the (method, fold) key of each input history, in input order
histories = load_histories(
    dict(zip(map(tuple, snakemake.params.runs), snakemake.input, strict=True))
)
fig = training_curves_figure(
    histories, snakemake.wildcards.model, n_classes=snakemake.params.n_classes
)
save(fig, snakemake.output.png, snakemake.output.svg)
