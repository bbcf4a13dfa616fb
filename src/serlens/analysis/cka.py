"""Centred kernel alignment (CKA) between two representations of the same examples.

All functions are pure numpy and compute in float64. A *representation* is an ``n x d``
array whose rows are the ``n`` examples (e.g. mean-pooled hidden states of one layer) and
whose columns are features; two representations compared must share ``n`` (same examples,
same order) but may differ in ``d``.

Formulas
--------
Let ``H = I_n - (1/n) 1 1ᵀ`` be the centring matrix and ``K``, ``L`` two ``n x n`` Gram
matrices (``K = X Xᵀ`` for the linear kernel).

* HSIC (Gretton et al. 2005, "Measuring statistical dependence with Hilbert-Schmidt
  norms"), biased estimator: ``HSIC(K, L) = tr(K H L H) / (n - 1)²``.
* CKA (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of neural network
  representations revisited", ICML; eq. 3)::

      CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

  The ``(n - 1)²`` factors cancel, so with ``K̄ = H K H`` this is the cosine
  ``<K̄, L̄>_F / (‖K̄‖_F ‖L̄‖_F)``.
* Linear CKA in feature space (Kornblith et al. 2019, eq. 4), with column-centred
  ``Xᶜ``, ``Yᶜ``::

      CKA_lin(X, Y) = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)

  This equals the Gram-space form because ``tr(Xᶜ Xᶜᵀ Yᶜ Yᶜᵀ) = ‖Yᶜᵀ Xᶜ‖²_F``.
  :func:`linear_cka` picks whichever of the two is cheaper for the given ``n``, ``d``.
* Debiased CKA (Kornblith et al. 2019 code; Nguyen, Raghu & Kornblith 2021, "Do wide and
  deep networks learn the same things?", ICLR) replaces HSIC by the unbiased estimator of
  Song, Smola, Gretton, Bedo & Borgwardt 2012 ("Feature selection via dependence
  maximization", JMLR, eq. 5). With ``K̃``, ``L̃`` the Gram matrices with zeroed diagonal::

      HSIC_u(K, L) = [ tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1 ] / (n(n-3))

  It requires ``n >= 4``. The biased estimator is inflated when ``n`` is small relative
  to ``d`` (two *independent* Gaussian representations get a large biased CKA);
  the debiased one stays near zero. Debiased CKA can be (slightly) negative.
  Equivalently (Székely & Rizzo 2014, "Partial distance correlation with methods for
  dissimilarities", Ann. Stat.), ``HSIC_u(K, L) = <U(K), U(L)>_F / (n(n-3))`` with the
  U-centred matrix ``U(K)_ij = K̃_ij - r_i/(n-2) - r_j/(n-2) + S/((n-1)(n-2))`` for
  ``i != j`` and ``0`` on the diagonal (``r`` = row sums, ``S`` = total sum of ``K̃``);
  :func:`cka_matrix` uses this form so each layer is processed once.
* RBF CKA (Kornblith et al. 2019, §4): ``K_ij = exp(-‖x_i - x_j‖² / (2σ²))`` with a
  bandwidth chosen per representation by the median heuristic, then biased CKA. Two
  bandwidths (``bandwidth=``):

  - ``"kornblith"`` (default), the one of Kornblith et al.'s reference code
    (``gram_rbf(x, threshold)``): ``σ² = threshold² x median_{i,j} ‖x_i - x_j‖²``, the
    median over *all* ``n²`` entries of the squared-distance matrix, its ``n`` diagonal
    zeros included (so σ is slightly smaller than the distinct-pairs one);
  - ``"distinct_pairs"``: ``σ = threshold x median_{i<j} ‖x_i - x_j‖`` over the
    ``n(n-1)/2`` distinct pairs only (serlens' earlier choice).

  On Kornblith's own example (``np.random.seed(1337); X = randn(100, 10); Y = randn(100,
  10) + X``, threshold 0.5) they give 0.65483 and 0.65401 (``tests/test_cka.py``).

Statistics of a layer's CKA (the analysis reports them for the layer-by-layer diagonal)
--------------------------------------------------------------------------------------

* Permutation null (:func:`cka_permutation_null`): CKA of ``X`` against ``Y`` with ``Y``'s
  rows shuffled, which breaks the pairing of examples while keeping each representation's
  own structure: the null distribution of "no example-level correspondence", as in the
  permutation form of the HSIC independence test (Gretton, Fukumizu, Teo, Song, Schölkopf
  & Smola 2008, "A kernel statistical test of independence", NeurIPS 20; CKA is HSIC
  normalised by quantities a permutation leaves unchanged). Every centring used here
  commutes with a permutation ``P`` (``H(PLPᵀ)H = P(HLH)Pᵀ``, likewise U-centring and the
  median bandwidth), so the null is computed on each layer's prepared Gram matrix once,
  as ``<K̄, L̄[p][:, p]>`` with unchanged norms: one ``n²`` gather and inner product per
  permutation, no features recomputed. Debiased CKA's null sits near 0; biased linear and
  RBF CKA have a null well above 0 when ``n`` is not much larger than ``d``, so their
  value means something only against it.
* Cluster (speaker) bootstrap (:func:`cka_cluster_bootstrap`): the examples' clusters
  (speakers) are drawn with replacement, as many as there are, and CKA is recomputed on
  the drawn clusters' examples *with multiplicity*: a cluster drawn ``m`` times gives
  each of its examples the weight ``m`` (Gram indexing of the distinct examples, no copied
  rows). Biased CKA (linear, RBF) with weights is exactly biased CKA of the resample with
  copied rows (the V-statistic: weighted centring ``K - m1ᵀ - 1mᵀ + μ`` with
  ``m = Kw/Σw``, weighted Frobenius products ``Σ w_i w_j A_ij B_ij``). The unbiased HSIC
  is undefined with copied rows (two copies of one example form a pair whose kernel value
  is the self-similarity the estimator exists to exclude: copying brings back about as
  much bias as debiasing removes), so :func:`hsic_unbiased_weighted` uses the weighted
  U-statistic instead: Song et al.'s estimator is the U-statistic
  ``(1/(n)_4) Σ_{i,j,q,r distinct} [k_ij l_ij + k_ij l_qr - 2 k_ij l_iq]``; with weights
  every 4-tuple of *distinct examples* counts ``w_i w_j w_q w_r`` times (for integer
  weights: the expanded resample with every tuple that holds two copies of one example
  left out), divided by the sum of those weights. It equals :func:`hsic_unbiased` for
  unit weights, keeps the estimator's invariance to ``K → K + a1ᵀ + 1aᵀ + c`` (so a
  U-centred Gram can be resampled as it is), and needs 4 distinct examples. The RBF
  bandwidth is the full sample's (the kernel is fixed; the resample changes the examples).
  The 2.5 and 97.5 percentiles of the resampled values are the 95 % band (percentile
  bootstrap; Field & Welsh 2007, "Bootstrapping clustered data", JRSS B). With few
  clusters the band is coarse (two speakers allow three distinct resamples), with one
  there is none (``nan``).

Degenerate inputs: if a representation is constant across examples its centred Gram
matrix is zero and CKA is undefined; the functions then return ``nan`` rather than
raising, so a dead layer does not abort a whole layer-by-layer matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BANDWIDTHS",
    "KINDS",
    "LayerCKA",
    "center_gram",
    "cka_cluster_bootstrap",
    "cka_layers",
    "cka_matrix",
    "cka_permutation_null",
    "cluster_bootstrap_weights",
    "debiased_cka_gram",
    "debiased_linear_cka",
    "hsic_unbiased",
    "hsic_unbiased_weighted",
    "linear_cka",
    "linear_cka_gram",
    "permutation_indices",
    "rbf_cka",
    "rbf_gram",
    "weighted_cka_gram",
]

#: The CKA kinds: biased linear, debiased linear (unbiased HSIC), RBF (biased).
KINDS = ("linear", "debiased", "rbf")
_KINDS = KINDS
#: RBF bandwidths: Kornblith et al.'s reference code (default) or the distinct-pairs median.
BANDWIDTHS = ("kornblith", "distinct_pairs")


# --------------------------------------------------------------------------- validation


def _as_rep(X, name: str = "X") -> np.ndarray:
    """Return ``X`` as a finite 2-D float64 array with at least two rows."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_examples x n_features); got shape {X.shape}")
    if X.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 examples (rows); got shape {X.shape}")
    if X.shape[1] < 1:
        raise ValueError(f"{name} needs at least 1 feature (column); got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def _check_pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    X = _as_rep(X, "X")
    Y = _as_rep(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of examples (rows); got X {X.shape} and Y {Y.shape}"
        )
    return X, Y


def _as_gram(K, name: str = "K") -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square n x n Gram matrix; got shape {K.shape}")
    if K.shape[0] < 2:
        raise ValueError(f"{name} needs n >= 2; got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return K


def _check_gram_pair(K, L) -> tuple[np.ndarray, np.ndarray]:
    K = _as_gram(K, "K")
    L = _as_gram(L, "L")
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape; got {K.shape} and {L.shape}")
    return K, L


def _cosine(num: float, a: float, b: float) -> float:
    """``num / sqrt(a b)``, or ``nan`` when the denominator vanishes."""
    den = np.sqrt(a) * np.sqrt(b)
    if not np.isfinite(den) or den <= 0.0:
        return float("nan")
    return float(num / den)


# --------------------------------------------------------------------------- building blocks


def center_gram(K) -> np.ndarray:
    """Doubly centred Gram matrix ``H K H`` with ``H = I - 11ᵀ/n`` (no n x n product)."""
    K = _as_gram(K)
    return K - K.mean(axis=0, keepdims=True) - K.mean(axis=1, keepdims=True) + K.mean()


def _u_center(K: np.ndarray) -> np.ndarray:
    """U-centred Gram matrix (Székely & Rizzo 2014); requires n >= 4."""
    n = K.shape[0]
    Kt = K.copy()
    np.fill_diagonal(Kt, 0.0)
    row = Kt.sum(axis=1)
    col = Kt.sum(axis=0)
    total = row.sum()
    U = Kt - row[:, None] / (n - 2) - col[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    np.fill_diagonal(U, 0.0)
    return U


def _require_n4(n: int) -> None:
    if n < 4:
        raise ValueError(f"debiased CKA (unbiased HSIC) requires n >= 4 examples; got n = {n}")


def hsic_unbiased(K, L) -> float:
    """Unbiased HSIC estimator of Song et al. 2012 (JMLR, eq. 5) on Gram matrices.

    With ``K̃``, ``L̃`` the Gram matrices with their diagonals set to zero::

        HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))

    Raises ``ValueError`` for ``n < 4``.
    """
    K, L = _check_gram_pair(K, L)
    n = K.shape[0]
    _require_n4(n)
    Kt = K.copy()
    Lt = L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    trace_kl = float(np.vdot(Kt.T, Lt))  # tr(K̃ L̃) = Σ_ij K̃_ji L̃_ij
    sum_k = Kt.sum()
    sum_l = Lt.sum()
    one_kl_one = float(Kt.sum(axis=0) @ Lt.sum(axis=1))  # 1ᵀ K̃ L̃ 1
    value = trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one
    return float(value / (n * (n - 3)))


# --------------------------------------------------------------------------- CKA on Grams


def linear_cka_gram(K, L) -> float:
    """Biased CKA on two symmetric ``n x n`` Gram matrices (Kornblith et al. 2019, eq. 3).

    ``CKA = tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) = <HKH, HLH>_F / (‖HKH‖_F ‖HLH‖_F)``.
    With ``K = X Xᵀ`` and ``L = Y Yᵀ`` this equals :func:`linear_cka` ``(X, Y)``; with
    RBF Grams it is RBF CKA. Returns ``nan`` if either centred Gram is zero.
    """
    K, L = _check_gram_pair(K, L)
    Kc = center_gram(K)
    Lc = center_gram(L)
    return _cosine(float(np.vdot(Kc, Lc)), float(np.vdot(Kc, Kc)), float(np.vdot(Lc, Lc)))


def debiased_cka_gram(K, L) -> float:
    """Debiased CKA on Gram matrices: ``HSIC_u(K,L) / sqrt(HSIC_u(K,K) HSIC_u(L,L))``.

    Uses :func:`hsic_unbiased` (Song et al. 2012), as in Kornblith et al. 2019 and
    Nguyen et al. 2021. Requires ``n >= 4``; returns ``nan`` for a degenerate denominator.
    """
    K, L = _check_gram_pair(K, L)
    return _cosine(hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L))


# --------------------------------------------------------------------------- CKA on features


def _center_columns(X: np.ndarray) -> np.ndarray:
    return X - X.mean(axis=0, keepdims=True)


def linear_cka(X, Y) -> float:
    """Linear CKA (Kornblith et al. 2019, eq. 4) between ``X`` (n x d1) and ``Y`` (n x d2).

    ``CKA = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)`` with column-centred ``Xᶜ``, ``Yᶜ``.
    Evaluated in feature space (``d x d`` products, cost ~ ``n(d1 d2 + d1² + d2²)``) or in
    Gram space (``n x n`` products, cost ~ ``n²(d1 + d2)``), whichever is cheaper; both give
    the same number. Invariant to orthogonal transforms, isotropic scaling and translation
    of either representation, but not to general invertible linear maps.
    Returns a value in ``[0, 1]``, or ``nan`` if a representation is constant.
    """
    X, Y = _check_pair(X, Y)
    n, d1 = X.shape
    d2 = Y.shape[1]
    Xc = _center_columns(X)
    Yc = _center_columns(Y)
    if d1 * d2 + d1 * d1 + d2 * d2 <= n * (d1 + d2):
        cross = Yc.T @ Xc
        num = float(np.vdot(cross, cross))
        xx = Xc.T @ Xc
        yy = Yc.T @ Yc
        return _cosine(num, float(np.vdot(xx, xx)), float(np.vdot(yy, yy)))
    # Gram space: K = Xᶜ Xᶜᵀ is already doubly centred, so no further centring is needed.
    K = Xc @ Xc.T
    L = Yc @ Yc.T
    return _cosine(float(np.vdot(K, L)), float(np.vdot(K, K)), float(np.vdot(L, L)))


def debiased_linear_cka(X, Y) -> float:
    """Debiased linear CKA between ``X`` (n x d1) and ``Y`` (n x d2); requires ``n >= 4``.

    Linear Grams ``K = XXᵀ``, ``L = YYᵀ`` fed to :func:`debiased_cka_gram`, i.e. the
    unbiased HSIC of Song et al. 2012 in place of the biased one (Kornblith et al. 2019;
    Nguyen et al. 2021). Columns are centred first for numerical accuracy (the estimator
    is itself invariant to translation). Approximately 0 for independent representations
    even when ``n ≪ d``; may be slightly negative.
    """
    X, Y = _check_pair(X, Y)
    _require_n4(X.shape[0])
    Xc = _center_columns(X)
    Yc = _center_columns(Y)
    return debiased_cka_gram(Xc @ Xc.T, Yc @ Yc.T)


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold <= 0.0:
        raise ValueError(f"threshold must be a positive finite number; got {threshold}")
    return threshold


def _check_bandwidth(bandwidth: str) -> str:
    if bandwidth not in BANDWIDTHS:
        raise ValueError(f"bandwidth must be one of {BANDWIDTHS}; got {bandwidth!r}")
    return bandwidth


def rbf_gram(X, threshold: float = 0.5, bandwidth: str = "kornblith") -> np.ndarray:
    """RBF Gram matrix ``exp(-‖x_i - x_j‖² / (2σ²))`` with a median-heuristic bandwidth.

    ``bandwidth="kornblith"`` (default): ``σ² = threshold² x median`` of the full ``n x n``
    squared-distance matrix, its diagonal zeros included, as Kornblith et al.'s reference
    ``gram_rbf(x, threshold)``::

        sq_distances = diag - 2 dot + diag.T
        exp(-sq_distances / (2 threshold² median(sq_distances)))

    ``bandwidth="distinct_pairs"``: ``σ = threshold x median_{i<j} ‖x_i - x_j‖`` over the
    ``n(n-1)/2`` distinct pairs. If the median is zero the ``σ → 0`` limit is used:
    ``K_ij = 1`` where ``x_i = x_j``, else 0.
    """
    X = _as_rep(X)
    threshold = _check_threshold(threshold)
    bandwidth = _check_bandwidth(bandwidth)
    Xc = _center_columns(X)  # distances are translation invariant; centring helps accuracy
    sq_norms = np.einsum("ij,ij->i", Xc, Xc)
    sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (Xc @ Xc.T)
    np.maximum(sq_dist, 0.0, out=sq_dist)
    np.fill_diagonal(sq_dist, 0.0)
    if bandwidth == "kornblith":
        sigma_sq = threshold * threshold * float(np.median(sq_dist))
    else:
        iu = np.triu_indices(X.shape[0], k=1)
        sigma_sq = (threshold * float(np.median(np.sqrt(sq_dist[iu])))) ** 2
    if sigma_sq <= 0.0:
        return (sq_dist == 0.0).astype(np.float64)
    return np.exp(-sq_dist / (2.0 * sigma_sq))


def rbf_cka(X, Y, threshold: float = 0.5, bandwidth: str = "kornblith") -> float:
    """RBF-kernel CKA (Kornblith et al. 2019, §4) between ``X`` (n x d1) and ``Y`` (n x d2).

    Each representation gets its own bandwidth (:func:`rbf_gram`: ``threshold`` times the
    median distance, ``bandwidth`` says which median); the biased CKA of the two RBF Grams
    is returned, in ``[0, 1]``.
    """
    X, Y = _check_pair(X, Y)
    return linear_cka_gram(rbf_gram(X, threshold, bandwidth), rbf_gram(Y, threshold, bandwidth))


# --------------------------------------------------------------------------- all pairs


def _prepare(X, kind: str, threshold: float, bandwidth: str, name: str) -> np.ndarray:
    """Per-layer centred Gram whose Frobenius inner products give the kind's HSIC."""
    X = _as_rep(X, name)
    if kind == "linear":
        Xc = _center_columns(X)
        return Xc @ Xc.T  # already doubly centred
    if kind == "debiased":
        _require_n4(X.shape[0])
        Xc = _center_columns(X)
        return _u_center(Xc @ Xc.T)
    return center_gram(rbf_gram(X, threshold, bandwidth))


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    return kind


def cka_matrix(
    Xs: Sequence[np.ndarray],
    Ys: Sequence[np.ndarray] | None = None,
    kind: str = "linear",
    *,
    threshold: float = 0.5,
    bandwidth: str = "kornblith",
) -> np.ndarray:
    """CKA between every pair of layers: ``out[a, b] = CKA(Xs[a], Ys[b])``.

    ``Xs`` and ``Ys`` are sequences of ``n x d_l`` arrays over the same ``n`` examples
    (``d_l`` may vary by layer). ``Ys=None`` compares ``Xs`` with itself (the result is then
    symmetric and only one triangle is computed). ``kind`` is ``"linear"`` (biased linear
    CKA, as :func:`linear_cka`), ``"debiased"`` (as :func:`debiased_linear_cka`) or
    ``"rbf"`` (as :func:`rbf_cka`, using ``threshold`` and ``bandwidth``).

    Each layer's centred (``"debiased"``: U-centred) ``n x n`` Gram matrix is computed once,
    so the pairwise work is one ``n²`` inner product per pair; memory is
    ``(len(Xs) + len(Ys)) · n²`` floats. Returns a float64 array of shape
    ``(len(Xs), len(Ys))``; entries are ``nan`` where a layer is constant.
    """
    return cka_layers(Xs, Ys, kind, threshold=threshold, bandwidth=bandwidth).matrix


# --------------------------------------------------------------------------- statistics


def permutation_indices(n: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """``(permutations, n)`` random permutations of ``range(n)`` (one per row)."""
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0; got {permutations}")
    out = np.empty((int(permutations), int(n)), dtype=np.intp)
    for k in range(int(permutations)):
        out[k] = rng.permutation(n)
    return out


def cluster_bootstrap_weights(
    groups: Sequence, resamples: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Example weights of ``resamples`` cluster-bootstrap draws: ``(resamples, n)`` floats.

    Each draw picks as many clusters as there are, uniformly with replacement; an example's
    weight is how often its cluster was drawn (0 = left out). ``None`` when there are fewer
    than two clusters (resampling one cluster gives no spread) or ``resamples`` is 0.
    """
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0; got {resamples}")
    labels, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    if resamples == 0 or len(labels) < 2:
        return None
    draws = rng.integers(0, len(labels), size=(int(resamples), len(labels)))
    counts = np.stack([np.bincount(row, minlength=len(labels)) for row in draws])
    return counts[:, codes].astype(np.float64)


def _weighted_center(K: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``K - m1ᵀ - 1mᵀ + μ`` with ``m = Kw / Σw``, ``μ = wᵀm / Σw`` (weighted double centring)."""
    m = K @ w / w.sum()
    mu = float(w @ m) / w.sum()
    return K - m[:, None] - m[None, :] + mu


def _weighted_biased(K: np.ndarray, L: np.ndarray, w: np.ndarray) -> float:
    Kc = _weighted_center(K, w)
    Lc = _weighted_center(L, w)
    return _cosine(float(w @ (Kc * Lc) @ w), float(w @ (Kc * Kc) @ w), float(w @ (Lc * Lc) @ w))


def _hsic_w(Kt, Lt, Kw, Lw, w, powers) -> float:
    """Weighted unbiased HSIC from zero-diagonal ``Kt``, ``Lt`` and ``Kw = Kt @ [w, w²]``."""
    p1, p2, p3, p4 = powers
    w2, w3 = w * w, w * w * w
    a, a2 = Kw[:, 0], Kw[:, 1]
    b, b2 = Lw[:, 0], Lw[:, 1]
    M = Kt * Lt
    Mw = M @ np.stack([w, w2, w3], axis=1)
    wMw, w2Mw, w3Mw = float(w @ Mw[:, 0]), float(w2 @ Mw[:, 0]), float(w3 @ Mw[:, 0])
    w2Mw2, wMw3 = float(w2 @ Mw[:, 1]), float(w @ Mw[:, 2])
    wab, w2ab = float(np.sum(w * a * b)), float(np.sum(w2 * a * b))
    # Σ over distinct (i, j, q, r) of w_i w_j w_q w_r times k_ij l_ij, k_ij l_qr, k_ij l_iq:
    s_a = (p1 * p1 - p2) * wMw - 4.0 * p1 * w2Mw + 4.0 * w3Mw + 2.0 * w2Mw2
    s_b = float(w @ a) * float(w @ b) - 4.0 * (w2ab - w2Mw2) - 2.0 * w2Mw2
    f_www = wab - float(w @ Mw[:, 1])
    f_w2ww = w2ab - w2Mw2
    f_ww2w = float(np.sum(w * a2 * b)) - wMw3
    f_www2 = float(np.sum(w * a * b2)) - wMw3
    s_c = p1 * f_www - f_w2ww - f_ww2w - f_www2
    tuples = p1**4 - 6.0 * p1 * p1 * p2 + 3.0 * p2 * p2 + 8.0 * p1 * p3 - 6.0 * p4
    if tuples <= 0.0:
        return float("nan")
    return (s_a + s_b - 2.0 * s_c) / tuples


def _zero_diag(K: np.ndarray) -> np.ndarray:
    Kt = K.copy()
    np.fill_diagonal(Kt, 0.0)
    return Kt


def _check_weights(w, n: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {n} finite non-negative numbers; got shape {w.shape}")
    return w


def hsic_unbiased_weighted(K, L, w) -> float:
    """Unbiased HSIC of examples with weights ``w`` (multiplicities of a resample).

    Song et al. 2012's estimator is the U-statistic over 4-tuples of distinct examples of
    ``k_ij l_ij + k_ij l_qr - 2 k_ij l_iq``; here each tuple counts ``w_i w_j w_q w_r``
    times and the sum is divided by the total weight of the tuples,
    ``p1⁴ - 6p1²p2 + 3p2² + 8p1p3 - 6p4`` (``p_k = Σ w_i^k``). Computed in ``O(n²)`` by
    inclusion-exclusion (module docstring). Unit weights give :func:`hsic_unbiased`; for
    integer weights it is the U-statistic of the expanded sample without the tuples that
    hold two copies of one example. Examples of weight 0 are left out; ``nan`` with fewer
    than 4 examples of positive weight.
    """
    K, L = _check_gram_pair(K, L)
    w = _check_weights(w, K.shape[0])
    keep = np.flatnonzero(w > 0)
    if len(keep) < 4:
        return float("nan")
    w = w[keep]
    Kt, Lt = _zero_diag(K[np.ix_(keep, keep)]), _zero_diag(L[np.ix_(keep, keep)])
    ws = np.stack([w, w * w], axis=1)
    powers = tuple(float(np.sum(w**k)) for k in (1, 2, 3, 4))
    return _hsic_w(Kt, Lt, Kt @ ws, Lt @ ws, w, powers)


def _weighted_debiased(K: np.ndarray, L: np.ndarray, w: np.ndarray) -> float:
    if len(w) < 4:
        return float("nan")
    Kt, Lt = _zero_diag(K), _zero_diag(L)
    ws = np.stack([w, w * w], axis=1)
    Kw, Lw = Kt @ ws, Lt @ ws
    powers = tuple(float(np.sum(w**k)) for k in (1, 2, 3, 4))
    kl = _hsic_w(Kt, Lt, Kw, Lw, w, powers)
    kk = _hsic_w(Kt, Kt, Kw, Kw, w, powers)
    ll = _hsic_w(Lt, Lt, Lw, Lw, w, powers)
    return _cosine(kl, kk, ll)


def weighted_cka_gram(K, L, w, debiased: bool = False) -> float:
    """CKA of two Gram matrices over examples with weights ``w`` (a resample's multiplicities).

    ``debiased=False``: biased CKA of the expanded sample (each example repeated ``w_i``
    times), computed with weighted centring and weighted Frobenius products; equals
    :func:`linear_cka_gram` of the repeated Grams. ``debiased=True``: the cosine of
    :func:`hsic_unbiased_weighted`, so no pair of copies of one example is ever formed.
    Unit weights give :func:`linear_cka_gram` and :func:`debiased_cka_gram`. Examples of
    weight 0 are left out.
    """
    K, L = _check_gram_pair(K, L)
    w = _check_weights(w, K.shape[0])
    keep = np.flatnonzero(w > 0)
    K, L, w = K[np.ix_(keep, keep)], L[np.ix_(keep, keep)], w[keep]
    if debiased:
        return _weighted_debiased(K, L, w)
    if len(keep) < 2:
        return float("nan")
    return _weighted_biased(K, L, w)


def _null_samples(Gx: np.ndarray, Gy: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """``CKA(Gx, Gy[p][:, p])`` for every row ``p`` of ``perms`` (prepared, centred Grams)."""
    nx, ny = float(np.vdot(Gx, Gx)), float(np.vdot(Gy, Gy))
    out = np.empty(len(perms), dtype=np.float64)
    for k, p in enumerate(perms):
        out[k] = _cosine(float(np.vdot(Gx, Gy[np.ix_(p, p)])), nx, ny)
    return out


def _bootstrap_samples(Gx: np.ndarray, Gy: np.ndarray, weights: np.ndarray, kind: str):
    """CKA of prepared Grams under each row of cluster weights (``weights``: resamples x n).

    Each distinct row is computed once: with few clusters most draws repeat (two speakers
    give three distinct resamples)."""
    unique, inverse = np.unique(weights, axis=0, return_inverse=True)
    out = np.empty(len(unique), dtype=np.float64)
    for k, w in enumerate(unique):
        keep = np.flatnonzero(w > 0)
        K, L, wk = Gx[np.ix_(keep, keep)], Gy[np.ix_(keep, keep)], w[keep]
        out[k] = _weighted_debiased(K, L, wk) if kind == "debiased" else _weighted_biased(K, L, wk)
    return out[np.ravel(inverse)]


@dataclass
class LayerCKA:
    """:func:`cka_layers`' result: the all-pairs matrix and the diagonal's statistics.

    ``null`` is ``(n_diag, permutations)``, ``bootstrap`` ``(n_diag, resamples)``, for the
    pairs ``(a, a)``, ``a < min(len(Xs), len(Ys))``; ``None`` where not asked for.
    """

    matrix: np.ndarray
    null: np.ndarray | None = None
    bootstrap: np.ndarray | None = None

    @property
    def diagonal(self) -> np.ndarray:
        return np.diagonal(self.matrix).copy()

    def summary(self) -> dict[str, np.ndarray]:
        """Per diagonal pair: ``null_mean``, ``null_q95`` (95th percentile of the null),
        ``ci_low``, ``ci_high`` (2.5 and 97.5 percentiles of the bootstrap); ``nan`` where
        not computed or undefined."""
        n = min(self.matrix.shape)
        null = self.null if self.null is not None else np.empty((n, 0))
        boot = self.bootstrap if self.bootstrap is not None else np.empty((n, 0))
        return {
            "null_mean": np.array([_finite_stat(row, np.mean) for row in null]),
            "null_q95": np.array([_finite_stat(row, np.quantile, 0.95) for row in null]),
            "ci_low": np.array([_finite_stat(row, np.quantile, 0.025) for row in boot]),
            "ci_high": np.array([_finite_stat(row, np.quantile, 0.975) for row in boot]),
        }


def _finite_stat(values: np.ndarray, fn, *args) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values, *args)) if len(values) else float("nan")


def cka_layers(
    Xs: Sequence[np.ndarray],
    Ys: Sequence[np.ndarray] | None = None,
    kind: str = "linear",
    *,
    threshold: float = 0.5,
    bandwidth: str = "kornblith",
    perms: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> LayerCKA:
    """:func:`cka_matrix`, and for the layer-by-layer pairs ``(a, a)`` a permutation null and
    a cluster bootstrap, all from each layer's prepared Gram computed once.

    ``perms`` (``permutations x n``, :func:`permutation_indices`): the null of pair
    ``(a, a)`` is CKA of ``Xs[a]`` with ``Ys[a]``'s rows permuted, as ``<K̄, L̄[p][:, p]>``.
    ``weights`` (``resamples x n``, :func:`cluster_bootstrap_weights`): CKA of each
    resample, weighted (:func:`weighted_cka_gram`). Passing the same ``perms`` and
    ``weights`` to every kind and layer makes their statistics paired. Module docstring:
    why these are valid on prepared (centred, U-centred) Grams.
    """
    kind = _check_kind(kind)
    threshold = _check_threshold(threshold)
    bandwidth = _check_bandwidth(bandwidth)
    same = Ys is None
    Xs = list(Xs)
    Ys = Xs if same else list(Ys)
    if len(Xs) == 0 or len(Ys) == 0:
        raise ValueError("Xs and Ys must each contain at least one representation")
    ns = {np.shape(X)[0] if np.ndim(X) >= 1 else None for X in [*Xs, *Ys]}
    if len(ns) != 1:
        raise ValueError(
            "all representations must have the same number of examples (rows); "
            f"got row counts {sorted(ns, key=str)}"
        )
    (n,) = ns
    for name, extra in (("perms", perms), ("weights", weights)):
        if extra is not None and (np.ndim(extra) != 2 or np.shape(extra)[1] != n):
            raise ValueError(f"{name} must be (draws x {n}); got shape {np.shape(extra)}")
    gx = [_prepare(X, kind, threshold, bandwidth, f"Xs[{a}]") for a, X in enumerate(Xs)]
    gy = (
        gx
        if same
        else [_prepare(Y, kind, threshold, bandwidth, f"Ys[{b}]") for b, Y in enumerate(Ys)]
    )
    nx = [float(np.vdot(G, G)) for G in gx]
    ny = nx if same else [float(np.vdot(G, G)) for G in gy]
    out = np.empty((len(gx), len(gy)), dtype=np.float64)
    for a, Ga in enumerate(gx):
        for b, Gb in enumerate(gy):
            if same and b < a:
                out[a, b] = out[b, a]
                continue
            out[a, b] = _cosine(float(np.vdot(Ga, Gb)), nx[a], ny[b])
    n_diag = min(len(gx), len(gy))
    null = boot = None
    if perms is not None:
        perms = np.asarray(perms, dtype=np.intp)
        null = np.stack([_null_samples(gx[a], gy[a], perms) for a in range(n_diag)])
    if weights is not None:
        weights = _check_weights_matrix(weights)
        boot = np.stack([_bootstrap_samples(gx[a], gy[a], weights, kind) for a in range(n_diag)])
    return LayerCKA(out, null, boot)


def _check_weights_matrix(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite and non-negative")
    return weights


def cka_permutation_null(
    X,
    Y,
    kind: str = "linear",
    permutations: int = 200,
    rng: np.random.Generator | int | None = None,
    *,
    threshold: float = 0.5,
    bandwidth: str = "kornblith",
) -> np.ndarray:
    """Permutation null of ``CKA(X, Y)``: ``permutations`` values of CKA of ``X`` with ``Y``'s
    rows shuffled (which breaks the pairing of examples).

    Each representation's prepared Gram is computed once and permuted (``L̄[p][:, p]``):
    centring, U-centring and the median bandwidth commute with permutations, so this is
    exactly CKA recomputed on ``Y[p]``. Compare the observed value with e.g. the 95th
    percentile (``np.quantile(null, 0.95)``); the permutation p-value is
    ``(1 + #{null >= observed}) / (1 + permutations)``.
    """
    X, Y = _check_pair(X, Y)
    rng = np.random.default_rng(rng)
    perms = permutation_indices(X.shape[0], permutations, rng)
    result = cka_layers([X], [Y], kind, threshold=threshold, bandwidth=bandwidth, perms=perms)
    return result.null[0]


def cka_cluster_bootstrap(
    X,
    Y,
    groups: Sequence,
    kind: str = "linear",
    resamples: int = 200,
    rng: np.random.Generator | int | None = None,
    *,
    threshold: float = 0.5,
    bandwidth: str = "kornblith",
) -> np.ndarray:
    """Cluster-bootstrap values of ``CKA(X, Y)``: ``groups`` (one label per row, e.g. the
    speaker) are drawn with replacement and CKA recomputed on the drawn groups' rows with
    multiplicity (:func:`weighted_cka_gram`; module docstring). Empty with fewer than two
    groups. ``np.quantile(values, [0.025, 0.975])`` is the 95 % percentile band.
    """
    X, Y = _check_pair(X, Y)
    if len(groups) != X.shape[0]:
        raise ValueError(f"groups must have one label per row ({X.shape[0]}); got {len(groups)}")
    weights = cluster_bootstrap_weights(groups, resamples, np.random.default_rng(rng))
    if weights is None:
        return np.empty(0)
    result = cka_layers([X], [Y], kind, threshold=threshold, bandwidth=bandwidth, weights=weights)
    return result.bootstrap[0]
