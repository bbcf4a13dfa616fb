"""Classification metrics as pure functions of predictions (the paired tests are in :mod:`serlens.stats`)."""

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
