import time
from itertools import product

import numpy as np
import pytest

from serlens import stats
from serlens.metrics import uar


def random_runs(rng, n_folds=3, per_fold=2, n_utt=12, n_seeds=2, k=4, skill=0.6):
    """Rows of utterance × seed: labels, pred_a, pred_b, fold, seed, cluster."""
    cols = {name: [] for name in ("labels", "a", "b", "fold", "seed", "cluster")}
    for f, j in product(range(n_folds), range(per_fold)):
        labels = rng.integers(0, k, n_utt)
        gain = rng.normal(0, 0.2)
        for s in range(n_seeds):
            for name, p in (("a", skill + gain), ("b", skill - gain)):
                ok = rng.random(n_utt) < np.clip(p, 0.05, 0.95)
                cols[name].append(np.where(ok, labels, (labels + rng.integers(1, k, n_utt)) % k))
            cols["labels"].append(labels)
            cols["fold"].append(np.full(n_utt, f))
            cols["seed"].append(np.full(n_utt, s))
            cols["cluster"].append(np.full(n_utt, f"spk{f}{j}"))
    return tuple(np.concatenate(cols[name]) for name in cols)


def speaker_effects(rng, n_folds=5, per_fold=2, n_utt=40, n_seeds=2, k=4):
    """Speaker-correlated correctness: logit P(correct) = base_s ± v_s/2 + seed noise, with v_s
    symmetric about 0, so the population ΔUAR is exactly 0 (a and b are exchangeable)."""
    cols = {name: [] for name in ("labels", "a", "b", "fold", "seed", "cluster")}
    for f, j in product(range(n_folds), range(per_fold)):
        labels = rng.integers(0, k, n_utt)
        base, v = rng.normal(0.5, 0.5), rng.normal(0, 1.0)
        for s in range(n_seeds):
            for name, logit in (("a", base + v / 2), ("b", base - v / 2)):
                p = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.3))))
                ok = rng.random(n_utt) < p
                cols[name].append(np.where(ok, labels, (labels + rng.integers(1, k, n_utt)) % k))
            cols["labels"].append(labels)
            cols["fold"].append(np.full(n_utt, f))
            cols["seed"].append(np.full(n_utt, s))
            cols["cluster"].append(np.full(n_utt, f"s{f}{j}"))
    return tuple(np.concatenate(cols[name]) for name in cols)


def test_delta_uar_known_answer_and_equals_difference_of_means():
    labels = np.array([0, 0, 1, 1, 0, 1, 1])
    a = np.array([0, 0, 1, 0, 0, 1, 1])  # fold 0: recalls 1, 1/2 -> 3/4; fold 1: 1
    b = np.array([0, 1, 1, 1, 1, 1, 1])  # fold 0: 1/2, 1 -> 3/4; fold 1: 0, 1 -> 1/2
    fold = np.array([0, 0, 0, 0, 1, 1, 1])
    seed = np.zeros(7, dtype=int)
    assert stats.delta_uar(labels, a, b, fold, seed, 2) == pytest.approx(0.25)
    assert stats.mean_uar(labels, a, fold, seed, 2) == pytest.approx(0.875)
    # not the UAR of the pooled utterances (0.875 - 2/3)
    assert uar(labels, a, 2) - uar(labels, b, 2) == pytest.approx(0.875 - 2 / 3)

    rows = random_runs(np.random.default_rng(0))
    labels, a, b, fold, seed, cluster = rows
    delta = stats.delta_uar(labels, a, b, fold, seed, 4)
    means = stats.mean_uar(labels, a, fold, seed, 4) - stats.mean_uar(labels, b, fold, seed, 4)
    assert abs(delta - means) < 1e-12
    boot = stats.cluster_bootstrap_delta(*rows, 4, resamples=50)
    assert boot["delta"] == delta and boot["n_clusters"] == 6 and boot["resamples"] == 50
    d, names = stats.cluster_contributions(*rows, 4)
    assert abs(d.sum() - delta) < 1e-12 and len(names) == 6


