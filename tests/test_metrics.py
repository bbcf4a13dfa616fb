import numpy as np
import pytest

from serlens.metrics import confusion, macro_f1, uar, war


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


def test_aggregation_names_missing_runs(tmp_path):
    import pandas as pd

    from serlens.report.tables import (
        performance_table,
        prediction_files,
        read_predictions,
        summary_table,
    )

    classes = ["neu", "hap"]
    files = prediction_files(tmp_path, "c", ["m"], ["frozen", "lora_r4"], [0, 1], [1, 2])
    for (_model, method, seed, fold), path in files.items():
        if (method, seed, fold) == ("lora_r4", 1, 2):
            continue  # this run failed
        path.parent.mkdir(parents=True, exist_ok=True)
        pred = ["neu", "neu"] if seed == 0 else ["neu", "hap"]
        pd.DataFrame({"utt_id": ["a", "b"], "label": ["neu", "hap"], "pred": pred}).to_csv(
            path, sep="\t", index=False
        )
    predictions, missing = read_predictions(files)
    assert missing == [("m", "lora_r4", 1, 2)]
    summary = summary_table(performance_table(predictions, classes), missing).set_index("method")
    lora, frozen = summary.loc["lora_r4"], summary.loc["frozen"]
    assert lora["n_folds"] == 2 and lora["n_seeds"] == 2 and lora["missing_runs"] == "seed1/fold2"
    assert frozen["missing_runs"] == "" and frozen["n_seeds"] == 2
    # seed 0 predicts UAR 0.5 on both folds, seed 1 UAR 1.0: mean 0.75, seed-to-seed std
    assert frozen["uar_mean"] == 0.75
    assert np.isclose(frozen["uar_seed_std"], np.std([0.5, 1.0], ddof=1))
    one_seed = summary_table(
        performance_table({k: v for k, v in predictions.items() if k[2] == 0}, classes), []
    ).set_index("method")
    assert np.isnan(one_seed.loc["frozen", "uar_seed_std"])
    assert "needs two or more seeds" in one_seed.loc["frozen", "note"]


def _grid_predictions(tmp_path):
    """Two folds x two speakers x 6 utterances, two seeds, three methods of rising accuracy."""
    import pandas as pd

    from serlens.report.tables import prediction_files

    classes = ["neu", "hap", "ang", "sad"]
    rng = np.random.default_rng(0)
    rows = []
    for fold in (1, 2):
        for spk in ("F", "M"):
            for i in range(6):
                rows.append((f"f{fold}{spk}{i}", f"s{fold}{spk}", fold, classes[i % 4]))
    manifest = pd.DataFrame(rows, columns=["utt_id", "speaker", "session", "label"])
    methods = {"frozen": 0.3, "frozen_wsum": 0.5, "lora_r4": 0.9}
    files = prediction_files(tmp_path, "c", ["m"], list(methods), [0, 1], [1, 2])
    for (_m, method, _seed, fold), path in files.items():
        test = manifest[manifest.session == fold]
        right = rng.random(len(test)) < methods[method]
        wrong = [classes[(classes.index(c) + 1) % 4] for c in test.label]
        pred = np.where(right, test.label, wrong)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"utt_id": test.utt_id, "label": test.label, "pred": pred}).to_csv(
            path, sep="\t", index=False
        )
    return files, manifest, classes


def test_significance_tests_every_pair_on_speaker_clusters(tmp_path):
    from serlens.report.tables import (
        performance_table,
        read_predictions,
        significance_table,
        summary_table,
    )

    files, manifest, classes = _grid_predictions(tmp_path)
    predictions, _ = read_predictions(files)
    table = significance_table(predictions, classes, manifest, resamples=300, seed=0)
    pairs = set(zip(table.method, table.baseline, strict=True))
    assert pairs == {
        ("frozen_wsum", "frozen"),
        ("lora_r4", "frozen"),
        ("lora_r4", "frozen_wsum"),
    }
    # one ΔUAR definition: the difference of the summary's mean UARs (same runs)
    summary = summary_table(
        performance_table(predictions, classes), [], predictions, manifest, classes, resamples=300
    ).set_index("method")
    row = table.set_index(["method", "baseline"]).loc[("lora_r4", "frozen")]
    assert row.delta_uar == pytest.approx(
        summary.loc["lora_r4", "uar_mean"] - summary.loc["frozen", "uar_mean"]
    )
    assert row.ci_low <= row.delta_uar <= row.ci_high
    assert summary.loc["lora_r4", "uar_ci_low"] <= summary.loc["lora_r4", "uar_mean"]
    assert summary.loc["lora_r4", "uar_mean"] <= summary.loc["lora_r4", "uar_ci_high"]
    # 4 speakers: the exact sign-flip test cannot go below 2^(1-4), Holm not below 3 x that
    assert (table.n_clusters == 4).all() and table.exact.all()
    assert np.allclose(table.min_p, 2 ** (1 - 4))
    assert (table.p_value >= table.min_p - 1e-12).all()
    assert (table.p_holm >= table.p_value).all() and (table.p_holm <= 1).all()
    assert table.note.str.contains("Holm").all()
    assert (table.iid_ci_low <= table.delta_uar).all()
    assert (table.n_seeds == 2).all() and (table.n_folds == 2).all()
