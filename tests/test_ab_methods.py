"""A/B statistics beyond plain LoRA on v_proj: DoRA (autograd gradients, the magnitude
vector), wide modules (the bounded-memory sketch of ∂L/∂b) and several targets on some
layers (table keys), on hand-built modules and on the real tiny.en encoder."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from serlens.analysis.ab_dynamics import (
    DORA_SCALARS,
    EXACT_GRAM_MAX_DIMS,
    SPEC,
    AdapterTaps,
    GaussianFrameSketch,
    GramAccumulator,
    SketchedGram,
    ab_dynamics_table,
    ab_table_from_statistics,
    lora_factor_gradients,
    stream_ab_statistics,
    trained_state,
    untrained_state,
    write_ab_statistics,
)
from serlens.analysis.spectra import energy_rank
from serlens.models.encoder import masked_mean, run_encoder

CLASSES = ["neu", "hap", "ang", "sad"]
N_LAYERS = 4  # tiny.en
ADAPTED_LAYERS = [1, 3]
TARGETS = ["q_proj", "v_proj", "fc1"]
MODULE_PATHS = {"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj", "fc1": "fc1"}
MAGNITUDE_FACTOR = 1.1  # the fixture's DoRA magnitude: m = 1.1 ‖W0‖_row
N_TRAIN = 8


# --------------------------------------------------------------------------- fixtures


def _adapted_run(weights, use_dora: bool, method: str):
    """Rank-2 adapters on q_proj, v_proj and fc1 of layers 1 and 3 of the real tiny.en
    encoder (peft layers_to_transform), B seeded non-zero; DoRA's m = 1.1 ‖W0‖_row."""
    from conftest import _split
    from peft import get_peft_model

    from serlens.analysis.runs import TrainedRun
    from serlens.models.encoder import load_encoder
    from serlens.train.heads import EmotionHead
    from serlens.train.lora import lora_config

    encoder = load_encoder(weights)
    for p in encoder.parameters():
        p.requires_grad_(False)
    cfg = {"target_modules": TARGETS, "alpha_per_rank": 2, "dropout": 0.1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)  # peft draws A from the global generator
        peft_encoder = get_peft_model(
            encoder, lora_config(2, cfg, ADAPTED_LAYERS, use_dora=use_dora)
        )
        head = EmotionHead(encoder.config.d_model, len(CLASSES)).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_encoder.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            p.requires_grad_(False)
        for module in peft_encoder.base_model.model.modules():
            if getattr(module, "lora_magnitude_vector", None):
                W0 = module.get_base_layer().weight
                module.lora_magnitude_vector["default"].weight.copy_(
                    MAGNITUDE_FACTOR * torch.linalg.vector_norm(W0, dim=1)
                )
    peft_encoder.eval()
    splits = {
        "train": _split(N_TRAIN, 0, "tr"),
        "dev": _split(4, 1, "dv"),
        "test": _split(4, 2, "te"),
    }
    return TrainedRun(
        model="tiny.en",
        method=method,
        fold=1,
        encoder=peft_encoder.base_model.model,
        head=head,
        splits=splits,
        classes=CLASSES,
        policy="crop",
        max_seconds=30.0,
        rank=2,
        peft_encoder=peft_encoder,
    )


@pytest.fixture(scope="module")
def dora_run(weights):
    return _adapted_run(weights, use_dora=True, method="dora_r2")


@pytest.fixture(scope="module")
def multi_run(weights):
    return _adapted_run(weights, use_dora=False, method="lora_multi_r2")


EXPECTED_MODULES = {
    (f"layers.{layer}.{MODULE_PATHS[t]}", layer) for layer in ADAPTED_LAYERS for t in TARGETS
}


def _snapshot(run):
    return {
        "encoder": {k: v.clone() for k, v in run.encoder.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in run.encoder.named_parameters()},
        "training": (run.encoder.training, run.head.training),
    }


