from serlens.report import jobs

# One rule per analysis spec (serlens.analysis.registry): light jobs that read the encoder
# passes and the run's files, and run in Snakemake's own process (`run:`), so they pay no
# interpreter start or model load. On a cluster they are submitted like any other job.


for spec in ANALYSES.values():

    rule:
        name:
            spec.name
        input:
            unpack(analysis_inputs(spec) if spec.scope == "run" else lora_rank_inputs),
        output:
            analysis_output(spec),
        log:
            log_of(analysis_output(spec)),
        benchmark:
            bench_of(spec.name, analysis_output(spec))
        wildcard_constraints:
            method=alternatives(spec.methods(METHODS)),
        conda:
            ENV
        threads: 1
        params:
            name=spec.name,
            settings=spec.settings(config),
            classes=CLASSES,
        run:
            jobs.run("analysis", input, output, params, wildcards, log)
