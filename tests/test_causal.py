"""Causal tests: known answers of every intervention, on real tiny.en weights with seeded adapters."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from serlens.analysis.causal import (
    PER_LAYER,
    causal_logits,
    causal_table,
    cyclic_align,
    layer_forward,
    logit_diff,
    paper_rows,
    per_utterance,
    read_causal,
    run_variant,
    write_causal,
)
from serlens.models.encoder import masked_mean, run_encoder

SETTINGS = {
    "batch_size": 4,
    "train_sample": 4,
    "seed": 0,
    "causal_stride": 1,
    "causal_ablation": "mean",
}


@pytest.fixture(scope="module")
def causal(lora_run):
    logits, variants = causal_logits(lora_run, SETTINGS)
    return (
        logits,
        variants,
        {(v["family"], v["layer"], v["variant"]): k for k, v in enumerate(variants)},
    )


def exact_shortcut_logits(run) -> tuple[np.ndarray, list[dict]]:
    """``causal_logits`` of ``run`` with its shortcuts, after checking that they equal every
    variant computed as asked, bit for bit."""
    fast, variants = causal_logits(run, SETTINGS)
    plain, plain_variants = causal_logits(run, SETTINGS, shortcuts=False)
    assert plain_variants == variants
    np.testing.assert_array_equal(fast, plain)
    return fast, variants


def direct_logits(run, adapters: bool) -> np.ndarray:
    """The head on the (adapted or frozen) encoder, one utterance at a time."""
    test = run.splits["test"]
    out = []
    context = contextlib.nullcontext() if adapters else run.adapter_disabled()
    with context, torch.inference_mode():
        for i in range(len(test)):
            _, batch = next(run.batches(test, 1, np.array([i])))
            hidden = run_encoder(run.encoder, batch)
            out.append(run.head(masked_mean(hidden.last_hidden_state, hidden.frame_mask))[0])
    return torch.stack(out).numpy()


def test_all_on_is_the_run_and_all_off_the_frozen_encoder(lora_run, causal):
    logits, _, at = causal
    np.testing.assert_allclose(
        logits[at[("reference", -1, "on")]], direct_logits(lora_run, True), atol=2e-4
    )
    off = logits[at[("reference", -1, "off")]]
    np.testing.assert_allclose(off, direct_logits(lora_run, False), atol=2e-4)
    assert np.abs(logits[at[("reference", -1, "on")]] - off).max() > 1e-3  # the adapters matter


def test_layer_sets_at_their_ends_equal_the_references(causal, lora_run):
    logits, _, at = causal
    L = len(lora_run.encoder.layers)
    on, off = logits[at[("reference", -1, "on")]], logits[at[("reference", -1, "off")]]
    np.testing.assert_allclose(logits[at[("adapters_upto", L - 1, "adapters_upto")]], on, atol=1e-5)
    np.testing.assert_allclose(logits[at[("adapters_from", 0, "adapters_from")]], on, atol=1e-5)
    if L == 1:
        np.testing.assert_allclose(logits[at[("adapter_off", 0, "adapter_off")]], off, atol=1e-5)
    # patching the last layer's output carries the whole gap, in both directions
    np.testing.assert_allclose(
        logits[at[("patch_adapted_into_frozen", L - 1, "patch_adapted_into_frozen")]], on, atol=1e-4
    )
    np.testing.assert_allclose(
        logits[at[("patch_frozen_into_adapted", L - 1, "patch_frozen_into_adapted")]],
        off,
        atol=1e-4,
    )


def test_shares_are_zero_and_one_at_the_references(causal, lora_run):
    logits, variants, at = causal
    labels = np.asarray(lora_run.splits["test"].labels)
    share = per_utterance(logits, variants, labels)["share"]
    assert share[at[("reference", -1, "off")]].mean() == pytest.approx(0.0, abs=1e-9)
    assert share[at[("reference", -1, "on")]].mean() == pytest.approx(1.0, abs=1e-9)
    values = per_utterance(logits, variants, labels)
    assert values["kl"][at[("reference", -1, "on")]].max() == pytest.approx(0.0, abs=1e-9)
    assert values["paper_score"][at[("reference", -1, "on")]].max() == pytest.approx(0.0, abs=1e-12)
    # the paper's score, by hand for one erasure
    k = at[("skip_adapted", 1, "skip_adapted")]
    p_on = torch.softmax(torch.tensor(logits[at[("reference", -1, "on")]]).double(), -1).numpy()
    p_v = torch.softmax(torch.tensor(logits[k]).double(), -1).numpy()
    idx = np.arange(len(labels))
    expected = (
        (p_on.argmax(1) == labels).mean()
        - (p_v.argmax(1) == labels).mean()
        + 0.5 * (p_on.max(1).mean() - p_v.max(1).mean())
        - 0.1 * (-np.log(p_v[idx, labels]).mean() + np.log(p_on[idx, labels]).mean())
    )
    assert values["paper_score"][k].mean() == pytest.approx(expected, abs=1e-9)


def test_the_layer_forward_is_the_model_s_and_adapter_toggles_restore(lora_run):
    encoder = lora_run.encoder
    _, batch = next(lora_run.batches(lora_run.splits["test"], 4))
    from serlens.models.encoder import attention_mask, embed

    with torch.inference_mode():
        x = embed(encoder, batch.mel)
        mask = attention_mask(batch, x.dtype)
        layer = encoder.layers[0]
        torch.testing.assert_close(layer_forward(layer, x, mask), layer(x, mask), atol=1e-5, rtol=0)
        before = run_variant(encoder, lora_run.head, batch)
        with lora_run.update_in(set()):
            off = run_variant(encoder, lora_run.head, batch)
        after = run_variant(encoder, lora_run.head, batch)
    torch.testing.assert_close(before, after)  # adapters switched back on
    assert (before - off).abs().max() > 1e-4


def test_starting_from_the_reference_stream_equals_recomputing_everything(lora_run, causal):
    """Variants reuse the reference runs below the layer they change: the same logits as a
    full pass with the intervention."""
    logits, _, at = causal
    test = lora_run.splits["test"]
    encoder, head = lora_run.encoder, lora_run.head
    L = len(encoder.layers)
    full = {"adapter_off": [], "adapters_from": [], "skip_adapted": []}
    with torch.inference_mode():
        for _, batch in lora_run.batches(test, 4):
            with lora_run.update_in(set(range(L)) - {1}):
                full["adapter_off"].append(run_variant(encoder, head, batch))
            with lora_run.update_in(set(range(1, L))):
                full["adapters_from"].append(run_variant(encoder, head, batch))
            with lora_run.update_in(None):
                full["skip_adapted"].append(run_variant(encoder, head, batch, skip=1))
    order = np.concatenate([rows for rows, _ in lora_run.batches(test, 4)])
    for family, parts in full.items():
        expected = np.empty_like(logits[0])
        expected[order] = torch.cat(parts).numpy()
        np.testing.assert_allclose(logits[at[(family, 1, family)]], expected, atol=1e-5)


def test_a_layer_stride_visits_every_kth_layer_and_the_last(lora_run):
    from serlens.analysis.causal import tested_layers

    assert tested_layers(4, 1) == [0, 1, 2, 3]
    # every 4th from the top, and both sides of the middle (the claims' half split)
    assert tested_layers(32, 4) == [3, 7, 11, 15, 16, 19, 23, 27, 31]
    assert tested_layers(6, 6) == [2, 3, 5]
    # auto: every layer up to 12, then every L // 8-th (with the middle pair and the last)
    assert tested_layers(12, "auto") == list(range(12))
    assert tested_layers(32, "auto") == tested_layers(32, 4)
    assert tested_layers(24, "auto") == [2, 5, 8, 11, 12, 14, 17, 20, 23]
    _, variants = causal_logits(lora_run, {**SETTINGS, "causal_stride": 3})
    assert {v["layer"] for v in variants if v["layer"] >= 0} == {0, 1, 2, 3}


def test_progressive_skip_of_the_first_layer_is_the_single_skip(causal):
    logits, _, at = causal
    np.testing.assert_allclose(
        logits[at[("skip_upto_adapted", 0, "skip_upto_adapted")]],
        logits[at[("skip_adapted", 0, "skip_adapted")]],
        atol=1e-6,
    )


def test_skipping_an_identity_layer_and_ablating_a_silent_component_change_nothing(lora_run):
    encoder = lora_run.encoder
    _, batch = next(lora_run.batches(lora_run.splits["test"], 4))
    layer = encoder.layers[1]
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        with torch.no_grad():  # the MLP writes exactly zero: fc2 = 0
            layer.fc2.weight.zero_()
            layer.fc2.bias.zero_()
        with torch.inference_mode():
            plain = run_variant(encoder, lora_run.head, batch)
            zero = torch.zeros(encoder.config.d_model)
            ablated = run_variant(encoder, lora_run.head, batch, ablate=(1, "mlp", zero))
        torch.testing.assert_close(plain, ablated, atol=1e-6, rtol=0)
        with torch.no_grad():  # and attention writes zero too: the layer is the identity
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
        with torch.inference_mode():
            plain = run_variant(encoder, lora_run.head, batch)
            skipped = run_variant(encoder, lora_run.head, batch, skip=1)
        torch.testing.assert_close(plain, skipped, atol=1e-6, rtol=0)
    finally:
        layer.load_state_dict(saved)


def test_ab_swaps_need_the_initial_a_and_rotations_keep_b_s_norm(lora_run, tmp_path):
    from safetensors.torch import save_file

    from serlens.analysis.causal import ab_swaps

    encoder = lora_run.encoder
    state = {}
    for name, module in encoder.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            state[f"base_model.model.{name}.lora_A.weight"] = (
                module.lora_A["default"].weight.detach().clone()
            )
            state[f"base_model.model.{name}.lora_B.weight"] = torch.zeros_like(
                module.lora_B["default"].weight
            )
    save_file(state, str(tmp_path / "epoch0.safetensors"))
    swaps = ab_swaps(encoder, tmp_path / "epoch0.safetensors", seed=3)
    assert set(swaps) == {"init_a", "rotated_b"}
    for name, (which, weight) in swaps["rotated_b"].items():
        B = dict(encoder.named_modules())[name].lora_B["default"].weight.detach()
        assert which == "B" and torch.linalg.norm(weight) == pytest.approx(
            float(torch.linalg.norm(B)), rel=1e-5
        )
        assert not torch.allclose(weight, B)
    # the saved A is the trained one here: swapping it in changes nothing
    logits, variants = causal_logits(lora_run, SETTINGS, tmp_path / "epoch0.safetensors")
    at = {(v["family"], v["variant"]): k for k, v in enumerate(variants)}
    np.testing.assert_allclose(
        logits[at[("ab_swap", "init_a")]], logits[at[("reference", "on")]], atol=1e-5
    )
    with pytest.raises(KeyError, match="no initial A"):
        save_file({"x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
        ab_swaps(encoder, tmp_path / "bad.safetensors", seed=3)


def test_table_has_per_speaker_rows_whose_weighted_mean_is_the_run_s(causal, lora_run, tmp_path):
    logits, variants, _ = causal
    test = lora_run.splits["test"]
    labels = np.asarray(test.labels)
    speakers = np.array(["s1", "s1", "s2", "s2"], dtype=object)[: len(labels)]
    L = len(lora_run.encoder.layers)
    write_causal(tmp_path / "causal.safetensors", logits, variants, test.utt_ids, L)
    back, back_variants, ids, n_layers = read_causal(tmp_path / "causal.safetensors")
    assert back_variants == variants and ids == list(test.utt_ids) and n_layers == L
    table = causal_table(back, back_variants, labels, speakers, n_layers)
    assert set(table["family"]) == {"reference", "ab_swap", *PER_LAYER} - {"ab_swap"} | (
        {"ab_swap"} if any(v["family"] == "ab_swap" for v in variants) else set()
    )
    share = table[(table["variant"] == "on") & (table["quantity"] == "share")]
    weighted = (share["value"] * share["n_utts"]).sum() / share["n_utts"].sum()
    assert weighted == pytest.approx(1.0, abs=1e-9)
    assert table.loc[table["layer"] >= 0, "depth"].between(0, 1).all()
    # logit difference: z_true − mean of the others
    z = np.array([[2.0, 0.0, 1.0, -1.0]])
    assert logit_diff(z, np.array([0]))[0] == pytest.approx(2.0)


def test_figure_draws_the_aggregated_table(causal, lora_run):
    from serlens.report.figures.causal import causal_figure

    logits, variants, _ = causal
    labels = np.asarray(lora_run.splits["test"].labels)
    table = causal_table(logits, variants, labels, np.array(["a"] * len(labels), dtype=object), 4)
    agg = (
        table.groupby(["family", "variant", "layer", "depth", "quantity"], dropna=False)["value"]
        .mean()
        .reset_index()
        .rename(columns={"value": "mean"})
        .assign(model="tiny.en", method="lora_r4", std=0.0, n_folds=1, n_seeds=1)
    )
    fig = causal_figure(pd.DataFrame(agg), "tiny.en", 4)
    assert len(fig.axes) == 3


def test_patching_layer_0_s_v_proj_is_switching_its_adapter(causal, lora_run):
    """Layer 0 reads the same input in both encoders, and the adapters sit on v_proj only:
    its adapted v_proj output in the frozen encoder is that layer's adapter alone, and the
    frozen v_proj output in the adapted encoder is that layer's adapter off."""
    logits, _, at = causal
    np.testing.assert_allclose(
        logits[at[("patch_vproj_adapted_into_frozen", 0, "patch_vproj_adapted_into_frozen")]],
        logits[at[("adapter_only", 0, "adapter_only")]],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        logits[at[("patch_vproj_frozen_into_adapted", 0, "patch_vproj_frozen_into_adapted")]],
        logits[at[("adapter_off", 0, "adapter_off")]],
        atol=1e-5,
    )
    # deeper, the v_proj output carries the upstream adapters' change too: not the same
    L = len(lora_run.encoder.layers)
    deep = logits[at[("patch_vproj_adapted_into_frozen", L - 1, "patch_vproj_adapted_into_frozen")]]
    only = logits[at[("adapter_only", L - 1, "adapter_only")]]
    assert np.abs(deep - only).max() > 1e-5


