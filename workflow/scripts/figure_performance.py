import pandas as pd

from serlens.report.figures import performance_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
performance = pd.read_csv(snakemake.input[0], sep="\t")
fig = performance_figure(
    performance, models=snakemake.params.models, n_classes=snakemake.params.n_classes
)
save(fig, snakemake.output.png, snakemake.output.svg)
