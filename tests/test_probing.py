"""Layer-wise probing: item control labels, session-grouped C selection, the cross-fit,
known answers on synthetic states, and the real bundled encoder (frozen from the feature
cache, LoRA from the adapted encoder)."""

import dataclasses
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from sklearn.exceptions import ConvergenceWarning

from serlens.analysis import probing
from serlens.analysis.probing import (
    NO_ITEM,
    ONE_SPEAKER,
    PROTOCOLS,
    ProbeSet,
    compute_probing,
    control_labels,
    control_targets,
    crossfit_directions,
    cv_folds,
    fit_probe,
    pooled_states,
    probe_layers,
    speakers_from_manifest,
)
from serlens.analysis.runs import TrainedRun
from serlens.corpus.manifest import read_manifest
from serlens.errors import ConfigError, CorpusError

CLASSES = ["neu", "hap", "ang", "sad"]
COLUMNS = [
    "protocol",
    "layer",
    "depth",
    "task",
    "status",
    "C",
    "cv_uar",
    "cv_groups",
    "uar",
    "war",
    "converged",
    "cv_unconverged",
    "n_train",
    "n_test",
    "selectivity_uar",
    "selectivity_war",
]
CS = [0.01, 0.1, 1.0, 10.0]


# --------------------------------------------------------------------------- synthetic states


def item_states(speakers, sessions, seed, n_items=12, reps=4, n_classes=4, dim=16, items=True):
    """Every speaker says each of ``n_items`` sentences ``reps`` times, in random emotions
    (independent of the sentence). Layer 0 encodes only the sentence (one-hot × 8 + unit
    noise), layer 1 only the emotion (class means 8 apart + unit noise)."""
    rng = np.random.default_rng(seed)
    means = 8.0 * np.random.default_rng(123).standard_normal((n_classes, dim))
    n = n_items * reps
    speaker = np.repeat(speakers, n)
    session = np.repeat(sessions, n)
    index = np.tile(np.repeat(np.arange(n_items), reps), len(speakers))
    labels = rng.integers(0, n_classes, len(speaker))
    onehot = np.zeros((len(speaker), dim))
    onehot[np.arange(len(speaker)), index] = 8.0
    states = np.stack(
        [
            onehot + rng.standard_normal(onehot.shape),
            means[labels] + rng.standard_normal(onehot.shape),
        ],
        axis=1,
    )
    names = np.array([f"sent{i:02d}" if items else "" for i in index])
    return ProbeSet(states, labels, speaker, session, names)


TRAIN_SPEAKERS = ["a", "b", "c", "d", "e", "f"]
TRAIN_SESSIONS = ["1", "1", "2", "2", "3", "3"]


@pytest.fixture(scope="module")
def item_table():
    train = item_states(TRAIN_SPEAKERS, TRAIN_SESSIONS, seed=0)
    test = item_states(["g", "h"], ["4", "4"], seed=1)
    return probe_layers(train, test, n_classes=4, Cs=CS, cv=3, seed=0)


# --------------------------------------------------------------------------- control labels


def test_control_label_is_a_fixed_function_of_the_item():
    rng = np.random.default_rng(0)
    items = np.repeat([f"t{i}" for i in range(12)], rng.integers(3, 9, 12))
    items = np.concatenate([items, ["", ""]])  # improvised: no item
    labels = rng.integers(0, 4, len(items))
    mapping = control_labels(items, labels, 4, seed=0)
    assert set(mapping) == set(items) - {""}
    assert set(mapping.values()) <= set(range(4)) and len(set(mapping.values())) == 4
    order = rng.permutation(len(items))  # another split's rows, in another order
    assert control_labels(items[order], labels[order], 4, seed=0) == mapping
    assert control_labels(items, labels, 4, seed=1) != mapping  # seeded
    targets = control_targets(items, mapping)
    for item in set(items) - {""}:  # same item -> same label, wherever it occurs
        assert set(targets[items == item]) == {mapping[item]}
    assert (targets[items == ""] == -1).all()
    assert list(control_targets(["", "t0", "unknown"], mapping)) == [-1, mapping["t0"], -1]


def test_control_classes_follow_the_emotion_distribution():
    items = np.repeat([f"t{i}" for i in range(12)], 5)
    balanced = np.tile(np.arange(4), 15)
    assert sorted(Counter(control_labels(items, balanced, 4, 0).values()).values()) == [3] * 4
    skewed = np.where(np.arange(60) < 30, 0, np.arange(60) % 3 + 1)  # half class 0
    counts = Counter(control_labels(items, skewed, 4, 0).values())
    assert counts[0] == 6 and counts[1] == counts[2] == counts[3] == 2
    assert control_labels(["", ""], [0, 1], 4, 0) == {}


