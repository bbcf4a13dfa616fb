from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/corpus.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/analysis.smk"
include: "rules/tables.smk"
include: "rules/report.smk"


# Light jobs run where snakemake runs, not as cluster jobs (weights: compute nodes are often offline).
localrules:
    all,
    synth_corpus,
    manifest,
    folds,
    weights,
    performance,


rule all:
    default_target: True
    input:
        all_targets(),
