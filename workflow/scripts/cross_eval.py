from serlens.steps import cross_eval, log_to

log_to(snakemake.log[0])
cross_eval(
    method=snakemake.wildcards.method,
    run_dir=snakemake.params.get("run_dir") or snakemake.input.head.rsplit("/", 1)[0],
    train_classes=snakemake.params.train_classes,
    test_manifest=snakemake.input.manifest,
    test_classes=snakemake.params.test_classes,
    out=snakemake.output[0],
    weights_json=snakemake.input.weights,
    test_features=snakemake.input.get("features"),
    audio=snakemake.params.audio,
    batch_size=snakemake.params.batch_size,
    threads=snakemake.threads,
)
