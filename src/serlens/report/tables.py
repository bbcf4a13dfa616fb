"""Performance tables and the paired tests between methods; every number is recomputed from
``predictions.tsv`` (nothing is copied from metrics.json).

``performance.tsv``: one row per run (model, method, seed, fold) with UAR, WAR and macro-F1.

``performance_summary.tsv``: per model and method, the mean and std over runs (fold × seed),
the seed-to-seed floor ``uar_seed_std`` (std over seeds of the per-seed mean over folds; empty
with one seed: the floor needs two) and a 95 % interval of the mean UAR from resampling
clusters (speakers or sessions) within folds (:func:`serlens.stats.cluster_bootstrap_uar`).

``significance.tsv``: every pair of methods of a model (a later in the method order than b),
paired on the (seed, fold) runs and utterances both have. ΔUAR is one statistic throughout,
the mean over those runs of UAR(a) − UAR(b) of the run — the difference of the summary's
means when both methods have the same runs. Its interval is the paired cluster bootstrap,
its p-value the exact sign-flip permutation test over clusters (:mod:`serlens.stats`),
Holm-adjusted over the pairs of the model (the family); ``effect_dz`` is Cohen's d_z over
clusters; the iid interval (utterances resampled as if independent) stands beside it only to
show how much narrower it is. ``min_p`` is the smallest p the number of clusters allows and
``note`` says when that makes a rejection after Holm impossible.
"""

from __future__ import annotations

import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from serlens.io import write_tsv_atomic
from serlens.methods import method_sort_key
from serlens.train.data import label_indices, metrics_from_predictions

log = logging.getLogger(__name__)
METRICS = ("uar", "war", "macro_f1")
RUN_KEY = ("model", "method", "seed", "fold")


def prediction_files(
    results, corpus: str, models, methods, seeds, folds
) -> dict[tuple[str, str, int, int], Path]:
    """``{(model, method, seed, fold): predictions.tsv}`` of every run of the grid."""
    from serlens.paths import Paths

    paths = Paths(str(results))
    return {
        (model, method, int(seed), int(fold)): Path(paths.run(corpus, model, method, seed, fold))
        / "predictions.tsv"
        for model in models
        for method in methods
        for seed in seeds
        for fold in folds
    }


def read_predictions(files: dict) -> tuple[dict, list]:
    found, missing = {}, []
    for key, path in files.items():
        if Path(path).is_file():
            found[key] = pd.read_csv(path, sep="\t", dtype={"utt_id": str})
        else:
            missing.append(key)
    return found, missing


def performance_table(predictions: dict, classes: list[str]) -> pd.DataFrame:
    rows = []
    for (model, method, seed, fold), frame in sorted(predictions.items()):
        m = metrics_from_predictions(frame, classes)
        rows.append(
            {
                "model": model,
                "method": method,
                "seed": seed,
                "fold": fold,
                **{k: m[k] for k in METRICS},
                "n": m["n"],
            }
        )
    return pd.DataFrame(rows, columns=[*RUN_KEY, *METRICS, "n"])


def _clusters(frame: pd.DataFrame, manifest: pd.DataFrame | None, unit: str) -> np.ndarray:
    """The resampling unit of every prediction row (manifest column ``unit``)."""
    if manifest is None:
        raise ValueError("the cluster statistics need the manifest (speaker and session columns)")
    table = manifest.set_index("utt_id")[unit].astype(str)
    missing = sorted(set(frame["utt_id"]) - set(table.index))
    if missing:
        raise ValueError(
            f"predictions hold utterances not in the manifest: {missing[:5]}; rebuild the runs"
        )
    return table.loc[frame["utt_id"]].to_numpy()


def _pooled(predictions: dict, model: str, method: str, keys) -> pd.DataFrame:
    """The predictions of ``keys`` (seed, fold) of one model and method, stacked."""
    frames = []
    for seed, fold in keys:
        frame = predictions[(model, method, seed, fold)][["utt_id", "label", "pred"]]
        frames.append(frame.assign(seed=seed, fold=fold))
    return pd.concat(frames, ignore_index=True)


