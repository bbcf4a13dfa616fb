"""Fold-aggregated analysis tables: mean and standard deviation over folds, one observation per row.

Every analysis writes one tidy TSV per ``model x method x fold`` run
(``results/analysis/{model}/{method}/fold{fold}/{analysis}.tsv``; the cross-rank subspace
similarity one per ``model x fold`` under ``method = lora``). :func:`aggregate_analysis` reads
the runs of the configured grid (or :func:`aggregate_runs` the files it is given) and writes ``results/tables/{analysis}.tsv`` with columns::

    model, method, <the analysis' keys>, [metric,] mean, std, n_folds, missing_folds

``mean`` and ``std`` (sample standard deviation, ddof = 1; empty with one fold) are taken
over the folds that hold the observation; ``n_folds`` says how many that is and
``missing_folds`` lists the folds of that model and method whose file is absent, so a mean
over fewer folds is never mistaken for a mean over all of them (:func:`missing_runs`).

Analyses whose per-run table is wide (``probing``: ``uar``, ``war``, ``selectivity_*``...)
are melted to ``metric, value`` first. A few differences are formed *per fold, before*
averaging, so that their spread is the spread of the difference:

* ``contributions``: ``variant = delta`` = ``adapted - base`` of the same LoRA run.
* ``ab_dynamics``: ``quantity = grad_norm_ratio_B_A`` = ``‖∂L/∂B‖_F / ‖∂L/∂A‖_F`` for the
  trained and the untrained adapter.

:func:`confusion_table` sums the confusion matrices of every fold of a model and method
(recomputed from ``predictions.tsv``) into ``results/tables/confusion.tsv``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from serlens.report.tables import prediction_files, read_predictions
from serlens.train.data import write_tsv_atomic

log = logging.getLogger(__name__)

RUN_COLUMNS = ("model", "method", "fold")
SUMMARY_COLUMNS = ("mean", "std", "n_folds", "missing_folds")


@dataclass(frozen=True)
class TableSpec:
    """How one analysis' per-run table is aggregated.

    ``keys`` identify one observation within a run; ``values`` are the measured columns.
    With one value column named ``value`` (or ``phi``) the table is already long; with
    several, they are melted into ``metric, value``.
    """

    name: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    lora_only: bool = False
    cross_rank: bool = False  # one table per model x fold under method "lora" (subspace similarity)

    @property
    def melted(self) -> bool:
        return len(self.values) > 1


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in [
        TableSpec(
            "contributions", ("variant", "layer", "depth", "component", "metric"), ("value",)
        ),
        TableSpec("logit_lens", ("lens", "variant", "layer", "depth", "metric"), ("value",)),
        TableSpec(
            "probing",
            ("layer", "depth", "task"),
            ("uar", "war", "selectivity_uar", "selectivity_war", "cv_uar", "C"),
        ),
        TableSpec(
            "svd",
            ("module", "layer", "depth", "matrix", "quantity", "index"),
            ("value",),
            lora_only=True,
        ),
        TableSpec(
            "ab_dynamics",
            ("module", "layer", "depth", "quantity", "state"),
            ("value",),
            lora_only=True,
        ),
        TableSpec(
            "cka",
            ("layer_frozen", "layer_lora", "depth_frozen", "depth_lora", "kind"),
            ("value",),
            lora_only=True,
        ),
        TableSpec(
            "subspace",
            ("module", "layer", "depth", "rank_a", "rank_b", "i", "j"),
            ("phi",),
            lora_only=True,
            cross_rank=True,
        ),
    ]
}


def expected_runs(
    name: str, results: Path, models: Sequence[str], methods: Sequence[str], folds: Iterable
) -> dict:
    """``{(model, method, fold): path}`` of every per-run table of ``name`` the grid should hold."""
    spec = TABLES[name]
    root = Path(results) / "analysis"
    if spec.cross_rank:
        has_lora = any(m != "frozen" for m in methods)
        methods = ["lora"] if has_lora else []
    elif spec.lora_only:
        methods = [m for m in methods if m != "frozen"]
    return {
        (model, method, int(fold)): root / model / method / f"fold{fold}" / f"{name}.tsv"
        for model in models
        for method in methods
        for fold in folds
    }


def missing_runs(files: Mapping[tuple, Path]) -> list[tuple]:
    """The keys of ``files`` whose file does not exist, in order."""
    return [key for key, path in files.items() if not Path(path).is_file()]


def read_runs(files: Mapping[tuple[str, str, int], Path]) -> pd.DataFrame:
    """Concatenate the per-run tables that exist; ``model, method, fold`` come from the key."""
    frames = []
    for (model, method, fold), path in files.items():
        if not Path(path).is_file():
            continue
        frame = pd.read_csv(path, sep="\t")
        frame = frame.drop(columns=[c for c in RUN_COLUMNS if c in frame.columns])
        frame.insert(0, "fold", int(fold))
        frame.insert(0, "method", method)
        frame.insert(0, "model", model)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def long_form(runs: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Per-run rows in long form: ``model, method, fold, <keys>, [metric,] value`` (NaN values dropped)."""
    missing = [c for c in (*spec.keys, *spec.values) if c not in runs.columns]
    if missing and len(runs):
        raise ValueError(
            f"{spec.name}: the per-run tables lack the columns {missing}; have {list(runs.columns)}"
        )
    if spec.melted:
        long = runs.melt(
            id_vars=[*RUN_COLUMNS, *spec.keys],
            value_vars=list(spec.values),
            var_name="metric",
            value_name="value",
        )
    else:
        long = runs[[*RUN_COLUMNS, *spec.keys, spec.values[0]]].rename(
            columns={spec.values[0]: "value"}
        )
    long = long.assign(value=pd.to_numeric(long["value"], errors="coerce"))
    return long.dropna(subset=["value"]).reset_index(drop=True)


