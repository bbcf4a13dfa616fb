import re

from serlens.analysis.registry import ANALYSES, run_inputs
from serlens.config import corpus_folds, corpus_specs, validate_config
from serlens.corpus.folds import prefix_fold_numbers
from serlens.corpus.registry import corpus_kind, corpus_root, speaker_groups
from serlens.errors import ConfigError
from serlens.methods import configured_methods, declare
from serlens.paths import Paths

# Validate before any job is scheduled; the message names the key and what is allowed.
try:
    validate_config(config)
except ConfigError as error:
    raise ValueError(str(error)) from None


PATHS = Paths(config["results"])
RESOURCES = config["resources_dir"]
CORPORA = corpus_specs(
    config
)  # name -> corpus spec (config corpora, or the one corpus)
MODELS = list(config["models"])
METHODS = configured_methods(config)  # name -> serlens.methods.Method
declare(METHODS)  # so code run in this process can look declared names up
SEEDS = config["seeds"]
# per corpus: its folds to run (folds.run, "all" = one per session or speaker group), classes
FOLDS = {
    name: corpus_folds(spec, speaker_groups(spec, RESOURCES, name))
    for name, spec in CORPORA.items()
}
CLASSES = {name: spec["classes"] for name, spec in CORPORA.items()}
ENV = "../envs/serlens.yaml"

# Resources of one encoder job per model; mem_mb and runtime grow with the attempt number
# so `--retries` recovers from out-of-memory and time-limit kills.
RESOURCE_DEFAULTS = {"mem_mb": 4000, "runtime": 60, "gpu": 0}


def alternatives(names):
    return "|".join(map(re.escape, names)) if names else "(?!)"


wildcard_constraints:
    corpus=alternatives(CORPORA),
    model=alternatives(MODELS),
    method=alternatives(METHODS),
    seed=r"\d+",
    fold=r"\d+",
    train=alternatives(CORPORA),
    test=alternatives(CORPORA),


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
RUN_FILES = [
    "metrics.json",
    "predictions.tsv",
    "history.tsv",
    "test_epochs.tsv",
    "head.safetensors",
]
FEATURES = PATHS.features("{corpus}", "{model}")
CORPUS_TABLES = {
    "manifest": PATHS.corpus("{corpus}", "manifest.tsv"),
    "folds": PATHS.corpus("{corpus}", "folds.tsv"),
}
BASE_STATES = PATHS.states_file("{corpus}", "{model}", "base")
RUN_STATES = PATHS.states_file("{corpus}", "{model}", "{method}", "{seed}", "{fold}")
RUN_AB = PATHS.ab_file("{corpus}", "{model}", "{method}", "{seed}", "{fold}")
RUN_CAUSAL = PATHS.causal_file("{corpus}", "{model}", "{method}", "{seed}", "{fold}")


def folds_of(corpus, method):
    """The folds a method's runs have in a corpus: the corpus's folds, or for the paper's
    prefix folds the two halves of each (none where the corpus has no dialog prefixes).
    """
    if not METHODS[method].prefix_folds:
        return FOLDS[corpus]
    if not corpus_kind(CORPORA[corpus]["kind"]).dialog_prefixes:
        return []
    return prefix_fold_numbers(FOLDS[corpus])


def folds_table(wildcards):
    """The folds file a run trains on (the paper's prefix folds under protocol prefix_folds)."""
    name = "folds_prefix" if METHODS[wildcards.method].prefix_folds else "folds"
    return PATHS.corpus(wildcards.corpus, f"{name}.tsv")


TRAIN_TABLES = {"manifest": CORPUS_TABLES["manifest"], "folds": folds_table}
HONEST = [name for name, method in METHODS.items() if method.honest]
# runs under the paper's protocol (serlens.methods.DEVIATIONS): trained and tested only
PROTOCOL_METHODS = [name for name, method in METHODS.items() if not method.honest]


def grid(pattern, methods=None, **fixed):
    """``pattern`` expanded over the grid, each corpus with its own folds (methods: those
    given, or every configured one; each with its folds, :func:`folds_of`)."""
    out = []
    for corpus in FOLDS:
        for method in list(METHODS) if methods is None else methods:
            dims = dict(corpus=corpus, model=MODELS, seed=SEEDS)
            dims.update(fold=folds_of(corpus, method), method=method, **fixed)
            out += expand(pattern, **dims)
    return out


