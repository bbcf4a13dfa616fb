"""Layer-wise probing: control labels, speaker-grouped C selection, known answers on synthetic
states, and the real bundled encoder (frozen from the feature cache, LoRA from the adapted encoder)."""

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
    compute_probing,
    fit_probe,
    permute_within_groups,
    pooled_states,
    probe_layers,
    speaker_folds,
    speakers_from_manifest,
)
from serlens.analysis.runs import TrainedRun
from serlens.errors import ConfigError, CorpusError

CLASSES = ["neu", "hap", "ang", "sad"]
COLUMNS = [
    "layer",
    "depth",
    "task",
    "C",
    "cv_uar",
    "uar",
    "war",
    "converged",
    "cv_unconverged",
    "n_train",
    "n_test",
    "selectivity_uar",
    "selectivity_war",
]


# --------------------------------------------------------------------------- pure pieces


def test_permutation_within_groups_keeps_each_groups_labels_and_moves_them():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.array(["s1", "s2", "s3", "s4"]), [30, 25, 40, 5])
    labels = rng.integers(0, 4, len(groups))
    permuted = permute_within_groups(labels, groups, np.random.default_rng(1))
    for g in np.unique(groups):
        assert Counter(permuted[groups == g]) == Counter(labels[groups == g])
    assert np.mean(permuted != labels) > 0.3
    again = permute_within_groups(labels, groups, np.random.default_rng(1))
    assert np.array_equal(permuted, again)
    assert not np.array_equal(
        permuted, permute_within_groups(labels, groups, np.random.default_rng(2))
    )
    with pytest.raises(ValueError, match="shape"):
        permute_within_groups(labels, groups[:-1], rng)


def test_speaker_folds_never_put_a_speaker_on_both_sides():
    groups = np.repeat([f"spk{i}" for i in range(7)], [3, 10, 4, 8, 6, 2, 9])
    folds = speaker_folds(groups, 3)
    assert len(folds) == 3
    validation = np.concatenate([val for _, val in folds])
    assert np.array_equal(
        np.sort(validation), np.arange(len(groups))
    )  # each utterance validated once
    for fit_idx, val_idx in folds:
        assert not set(groups[fit_idx]) & set(groups[val_idx])
        assert len(fit_idx) + len(val_idx) == len(groups)
    with pytest.raises(ConfigError, match="probe_cv_folds"):
        speaker_folds(groups[:13], 3)  # only two speakers


