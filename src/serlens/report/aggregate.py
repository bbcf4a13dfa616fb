"""Aggregated analysis tables: mean and spread over folds and training seeds, one observation per row.

Every analysis writes one tidy TSV per run
(``results/{corpus}/analysis/{model}/{method}/seed{seed}/fold{fold}/{analysis}.tsv``; the
cross-rank subspace similarity one per model, seed and fold under ``method = lora``).
:func:`aggregate_runs` reads the files it is given and writes
``results/{corpus}/tables/{analysis}.tsv`` with columns::

    model, method, <the analysis' keys>, [metric,] mean, std, n_folds, n_seeds, seed_std, missing_runs

``mean`` and ``std`` (sample standard deviation, ddof = 1; empty with one run) are taken
over the runs (fold × seed) that hold the observation; ``n_folds`` and ``n_seeds`` say how
many folds and seeds that is. ``seed_std`` is the seed-to-seed floor: the standard deviation
over seeds of the per-seed mean over folds (ddof = 1) — how much the number moves when only
the training seed changes. With one seed it is empty, and the table's caption says that the
floor needs two seeds. ``missing_runs`` lists the runs (``seed0/fold3``) of that model and
method whose file is absent, so a mean over fewer runs is never mistaken for a mean over all
of them (:func:`missing_runs`).

``band_low``, ``band_high``: a 95 % band from resampling speakers within folds
(:func:`serlens.stats.cluster_band`), for analyses whose per-run tables keep one row per
test speaker (columns ``speaker, n_utts``): each speaker's value is averaged over seeds
(the same speaker in every seed is one cluster), speakers are drawn with replacement within
each fold, and the band is that of the mean over folds of the utterance-weighted mean. A
table without per-speaker rows leaves the band empty; the spread over runs (``std``) is then
all there is.

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

RUN_COLUMNS = ("model", "method", "seed", "fold")
SUMMARY_COLUMNS = (
    "mean",
    "std",
    "n_folds",
    "n_seeds",
    "seed_std",
    "band_low",
    "band_high",
    "missing_runs",
)
#: Per-run tables that keep per-speaker values carry these columns (the speaker and how many
#: of its test utterances the value averages); the run's value is their utterance-weighted mean.
SPEAKER_COLUMNS = ("speaker", "n_utts")


def table_spec(name: str):
    """How analysis ``name``'s tables are aggregated: its spec's
    :class:`serlens.analysis.registry.TableSpec`."""
    from serlens.analysis.registry import ANALYSES

    if name not in ANALYSES:
        raise ValueError(f"unknown analysis table {name!r}; known: {', '.join(ANALYSES)}")
    return ANALYSES[name].table


def scope(name: str) -> str:
    from serlens.analysis.registry import ANALYSES

    return ANALYSES[name].scope


def missing_runs(files: Mapping[tuple, Path]) -> list[tuple]:
    """The keys of ``files`` whose file does not exist, in order."""
    return [key for key, path in files.items() if not Path(path).is_file()]


def run_name(seed, fold) -> str:
    return f"seed{int(seed)}/fold{int(fold)}"


def read_runs(files: Mapping[tuple[str, str, int, int], Path]) -> pd.DataFrame:
    """Concatenate the per-run tables that exist; ``model, method, seed, fold`` come from the key."""
    frames = []
    for (model, method, seed, fold), path in files.items():
        if not Path(path).is_file():
            continue
        frame = pd.read_csv(path, sep="\t")
        frame = frame.drop(columns=[c for c in RUN_COLUMNS if c in frame.columns])
        frame.insert(0, "fold", int(fold))
        frame.insert(0, "seed", int(seed))
        frame.insert(0, "method", method)
        frame.insert(0, "model", model)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def long_form(runs: pd.DataFrame, spec, name: str, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Per-run rows in long form: ``model, method, seed, fold, <keys>, [metric,] value`` (NaN values dropped)."""
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
            id_vars=[*RUN_COLUMNS, *spec.keys, *extra],
            value_vars=list(spec.values),
            var_name="metric",
            value_name="_value",  # a value column named "value" may be among the melted ones
        ).rename(columns={"_value": "value"})
    else:
        long = runs[[*RUN_COLUMNS, *spec.keys, *extra, spec.values[0]]].rename(
            columns={spec.values[0]: "value"}
        )
    long = long.assign(value=pd.to_numeric(long["value"], errors="coerce"))
    return long.dropna(subset=["value"]).reset_index(drop=True)


