# Local: compute nodes are often offline, and resolving weights may download them.
rule weights:
    output:
        PATHS.weights("{model}"),
    log:
        log_of(PATHS.weights("{model}")),
    benchmark:
        bench_of("weights", PATHS.weights("{model}"))
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=model_resource("mem_mb"),
    params:
        source=lambda wildcards: config["models"][wildcards.model],
        resources_dir=RESOURCES,
    script:
        "../scripts/weights.py"
