"""Spectral summaries of weight matrices and LoRA updates (pure numpy, float64).

Conventions follow PEFT's ``LoraLayer``: for a frozen weight ``W0`` of shape
``d_out x d_in`` the adapter stores ``lora_A`` with shape ``r x d_in`` and ``lora_B`` with
shape ``d_out x r``, and the update is ``ΔW = (alpha / r) · B A`` (Hu et al. 2021, §4.1).

Formulas and sources
--------------------
* Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective
  dimensionality", EUSIPCO): ``erank = exp(H(p))`` with ``p_i = σ_i / ‖σ‖₁`` and
  ``H(p) = -Σ p_i log p_i`` (terms with ``p_i = 0`` contribute 0). Between 1 and the
  number of non-zero singular values.
* Stable (numerical) rank (Rudelson & Vershynin 2007, "Sampling from large matrices: an
  approach through geometric functional analysis", J. ACM): ``‖M‖²_F / ‖M‖²₂ =
  Σ σ_i² / σ₁²``.
* Energy rank: the smallest ``k`` with ``Σ_{i<=k} σ_i² >= fraction · Σ_i σ_i²``
  (singular values sorted in decreasing order), i.e. the rank of the best approximation
  keeping that fraction of the squared Frobenius norm (Eckart & Young 1936).
* Subspace similarity (Hu et al. 2021, "LoRA: Low-rank adaptation of large language
  models", ICLR 2022, §7.2, eq. 4): with ``U_A1^i`` the top-``i`` right-singular vectors of
  ``A1`` and ``U_A2^j`` the top-``j`` of ``A2`` (as ``d_in x i`` and ``d_in x j``
  orthonormal columns)::

      φ(A1, A2, i, j) = ‖U_A1^iᵀ U_A2^j‖²_F / min(i, j)   ∈ [0, 1]

* Spectra of a Gram and of its centred form with one reduction
  (:func:`uncentred_and_centred_singular_values`): for ``M`` (``n x d``) with column sums
  ``t = Mᵀ1``, centring the columns is a rank-one change of the Gram,
  ``(M - 1 tᵀ/n)ᵀ(M - 1 tᵀ/n) = MᵀM - t tᵀ/n``. A Householder reflector ``P`` with
  ``P e₁ = ±t/‖t‖`` (Golub & Van Loan, *Matrix Computations*, 4th ed., §5.1.2) moves that
  change into entry (1, 1): ``P (MᵀM - t tᵀ/n) P = P MᵀM P - (‖t‖²/n) e₁e₁ᵀ``. Householder
  tridiagonalisation that leaves ``e₁`` fixed (``P MᵀM P = Q T Qᵀ`` with ``Q e₁ = e₁``,
  §8.3.1; LAPACK ``dsytrd`` on the lower triangle) then gives both spectra, ``T``'s and
  ``T - (‖t‖²/n) e₁e₁ᵀ``'s, tridiagonal eigenvalue problems of O(d²) (``dsterf``), for one
  O(d³) reduction where two eigenproblems take two.
* Intruder dimensions (Shuttleworth, Andreas, Torralba & Sharma 2024, "LoRA vs full
  fine-tuning: an illusion of equivalence", arXiv:2410.21228, Def. 1): a left singular
  vector ``y_j`` among the top ``k`` of the fine-tuned ``W`` is an intruder if
  ``max_i |cos(y_j, x_i)| < ε`` over all left singular vectors ``x_i`` of the pre-trained
  ``W0``.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "uncentred_and_centred_singular_values",
    "effective_rank",
    "energy_rank",
    "intruder_dimensions",
    "lora_delta",
    "stable_rank",
    "subspace_similarity",
]


def _as_singular_values(s) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(
            f"expected a 1-D array of singular values; got shape {s.shape} "
            "(pass np.linalg.svd(M, compute_uv=False) for a matrix)"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values contain NaN or infinite values")
    if np.any(s < 0):
        raise ValueError("singular values must be non-negative")
    return s


def _as_matrix(M, name: str) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix; got shape {M.shape}")
    if M.size == 0:
        raise ValueError(f"{name} must be non-empty; got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return M


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


def effective_rank(s) -> float:
    """Effective rank of Roy & Vetterli 2007: ``exp(-Σ p_i log p_i)``, ``p = s / ‖s‖₁``.

    ``s`` is a 1-D array of singular values (any order); zeros are ignored and negative
    values raise ``ValueError``. ``n`` equal non-zero values give ``n``; a single non-zero
    value gives 1; an all-zero (or empty) array gives 0.
    """
    s = _as_singular_values(s)
    total = s.sum()
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    entropy = -float(np.sum(p * np.log(p)))
    return float(np.exp(entropy))


def stable_rank(M) -> float:
    """Stable rank ``‖M‖²_F / σ₁(M)²`` of a 2-D matrix; 0 for the zero matrix.

    Lies in ``[1, rank(M)]`` for non-zero ``M``; equals ``n`` for an ``n x n`` orthogonal
    matrix.
    """
    M = _as_matrix(M, "M")
    sigma1 = float(np.linalg.norm(M, ord=2))
    if sigma1 == 0.0:
        return 0.0
    fro2 = float(np.vdot(M, M))
    return fro2 / (sigma1 * sigma1)


def energy_rank(s, fraction: float = 0.9) -> int:
    """Smallest ``k`` with ``Σ_{i<=k} s_i² >= fraction · Σ_i s_i²`` (``s`` sorted descending).

    ``s`` is a 1-D array of non-negative singular values in any order; ``fraction`` is in
    ``(0, 1]``. Returns 0 for an all-zero (or empty) array. A relative slack of 1e-12 on the
    target guards against round-off (e.g. ``s = [1, 1, 1, 1]``, ``fraction = 0.5`` gives 2).
    """
    s = _as_singular_values(s)
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    energy = np.cumsum(np.sort(s)[::-1] ** 2)
    if energy.size == 0 or energy[-1] <= 0.0:
        return 0
    target = fraction * energy[-1] * (1.0 - 1e-12)
    k = int(np.searchsorted(energy, target, side="left")) + 1
    return min(k, int(energy.size))


_DSYTRD_LWORK: dict[int, int] = {}


def uncentred_and_centred_singular_values(
    gram, total, n_rows: float
) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of ``M`` and of ``M - 1 μᵀ`` (``μ = t / n`` the mean row), descending,
    from the Gram ``G = MᵀM`` (``d x d``), the column sums ``t = Mᵀ1`` and the row count ``n``,
    with one tridiagonalisation (module docstring): ``P G P = Q T Qᵀ`` with ``Q e₁ = e₁``, and
    the centred Gram ``G - t tᵀ/n`` is ``P Q (T - (‖t‖²/n) e₁e₁ᵀ) Qᵀ P``.

    Eigenvalues that round-off pushes below zero are clipped to 0.
    Runs in the BLAS threads of the caller's ``threadpoolctl`` limits (scipy's LAPACK).
    """
    from scipy.linalg import blas, eigvalsh_tridiagonal, lapack

    G = np.asarray(gram, dtype=np.float64)
    t = np.asarray(total, dtype=np.float64).reshape(-1)
    d = G.shape[0]
    if G.shape != (d, d) or t.shape != (d,):
        raise ValueError(f"gram must be d x d and total of length d; got {G.shape} and {t.shape}")
    n_rows = float(n_rows)
    if not n_rows > 0:
        raise ValueError(f"n_rows must be positive; got {n_rows}")
    # Only one triangle is read (LAPACK's lower triangle of the column-major copy), as
    # eigvalsh reads one; a Gram's two triangles differ by round-off only.
    # (a row-major Gram's transpose is column-major: a plain copy, no reordering)
    A = np.array(G.T if G.flags.c_contiguous else G, order="F", copy=True)
    norm_t = float(np.linalg.norm(t))
    shift = norm_t * norm_t / n_rows
    if norm_t > 0.0:
        # v = q ± e₁ with the sign of q₀, so that ‖v‖² >= 2 (no cancellation); P = I - 2vvᵀ/‖v‖²;
        # P A P = A - v uᵀ - u vᵀ with w = A v, u = 2 (w - (vᵀw) v): one symmetric rank-2 update.
        v = t / norm_t
        v[0] += 1.0 if v[0] >= 0.0 else -1.0
        v /= np.linalg.norm(v)
        w = blas.dsymv(1.0, A, v, lower=1)
        u = 2.0 * (w - (v @ w) * v)
        A = blas.dsyr2(-1.0, v, u, a=A, lower=1, overwrite_a=1)
    if d == 1:
        diagonal, off = A.reshape(1).copy(), np.zeros(0)
    else:
        if d not in _DSYTRD_LWORK:
            work, info = lapack.dsytrd_lwork(d, lower=1)
            _DSYTRD_LWORK[d] = max(int(work), 1) if info == 0 else max(d * 32, 1)
        _, diagonal, off, _, info = lapack.dsytrd(A, lower=1, lwork=_DSYTRD_LWORK[d], overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dsytrd failed (info={info}) on a {d} x {d} Gram")
    eig = eigvalsh_tridiagonal(diagonal, off, lapack_driver="sterf")
    centred = diagonal.copy()
    centred[0] -= shift
    eig_c = eigvalsh_tridiagonal(centred, off, lapack_driver="sterf")
    return (
        np.sqrt(np.clip(eig, 0.0, None))[::-1].copy(),
        np.sqrt(np.clip(eig_c, 0.0, None))[::-1].copy(),
    )


def _top_right_singular_vectors(A: np.ndarray, k: int) -> np.ndarray:
    """``d_in x k`` matrix whose columns are the top-``k`` right-singular vectors of ``A``."""
    _, _, vh = np.linalg.svd(A, full_matrices=False)
    return vh[:k].T


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """Normalised subspace similarity φ of Hu et al. 2021 (LoRA paper, §7.2, eq. 4).

    ``A1`` (``r1 x d_in``) and ``A2`` (``r2 x d_in``) are LoRA ``A`` matrices as PEFT stores
    them. With ``U_i`` the top-``i`` right-singular vectors of ``A1`` and ``V_j`` the top-``j``
    of ``A2`` (rows of ``Vᵀ`` from the SVD, as ``d_in x i`` / ``d_in x j`` columns)::

        φ = ‖U_iᵀ V_j‖²_F / min(i, j)      ∈ [0, 1]

    1 means one subspace contains the other; for independent random subspaces in high
    ``d_in`` it is about ``max(i, j) / d_in``. Requires ``1 <= i <= min(r1, d_in)`` and
    ``1 <= j <= min(r2, d_in)``. Singular vectors beyond ``rank(A)`` are arbitrary, so ask
    only for ``i``, ``j`` up to the ranks.
    """
    A1 = _as_matrix(A1, "A1")
    A2 = _as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 and A2 must share d_in (columns); got A1 {A1.shape} and A2 {A2.shape}"
        )
    i = _positive_int(i, "i")
    j = _positive_int(j, "j")
    if i > min(A1.shape):
        raise ValueError(f"i = {i} exceeds min(r1, d_in) = {min(A1.shape)} for A1 {A1.shape}")
    if j > min(A2.shape):
        raise ValueError(f"j = {j} exceeds min(r2, d_in) = {min(A2.shape)} for A2 {A2.shape}")
    U = _top_right_singular_vectors(A1, i)
    V = _top_right_singular_vectors(A2, j)
    overlap = U.T @ V
    phi = float(np.vdot(overlap, overlap)) / min(i, j)
    return float(np.clip(phi, 0.0, 1.0))


