rule weights:
    output:
        f"{RESULTS}/models/{{model}}.json",
    params:
        source=lambda wildcards: config["models"][wildcards.model],
    log:
        f"{RESULTS}/logs/weights/{{model}}.log",
    threads: 1
    resources:
        mem_mb=model_resource("mem_mb"),
    script:
        "../workflow/scripts/weights.py"