def brute_force_p(labels, a, b, fold, seed, cluster, n_classes):
    """Swap a's and b's predictions on every subset of clusters and recompute ΔUAR."""
    names = np.unique(cluster)
    observed = stats.mean_uar(labels, a, fold, seed, n_classes) - stats.mean_uar(
        labels, b, fold, seed, n_classes
    )
    null = []
    for swaps in product([False, True], repeat=len(names)):
        swap = np.isin(cluster, names[list(swaps)])
        a2, b2 = np.where(swap, b, a), np.where(swap, a, b)
        null.append(
            stats.mean_uar(labels, a2, fold, seed, n_classes)
            - stats.mean_uar(labels, b2, fold, seed, n_classes)
        )
    return float(np.mean(np.abs(null) >= abs(observed) - 1e-12))


def test_sign_flip_matches_brute_force_enumeration():
    labels, *rest = random_runs(np.random.default_rng(3), skill=0.55)
    fold = rest[2]
    labels = np.where((fold == 0) & (labels == 3), 0, labels)  # a unit without class 3
    rows = (labels, *rest)
    flip = stats.sign_flip_test(*rows, 4)
    expected = brute_force_p(*rows, 4)
    assert flip["exact"] and flip["n_clusters"] == 6
    assert flip["p_value"] == pytest.approx(expected, abs=1e-12)
    assert 0 < flip["p_value"] < 1
    assert flip["min_p"] == 2.0**-5
    assert flip["delta"] == pytest.approx(stats.delta_uar(*rows[:5], 4))

    mc = stats.sign_flip_test(*rows, 4, max_exact=3, permutations=20000, rng_seed=1)
    assert not mc["exact"] and mc["min_p"] == 1 / 20001
    assert mc["p_value"] == pytest.approx(expected, abs=0.02)


def test_sign_flip_extremes():
    labels, a, b, fold, seed, cluster = random_runs(np.random.default_rng(4))
    same = stats.sign_flip_test(labels, a, a, fold, seed, cluster, 4)
    assert same["p_value"] == 1.0 and same["delta"] == 0.0
    # a perfect on every cluster, b always wrong: only the observed signs and their negation
    wrong = (labels + 1) % 4
    best = stats.sign_flip_test(labels, labels, wrong, fold, seed, cluster, 4)
    assert best["p_value"] == pytest.approx(best["min_p"]) == pytest.approx(2.0**-5)


def test_holm_known_answer_and_nans():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    with_nan = stats.holm(np.array([0.01, np.nan, 0.04, 0.03, 0.005]))
    assert np.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2, 3, 4]], [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.6, 0.01]), [1.0, 1.0, 0.03])
    assert np.all(np.isnan(stats.holm([np.nan, np.nan])))


def test_cluster_interval_covers_where_iid_does_not():
    """ΔUAR = 0 in the population; speakers carry their own a-vs-b offset."""
    rng = np.random.default_rng(1)
    covered = {"cluster": 0, "textbook": 0, "iid": 0}
    reps = 400
    for rep in range(reps):
        rows = speaker_effects(rng)
        runs = {
            "cluster": stats.cluster_bootstrap_delta(*rows, 4, resamples=300, rng_seed=rep),
            "textbook": stats.cluster_bootstrap_delta(
                *rows, 4, resamples=300, rng_seed=rep, draws="n"
            ),
            "iid": stats.iid_bootstrap_delta(*rows[:5], 4, resamples=300, rng_seed=rep),
        }
        for name, run in runs.items():
            covered[name] += run["ci_low"] <= 0 <= run["ci_high"]
    coverage = {name: count / reps for name, count in covered.items()}
    assert coverage["cluster"] >= 0.85, coverage
    assert coverage["iid"] <= coverage["cluster"] - 0.15, coverage
    # n_f draws from 2 speakers per fold halve the variance: the reason for n_f - 1
    assert coverage["textbook"] < coverage["cluster"] - 0.05, coverage


