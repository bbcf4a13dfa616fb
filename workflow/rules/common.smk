import re

from serlens.analysis.registry import ANALYSES, run_inputs
from serlens.config import validate_config
from serlens.errors import ConfigError
from serlens.methods import configured_methods
from serlens.paths import Paths

# Validate before any job is scheduled; the message names the key and what is allowed.
try:
    validate_config(config)
except ConfigError as error:
    raise ValueError(str(error)) from None


PATHS = Paths(config["results"])
RESOURCES = config["resources_dir"]
CORPUS = config["corpus"]["name"] or config["corpus"]["kind"]
MODELS = list(config["models"])
METHODS = configured_methods(config)  # name -> serlens.methods.Method
SEEDS = config["seeds"]
FOLDS = config["folds"]["run"]
CLASSES = config["corpus"]["classes"]
ENV = "../envs/serlens.yaml"

# Resources of one encoder job per model; mem_mb and runtime grow with the attempt number
# so `--retries` recovers from out-of-memory and time-limit kills.
RESOURCE_DEFAULTS = {"mem_mb": 4000, "runtime": 60, "gpu": 0}


def alternatives(names):
    return "|".join(map(re.escape, names)) if names else "(?!)"


wildcard_constraints:
    corpus=re.escape(CORPUS),
    model=alternatives(MODELS),
    method=alternatives(METHODS),
    seed=r"\d+",
    fold=r"\d+",


# Every rule's log and benchmark sit at the same place below results/ as its first output.
def log_of(path):
    return PATHS.log(path)


def bench_of(rule_name, path):
    return PATHS.benchmark(rule_name, path)


def model_resource(key):
    def get(wildcards, attempt):
        table = config["model_resources"]
        value = table.get(wildcards.model, table.get("default", {})).get(
            key, RESOURCE_DEFAULTS[key]
        )
        return value * attempt if key in ("mem_mb", "runtime") else value

    return get


def methods_where(predicate):
    return [name for name, method in METHODS.items() if predicate(method)]


RUN = PATHS.run("{corpus}", "{model}", "{method}", "{seed}", "{fold}")
RUN_FILES = ["metrics.json", "predictions.tsv", "history.tsv", "head.safetensors"]
FEATURES = PATHS.features("{corpus}", "{model}")
CORPUS_TABLES = {
    "manifest": PATHS.corpus("{corpus}", "manifest.tsv"),
    "folds": PATHS.corpus("{corpus}", "folds.tsv"),
}
BASE_STATES = PATHS.states_file("{corpus}", "{model}", "base")
RUN_STATES = PATHS.states_file("{corpus}", "{model}", "{method}", "{seed}", "{fold}")
RUN_AB = PATHS.ab_file("{corpus}", "{model}", "{method}", "{seed}", "{fold}")

GRID = dict(corpus=[CORPUS], model=MODELS, seed=SEEDS, fold=FOLDS)


def grid(pattern, methods=None, **fixed):
    """``pattern`` expanded over the grid (methods: those given, or every configured one)."""
    dims = {**GRID, "method": list(METHODS) if methods is None else methods, **fixed}
    return expand(pattern, **dims)


def all_targets():
    return [
        PATHS.corpus(CORPUS, "manifest.tsv"),
        PATHS.corpus(CORPUS, "folds.tsv"),
        *expand(PATHS.weights("{model}"), model=MODELS),
        *grid(f"{RUN}/predictions.tsv"),
        *analysis_targets(),
        *report_targets(),
    ]


# --- inputs, params and targets of the rules (one function each) ---


def train_settings(wildcards):
    return {"classes": CLASSES, **METHODS[wildcards.method].train_settings(config)}


def analysis_inputs(spec):
    """The files an analysis of one run reads (serlens.analysis.registry.run_inputs)."""

    def inputs(wildcards):
        w = wildcards
        return run_inputs(
            spec, METHODS[w.method], PATHS, w.corpus, w.model, w.seed, w.fold
        )

    return inputs