def all_targets():
    return [
        *expand(PATHS.corpus("{corpus}", "manifest.tsv"), corpus=CORPORA),
        *expand(PATHS.corpus("{corpus}", "folds.tsv"), corpus=CORPORA),
        *expand(PATHS.weights("{model}"), model=MODELS),
        *grid(f"{RUN}/predictions.tsv"),
        *analysis_targets(),
        *[path for corpus in CORPORA for path in report_targets(corpus)],
        *cross_corpus_targets(),
    ]


# --- inputs, params and targets of the rules (one function each) ---


def classes_of(wildcards):
    return CLASSES[wildcards.corpus]


def n_classes_of(wildcards):
    return len(CLASSES[wildcards.corpus])


def train_settings(wildcards):
    return {
        "classes": CLASSES[wildcards.corpus],
        **METHODS[wildcards.method].train_settings(config),
    }


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
    lora = methods_where(lambda m: m.in_rank_family)
    return {
        f"adapter_{m}": f"{RUN.format(method=m, **wildcards)}/adapter" for m in lora
    }


def analysis_output(spec):
    method = "lora" if spec.scope == "lora_ranks" else "{method}"
    return PATHS.analysis("{corpus}", "{model}", method, "{seed}", "{fold}", spec.name)


def analysis_runs(spec, corpus):
    """Every per-run table of an analysis in one corpus's grid, as (keys, files)."""
    seeds = SEEDS[1:] if spec.scope == "seed_pairs" else SEEDS
    if spec.scope == "lora_ranks":
        methods = ["lora"] if len(methods_where(lambda m: m.in_rank_family)) > 1 else []
    else:
        methods = spec.methods(METHODS)
    keys, files = [], []
    for model in MODELS:
        for method in methods:
            for seed in seeds:
                for fold in FOLDS[corpus]:
                    keys.append([model, method, seed, fold])
                    files.append(
                        PATHS.analysis(corpus, model, method, seed, fold, spec.name)
                    )
    return keys, files


def analysis_table_files(spec):
    return lambda wildcards: analysis_runs(spec, wildcards.corpus)[1]


def analysis_table_keys(spec):
    return lambda wildcards: analysis_runs(spec, wildcards.corpus)[0]


def analysis_targets():
    return [
        path
        for corpus in CORPORA
        for spec in ANALYSES.values()
        for path in analysis_runs(spec, corpus)[1]
    ]


def figure(path, caption, category, subcategory, **labels):
    """A PNG registered in the report, with its caption in workflow/report/."""
    return report(
        path,
        caption=f"../report/{caption}.rst",
        category=category if "{corpus}" not in path else f"{{corpus}} · {category}",
        subcategory=subcategory,
        labels=labels or None,
    )


def predictions(corpus, methods=None):
    """The predictions of the honest runs (or of ``methods``), as (keys, files)."""
    keys, files = [], []
    for model in MODELS:
        for method in HONEST if methods is None else methods:
            for seed in SEEDS:
                for fold in folds_of(corpus, method):
                    keys.append([model, method, seed, fold])
                    files.append(
                        f"{PATHS.run(corpus, model, method, seed, fold)}/predictions.tsv"
                    )
    return keys, files


def prediction_files(wildcards):
    return predictions(wildcards.corpus)[1]


def prediction_keys(wildcards):
    return predictions(wildcards.corpus)[0]


def protocol_prediction_files(wildcards):
    """Every run's predictions, honest and under the paper's protocol (protocol_gap)."""
    return predictions(wildcards.corpus, list(METHODS))[1]


def histories(wildcards):
    keys, files = [], []
    for method in HONEST:
        for seed in SEEDS:
            for fold in FOLDS[wildcards.corpus]:
                keys.append([method, seed, fold])
                files.append(
                    f"{PATHS.run(wildcards.corpus, wildcards.model, method, seed, fold)}/history.tsv"
                )
    return keys, files


def figure_context(spec_keys):
    def context(wildcards):
        return {
            "n_classes": len(CLASSES[wildcards.corpus]),
            "models": MODELS,
            **{key: config["analysis"][key] for key in spec_keys},
        }

    return context


