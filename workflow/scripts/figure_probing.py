import pandas as pd

from serlens.report.figures import probing_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
probing = pd.read_csv(snakemake.input[0], sep="\t")
fig = probing_figure(probing, snakemake.wildcards.model, n_classes=snakemake.params.n_classes)
save(fig, snakemake.output.png, snakemake.output.svg)
