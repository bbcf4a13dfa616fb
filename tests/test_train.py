"""Training invariants on the real bundled encoder and a few short clips (one or two epochs)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from serlens.audio import LogMel
from serlens.models.encoder import load_encoder, pooled_layer_states, run_encoder
from serlens.models.resolve import resolve_weights
from serlens.train.data import Split, metrics_from_predictions
from serlens.train.frozen import run_frozen
from serlens.train.loop import warmup_linear_decay
from serlens.train.lora import LoraEmotionModel, run_lora

CLASSES = ["neu", "hap", "ang", "sad"]


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return resolve_weights("bundled:tiny.en", tmp_path_factory.mktemp("resources"))


def make_split(n, seed, prefix):
    """Clips whose class sets the pitch of a harmonic tone, so there is something to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    waves, durations = [], []
    for label in labels:
        seconds = rng.uniform(0.6, 1.2)
        t = np.arange(int(seconds * 16000)) / 16000
        f0 = 120 + 60 * label + rng.normal(0, 5)
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 4)) * 0.2
        waves.append((wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
        durations.append(seconds)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    return Split(ids, labels, np.array(durations), [""] * n, waves)


@pytest.fixture()
def splits():
    return {
        "train": make_split(8, 0, "tr"),
        "dev": make_split(4, 1, "dv"),
        "test": make_split(6, 2, "te"),
    }


def config(epochs=2):
    from serlens.config import validate_config

    cfg = validate_config({})
    cfg["train"].update(epochs=epochs, batch_size=4, patience=5, frozen_epochs=epochs)
    cfg["seed"] = 0  # the run's training seed (steps.train_run passes the grid's)
    return cfg


def test_lora_at_initialisation_leaves_the_encoder_unchanged(weights):
    encoder = load_encoder(weights)
    batch = LogMel()([make_split(2, 3, "x").waves[0]], "crop")
    with torch.no_grad():
        before = run_encoder(encoder, batch).last_hidden_state.clone()
        model = LoraEmotionModel(encoder, 4, 8, config()["lora"])
        after = run_encoder(model.encoder, batch).last_hidden_state
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert model.peft_encoder.peft_config["default"].lora_alpha == 16


def test_lora_run_outputs_and_resume(weights, splits, tmp_path):
    cfg = config(epochs=2)
    info = {"model": "tiny.en", "fold": 1}
    run_lora(load_encoder(weights), splits, CLASSES, 8, cfg, tmp_path / "full", None, info)

    # Kill the run after its first epoch, then rerun: it resumes from the checkpoint.
    class Killed(Exception):
        pass

    import serlens.train.lora as lora_module

    original_fit = lora_module.fit

    def fit_killed_after_epoch_1(*args, **kwargs):
        def kill(epoch):
            if epoch == 1:
                raise Killed

        return original_fit(*args, on_epoch_end=kill, **kwargs)

    ckpt = tmp_path / "ckpt" / "last.pt"
    lora_module.fit = fit_killed_after_epoch_1
    try:
        with pytest.raises(Killed):
            run_lora(
                load_encoder(weights), splits, CLASSES, 8, cfg, tmp_path / "resumed", ckpt, info
            )
    finally:
        lora_module.fit = original_fit
    assert not (tmp_path / "resumed" / "metrics.json").exists()  # nothing looks complete
    assert ckpt.is_file()
    run_lora(load_encoder(weights), splits, CLASSES, 8, cfg, tmp_path / "resumed", ckpt, info)

    full = pd.read_csv(tmp_path / "full" / "predictions.tsv", sep="\t")
    resumed = pd.read_csv(tmp_path / "resumed" / "predictions.tsv", sep="\t")
    pd.testing.assert_frame_equal(full, resumed)
    h_full = pd.read_csv(tmp_path / "full" / "history.tsv", sep="\t")
    h_resumed = pd.read_csv(tmp_path / "resumed" / "history.tsv", sep="\t")
    pd.testing.assert_series_equal(h_full["train_loss"], h_resumed["train_loss"])
    # the adapter at initialisation and after each epoch, the same whether killed or not
    from safetensors.numpy import load_file

    for run in ("full", "resumed"):
        names = sorted(p.name for p in (tmp_path / run / "adapter_epochs").iterdir())
        assert names == ["epoch0.safetensors", "epoch1.safetensors", "epoch2.safetensors"]
    for epoch in (0, 1, 2):
        a = load_file(str(tmp_path / "full" / "adapter_epochs" / f"epoch{epoch}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "adapter_epochs" / f"epoch{epoch}.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    init = load_file(str(tmp_path / "full" / "adapter_epochs" / "epoch0.safetensors"))
    assert all(not v.any() for k, v in init.items() if "lora_B" in k)  # B = 0 at initialisation

    # predictions cover the test split exactly once, metrics match a recomputation
    assert sorted(full["utt_id"]) == sorted(splits["test"].utt_ids)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    recomputed = metrics_from_predictions(full, CLASSES)
    for key in ("uar", "war", "macro_f1", "confusion"):
        assert metrics[key] == recomputed[key]
    assert np.allclose(full[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-4)
    assert (tmp_path / "full" / "adapter" / "adapter_model.safetensors").is_file()
    assert metrics["best_epoch"] in (1, 2) and len(h_full) == 2


def test_lora_run_is_repeatable(weights, splits, tmp_path):
    cfg = config(epochs=1)
    for name in ("a", "b"):
        run_lora(load_encoder(weights), splits, CLASSES, 4, cfg, tmp_path / name, None, {})
    a = pd.read_csv(tmp_path / "a" / "predictions.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "b" / "predictions.tsv", sep="\t")
    pd.testing.assert_frame_equal(a, b)


def test_frozen_heads_never_touch_the_encoder(weights, splits, tmp_path):
    encoder = load_encoder(weights)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    logmel = LogMel()
    with torch.no_grad():
        features = {
            name: pooled_layer_states(encoder, logmel(s.waves, "crop"))
            for name, s in splits.items()
        }
    run_frozen(
        features,
        splits,
        CLASSES,
        config(epochs=3)["train"],
        0,
        tmp_path,
        tmp_path / "ckpt",
        {"model": "tiny.en"},
        readouts=("last", "wsum"),  # both heads in one folder: the second gets its suffix
    )
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for suffix in ("", "_wsum"):
        predictions = pd.read_csv(tmp_path / f"predictions{suffix}.tsv", sep="\t")
        assert sorted(predictions.utt_id) == sorted(splits["test"].utt_ids)
        metrics = json.loads((tmp_path / f"metrics{suffix}.json").read_text())
        assert metrics["uar"] == metrics_from_predictions(predictions, CLASSES)["uar"]
    weights_sum = json.loads((tmp_path / "metrics_wsum.json").read_text())["layer_weights"]
    assert len(weights_sum) == 5 and abs(sum(weights_sum) - 1) < 1e-5


def test_crop_states_do_not_depend_on_the_batch(weights):
    encoder = load_encoder(weights)
    short, long = make_split(2, 5, "x").waves[0], np.tile(make_split(2, 6, "y").waves[1], 3)
    logmel = LogMel()
    with torch.no_grad():
        alone = pooled_layer_states(encoder, logmel([short], "crop"))
        batched = pooled_layer_states(encoder, logmel([short, long], "crop"))
        padded = pooled_layer_states(encoder, logmel([short], "pad30"))
    assert torch.allclose(alone[0], batched[0], atol=1e-4)
    assert not torch.allclose(
        alone[0], padded[0], atol=1e-2
    )  # pad30 attends to the padding, as Whisper does


def test_learning_rate_schedule():
    factor = warmup_linear_decay(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and factor(100) == 0.0
