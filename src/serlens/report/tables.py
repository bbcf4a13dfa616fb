"""Aggregate tables. Every metric is recomputed from ``predictions.tsv``; nothing is copied from metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from serlens.io import write_tsv_atomic
from serlens.metrics import paired_bootstrap_uar
from serlens.train.data import label_indices, metrics_from_predictions

log = logging.getLogger(__name__)
METRICS = ("uar", "war", "macro_f1")


def prediction_files(results: Path, models, methods, folds) -> dict[tuple[str, str, int], Path]:
    """Expected predictions of the grid, frozen runs contributing their weighted-sum head as ``frozen_wsum``."""
    files = {}
    for model in models:
        for method in methods:
            for fold in folds:
                run = Path(results) / "train" / model / method / f"fold{fold}"
                files[(model, method, int(fold))] = run / "predictions.tsv"
                if method == "frozen":
                    files[(model, "frozen_wsum", int(fold))] = run / "predictions_wsum.tsv"
    return files


def read_predictions(files: dict) -> tuple[dict, list]:
    found, missing = {}, []
    for key, path in files.items():
        if path.is_file():
            found[key] = pd.read_csv(path, sep="\t", dtype={"utt_id": str})
        else:
            missing.append(key)
    return found, missing


def performance_table(predictions: dict, classes: list[str]) -> pd.DataFrame:
    rows = []
    for (model, method, fold), frame in sorted(predictions.items()):
        m = metrics_from_predictions(frame, classes)
        rows.append(
            {
                "model": model,
                "method": method,
                "fold": fold,
                **{k: m[k] for k in METRICS},
                "n": m["n"],
            }
        )
    return pd.DataFrame(rows, columns=["model", "method", "fold", *METRICS, "n"])


def summary_table(performance: pd.DataFrame, expected_folds, missing: list) -> pd.DataFrame:
    """Mean and standard deviation over folds; runs that are missing are named, not silently averaged over."""
    rows = []
    for (model, method), group in performance.groupby(["model", "method"], sort=True):
        absent = sorted(f for (mo, me, f) in missing if (mo, me) == (model, method))
        row = {
            "model": model,
            "method": method,
            "n_folds": len(group),
            "missing_folds": ",".join(map(str, absent)),
        }
        for metric in METRICS:
            row[f"{metric}_mean"] = group[metric].mean()
            row[f"{metric}_std"] = group[metric].std(ddof=1) if len(group) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def significance_table(
    predictions: dict, classes: list[str], resamples: int, seed: int
) -> pd.DataFrame:
    """Each LoRA rank and the weighted-sum head against the last-layer frozen head, per model.

    Paired over utterances pooled across the folds both systems have; the number of
    resamples and the seed are recorded.
    """
    rows = []
    models = sorted({m for m, _, _ in predictions})
    for model in models:
        methods = sorted({me for mo, me, _ in predictions if mo == model and me != "frozen"})
        for method in methods:
            folds = sorted(
                f
                for mo, me, f in predictions
                if mo == model and me == method and (mo, "frozen", f) in predictions
            )
            if not folds:
                continue
            pooled = pd.concat(
                [
                    predictions[(model, method, f)][["utt_id", "label", "pred"]].merge(
                        predictions[(model, "frozen", f)][["utt_id", "pred"]],
                        on="utt_id",
                        suffixes=("", "_frozen"),
                    )
                    for f in folds
                ]
            )
            test = paired_bootstrap_uar(
                label_indices(pooled["label"], classes),
                label_indices(pooled["pred"], classes),
                label_indices(pooled["pred_frozen"], classes),
                len(classes),
                resamples=resamples,
                seed=seed,
            )
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "baseline": "frozen",
                    "folds": ",".join(map(str, folds)),
                    **test,
                }
            )
    return pd.DataFrame(rows)


def write_performance_tables(
    results,
    expected: dict,
    classes: list[str],
    performance_out,
    summary_out,
    significance_out,
    resamples: int,
    seed: int,
) -> None:
    """performance.tsv (one row per model x method x fold), its fold summary, and the significance tests."""
    files = prediction_files(results, expected["models"], expected["methods"], expected["folds"])
    predictions, missing = read_predictions(files)
    if missing:
        log.warning(
            "missing runs (not averaged over): %s",
            ", ".join(f"{m}/{me}/fold{f}" for m, me, f in missing),
        )
    performance = performance_table(predictions, classes)
    write_tsv_atomic(performance, performance_out)
    write_tsv_atomic(summary_table(performance, expected["folds"], missing), summary_out)
    write_tsv_atomic(significance_table(predictions, classes, resamples, seed), significance_out)