def test_cyclic_alignment_repeats_only_audio_frames():
    values = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = cyclic_align(values, mask, 7)[..., 0]
    assert out[0].tolist() == [1, 2, 1, 2, 1, 2, 1]
    assert out[1].tolist() == [5, 6, 7, 8, 9, 5, 6]


def test_resample_ablation_uses_paired_training_utterances(lora_run):
    """Resample-ablation replaces a component by its output on another utterance: a
    different reading from the mean-ablation, the same references, reproducible by seed."""
    settings = {**SETTINGS, "causal_ablation": "resample", "causal_stride": 2}
    a, variants = causal_logits(lora_run, settings)
    b, _ = causal_logits(lora_run, settings)
    mean, mean_variants = causal_logits(lora_run, {**settings, "causal_ablation": "mean"})
    at = {(v["family"], v["layer"], v["variant"]): k for k, v in enumerate(variants)}
    at_mean = {(v["family"], v["layer"], v["variant"]): k for k, v in enumerate(mean_variants)}
    np.testing.assert_array_equal(a, b)
    L = len(lora_run.encoder.layers)
    key = ("ablate_mlp_adapted", L - 1)
    assert (*key, "resample") in at and (*key, "mean") in at_mean
    assert np.abs(a[at[(*key, "resample")]] - mean[at_mean[(*key, "mean")]]).max() > 1e-5
    np.testing.assert_allclose(
        a[at[("reference", -1, "on")]], mean[at_mean[("reference", -1, "on")]], atol=1e-6
    )


