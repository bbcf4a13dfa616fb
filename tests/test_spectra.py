"""Known answers of serlens.analysis.spectra."""

import numpy as np
import pytest

from serlens.analysis.spectra import (
    effective_rank,
    energy_rank,
    intruder_dimensions,
    lora_delta,
    stable_rank,
    subspace_similarity,
    uncentred_and_centred_singular_values,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _sv(M):
    return np.linalg.svd(M, compute_uv=False)


# --------------------------------------------------------------------------- effective rank


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_effective_rank_identity(n):
    assert effective_rank(_sv(np.eye(n))) == pytest.approx(n, rel=1e-12)


def test_effective_rank_rank_one():
    rng = _rng(0)
    M = np.outer(rng.standard_normal(20), rng.standard_normal(15))
    s = _sv(M)
    s[1:] = 0.0  # drop round-off-level singular values
    assert effective_rank(s) == pytest.approx(1.0, abs=1e-12)


def test_effective_rank_known_values():
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, erank = 2**1.5; zeros are ignored.
    assert effective_rank([2.0, 1.0, 1.0, 0.0, 0.0]) == pytest.approx(2**1.5, rel=1e-12)
    assert effective_rank([3.0, 3.0, 3.0]) == pytest.approx(3.0, rel=1e-12)
    assert effective_rank(np.zeros(4)) == 0.0
    assert effective_rank(np.array([5.0, 1e-3])) < effective_rank(np.array([5.0, 4.0])) < 2.0


def test_effective_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank([1.0, -0.1])
    with pytest.raises(ValueError, match="1-D"):
        effective_rank(np.eye(3))


# --------------------------------------------------------------------------- stable rank


@pytest.mark.parametrize("n", [1, 5, 40])
def test_stable_rank_orthogonal(n):
    assert stable_rank(_orthogonal(n, _rng(n))) == pytest.approx(n, rel=1e-10)


def test_stable_rank_known_values():
    assert stable_rank(np.diag([3.0, 4.0])) == pytest.approx(25.0 / 16.0)
    rng = _rng(1)
    assert stable_rank(np.outer(rng.standard_normal(9), rng.standard_normal(4))) == pytest.approx(
        1.0
    )
    assert stable_rank(np.zeros((3, 5))) == 0.0
    M = rng.standard_normal((30, 20))
    assert 1.0 <= stable_rank(M) <= np.linalg.matrix_rank(M)
    with pytest.raises(ValueError, match="2-D"):
        stable_rank(np.ones(3))


# --------------------------------------------------------------------------- energy rank


def test_energy_rank_known_cases():
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.5) == 2
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.51) == 3
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 1.0) == 4
    # energies 9, 16 -> sorted 16, 9 of 25: 64% then 100%.
    assert energy_rank([3.0, 4.0], 0.64) == 1
    assert energy_rank([3.0, 4.0], 0.65) == 2
    assert energy_rank([3.0, 4.0]) == 2
    assert energy_rank([10.0, 0.0, 0.0], 0.99) == 1
    assert energy_rank(_sv(np.eye(10)), 0.9) == 9
    assert energy_rank(np.zeros(5)) == 0


