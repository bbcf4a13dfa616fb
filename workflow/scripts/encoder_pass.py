from serlens.steps import encoder_pass, log_to

log_to(snakemake.log[0])
encoder_pass(
    snakemake.params.settings,
    model=snakemake.wildcards.model,
    method=snakemake.wildcards.get("method", "base"),
    fold=int(snakemake.wildcards.fold) if "fold" in snakemake.wildcards.keys() else None,
    manifest_path=snakemake.input.manifest,
    folds_path=snakemake.input.folds,
    weights_json=snakemake.input.weights,
    out=snakemake.output.states,
    run_dir=snakemake.params.get("run_dir"),
    ab_out=snakemake.output.get("ab"),
    threads=snakemake.threads,
    causal_out=snakemake.output.get("causal"),
    epoch0=snakemake.params.get("epoch0"),
)
