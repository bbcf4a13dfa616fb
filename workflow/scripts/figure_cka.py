import pandas as pd

from serlens.report.figures import cka_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
cka = pd.read_csv(snakemake.input[0], sep="\t")
fig = cka_figure(cka, snakemake.wildcards.model)
save(fig, snakemake.output.png, snakemake.output.svg)
