"""Layer contributions: known answers of the per-frame metrics, the residual decomposition of
a real Whisper layer, LoRA's adapted/base variants on the bundled tiny.en, and the per-speaker
rows of the workflow's table (their weighted mean, the adapter delta, the aggregated band)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from serlens.analysis.contributions import (
    COMPONENTS,
    METRICS,
    LayerComponents,
    adapter_delta,
    compute_contributions,
    contribution_sums,
    contributions_from_states,
    layer_components,
    residual_cosine,
    residual_norm_ratio,
)
from serlens.analysis.runs import TrainedRun
from serlens.audio import LogMel
from serlens.models.encoder import attention_mask, embed, load_encoder
from serlens.train.data import Split
from serlens.train.heads import EmotionHead

CLASSES = ["neu", "hap", "ang", "sad"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The converted bundled tiny.en: the workflow's copy if there is one, else converted here (~6 s)."""
    record = REPO / "results" / "models" / "tiny.en.json"
    if record.is_file():
        path = Path(json.loads(record.read_text())["path"])
        if (path / "config.json").is_file():
            return path
    from serlens.models.resolve import resolve_weights

    return resolve_weights("bundled:tiny.en", tmp_path_factory.mktemp("resources"))


def make_split(n, seed, prefix):
    """Short harmonic tones plus noise, 0.5-1 s each."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    waves, durations = [], []
    for label in labels:
        seconds = rng.uniform(0.5, 1.0)
        t = np.arange(int(seconds * 16000)) / 16000
        f0 = 120 + 60 * label
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 4)) * 0.2
        waves.append((wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
        durations.append(seconds)
    return Split([f"{prefix}{i}" for i in range(n)], labels, np.array(durations), [""] * n, waves)


def make_run(weights, rank=None, b_std=0.0, seed=0):
    """A TrainedRun built directly: pre-trained encoder, or LoRA with B = 0 (b_std = 0) or a seeded random B."""
    torch.manual_seed(seed)
    encoder = load_encoder(weights)
    peft_encoder = None
    if rank is not None:
        from peft import get_peft_model

        from serlens.train.lora import lora_config

        lora = {"alpha_per_rank": 2, "dropout": 0.1, "target_modules": ["v_proj"]}
        peft_encoder = get_peft_model(encoder, lora_config(rank, lora))
        peft_encoder.eval()
        if b_std:
            with torch.no_grad():
                for name, p in peft_encoder.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, b_std)
        encoder = peft_encoder.base_model.model
    splits = {
        "train": make_split(4, 1, "tr"),
        "dev": make_split(2, 2, "dv"),
        "test": make_split(5, 3, "te"),
    }
    return TrainedRun(
        model="tiny.en",
        method="frozen" if rank is None else f"lora_r{rank}",
        fold=1,
        encoder=encoder,
        head=EmotionHead(encoder.config.d_model, len(CLASSES)),
        splits=splits,
        classes=CLASSES,
        policy="crop",
        max_seconds=30,
        rank=rank,
        peft_encoder=peft_encoder,
    )


CFG = {"batch_size": 2}


# ---- the per-frame metrics -------------------------------------------------------------


def test_norm_ratio_and_cosine_known_answers():
    h = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0], [1.0, 0.0]])
    u = torch.tensor([[0.0, 5.0], [-6.0, -8.0], [0.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(residual_norm_ratio(u, h), torch.tensor([1.0, 2.0, 0.0, 2.0]))
    # cos([0,5],[3,4]) = 20/25; opposite direction = -1; a zero update = 0; orthogonal = 0
    assert torch.allclose(residual_cosine(u, h), torch.tensor([0.8, -1.0, 0.0, 0.0]))


def test_metrics_work_over_leading_axes():
    rng = torch.Generator().manual_seed(0)
    h, u = torch.randn(2, 3, 7, generator=rng), torch.randn(2, 3, 7, generator=rng)
    assert residual_norm_ratio(u, h).shape == (2, 3)
    expected = torch.nn.functional.cosine_similarity(u, h, dim=-1)
    assert torch.allclose(residual_cosine(u, h), expected, atol=1e-6)


def test_contribution_sums_skip_padding_frames():
    h = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # third frame is padding
    attn = torch.tensor([[[0.5, 0.0], [0.0, -1.0], [100.0, -3.0]]])
    mlp = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [5.0, 5.0]]])
    parts = LayerComponents(h, attn, mlp, h + attn + mlp)
    sums = contribution_sums(parts, torch.tensor([[True, True, False]]))
    assert sums[("attn", "norm_ratio")] == pytest.approx(0.5 + 0.5)
    assert sums[("attn", "cosine")] == pytest.approx(1.0 - 1.0)
    assert sums[("mlp", "norm_ratio")] == pytest.approx(1.0 + 0.0)
    assert sums[("mlp", "cosine")] == pytest.approx(0.0)
    # attn+mlp: frame 1 = [0.5, 1] against [1, 0]; frame 2 = [0, -1] against [0, 2]
    assert sums[("attn+mlp", "norm_ratio")] == pytest.approx(math.sqrt(1.25) + 0.5)
    assert sums[("attn+mlp", "cosine")] == pytest.approx(0.5 / math.sqrt(1.25) - 1.0)


class ToyLayer(nn.Module):
    """Pre-LN block with identity norms, attention = 0.5 x, MLP = -0.25 x: known ratios and cosines."""

    def __init__(self):
        super().__init__()
        self.self_attn_layer_norm = nn.Identity()
        self.self_attn = ToyAttention()

    def forward(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x))[0]
        return x - 0.25 * x


class ToyAttention(nn.Module):
    def forward(self, x):
        return 0.5 * x, None


def test_toy_layer_known_ratios():
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    parts = layer_components(ToyLayer(), h, None)
    # a = 0.5 h, m = -0.25 (1.5 h) = -0.375 h, a + m = 0.125 h
    assert torch.allclose(parts.attn_out, 0.5 * h)
    assert torch.allclose(parts.mlp_out, -0.375 * h)
    sums = contribution_sums(parts, torch.ones(2, 5, dtype=torch.bool))
    means = {k: v / 10 for k, v in sums.items()}
    assert means[("attn", "norm_ratio")] == pytest.approx(0.5)
    assert means[("mlp", "norm_ratio")] == pytest.approx(0.375)
    assert means[("attn+mlp", "norm_ratio")] == pytest.approx(0.125)
    assert means[("attn", "cosine")] == pytest.approx(1.0)
    assert means[("mlp", "cosine")] == pytest.approx(-1.0)
    assert means[("attn+mlp", "cosine")] == pytest.approx(1.0)


# ---- a real Whisper layer --------------------------------------------------------------


def test_real_layer_decomposition_reconstructs_its_output(tiny_weights):
    encoder = load_encoder(tiny_weights)
    split = make_split(3, 4, "x")
    batch = LogMel(encoder.config.num_mel_bins)(split.waves, "crop")
    with torch.inference_mode():
        h = embed(encoder, batch.mel)
        mask = attention_mask(batch, h.dtype)
        h = encoder.layers[0](h, mask)  # a state inside the stream, not the embedding
        layer = encoder.layers[1]
        parts = layer_components(layer, h, mask)
        expected_attn = layer.self_attn(
            hidden_states=layer.self_attn_layer_norm(h), attention_mask=mask
        )[0]
        mid = h + expected_attn
        expected_mlp = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(mid))))
        expected_post = layer(h, mask)
    assert torch.equal(parts.resid_post, expected_post)
    assert torch.allclose(
        parts.resid_pre + parts.attn_out + parts.mlp_out, parts.resid_post, atol=1e-5
    )
    assert torch.allclose(parts.attn_out, expected_attn, atol=1e-5)
    assert torch.allclose(parts.mlp_out, expected_mlp, atol=1e-4)
    # the capture hook is removed afterwards
    assert not layer.self_attn._forward_hooks


# ---- the analysis on runs --------------------------------------------------------------


def _values(table, variant):
    return (
        table[table["variant"] == variant]
        .sort_values(["layer", "component", "metric"])["value"]
        .to_numpy()
    )


def test_lora_at_initialisation_adapted_equals_base(tiny_weights):
    table = compute_contributions(make_run(tiny_weights, rank=4), CFG, seed=0)
    n_layers = 4
    assert set(table["variant"]) == {"adapted", "base"}
    assert len(table) == 2 * n_layers * 3 * 2
    assert list(table.columns) == [
        "variant",
        "layer",
        "depth",
        "component",
        "metric",
        "value",
        "n_frames",
    ]
    assert sorted(table["layer"].unique()) == [1, 2, 3, 4]
    assert np.allclose(table["depth"], table["layer"] / n_layers)
    np.testing.assert_array_equal(_values(table, "adapted"), _values(table, "base"))
    assert np.all(np.isfinite(table["value"]))
    ratios = table[table["metric"] == "norm_ratio"]["value"]
    cosines = table[table["metric"] == "cosine"]["value"]
    assert (ratios > 0).all() and (cosines.abs() <= 1).all()


def test_trained_adapter_changes_adapted_rows_and_base_matches_frozen(tiny_weights):
    lora = compute_contributions(make_run(tiny_weights, rank=4, b_std=0.05), CFG, seed=0)
    frozen = compute_contributions(make_run(tiny_weights), CFG, seed=0)
    assert set(frozen["variant"]) == {"base"}
    assert not np.allclose(_values(lora, "adapted"), _values(lora, "base"))
    np.testing.assert_allclose(_values(lora, "base"), _values(frozen, "base"), atol=1e-6)


# ---- the workflow's table: per test speaker ----------------------------------------------

N_LAYERS = 2
SPEAKERS = ["a", "b", "a", "b", "b"]


class FakeStates(dict):
    path = Path("fake/states.safetensors")


def fake_states(seed: int, frames=(10, 30, 20, 5, 40)) -> FakeStates:
    """Per-utterance frame sums of (layer, component, metric): metric value (seeded) x frames."""
    rng = np.random.default_rng(seed)
    frames = np.asarray(frames, dtype=np.int64)
    means = rng.uniform(0.1, 1.0, (len(frames), N_LAYERS, len(COMPONENTS), len(METRICS)))
    return FakeStates(
        {"test/contrib": means * frames[:, None, None, None], "test/frames": frames}
    ), means


def test_each_test_utterance_weighs_the_same():
    # two utterances of 1 and 3 frames with per-frame values 1 and 0: (1 + 0) / 2, not 1 / 4
    contrib = np.zeros((2, 1, len(COMPONENTS), len(METRICS)))
    contrib[0] = 1.0
    states = FakeStates({"test/contrib": contrib, "test/frames": np.array([1, 3])})
    table = contributions_from_states(states, None, False)
    assert np.allclose(table["value"], 0.5) and (table["n_frames"] == 4).all()


def test_per_speaker_rows_average_to_the_run_value():
    states, means = fake_states(0)
    whole = contributions_from_states(states, None, False)
    split = contributions_from_states(states, None, False, np.array(SPEAKERS))
    assert list(split.columns) == [
        "variant",
        "layer",
        "depth",
        "component",
        "metric",
        "speaker",
        "n_utts",
        "value",
        "n_frames",
    ]
    assert len(split) == 2 * len(whole)
    a = split[split["speaker"] == "a"]
    assert (a["n_utts"] == 2).all() and (a["n_frames"] == 10 + 20).all()
    first = a[(a["layer"] == 1) & (a["component"] == "attn") & (a["metric"] == "norm_ratio")]
    assert float(first["value"].iloc[0]) == pytest.approx(
        (means[0, 0, 0, 0] + means[2, 0, 0, 0]) / 2
    )
    keys = ["variant", "layer", "component", "metric"]
    weighted = split.assign(w=split["value"] * split["n_utts"]).groupby(keys)[["w", "n_utts"]].sum()
    run_value = (weighted["w"] / weighted["n_utts"]).rename("run").reset_index()
    merged = whole.merge(run_value, on=keys)
    np.testing.assert_allclose(merged["value"], merged["run"], rtol=1e-12)
    with pytest.raises(ValueError, match="5 test utterances, 2 speakers"):
        contributions_from_states(states, None, False, np.array(["a", "b"]))


def test_adapter_delta_is_taken_per_speaker():
    own, _ = fake_states(1)
    base, _ = fake_states(2)
    table = contributions_from_states(own, base, True, np.array(SPEAKERS))
    run_columns = ["model", "method", "seed", "fold", "speaker", "n_utts"]
    long = table.assign(model="m", method="lora_r4", seed=0, fold=1)
    delta = adapter_delta(long, run_columns)
    assert set(delta["variant"]) == {"delta"} and len(delta) == len(table) // 2
    keys = ["speaker", "layer", "component", "metric"]
    pick = lambda v: table[table["variant"] == v].set_index(keys)["value"]  # noqa: E731
    expected = (pick("adapted") - pick("base")).sort_index()
    got = delta.set_index(keys)["value"].sort_index()
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy())
    assert set(delta["n_utts"]) == {2, 3}


def test_aggregated_contributions_have_a_speaker_band_and_the_run_means(tmp_path):
    from serlens.report.aggregate import aggregate_runs

    files, expected = {}, []
    for fold in (1, 2, 3):
        own, _ = fake_states(10 + fold)
        base, _ = fake_states(20 + fold)
        table = contributions_from_states(own, base, True, np.array(SPEAKERS))
        path = tmp_path / f"fold{fold}.tsv"
        table.to_csv(path, sep="\t", index=False)
        files[("m", "lora_r4", 0, fold)] = path
        whole = contributions_from_states(own, base, True)
        expected.append(whole.set_index(["variant", "layer", "component", "metric"])["value"])
    agg = aggregate_runs("contributions", files, resamples=200)
    assert set(agg["variant"]) == {"adapted", "base", "delta"}
    assert agg["band_low"].notna().all() and (agg["band_low"] <= agg["band_high"]).all()
    means = pd.concat(expected, axis=1).mean(axis=1)
    adapted = agg[agg["variant"] != "delta"].set_index(["variant", "layer", "component", "metric"])
    np.testing.assert_allclose(adapted["mean"], means.loc[adapted.index], rtol=1e-9)
    delta = agg[agg["variant"] == "delta"].set_index(["layer", "component", "metric"])["mean"]
    diff = (means.loc["adapted"] - means.loc["base"]).loc[delta.index]
    np.testing.assert_allclose(delta, diff, rtol=1e-9, atol=1e-12)
    norm = agg[agg["metric"] == "norm_ratio"]
    assert (norm.loc[norm["variant"] != "delta", "band_low"] > 0).all()


def test_analysis_reads_the_speakers_of_the_test_utterances(tmp_path):
    from serlens.analysis.passes import write_states
    from serlens.analysis.registry import ANALYSES, RunData, Settings
    from serlens.methods import parse_method

    own, _ = fake_states(3)
    base, _ = fake_states(4)
    ids = [f"te{i}" for i in range(5)]
    write_states(
        tmp_path / "own.safetensors",
        {"test": {"contrib": own["test/contrib"], "frames": own["test/frames"]}},
        {"test": ids},
    )
    write_states(
        tmp_path / "base.safetensors",
        {"all": {"contrib": base["test/contrib"], "frames": base["test/frames"]}},
        {"all": ids, "fold1/test": ids},
    )
    inputs = {"states": str(tmp_path / "own.safetensors")}
    inputs["base_states"] = str(tmp_path / "base.safetensors")
    data = RunData("c", "m", parse_method("lora_r4"), 0, 1, CLASSES, inputs)
    data.splits = {"test": Split(ids, np.zeros(5, int), np.ones(5), [""] * 5, None)}
    data.speakers = dict(zip(ids, SPEAKERS, strict=True))
    table = ANALYSES["contributions"].compute(data, Settings("analysis contributions", {}))
    expected = contributions_from_states(own, base, True, np.array(SPEAKERS))
    pd.testing.assert_frame_equal(table, expected)
    data.splits = {"test": Split(ids[::-1], np.zeros(5, int), np.ones(5), [""] * 5, None)}
    with pytest.raises(ValueError, match="test utterances differ"):
        ANALYSES["contributions"].compute(data, Settings("analysis contributions", {}))