# --------------------------------------------------------------------------- CV and cross-fit


def test_cv_is_grouped_by_session_and_never_splits_one():
    sessions = np.repeat(["1", "2", "3", "4", "5"], [10, 14, 6, 12, 8])
    speakers = np.char.add(sessions, np.where(np.arange(len(sessions)) % 2, "M", "F"))
    labels = np.arange(len(sessions)) % 4
    folds, groups = cv_folds(sessions, speakers, labels, 3, seed=0)
    assert groups == "session" and len(folds) == 3
    validation = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(validation), np.arange(len(sessions)))  # each once
    for fit_idx, val_idx in folds:
        assert not set(sessions[fit_idx]) & set(sessions[val_idx])
        assert not set(speakers[fit_idx]) & set(speakers[val_idx])
    # fewer sessions than splits: the speakers are the groups
    two = np.where(np.isin(sessions, ["1", "2"]), "A", "B")
    folds, groups = cv_folds(two, speakers, labels, 3, seed=0)
    assert groups == "speaker"
    for fit_idx, val_idx in folds:
        assert not set(speakers[fit_idx]) & set(speakers[val_idx])
    one = slice(0, 10)  # session 1: one session, two speakers
    with pytest.raises(ConfigError, match="probe_cv_folds"):
        cv_folds(sessions[one], speakers[one], labels[one], 3, seed=0)
    folds, groups = cv_folds(sessions[one], speakers[one], labels[one], 3, 0, True)
    assert groups == "utterance" and len(folds) == 3


def test_train_test_cv_goes_through_the_session_splitter(monkeypatch):
    seen = []

    def spy(sessions, speakers, labels, n_splits, seed, allow_utterances=False):
        result = cv_folds(sessions, speakers, labels, n_splits, seed, allow_utterances)
        seen.append((np.asarray(sessions), result))
        return result

    monkeypatch.setattr(probing, "cv_folds", spy)
    train = item_states(TRAIN_SPEAKERS, TRAIN_SESSIONS, seed=5, n_items=4, reps=3)
    test = item_states(["g", "h"], ["4", "4"], seed=6, n_items=4, reps=3)
    table = probe_layers(train, test, 4, [1.0], 3, 0, protocols=("train_test",))
    ((sessions, (folds, groups)),) = seen
    assert np.array_equal(sessions, train.sessions) and groups == "session"
    for fit_idx, val_idx in folds:
        assert not set(sessions[fit_idx]) & set(sessions[val_idx])
    assert (table["cv_groups"] == "session").all()


def test_crossfit_never_scores_an_utterance_with_its_own_speakers_probe():
    speakers = np.repeat(["s3", "s1", "s2", "s4", "s5"], [5, 7, 3, 4, 6])
    directions = crossfit_directions(speakers)
    scored = np.concatenate([score for _, score in directions])
    assert np.array_equal(np.sort(scored), np.arange(len(speakers)))  # every utterance once
    for fit, score in directions:
        assert not set(speakers[fit]) & set(speakers[score])
    assert crossfit_directions(np.array(["only"] * 5)) is None


def test_crossfit_known_answer_speaker_specific_codes_score_zero():
    """Speaker h's states encode label k as speaker g's encode k + 1: a probe fitted on the
    scored utterance's own speaker would be right every time, one fitted on the other half is
    wrong every time."""
    rng = np.random.default_rng(0)
    means = 8.0 * rng.standard_normal((4, 8))
    labels = np.tile(np.arange(4), 20)
    speakers = np.repeat(["g", "h"], 40)
    code = np.where(speakers == "h", (labels + 1) % 4, labels)
    states = (means[code] + 0.1 * rng.standard_normal((80, 8)))[:, None, :].repeat(2, axis=1)
    test = ProbeSet(states, labels, speakers, ["4"] * 80, [""] * 80)
    table = probe_layers(None, test, 4, CS, 3, 0, protocols=("crossfit_test",))
    emotion = table[table["task"] == "emotion"]
    assert (emotion["uar"] == 0.0).all() and (emotion["n_test"] == 80).all()
    assert (emotion["cv_groups"] == "utterance").all()  # one speaker per half
    assert (emotion["cv_uar"] == 1.0).all()  # within a speaker the code is learnable


