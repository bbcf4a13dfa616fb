"""Known answers and invariances of serlens.analysis.cka."""

import numpy as np
import pytest

from serlens.analysis.cka import (
    _u_center,
    center_gram,
    cka_matrix,
    debiased_cka_gram,
    debiased_linear_cka,
    hsic_unbiased,
    linear_cka,
    linear_cka_gram,
    rbf_cka,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _correlated_pair(n=60, d1=12, d2=9, seed=0):
    """Two representations sharing a latent signal, so CKA is strictly between 0 and 1."""
    rng = _rng(seed)
    Z = rng.standard_normal((n, 5))
    X = Z @ rng.standard_normal((5, d1)) + 0.5 * rng.standard_normal((n, d1))
    Y = Z @ rng.standard_normal((5, d2)) + 0.5 * rng.standard_normal((n, d2))
    return X, Y


LINEARS = [linear_cka, debiased_linear_cka]
ALL = [linear_cka, debiased_linear_cka, rbf_cka]


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("shape", [(50, 8), (10, 40)])
def test_self_similarity_is_one(fn, shape):
    X = _rng(1).standard_normal(shape)
    assert fn(X, X) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", ALL)
def test_symmetric(fn):
    X, Y = _correlated_pair()
    assert fn(X, Y) == pytest.approx(fn(Y, X), abs=1e-12)
    assert 0.05 < fn(X, Y) < 0.99


@pytest.mark.parametrize("fn", LINEARS)
def test_invariances(fn):
    X, Y = _correlated_pair(seed=2)
    rng = _rng(3)
    ref = fn(X, Y)
    Q = _orthogonal(X.shape[1], rng)
    assert fn(X @ Q, Y) == pytest.approx(ref, abs=1e-10)
    assert fn(7.3 * X, 0.01 * Y) == pytest.approx(ref, abs=1e-10)
    shift_x = 100.0 * rng.standard_normal(X.shape[1])
    shift_y = -50.0 * rng.standard_normal(Y.shape[1])
    assert fn(X + shift_x, Y + shift_y) == pytest.approx(ref, abs=1e-10)


def test_rbf_invariances():
    """RBF CKA with a median-heuristic bandwidth is invariant to rotation, scale, shift."""
    X, Y = _correlated_pair(seed=4)
    ref = rbf_cka(X, Y)
    Q = _orthogonal(X.shape[1], _rng(5))
    assert rbf_cka(3.0 * X @ Q + 11.0, Y) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("fn", LINEARS)
def test_not_invariant_to_general_invertible_map(fn):
    rng = _rng(6)
    n, d = 300, 10
    X = rng.standard_normal((n, d))
    # Ill-conditioned, non-orthogonal invertible map (condition number 1e3).
    M = _orthogonal(d, rng) @ np.diag(np.logspace(0, -3, d)) @ _orthogonal(d, rng)
    assert np.linalg.cond(M) == pytest.approx(1e3, rel=1e-6)
    assert fn(X, X @ M) < 0.9


@pytest.mark.parametrize("shape", [(200, 5), (20, 100), (30, 30)])
def test_feature_and_gram_forms_agree(shape):
    """Exercises both branches of linear_cka (feature space for n > d, Gram for n < d)."""
    rng = _rng(7)
    n, d = shape
    Z = rng.standard_normal((n, 3))
    X = Z @ rng.standard_normal((3, d)) + rng.standard_normal((n, d)) + 5.0
    Y = np.tanh(Z @ rng.standard_normal((3, d + 3))) + 0.3 * rng.standard_normal((n, d + 3))
    # Gram form on *uncentred* linear Grams: the H K H centring must handle it.
    via_gram = linear_cka_gram(X @ X.T, Y @ Y.T)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    via_features = np.linalg.norm(Yc.T @ Xc) ** 2 / (
        np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc)
    )
    assert linear_cka(X, Y) == pytest.approx(via_gram, abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(via_features, abs=1e-12)


def test_center_gram_matches_explicit_H():
    rng = _rng(8)
    K = rng.standard_normal((7, 7))
    K = K + K.T
    H = np.eye(7) - np.ones((7, 7)) / 7
    np.testing.assert_allclose(center_gram(K), H @ K @ H, atol=1e-12)


def test_hsic_unbiased_matches_u_centering_and_is_translation_invariant():
    rng = _rng(9)
    X = rng.standard_normal((15, 6))
    Y = X[:, :3] + rng.standard_normal((15, 3))
    K, L = X @ X.T, Y @ Y.T
    n = K.shape[0]
    u_form = np.vdot(_u_center(K), _u_center(L)) / (n * (n - 3))
    assert hsic_unbiased(K, L) == pytest.approx(u_form, rel=1e-10)
    # The estimator itself (no pre-centring of columns) ignores a shift of X.
    Xs = X + 3.0
    assert debiased_cka_gram(Xs @ Xs.T, L) == pytest.approx(debiased_cka_gram(K, L), abs=1e-10)


def test_debiased_removes_small_n_bias():
    """Independent Gaussians with n << d: biased CKA is large, debiased is near 0.

    At n = 20 the debiased estimate is unbiased but noisy (sd about 0.08 over draws,
    checked against Kornblith's reference code), so a single draw can exceed 0.15; the
    test pins the mean over 20 draws and bounds each draw loosely.
    """
    n, d = 20, 500
    biased, debiased = [], []
    for seed in range(20):
        rng = _rng(100 + seed)
        X = rng.standard_normal((n, d))
        Y = rng.standard_normal((n, d))
        biased.append(linear_cka(X, Y))
        debiased.append(debiased_linear_cka(X, Y))
    assert min(biased) > 0.5
    assert abs(np.mean(debiased)) < 0.05
    assert np.median(np.abs(debiased)) < 0.15
    assert max(np.abs(debiased)) < 0.3
    # With more examples the estimate concentrates at 0.
    rng = _rng(99)
    X, Y = rng.standard_normal((200, d)), rng.standard_normal((200, d))
    assert abs(debiased_linear_cka(X, Y)) < 0.05


def test_debiased_matches_reference_implementation():
    """Kornblith et al.'s reference ``center_gram(unbiased=True)`` + cosine, re-typed here."""
    rng = _rng(14)
    X = rng.standard_normal((12, 30))
    Y = X[:, :10] @ rng.standard_normal((10, 4)) + rng.standard_normal((12, 4))

    def ref_center(gram):
        gram = gram.copy()
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
        return gram

    gx, gy = ref_center(X @ X.T), ref_center(Y @ Y.T)
    ref = gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy))
    assert debiased_linear_cka(X, Y) == pytest.approx(ref, abs=1e-12)


