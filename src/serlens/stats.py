"""Cluster-aware paired statistics for leave-one-session-out SER results (numpy only).

**One statistic.** The reported number is the mean over (fold, seed) *units* of the UAR of the
unit (that fold's test utterances, that seed's predictions); ΔUAR between two systems a and b
evaluated on the same rows is the mean over units of UAR_a(u) − UAR_b(u), which is exactly
``mean_uar(a) − mean_uar(b)``. Every function below (interval, test, effect size) uses it.

**Unit of resampling.** Utterances of one speaker are correlated, so they are not resampled
one by one: the unit is the *cluster* (speaker or session), pooled over folds and seeds — all
rows of a cluster (every seed's prediction of its utterances) move together. The bootstraps
are fold-stratified: each fold's clusters are drawn with replacement within that fold, so every
fold stays in every resample and the resample keeps the design of the estimate. By default a
fold with n_f clusters gets n_f − 1 draws, the rescaled stratified bootstrap (McCarthy &
Snowden 1985; Rao & Wu 1988): with n_f draws the bootstrap variance of a fold's mean is
(n_f − 1)/n_f of the unbiased one — half with 2 speakers per fold (IEMOCAP), where a 95 %
percentile interval covers about 77 % in simulation against about 88 % with n_f − 1 draws;
``draws="n"`` gives the textbook version. A fold with a single cluster (e.g. cluster = session
under leave-one-session-out) cannot be resampled within itself; then clusters are drawn from
all folds pooled and each fold's units are weighted by how many of the fold's clusters were
drawn over how many it has (the bootstrap of the mean over folds).

**Resolution.** The sign-flip test over C clusters has 2^C equally likely sign vectors and the
observed one and its negation always count, so p ≥ 2^(1−C): with 5 clusters p ≥ 1/16, and Holm
over m comparisons multiplies the smallest p by m, so with a handful of clusters and many pairs
nothing can be rejected at 0.05 (:func:`resolution_note` says so in captions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serlens.metrics import uar

TIE_TOL = 1e-12
DRAWS = ("n-1", "n")
_CHUNK = 512  # resamples per vectorised block


# --- input checking and the design (units, strata, clusters) ---------------------------------


def _as_index(name: str, values, n: int, n_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{name}: expected a 1-D array of length {n}, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise ValueError(f"{name}: expected integer class indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
    if n and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(
            f"{name}: class indices must lie in [0, {n_classes}), "
            f"got [{array.min()}, {array.max()}]"
        )
    return array.astype(np.int64)


def _as_key(name: str, values, n: int) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{name}: expected a 1-D array of length {n}, got shape {array.shape}")
    names, index = np.unique(array, return_inverse=True)
    return names, index.astype(np.int64)


@dataclass(frozen=True)
class _Design:
    labels: np.ndarray
    preds: tuple[np.ndarray, ...]
    n_classes: int
    unit: np.ndarray  # row -> (fold, seed) unit
    n_units: int
    unit_fold: np.ndarray  # unit -> fold
    cluster: np.ndarray  # row -> cluster (pooled over folds)
    cluster_names: np.ndarray
    stratum: np.ndarray  # row -> (fold, cluster) pair, the bootstrap's draw
    stratum_fold: np.ndarray  # stratum -> fold
    n_folds: int

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_names)

    @property
    def n_strata(self) -> int:
        return len(self.stratum_fold)


def _design(labels, preds: dict, fold, seed, cluster, n_classes: int) -> _Design:
    if int(n_classes) < 1:
        raise ValueError(f"n_classes: must be at least 1, got {n_classes}")
    labels_array = np.asarray(labels)
    if labels_array.ndim != 1 or len(labels_array) == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array, got shape {labels_array.shape}")
    n = len(labels_array)
    labels_index = _as_index("labels", labels_array, n, n_classes)
    pred_index = tuple(_as_index(name, value, n, n_classes) for name, value in preds.items())
    _, fold_index = _as_key("fold", fold, n)
    _, seed_index = _as_key("seed", seed, n)
    if cluster is None:
        cluster_names, cluster_index = np.array(["all"]), np.zeros(n, dtype=np.int64)
    else:
        cluster_names, cluster_index = _as_key("cluster", cluster, n)
    n_folds = int(fold_index.max()) + 1
    units, unit = np.unique(fold_index * (seed_index.max() + 1) + seed_index, return_inverse=True)
    strata, stratum = np.unique(
        fold_index * len(cluster_names) + cluster_index, return_inverse=True
    )
    return _Design(
        labels=labels_index,
        preds=pred_index,
        n_classes=int(n_classes),
        unit=unit.astype(np.int64),
        n_units=len(units),
        unit_fold=units // (seed_index.max() + 1),
        cluster=cluster_index,
        cluster_names=cluster_names,
        stratum=stratum.astype(np.int64),
        stratum_fold=strata // len(cluster_names),
        n_folds=n_folds,
    )


def _need_clusters(design: _Design, what: str) -> None:
    if design.n_clusters < 2:
        raise ValueError(f"cluster: {what} needs at least 2 clusters, got {design.n_clusters}")


# --- counts and the UAR of counts ------------------------------------------------------------


def _counts(design: _Design, group: np.ndarray, n_groups: int) -> np.ndarray:
    """``[group, unit, class, j]``: j = 0 support, j = 1 + i correct rows of system i."""
    out = np.zeros((n_groups, design.n_units, design.n_classes, 1 + len(design.preds)))
    index = (group, design.unit, design.labels)
    np.add.at(out[..., 0], index, 1.0)
    for i, pred in enumerate(design.preds):
        np.add.at(out[..., 1 + i], index, (pred == design.labels).astype(float))
    return out


def _unit_uar(correct: np.ndarray, support: np.ndarray) -> np.ndarray:
    """UAR over the last (class) axis, classes with zero support dropped; NaN with none."""
    present = support > 0
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=present)
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_present > 0, recall.sum(axis=-1) / n_present, np.nan)


def _weighted_unit_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_u w_u v_u / Σ_u w_u over units with a finite value (last axis)."""
    ok = np.isfinite(values) & (weights > 0)
    total = np.where(ok, weights, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, values * weights, 0.0).sum(axis=-1) / total