def test_a_single_test_speaker_gives_empty_crossfit_rows_with_the_reason():
    train = item_states(TRAIN_SPEAKERS, TRAIN_SESSIONS, seed=2, n_items=4, reps=3)
    test = item_states(["g"], ["4"], seed=3, n_items=4, reps=3)
    table = probe_layers(train, test, 4, [1.0], 3, 0)
    cross = table[table["protocol"] == "crossfit_test"]
    assert len(cross) == 4 and (cross["status"] == ONE_SPEAKER).all()
    assert cross[["uar", "war", "selectivity_uar"]].isna().all().all()
    assert (cross["n_test"] == 0).all()
    assert (table.loc[table["protocol"] == "train_test", "status"] == "ok").all()


# --------------------------------------------------------------------------- known answers


def test_table_layout_and_selectivity(item_table):
    table = item_table
    assert list(table.columns) == COLUMNS
    assert list(table["protocol"]) == ["train_test"] * 4 + ["crossfit_test"] * 4
    assert list(table["task"]) == ["emotion", "control"] * 4
    assert list(table["depth"]) == [0.0, 0.0, 1.0, 1.0] * 2
    assert (table["status"] == "ok").all()
    train_test = table[table["protocol"] == "train_test"]
    assert (train_test["n_train"] == 6 * 48).all() and (train_test["n_test"] == 2 * 48).all()
    for protocol in PROTOCOLS:
        rows = table[table["protocol"] == protocol]
        emotion, control = rows[rows["task"] == "emotion"], rows[rows["task"] == "control"]
        for metric in ("uar", "war"):
            expected = emotion[metric].to_numpy() - control[metric].to_numpy()
            assert np.allclose(emotion[f"selectivity_{metric}"], expected)
            assert control[f"selectivity_{metric}"].isna().all()
        assert (control["C"].to_numpy() == emotion["C"].to_numpy()).all()  # one probe configuration
    assert table["converged"].all() and (table["cv_unconverged"] == 0).all()


def test_a_probe_that_reads_the_sentence_solves_the_control_task(item_table):
    """Layer 0 encodes only the sentence: the control task (a label per sentence, the same in
    fitting and scored utterances) is solved, emotion is not, selectivity is low."""
    table = item_table.set_index(["protocol", "layer", "task"])
    for protocol in PROTOCOLS:
        assert table.loc[(protocol, 0, "control"), "uar"] > 0.9
        assert table.loc[(protocol, 0, "emotion"), "uar"] < 0.4
        assert table.loc[(protocol, 0, "emotion"), "selectivity_uar"] < -0.4


def test_a_probe_that_reads_only_emotion_stays_at_chance_on_the_control_task(item_table):
    table = item_table.set_index(["protocol", "layer", "task"])
    for protocol in PROTOCOLS:
        assert table.loc[(protocol, 1, "emotion"), "uar"] == pytest.approx(1.0, abs=0.01)
        assert table.loc[(protocol, 1, "control"), "uar"] == pytest.approx(0.25, abs=0.15)
        assert table.loc[(protocol, 1, "emotion"), "selectivity_uar"] > 0.55


def test_without_recurring_items_the_control_rows_say_so():
    train = item_states(TRAIN_SPEAKERS, TRAIN_SESSIONS, seed=2, n_items=4, reps=3, items=False)
    test = item_states(["g", "h"], ["4", "4"], seed=3, n_items=4, reps=3, items=False)
    table = probe_layers(train, test, 4, [1.0], 3, 0)
    control = table[table["task"] == "control"]
    assert (control["status"] == NO_ITEM).all() and control["uar"].isna().all()
    emotion = table[table["task"] == "emotion"]
    assert (emotion["status"] == "ok").all() and emotion["uar"].notna().all()
    assert emotion[["selectivity_uar", "selectivity_war"]].isna().all().all()
    # items that never recur between the fitting and the scored speakers: the same, per fold
    unseen = dataclasses.replace(test, items=[f"new{i}" for i in range(len(test))])
    table = probe_layers(train, unseen, 4, [1.0], 3, 0, protocols=("train_test",))
    status = table.loc[table["task"] == "control", "status"]
    assert status.str.startswith("no test utterance's item").all()


def test_c_ties_go_to_the_strongest_regularisation():
    data = item_states(["a", "b", "c", "d"], ["1", "2", "3", "4"], seed=2, n_items=4, reps=5)
    folds, _ = cv_folds(data.sessions, data.speakers, data.labels, 2, 0)
    probe = fit_probe(data.states[:, 1], data.labels, folds, Cs=[10.0, 0.01, 1.0], n_classes=4)
    assert probe.cv_uar == 1.0  # every C separates the held-out sessions perfectly...
    assert probe.C == 0.01  # ...so the smallest C wins
    fixed = fit_probe(data.states[:, 1], data.labels, folds, Cs=CS, n_classes=4, C=0.1)
    assert fixed.C == 0.1 and np.isnan(fixed.cv_uar)