def test_rbf_in_unit_interval():
    rng = _rng(10)
    for seed in range(5):
        X = rng.standard_normal((25, 4))
        Y = rng.standard_normal((25, 7)) if seed % 2 else np.sin(X @ rng.standard_normal((4, 3)))
        for threshold in (0.2, 0.5, 1.0, 3.0):
            value = rbf_cka(X, Y, threshold=threshold)
            assert 0.0 <= value <= 1.0 + 1e-12


def test_rbf_large_bandwidth_tends_to_linear():
    """As σ → ∞ the RBF kernel is 1 - ‖x-y‖²/(2σ²) + ..., whose centred part is linear."""
    X, Y = _correlated_pair(seed=11)
    assert rbf_cka(X, Y, threshold=1e3) == pytest.approx(linear_cka(X, Y), abs=1e-5)


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_cka_matrix_matches_pairwise(kind):
    fn = {"linear": linear_cka, "debiased": debiased_linear_cka, "rbf": rbf_cka}[kind]
    rng = _rng(12)
    n = 30
    Z = rng.standard_normal((n, 4))
    Xs = [Z @ rng.standard_normal((4, d)) + rng.standard_normal((n, d)) for d in (5, 50, 8)]
    Ys = [np.tanh(Xs[0]), rng.standard_normal((n, 3))]
    out = cka_matrix(Xs, Ys, kind=kind)
    assert out.shape == (3, 2)
    expected = np.array([[fn(X, Y) for Y in Ys] for X in Xs])
    np.testing.assert_allclose(out, expected, atol=1e-12)
    square = cka_matrix(Xs, kind=kind)
    expected_sq = np.array([[fn(X, Y) for Y in Xs] for X in Xs])
    np.testing.assert_allclose(square, expected_sq, atol=1e-12)
    np.testing.assert_allclose(np.diag(square), 1.0, atol=1e-12)


def test_constant_representation_gives_nan():
    X = _rng(13).standard_normal((10, 3))
    C = np.ones((10, 4))
    assert np.isnan(linear_cka(X, C))
    assert np.isnan(debiased_linear_cka(X, C))
    assert np.isnan(rbf_cka(X, C))
    assert np.isnan(cka_matrix([X, C])[0, 1])


def test_validation_errors():
    X = np.zeros((10, 3))
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(X, np.zeros((9, 3)))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(np.zeros(10), X)
    with pytest.raises(ValueError, match="2-D"):
        rbf_cka(X, np.zeros((10, 3, 2)))
    with pytest.raises(ValueError, match="n >= 4"):
        debiased_linear_cka(np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="n >= 4"):
        cka_matrix([np.eye(3)], kind="debiased")
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(np.full((4, 2), np.nan), np.eye(4))
    with pytest.raises(ValueError, match="square"):
        linear_cka_gram(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="same shape"):
        linear_cka_gram(np.eye(4), np.eye(5))
    with pytest.raises(ValueError, match="kind"):
        cka_matrix([X], kind="cosine")
    with pytest.raises(ValueError, match="same number of examples"):
        cka_matrix([X], [np.zeros((9, 3))])
    with pytest.raises(ValueError, match="threshold"):
        rbf_cka(X, X, threshold=0.0)
