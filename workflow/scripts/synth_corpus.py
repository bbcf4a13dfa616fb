from serlens.steps import log_to, synth_corpus

log_to(snakemake.log[0])
synth_corpus(
    snakemake.output[0],
    snakemake.params.utterances_per_speaker,
    snakemake.params.seed,
    snakemake.params.scripted_fraction,
)
