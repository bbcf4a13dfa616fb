"""Logit and tuned lens: known answers of KL and entropy, the lens at the last layer reproducing
the model's output, the tuned lens' identity start and affine pooling, on the bundled tiny.en."""

import math

import numpy as np
import pytest
import torch
from test_contributions import CLASSES, make_run, tiny_weights  # noqa: F401  (session fixture)

from serlens.analysis.logit_lens import (
    TunedLens,
    affine_readout,
    compute_logit_lens,
    entropy,
    fit_tuned_lens,
    kl_divergence,
    logit_lens,
    pooled_normalised_states,
)
from serlens.metrics import uar, war
from serlens.models.encoder import masked_mean, run_encoder
from serlens.train.heads import EmotionHead

CFG = {"batch_size": 2, "train_sample": 4, "tuned_lens": True, "tuned_lens_steps": 20}
METRICS = {"uar", "war", "agreement", "kl", "entropy"}


# ---- pure functions --------------------------------------------------------------------


def test_kl_known_answer_and_zero_on_itself():
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_divergence(p, q)) == pytest.approx(expected)
    assert float(kl_divergence(q, p)) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(3, 5), atol=1e-6)
    assert (kl_divergence(logits[:, :1], logits) >= -1e-6).all()
    # logits are defined up to a constant
    assert float(kl_divergence(p + 3.0, q - 1.0)) == pytest.approx(expected)


def test_entropy_known_answers():
    assert float(entropy(torch.zeros(4))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([0.0, -1e4, -1e4]))) == pytest.approx(0.0, abs=1e-6)
    two = torch.log(torch.tensor([0.25, 0.75]))
    assert float(entropy(two)) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_tuned_lens_starts_at_identity_and_translating_commutes_with_pooling():
    torch.manual_seed(0)
    head = EmotionHead(6, 3, 5)
    states = torch.randn(7, 4, 6)
    lens = TunedLens(head, 3, 6)
    with torch.no_grad():
        assert torch.equal(lens(states), logit_lens(head, states))
        lens.weight.normal_()
        lens.bias.normal_()
        frames = torch.randn(2, 9, 4, 6)  # (B, T, L + 1, D)
        mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
        pooled_then_translated = lens.translate(
            torch.stack([masked_mean(frames[:, :, layer], mask) for layer in range(4)], dim=1)
        )
        translated = torch.stack([lens.translate(frames[:, t]) for t in range(9)], dim=1)
        translated_then_pooled = torch.stack(
            [masked_mean(translated[:, :, layer], mask) for layer in range(4)], dim=1
        )
        assert torch.allclose(pooled_then_translated, translated_then_pooled, atol=1e-5)
        assert torch.equal(
            lens.translate(states)[:, -1], states[:, -1]
        )  # the last layer stays as it is


def test_fit_tuned_lens_lowers_the_kl_deterministically_and_leaves_the_head():
    torch.manual_seed(0)
    head = EmotionHead(8, 3, 5)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    states = torch.randn(12, 3, 8)
    final = logit_lens(head, states[:, -1:])
    with torch.no_grad():
        start = kl_divergence(final, logit_lens(head, states)).mean(0)
    lens = fit_tuned_lens(head, states, steps=50)
    with torch.no_grad():
        end = kl_divergence(final, lens(states)).mean(0)
    assert (end[:-1] < start[:-1]).all() and end[-1] == 0
    again = fit_tuned_lens(head, states, steps=50)
    assert torch.equal(lens.weight, again.weight)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    assert all(p.grad is None for p in head.parameters())


def test_affine_shortcut_fits_the_same_lens_as_the_direct_path(monkeypatch):
    import serlens.analysis.logit_lens as logit_lens_module

    torch.manual_seed(1)
    head = EmotionHead(8, 3, 5)
    weight, bias = affine_readout(head, 8)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(x @ weight.T + bias, head(x), atol=1e-5)
    assert affine_readout(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh()), 8) is None
    states = torch.randn(12, 3, 8)
    shortcut = fit_tuned_lens(head, states, steps=30)
    monkeypatch.setattr(logit_lens_module, "affine_readout", lambda head, d_model: None)
    direct = fit_tuned_lens(head, states, steps=30)
    assert torch.allclose(shortcut.weight, direct.weight, atol=1e-5)
    assert torch.allclose(shortcut.bias, direct.bias, atol=1e-5)


