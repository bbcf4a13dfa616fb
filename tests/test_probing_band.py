"""The probing curves' speaker band: a speaker-cluster bootstrap of the probe's test UAR
(known answers, agreement with serlens.stats, the band rows of the per-run table, their fold
aggregation and the figure that draws them)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from serlens import stats
from serlens.analysis import probing
from serlens.analysis.probing import (
    BAND_BOUNDS,
    ONE_BAND_SPEAKER,
    ONE_SPEAKER,
    ProbeSet,
    probe_layers,
    resampled_scores,
    speaker_bootstrap,
    speaker_draws,
)
from serlens.metrics import uar, war
from serlens.report import figures
from serlens.report.aggregate import aggregate_runs
from serlens.report.figures import probing as probing_figures

K = 4
CS = [0.1, 1.0]


def balanced(n_speakers: int, per_class: int = 5):
    """Every speaker says ``per_class`` utterances of each of the K classes."""
    labels = np.tile(np.repeat(np.arange(K), per_class), n_speakers)
    speakers = np.repeat([f"s{i}" for i in range(n_speakers)], K * per_class)
    return labels, speakers


# --------------------------------------------------------------------------- known answers


def test_a_probe_that_is_always_right_or_always_wrong_has_a_degenerate_band():
    labels, speakers = balanced(4)
    right = speaker_bootstrap(labels, labels, speakers, K, resamples=200, seed=0)
    assert right == {"uar": (1.0, 1.0), "war": (1.0, 1.0)}
    wrong = speaker_bootstrap(labels, (labels + 1) % K, speakers, K, resamples=200, seed=0)
    assert wrong == {"uar": (0.0, 0.0), "war": (0.0, 0.0)}


def test_one_wrong_speaker_gives_the_band_that_speaker_resampling_implies():
    """4 speakers, the first always wrong, the others always right. A resample draws 3
    speakers with replacement; j of them are the wrong one, j ~ Binomial(3, 1/4), and since
    every speaker has the same support per class, UAR_b = 1 − j/3. P(j ≤ 1) = 54/64 and
    P(j ≤ 2) = 63/64 > 0.975, so the 95 % band is [1 − 2/3, 1]."""
    labels, speakers = balanced(4)
    preds = np.where(speakers == "s0", (labels + 1) % K, labels)
    assert uar(labels, preds, K) == pytest.approx(0.75)
    resamples = 4000
    band = speaker_bootstrap(labels, preds, speakers, K, resamples=resamples, seed=3)
    assert band["uar"] == pytest.approx((1 / 3, 1.0))
    assert band["war"] == pytest.approx((1 / 3, 1.0))

    _, index = np.unique(speakers, return_inverse=True)
    weights = speaker_draws(4, resamples, seed=3)
    assert (weights.sum(axis=1) == 3).all()  # S − 1 draws per resample
    uar_b, _ = resampled_scores(labels, preds, index, weights, K)
    j = np.rint(3 * (1 - uar_b)).astype(int)
    assert np.allclose(uar_b, 1 - j / 3)
    pmf = [27 / 64, 27 / 64, 9 / 64, 1 / 64]
    assert np.allclose(np.bincount(j, minlength=4) / resamples, pmf, atol=0.025)

    # An utterance-level bootstrap treats the 80 utterances as independent: far narrower.
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(labels), size=(2000, len(labels)))
    iid = [uar(labels[d], preds[d], K) for d in draws]
    low, high = np.quantile(iid, [0.025, 0.975])
    assert high - low < 0.3 < 2 / 3 == pytest.approx(band["uar"][1] - band["uar"][0])


def test_each_resample_is_the_uar_of_the_pooled_utterances_not_a_mean_over_speakers():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, K, 60)
    preds = np.where(rng.random(60) < 0.6, labels, rng.integers(0, K, 60))
    speaker = np.repeat(np.arange(3), [10, 20, 30])
    labels[:10] = 0  # the first speaker holds one class only
    weights = np.array([[1, 1, 1], [2, 0, 0], [0, 1, 2], [3, 0, 1], [0, 0, 0]], dtype=float)
    uar_b, war_b = resampled_scores(labels, preds, speaker, weights, K)
    for b, m in enumerate(weights[:-1].astype(int)):
        rows = np.concatenate([np.tile(np.flatnonzero(speaker == s), m[s]) for s in range(3)])
        assert uar_b[b] == pytest.approx(uar(labels[rows], preds[rows], K))
        assert war_b[b] == pytest.approx(war(labels[rows], preds[rows]))
    assert np.isnan(uar_b[-1]) and np.isnan(war_b[-1])  # no speaker drawn: no value
    pooled = uar(labels, preds, K)
    per_speaker = np.mean([uar(labels[speaker == s], preds[speaker == s], K) for s in range(3)])
    assert uar_b[0] == pytest.approx(pooled) and abs(pooled - per_speaker) > 0.01


def test_the_band_is_serlens_stats_cluster_bootstrap_on_one_fold():
    rng = np.random.default_rng(2)
    n = 150
    speakers = rng.choice([f"spk{i}" for i in range(6)], n)
    labels = rng.integers(0, K, n)
    preds = np.where(rng.random(n) < 0.55, labels, rng.integers(0, K, n))
    ours = speaker_bootstrap(labels, preds, speakers, K, resamples=500, seed=7)
    ref = stats.cluster_bootstrap_uar(
        labels, preds, np.zeros(n), np.zeros(n), speakers, K, resamples=500, rng_seed=7
    )
    assert ours["uar"] == pytest.approx((ref["ci_low"], ref["ci_high"]), abs=1e-12)
    assert ours["uar"][0] < uar(labels, preds, K) < ours["uar"][1]
    other = speaker_bootstrap(labels, preds, speakers, K, resamples=500, seed=8)
    assert other["uar"] != ours["uar"]  # seeded
    assert speaker_bootstrap(labels, preds, speakers, K, resamples=500, seed=7) == ours
    with pytest.raises(ValueError, match="at least 2 speakers"):
        speaker_bootstrap(labels, preds, np.full(n, "one"), K)


# --------------------------------------------------------------------------- the per-run table


def probe_set(speakers, sessions, seed, n_per=32, n_items=4, dim=8, noise=None) -> ProbeSet:
    """Layer 0 encodes the sentence (the control task's item), layer 1 the emotion, with a
    per-speaker noise level so the speakers' UARs differ."""
    rng = np.random.default_rng(seed)
    means = 2.0 * np.random.default_rng(99).standard_normal((K, dim))
    speaker = np.repeat(speakers, n_per)
    session = np.repeat(sessions, n_per)
    item = np.tile(np.arange(n_per) % n_items, len(speakers))
    labels = rng.integers(0, K, len(speaker))
    scale = np.repeat(noise if noise is not None else np.ones(len(speakers)), n_per)[:, None]
    onehot = np.zeros((len(speaker), dim))
    onehot[np.arange(len(speaker)), item] = 3.0
    states = np.stack(
        [
            onehot + 1.5 * rng.standard_normal(onehot.shape),
            means[labels] + scale * rng.standard_normal(onehot.shape),
        ],
        axis=1,
    )
    return ProbeSet(states, labels, speaker, session, np.array([f"t{i}" for i in item]))


TRAIN = probe_set(list("abcdef"), ["1", "1", "2", "2", "3", "3"], seed=0)
TEST = probe_set(["g", "h"], ["4", "4"], seed=1, noise=np.array([0.8, 2.5]))


@pytest.fixture(scope="module")
def tables():
    plain = probe_layers(TRAIN, TEST, K, CS, 3, seed=0)
    banded = probe_layers(TRAIN, TEST, K, CS, 3, seed=0, band_resamples=300)
    return plain, banded


def test_band_rows_follow_the_table_and_leave_it_unchanged(tables):
    plain, banded = tables
    assert list(banded.columns) == list(plain.columns)
    pd.testing.assert_frame_equal(banded.iloc[: len(plain)], plain)
    band = banded.iloc[len(plain) :]
    assert len(band) == 2 * len(plain)
    expected = [f"{task}_{bound}" for task in plain["task"] for bound in BAND_BOUNDS]
    assert list(band["task"]) == expected
    assert (band["status"] == "ok").all()
    assert band[["C", "cv_uar"]].isna().all().all()
    assert band.loc[band["task"].str.startswith("control"), "selectivity_uar"].isna().all()
    low = band[band["task"].str.endswith("band_low")].reset_index(drop=True)
    high = band[band["task"].str.endswith("band_high")].reset_index(drop=True)
    for metric in ("uar", "war"):
        assert (low[metric] <= high[metric]).all()
    assert (high["uar"] - low["uar"] > 0.02).any()  # the speakers differ: a band with width


def test_two_test_speakers_give_the_range_of_the_single_speaker_scores(tables):
    """With two test speakers each resample is one speaker, so the band (1000 resamples: both
    drawn far more than 2.5 % of the time) is [min, max] of the probe's scores on each
    speaker's utterances alone, emotion, control and their paired difference alike. The
    train → test probe is fitted on the train split only, so it predicts a test utterance
    the same whoever else is in the test split."""
    _, banded = tables
    table = banded[banded["protocol"] == "train_test"].set_index(["layer", "task"])
    alone = {}
    for spk in ("g", "h"):
        keep = TEST.speakers == spk
        one = ProbeSet(*(np.asarray(a)[keep] for a in (TEST.states, TEST.labels)), *(
            a[keep] for a in (TEST.speakers, TEST.sessions, TEST.items)
        ))  # fmt: skip
        alone[spk] = probe_layers(TRAIN, one, K, CS, 3, seed=0, protocols=("train_test",))
        alone[spk] = alone[spk].set_index(["layer", "task"])
    for layer in (0, 1):
        for task, metric in (("emotion", "uar"), ("control", "uar"), ("emotion", "war")):
            values = [alone[s].loc[(layer, task), metric] for s in ("g", "h")]
            assert table.loc[(layer, f"{task}_band_low"), metric] == pytest.approx(min(values))
            assert table.loc[(layer, f"{task}_band_high"), metric] == pytest.approx(max(values))
        paired = [alone[s].loc[(layer, "emotion"), "selectivity_uar"] for s in ("g", "h")]
        got = [table.loc[(layer, f"emotion_{b}"), "selectivity_uar"] for b in BAND_BOUNDS]
        assert got == pytest.approx([min(paired), max(paired)])
    spread = [alone[s].loc[(1, "emotion"), "uar"] for s in ("g", "h")]
    assert abs(spread[0] - spread[1]) > 0.05  # the noisier speaker is read worse


def test_a_single_test_speaker_has_no_band_and_says_why():
    keep = TEST.speakers == "g"
    one = ProbeSet(TEST.states[keep], TEST.labels[keep], TEST.speakers[keep], TEST.sessions[keep],
                   TEST.items[keep])  # fmt: skip
    table = probe_layers(TRAIN, one, K, CS, 3, seed=0, band_resamples=50)
    band = table[table["task"].str.contains("_band_")]
    assert len(band) == 2 * (len(table) - len(band))
    assert band[["uar", "war", "selectivity_uar"]].isna().all().all()
    status = band.groupby("protocol")["status"].unique()
    assert list(status["train_test"]) == [ONE_BAND_SPEAKER]
    assert list(status["crossfit_test"]) == [ONE_SPEAKER]  # no estimate, no band
    with pytest.raises(ValueError, match="band_resamples"):
        probe_layers(TRAIN, TEST, K, CS, 3, seed=0, band_resamples=1)


def test_the_workflow_analysis_writes_the_band(monkeypatch):
    """The workflow's compute asks for BAND_RESAMPLES seeded by the analysis seed (the library
    functions default to no band)."""
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return "table"

    monkeypatch.setattr(probing, "probe_layers", spy)
    monkeypatch.setattr(probing, "corpus_control", lambda *args: {})
    monkeypatch.setattr(probing, "probe_set", lambda *args: None)
    monkeypatch.setattr("serlens.corpus.manifest.read_manifest", lambda path: None)
    run = SimpleNamespace(  # the little of a LoRA run that _compute reads
        classes=["a", "b", "c", "d"],
        method=SimpleNamespace(trains_encoder=True),
        splits={"train": [], "test": SimpleNamespace(utt_ids=[])},
        path=lambda name: "manifest.tsv",
        states=lambda which: _States(),
    )
    settings = {"seed": 5, "probe_Cs": CS, "probe_cv_folds": 3}
    assert probing._compute(run, settings) == "table"
    assert seen["band_resamples"] == probing.BAND_RESAMPLES >= 200
    assert seen["seed"] == 5


class _States(dict):
    path = "states"

    def utt_ids(self, split):
        return []

    def __missing__(self, name):
        return None


# --------------------------------------------------------------------------- aggregation, figure


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory):
    root = tmp_path_factory.mktemp("probing")
    files, runs = {}, {}
    for fold, seed in ((1, 11), (2, 12)):
        test = probe_set(["g", "h"], ["4", "4"], seed=seed, noise=np.array([0.8, 2.5]))
        table = probe_layers(TRAIN, test, K, CS, 3, seed=0, band_resamples=200)
        path = root / f"fold{fold}" / "probing.tsv"
        path.parent.mkdir()
        table.to_csv(path, sep="\t", index=False)
        files["tiny.en", "frozen", 0, fold] = path
        runs[fold] = table
    return aggregate_runs("probing", files), runs


