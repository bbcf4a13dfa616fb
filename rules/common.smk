import re
from pathlib import Path

from serlens.config import validate_config
from serlens.errors import ConfigError

# Validate before any job is scheduled; the message names the key and what is allowed.
try:
    validate_config(config)
except ConfigError as error:
    raise ValueError(str(error)) from None


RESULTS = config["results"]
RESOURCES = config["resources_dir"]
MODELS = list(config["models"])
FOLDS = config["folds"]["run"]
METHODS = ["frozen"] + [f"lora_r{rank}" for rank in config["lora"]["ranks"]]
CLASSES = config["corpus"]["classes"]

# Resources of one training/analysis job per model; mem_mb and runtime grow with the
# attempt number so `--retries` recovers from out-of-memory and time-limit kills.
RESOURCE_DEFAULTS = {"mem_mb": 4000, "runtime": 60, "gpu": 0}


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) if MODELS else "[^/]+",
    fold=r"\d+",
    rank=r"\d+",


# Which training settings each kind of run reads, so changing one reruns only the runs it affects.
FROZEN_TRAIN_KEYS = [
    "frozen_epochs",
    "frozen_lr",
    "frozen_batch_size",
    "frozen_patience",
]
SHARED_TRAIN_KEYS = [
    "weight_decay",
    "warmup_fraction",
    "grad_clip",
    "balance",
    "head_proj_size",
]


def train_params(kind):
    keys = SHARED_TRAIN_KEYS + (
        FROZEN_TRAIN_KEYS
        if kind == "frozen"
        else ["batch_size", "epochs", "patience", "lr"]
    )
    return {key: config["train"][key] for key in keys}


def model_resource(key):
    def get(wildcards, attempt):
        table = config["model_resources"]
        value = table.get(wildcards.model, table.get("default", {})).get(
            key, RESOURCE_DEFAULTS[key]
        )
        return value * attempt if key in ("mem_mb", "runtime") else value

    return get


def corpus_input(wildcards):
    """The synthetic corpus is a rule output; a user's corpus is read where it lies."""
    if config["corpus"]["kind"] == "synthetic":
        return f"{RESOURCES}/corpus/synthetic"
    return []


def corpus_root():
    if config["corpus"]["kind"] == "synthetic":
        return f"{RESOURCES}/corpus/synthetic"
    return config["corpus"]["root"]


def train_runs():
    """Every model x method x fold run directory of the configured grid."""
    return expand(
        f"{RESULTS}/train/{{model}}/{{method}}/fold{{fold}}",
        model=MODELS,
        method=METHODS,
        fold=FOLDS,
    )


def analysis_targets():
    """Every analysis TSV of the grid (LoRA-only analyses on LoRA runs) and the cross-rank tables."""
    from serlens.analysis.registry import ANALYSES

    targets = []
    for name, spec in ANALYSES.items():
        methods = [m for m in METHODS if m != "frozen"] if spec.lora_only else METHODS
        targets += expand(
            f"{RESULTS}/analysis/{{model}}/{{method}}/fold{{fold}}/{name}.tsv",
            model=MODELS,
            method=methods,
            fold=FOLDS,
        )
    if len(config["lora"]["ranks"]) > 1:  # subspace similarity compares ranks
        targets += expand(
            f"{RESULTS}/analysis/{{model}}/lora/fold{{fold}}/subspace.tsv",
            model=MODELS,
            fold=FOLDS,
        )
    return targets


def run_inputs(method_pattern):
    """Inputs every analysis of one run needs: the corpus tables, the weights and the run's files."""
    run = f"{RESULTS}/train/{{model}}/{method_pattern}/fold{{fold}}"
    inputs = {
        "manifest": f"{RESULTS}/corpus/manifest.tsv",
        "folds": f"{RESULTS}/corpus/folds.tsv",
        "weights": f"{RESULTS}/models/{{model}}.json",
        "head": f"{run}/head.safetensors",
        "metrics": f"{run}/metrics.json",
    }
    if method_pattern != "frozen":
        inputs["adapter"] = f"{run}/adapter"
    return inputs


def all_targets():
    return [
        *analysis_targets(),
        f"{RESULTS}/corpus/manifest.tsv",
        f"{RESULTS}/corpus/folds.tsv",
        *expand(f"{RESULTS}/models/{{model}}.json", model=MODELS),
        f"{RESULTS}/tables/performance_summary.tsv",
        f"{RESULTS}/tables/significance.tsv",
    ]
