"""One declaration per analysis; the workflow's rules, tables, figures and report follow from it.

An analysis module declares ``SPEC = AnalysisSpec(...)``: what it computes (a light function
of the run's stored encoder states and files, no transformers or peft), which runs it applies
to, which products it reads, which keys of ``config["analysis"]`` it reads, how its table is
aggregated, its figures and their captions (``workflow/report/{figure}.rst``). The registry
finds every :class:`AnalysisSpec` defined in a module of :mod:`serlens.analysis`; ``workflow/rules/analysis.smk`` and
``report.smk`` loop over :data:`ANALYSES`.

A job's settings are ``settings(config)``: exactly the declared keys, passed as the rule's
``params`` and handed to ``compute`` as a :class:`Settings`, which refuses any key that was
not declared. So what triggers a rerun and what the code reads are the same list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from serlens.methods import Method

#: What an analysis can read of a run (the rule's inputs are derived from these).
PRODUCTS = {
    "states": "the run's own encoder states (states.safetensors of its pass, or the base pass)",
    "base_states": "the pre-trained encoder's states on the same fold (base pass)",
    "ab": "A/B activation and gradient statistics of the run's pass (ab.safetensors)",
    "causal": "the run's head logits under every causal intervention (causal.safetensors of its pass)",
    "features": "the cached pooled states of the pre-trained encoder (every utterance)",
    "head": "the run's trained head (head.safetensors)",
    "adapter": "the run's adapter folder (adapter/)",
    "weight_update": "the run's weight update: its adapter/ (LoRA, DoRA) or delta.safetensors (full fine-tuning, ΔW = W_ft − W0 of its targets)",
    "adapter_epochs": "the run's adapter at initialisation and after every epoch (adapter_epochs/)",
    "weights": "the resolved pre-trained weights (models/{model}.json)",
}


class Settings(Mapping):
    """A read-only mapping of a job's settings (its rule's params).

    Asked for a key it was not given, it raises naming the job and the keys it has, so a job
    cannot read a setting its rule does not pass (and Snakemake would not rerun it for).
    ``accessed`` records the keys read, so tests can check the converse: that every key the
    rule passes is read. :meth:`plain` gives the values without recording (for digests).
    """

    def __init__(self, owner: str, values: Mapping):
        self._owner, self._values = owner, dict(values)
        self.accessed: set = set()

    def __getitem__(self, key):
        if key not in self._values:
            raise KeyError(
                f"{self._owner} read setting {key!r}, which it does not declare "
                f"(declared: {sorted(self._values)}); add it to its spec's keys."
            )
        self.accessed.add(key)
        return self._values[key]

    def plain(self) -> dict:
        return {k: v.plain() if isinstance(v, Settings) else v for k, v in self._values.items()}

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


@dataclass(frozen=True)
class TableSpec:
    """How the per-run tables are aggregated over folds (:mod:`serlens.report.aggregate`).

    ``keys`` identify one observation within a run; ``values`` are the measured columns
    (several are melted to ``metric, value``).
    """

    keys: tuple[str, ...]
    values: tuple[str, ...] = ("value",)
    #: ``derive(long, run_columns)``: extra long-form rows formed per run before averaging
    #: (a per-fold difference has the spread of the difference), or None.
    derive: Callable | None = None

    @property
    def melted(self) -> bool:
        return len(self.values) > 1


@dataclass(frozen=True)
class FigureSpec:
    """A figure drawn from aggregated tables: ``figures/{name}/{model}.png`` or ``figures/{name}.png``.

    ``draw(tables, model, context)`` returns a matplotlib figure; ``tables`` maps table
    names (``tables``) to frames; ``context`` holds ``n_classes``, ``models`` and the
    declared ``keys`` of ``config["analysis"]``. The caption is ``workflow/report/{name}.rst``.
    """

    name: str
    draw: Callable
    tables: tuple[str, ...]
    category: str
    per_model: bool = True
    keys: tuple[str, ...] = ()


SCOPES = ("run", "lora_ranks", "seed_pairs")


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis: see the module docstring.

    ``scope``: ``run`` (one table per run), ``lora_ranks`` (one table per model, seed and
    fold, comparing the LoRA ranks; written where a method goes, as ``lora``) or
    ``seed_pairs`` (one table per run of every seed but the first, comparing it with the
    same model, method and fold of the first seed; compute gets ``{"run", "reference"}``).
    """

    name: str
    compute: Callable  # (RunData, Settings) -> DataFrame (scope run) or (dict, Settings) -> ...
    applies_to: Callable[[Method], bool]
    reads: frozenset[str]
    keys: tuple[str, ...]
    table: TableSpec
    figures: tuple[FigureSpec, ...] = ()
    scope: str = "run"
    uses_seed: bool = False  # reads the workflow's seed (sampling, CV splits)
    doc: str = ""

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"analysis {self.name}: scope {self.scope!r} is not one of {SCOPES}")
        unknown = set(self.reads) - set(PRODUCTS)
        if unknown:
            raise ValueError(f"analysis {self.name}: unknown products {sorted(unknown)}")

    def settings(self, config: dict) -> dict:
        """The slice of the config the analysis reads (its rule's params)."""
        values = {key: config["analysis"][key] for key in self.keys}
        if self.uses_seed:
            values["seed"] = config["analysis_seed"]
        return values

    def methods(self, methods: Mapping[str, Method]) -> list[str]:
        """The methods of ``methods`` it runs on: those it applies to, trained honestly (a
        run under the paper's protocol is only tested: ``protocol_gap.tsv``)."""
        return [
            name for name, method in methods.items() if method.honest and self.applies_to(method)
        ]