def intruder_dimensions(W0, W, k: int = 10, epsilon: float = 0.5) -> tuple[int, np.ndarray]:
    """Intruder dimensions of Shuttleworth et al. 2024 ("LoRA vs full fine-tuning").

    For each of the top-``k`` left singular vectors ``y_j`` of the fine-tuned ``W``, compute
    ``c_j = max_i |cos(y_j, x_i)|`` over all ``min(d_out, d_in)`` left singular vectors
    ``x_i`` of the pre-trained ``W0`` (same shape as ``W``). ``y_j`` is an intruder
    dimension when ``c_j < epsilon``.

    Returns ``(count, c)`` with ``count`` the number of intruders and ``c`` the float64
    array of the ``k`` maximum cosines, ordered like the singular values of ``W``.
    ``count`` is 0 when ``W == W0`` (every ``c_j`` is then 1 up to round-off, provided the
    top singular values are distinct).
    """
    W0 = _as_matrix(W0, "W0")
    W = _as_matrix(W, "W")
    if W0.shape != W.shape:
        raise ValueError(f"W0 and W must have the same shape; got {W0.shape} and {W.shape}")
    k = _positive_int(k, "k")
    if k > min(W.shape):
        raise ValueError(f"k = {k} exceeds min(d_out, d_in) = {min(W.shape)}")
    epsilon = float(epsilon)
    if not (0.0 < epsilon <= 1.0):
        raise ValueError(f"epsilon must be in (0, 1]; got {epsilon}")
    U0, _, _ = np.linalg.svd(W0, full_matrices=False)
    U, _, _ = np.linalg.svd(W, full_matrices=False)
    cos = np.abs(U[:, :k].T @ U0)  # k x min(d_out, d_in); columns are unit vectors
    max_cos = np.clip(cos.max(axis=1), 0.0, 1.0)
    return int(np.count_nonzero(max_cos < epsilon)), max_cos


def lora_delta(A, B, alpha: float, r: int) -> np.ndarray:
    """LoRA weight update ``ΔW = (alpha / r) · B @ A`` (Hu et al. 2021, §4.1; PEFT layout).

    ``A`` is ``r x d_in`` (``lora_A.weight``), ``B`` is ``d_out x r`` (``lora_B.weight``).
    Returns a float64 ``d_out x d_in`` array. (For rank-stabilised LoRA, PEFT's
    ``use_rslora=True``, the scale is ``alpha / sqrt(r)`` instead; pass ``alpha`` adjusted
    accordingly.)
    """
    A = _as_matrix(A, "A")
    B = _as_matrix(B, "B")
    r = _positive_int(r, "r")
    if A.shape[0] != r or B.shape[1] != r:
        raise ValueError(
            f"expected A of shape (r, d_in) and B of shape (d_out, r) with r = {r}; "
            f"got A {A.shape} and B {B.shape}"
        )
    alpha = float(alpha)
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite; got {alpha}")
    return (alpha / r) * (B @ A)
