from serlens.analysis.lora_spectra import write_subspace_similarity
from serlens.steps import log_to

log_to(snakemake.log[0])
write_subspace_similarity(
    dict(zip(snakemake.params.ranks, snakemake.input.adapters, strict=True)),
    snakemake.output[0],
    model=snakemake.wildcards.model,
    fold=int(snakemake.wildcards.fold),
)
