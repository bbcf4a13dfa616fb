from serlens.report import jobs

# One rule per analysis spec (serlens.analysis.registry): light jobs that read the encoder
# passes and the run's files, and run in Snakemake's own process (`run:`), so they pay no
# interpreter start or model load. On a cluster they are submitted like any other job.


for spec in ANALYSES.values():

    rule:
        name:
            spec.name
        input:
            unpack(rule_inputs(spec)),
        output:
            analysis_output(spec),
        log:
            log_of(analysis_output(spec)),
        benchmark:
            bench_of(spec.name, analysis_output(spec))
        wildcard_constraints:
            method=alternatives(spec.methods(METHODS)),
            seed=alternatives(
                [str(s) for s in (SEEDS[1:] if spec.scope == "seed_pairs" else SEEDS)]
            ),
        conda:
            ENV
        threads: 1
        params:
            name=spec.name,
            settings=spec.settings(config),
            classes=classes_of,
            reference_seed=SEEDS[0] if spec.scope == "seed_pairs" else None,
        run:
            jobs.run("analysis", input, output, params, wildcards, log)
