import pandas as pd

from serlens.report.figures import confusion_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
confusion = pd.read_csv(snakemake.input[0], sep="\t")
fig = confusion_figure(confusion, models=snakemake.params.models, classes=snakemake.params.classes)
save(fig, snakemake.output.png, snakemake.output.svg)