def test_convergence_failures_are_recorded_not_raised():
    data = item_states(["a", "b", "c"], ["1", "2", "3"], seed=4, n_items=4, reps=5)
    folds, _ = cv_folds(data.sessions, data.speakers, data.labels, 3, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # any leak would raise
        probe = fit_probe(
            data.states[:, 1] * 100, data.labels, folds, Cs=[1.0, 100.0], n_classes=4, max_iter=1
        )
    assert not probe.converged
    assert probe.cv_unconverged == 3 * 2


def test_manifest_items_are_read_verbatim_and_optional(tmp_path):
    base = {
        "utt_id": ["u1", "u2", "u3"],
        "path": ["a.wav"] * 3,
        "session": ["1"] * 3,
        "speaker": ["s"] * 3,
        "gender": ["F"] * 3,
        "label": ["neu"] * 3,
        "duration_s": [1.0] * 3,
    }
    old = tmp_path / "old.tsv"
    pd.DataFrame(base).to_csv(old, sep="\t", index=False)
    assert list(read_manifest(old)["item"]) == ["", "", ""]  # written before the column
    new = tmp_path / "new.tsv"
    pd.DataFrame({**base, "item": ["null", "", "a01"]}).to_csv(new, sep="\t", index=False)
    assert list(read_manifest(new)["item"]) == ["null", "", "a01"]


# --------------------------------------------------------------------------- real encoder


def tone_utterances(speakers, per_speaker, seed, root):
    """Short harmonic tones whose pitch follows the class, written as wavs; one row per utterance."""
    rng = np.random.default_rng(seed)
    rows, waves = [], []
    for speaker in speakers:
        for i in range(per_speaker):
            label = i % len(CLASSES)
            t = np.arange(int(rng.uniform(0.4, 0.7) * 16000)) / 16000
            f0 = 120 + 60 * label + rng.normal(0, 5)
            wave = (0.2 * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 4))).astype(
                np.float32
            )
            wave += 0.01 * rng.standard_normal(len(t)).astype(np.float32)
            utt = f"{speaker}_{i:02d}"
            path = root / f"{utt}.wav"
            sf.write(path, wave, 16000, subtype="FLOAT")
            rows.append(
                {
                    "utt_id": utt,
                    "path": str(path),
                    "speaker": speaker,
                    "label": label,
                    "duration_s": len(t) / 16000,
                }
            )
            waves.append(wave)
    return pd.DataFrame(rows), waves


