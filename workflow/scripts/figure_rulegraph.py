from pathlib import Path

from serlens.report.figures import rulegraph_dot, rulegraph_figure, save
from serlens.steps import log_to

log_to(snakemake.log[0])
dot = rulegraph_dot(snakemake.input.snakefile, snakemake.config, workdir=Path.cwd())
Path(snakemake.output.dot).write_text(dot)
save(rulegraph_figure(dot), snakemake.output.png, snakemake.output.svg)
