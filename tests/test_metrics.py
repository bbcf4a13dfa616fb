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


def test_aggregation_names_missing_runs(tmp_path):
    import pandas as pd

    from serlens.report.tables import (
        performance_table,
        prediction_files,
        read_predictions,
        summary_table,
    )

    classes = ["neu", "hap"]
    files = prediction_files(tmp_path, "c", ["m"], ["frozen", "lora_r4"], [0], [1, 2])
    for (_model, method, fold), path in files.items():
        if (method, fold) == ("lora_r4", 2):
            continue  # this run failed
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {"utt_id": ["a", "b"], "label": ["neu", "hap"], "pred": ["neu", "neu"]}
        ).to_csv(path, sep="\t", index=False)
    predictions, missing = read_predictions(files)
    assert missing == [("m", "lora_r4", 2)]
    summary = summary_table(performance_table(predictions, classes), [1, 2], missing).set_index(
        "method"
    )
    assert summary.loc["lora_r4", "n_folds"] == 1 and summary.loc["lora_r4", "missing_folds"] == "2"
    assert summary.loc["frozen", "n_folds"] == 2 and summary.loc["frozen", "missing_folds"] == ""
    assert summary.loc["frozen", "uar_mean"] == 0.5
