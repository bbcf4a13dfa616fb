import pandas as pd

from serlens.report.figures import logit_lens_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
logit_lens = pd.read_csv(snakemake.input[0], sep="\t")
fig = logit_lens_figure(logit_lens, snakemake.wildcards.model, n_classes=snakemake.params.n_classes)
save(fig, snakemake.output.png, snakemake.output.svg)