def test_weighted_sum_head_is_refused():
    with pytest.raises(ValueError, match="weighted-sum"):
        logit_lens(EmotionHead(4, 2, 3, n_layers=3), torch.zeros(1, 3, 4))


# ---- on real runs ----------------------------------------------------------------------


def _values(table, lens, variant):
    sub = table[(table["lens"] == lens) & (table["variant"] == variant)]
    return sub.sort_values(["layer", "metric"])["value"].to_numpy()


@pytest.fixture(scope="module")
def lora_run(tiny_weights):  # noqa: F811
    return make_run(tiny_weights, rank=4, b_std=0.05)


@pytest.fixture(scope="module")
def lora_table(lora_run):
    return compute_logit_lens(lora_run, CFG, seed=0)


def test_last_layer_is_the_models_output(lora_run, lora_table):
    run, table = lora_run, lora_table
    test = run.splits["test"]
    n_layers = 4
    last = table[(table["layer"] == n_layers) & (table["variant"] == "adapted")].set_index(
        ["lens", "metric"]
    )["value"]
    for lens in ("logit", "tuned"):
        assert last[(lens, "kl")] == pytest.approx(0.0, abs=1e-6)
        assert last[(lens, "agreement")] == 1.0

    # What the model outputs: head(masked_mean(last_hidden_state)), one utterance at a time.
    with torch.inference_mode():
        outputs = []
        for _, batch in run.batches(test, 1):
            out = run_encoder(run.encoder, batch)
            outputs.append(run.head(masked_mean(out.last_hidden_state, out.frame_mask)))
        order = np.argsort(test.durations, kind="stable")
        model_logits = torch.zeros(len(test), len(CLASSES))
        model_logits[order] = torch.cat(outputs)
        lens_logits = torch.zeros_like(model_logits)
        for chunk, batch in run.batches(test, 2):
            lens_logits[chunk] = logit_lens(run.head, pooled_normalised_states(run.encoder, batch))[
                :, -1
            ]
    assert torch.allclose(lens_logits, model_logits, atol=1e-4)
    preds = model_logits.argmax(1).numpy()
    assert last[("logit", "uar")] == pytest.approx(uar(test.labels, preds, len(CLASSES)))
    assert last[("logit", "war")] == pytest.approx(war(test.labels, preds))
    ent = entropy(model_logits).mean()
    assert last[("logit", "entropy")] == pytest.approx(float(ent), abs=1e-5)


def test_table_layout_and_variants(lora_table):
    table = lora_table
    assert list(table.columns) == ["lens", "variant", "layer", "depth", "metric", "value"]
    assert set(map(tuple, table[["lens", "variant"]].drop_duplicates().to_numpy())) == {
        ("logit", "adapted"),
        ("logit", "base"),
        ("tuned", "adapted"),
    }
    assert set(table[table["lens"] == "logit"]["metric"]) == METRICS
    assert set(table[table["lens"] == "tuned"]["metric"]) == METRICS | {"fit_kl"}
    assert sorted(table["layer"].unique()) == [0, 1, 2, 3, 4]
    assert np.allclose(table["depth"], table["layer"] / 4)
    assert np.all(np.isfinite(table["value"]))
    # the adapter changes what the head reads; the embedding (layer 0) is before any adapter
    adapted, base = _values(table, "logit", "adapted"), _values(table, "logit", "base")
    assert not np.allclose(adapted, base)
    layer0 = table[(table["lens"] == "logit") & (table["layer"] == 0)]
    assert np.allclose(
        *[g.sort_values("metric")["value"].to_numpy() for _, g in layer0.groupby("variant")]
    )


def test_lora_at_initialisation_adapted_equals_base_and_no_tuned_lens_when_off(tiny_weights):  # noqa: F811
    run = make_run(tiny_weights, rank=4)
    table = compute_logit_lens(run, {**CFG, "tuned_lens": False}, seed=0)
    assert set(table["lens"]) == {"logit"}
    np.testing.assert_array_equal(
        _values(table, "logit", "adapted"), _values(table, "logit", "base")
    )
    frozen = compute_logit_lens(make_run(tiny_weights), {**CFG, "tuned_lens": False}, seed=0)
    assert set(frozen["variant"]) == {"base"}