def run_inputs(spec: AnalysisSpec, method: Method, paths, corpus, model, seed, fold) -> dict:
    """The files an analysis of one run reads: the corpus tables and the products its spec
    declares, as paths (values, or Snakemake wildcard patterns such as ``"{model}"``).

    A method without an encoder of its own reads the base pass as its ``states`` (so it gets
    no separate ``base_states``), and only methods trained on the cached features read them.
    """
    run = paths.run(corpus, model, method.name, seed, fold)
    variant = method.encoder_variant
    files = {
        "manifest": paths.corpus(corpus, "manifest.tsv"),
        "folds": paths.corpus(corpus, "folds.tsv"),
        "states": paths.states_file(corpus, model, variant, seed, fold),
        "base_states": paths.states_file(corpus, model, "base"),
        "ab": paths.ab_file(corpus, model, method.name, seed, fold),
        "causal": paths.causal_file(corpus, model, method.name, seed, fold),
        "features": paths.features(corpus, model),
        "head": f"{run}/head.safetensors",
        "adapter": f"{run}/adapter",
        "weight_update": f"{run}/adapter" if method.has_adapter else f"{run}/delta.safetensors",
        "adapter_epochs": f"{run}/adapter_epochs",
        "weights": paths.weights(model),
    }
    wanted = {"manifest", "folds", *spec.reads}
    if variant == "base":
        wanted.discard("base_states")
    if not method.uses_features:
        wanted.discard("features")
    return {name: path for name, path in files.items() if name in wanted}


def _discover() -> dict[str, AnalysisSpec]:
    import serlens.analysis as package

    specs = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for spec in vars(module).values():
            if isinstance(spec, AnalysisSpec) and spec.compute.__module__ == module.__name__:
                if spec.name in specs:
                    raise ValueError(f"two analyses are named {spec.name!r}")
                specs[spec.name] = spec
    return dict(
        sorted(specs.items(), key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else 99)
    )


# Report order of the analyses this package ships (others follow, by name).
ORDER = [
    "contributions",
    "logit_lens",
    "probing",
    "svd",
    "subspace",
    "update_dynamics",
    "ab_dynamics",
    "cka",
    "seed_floor",
    "causal",
]


