from serlens.report.aggregate import aggregate_runs, confusion_from_predictions
from serlens.steps import log_to

log_to(snakemake.log[0])
# params.runs holds the (model, method, fold) key of each input file, in input order
files = dict(zip(map(tuple, snakemake.params.runs), snakemake.input, strict=True))
if snakemake.params.name == "confusion":
    confusion_from_predictions(files, snakemake.params.classes, output=snakemake.output[0])
else:
    aggregate_runs(snakemake.params.name, files, output=snakemake.output[0])
