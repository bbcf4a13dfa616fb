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


def prediction_files(
    results, corpus: str, models, methods, seeds, folds
) -> dict[tuple[str, str, int], Path]:
    """``{(model, method, fold): predictions.tsv}`` of every run of the grid (one seed per key)."""
    from serlens.paths import Paths

    paths = Paths(str(results))
    return {
        (model, method, int(fold)): Path(paths.run(corpus, model, method, seed, fold))
        / "predictions.tsv"
        for model in models
        for method in methods
        for seed in seeds
        for fold in folds
    }


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
    files: dict,
    folds,
    classes: list[str],
    performance_out,
    summary_out,
    significance_out,
    resamples: int,
    seed: int,
) -> None:
    """performance.tsv (one row per model x method x fold), its fold summary, and the significance tests.

    ``files``: ``{(model, method, fold): predictions.tsv}`` of the grid; ``folds``: the folds run.
    """
    files = {key: Path(path) for key, path in files.items()}
    predictions, missing = read_predictions(files)
    if missing:
        log.warning(
            "missing runs (not averaged over): %s",
            ", ".join(f"{m}/{me}/fold{f}" for m, me, f in missing),
        )
    performance = performance_table(predictions, classes)
    write_tsv_atomic(performance, performance_out)
    write_tsv_atomic(summary_table(performance, folds, missing), summary_out)
    write_tsv_atomic(significance_table(predictions, classes, resamples, seed), significance_out)