def add_derived(long: pd.DataFrame, name: str) -> pd.DataFrame:
    """Per-fold differences and ratios (see the module docstring), appended as rows."""
    if name == "contributions" and {"adapted", "base"} <= set(long["variant"]):
        keys = [*RUN_COLUMNS, "layer", "depth", "component", "metric"]
        adapted = long[long["variant"] == "adapted"].set_index(keys)["value"]
        base = long[long["variant"] == "base"].set_index(keys)["value"]
        delta = (adapted - base).dropna().reset_index().assign(variant="delta")
        return pd.concat([long, delta[long.columns]], ignore_index=True)
    # ab_dynamics writes grad_norm_ratio_B_A itself; derive it only for tables that lack it.
    if (
        name == "ab_dynamics"
        and {"grad_norm_A", "grad_norm_B"} <= set(long["quantity"])
        and "grad_norm_ratio_B_A" not in set(long["quantity"])
    ):
        keys = [*RUN_COLUMNS, "module", "layer", "depth", "state"]
        states = long["state"].isin(
            ["trained", "untrained"]
        )  # not the trained/untrained ratio rows
        norm_a = long[states & (long["quantity"] == "grad_norm_A")].set_index(keys)["value"]
        norm_b = long[states & (long["quantity"] == "grad_norm_B")].set_index(keys)["value"]
        ratio = (
            (norm_b / norm_a.replace(0, np.nan))
            .dropna()
            .reset_index()
            .assign(quantity="grad_norm_ratio_B_A")
        )
        return pd.concat([long, ratio[long.columns]], ignore_index=True)
    return long


def fold_summary(long: pd.DataFrame, spec: TableSpec, missing: Sequence[tuple]) -> pd.DataFrame:
    """Mean, std (ddof 1), n_folds and missing_folds of ``value`` per model, method and observation."""
    group = ["model", "method", *spec.keys, *(["metric"] if spec.melted else [])]
    columns = [*group, *SUMMARY_COLUMNS]
    if long.empty:
        return pd.DataFrame(columns=columns)
    summary = (
        long.groupby(group, dropna=False, sort=False)["value"]
        .agg(mean="mean", std=lambda v: v.std(ddof=1) if len(v) > 1 else np.nan, n_folds="count")
        .reset_index()
    )
    absent: dict[tuple[str, str], list[int]] = {}
    for model, method, fold in missing:
        absent.setdefault((model, method), []).append(int(fold))
    summary["missing_folds"] = [
        ",".join(map(str, sorted(absent.get((mo, me), []))))
        for mo, me in zip(summary["model"], summary["method"], strict=True)
    ]
    for key in spec.keys:  # integer keys read back as float when some rows are empty (svd's index)
        col = summary[key]
        if col.dtype.kind == "f" and np.all(np.isnan(col) | (col == np.round(col))):
            summary[key] = col.astype("Int64")
    return summary[columns]