def tables_of(figure_spec):
    return {name: PATHS.table("{corpus}", name) for name in figure_spec.tables}


def report_targets(corpus):
    targets = [
        PATHS.table(corpus, name)
        for name in ("performance", "performance_summary", "significance", "confusion")
    ]
    targets.append(PATHS.corpus(corpus, "fold_summary.tsv"))
    targets.append(PATHS.table(corpus, "claims"))
    targets.append(PATHS.table(corpus, "protocol_gap"))
    for spec in ANALYSES.values():
        # a seed-pair table is written without runs too: it says the floor needs two seeds
        if analysis_runs(spec, corpus)[1] or spec.scope == "seed_pairs":
            targets.append(PATHS.table(corpus, spec.name))
        for fig in spec.figures:
            if not analysis_runs(spec, corpus)[1]:  # its analysis has no run here
                continue
            models = MODELS if fig.per_model else [None]
            for model in models:
                for ext in ("png", "svg"):
                    targets.append(PATHS.figure(corpus, fig.name, model, ext))
    for name in ("performance", "confusion"):
        targets += [PATHS.figure(corpus, name, None, ext) for ext in ("png", "svg")]
    targets += expand(
        PATHS.figure(corpus, "training_curves", "{model}", "{ext}"),
        model=MODELS,
        ext=["png", "svg"],
    )
    targets += [PATHS.figure(None, "rulegraph", None, ext) for ext in ("png", "svg")]
    return targets


# --- cross-corpus tests ---

CROSS = [tuple(pair) for pair in config["cross_corpus"]]
CROSS_EVAL = PATHS.cross_eval(
    "{train}", "{test}", "{model}", "{method}", "{seed}", "{fold}"
)


def cross_table(name, train="{train}", test="{test}"):
    return f"{PATHS.cross(train, test)}/tables/{name}.tsv"


def cross_figure(ext, train="{train}", test="{test}"):
    return f"{PATHS.cross(train, test)}/figures/performance.{ext}"


def shared_classes_of(wildcards):
    return [c for c in CLASSES[wildcards.train] if c in CLASSES[wildcards.test]]


def cross_eval_inputs(wildcards):
    w = wildcards
    run = PATHS.run(w.train, w.model, w.method, w.seed, w.fold)
    inputs = {
        "head": f"{run}/head.safetensors",
        "manifest": PATHS.corpus(w.test, "manifest.tsv"),
        "weights": PATHS.weights(w.model),
    }
    method = METHODS[w.method]
    if method.uses_features:
        inputs["features"] = PATHS.features(w.test, w.model)
    elif method.has_adapter:
        inputs["adapter"] = f"{run}/adapter"
    else:
        inputs["encoder"] = f"{run}/encoder.safetensors"
    return inputs


def cross_predictions(train, test):
    keys, files = [], []
    for model in MODELS:
        for method in HONEST:
            for seed in SEEDS:
                for fold in FOLDS[train]:
                    keys.append([model, method, seed, fold])
                    path = PATHS.cross_eval(train, test, model, method, seed, fold)
                    files.append(f"{path}/predictions.tsv")
    return keys, files


def cross_prediction_files(wildcards):
    return cross_predictions(wildcards.train, wildcards.test)[1]


def cross_prediction_keys(wildcards):
    return cross_predictions(wildcards.train, wildcards.test)[0]


def cross_corpus_targets():
    targets = []
    for train, test in CROSS:
        for name in ("performance", "performance_summary", "significance", "confusion"):
            targets.append(cross_table(name, train, test))
        targets += [cross_figure(ext, train, test) for ext in ("png", "svg")]
    return targets


# --- corpus rules ---


def corpus_spec(wildcards):
    return {k: v for k, v in CORPORA[wildcards.corpus].items() if k != "synthetic"}


def generated_root(wildcards):
    """A generated corpus is a rule output; a user's corpus is read where it lies."""
    spec = CORPORA[wildcards.corpus]
    if corpus_kind(spec["kind"]).generated:
        return str(corpus_root(spec, RESOURCES, wildcards.corpus))
    return []


def read_root(wildcards, input):
    return input[0] if input else str(corpus_root(CORPORA[wildcards.corpus], RESOURCES))


def synthetic_setting(key):
    return lambda wildcards: CORPORA[wildcards.name]["synthetic"][key]
