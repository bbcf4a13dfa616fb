from pathlib import Path

from serlens.analysis.passes import pass_settings

# One model load per run: every encoder forward pass its analyses need, written once.


# The pre-trained encoder on every utterance: shared by every run of the model (folds are views).
rule pass_base:
    input:
        **CORPUS_TABLES,
        weights=PATHS.weights("{model}"),
    output:
        states=BASE_STATES,
    log:
        log_of(BASE_STATES),
    benchmark:
        bench_of("pass_base", BASE_STATES)
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        settings=pass_settings(config, ab=False),
    script:
        "../scripts/encoder_pass.py"


# A run with its own encoder: adapted states on test and train, A/B statistics.
rule pass_run:
    input:
        **CORPUS_TABLES,
        weights=PATHS.weights("{model}"),
        adapter=f"{RUN}/adapter",
        adapter_epochs=f"{RUN}/adapter_epochs",
        head=f"{RUN}/head.safetensors",
    output:
        states=RUN_STATES,
        ab=RUN_AB,
        causal=RUN_CAUSAL,
    log:
        log_of(RUN_STATES),
    benchmark:
        bench_of("pass_run", RUN_STATES)
    wildcard_constraints:
        method=alternatives(methods_where(lambda m: m.has_adapter)),
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        settings=pass_settings(config),
        run_dir=lambda wildcards, input: str(Path(input.head).parent),
        epoch0=lambda wildcards, input: f"{input.adapter_epochs}/epoch0.safetensors",
    script:
        "../scripts/encoder_pass.py"


# A fully fine-tuned run: its states and causal tests (no adapter, so no A/B statistics).
rule pass_full:
    input:
        **CORPUS_TABLES,
        weights=PATHS.weights("{model}"),
        encoder=f"{RUN}/encoder.safetensors",
        head=f"{RUN}/head.safetensors",
    output:
        states=RUN_STATES,
        causal=RUN_CAUSAL,
    log:
        log_of(RUN_STATES),
    benchmark:
        bench_of("pass_full", RUN_STATES)
    wildcard_constraints:
        method=alternatives(methods_where(lambda m: m.kind == "full")),
    conda:
        ENV
    threads: max(1, workflow.cores // 2)
    resources:
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        gpu=model_resource("gpu"),
    params:
        settings=pass_settings(config, ab=False, causal=True),
        run_dir=lambda wildcards, input: str(Path(input.head).parent),
    script:
        "../scripts/encoder_pass.py"