def summary_table(
    performance: pd.DataFrame,
    missing: list,
    predictions: dict | None = None,
    manifest: pd.DataFrame | None = None,
    classes: list[str] | None = None,
    unit: str = "speaker",
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean and std over runs, the seed-to-seed floor and the cluster interval of the mean UAR.

    Runs that are missing are named (``missing_runs``), never silently averaged over. The
    interval needs ``predictions``, ``manifest`` and ``classes``; without them it is empty.
    """
    from serlens import stats

    rows = []
    for (model, method), group in performance.groupby(["model", "method"], sort=True):
        absent = sorted((s, f) for (mo, me, s, f) in missing if (mo, me) == (model, method))
        per_seed = group.groupby("seed")["uar"].mean()
        row = {
            "model": model,
            "method": method,
            "n_folds": group["fold"].nunique(),
            "n_seeds": group["seed"].nunique(),
            "missing_runs": ",".join(f"seed{s}/fold{f}" for s, f in absent),
        }
        for metric in METRICS:
            row[f"{metric}_mean"] = group[metric].mean()
            row[f"{metric}_std"] = group[metric].std(ddof=1) if len(group) > 1 else np.nan
        row["uar_seed_std"] = per_seed.std(ddof=1) if len(per_seed) > 1 else np.nan
        row["uar_ci_low"] = row["uar_ci_high"] = np.nan
        if predictions is not None:
            keys = list(zip(group["seed"], group["fold"], strict=True))
            pooled = _pooled(predictions, model, method, keys)
            labels = label_indices(pooled["label"], classes)
            ci = stats.cluster_bootstrap_uar(
                labels,
                label_indices(pooled["pred"], classes),
                pooled["fold"].to_numpy(),
                pooled["seed"].to_numpy(),
                _clusters(pooled, manifest, unit),
                len(classes),
                resamples=resamples,
                rng_seed=seed,
            )
            row["uar_ci_low"], row["uar_ci_high"] = ci["ci_low"], ci["ci_high"]
            row["n_clusters"] = ci["n_clusters"]
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["note"] = np.where(
            table["n_seeds"] < 2,
            "uar_seed_std (the seed-to-seed floor) needs two or more seeds",
            "",
        )
    return table


def significance_table(
    predictions: dict,
    classes: list[str],
    manifest: pd.DataFrame,
    unit: str = "speaker",
    resamples: int = 2000,
    permutations: int = 10000,
    max_exact: int = 16,
    seed: int = 0,
) -> pd.DataFrame:
    """Every pair of methods within a model (module docstring for the columns)."""
    from serlens import stats

    rows = []
    n_classes = len(classes)
    for model in sorted({key[0] for key in predictions}):
        methods = sorted({key[1] for key in predictions if key[0] == model}, key=method_sort_key)
        family = []
        for b, a in combinations(methods, 2):
            keys = sorted(
                (s, f)
                for mo, me, s, f in predictions
                if (mo, me) == (model, a) and (model, b, s, f) in predictions
            )
            if not keys:
                continue
            left = _pooled(predictions, model, a, keys)
            right = _pooled(predictions, model, b, keys)[["utt_id", "seed", "fold", "pred"]]
            pooled = left.merge(right, on=["utt_id", "seed", "fold"], suffixes=("", "_b"))
            if len(pooled) != len(left):
                raise ValueError(
                    f"{model}: {a} and {b} were not tested on the same utterances "
                    f"({len(left)} vs {len(pooled)} paired); rerun their folds"
                )
            args = (
                label_indices(pooled["label"], classes),
                label_indices(pooled["pred"], classes),
                label_indices(pooled["pred_b"], classes),
                pooled["fold"].to_numpy(),
                pooled["seed"].to_numpy(),
            )
            clusters = _clusters(pooled, manifest, unit)
            boot = stats.cluster_bootstrap_delta(
                *args, clusters, n_classes, resamples=resamples, rng_seed=seed
            )
            iid = stats.iid_bootstrap_delta(*args, n_classes, resamples=resamples, rng_seed=seed)
            flip = stats.sign_flip_test(
                *args,
                clusters,
                n_classes,
                max_exact=max_exact,
                permutations=permutations,
                rng_seed=seed,
            )
            family.append(
                {
                    "model": model,
                    "method": a,
                    "baseline": b,
                    "delta_uar": boot["delta"],
                    "ci_low": boot["ci_low"],
                    "ci_high": boot["ci_high"],
                    "p_value": flip["p_value"],
                    "effect_dz": stats.cluster_effect_size(*args, clusters, n_classes),
                    "iid_ci_low": iid["ci_low"],
                    "iid_ci_high": iid["ci_high"],
                    "cluster": unit,
                    "n_clusters": flip["n_clusters"],
                    "exact": flip["exact"],
                    "min_p": flip["min_p"],
                    "n_folds": len({f for _, f in keys}),
                    "n_seeds": len({s for s, _ in keys}),
                    "runs": ",".join(f"seed{s}/fold{f}" for s, f in keys),
                    "resamples": resamples,
                }
            )
        if family:
            holm = stats.holm(np.array([row["p_value"] for row in family]))
            note = stats.resolution_note(min(row["n_clusters"] for row in family), len(family))
            for row, adjusted in zip(family, holm, strict=True):
                row["p_holm"] = float(adjusted)
                row["note"] = note
            rows += family
    columns = [
        "model",
        "method",
        "baseline",
        "delta_uar",
        "ci_low",
        "ci_high",
        "p_value",
        "p_holm",
        "effect_dz",
        "iid_ci_low",
        "iid_ci_high",
        "cluster",
        "n_clusters",
        "exact",
        "min_p",
        "n_folds",
        "n_seeds",
        "runs",
        "resamples",
        "note",
    ]
    return pd.DataFrame(rows, columns=columns)


def write_performance_tables(
    files: dict,
    classes: list[str],
    manifest_path,
    performance_out,
    summary_out,
    significance_out,
    significance: dict,
    seed: int,
) -> None:
    """performance.tsv (one row per run), its summary, and the paired tests (module docstring).

    ``files``: ``{(model, method, seed, fold): predictions.tsv}`` of the grid;
    ``significance``: the config's ``significance`` section.
    """
    files = {tuple(key): Path(path) for key, path in files.items()}
    predictions, missing = read_predictions(files)
    if missing:
        log.warning(
            "missing runs (not averaged over): %s",
            ", ".join(f"{m}/{me}/seed{s}/fold{f}" for m, me, s, f in missing),
        )
    manifest = pd.read_csv(manifest_path, sep="\t", dtype={"utt_id": str, "speaker": str})
    unit = significance["cluster"]
    performance = performance_table(predictions, classes)
    write_tsv_atomic(performance, performance_out)
    summary = summary_table(
        performance,
        missing,
        predictions,
        manifest,
        classes,
        unit=unit,
        resamples=significance["resamples"],
        seed=seed,
    )
    write_tsv_atomic(summary, summary_out)
    tests = significance_table(
        predictions,
        classes,
        manifest,
        unit=unit,
        resamples=significance["resamples"],
        permutations=significance["permutations"],
        max_exact=significance["max_exact"],
        seed=seed,
    )
    write_tsv_atomic(tests, significance_out)