def separable_states(n_per_speaker, speakers, seed, n_classes=4, dim=16):
    """Layer 0: noise; layer 1: class means 8 apart plus unit noise (linearly separable)."""
    rng = np.random.default_rng(seed)
    means = 8.0 * np.random.default_rng(123).standard_normal((n_classes, dim))
    labels = np.tile(np.arange(n_classes), len(speakers) * n_per_speaker // n_classes)
    groups = np.repeat(speakers, n_per_speaker)
    noise = rng.standard_normal((len(labels), dim))
    states = np.stack([noise, means[labels] + rng.standard_normal((len(labels), dim))], axis=1)
    return states, labels, groups


@pytest.fixture(scope="module")
def separable_table():
    train = separable_states(40, ["a", "b", "c", "d", "e", "f"], seed=0)
    test = separable_states(100, ["g", "h"], seed=1)
    return probe_layers(*train, *test, n_classes=4, Cs=[0.01, 0.1, 1.0], cv=3, seed=0)


def test_probe_reads_separable_layers_and_its_control_stays_at_chance(separable_table):
    table = separable_table.set_index(["layer", "task"])
    assert table.loc[(1, "emotion"), "uar"] == pytest.approx(1.0, abs=0.01)
    assert table.loc[(1, "emotion"), "war"] == pytest.approx(1.0, abs=0.01)
    for layer in (0, 1):
        assert table.loc[(layer, "control"), "uar"] == pytest.approx(0.25, abs=0.1)
    assert table.loc[(0, "emotion"), "uar"] == pytest.approx(0.25, abs=0.1)  # noise layer
    assert table["converged"].all() and (table["cv_unconverged"] == 0).all()


def test_table_layout_and_selectivity(separable_table):
    table = separable_table
    assert list(table.columns) == COLUMNS
    assert len(table) == 4 and list(table["task"]) == ["emotion", "control"] * 2
    assert list(table["depth"]) == [0.0, 0.0, 1.0, 1.0]
    assert (table["n_train"] == 240).all() and (table["n_test"] == 200).all()
    emotion, control = table[table["task"] == "emotion"], table[table["task"] == "control"]
    for metric in ("uar", "war"):
        expected = emotion[metric].to_numpy() - control[metric].to_numpy()
        assert np.allclose(emotion[f"selectivity_{metric}"], expected)
        assert control[f"selectivity_{metric}"].isna().all()
    assert emotion["selectivity_uar"].iloc[1] > 0.6


def test_c_ties_go_to_the_strongest_regularisation():
    X, y, groups = separable_states(20, ["a", "b", "c", "d"], seed=2)
    probe = fit_probe(X[:, 1], y, groups, Cs=[10.0, 0.01, 1.0], cv=2, n_classes=4)
    assert probe.cv_uar == 1.0  # every C separates the held-out speakers perfectly...
    assert probe.C == 0.01  # ...so the smallest C wins


def test_cv_goes_through_the_speaker_splitter(monkeypatch):
    X, y, groups = separable_states(20, ["a", "b", "c", "d", "e"], seed=3)
    seen = []

    def spy(groups_arg, n_splits):
        folds = speaker_folds(groups_arg, n_splits)
        seen.append((np.asarray(groups_arg), folds))
        return folds

    monkeypatch.setattr(probing, "speaker_folds", spy)
    fit_probe(X[:, 1], y, groups, Cs=[1.0], cv=3, n_classes=4)
    ((used_groups, folds),) = seen
    assert np.array_equal(used_groups, groups)
    for fit_idx, val_idx in folds:
        assert not set(groups[fit_idx]) & set(groups[val_idx])


def test_convergence_failures_are_recorded_not_raised():
    X, y, groups = separable_states(20, ["a", "b", "c"], seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # any leak would raise
        probe = fit_probe(X[:, 0] * 100, y, groups, Cs=[1.0, 100.0], cv=3, n_classes=4, max_iter=1)
    assert not probe.converged
    assert probe.cv_unconverged == 3 * 2


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
def speakers(corpus):
    return dict(zip(corpus["frame"]["utt_id"], corpus["frame"]["speaker"], strict=True))


def test_frozen_run_is_probed_from_the_cache_without_an_encoder_pass(
    encoder_dir, corpus, cfg, speakers, monkeypatch
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
    table = compute_probing(run, cfg, 0, features_path=cache, speakers=speakers)
    n_layers = run.encoder.config.encoder_layers
    assert list(table.columns) == COLUMNS and len(table) == 2 * (n_layers + 1)
    assert list(table["layer"]) == [layer for layer in range(n_layers + 1) for _ in range(2)]
    assert table["depth"].iloc[-1] == 1.0
    assert table["C"].isin(cfg["probe_Cs"]).all()
    assert table[["uar", "war"]].apply(lambda c: c.between(0, 1)).all().all()

    mismatched = dataclasses.replace(run, policy="pad30")
    with pytest.raises(ConfigError, match="features rule"):
        compute_probing(mismatched, cfg, 0, features_path=cache, speakers=speakers)


def test_lora_run_is_probed_on_its_adapted_encoder(encoder_dir, corpus, cfg, speakers, tmp_path):
    run = lora_run(encoder_dir, corpus["splits"])
    adapted = pooled_states(run, corpus["splits"]["test"], cfg["batch_size"])
    with run.adapter_disabled():
        pretrained = pooled_states(run, corpus["splits"]["test"], cfg["batch_size"])
    assert np.allclose(adapted[:, 0], pretrained[:, 0])  # conv + positions: no adapter yet
    assert not np.allclose(adapted[:, -1], pretrained[:, -1], atol=1e-3)

    # Speakers from a manifest on disk, as the workflow passes them.
    manifest = corpus["frame"].assign(
        session="1", gender="F", label=[CLASSES[i] for i in corpus["frame"]["label"]]
    )
    manifest_path = tmp_path / "manifest.tsv"
    manifest.to_csv(manifest_path, sep="\t", index=False)
    assert speakers_from_manifest(manifest_path) == speakers
    table = compute_probing(run, cfg, 0, manifest_path=manifest_path)
    assert len(table) == 2 * (run.encoder.config.encoder_layers + 1)
    assert (table["n_train"] == 12).all() and (table["n_test"] == 8).all()

    with pytest.raises(ValueError, match="adapted encoder"):
        compute_probing(
            run, cfg, 0, features_path=tmp_path / "pooled.safetensors", speakers=speakers
        )
    with pytest.raises(ValueError, match="manifest_path"):
        compute_probing(run, cfg, 0)
    with pytest.raises(CorpusError, match="no speaker"):
        compute_probing(run, cfg, 0, speakers={k: v for k, v in speakers.items() if k != "s4_00"})
