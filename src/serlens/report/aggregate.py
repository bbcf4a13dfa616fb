"""Fold-aggregated analysis tables: mean and standard deviation over folds, one observation per row.

Every analysis writes one tidy TSV per run
(``results/{corpus}/analysis/{model}/{method}/seed{seed}/fold{fold}/{analysis}.tsv``; the
cross-rank subspace similarity one per model, seed and fold under ``method = lora``).
:func:`aggregate_runs` reads the files it is given and writes
``results/{corpus}/tables/{analysis}.tsv`` with columns::

    model, method, <the analysis' keys>, [metric,] mean, std, n_folds, missing_folds

``mean`` and ``std`` (sample standard deviation, ddof = 1; empty with one fold) are taken
over the folds that hold the observation; ``n_folds`` says how many that is and
``missing_folds`` lists the folds of that model and method whose file is absent, so a mean
over fewer folds is never mistaken for a mean over all of them (:func:`missing_runs`).

Analyses whose per-run table is wide (``probing``: ``uar``, ``war``, ``selectivity_*``...)
are melted to ``metric, value`` first. An analysis may derive rows *per fold, before*
averaging (its spec's ``table.derive``), so that their spread is the spread of the
difference: ``contributions`` adds ``variant = delta`` = ``adapted - base`` of the same
LoRA run; ``ab_dynamics`` the B/A gradient-norm ratio where a table lacks it.

:func:`confusion_table` sums the confusion matrices of every fold of a model and method
(recomputed from ``predictions.tsv``) into ``results/tables/confusion.tsv``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from serlens.report.tables import read_predictions
from serlens.train.data import write_tsv_atomic

log = logging.getLogger(__name__)

RUN_COLUMNS = ("model", "method", "fold")
SUMMARY_COLUMNS = ("mean", "std", "n_folds", "missing_folds")


def table_spec(name: str):
    """How analysis ``name``'s tables are aggregated: its spec's
    :class:`serlens.analysis.registry.TableSpec`."""
    from serlens.analysis.registry import ANALYSES

    if name not in ANALYSES:
        raise ValueError(f"unknown analysis table {name!r}; known: {', '.join(ANALYSES)}")
    return ANALYSES[name].table


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


def long_form(runs: pd.DataFrame, spec, name: str) -> pd.DataFrame:
    """Per-run rows in long form: ``model, method, fold, <keys>, [metric,] value`` (NaN values dropped)."""
    missing = [c for c in (*spec.keys, *spec.values) if c not in runs.columns]
    if missing and len(runs):
        raise ValueError(
            f"{name}: the per-run tables lack the columns {missing}; have {list(runs.columns)}"
        )
    if runs.empty:  # no run of the grid has this table (cross-rank similarity with one rank)
        columns = [*RUN_COLUMNS, *spec.keys, *(["metric"] if spec.melted else []), "value"]
        return pd.DataFrame(columns=columns)
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
    """Per-fold derived rows of analysis ``name`` (its spec's ``table.derive``), appended."""
    from serlens.analysis.registry import ANALYSES

    derive = ANALYSES[name].table.derive if name in ANALYSES else None
    if derive is None or long.empty:
        return long
    extra = derive(long, list(RUN_COLUMNS))
    if extra is None or extra.empty:
        return long
    return pd.concat([long, extra[long.columns]], ignore_index=True)


def fold_summary(long: pd.DataFrame, spec, missing: Sequence[tuple]) -> pd.DataFrame:
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
    spec = table_spec(name)
    files = {(str(m), str(me), int(f)): Path(path) for (m, me, f), path in files.items()}
    missing = missing_runs(files)
    if missing:
        log.warning(
            "%s: missing runs (not averaged over): %s",
            name,
            ", ".join(f"{m}/{me}/fold{f}" for m, me, f in missing),
        )
    long = add_derived(long_form(read_runs(files), spec, name), name)
    summary = fold_summary(long, spec, missing)
    if output is not None:
        write_tsv_atomic(summary, output)
    return summary


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