def as_split(frame, waves):
    from serlens.train.data import Split

    return Split(
        list(frame["utt_id"]),
        frame["label"].to_numpy(),
        frame["duration_s"].to_numpy(),
        list(frame["path"]),
        waves,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_corpus")
    train, train_waves = tone_utterances(["s1", "s2", "s3"], 4, 0, root)
    test, test_waves = tone_utterances(["s4", "s5"], 4, 1, root)
    splits = {
        "train": as_split(train, train_waves),
        "dev": as_split(test[:0], []),
        "test": as_split(test, test_waves),
    }
    return {"frame": pd.concat([train, test], ignore_index=True), "splits": splits, "root": root}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """The converted tiny.en of an earlier workflow run if there is one, else a fresh conversion (~6 s)."""
    from pathlib import Path

    from serlens.models.resolve import resolve_weights
    from serlens.steps import model_path

    converted = Path(__file__).parents[1] / "results" / "models" / "tiny.en.json"
    if converted.is_file() and (model_path(converted) / "config.json").is_file():
        return model_path(converted)
    return resolve_weights("bundled:tiny.en", tmp_path_factory.mktemp("resources"))


def frozen_run(encoder_dir, splits, policy="crop"):
    from serlens.models.encoder import load_encoder
    from serlens.train.heads import EmotionHead

    encoder = load_encoder(encoder_dir)
    return TrainedRun(
        "tiny.en", "frozen", 1, encoder, EmotionHead(384, 4), splits, CLASSES, policy, 30.0
    )


def lora_run(encoder_dir, splits):
    from peft import get_peft_model

    from serlens.config import validate_config
    from serlens.models.encoder import load_encoder
    from serlens.train.heads import EmotionHead
    from serlens.train.lora import lora_config

    peft_encoder = get_peft_model(
        load_encoder(encoder_dir), lora_config(4, validate_config({})["lora"])
    )
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at initialisation would leave the encoder unchanged
        for name, param in peft_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_encoder.eval()
    encoder = peft_encoder.base_model.model
    return TrainedRun(
        "tiny.en",
        "lora_r4",
        1,
        encoder,
        EmotionHead(384, 4),
        splits,
        CLASSES,
        "crop",
        30.0,
        rank=4,
        peft_encoder=peft_encoder,
    )


@pytest.fixture(scope="module")
def cfg():
    from serlens.config import validate_config

    return validate_config({})["analysis"]


@pytest.fixture(scope="module")
def manifest(corpus):
    """The corpus as a manifest: one session per speaker, two sentences said twice each."""
    frame = corpus["frame"]
    return frame.assign(
        session=frame["speaker"],
        gender="F",
        label=[CLASSES[i] for i in frame["label"]],
        item=[f"line{int(u[-2:]) % 2}" for u in frame["utt_id"]],
    )


def test_frozen_run_is_probed_from_the_cache_without_an_encoder_pass(
    encoder_dir, corpus, cfg, manifest, monkeypatch
):
    from serlens.train.features import cache_features

    run = frozen_run(encoder_dir, corpus["splits"])
    cache = corpus["root"] / "pooled.safetensors"
    cache_features(run.encoder, corpus["frame"], cache, "crop", 30.0, batch_size=8)
    direct = pooled_states(
        run, corpus["splits"]["test"], batch_size=3
    )  # other batches, same states (crop)
    assert np.allclose(
        probing._cached_states(cache, run, corpus["splits"]["test"]), direct, atol=1e-4
    )

    def no_encoder_pass(*args, **kwargs):
        raise AssertionError("the encoder ran for a frozen run with a feature cache")

    monkeypatch.setattr(probing, "pooled_layer_states", no_encoder_pass)
    table = compute_probing(run, cfg, 0, manifest=manifest, features_path=cache)
    n_layers = run.encoder.config.encoder_layers
    assert list(table.columns) == COLUMNS and len(table) == 2 * 2 * (n_layers + 1)
    assert list(table["protocol"].unique()) == list(PROTOCOLS)
    emotion = table[table["task"] == "emotion"]
    assert list(emotion["layer"]) == list(range(n_layers + 1)) * 2
    assert table["depth"].iloc[-1] == 1.0
    assert emotion.loc[emotion["protocol"] == "train_test", "C"].isin(cfg["probe_Cs"]).all()
    assert emotion["C"].between(min(cfg["probe_Cs"]), max(cfg["probe_Cs"])).all()
    assert emotion[["uar", "war"]].apply(lambda c: c.between(0, 1)).all().all()
    train_test = table[(table["protocol"] == "train_test") & (table["task"] == "control")]
    assert (train_test["status"] == "ok").all() and (train_test["n_test"] == 8).all()

    mismatched = dataclasses.replace(run, policy="pad30")
    with pytest.raises(ConfigError, match="features rule"):
        compute_probing(mismatched, cfg, 0, manifest=manifest, features_path=cache)


def test_lora_run_is_cross_fitted_on_its_adapted_encoder(
    encoder_dir, corpus, cfg, manifest, tmp_path
):
    run = lora_run(encoder_dir, corpus["splits"])
    adapted = pooled_states(run, corpus["splits"]["test"], cfg["batch_size"])
    with run.adapter_disabled():
        pretrained = pooled_states(run, corpus["splits"]["test"], cfg["batch_size"])
    assert np.allclose(adapted[:, 0], pretrained[:, 0])  # conv + positions: no adapter yet
    assert not np.allclose(adapted[:, -1], pretrained[:, -1], atol=1e-3)

    # The manifest on disk, as the workflow passes it.
    manifest_path = tmp_path / "manifest.tsv"
    manifest.to_csv(manifest_path, sep="\t", index=False)
    speakers = dict(zip(manifest["utt_id"], manifest["speaker"], strict=True))
    assert speakers_from_manifest(manifest_path) == speakers
    table = compute_probing(run, cfg, 0, manifest=manifest_path)
    assert len(table) == 2 * (run.encoder.config.encoder_layers + 1)
    assert set(table["protocol"]) == {"crossfit_test"}  # never fitted on the adapter's train split
    emotion = table[table["task"] == "emotion"]
    assert (emotion["n_train"] == 8).all() and (emotion["n_test"] == 8).all()

    with pytest.raises(ValueError, match="adapted encoder"):
        compute_probing(
            run, cfg, 0, manifest=manifest, features_path=tmp_path / "pooled.safetensors"
        )
    with pytest.raises(ValueError, match="manifest"):
        compute_probing(run, cfg, 0)
    with pytest.raises(CorpusError, match="no speaker"):
        compute_probing(run, cfg, 0, manifest=manifest[manifest["utt_id"] != "s4_00"])
