import pandas as pd

from serlens.report.figures import save, spectra_figure
from serlens.steps import log_to

log_to(snakemake.log[0])
svd = pd.read_csv(snakemake.input.svd, sep="\t")
subspace = pd.read_csv(snakemake.input.subspace, sep="\t")
fig = spectra_figure(
    svd, subspace, snakemake.wildcards.model, intruder_epsilon=snakemake.params.intruder_epsilon
)
save(fig, snakemake.output.png, snakemake.output.svg)