def _one_batch_autograd(run, indices):
    """The whole sample in one batch: ``.grad`` of every adapter parameter (A, B, DoRA's m),
    and per module the audio frames of ∂L/∂(lora_B output), for the streamed numbers to match."""
    modules = dict(sorted(run.lora_modules().items()))
    params = {}
    for name, m in modules.items():
        params[name] = {"A": m.lora_A["default"].weight, "B": m.lora_B["default"].weight}
        if getattr(m, "lora_magnitude_vector", None):
            params[name]["m"] = m.lora_magnitude_vector["default"].weight
    outs = {}

    def keep(name):
        def hook(_module, inputs, output):
            if inputs[0].ndim == 3:  # not DoRA's lora_B(lora_A(I))
                output.retain_grad()
                outs[name] = output

        return hook

    handles = [m.lora_B["default"].register_forward_hook(keep(n)) for n, m in modules.items()]
    flat = [p for group in params.values() for p in group.values()]
    for p in flat:
        p.requires_grad_(True)
    try:
        (chunk, batch), *rest = run.batches(run.splits["train"], len(indices), indices)
        assert not rest
        with torch.enable_grad():
            out = run_encoder(run.encoder, batch)
            logits = run.head(masked_mean(out.last_hidden_state, out.frame_mask))
            labels = torch.as_tensor(run.splits["train"].labels[chunk])
            nn.functional.cross_entropy(logits, labels).backward()
        grads = {n: {k: p.grad.detach().clone() for k, p in g.items()} for n, g in params.items()}
        out_grads = {n: o.grad[out.frame_mask].detach().double() for n, o in outs.items()}
    finally:
        for h in handles:
            h.remove()
        for p in flat:
            p.grad = None
            p.requires_grad_(False)
        run.head.zero_grad(set_to_none=True)
    return grads, out_grads


# --------------------------------------------------------------------------- DoRA, by hand


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block()])

    def forward(self, x):
        return self.layers[0](x)


def _toy_dora(seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], use_dora=True, lora_dropout=0.0)
    toy = inject_adapter_in_model(config, _Toy()).double().eval()
    fc1 = toy.layers[0].fc1
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        fc1.lora_B["default"].weight.copy_(torch.randn(5, 2, generator=gen, dtype=torch.float64))
        m = fc1.lora_magnitude_vector["default"].weight
        m.mul_(1.0 + 0.3 * torch.rand(5, generator=gen, dtype=torch.float64))
    for p in toy.parameters():
        p.requires_grad_(False)
    for p in (
        fc1.lora_A["default"].weight,
        fc1.lora_B["default"].weight,
        fc1.lora_magnitude_vector["default"].weight,
    ):
        p.requires_grad_(True)
    return toy, fc1


def test_dora_gradients_by_autograd_equal_the_hand_written_dora_forward():
    """peft's DoRA module, tapped by AdapterTaps, against DoRA written out (Liu et al. 2024,
    eq. 5, with the norm a constant in the backward, §4.3):
    y = m / ‖W0 + s B A‖_row ⊙ (W0 x + s B A x) + bias."""
    toy, fc1 = _toy_dora()
    s = float(fc1.scaling["default"])
    A = fc1.lora_A["default"].weight
    B = fc1.lora_B["default"].weight
    m = fc1.lora_magnitude_vector["default"].weight
    W0, bias = fc1.base_layer.weight, fc1.base_layer.bias
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    with AdapterTaps({"layers.0.fc1": fc1}) as taps:
        loss = (toy(x) - target).pow(2).sum()
        got = taps.gradients(loss)["layers.0.fc1"]
        # the frames' call only (a, B a and lora_A's input x), not lora_B(lora_A(I))
        assert set(taps.captured) == {("layers.0.fc1", k) for k in ("a", "b", "x")}
        torch.testing.assert_close(got["x"], x)

    # The same function by hand, every factor a fresh leaf.
    A_, B_, m_ = (t.detach().clone().requires_grad_(True) for t in (A, B, m))
    norm = torch.linalg.vector_norm(W0 + s * B_ @ A_, dim=1).detach()
    y = (m_ / norm) * (x @ W0.T + s * (x @ A_.T) @ B_.T) + bias
    y.retain_grad()
    ref_loss = (toy.layers[0].fc2(torch.tanh(y)) - target).pow(2).sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(got["grad_A"], A_.grad)
    torch.testing.assert_close(got["grad_B"], B_.grad)
    torch.testing.assert_close(got["grad_m"], m_.grad)
    torch.testing.assert_close(got["code"], x @ A.detach().T)
    gain = (m / norm).detach()
    torch.testing.assert_close(got["out_grad"], s * gain * y.grad)  # ∂L/∂b = s g ⊙ g_y
    torch.testing.assert_close(got["code_grad"], got["out_grad"] @ B.detach())

    # LoRA's closed form with G = Σ g_y xᵀ is wrong under DoRA; with diag(m / n) G it holds.
    G = torch.einsum("bto,bti->oi", y.grad, x)
    lora_A_grad, _ = lora_factor_gradients(G, A.detach(), B.detach(), s)
    assert not torch.allclose(lora_A_grad, A_.grad, rtol=1e-3)
    dora_A_grad, dora_B_grad = lora_factor_gradients(gain[:, None] * G, A.detach(), B.detach(), s)
    torch.testing.assert_close(dora_A_grad, A_.grad)
    torch.testing.assert_close(dora_B_grad, B_.grad)