def test_energy_rank_order_independent_and_validates():
    s = np.array([0.1, 5.0, 2.0, 1.0])
    assert energy_rank(s, 0.9) == energy_rank(np.sort(s)[::-1], 0.9) == 2
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(s, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(s, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        energy_rank([1.0, -1.0])


# --------------------------------------------------------------------------- subspace similarity


def test_subspace_similarity_self_and_row_space():
    rng = _rng(2)
    r, d = 8, 256
    A = rng.standard_normal((r, d))
    assert subspace_similarity(A, A, r, r) == pytest.approx(1.0, abs=1e-10)
    G = rng.standard_normal((r, r)) + 3.0 * np.eye(r)  # invertible, non-orthogonal
    assert abs(np.linalg.det(G)) > 1e-3
    assert subspace_similarity(A, G @ A, r, r) == pytest.approx(1.0, abs=1e-10)
    # Nested: the top-4 subspace of A lies inside A's whole row space.
    assert subspace_similarity(A, G @ A, 4, r) == pytest.approx(1.0, abs=1e-10)
    for i in (1, 3, 8):
        for j in (1, 5, 8):
            assert 0.0 <= subspace_similarity(A, G @ A, i, j) <= 1.0


def test_subspace_similarity_random_is_small():
    rng = _rng(3)
    r, d = 8, 1024
    values = [
        subspace_similarity(rng.standard_normal((r, d)), rng.standard_normal((r, d)), r, r)
        for _ in range(5)
    ]
    # Expected value is about r / d = 0.008.
    assert max(values) < 0.05


def test_subspace_similarity_known_overlap():
    # A1 spans e0, e1; A2 spans e0, e2 with e0 dominant in both: φ(·,·,2,2) = 1/2, φ(1,1) = 1.
    d = 6
    A1 = np.zeros((2, d))
    A1[0, 0], A1[1, 1] = 5.0, 1.0
    A2 = np.zeros((3, d))
    A2[0, 0], A2[1, 2] = 4.0, 2.0
    assert subspace_similarity(A1, A2, 2, 2) == pytest.approx(0.5, abs=1e-12)
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(A1, A2, 1, 2) == pytest.approx(1.0, abs=1e-12)


def test_subspace_similarity_validation():
    A = np.ones((4, 10))
    with pytest.raises(ValueError, match="d_in"):
        subspace_similarity(A, np.ones((4, 9)), 1, 1)
    with pytest.raises(ValueError, match="exceeds"):
        subspace_similarity(A, A, 5, 1)
    with pytest.raises(ValueError, match=">= 1"):
        subspace_similarity(A, A, 0, 1)
    with pytest.raises(TypeError):
        subspace_similarity(A, A, 1.5, 1)


# --------------------------------------------------------------------------- intruders


def _pretrained(m=128, n=96, seed=4):
    return _rng(seed).standard_normal((m, n)) / np.sqrt(n)


def test_no_intruders_when_unchanged():
    W0 = _pretrained()
    count, cos = intruder_dimensions(W0, W0.copy(), k=10)
    assert count == 0
    assert cos.shape == (10,)
    np.testing.assert_allclose(cos, 1.0, atol=1e-8)


def test_intruder_from_new_orthogonal_direction():
    rng = _rng(5)
    W0 = _pretrained()
    U0, s0, _ = np.linalg.svd(W0, full_matrices=False)
    # A new unit direction orthogonal to W0's top-10 left singular vectors, with a
    # singular value well above s0[0], so it becomes the top singular vector of W.
    u = rng.standard_normal(W0.shape[0])
    u -= U0[:, :10] @ (U0[:, :10].T @ u)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(W0.shape[1])
    v /= np.linalg.norm(v)
    W = W0 + 5.0 * s0[0] * np.outer(u, v)
    count, cos = intruder_dimensions(W0, W, k=10, epsilon=0.5)
    assert count >= 1
    assert cos[0] < 0.5
    assert np.all((cos >= 0.0) & (cos <= 1.0))
    # A small perturbation along W0's own top direction creates no intruder.
    W_small = W0 + 0.1 * s0[0] * np.outer(U0[:, 0], v)
    assert intruder_dimensions(W0, W_small, k=10)[0] == 0


def test_intruder_validation():
    W0 = _pretrained(20, 10)
    with pytest.raises(ValueError, match="same shape"):
        intruder_dimensions(W0, W0.T)
    with pytest.raises(ValueError, match="exceeds"):
        intruder_dimensions(W0, W0, k=11)
    with pytest.raises(ValueError, match="epsilon"):
        intruder_dimensions(W0, W0, epsilon=0.0)


# --------------------------------------------------------------------------- lora delta


def test_lora_delta():
    rng = _rng(6)
    r, d_in, d_out = 4, 7, 5
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))
    delta = lora_delta(A, B, alpha=16, r=r)
    assert delta.shape == (d_out, d_in)
    assert delta.dtype == np.float64
    np.testing.assert_allclose(delta, 4.0 * B @ A, rtol=1e-12)
    assert np.linalg.matrix_rank(delta) == r
    with pytest.raises(ValueError, match="r = 3"):
        lora_delta(A, B, alpha=16, r=3)
    with pytest.raises(ValueError, match="shape"):
        lora_delta(A.T, B, alpha=16, r=r)


# --------------------------------------------------- uncentred and centred spectra of a Gram


@pytest.mark.parametrize(("n", "d"), [(40, 1), (40, 2), (200, 30), (12, 30)])
def test_one_tridiagonalisation_gives_both_spectra(n, d):
    """σ(M) and σ(M − 1μᵀ) from MᵀM, Mᵀ1 and n equal the SVDs of M and of M centred (d > n:
    the extra values are the Gram's zero eigenvalues, up to the round-off of their root)."""
    rng = _rng(3)
    M = rng.standard_normal((n, d)) + 5.0 * rng.standard_normal(d)  # a strong shared offset
    s, s_c = uncentred_and_centred_singular_values(M.T @ M, M.sum(axis=0), n)
    k, k_c = min(n, d), min(n - 1, d)  # centring takes one rank when d >= n
    scale = _sv(M)[0]
    np.testing.assert_allclose(s[:k], _sv(M), atol=1e-11 * scale)
    np.testing.assert_allclose(s_c[:k_c], _sv(M - M.mean(axis=0))[:k_c], atol=1e-9 * scale)
    assert np.all(np.diff(s) <= 0) and np.all(np.diff(s_c) <= 0)
    assert np.all(s[k:] < 1e-6 * scale) and np.all(s_c[k_c:] < 1e-6 * scale)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_both_spectra_when_the_sums_lie_along_the_first_axis(sign):
    """t = ±‖t‖ e₁ (the reflector's degenerate directions): four rows (1, 0, 0) have σ = (2, 0,
    0) and no variation, and an added (0, ±1, ±1) row pattern keeps its own values."""
    M = np.zeros((4, 3))
    M[:, 0] = sign
    s, s_c = uncentred_and_centred_singular_values(M.T @ M, M.sum(axis=0), 4)
    np.testing.assert_allclose(s, [2.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s_c, [0.0, 0.0, 0.0], atol=1e-7)
    M[:, 1] = [1.0, -1.0, 1.0, -1.0]  # column sum 0: centring leaves it
    s, s_c = uncentred_and_centred_singular_values(M.T @ M, M.sum(axis=0), 4)
    np.testing.assert_allclose(s, [2.0, 2.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s_c, [2.0, 0.0, 0.0], atol=1e-7)


def test_zero_sums_leave_the_spectrum_uncentred():
    rng = _rng(4)
    M = rng.standard_normal((10, 4))
    M -= M.mean(axis=0)
    s, s_c = uncentred_and_centred_singular_values(M.T @ M, np.zeros(4), 10)
    np.testing.assert_allclose(s, _sv(M), atol=1e-12)
    np.testing.assert_allclose(s_c, s, atol=1e-12)


def test_gram_spectra_reject_bad_shapes_and_counts():
    with pytest.raises(ValueError, match="n_rows must be positive"):
        uncentred_and_centred_singular_values(np.eye(3), np.ones(3), 0)
    with pytest.raises(ValueError, match="d x d"):
        uncentred_and_centred_singular_values(np.eye(3), np.ones(2), 4)
