import glob
from pathlib import Path
from serlens.report.aggregate import TABLES as ANALYSIS_TABLES
from serlens.report.aggregate import expected_runs
from serlens.report.figures import history_files
from serlens.report.tables import prediction_files
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
        *report_targets(),
        f"{RESULTS}/corpus/manifest.tsv",
        f"{RESULTS}/corpus/folds.tsv",
        *expand(f"{RESULTS}/models/{{model}}.json", model=MODELS),
        f"{RESULTS}/tables/performance_summary.tsv",
        f"{RESULTS}/tables/significance.tsv",
    ]


# --- report: tables and figures -------------------------------------------------
FIGURES = f"{RESULTS}/figures"
LORA_RANKS = config["lora"]["ranks"]


def keyed(files):
    """Input files and their (model, method, fold) keys, in one order: the keys go to params."""
    return {
        "input": [str(path) for path in files.values()],
        "keys": [list(key) for key in files],
    }


def analysis_runs(name):
    return keyed(expected_runs(name, RESULTS, MODELS, METHODS, FOLDS))


def training_histories(wildcards):
    """history.tsv (and history_wsum.tsv) of every run of one model, keyed by (method, fold)."""
    return keyed(history_files(f"{RESULTS}/train", wildcards.model, METHODS, FOLDS))


PREDICTIONS = keyed(prediction_files(Path(RESULTS), MODELS, METHODS, FOLDS))


def figure(path, caption, category, subcategory, **labels):
    """A PNG registered in the report, with its caption in workflow/report/."""
    return report(
        path,
        caption=f"../workflow/report/{caption}.rst",
        category=category,
        subcategory=subcategory,
        labels=labels or None,
    )


def aggregated_tables():
    """Analysis tables of the grid (LoRA-only ones only when ranks are configured)."""
    return [
        name
        for name, spec in ANALYSIS_TABLES.items()
        if LORA_RANKS or not spec.lora_only
    ]


def report_targets():
    """Every table and figure of the report: add these to rule all."""
    per_model = ["training_curves", "contributions", "logit_lens", "probing"]
    if LORA_RANKS:
        per_model += ["spectra", "ab_dynamics", "cka"]
    targets = [
        f"{RESULTS}/tables/confusion.tsv",
        *expand(f"{RESULTS}/tables/{{name}}.tsv", name=aggregated_tables()),
        *expand(
            f"{FIGURES}/{{name}}.{{ext}}",
            name=["performance", "confusion", "contributions_depth", "rulegraph"],
            ext=["png", "svg"],
        ),
        *expand(
            f"{FIGURES}/{{family}}/{{model}}.{{ext}}",
            family=per_model,
            model=MODELS,
            ext=["png", "svg"],
        ),
    ]
    return targets
