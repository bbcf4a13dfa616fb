"""Known answers and invariances of serlens.analysis.cka."""

import itertools

import numpy as np
import pytest

from serlens.analysis.cka import (
    _u_center,
    center_gram,
    cka_cluster_bootstrap,
    cka_layers,
    cka_matrix,
    cka_permutation_null,
    cluster_bootstrap_weights,
    debiased_cka_gram,
    debiased_linear_cka,
    hsic_unbiased,
    hsic_unbiased_weighted,
    linear_cka,
    linear_cka_gram,
    permutation_indices,
    rbf_cka,
    rbf_gram,
    weighted_cka_gram,
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
    with pytest.raises(ValueError, match="bandwidth"):
        rbf_cka(X, X, bandwidth="mean")
    with pytest.raises(ValueError, match="perms"):
        cka_layers([X], [X], perms=np.zeros((3, 9), dtype=int))
    with pytest.raises(ValueError, match="weights"):
        weighted_cka_gram(np.eye(10), np.eye(10), -np.ones(10))


# --------------------------------------------------------------------------- RBF bandwidth


def _kornblith_example():
    """Kornblith et al.'s colab example: ``np.random.seed(1337); X = randn(100, 10);
    Y = randn(100, 10) + X`` (a RandomState seeded alike draws the same numbers)."""
    state = np.random.RandomState(1337)
    X = state.randn(100, 10)
    Y = state.randn(100, 10) + X
    return X, Y


def _reference_gram_rbf(x, threshold=1.0):
    """Kornblith et al.'s ``gram_rbf``, re-typed: median of ALL squared distances."""
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold**2 * sq_median_distance))


def _reference_distinct_pairs_gram(x, threshold):
    """σ = threshold x median distance over the n(n-1)/2 distinct pairs."""
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    sigma = threshold * np.median(np.sqrt(sq[np.triu_indices(len(x), k=1)]))
    return np.exp(-sq / (2 * sigma**2))


def _reference_center_gram(gram):
    """Kornblith et al.'s ``center_gram(unbiased=False)``."""
    gram = gram.copy()
    means = np.mean(gram, 0, dtype=np.float64)
    means -= np.mean(means) / 2
    gram -= means[:, None]
    gram -= means[None, :]
    return gram


def _reference_cka(gram_x, gram_y):
    """Kornblith et al.'s ``cka``: <Kc, Lc> / (‖Kc‖ ‖Lc‖) of the centred Grams."""
    gram_x, gram_y = _reference_center_gram(gram_x), _reference_center_gram(gram_y)
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


def test_rbf_cka_matches_kornblith_reference_example():
    """Default bandwidth = the reference code's; its example gives 0.6548 (distinct pairs: 0.6540)."""
    X, Y = _kornblith_example()
    reference = _reference_cka(_reference_gram_rbf(X, 0.5), _reference_gram_rbf(Y, 0.5))
    assert rbf_cka(X, Y, threshold=0.5) == pytest.approx(reference, abs=1e-10)
    assert rbf_cka(X, Y, 0.5, "kornblith") == pytest.approx(reference, abs=1e-10)
    assert round(reference, 4) == 0.6548
    distinct = _reference_cka(
        _reference_distinct_pairs_gram(X, 0.5), _reference_distinct_pairs_gram(Y, 0.5)
    )
    assert rbf_cka(X, Y, 0.5, bandwidth="distinct_pairs") == pytest.approx(distinct, abs=1e-10)
    assert round(distinct, 4) == 0.6540
    # The Gram matrix itself, not only the CKA, is the reference's.
    np.testing.assert_allclose(rbf_gram(X, 0.5), _reference_gram_rbf(X, 0.5), atol=1e-10)
    # The linear kinds of the same example (as printed in the colab): 0.5576 and 0.5135.
    assert round(linear_cka(X, Y), 4) == 0.5576
    assert round(debiased_linear_cka(X, Y), 4) == 0.5135


@pytest.mark.parametrize("bandwidth", ["kornblith", "distinct_pairs"])
def test_cka_matrix_rbf_uses_the_bandwidth(bandwidth):
    X, Y = _kornblith_example()
    out = cka_matrix([X], [Y], "rbf", threshold=0.5, bandwidth=bandwidth)
    assert out[0, 0] == pytest.approx(rbf_cka(X, Y, 0.5, bandwidth), abs=1e-12)


