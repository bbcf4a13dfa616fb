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
* RBF CKA (Kornblith et al. 2019, §4): ``K_ij = exp(-‖x_i - x_j‖² / (2σ²))`` with
  ``σ = threshold x median_{i<j} ‖x_i - x_j‖`` chosen per representation, then biased CKA.
  (Kornblith's reference code takes the median of squared distances over the full
  matrix, diagonal zeros included; here the median runs over distinct pairs only.)

Degenerate inputs: if a representation is constant across examples its centred Gram
matrix is zero and CKA is undefined; the functions then return ``nan`` rather than
raising, so a dead layer does not abort a whole layer-by-layer matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "center_gram",
    "cka_matrix",
    "debiased_cka_gram",
    "debiased_linear_cka",
    "hsic_unbiased",
    "linear_cka",
    "linear_cka_gram",
    "rbf_cka",
    "rbf_gram",
]

_KINDS = ("linear", "debiased", "rbf")


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


def rbf_gram(X, threshold: float = 0.5) -> np.ndarray:
    """RBF Gram matrix ``exp(-‖x_i - x_j‖² / (2σ²))``, ``σ = threshold x median distance``.

    The median is over the ``n(n-1)/2`` distinct pairs (Kornblith et al. 2019, §4). If that
    median is zero the ``σ → 0`` limit is used: ``K_ij = 1`` where ``x_i = x_j``, else 0.
    """
    X = _as_rep(X)
    threshold = _check_threshold(threshold)
    Xc = _center_columns(X)  # distances are translation invariant; centring helps accuracy
    sq_norms = np.einsum("ij,ij->i", Xc, Xc)
    sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (Xc @ Xc.T)
    np.maximum(sq_dist, 0.0, out=sq_dist)
    np.fill_diagonal(sq_dist, 0.0)
    iu = np.triu_indices(X.shape[0], k=1)
    median_dist = float(np.median(np.sqrt(sq_dist[iu])))
    sigma = threshold * median_dist
    if sigma <= 0.0:
        return (sq_dist == 0.0).astype(np.float64)
    return np.exp(-sq_dist / (2.0 * sigma * sigma))


def rbf_cka(X, Y, threshold: float = 0.5) -> float:
    """RBF-kernel CKA (Kornblith et al. 2019, §4) between ``X`` (n x d1) and ``Y`` (n x d2).

    Each representation gets its own bandwidth ``σ = threshold x`` (median pairwise
    Euclidean distance); the biased CKA of the two RBF Grams is returned, in ``[0, 1]``.
    """
    X, Y = _check_pair(X, Y)
    return linear_cka_gram(rbf_gram(X, threshold), rbf_gram(Y, threshold))


# --------------------------------------------------------------------------- all pairs


def _prepare(X, kind: str, threshold: float, name: str) -> np.ndarray:
    """Per-layer centred Gram whose Frobenius inner products give the kind's HSIC."""
    X = _as_rep(X, name)
    if kind == "linear":
        Xc = _center_columns(X)
        return Xc @ Xc.T  # already doubly centred
    if kind == "debiased":
        _require_n4(X.shape[0])
        Xc = _center_columns(X)
        return _u_center(Xc @ Xc.T)
    return center_gram(rbf_gram(X, threshold))


def cka_matrix(
    Xs: Sequence[np.ndarray],
    Ys: Sequence[np.ndarray] | None = None,
    kind: str = "linear",
    *,
    threshold: float = 0.5,
) -> np.ndarray:
    """CKA between every pair of layers: ``out[a, b] = CKA(Xs[a], Ys[b])``.

    ``Xs`` and ``Ys`` are sequences of ``n x d_l`` arrays over the same ``n`` examples
    (``d_l`` may vary by layer). ``Ys=None`` compares ``Xs`` with itself (the result is then
    symmetric and only one triangle is computed). ``kind`` is ``"linear"`` (biased linear
    CKA, as :func:`linear_cka`), ``"debiased"`` (as :func:`debiased_linear_cka`) or
    ``"rbf"`` (as :func:`rbf_cka`, using ``threshold``).

    Each layer's centred (``"debiased"``: U-centred) ``n x n`` Gram matrix is computed once,
    so the pairwise work is one ``n²`` inner product per pair; memory is
    ``(len(Xs) + len(Ys)) · n²`` floats. Returns a float64 array of shape
    ``(len(Xs), len(Ys))``; entries are ``nan`` where a layer is constant.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
    threshold = _check_threshold(threshold)
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
    gx = [_prepare(X, kind, threshold, f"Xs[{a}]") for a, X in enumerate(Xs)]
    gy = gx if same else [_prepare(Y, kind, threshold, f"Ys[{b}]") for b, Y in enumerate(Ys)]
    nx = [float(np.vdot(G, G)) for G in gx]
    ny = nx if same else [float(np.vdot(G, G)) for G in gy]
    out = np.empty((len(gx), len(gy)), dtype=np.float64)
    for a, Ga in enumerate(gx):
        for b, Gb in enumerate(gy):
            if same and b < a:
                out[a, b] = out[b, a]
                continue
            out[a, b] = _cosine(float(np.vdot(Ga, Gb)), nx[a], ny[b])
    return out