def test_the_fold_aggregation_keeps_the_band_rows(aggregated):
    summary, runs = aggregated
    for task in ("emotion", "control"):
        for bound in BAND_BOUNDS:
            sel = summary[(summary["task"] == f"{task}_{bound}") & (summary["metric"] == "uar")]
            assert len(sel) == 2 * 2  # protocols × layers
            for row in sel.itertuples():
                per_fold = [
                    r.loc[(r["protocol"] == row.protocol) & (r["layer"] == row.layer)
                          & (r["task"] == row.task), "uar"].item()
                    for r in runs.values()
                ]  # fmt: skip
                assert row.mean == pytest.approx(np.mean(per_fold))
                assert row.n_folds == 2
    band_tasks = summary["task"].str.contains("_band_")
    assert set(summary.loc[band_tasks, "metric"]) == {
        "uar",
        "war",
        "selectivity_uar",
        "selectivity_war",
        "n_test",
    }
    sel = summary[summary["metric"] == "selectivity_uar"]
    assert set(sel["task"]) == {"emotion", "emotion_band_low", "emotion_band_high"}


def test_the_figure_draws_the_speaker_band(aggregated):
    summary, _ = aggregated
    assert probing_figures.BOUNDS == BAND_BOUNDS
    fig = figures.probing_figure(summary, "tiny.en", K)
    assert "resampling its test speakers" in fig.get_suptitle()
    top_left = fig.axes[0]  # train → test, probe UAR
    polys = [c for c in top_left.collections if isinstance(c, PolyCollection)]
    emotion = probing_figures.with_band(
        summary[summary["protocol"] == "train_test"], "emotion", "uar"
    )
    assert emotion[["band_low", "band_high"]].notna().all().all()
    ys = np.concatenate([p.get_paths()[0].vertices[:, 1] for p in polys])
    assert ys.max() == pytest.approx(
        max(emotion["band_high"].max(), probing_figures.with_band(
            summary[summary["protocol"] == "train_test"], "control", "uar")["band_high"].max())
    )  # fmt: skip
    assert ys.min() == pytest.approx(
        min(emotion["band_low"].min(), probing_figures.with_band(
            summary[summary["protocol"] == "train_test"], "control", "uar")["band_low"].min())
    )  # fmt: skip

    # Without band rows (a table from before the band): ± std, and the title says so.
    plain = summary[~summary["task"].str.contains("_band_")]
    fig = figures.probing_figure(plain, "tiny.en", K)
    assert "± std" in fig.get_suptitle() and "resampling" not in fig.get_suptitle()