# --------------------------------------------------------------------------- permutation null


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_permutation_null_equals_cka_recomputed_on_shuffled_rows(kind):
    """Permuting a prepared Gram (K[p][:, p]) is CKA recomputed from the permuted features:
    centring, U-centring and the median bandwidth commute with permutations."""
    fn = {"linear": linear_cka, "debiased": debiased_linear_cka, "rbf": rbf_cka}[kind]
    X, Y = _correlated_pair(n=30, seed=21)
    null = cka_permutation_null(X, Y, kind, 12, np.random.default_rng(5))
    perms = permutation_indices(30, 12, np.random.default_rng(5))
    expected = [fn(X, Y[p]) for p in perms]
    np.testing.assert_allclose(null, expected, atol=1e-12)
    assert len(cka_permutation_null(X, Y, kind, 0, 0)) == 0


def test_debiased_null_is_centred_at_zero_and_holds_independent_data():
    """Independent Gaussians: the debiased null's mean is ~0 and the observed value lies in
    the null; biased linear CKA's null is far from 0 at n = 60, d = 20."""
    n, d = 60, 20
    for seed in range(5):
        rng = _rng(300 + seed)
        X, Y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        null = cka_permutation_null(X, Y, "debiased", 200, rng)
        assert abs(null.mean()) < 0.01
        assert null.min() <= debiased_linear_cka(X, Y) <= null.max()
        biased = cka_permutation_null(X, Y, "linear", 200, rng)
        assert biased.mean() > 0.2
        assert biased.min() <= linear_cka(X, Y) <= biased.max()


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_dependent_data_exceed_the_null(kind):
    fn = {"linear": linear_cka, "debiased": debiased_linear_cka, "rbf": rbf_cka}[kind]
    rng = _rng(20)
    n, d = 60, 20
    X = rng.standard_normal((n, d))
    Y = 0.3 * X @ rng.standard_normal((d, d)) + rng.standard_normal((n, d))
    null = cka_permutation_null(X, Y, kind, 200, rng)
    assert fn(X, Y) > np.quantile(null, 0.95)


# --------------------------------------------------------------------------- cluster bootstrap


def test_weighted_unbiased_hsic_is_the_u_statistic_over_distinct_examples():
    """Brute force over every 4-tuple of distinct examples, each counted w_i w_j w_q w_r times."""
    rng = _rng(30)
    n = 7
    X = rng.standard_normal((n, 3))
    Y = X[:, :2] + rng.standard_normal((n, 2))
    K, L = X @ X.T, Y @ Y.T
    w = np.array([1.0, 2.0, 0.0, 3.0, 1.0, 1.0, 2.0])
    num = den = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        weight = w[i] * w[j] * w[q] * w[r]
        num += weight * (K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q])
        den += weight
    assert hsic_unbiased_weighted(K, L, w) == pytest.approx(num / den, rel=1e-12)
    # Unit weights: Song et al.'s estimator.
    assert hsic_unbiased_weighted(K, L, np.ones(n)) == pytest.approx(hsic_unbiased(K, L), rel=1e-12)
    # Invariant to K -> K + a1ᵀ + 1aᵀ + c, so U-centred Grams can be resampled as they are.
    a = rng.standard_normal(n)
    shifted = K + a[:, None] + a[None, :] + 3.0
    assert hsic_unbiased_weighted(shifted, L, w) == pytest.approx(num / den, rel=1e-10)
    assert hsic_unbiased_weighted(_u_center(K), _u_center(L), w) == pytest.approx(
        num / den, rel=1e-10
    )
    assert np.isnan(hsic_unbiased_weighted(K, L, np.array([1.0, 1, 1, 0, 0, 0, 0])))


