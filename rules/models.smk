rule weights:
    output:
        f"{RESULTS}/models/{{model}}.json",
    log:
        f"{RESULTS}/logs/weights/{{model}}.log",
    conda:
        "../envs/serlens.yaml"
    threads: 1
    resources:
        mem_mb=model_resource("mem_mb"),
    params:
        source=lambda wildcards: config["models"][wildcards.model],
    script:
        "../workflow/scripts/weights.py"