def test_the_paper_protocol_rows_are_the_erasures_on_its_subset(causal, lora_run):
    """With no more than 50 test utterances the paper's subset is the whole split: its rows
    equal the utterance means of the honest ones."""
    logits, variants, at = causal
    labels = np.asarray(lora_run.splits["test"].labels)
    L = len(lora_run.encoder.layers)
    paper = paper_rows(logits, variants, labels, L, seed=0)
    assert set(paper["family"]) == {"paper_skip_adapted", "paper_skip_upto_adapted"}
    assert set(paper["variant"]) == {"fold1_50"} and (paper["n_utts"] == len(labels)).all()
    values = per_utterance(logits, variants, labels)
    row = paper.query("family == 'paper_skip_adapted' and layer == 1 and quantity == 'paper_score'")
    k = at[("skip_adapted", 1, "skip_adapted")]
    assert float(row["value"].iloc[0]) == pytest.approx(values["paper_score"][k].mean(), abs=1e-12)


def test_shortcuts_change_no_logit(lora_run, causal):
    """Starting past layers that repeat a reference run and sharing equal computations is
    exact: every variant's logits equal those computed as asked, bit for bit."""
    logits, variants, _ = causal
    plain, plain_variants = causal_logits(lora_run, SETTINGS, shortcuts=False)
    assert plain_variants == variants
    np.testing.assert_array_equal(logits, plain)