def aggregate_runs(
    name: str, files: Mapping[tuple[str, str, int], Path], output: Path | None = None
) -> pd.DataFrame:
    """Fold summary of the per-run tables ``{(model, method, fold): path}`` of analysis ``name``.

    Files that do not exist are named in a warning and in ``missing_folds``, not averaged over.
    Returns the table and writes it to ``output`` if given.
    """
    if name not in TABLES:
        raise ValueError(f"unknown analysis table {name!r}; known: {', '.join(TABLES)}")
    spec = TABLES[name]
    files = {(str(m), str(me), int(f)): Path(path) for (m, me, f), path in files.items()}
    missing = missing_runs(files)
    if missing:
        log.warning(
            "%s: missing runs (not averaged over): %s",
            name,
            ", ".join(f"{m}/{me}/fold{f}" for m, me, f in missing),
        )
    long = add_derived(long_form(read_runs(files), spec), name)
    summary = fold_summary(long, spec, missing)
    if output is not None:
        write_tsv_atomic(summary, output)
    return summary


def aggregate_analysis(
    name: str,
    results: Path,
    models: Sequence[str],
    methods: Sequence[str],
    folds: Iterable,
    output: Path | None = None,
) -> pd.DataFrame:
    """:func:`aggregate_runs` over every run of ``name`` the grid should hold under ``results``."""
    return aggregate_runs(name, expected_runs(name, results, models, methods, list(folds)), output)


def confusion_table(
    results: Path,
    models: Sequence[str],
    methods: Sequence[str],
    folds: Iterable,
    classes: Sequence[str],
    output: Path | None = None,
) -> pd.DataFrame:
    """:func:`confusion_from_predictions` over the grid's ``predictions.tsv`` (and ``predictions_wsum.tsv``)."""
    files = prediction_files(Path(results), models, methods, list(folds))
    return confusion_from_predictions(files, classes, output)


def confusion_from_predictions(
    files: Mapping[tuple[str, str, int], Path], classes: Sequence[str], output: Path | None = None
) -> pd.DataFrame:
    """Confusion counts summed over folds per model and method, from ``{(model, method, fold): predictions.tsv}``.

    Columns ``model, method, label, pred, count, n_folds, missing_folds``; ``label`` is the
    true class, ``pred`` the predicted one, every class pair present (zeros included). Frozen
    runs' weighted-sum head comes in as method ``frozen_wsum``.
    """
    files = {(str(m), str(me), int(f)): Path(path) for (m, me, f), path in files.items()}
    predictions, missing = read_predictions(files)
    if missing:
        log.warning(
            "confusion: missing runs (not summed over): %s",
            ", ".join(f"{m}/{me}/fold{f}" for m, me, f in missing),
        )
    rows = []
    for model, method in dict.fromkeys((mo, me) for mo, me, _ in files):
        present = sorted(f for mo, me, f in predictions if (mo, me) == (model, method))
        absent = sorted(f for mo, me, f in missing if (mo, me) == (model, method))
        if not present:
            continue
        pooled = pd.concat([predictions[(model, method, f)] for f in present])
        unknown = sorted(set(pooled["label"]).union(pooled["pred"]) - set(classes))
        if unknown:
            raise ValueError(
                f"{model}/{method}: predictions hold classes {unknown} not in corpus.classes {list(classes)}"
            )
        counts = pd.crosstab(pooled["label"], pooled["pred"]).reindex(
            index=classes, columns=classes, fill_value=0
        )
        for label in classes:
            for pred in classes:
                rows.append(
                    {
                        "model": model,
                        "method": method,
                        "label": label,
                        "pred": pred,
                        "count": int(counts.loc[label, pred]),
                        "n_folds": len(present),
                        "missing_folds": ",".join(map(str, absent)),
                    }
                )
    table = pd.DataFrame(
        rows, columns=["model", "method", "label", "pred", "count", "n_folds", "missing_folds"]
    )
    if output is not None:
        write_tsv_atomic(table, output)
    return table
