import pandas as pd

from serlens.report.figures import ab_dynamics_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
ab_dynamics = pd.read_csv(snakemake.input[0], sep="\t")
fig = ab_dynamics_figure(
    ab_dynamics, snakemake.wildcards.model, energy_fraction=snakemake.params.energy_fraction
)
save(fig, snakemake.output.png, snakemake.output.svg)
