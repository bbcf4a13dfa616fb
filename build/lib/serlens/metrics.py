"""Classification metrics and the paired significance test, as pure functions of predictions."""

from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """C[i, j] = number of utterances of true class i predicted as j."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(preds)), 1)
    return matrix


def uar(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Unweighted average recall: (1/K) Σ_k C[k,k] / Σ_j C[k,j], over classes present in ``labels``.

    The standard SER metric on IEMOCAP (e.g. Schuller et al. 2009); chance is 1/K whatever the class balance.
    """
    matrix = confusion(labels, preds, n_classes)
    support = matrix.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def war(labels: np.ndarray, preds: np.ndarray) -> float:
    """Weighted average recall = accuracy: Σ_k C[k,k] / N."""
    return float(np.mean(np.asarray(labels) == np.asarray(preds)))


def macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Mean over classes present in labels or preds of F1_k = 2 C[k,k] / (Σ_j C[k,j] + Σ_i C[i,k])."""
    matrix = confusion(labels, preds, n_classes)
    denom = matrix.sum(axis=1) + matrix.sum(axis=0)
    present = denom > 0
    return float(np.mean(2 * np.diag(matrix)[present] / denom[present]))


def summarise(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    """UAR, WAR, macro-F1 and the confusion matrix (rows true, columns predicted)."""
    n = len(classes)
    return {
        "uar": uar(labels, preds, n),
        "war": war(labels, preds),
        "macro_f1": macro_f1(labels, preds, n),
        "n": int(len(labels)),
        "classes": list(classes),
        "confusion": confusion(labels, preds, n).tolist(),
    }


def paired_bootstrap_uar(
    labels: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    n_classes: int,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of ΔUAR = UAR(a) − UAR(b) over utterances (Efron & Tibshirani 1993; Koehn 2004).

    Utterances are resampled with replacement, the same indices for both systems. Returns the
    observed difference, a 95 % percentile interval, and a two-sided p-value: twice the smaller
    share of resampled differences on either side of 0 (capped at 1), with the +1 correction
    so p is never 0 from a finite number of resamples.
    """
    labels, preds_a, preds_b = map(np.asarray, (labels, preds_a, preds_b))
    rng = np.random.default_rng(seed)
    n = len(labels)
    diffs = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        diffs[i] = uar(labels[idx], preds_a[idx], n_classes) - uar(
            labels[idx], preds_b[idx], n_classes
        )
    below = (np.sum(diffs <= 0) + 1) / (resamples + 1)
    above = (np.sum(diffs >= 0) + 1) / (resamples + 1)
    return {
        "delta_uar": uar(labels, preds_a, n_classes) - uar(labels, preds_b, n_classes),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
        "p_value": float(min(1.0, 2 * min(below, above))),
        "resamples": resamples,
        "seed": seed,
        "n": n,
    }