def test_adapter_taps_refuse_a_module_run_twice_on_frames():
    toy, fc1 = _toy_dora()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with AdapterTaps({"layers.0.fc1": fc1}), pytest.raises(RuntimeError, match="twice"):
        fc1(x)
        fc1(x)
    with (
        AdapterTaps({"layers.0.fc1": fc1}) as taps,
        pytest.raises(RuntimeError, match="no forward"),
    ):
        taps.gradients(torch.zeros((), dtype=torch.float64, requires_grad=True))


# --------------------------------------------------------------------------- DoRA, real encoder


def test_dora_streamed_gradients_match_one_batch_autograd(dora_run):
    """Batches of 3 summed = autograd on the whole sample at once, for A, B and m of each of
    the six modules (three per layer, layers 1 and 3); the Gram of ∂L/∂b = that of the frames."""
    indices = np.arange(N_TRAIN)
    acc = stream_ab_statistics(dora_run, [trained_state(dora_run)], indices, 3, 100, seed=0)
    acc = acc["trained"].modules
    assert {(n, int(n.split(".")[1])) for n in acc} == EXPECTED_MODULES
    grads, out_grads = _one_batch_autograd(dora_run, indices)
    for name, m_acc in acc.items():
        assert m_acc.is_dora
        torch.testing.assert_close(m_acc.grad_A.float(), grads[name]["A"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(m_acc.grad_B.float(), grads[name]["B"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(m_acc.grad_m.float(), grads[name]["m"], rtol=1e-3, atol=1e-7)
        M = out_grads[name]  # ∂L/∂b = s (m / n) ⊙ g_y, audio frames
        gram = m_acc.b_out_grad.gram
        torch.testing.assert_close(gram, M.T @ M, rtol=1e-3, atol=1e-6 * float(gram.abs().max()))
        torch.testing.assert_close(
            m_acc.b_out_grad.total, M.sum(0), rtol=1e-3, atol=1e-6 * float(M.abs().sum(0).max())
        )


def test_dora_magnitude_rows_known_answers(dora_run):
    """m = 1.1 ‖W0‖_row: ‖m‖, the relative change 0.1, the gain m / ‖W0 + s B A‖_row; the
    matched-scale baseline keeps m, the paper baseline resets it to its factors' norm (gain 1)."""
    before = _snapshot(dora_run)
    indices = np.arange(4)
    # fc1 through the sketch (DoRA and a wide module together; cheap spectra)
    bounded = {"exact_max_dims": 1024, "sketch_rows": 64}
    table = ab_dynamics_table(dora_run, indices, 2, 0.9, "matched_scale", seed=0, **bounded)
    paper = ab_dynamics_table(dora_run, indices, 2, 0.9, "paper", seed=0, init_std=0.02, **bounded)
    after = _snapshot(dora_run)
    for key in before["encoder"]:  # every weight, m included, is back
        assert torch.equal(before["encoder"][key], after["encoder"][key]), key
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]

    wide = table.pivot_table(index=["module", "quantity"], columns="state", values="value")
    wide_paper = paper.pivot_table(index=["module", "quantity"], columns="state", values="value")
    modules = dora_run.lora_modules()
    assert set(table["module"]) == set(modules)
    for name, module in modules.items():
        m = module.lora_magnitude_vector["default"].weight.double()
        W0 = module.get_base_layer().weight.double()
        A, B = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
        s = float(module.scaling["default"])
        gain = m / torch.linalg.vector_norm(W0 + s * B @ A, dim=1)
        v = wide.loc[name]
        for state in ("trained", "untrained"):  # matched_scale keeps the trained m
            assert v.loc["magnitude_norm", state] == pytest.approx(float(m.norm()), rel=1e-9)
            assert v.loc["magnitude_rel_change", state] == pytest.approx(
                MAGNITUDE_FACTOR - 1, rel=1e-6
            )
        assert v.loc["magnitude_gain_rms", "trained"] == pytest.approx(
            float((gain - 1).pow(2).mean().sqrt()), rel=1e-9
        )
        assert v.loc["grad_norm_m", "trained"] > 0 and v.loc["grad_norm_m", "untrained"] > 0
        assert v.loc["grad_norm_m", "ratio"] == pytest.approx(
            v.loc["grad_norm_m", "trained"] / v.loc["grad_norm_m", "untrained"]
        )
        p = wide_paper.loc[name]
        assert p.loc["magnitude_gain_rms", "untrained"] < 1e-6  # m_u = ‖W0 + s B_u A_u‖_row
        assert abs(p.loc["magnitude_rel_change", "untrained"] - (MAGNITUDE_FACTOR - 1)) > 0.05
        assert p.loc["magnitude_gain_rms", "trained"] == pytest.approx(
            v.loc["magnitude_gain_rms", "trained"]
        )
    # the DoRA rows exist only where there is a magnitude
    assert set(DORA_SCALARS) <= set(table["quantity"])


def test_dora_baselines_carry_the_magnitude(dora_run):
    trained = trained_state(dora_run)
    assert set(trained.magnitudes) == set(trained.weights) and len(trained.weights) == 6
    matched = untrained_state(dora_run, "matched_scale", seed=0)
    for name, m in trained.magnitudes.items():
        assert torch.equal(matched.magnitudes[name], m)
    paper = untrained_state(dora_run, "paper", 0, 0.02)
    for name, module in dora_run.lora_modules().items():
        A_u, B_u = paper.weights[name]
        W0 = module.get_base_layer().weight
        s = float(module.scaling["default"])
        torch.testing.assert_close(
            paper.magnitudes[name], torch.linalg.vector_norm(W0 + s * B_u @ A_u, dim=1)
        )


def test_ab_dynamics_applies_to_lora_and_dora_runs():
    from serlens.methods import Method

    def method(kind, **kw):
        return Method(f"m_{kind}", kind, **kw)

    assert SPEC.applies_to(method("lora", rank=4, targets=("v_proj",)))
    assert SPEC.applies_to(method("dora", rank=4, targets=("v_proj",)))
    assert not SPEC.applies_to(method("full", targets=("v_proj",)))
    assert not SPEC.applies_to(method("frozen"))


# --------------------------------------------------------------------------- several targets, some layers


def test_write_ab_statistics_keys_several_targets_on_some_layers(multi_run, tmp_path):
    """q_proj, v_proj and fc1 of layers 1 and 3: one (module, layer) per adapted module, the
    right depth, each module's own gradients (the written file vs autograd), and the same
    table as in memory."""
    from safetensors import safe_open

    indices = np.arange(N_TRAIN)
    path = tmp_path / "ab.safetensors"
    write_ab_statistics(multi_run, indices, 3, "matched_scale", 0, path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    assert metadata["n_layers"] == str(N_LAYERS)
    assert metadata["exact_gram_max_dims"] == str(EXACT_GRAM_MAX_DIMS)
    table = ab_table_from_statistics(tensors, N_LAYERS, 0.9)
    assert set(map(tuple, table[["module", "layer"]].drop_duplicates().to_numpy())) == (
        EXPECTED_MODULES
    )
    np.testing.assert_allclose(table["depth"], (table["layer"] + 1) / N_LAYERS)
    keys = ["module", "layer", "depth", "quantity", "state"]
    assert not table.duplicated(keys).any()
    assert not set(DORA_SCALARS) & set(table["quantity"])  # plain LoRA: no magnitude rows

    for name, _ in EXPECTED_MODULES:
        d_out = 1536 if name.endswith("fc1") else 384
        assert tensors[f"trained/{name}/sv/b_out_grad"].numel() == d_out
        assert tensors[f"trained/{name}/sv/a_out"].numel() == 2
    n_frames = table[table["quantity"] == "n_frames"]["value"]
    assert n_frames.nunique() == 1 and n_frames.iloc[0] > 0

    grads, _ = _one_batch_autograd(multi_run, indices)
    v = table[table["state"] == "trained"].set_index(["module", "quantity"])["value"]
    norms = {}
    for name, _ in EXPECTED_MODULES:
        norm_A = float(torch.linalg.matrix_norm(grads[name]["A"].double()))
        norm_B = float(torch.linalg.matrix_norm(grads[name]["B"].double()))
        assert v[name, "grad_norm_A"] == pytest.approx(norm_A, rel=1e-3)
        assert v[name, "grad_norm_B"] == pytest.approx(norm_B, rel=1e-3)
        norms[name] = norm_A
    assert len({round(x, 6) for x in norms.values()}) == len(norms)  # no two modules alike

    in_memory = ab_dynamics_table(multi_run, indices, 3, 0.9, "matched_scale", seed=0)
    pd.testing.assert_frame_equal(table, in_memory)


# --------------------------------------------------------------------------- wide modules


def _low_rank_rows(n, d, strong, seed, offset=0.0):
    """Rows with ``strong`` directions of decreasing size over weak isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, strong)))[0]
    scales = 10.0 * 0.8 ** np.arange(strong)
    rows = (rng.standard_normal((n, strong)) * scales) @ basis.T
    return rows + 0.05 * rng.standard_normal((n, d)) + offset * rng.standard_normal(d)


def test_sketched_gram_agrees_with_the_exact_gram_on_a_known_spectrum():
    """Six strong directions in 300 dims, 4000 frames, a 400-row sketch: the six leading
    singular values within 10 % (sampling error ≈ sqrt(1 / (2 K)) ≈ 3.5 % each), energy
    ranks equal; centred with the exact mean though the rows share a large offset."""
    n, d, K = 4000, 300, 400
    rows = torch.from_numpy(_low_rank_rows(n, d, 6, seed=0, offset=3.0))
    exact = GramAccumulator(d)
    sketched = SketchedGram(d, GaussianFrameSketch(K, seed=0))
    for block in torch.tensor_split(rows, 9):
        exact.add(block)
        sketched.add(block)
    assert sketched.n_rows == exact.n_rows == n
    assert sketched.S.shape == (K, d)  # K x d held, never d x d
    for centred in (False, True):
        ex, sk = exact.singular_values(centred), sketched.singular_values(centred)
        assert len(sk) == d
        np.testing.assert_allclose(sk[:6], ex[:6], rtol=0.10)
        # the energy is exact by construction
        assert float(np.sum(sk**2)) == pytest.approx(float(np.sum(ex**2)), rel=1e-9)
        for fraction in (0.5, 0.9, 0.99):
            assert energy_rank(sk, fraction) == energy_rank(ex, fraction)
    assert exact.energy_rank(0.9) == 1  # the offset holds the uncentred energy...
    assert sketched.energy_rank(0.9) == 1
    assert sketched.energy_rank(0.9, centred=True) > 1  # ...and is gone once centred


def test_gaussian_sketch_is_seeded_shared_and_in_stream_order():
    one, two = GaussianFrameSketch(8, seed=3), GaussianFrameSketch(8, seed=3)
    first = one.block(0, 5, "cpu")
    assert first.shape == (8, 5)
    assert torch.equal(first, two.block(0, 5, "cpu"))
    assert one.block(0, 5, "cpu") is first  # a second module at the same frames: same columns
    second = one.block(5, 4, "cpu")
    assert not torch.equal(second[:, :4], first[:, :4])
    with pytest.raises(RuntimeError, match="stream order"):
        one.block(20, 3, "cpu")
    # E[ΩᵀΩ] = I: entries N(0, 1 / rows)
    big = GaussianFrameSketch(4000, seed=0).block(0, 3, "cpu")
    np.testing.assert_allclose((big.T @ big).numpy(), np.eye(3), atol=0.1)


WIDE_SKETCH = 512


def test_wide_module_uses_the_sketch_and_agrees_with_the_exact_gram(multi_run):
    """fc1 (d_out = 1536) above a threshold of 1024 takes the sketch; q_proj and v_proj (384)
    keep the exact Gram, with the same numbers as the exact pass. Stated tolerance on this
    small example (≈ 320 frames, K = 512): the three leading singular values of ∂L/∂b within
    15 %, its energy rank at 50 % within 1 and at 90 % between 0.75 and 1.05 of the exact
    one (the sketch's spectrum is spread, so it is biased low)."""
    indices = np.arange(N_TRAIN)
    state = [trained_state(multi_run)]
    exact = stream_ab_statistics(multi_run, state, indices, 3, 100, seed=0)["trained"].modules
    bounded = stream_ab_statistics(
        multi_run, state, indices, 3, 100, seed=0, exact_max_dims=1024, sketch_rows=WIDE_SKETCH
    )["trained"].modules
    n = exact["layers.1.fc1"].a_out.n_rows
    assert n > 200
    for name, m_acc in bounded.items():
        ex = exact[name]
        assert isinstance(ex.b_out_grad, GramAccumulator)  # default threshold: all exact here
        if name.endswith("fc1"):
            wide = m_acc.b_out_grad
            assert isinstance(wide, SketchedGram)
            held = sum(t.numel() for t in (wide.S, wide.omega_sum, wide.total))
            assert held == WIDE_SKETCH * 1536 + WIDE_SKETCH + 1536 < 1536**2
            assert m_acc.scalars()["b_out_grad_sketch_rows"] == WIDE_SKETCH
            for centred in (False, True):
                e, s = ex.b_out_grad.singular_values(centred), wide.singular_values(centred)
                assert len(s) == len(e) == 1536
                np.testing.assert_allclose(s[:3], e[:3], rtol=0.15)
                assert abs(energy_rank(s, 0.5) - energy_rank(e, 0.5)) <= 1
                k, k_exact = energy_rank(s, 0.9), energy_rank(e, 0.9)
                assert 0.75 * k_exact <= k <= 1.05 * k_exact, (name, centred, k, k_exact)
        else:
            assert isinstance(m_acc.b_out_grad, GramAccumulator)
            assert m_acc.scalars()["b_out_grad_sketch_rows"] == 0
            for centred in (False, True):
                np.testing.assert_array_equal(
                    m_acc.b_out_grad.singular_values(centred),
                    ex.b_out_grad.singular_values(centred),
                )
        # everything but ∂L/∂b's spectrum is the exact pass's
        torch.testing.assert_close(m_acc.grad_A, ex.grad_A, rtol=0, atol=0)
        np.testing.assert_array_equal(m_acc.a_out.singular_values(), ex.a_out.singular_values())


def test_lora_narrow_modules_keep_the_exact_gram(lora_run):
    """The short-form run (v_proj, d_out = 384): the exact Gram path, whose ∂L/∂b spectrum is
    the SVD of the stacked audio frames of ∂L/∂(lora_B output) from one-batch autograd."""
    indices = np.arange(8)
    acc = stream_ab_statistics(lora_run, [trained_state(lora_run)], indices, 3, 100, seed=0)
    _, out_grads = _one_batch_autograd(lora_run, indices)
    for name, m_acc in acc["trained"].modules.items():
        assert isinstance(m_acc.b_out_grad, GramAccumulator) and not m_acc.is_dora
        scalars = m_acc.scalars()
        assert scalars["b_out_grad_sketch_rows"] == 0
        assert not set(DORA_SCALARS) & set(scalars)
        M = out_grads[name].numpy()
        for centred in (False, True):
            X = M - M.mean(axis=0) if centred else M
            sv = np.linalg.svd(X, compute_uv=False)
            got = m_acc.b_out_grad.singular_values(centred)
            np.testing.assert_allclose(got[: len(sv)], sv, rtol=1e-3, atol=1e-6 * sv[0])
            assert energy_rank(got, 0.9) == energy_rank(sv, 0.9)
    assert not math.isnan(scalars["grad_norm_ratio_B_A"])


# --------------------------------------------------------------------------- the figure


def test_figure_draws_one_line_per_module_type_and_notes_the_sketch(multi_run, dora_run):
    """A method adapting q_proj, v_proj and fc1 gets a line per type, not their mean; a DoRA
    method is drawn; a sketched ∂L/∂b is said so in the legend panel."""
    import matplotlib.pyplot as plt

    from serlens import methods
    from serlens.report.figures import ab_dynamics_figure

    declared = {
        "lora_multi_r2": methods.Method(
            "lora_multi_r2", "lora", rank=2, targets=tuple(TARGETS), layers=(1, 3)
        ),
        "dora_r2": methods.Method("dora_r2", "dora", rank=2, targets=("v_proj",)),
    }
    indices = np.arange(4)
    bounded = {"exact_max_dims": 1024, "sketch_rows": 32}
    lora_table = ab_dynamics_table(multi_run, indices, 2, 0.9, "matched_scale", 0, **bounded)
    dora_table = ab_dynamics_table(dora_run, indices, 2, 0.9, "matched_scale", 0, **bounded)
    dora_table = dora_table[dora_table["module"].str.endswith("v_proj")]
    table = pd.concat(
        [lora_table.assign(method="lora_multi_r2"), dora_table.assign(method="dora_r2")]
    )
    table = table.rename(columns={"value": "mean"}).assign(
        model="tiny.en", std=np.nan, n_folds=1, n_seeds=1
    )
    saved = dict(methods._DECLARED)
    methods.declare({**saved, **declared})
    try:
        fig = ab_dynamics_figure(table, "tiny.en", 0.9, untrained_baseline="matched_scale")
        ax = fig.axes[0]  # a_out share, uncentred
        labels = [
            line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")
        ]
        multi_label = methods.method_label("lora_multi_r2")
        multi = [lab for lab in labels if lab.startswith(multi_label + " · ")]
        assert sorted(lab.rsplit(" · ", 1)[-1] for lab in multi) == sorted(TARGETS)
        assert methods.method_label("dora_r2") in labels  # one target: one line, no suffix
        assert len(labels) == len(TARGETS) + 1
        # each type's line has its layers only (1 and 3: depths 0.5 and 1.0)
        for line in ax.get_lines():
            if str(line.get_label()).startswith(multi_label):
                np.testing.assert_allclose(line.get_xdata(), [0.5, 1.0])
        texts = " ".join(t.get_text() for a in fig.axes for t in a.texts)
        assert "Gaussian sketch" in texts
        plt.close(fig)
        exact = table[table["quantity"] != "b_out_grad_sketch_rows"]
        fig = ab_dynamics_figure(exact, "tiny.en", 0.9)
        assert "Gaussian sketch" not in " ".join(t.get_text() for a in fig.axes for t in a.texts)
        plt.close(fig)
    finally:
        methods.declare(saved)


def test_causal_shortcuts_are_exact_for_adapters_on_several_modules_of_some_layers(multi_run):
    """Adapters on q_proj, v_proj and fc1 of layers 1 and 3: the inputs of layers 0 and 1 are
    one stream in both encoders, a v_proj patch is not the layer's whole update anywhere,
    and every variant's logits equal those computed as asked, bit for bit."""
    from test_causal import exact_shortcut_logits

    from serlens.analysis.causal import ReferenceStreams, run_variant, update_only_in_v_proj

    assert update_only_in_v_proj(multi_run) == set()
    _, batch = next(multi_run.batches(multi_run.splits["test"], 4))
    with torch.inference_mode():
        _, adapted = run_variant(multi_run.encoder, multi_run.head, batch, capture=True)
        with multi_run.update_in(set()):
            _, frozen = run_variant(multi_run.encoder, multi_run.head, batch, capture=True)
    streams = ReferenceStreams(adapted, frozen, {}, {}, set())
    shared = [i for i in range(len(adapted)) if streams.adapted[i] is streams.frozen[i]]
    assert shared == [0, 1]
    fast, variants = exact_shortcut_logits(multi_run)
    at = {(v["family"], v["variant"], v["layer"]): k for k, v in enumerate(variants)}
    # layer 0 carries no adapter: switching it off changes nothing
    on = fast[at[("reference", "on", -1)]]
    np.testing.assert_array_equal(fast[at[("adapter_off", "adapter_off", 0)]], on)
    assert np.abs(fast[at[("adapter_off", "adapter_off", 1)]] - on).max() > 0