def test_shortcuts_start_past_the_layers_a_reference_run_computed(lora_run):
    """Layer 0 reads the same input in both encoders: switching its adapter off in the
    adapted encoder is the frozen run's layer 0, so the variant starts at layer 1 from the
    frozen stream; an ablation or another layer's adapter state stops the shortcut."""
    from serlens.analysis.causal import ReferenceStreams, update_only_in_v_proj

    _, batch = next(lora_run.batches(lora_run.splits["test"], 4))
    encoder, head = lora_run.encoder, lora_run.head
    L = len(encoder.layers)
    every = set(range(L))
    with torch.inference_mode():
        _, adapted = run_variant(encoder, head, batch, capture=True)
        with lora_run.update_in(set()):
            _, frozen = run_variant(encoder, head, batch, capture=True)
    assert update_only_in_v_proj(lora_run) == every
    streams = ReferenceStreams(adapted, frozen, {}, {}, every)
    assert streams.frozen[0] is streams.adapted[0] and streams.frozen[1] is not streams.adapted[1]
    (i, x), _ = streams.advance((0, streams.adapted[0]), every - {0}, {})
    assert i == 1 and x is streams.frozen[1]
    (i, x), _ = streams.advance((0, streams.frozen[0]), every, {})  # adapters_from(0): the run
    assert i == L and x is streams.adapted[L]
    (i, _), extra = streams.advance((0, streams.adapted[0]), every, {"ablate": (0, "mlp", None)})
    assert i == 0 and "ablate" in extra
    (i, _), _ = streams.advance((1, streams.adapted[1]), every - {1}, {})
    assert i == 1