@pytest.mark.parametrize("draws", ["n-1", "n"])
def test_bootstrap_variance_matches_exact_enumeration(draws):
    """2 speakers per fold: every draw of a fold is enumerable, and folds are independent, so
    the exact bootstrap variance is Σ_f var_f / F² over the equally likely fold draws."""
    labels, a, b, fold, seed, cluster = random_runs(np.random.default_rng(9), n_folds=4)
    labels = np.where((fold == 1) & (labels == 2), 0, labels)  # a fold without class 2
    labels = np.where((cluster == "spk00") & (labels == 3), 0, labels)  # a speaker without 3
    per_fold = []
    for f in range(4):
        names = np.unique(cluster[fold == f])
        values = []
        for chosen in product(names, repeat=1 if draws == "n-1" else 2):
            idx = np.concatenate([np.flatnonzero(cluster == name) for name in chosen])
            values.append(stats.delta_uar(labels[idx], a[idx], b[idx], fold[idx], seed[idx], 4))
        per_fold.append(values)
    exact_se = np.sqrt(np.sum([np.var(v) for v in per_fold])) / 4
    boot = stats.cluster_bootstrap_delta(
        labels, a, b, fold, seed, cluster, 4, resamples=4000, draws=draws
    )
    assert boot["se"] == pytest.approx(exact_se, rel=0.04)
    if draws == "n-1":
        # 16 equally likely resamples: the 2.5 % and 97.5 % quantiles are the extreme ones
        assert boot["ci_low"] == pytest.approx(np.mean([min(v) for v in per_fold]), abs=1e-12)
        assert boot["ci_high"] == pytest.approx(np.mean([max(v) for v in per_fold]), abs=1e-12)


def test_cluster_bootstrap_is_fast_and_brackets():
    rows = speaker_effects(np.random.default_rng(5), n_seeds=3)
    start = time.perf_counter()
    boot = stats.cluster_bootstrap_delta(*rows, 4, resamples=2000)
    assert time.perf_counter() - start < 1.0
    assert boot["ci_low"] <= boot["delta"] <= boot["ci_high"] and boot["se"] > 0
    one = stats.cluster_bootstrap_uar(*rows[:2], *rows[3:], 4, resamples=500)
    assert one["uar"] == pytest.approx(stats.mean_uar(*rows[:2], *rows[3:5], 4))
    assert one["ci_low"] <= one["uar"] <= one["ci_high"] and one["n_clusters"] == 10
    again = stats.cluster_bootstrap_delta(*rows, 4, resamples=2000)
    assert again == boot  # deterministic for a fixed rng_seed


def test_one_cluster_per_fold_resamples_folds():
    """cluster = session = fold: clusters are drawn pooled over folds."""
    labels, a, b, fold, seed, _ = speaker_effects(np.random.default_rng(6))
    boot = stats.cluster_bootstrap_delta(labels, a, b, fold, seed, fold, 4, resamples=500)
    per_fold = [
        stats.delta_uar(
            labels[fold == f], a[fold == f], b[fold == f], fold[fold == f], seed[fold == f], 4
        )
        for f in range(5)
    ]
    assert boot["n_clusters"] == 5
    assert min(per_fold) <= boot["ci_low"] < boot["ci_high"] <= max(per_fold)


def band_data(rng, spread):
    n_points, folds, per_fold, n_utt = 6, 5, 2, 20
    curve = np.linspace(0, 1, n_points)
    values, cluster, fold = [], [], []
    for f, j in product(range(folds), range(per_fold)):
        offset = rng.normal(0, 1, n_points) * spread
        values.append(curve + offset + rng.normal(0, 0.1, (n_utt, n_points)))
        cluster += [f"s{f}{j}"] * n_utt
        fold += [f] * n_utt
    return np.concatenate(values), np.array(cluster), np.array(fold)


def test_cluster_band_brackets_and_widens():
    widths = []
    for spread in (0.05, 0.3):
        values, cluster, fold = band_data(np.random.default_rng(7), spread)
        observed = np.mean([values[fold == f].mean(axis=0) for f in range(5)], axis=0)
        low, high = stats.cluster_band(values, cluster, fold, resamples=400)
        assert low.shape == high.shape == (6,)
        assert np.all(low <= observed) and np.all(observed <= high)
        widths.append(high - low)
    assert np.all(widths[1] > 2 * widths[0])