# --- resampling clusters within folds -------------------------------------------------------


def _stratified_draws(
    rng: np.random.Generator,
    stratum_fold: np.ndarray,
    n_folds: int,
    resamples: int,
    draws: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicities ``(resamples, n_strata)`` and fold weights ``(resamples, n_folds)``.

    Each fold's n_f clusters are drawn with replacement, n_f − 1 of them (``draws="n-1"``) or
    n_f (``"n"``); fold weights are 1. When a fold has a single cluster, all clusters are drawn
    pooled instead and a fold's weight is the number of its clusters drawn over the number it
    has (module docstring).
    """
    if draws not in DRAWS:
        raise ValueError(f"draws: must be one of {DRAWS}, got {draws!r}")
    n_strata = len(stratum_fold)
    sizes = np.bincount(stratum_fold, minlength=n_folds)
    counts = np.zeros((resamples, n_strata))
    groups = [np.flatnonzero(stratum_fold == f) for f in range(n_folds)]
    if sizes.min() >= 2:
        for members in groups:
            n_draw = len(members) - (draws == "n-1")
            drawn = rng.integers(0, len(members), size=(resamples, n_draw))
            counts[:, members] = _bincount_rows(drawn, len(members))
        return counts, np.ones((resamples, n_folds))
    drawn = rng.integers(0, n_strata, size=(resamples, n_strata - (draws == "n-1")))
    counts[:] = _bincount_rows(drawn, n_strata)
    fold_weights = np.stack([counts[:, m].sum(axis=1) / len(m) for m in groups], axis=1)
    return counts, fold_weights


def _bincount_rows(draws: np.ndarray, n: int) -> np.ndarray:
    rows = draws.shape[0]
    flat = (draws + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)


def _resampled_means(design: _Design, resamples: int, rng_seed: int, draws: str) -> np.ndarray:
    """``(resamples, n_systems)``: mean over units of the UAR of each resample, per system."""
    counts = _counts(design, design.stratum, design.n_strata)  # [g, u, k, j]
    flat = counts.reshape(design.n_strata, -1)
    rng = np.random.default_rng(rng_seed)
    weights, fold_weights = _stratified_draws(
        rng, design.stratum_fold, design.n_folds, resamples, draws
    )
    out = np.empty((resamples, len(design.preds)))
    for start in range(0, resamples, _CHUNK):
        block = slice(start, start + _CHUNK)
        summed = (weights[block] @ flat).reshape(-1, *counts.shape[1:])  # [r, u, k, j]
        unit_weights = fold_weights[block][:, design.unit_fold]
        for i in range(len(design.preds)):
            per_unit = _unit_uar(summed[..., 1 + i], summed[..., 0])
            out[block, i] = _weighted_unit_mean(per_unit, unit_weights)
    return out


def _interval(draws: np.ndarray, level: float) -> tuple[float, float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level: must lie in (0, 1), got {level}")
    draws = draws[np.isfinite(draws)]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high), float(np.std(draws, ddof=1))


def _check_resamples(resamples: int) -> None:
    if int(resamples) < 2:
        raise ValueError(f"resamples: must be at least 2, got {resamples}")


# --- the statistic ----------------------------------------------------------------------------


def mean_uar(labels, pred, fold, seed, n_classes: int) -> float:
    """Mean over (fold, seed) units u of UAR(u) (:func:`serlens.metrics.uar` on the unit's rows)."""
    design = _design(labels, {"pred": pred}, fold, seed, None, n_classes)
    per_unit = [
        uar(design.labels[design.unit == u], design.preds[0][design.unit == u], n_classes)
        for u in range(design.n_units)
    ]
    return float(np.mean(per_unit))


def delta_uar(labels, pred_a, pred_b, fold, seed, n_classes: int) -> float:
    """ΔUAR = (1/U) Σ_u [UAR_a(u) − UAR_b(u)] over the U (fold, seed) units.

    Identical to ``mean_uar(a) − mean_uar(b)``: the difference of the reported means.
    """
    design = _design(labels, {"pred_a": pred_a, "pred_b": pred_b}, fold, seed, None, n_classes)
    diffs = []
    for u in range(design.n_units):
        rows = design.unit == u
        diffs.append(
            uar(design.labels[rows], design.preds[0][rows], n_classes)
            - uar(design.labels[rows], design.preds[1][rows], n_classes)
        )
    return float(np.mean(diffs))


# --- intervals --------------------------------------------------------------------------------


def cluster_multiplicities(
    n_clusters: int, resamples: int, rng_seed: int = 0, draws: str = "n-1"
) -> np.ndarray:
    """How often each of ``n_clusters`` clusters (one fold) is drawn in each of ``resamples``
    bootstrap draws, ``(resamples, n_clusters)``: n − 1 clusters with replacement
    (``draws="n-1"``, the rescaled bootstrap of :func:`cluster_bootstrap_delta`) or n. For
    statistics that are not means over rows (a spectrum of a summed Gram), which resample
    the clusters' sufficient statistics with these weights."""
    if n_clusters < 2:
        raise ValueError(f"n_clusters: a cluster bootstrap needs at least 2, got {n_clusters}")
    _check_resamples(resamples)
    rng = np.random.default_rng(rng_seed)
    counts, _ = _stratified_draws(rng, np.zeros(n_clusters, dtype=int), 1, int(resamples), draws)
    return counts


def cluster_bootstrap_delta(
    labels,
    pred_a,
    pred_b,
    fold,
    seed,
    cluster,
    n_classes: int,
    resamples: int = 2000,
    rng_seed: int = 0,
    level: float = 0.95,
    draws: str = "n-1",
) -> dict:
    """Paired cluster bootstrap of ΔUAR (Field & Welsh 2007; Cameron, Gelbach & Miller 2008).

    Each resample draws every fold's n_f clusters with replacement (n_f − 1 draws by default,
    n_f with ``draws="n"``: module docstring; a cluster drawn twice counts twice), takes all
    rows (all seeds) of the drawn clusters, and recomputes ΔUAR per fold and seed from the
    multiplicity-weighted per-(fold, seed, cluster, class) counts, then the mean over units —
    the same draws for a and b. Classes absent from a resampled unit drop out of its UAR.
    Returns the observed ``delta``, the percentile interval ``ci_low``/``ci_high``, the bootstrap
    standard error ``se``, ``resamples`` and ``n_clusters`` (clusters over all folds).
    """
    design = _design(labels, {"pred_a": pred_a, "pred_b": pred_b}, fold, seed, cluster, n_classes)
    _need_clusters(design, "the cluster bootstrap")
    _check_resamples(resamples)
    means = _resampled_means(design, int(resamples), rng_seed, draws)
    low, high, se = _interval(means[:, 0] - means[:, 1], level)
    return {
        "delta": delta_uar(labels, pred_a, pred_b, fold, seed, n_classes),
        "ci_low": low,
        "ci_high": high,
        "se": se,
        "resamples": int(resamples),
        "n_clusters": design.n_strata,
    }


def cluster_bootstrap_uar(
    labels,
    pred,
    fold,
    seed,
    cluster,
    n_classes: int,
    resamples: int = 2000,
    rng_seed: int = 0,
    level: float = 0.95,
    draws: str = "n-1",
) -> dict:
    """Cluster bootstrap of one system's mean UAR, resampled as in :func:`cluster_bootstrap_delta`.

    Returns ``uar`` (= :func:`mean_uar`), ``ci_low``, ``ci_high``, ``se``, ``resamples``,
    ``n_clusters``.
    """
    design = _design(labels, {"pred": pred}, fold, seed, cluster, n_classes)
    _need_clusters(design, "the cluster bootstrap")
    _check_resamples(resamples)
    low, high, se = _interval(
        _resampled_means(design, int(resamples), rng_seed, draws)[:, 0], level
    )
    return {
        "uar": mean_uar(labels, pred, fold, seed, n_classes),
        "ci_low": low,
        "ci_high": high,
        "se": se,
        "resamples": int(resamples),
        "n_clusters": design.n_strata,
    }


def iid_bootstrap_delta(
    labels,
    pred_a,
    pred_b,
    fold,
    seed,
    n_classes: int,
    resamples: int = 2000,
    rng_seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired bootstrap of ΔUAR resampling rows iid within each (fold, seed) unit (Efron &
    Tibshirani 1993; Koehn 2004) — it ignores speaker correlation and is shown only to compare.

    Resampling n_u rows of a unit with replacement is a multinomial draw over its cells
    (class, a correct, b correct), which is how it is computed. Same keys as the cluster version
    (``n_clusters`` is absent; ``n`` is the number of rows).
    """
    design = _design(labels, {"pred_a": pred_a, "pred_b": pred_b}, fold, seed, None, n_classes)
    _check_resamples(resamples)
    resamples = int(resamples)
    k = design.n_classes
    correct_a = (design.preds[0] == design.labels).astype(np.int64)
    correct_b = (design.preds[1] == design.labels).astype(np.int64)
    cell = design.labels * 4 + correct_a * 2 + correct_b
    rng = np.random.default_rng(rng_seed)
    uar_a = np.empty((resamples, design.n_units))
    uar_b = np.empty((resamples, design.n_units))
    for u in range(design.n_units):
        cells = np.bincount(cell[design.unit == u], minlength=4 * k)
        n_u = int(cells.sum())
        drawn = rng.multinomial(n_u, cells / n_u, size=resamples).reshape(resamples, k, 2, 2)
        support = drawn.sum(axis=(2, 3)).astype(float)
        uar_a[:, u] = _unit_uar(drawn[:, :, 1, :].sum(axis=2).astype(float), support)
        uar_b[:, u] = _unit_uar(drawn[:, :, :, 1].sum(axis=2).astype(float), support)
    low, high, se = _interval(np.mean(uar_a - uar_b, axis=1), level)
    return {
        "delta": delta_uar(labels, pred_a, pred_b, fold, seed, n_classes),
        "ci_low": low,
        "ci_high": high,
        "se": se,
        "resamples": resamples,
        "n": int(len(design.labels)),
    }


def cluster_band(
    values,
    cluster,
    fold,
    resamples: int = 1000,
    rng_seed: int = 0,
    level: float = 0.95,
    draws: str = "n-1",
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile band of a curve = mean over folds of the per-fold mean over rows.

    ``values`` is ``(n_rows, n_points)`` (per utterance or per cluster; 1-D is one point; NaN
    entries are left out of their point's means). Clusters are resampled within folds as in
    :func:`cluster_bootstrap_delta`; returns the ``low`` and ``high`` arrays of length n_points.
    """
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(
            f"values: expected a non-empty (n_rows, n_points) array, got {array.shape}"
        )
    n = len(array)
    _, fold_index = _as_key("fold", fold, n)
    cluster_names, cluster_index = _as_key("cluster", cluster, n)
    if len(cluster_names) < 2:
        raise ValueError(f"cluster: the band needs at least 2 clusters, got {len(cluster_names)}")
    _check_resamples(resamples)
    strata, stratum = np.unique(
        fold_index * len(cluster_names) + cluster_index, return_inverse=True
    )
    n_folds = int(fold_index.max()) + 1
    finite = np.isfinite(array)
    sums = np.zeros((len(strata), array.shape[1]))
    np.add.at(sums, stratum, np.where(finite, array, 0.0))
    counts = np.zeros_like(sums)
    np.add.at(counts, stratum, finite.astype(float))
    rng = np.random.default_rng(rng_seed)
    weights, fold_weights = _stratified_draws(
        rng, strata // len(cluster_names), n_folds, int(resamples), draws
    )
    member = np.zeros((len(strata), n_folds))
    member[np.arange(len(strata)), strata // len(cluster_names)] = 1.0
    curves = np.empty((int(resamples), array.shape[1]))
    for start in range(0, int(resamples), _CHUNK):
        block = slice(start, start + _CHUNK)
        w = weights[block][:, :, None] * member[None]  # [r, g, f]
        fold_sum = np.einsum("rgf,gp->rfp", w, sums)
        fold_n = np.einsum("rgf,gp->rfp", w, counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            fold_mean = fold_sum / fold_n
        curves[block] = _weighted_unit_mean(
            np.moveaxis(fold_mean, 1, 2), fold_weights[block][:, None, :]
        )
    low, high = np.nanquantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low, high


# --- the permutation test ----------------------------------------------------------------------


def cluster_contributions(
    labels, pred_a, pred_b, fold, seed, cluster, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster contributions d_c with Σ_c d_c = ΔUAR, and the cluster names.

    d_c = (1/U) Σ_u (1/K_u) Σ_k (correct_a[c,u,k] − correct_b[c,u,k]) / support_k(u), with the
    support and the K_u present classes of the whole unit u: supports do not depend on the
    system, so ΔUAR is linear in the per-cluster counts.
    """
    design = _design(labels, {"pred_a": pred_a, "pred_b": pred_b}, fold, seed, cluster, n_classes)
    counts = _counts(design, design.cluster, design.n_clusters)  # [c, u, k, j]
    support = counts[..., 0].sum(axis=0)  # [u, k]
    present = support > 0
    scale = np.divide(1.0, support, out=np.zeros_like(support), where=present)
    scale /= present.sum(axis=1, keepdims=True) * design.n_units
    d = ((counts[..., 1] - counts[..., 2]) * scale[None]).sum(axis=(1, 2))
    return d, design.cluster_names


def sign_flip_test(
    labels,
    pred_a,
    pred_b,
    fold,
    seed,
    cluster,
    n_classes: int,
    max_exact: int = 16,
    permutations: int = 10000,
    rng_seed: int = 0,
) -> dict:
    """Paired permutation (sign-flip) test of ΔUAR over clusters (Fisher 1935; Good 2005).

    Under H0 a and b are exchangeable within a cluster: swapping their predictions on all rows
    of cluster c negates its contribution d_c (:func:`cluster_contributions`), so the null
    distribution is that of Σ_c s_c d_c over s ∈ {±1}^C. With C ≤ ``max_exact`` all 2^C sign
    vectors are enumerated; otherwise ``permutations`` random ones plus the observed,
    p = (count + 1) / (permutations + 1). Two-sided: p = share with |Σ s_c d_c| ≥ |ΔUAR| (ties
    within 1e-12). ``min_p`` is the smallest attainable p: 2^(1−C) exact, 1/(permutations+1) MC.
    """
    d, names = cluster_contributions(labels, pred_a, pred_b, fold, seed, cluster, n_classes)
    if len(names) < 2:
        raise ValueError(f"cluster: the sign-flip test needs at least 2 clusters, got {len(names)}")
    observed = float(d.sum())
    threshold = abs(observed) - TIE_TOL
    n_clusters = len(d)
    exact = n_clusters <= int(max_exact)
    if exact:
        # the first sign is fixed at +1: |Σ| is symmetric under flipping every sign
        sums = np.array([d[0]])
        for value in d[1:]:
            sums = np.concatenate([sums + value, sums - value])
        p_value = float(np.mean(np.abs(sums) >= threshold))
        min_p = 2.0 ** (1 - n_clusters)
    else:
        if int(permutations) < 1:
            raise ValueError(f"permutations: must be at least 1, got {permutations}")
        rng = np.random.default_rng(rng_seed)
        hits = 0
        for start in range(0, int(permutations), 4096):
            size = min(4096, int(permutations) - start)
            signs = rng.integers(0, 2, size=(size, n_clusters)) * 2.0 - 1.0
            hits += int(np.sum(np.abs(signs @ d) >= threshold))
        p_value = (hits + 1) / (int(permutations) + 1)
        min_p = 1.0 / (int(permutations) + 1)
    return {
        "delta": delta_uar(labels, pred_a, pred_b, fold, seed, n_classes),
        "p_value": float(min(1.0, p_value)),
        "exact": bool(exact),
        "n_clusters": n_clusters,
        "min_p": float(min_p),
    }


# --- multiplicity, effect size, captions -------------------------------------------------------


def holm(p_values) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values: p̃_(i) = max_{j≤i} min(1, (m − j + 1) p_(j)).

    m counts the finite p-values; NaNs are ignored and stay NaN; the result is in input order.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values: expected a 1-D array, got shape {p.shape}")
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError("p_values: must lie in [0, 1]")
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


def cluster_effect_size(labels, pred_a, pred_b, fold, seed, cluster, n_classes: int) -> float:
    """Cohen's d_z over clusters (Cohen 1988; Lakens 2013): mean(δ_c) / sd(δ_c, ddof=1).

    δ_c is UAR_a − UAR_b on cluster c's rows of each (fold, seed) unit, averaged over the units
    the cluster is in. NaN with fewer than 2 clusters or zero spread.
    """
    design = _design(labels, {"pred_a": pred_a, "pred_b": pred_b}, fold, seed, cluster, n_classes)
    counts = _counts(design, design.cluster, design.n_clusters)  # [c, u, k, j]
    per_unit = _unit_uar(counts[..., 1], counts[..., 0]) - _unit_uar(counts[..., 2], counts[..., 0])
    with np.errstate(invalid="ignore"):
        deltas = np.nanmean(per_unit, axis=1)
    if len(deltas) < 2:
        return float("nan")
    sd = float(np.std(deltas, ddof=1))
    if not sd > 1e-15:
        return float("nan")
    return float(np.mean(deltas) / sd)


def _fraction(x: float) -> str:
    inverse = 1.0 / x
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{x:.3g}"


def resolution_note(n_clusters: int, n_tests: int, alpha: float = 0.05) -> str:
    """One sentence on the smallest attainable p: 2^(1−C) for the exact sign-flip test over C
    clusters, and n_tests × that after Holm — whether anything can be rejected at ``alpha``."""
    n_clusters, n_tests = int(n_clusters), int(n_tests)
    if n_tests < 1:
        raise ValueError(f"n_tests: must be at least 1, got {n_tests}")
    if n_clusters < 2:
        return f"{n_clusters} cluster(s): no sign-flip test is possible."
    min_p = 2.0 ** (1 - n_clusters)
    holm_min = min(1.0, n_tests * min_p)
    text = f"{n_clusters} clusters: the exact sign-flip p ≥ {_fraction(min_p)}"
    if n_tests == 1:
        verdict = "can" if min_p <= alpha else "cannot"
        return f"{text}, so a single test {verdict} reach {alpha:g}."
    verdict = "a rejection is possible" if holm_min <= alpha else "no comparison can be rejected"
    return (
        f"{text}; Holm over {n_tests} comparisons gives p ≥ {n_tests} × {_fraction(min_p)} = "
        f"{holm_min:.3g}, so {verdict} at {alpha:g}."
    )


__all__ = [
    "cluster_band",
    "cluster_bootstrap_delta",
    "cluster_bootstrap_uar",
    "cluster_contributions",
    "cluster_effect_size",
    "delta_uar",
    "holm",
    "iid_bootstrap_delta",
    "mean_uar",
    "resolution_note",
    "sign_flip_test",
]