@dataclass
class RunData:
    """What a light analysis job of one run gets: its identity and its input files, lazily read."""

    corpus: str
    model: str
    method: Method
    seed: int
    fold: int
    classes: list[str]
    inputs: Mapping[str, str] = field(default_factory=dict)

    def _input(self, name: str) -> str:
        if name not in self.inputs:
            raise KeyError(
                f"{self.model}/{self.method.name}/fold{self.fold}: input {name!r} was not declared "
                f"by the analysis (declared: {sorted(self.inputs)})"
            )
        return self.inputs[name]

    @cached_property
    def splits(self):
        from serlens.train.data import read_fold_splits

        return read_fold_splits(
            self._input("manifest"), self._input("folds"), self.fold, self.classes
        )

    @cached_property
    def speakers(self) -> dict[str, str]:
        from serlens.corpus.manifest import speakers_from_manifest

        return speakers_from_manifest(Path(self._input("manifest")))

    def states(self, which: str = "states"):
        """The run's own states (``states``) or the pre-trained encoder's (``base_states``),
        as ``{split}/{name}`` arrays of this fold; the base pass is viewed through the fold."""
        from serlens.analysis.passes import States

        own_is_base = which == "states" and not self.method.trains_encoder
        if which == "base_states" or own_is_base:
            return States(self._input(which)).fold_view(self.fold)
        return States(self._input(which))

    def head(self):
        from serlens.train.heads import load_head

        return load_head(self._input("head"))

    def path(self, name: str) -> Path:
        return Path(self._input(name))


def run_analysis(spec_name: str, data, settings: Mapping, output: Path | str) -> pd.DataFrame:
    """Compute one analysis from its inputs and write its tidy TSV with the run's key columns."""
    from serlens.io import write_tsv_atomic

    spec = __getattr__("ANALYSES")[spec_name]
    table = spec.compute(data, Settings(f"analysis {spec.name}", settings))
    if spec.scope == "seed_pairs":
        data = data["run"]
    if spec.scope in ("run", "seed_pairs"):
        table.insert(0, "fold", int(data.fold))
        table.insert(0, "seed", int(data.seed))
        table.insert(0, "method", data.method.name)
        table.insert(0, "model", data.model)
    write_tsv_atomic(table, Path(output))
    return table


#: One method of every kind (and readout), the columns of :func:`applicability_table`.
KIND_EXAMPLES = {
    "frozen, last layer": Method("frozen", "frozen", readout="last", short=True),
    "frozen, weighted sum": Method("frozen_wsum", "frozen", readout="wsum", short=True),
    "LoRA (short form)": Method("lora_r8", "lora", rank=8, targets=("v_proj",), short=True),
    "LoRA (declared)": Method("lora_qv", "lora", rank=8, targets=("q_proj", "v_proj")),
    "DoRA": Method("dora_r8", "dora", rank=8, targets=("v_proj",)),
    "full": Method("full", "full", targets=("v_proj",), lr=1e-5),
}

APPLICABILITY_BEGIN, APPLICABILITY_END = "<!-- applies: begin -->", "<!-- applies: end -->"


def applicability_table() -> str:
    """Which analysis runs on which kind of method (docs/architecture.md; a test keeps it so).

    A cross-rank analysis (``lora_ranks``) compares the short-form LoRA ranks."""
    kinds = list(KIND_EXAMPLES)
    lines = [
        "| analysis | " + " | ".join(kinds) + " |",
        "| --- |" + " :---: |" * len(kinds),
    ]
    for spec in __getattr__("ANALYSES").values():
        marks = []
        for method in KIND_EXAMPLES.values():
            applies = (
                method.in_rank_family if spec.scope == "lora_ranks" else spec.applies_to(method)
            )
            marks.append("✓" if applies else "")
        lines.append(f"| {spec.name} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


_ANALYSES: dict[str, AnalysisSpec] | None = None


def __getattr__(name: str):
    # ANALYSES is built on first use, so an analysis module can import this one for its SPEC.
    global _ANALYSES
    if name == "ANALYSES":
        if _ANALYSES is None:
            _ANALYSES = _discover()
        return _ANALYSES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