def test_weighted_biased_cka_equals_repeated_rows():
    rng = _rng(31)
    X, Y = _correlated_pair(n=12, seed=31)
    w = rng.integers(0, 4, 12).astype(float)
    idx = np.repeat(np.arange(12), w.astype(int))
    for K, L in ((X @ X.T, Y @ Y.T), (rbf_gram(X), rbf_gram(Y))):
        repeated = linear_cka_gram(K[np.ix_(idx, idx)], L[np.ix_(idx, idx)])
        assert weighted_cka_gram(K, L, w) == pytest.approx(repeated, abs=1e-12)
        # an already centred Gram gives the same (weighted centring absorbs H)
        assert weighted_cka_gram(center_gram(K), center_gram(L), w) == pytest.approx(
            repeated, abs=1e-12
        )
    ones = np.ones(12)
    K, L = X @ X.T, Y @ Y.T
    assert weighted_cka_gram(K, L, ones) == pytest.approx(linear_cka(X, Y), abs=1e-12)
    assert weighted_cka_gram(K, L, ones, debiased=True) == pytest.approx(
        debiased_linear_cka(X, Y), abs=1e-12
    )


def test_cluster_weights():
    groups = np.repeat(["s1", "s2", "s3"], [2, 3, 1])
    weights = cluster_bootstrap_weights(groups, 50, _rng(32))
    assert weights.shape == (50, 6)
    # every utterance of a speaker shares the speaker's count; counts sum to the speaker count
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 2] == weights[:, 4]).all()
    np.testing.assert_array_equal(weights[:, [0, 2, 5]].sum(axis=1), 3)
    assert cluster_bootstrap_weights(["a"] * 6, 50, _rng(0)) is None
    assert cluster_bootstrap_weights(groups, 0, _rng(0)) is None


def test_debiased_bootstrap_stays_unbiased_where_copied_rows_would_not():
    """Independent representations, n << d: copying the drawn speakers' rows brings back the
    bias debiasing removes (mean ~0.7); the weighted U-statistic stays near 0."""
    rng = _rng(33)
    n, d = 40, 200
    X, Y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    groups = np.repeat(list("abcd"), 10)
    boot = cka_cluster_bootstrap(X, Y, groups, "debiased", 100, _rng(1))
    assert abs(boot.mean()) < 0.05
    weights = cluster_bootstrap_weights(groups, 100, _rng(1))
    copied = [
        debiased_linear_cka(X[idx], Y[idx])
        for idx in (np.repeat(np.arange(n), w.astype(int)) for w in weights)
    ]
    assert np.mean(copied) > 0.5


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_two_speakers_give_three_resamples_around_the_observed_value(kind):
    X, Y = _correlated_pair(n=40, seed=34)
    groups = np.repeat(["f", "m"], 20)
    boot = cka_cluster_bootstrap(X, Y, groups, kind, 200, _rng(2))
    observed = cka_matrix([X], [Y], kind)[0, 0]
    assert len(np.unique(np.round(boot, 12))) == 3
    assert np.isclose(boot, observed, atol=1e-12).any()  # one of each speaker = the fold
    assert np.quantile(boot, 0.025) <= observed <= np.quantile(boot, 0.975)
    assert len(cka_cluster_bootstrap(X, Y, ["f"] * 40, kind, 200, _rng(2))) == 0


def test_cka_layers_statistics_match_the_single_pair_functions():
    rng = _rng(35)
    n = 24
    Xs = [rng.standard_normal((n, 6)) for _ in range(3)]
    Ys = [X + 0.5 * rng.standard_normal((n, 6)) for X in Xs]
    groups = np.repeat(list("abc"), 8)
    perms = permutation_indices(n, 20, _rng(7))
    weights = cluster_bootstrap_weights(groups, 30, _rng(8))
    for kind in ("linear", "debiased", "rbf"):
        result = cka_layers(Xs, Ys, kind, perms=perms, weights=weights)
        np.testing.assert_allclose(result.matrix, cka_matrix(Xs, Ys, kind), atol=1e-12)
        for a in range(3):
            null = cka_permutation_null(Xs[a], Ys[a], kind, 20, _rng(7))
            boot = cka_cluster_bootstrap(Xs[a], Ys[a], groups, kind, 30, _rng(8))
            np.testing.assert_allclose(result.null[a], null, atol=1e-12)
            np.testing.assert_allclose(result.bootstrap[a], boot, atol=1e-12)
        summary = result.summary()
        np.testing.assert_allclose(summary["null_q95"], np.quantile(result.null, 0.95, axis=1))
        np.testing.assert_allclose(summary["ci_low"], np.quantile(result.bootstrap, 0.025, axis=1))
    plain = cka_layers(Xs, Ys).summary()
    assert all(np.isnan(v).all() and len(v) == 3 for v in plain.values())
