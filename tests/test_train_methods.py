"""Every method kind trains on real tiny.en weights and changes only the parameters it should."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import CLASSES, config, make_split

from serlens.config import validate_config
from serlens.methods import configured_methods
from serlens.models.encoder import load_encoder
from serlens.train.lora import run_encoder_method

METHODS = {
    "lora_front": {"kind": "lora", "rank": 4, "layers": [0, 1]},
    "lora_wide": {"kind": "lora", "rank": 2, "targets": ["q_proj", "fc1"], "layers": "last_half"},
    "dora_r4": {"kind": "dora", "rank": 4},
    "full": {"kind": "full", "lr": 1e-4},
}


@pytest.fixture(scope="module")
def methods():
    return configured_methods(validate_config({"methods": METHODS}))


@pytest.fixture(scope="module")
def splits():
    return {
        "train": make_split(8, 0, "tr"),
        "dev": make_split(4, 1, "dv"),
        "test": make_split(4, 2, "te"),
    }


@pytest.fixture(scope="module")
def trained(weights, splits, methods, tmp_path_factory):
    """name -> (run folder, the trained model) after one epoch."""
    out = {}
    for name in METHODS:
        folder = tmp_path_factory.mktemp(name)
        model = run_encoder_method(
            load_encoder(weights), splits, CLASSES, methods[name], config(1), folder, None, {}
        )
        out[name] = (folder, model)
    return out


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The encoder's effective weights, adapters merged (peft merge_and_unload on a copy)."""
    import copy

    peft = copy.deepcopy(model.peft_encoder)
    return {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}


def changed(before: dict, after: dict, atol: float = 0.0) -> set[str]:
    return {k for k in before if not torch.allclose(before[k], after[k], atol=atol, rtol=0)}


def test_lora_on_two_layers_changes_only_their_v_proj(weights, trained):
    folder, model = trained["lora_front"]
    base = load_encoder(weights).state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder_side = {n for n in trainable if not n.startswith("head.")}
    assert encoder_side and all(
        ".lora_" in n and "v_proj" in n and (".layers.0." in n or ".layers.1." in n)
        for n in encoder_side
    ), sorted(encoder_side)[:4]
    assert changed(base, merged_weights(model)) == {
        "layers.0.self_attn.v_proj.weight",
        "layers.1.self_attn.v_proj.weight",
    }
    config = (folder / "adapter" / "adapter_config.json").read_text()
    assert '"layers_to_transform": [\n    0,\n    1\n  ]' in config or "[0, 1]" in config


def test_lora_on_other_modules_adapts_them_in_the_last_half(weights, trained):
    _, model = trained["lora_wide"]
    n = len(model.encoder.layers)
    got = changed(load_encoder(weights).state_dict(), merged_weights(model))
    expected = {
        f"layers.{i}.{m}.weight" for i in range(n // 2, n) for m in ("self_attn.q_proj", "fc1")
    }
    assert got == expected


def test_dora_trains_a_magnitude_and_changes_only_v_proj(weights, trained):
    folder, model = trained["dora_r4"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)
    got = changed(load_encoder(weights).state_dict(), merged_weights(model), atol=1e-7)
    assert got and all(k.endswith("self_attn.v_proj.weight") for k in got)
    saved = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in saved)
    assert '"use_dora": true' in (folder / "adapter" / "adapter_config.json").read_text()


def test_full_fine_tuning_trains_every_encoder_weight_and_saves_its_update(weights, trained):
    folder, model = trained["full"]
    base = load_encoder(weights).state_dict()
    saved = load_file(str(folder / "encoder.safetensors"))
    # every encoder parameter but Whisper's fixed sinusoidal positions, saved and changed
    expected = {k for k in base if not k.startswith("embed_positions")}
    assert set(saved) == expected
    assert changed({k: base[k] for k in saved}, saved) == expected
    # ΔW = W_ft − W0 of the targets (v_proj) of every layer, exactly
    delta = load_file(str(folder / "delta.safetensors"))
    n = len(model.encoder.layers)
    assert set(delta) == {f"layers.{i}.self_attn.v_proj.weight" for i in range(n)}
    for name, d in delta.items():
        assert torch.equal(d, saved[name] - base[name].float())
    assert not (folder / "adapter").exists()