@pytest.mark.parametrize("stride", [1, 2])
def test_pass_count_is_what_the_pass_computes(lora_run, stride, monkeypatch):
    """causal_passes, which sizes the README's cost table, counts the attention and MLP
    computations the pass really runs on the test split (hooks on every layer)."""
    import serlens.analysis.causal as causal_module
    from serlens.analysis.causal import causal_passes

    encoder = lora_run.encoder
    counts = {"attn": 0, "mlp": 0}
    counting = {"on": True}
    handles = []
    for layer in encoder.layers:
        for name, module in (("attn", layer.self_attn), ("mlp", layer.fc1)):
            handles.append(
                module.register_forward_hook(
                    lambda *_a, name=name: counts.__setitem__(name, counts[name] + counting["on"])
                )
            )
    means = causal_module.component_means

    def uncounted(*args, **kwargs):  # the means run over the training sample, not the test split
        counting["on"] = False
        try:
            return means(*args, **kwargs)
        finally:
            counting["on"] = True

    monkeypatch.setattr(causal_module, "component_means", uncounted)
    try:
        causal_logits(lora_run, {**SETTINGS, "causal_stride": stride})
    finally:
        for handle in handles:
            handle.remove()
    n_layers = len(encoder.layers)
    n_batches = -(-len(lora_run.splits["test"]) // SETTINGS["batch_size"])
    measured = (0.45 * counts["attn"] + 0.55 * counts["mlp"]) / n_layers / n_batches
    assert measured == pytest.approx(causal_passes(n_layers, stride, swaps=1), abs=1e-9)