def test_cluster_band_is_for_the_mean_over_folds():
    """Fold 0 has 20x the rows of the others: the curve weights folds, not rows, equally."""
    rng = np.random.default_rng(10)
    values, cluster, fold = [], [], []
    for f, j in product(range(5), range(2)):
        n = 100 if f == 0 else 5
        values.append(np.full((n, 3), float(f == 0)) + rng.normal(0, 0.02))
        cluster += [f"s{f}{j}"] * n
        fold += [f] * n
    low, high = stats.cluster_band(np.concatenate(values), np.array(cluster), np.array(fold))
    assert np.all(low < 0.2) and np.all(0.2 < high) and np.all(high < 0.3)


def test_cluster_effect_size_known_value():
    # 4 clusters of 4 utterances (2 per class); a always right, b wrong on m_c class-0 ones:
    # δ_c = UAR_a − UAR_b = m_c / 4 = [0, .25, .5, .25] -> d_z = .25 / sd = sqrt(1.5)
    wrong = [0, 1, 2, 1]
    labels = np.tile([0, 0, 1, 1], 4)
    b = labels.copy()
    for c, m in enumerate(wrong):
        b[4 * c : 4 * c + m] = 1
    fold, seed = np.repeat([0, 0, 1, 1], 4), np.zeros(16, dtype=int)
    cluster = np.repeat(["w", "x", "y", "z"], 4)
    d = stats.cluster_effect_size(labels, labels, b, fold, seed, cluster, 2)
    assert d == pytest.approx(np.sqrt(1.5))
    assert stats.cluster_effect_size(labels, b, labels, fold, seed, cluster, 2) == pytest.approx(
        -np.sqrt(1.5)
    )
    assert np.isnan(stats.cluster_effect_size(labels, labels, labels, fold, seed, cluster, 2))
    one = np.repeat(["w"], 16)
    assert np.isnan(stats.cluster_effect_size(labels, labels, b, fold, seed, one, 2))


def test_resolution_note_is_computed():
    note = stats.resolution_note(5, 10)
    assert "5 clusters" in note and "1/16" in note and "no comparison can be rejected" in note
    assert "10 × 1/16 = 0.625" in note
    assert "a rejection is possible" in stats.resolution_note(12, 3)  # 3/2048
    assert "cannot" in stats.resolution_note(5, 1)  # 1/16 > 0.05
    assert "can reach" in stats.resolution_note(6, 1)  # 1/32 < 0.05
    with pytest.raises(ValueError, match="n_tests"):
        stats.resolution_note(5, 0)


def test_validation_names_the_argument():
    labels, a, b, fold, seed, cluster = random_runs(np.random.default_rng(8))
    with pytest.raises(ValueError, match="pred_b"):
        stats.delta_uar(labels, a, b[:-1], fold, seed, 4)
    with pytest.raises(ValueError, match="labels"):
        stats.mean_uar(labels + 4, a, fold, seed, 4)
    with pytest.raises(ValueError, match="pred_a"):
        stats.sign_flip_test(labels, a - 5, b, fold, seed, cluster, 4)
    with pytest.raises(ValueError, match="cluster"):
        stats.cluster_bootstrap_delta(labels, a, b, fold, seed, cluster[:3], 4)
    single = np.full(len(labels), "spk")
    for test in (stats.sign_flip_test, stats.cluster_bootstrap_delta):
        with pytest.raises(ValueError, match="cluster"):
            test(labels, a, b, fold, seed, single, 4)
    with pytest.raises(ValueError, match="draws"):
        stats.cluster_bootstrap_delta(labels, a, b, fold, seed, cluster, 4, draws="m")
    with pytest.raises(ValueError, match="cluster"):
        stats.cluster_band(np.ones((len(labels), 2)), single, fold)