def test_a_declared_learning_rate_is_the_run_s(weights, splits, methods, monkeypatch, tmp_path):
    import serlens.train.lora as lora

    seen = []

    class Stop(Exception):
        pass

    def capture(train_cfg, seed):
        seen.append(train_cfg["lr"])
        raise Stop

    monkeypatch.setattr(lora.LoopConfig, "from_train_config", capture)
    cfg = config(1)
    for name in ("full", "lora_front"):
        with pytest.raises(Stop):
            run_encoder_method(
                load_encoder(weights),
                splits,
                CLASSES,
                methods[name],
                cfg,
                tmp_path / name,
                None,
                {},
            )
    assert seen == [1e-4, cfg["train"]["lr"]]


def full_run(weights, trained, splits):
    """The fully fine-tuned run as the passes load it: the tuned weights in the encoder, the
    pre-trained ones of every tuned parameter in ``base_state``; and the tuned weights."""
    from serlens.analysis.runs import TrainedRun

    folder, model = trained["full"]
    encoder = load_encoder(weights)
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    saved = load_file(str(folder / "encoder.safetensors"))
    params = dict(encoder.named_parameters())
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
    run = TrainedRun(
        "tiny.en",
        "full",
        1,
        encoder,
        model.head,
        splits,
        CLASSES,
        "crop",
        30.0,
        base_state={k: base[k].clone() for k in saved},
    )
    return run, saved


def test_full_run_update_toggles_layer_by_layer(weights, trained, splits):
    """update_in(set()) is the pre-trained encoder; every layer on is the fine-tuned one;
    a partial toggle puts the pre-trained values only where it should and restores them."""
    run, saved = full_run(weights, trained, splits)
    encoder, base = run.encoder, run.base_state
    n = len(encoder.layers)
    with run.adapter_disabled():
        now = encoder.state_dict()
        assert all(torch.equal(now[k], base[k]) for k in saved)
    with run.update_in({1}):
        now = encoder.state_dict()
        for k in saved:
            owner = (
                int(k.split(".")[1])
                if k.startswith("layers.")
                else (n - 1 if k.startswith("layer_norm") else 0)
            )
            assert torch.equal(now[k], saved[k] if owner == 1 else base[k]), k
    after = encoder.state_dict()
    assert all(torch.equal(after[k], saved[k]) for k in saved)  # restored


def test_lora_update_toggle_switches_adapters_per_layer(weights, trained, splits):
    from serlens.analysis.runs import TrainedRun
    from serlens.audio import LogMel
    from serlens.models.encoder import run_encoder

    _, model = trained["dora_r4"]
    run = TrainedRun(
        "tiny.en",
        "dora_r4",
        1,
        model.encoder,
        model.head,
        splits,
        CLASSES,
        "crop",
        30.0,
        peft_encoder=model.peft_encoder,
    )
    batch = LogMel()(splits["test"].waves[:2], "crop")
    model.eval()
    with torch.inference_mode():
        on = run_encoder(model.encoder, batch).last_hidden_state
        with run.update_in(set()):
            none = run_encoder(model.encoder, batch).last_hidden_state
        with run.adapter_disabled():
            base = run_encoder(model.encoder, batch).last_hidden_state
        again = run_encoder(model.encoder, batch).last_hidden_state
    # DoRA's magnitude goes with its adapter: every layer off is the pre-trained encoder
    torch.testing.assert_close(none, base, atol=1e-6, rtol=0)
    assert (on - base).abs().max() > 1e-5
    assert torch.equal(on, again)
    assert np.isfinite(on.numpy()).all()


def test_causal_shortcuts_are_exact_for_full_fine_tuning(weights, trained, splits):
    """Full fine-tuning changes the stem (layer 0) and the final LayerNorm (the last layer):
    no stream is shared, and patching the adapted last layer into the frozen encoder keeps
    the frozen final LayerNorm; the shortcuts change no logit."""
    from test_causal import exact_shortcut_logits

    run, _ = full_run(weights, trained, splits)
    encoder = run.encoder
    fast, variants = exact_shortcut_logits(run)
    at = {(v["family"], v["layer"]): k for k, v in enumerate(variants)}
    last = len(encoder.layers) - 1
    assert (
        np.abs(
            fast[at[("adapters_upto", last)]] - fast[at[("patch_adapted_into_frozen", last)]]
        ).max()
        > 0
    )