def seed_pair_inputs(spec):
    """A run's inputs and, suffixed ``_ref``, those of the first seed's run."""

    def inputs(wildcards):
        w = wildcards
        method = METHODS[w.method]
        ours = run_inputs(spec, method, PATHS, w.corpus, w.model, w.seed, w.fold)
        ref = run_inputs(spec, method, PATHS, w.corpus, w.model, SEEDS[0], w.fold)
        return {**ours, **{f"{k}_ref": v for k, v in ref.items()}}

    return inputs


def rule_inputs(spec):
    if spec.scope == "run":
        return analysis_inputs(spec)
    if spec.scope == "seed_pairs":
        return seed_pair_inputs(spec)
    return lora_rank_inputs


def lora_rank_inputs(wildcards):
    lora = methods_where(lambda m: m.kind == "lora")
    return {
        f"adapter_{m}": f"{RUN.format(method=m, **wildcards)}/adapter" for m in lora
    }


def analysis_output(spec):
    method = "lora" if spec.scope == "lora_ranks" else "{method}"
    return PATHS.analysis("{corpus}", "{model}", method, "{seed}", "{fold}", spec.name)


def analysis_runs(spec):
    """Every per-run table of an analysis in the grid, as (keys, files)."""
    seeds = SEEDS[1:] if spec.scope == "seed_pairs" else SEEDS
    if spec.scope == "lora_ranks":
        methods = ["lora"] if len(methods_where(lambda m: m.kind == "lora")) > 1 else []
    else:
        methods = spec.methods(METHODS)
    keys, files = [], []
    for model in MODELS:
        for method in methods:
            for seed in seeds:
                for fold in FOLDS:
                    keys.append([model, method, seed, fold])
                    files.append(
                        PATHS.analysis(CORPUS, model, method, seed, fold, spec.name)
                    )
    return keys, files


def analysis_targets():
    return [path for spec in ANALYSES.values() for path in analysis_runs(spec)[1]]


def figure(path, caption, category, subcategory, **labels):
    """A PNG registered in the report, with its caption in workflow/report/."""
    return report(
        path,
        caption=f"../report/{caption}.rst",
        category=category,
        subcategory=subcategory,
        labels=labels or None,
    )


def predictions():
    keys, files = [], []
    for model in MODELS:
        for method in METHODS:
            for seed in SEEDS:
                for fold in FOLDS:
                    keys.append([model, method, seed, fold])
                    files.append(
                        f"{PATHS.run(CORPUS, model, method, seed, fold)}/predictions.tsv"
                    )
    return keys, files


def histories(wildcards):
    keys, files = [], []
    for method in METHODS:
        for seed in SEEDS:
            for fold in FOLDS:
                keys.append([method, seed, fold])
                files.append(
                    f"{PATHS.run(CORPUS, wildcards.model, method, seed, fold)}/history.tsv"
                )
    return keys, files


def figure_context(spec_keys):
    return {
        "n_classes": len(CLASSES),
        "models": MODELS,
        **{key: config["analysis"][key] for key in spec_keys},
    }


def tables_of(figure_spec):
    return {name: PATHS.table(CORPUS, name) for name in figure_spec.tables}


def report_targets():
    targets = [
        PATHS.table(CORPUS, name)
        for name in ("performance", "performance_summary", "significance", "confusion")
    ]
    for spec in ANALYSES.values():
        # a seed-pair table is written without runs too: it says the floor needs two seeds
        if analysis_runs(spec)[1] or spec.scope == "seed_pairs":
            targets.append(PATHS.table(CORPUS, spec.name))
        for fig in spec.figures:
            if not analysis_runs(spec)[1]:  # the figure's own analysis has no run here
                continue
            models = MODELS if fig.per_model else [None]
            for model in models:
                for ext in ("png", "svg"):
                    targets.append(PATHS.figure(CORPUS, fig.name, model, ext))
    for name in ("performance", "confusion", "rulegraph"):
        targets += [PATHS.figure(CORPUS, name, None, ext) for ext in ("png", "svg")]
    targets += expand(
        PATHS.figure(CORPUS, "training_curves", "{model}", "{ext}"),
        model=MODELS,
        ext=["png", "svg"],
    )
    return targets
