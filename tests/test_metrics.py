import numpy as np
import pytest

from serlens.metrics import confusion, macro_f1, paired_bootstrap_uar, uar, war


def test_known_answers():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    # recalls: 3/4, 1/2, 1 -> UAR = 0.75; WAR = 6/8
    assert uar(labels, preds, 3) == pytest.approx(0.75)
    assert war(labels, preds) == pytest.approx(0.75)
    # F1: class0 2*3/(4+4)=0.75, class1 2*1/(2+2)=0.5, class2 1 -> 0.75
    assert macro_f1(labels, preds, 3) == pytest.approx(0.75)
    assert confusion(labels, preds, 3).tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]


def test_uar_is_chance_for_majority_guess():
    labels = np.array([0] * 90 + [1] * 10)
    preds = np.zeros(100, dtype=int)
    assert war(labels, preds) == pytest.approx(0.9)
    assert uar(labels, preds, 2) == pytest.approx(0.5)


def test_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    good = np.where(rng.random(400) < 0.8, labels, rng.integers(0, 4, 400))
    bad = np.where(rng.random(400) < 0.4, labels, rng.integers(0, 4, 400))
    strong = paired_bootstrap_uar(labels, good, bad, 4, resamples=500, seed=0)
    assert strong["delta_uar"] > 0.2 and strong["p_value"] < 0.01 and strong["ci_low"] > 0
    same = paired_bootstrap_uar(labels, good, good, 4, resamples=200, seed=0)
    assert same["delta_uar"] == 0 and same["p_value"] == 1.0
    again = paired_bootstrap_uar(labels, good, bad, 4, resamples=500, seed=0)
    assert again == strong  # seeded