def by_speaker(runs: pd.DataFrame) -> bool:
    return set(SPEAKER_COLUMNS) <= set(runs.columns)


def run_level(long: pd.DataFrame, spec) -> pd.DataFrame:
    """Per-speaker rows collapsed to one value per run: the mean weighted by ``n_utts``."""
    group = [*RUN_COLUMNS, *spec.keys, *(["metric"] if spec.melted else [])]
    weighted = long.assign(_wv=long["value"] * long["n_utts"])
    out = weighted.groupby(group, dropna=False, sort=False)[["_wv", "n_utts"]].sum().reset_index()
    out["value"] = out["_wv"] / out["n_utts"]
    return out.drop(columns=["_wv", "n_utts"])


def speaker_band(long: pd.DataFrame, spec, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """``band_low``, ``band_high`` per observation from per-speaker rows (module docstring)."""
    from serlens import stats

    obs = ["model", "method", *spec.keys, *(["metric"] if spec.melted else [])]
    out = []
    for (model, method), frame in long.groupby(["model", "method"], sort=False):
        # one value per (fold, speaker, observation): the mean over seeds
        # map(str), not astype(str): the string dtype keeps NaN keys (whole-encoder rows) NaN
        frame = frame.assign(_obs=frame[obs[2:]].map(str).agg("\x1f".join, axis=1))
        per_speaker = frame.groupby(["fold", "speaker", "_obs"], sort=False).agg(
            value=("value", "mean"), n_utts=("n_utts", "mean")
        )
        values = per_speaker["value"].unstack("_obs")
        weights = per_speaker["n_utts"].groupby(["fold", "speaker"]).mean().loc[values.index]
        folds = values.index.get_level_values("fold").to_numpy()
        speakers = values.index.get_level_values("speaker").astype(str).to_numpy()
        if len(set(speakers)) < 2:
            continue
        repeat = np.maximum(np.rint(weights.to_numpy()).astype(int), 1)
        low, high = stats.cluster_band(
            np.repeat(values.to_numpy(float), repeat, axis=0),
            np.repeat(speakers, repeat),
            np.repeat(folds, repeat),
            resamples=resamples,
            rng_seed=seed,
        )
        keys = frame.drop_duplicates("_obs").set_index("_obs").loc[values.columns, obs[2:]]
        band = keys.reset_index(drop=True).assign(
            model=model, method=method, band_low=low, band_high=high
        )
        out.append(band)
    if not out:
        return pd.DataFrame(columns=[*obs, "band_low", "band_high"])
    return pd.concat(out, ignore_index=True)[[*obs, "band_low", "band_high"]]


def add_derived(long: pd.DataFrame, name: str, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per-run derived rows of analysis ``name`` (its spec's ``table.derive``), appended;
    ``by``: further columns that identify a row within a run (per-speaker rows)."""
    from serlens.analysis.registry import ANALYSES

    derive = ANALYSES[name].table.derive if name in ANALYSES else None
    if derive is None or long.empty:
        return long
    extra = derive(long, [*RUN_COLUMNS, *by])
    if extra is None or extra.empty:
        return long
    return pd.concat([long, extra[long.columns]], ignore_index=True)


def fold_summary(
    long: pd.DataFrame, spec, missing: Sequence[tuple], band: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Mean and std over runs, n_folds, n_seeds, the seed-to-seed std and the missing runs, per
    model, method and observation (module docstring)."""
    group = ["model", "method", *spec.keys, *(["metric"] if spec.melted else [])]
    columns = [*group, *SUMMARY_COLUMNS]
    if long.empty:
        return pd.DataFrame(columns=columns)
    grouped = long.groupby(group, dropna=False, sort=False)
    summary = grouped["value"].agg(
        mean="mean", std=lambda v: v.std(ddof=1) if len(v) > 1 else np.nan
    )
    summary["n_folds"] = grouped["fold"].nunique()
    summary["n_seeds"] = grouped["seed"].nunique()
    per_seed = long.groupby([*group, "seed"], dropna=False, sort=False)["value"].mean()
    summary["seed_std"] = per_seed.groupby(level=list(range(len(group))), dropna=False).agg(
        lambda v: v.std(ddof=1) if len(v) > 1 else np.nan
    )
    summary = summary.reset_index()
    if band is not None and len(band):
        summary = summary.merge(band, on=group, how="left")
    else:
        summary["band_low"] = summary["band_high"] = np.nan
    absent: dict[tuple[str, str], list[str]] = {}
    for model, method, seed, fold in missing:
        absent.setdefault((model, method), []).append(run_name(seed, fold))
    summary["missing_runs"] = [
        ",".join(absent.get((mo, me), []))
        for mo, me in zip(summary["model"], summary["method"], strict=True)
    ]
    for key in spec.keys:  # integer keys read back as float when some rows are empty (svd's index)
        col = summary[key]
        if col.dtype.kind == "f" and np.all(np.isnan(col) | (col == np.round(col))):
            summary[key] = col.astype("Int64")
    return summary[columns]


def aggregate_runs(
    name: str,
    files: Mapping[tuple[str, str, int, int], Path],
    output: Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Summary of the per-run tables ``{(model, method, seed, fold): path}`` of analysis ``name``.

    Files that do not exist are named in a warning and in ``missing_runs``, not averaged over.
    Returns the table and writes it to ``output`` if given.
    """
    spec = table_spec(name)
    files = {(str(m), str(me), int(s), int(f)): Path(path) for (m, me, s, f), path in files.items()}
    missing = missing_runs(files)
    if missing:
        log.warning(
            "%s: missing runs (not averaged over): %s",
            name,
            ", ".join(f"{m}/{me}/{run_name(s, f)}" for m, me, s, f in missing),
        )
    runs = read_runs(files)
    speakers = by_speaker(runs)
    keep = [c for c in SPEAKER_COLUMNS if speakers]
    long = long_form(runs, spec, name, extra=keep)
    band = None
    if speakers:
        band = speaker_band(add_derived(long, name, SPEAKER_COLUMNS), spec, resamples, seed)
    if speakers:
        long = run_level(long, spec)
    long = add_derived(long, name)
    summary = fold_summary(long, spec, missing, band)
    if not files and scope(name) == "seed_pairs":
        from serlens.analysis.seed_floor import NEEDS_SEEDS

        summary = pd.DataFrame({**{c: [pd.NA] for c in summary.columns}, "note": [NEEDS_SEEDS]})
    if output is not None:
        write_tsv_atomic(summary, output)
    return summary


def confusion_from_predictions(
    files: Mapping[tuple[str, str, int, int], Path],
    classes: Sequence[str],
    output: Path | None = None,
) -> pd.DataFrame:
    """Confusion counts summed over folds and seeds per model and method, from
    ``{(model, method, seed, fold): predictions.tsv}``.

    Columns ``model, method, label, pred, count, n_folds, n_seeds, missing_runs``; ``label``
    is the true class, ``pred`` the predicted one, every class pair present (zeros included).
    With several seeds every test utterance is counted once per seed. Frozen runs'
    weighted-sum head comes in as method ``frozen_wsum``.
    """
    files = {(str(m), str(me), int(s), int(f)): Path(path) for (m, me, s, f), path in files.items()}
    predictions, missing = read_predictions(files)
    if missing:
        log.warning(
            "confusion: missing runs (not summed over): %s",
            ", ".join(f"{m}/{me}/{run_name(s, f)}" for m, me, s, f in missing),
        )
    columns = ["model", "method", "label", "pred", "count", "n_folds", "n_seeds", "missing_runs"]
    rows = []
    for model, method in dict.fromkeys((key[0], key[1]) for key in files):
        present = sorted(key for key in predictions if key[:2] == (model, method))
        absent = sorted(key for key in missing if key[:2] == (model, method))
        if not present:
            continue
        pooled = pd.concat([predictions[key] for key in present])
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
                        "n_folds": len({key[3] for key in present}),
                        "n_seeds": len({key[2] for key in present}),
                        "missing_runs": ",".join(run_name(k[2], k[3]) for k in absent),
                    }
                )
    table = pd.DataFrame(rows, columns=columns)
    if output is not None:
        write_tsv_atomic(table, output)
    return table
