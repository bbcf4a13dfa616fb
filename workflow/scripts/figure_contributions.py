# Both contributions figures: per model (rule figure_contributions) and all models on one depth axis
# (rule figure_contributions_depth).
import pandas as pd

from serlens.report.figures import contributions_depth_figure, contributions_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
contributions = pd.read_csv(snakemake.input[0], sep="\t")
if "model" in snakemake.wildcards.keys():
    fig = contributions_figure(contributions, snakemake.wildcards.model)
else:
    fig = contributions_depth_figure(contributions, models=snakemake.params.models)
save(fig, snakemake.output.png, snakemake.output.svg)
