"""Known answers of serlens.analysis.ab_dynamics, and the analysis on the real tiny.en encoder."""

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from serlens.analysis.ab_dynamics import (
    FrameReservoir,
    GramAccumulator,
    _layer_index,
    ab_dynamics_table,
    compute_ab_dynamics,
    delta_w_comparison,
    delta_w_from_factor_steps,
    gram_singular_values,
    lora_factor_gradients,
    product_singular_values,
    stream_ab_statistics,
    trained_state,
    untrained_state,
)
from serlens.analysis.spectra import energy_rank
from serlens.models.encoder import masked_mean, run_encoder

CLASSES = ["neu", "hap", "ang", "sad"]
REPO = Path(__file__).resolve().parents[1]


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- factor gradients


def test_factor_gradients_match_autograd():
    """∂L/∂A = s Bᵀ G and ∂L/∂B = s G Aᵀ for y = W x + s B A x, G = Σ g_y xᵀ = ∂L/∂W."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, r, n, s = 6, 5, 3, 11, 2.5
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    Y = X @ W.T + s * (X @ A.T) @ B.T
    Y.retain_grad()
    loss = (torch.tanh(Y) - target).pow(2).sum()
    loss.backward()
    G = Y.grad.T @ X  # Σ_frames g_y xᵀ
    torch.testing.assert_close(G, W.grad)
    grad_A, grad_B = lora_factor_gradients(G, A.detach(), B.detach(), s)
    torch.testing.assert_close(grad_A, A.grad)
    torch.testing.assert_close(grad_B, B.grad)


def test_delta_w_from_factor_steps_formulas_and_first_order_change():
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, r, s = 7, 4, 2, 3.0
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    G = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    grad_A, grad_B = lora_factor_gradients(G, A, B, s)
    from_A, from_B = delta_w_from_factor_steps(grad_A, grad_B, A, B, s)
    torch.testing.assert_close(from_A, s**2 * B @ B.T @ G)
    torch.testing.assert_close(from_B, s**2 * G @ A.T @ A)
    # ΔW = s B A is linear in each factor: a step -η ∇ on one factor changes ΔW by exactly -η·(that term).
    eta = 1e-3
    torch.testing.assert_close(s * B @ (A - eta * grad_A) - s * B @ A, -eta * from_A)
    torch.testing.assert_close(s * (B - eta * grad_B) @ A - s * B @ A, -eta * from_B)


def test_delta_w_comparison_known_answers():
    A = torch.tensor([[1.0, 0.0]])
    B = torch.tensor([[1.0], [0.0]])
    # G = I: B Bᵀ G = G Aᵀ A = e1 e1ᵀ -> cosine 1, norms s² = 4.
    G = torch.eye(2)
    out = delta_w_comparison(*lora_factor_gradients(G, A, B, 2.0), A, B, 2.0)
    assert out == pytest.approx({"dW_from_A_norm": 4.0, "dW_from_B_norm": 4.0, "dW_cos": 1.0})
    # G = swap: B Bᵀ G = e1 e2ᵀ, G Aᵀ A = e2 e1ᵀ -> orthogonal.
    G = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = delta_w_comparison(*lora_factor_gradients(G, A, B, 1.0), A, B, 1.0)
    assert out == pytest.approx({"dW_from_A_norm": 1.0, "dW_from_B_norm": 1.0, "dW_cos": 0.0})
    # B = 0 (LoRA's init): a step on A does not move ΔW (only B's does); the cosine is undefined.
    out = delta_w_comparison(
        *lora_factor_gradients(torch.eye(2), A, torch.zeros(2, 1), 1.0), A, torch.zeros(2, 1), 1.0
    )
    assert (
        out["dW_from_A_norm"] == 0.0 and out["dW_from_B_norm"] == 1.0 and math.isnan(out["dW_cos"])
    )


# --------------------------------------------------------------------------- streamed spectra


def _decaying(n, d, seed):
    rng = _rng(seed)
    return (rng.standard_normal((n, d)) * (0.6 ** np.arange(d))) @ np.linalg.qr(
        rng.standard_normal((d, d))
    )[0]


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_gram_accumulated_energy_rank_equals_svd_of_stacked_matrix(fraction):
    M = _decaying(301, 12, seed=2)
    acc = GramAccumulator(12)
    for lo, hi in [(0, 7), (7, 150), (150, 151), (151, 301)]:
        acc.add(torch.from_numpy(M[lo:hi]).float())
    M32 = torch.from_numpy(M).float().double().numpy()  # what the accumulator saw
    s = np.linalg.svd(M32, compute_uv=False)
    np.testing.assert_allclose(acc.singular_values(), s, rtol=1e-8, atol=1e-10 * s[0])
    assert acc.n_rows == 301
    assert acc.energy_rank(fraction) == energy_rank(s, fraction)


def test_gram_singular_values_known_answer():
    M = np.diag([3.0, 2.0, 0.0])
    np.testing.assert_allclose(gram_singular_values(M.T @ M), [3.0, 2.0, 0.0], atol=1e-12)
    assert GramAccumulator(3).energy_rank(0.9) == 0  # nothing seen


def test_product_singular_values_equal_svd_of_b():
    rng = _rng(3)
    a = _decaying(200, 5, seed=4)
    B = rng.standard_normal((9, 5))
    s = np.linalg.svd(a @ B.T, compute_uv=False)
    np.testing.assert_allclose(
        product_singular_values(a.T @ a, B), s[:5], rtol=1e-8, atol=1e-10 * s[0]
    )
    for fraction in (0.5, 0.9, 0.99):
        assert energy_rank(product_singular_values(a.T @ a, B), fraction) == energy_rank(
            s, fraction
        )


# --------------------------------------------------------------------------- reservoir


def _ids(lo, hi):
    return torch.arange(lo, hi, dtype=torch.float64)[:, None]


def test_reservoir_keeps_everything_below_capacity_and_pairs_keys():
    res = FrameReservoir(100, seed=0)
    res.offer({"x": _ids(0, 30), "y": 2 * _ids(0, 30).repeat(1, 3)})
    res.offer({"x": _ids(30, 45), "y": 2 * _ids(30, 45).repeat(1, 3)})
    np.testing.assert_array_equal(res.sample("x")[:, 0], np.arange(45))
    np.testing.assert_array_equal(res.sample("y"), 2 * res.sample("x").repeat(3, axis=1))
    with pytest.raises(ValueError, match="same number of rows"):
        res.offer({"x": _ids(0, 3), "y": _ids(0, 4)})


def test_reservoir_is_a_uniform_sample_of_distinct_frames():
    n, capacity, reps = 60, 12, 400
    counts = np.zeros(n)
    for seed in range(reps):
        res = FrameReservoir(capacity, seed)
        for lo, hi in [(0, 5), (5, 40), (40, 41), (41, 60)]:
            res.offer({"x": _ids(lo, hi), "y": -_ids(lo, hi)})
        ids = res.sample("x")[:, 0]
        assert len(ids) == capacity and len(set(ids)) == capacity
        np.testing.assert_array_equal(res.sample("y")[:, 0], -ids)
        counts[ids.astype(int)] += 1
    p = capacity / n
    # Each frame is kept with probability capacity / n; binomial sd over reps ≈ 0.02.
    assert np.abs(counts / reps - p).max() < 5 * math.sqrt(p * (1 - p) / reps)


def test_layer_index():
    assert _layer_index("layers.11.self_attn.v_proj") == 11
    assert _layer_index("base_model.model.layers.0.fc1") == 0
    with pytest.raises(ValueError, match="conv1"):
        _layer_index("conv1")


# --------------------------------------------------------------------------- the real encoder


CFG = {"batch_size": 3, "train_sample": 8, "energy_fraction": 0.9, "untrained_init_std": 0.02}


def _snapshot(run):
    return {
        "encoder": {k: v.clone() for k, v in run.encoder.state_dict().items()},
        "head": {k: v.clone() for k, v in run.head.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in run.encoder.named_parameters()},
        "training": (run.encoder.training, run.head.training),
    }


def test_compute_ab_dynamics_table_and_run_left_unchanged(lora_run):
    before = _snapshot(lora_run)
    rng_state = torch.random.get_rng_state()
    table = compute_ab_dynamics(lora_run, CFG, seed=0)
    after = _snapshot(lora_run)
    assert before["encoder"].keys() == after["encoder"].keys()
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])
    assert all(torch.equal(before["head"][k], after["head"][k]) for k in before["head"])
    assert (
        before["requires_grad"] == after["requires_grad"]
        and before["training"] == after["training"]
    )
    assert torch.equal(rng_state, torch.random.get_rng_state())

    assert list(table.columns) == ["module", "layer", "depth", "quantity", "state", "value"]
    assert sorted(table["layer"].unique()) == [0, 1, 2, 3]
    np.testing.assert_allclose(table["depth"], (table["layer"] + 1) / 4)
    assert set(table["state"]) == {"trained", "untrained", "ratio"}
    wide = table.pivot_table(index=["module", "quantity"], columns="state", values="value")
    for q, hi in [("a_out", 4), ("a_out_grad", 4), ("b_out", 4), ("b_out_grad", 384)]:
        ranks = wide.xs(q, level="quantity")[["trained", "untrained"]].to_numpy()
        assert np.all((ranks >= 1) & (ranks <= hi)) and np.all(ranks == np.round(ranks))
    ratios = wide.dropna(subset=["ratio"])
    np.testing.assert_allclose(ratios["ratio"], ratios["trained"] / ratios["untrained"], rtol=1e-12)
    for q in ("dW_cos", "grad_norm_ratio_B_A", "cka_a_code_vs_b_out_grad"):
        assert wide.xs(q, level="quantity")["ratio"].isna().all()
    for state in ("trained", "untrained"):
        by_q = wide[state].unstack("quantity")
        np.testing.assert_allclose(
            by_q["grad_norm_ratio_B_A"], by_q["grad_norm_B"] / by_q["grad_norm_A"]
        )
    norms = wide.loc[
        wide.index.get_level_values("quantity").str.contains("norm"), ["trained", "untrained"]
    ]
    assert np.all(norms.to_numpy() > 0)
    cka = wide.xs("cka_a_code_vs_b_out_grad", level="quantity")[["trained", "untrained"]].to_numpy()
    assert np.all((cka >= 0) & (cka <= 1))
    # Seeded: a second call gives the same table.
    pd.testing.assert_frame_equal(table, compute_ab_dynamics(lora_run, CFG, seed=0))


def test_streamed_gradients_match_one_batch_autograd_and_full_weight_gradient(lora_run):
    """Accumulating over batches of 3 = autograd on the whole sample at once = s Bᵀ G and s G Aᵀ."""
    indices = np.arange(8)
    state = trained_state(lora_run)
    acc = stream_ab_statistics(lora_run, [state], indices, 3, 100, seed=0)["trained"]

    modules = dict(sorted(lora_run.lora_modules().items()))
    io = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            io[name] = (inputs[0], output)

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    lora_params = [
        p
        for m in modules.values()
        for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)
    ]
    for p in lora_params:
        p.requires_grad_(True)
    try:
        (chunk, batch), *rest = lora_run.batches(lora_run.splits["train"], 8, indices)
        assert not rest
        out = run_encoder(lora_run.encoder, batch)
        logits = lora_run.head(masked_mean(out.last_hidden_state, out.frame_mask))
        labels = torch.as_tensor(lora_run.splits["train"].labels[chunk])
        torch.nn.functional.cross_entropy(logits, labels).backward()
        for name, m in modules.items():
            A, B, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
            torch.testing.assert_close(
                acc.modules[name].grad_A.float(), A.grad, rtol=1e-3, atol=1e-6
            )
            torch.testing.assert_close(
                acc.modules[name].grad_B.float(), B.grad, rtol=1e-3, atol=1e-6
            )
            x, y = io[name]
            G = torch.einsum("bto,bti->oi", y.grad.double(), x.double())  # Σ_frames g_y xᵀ
            grad_A, grad_B = lora_factor_gradients(G, A.detach().double(), B.detach().double(), s)
            torch.testing.assert_close(grad_A.float(), A.grad, rtol=1e-3, atol=1e-6)
            torch.testing.assert_close(grad_B.float(), B.grad, rtol=1e-3, atol=1e-6)
            # Gram of the code over audio frames only.
            code = x[out.frame_mask].double() @ A.detach().double().T
            torch.testing.assert_close(
                acc.modules[name].a_out.gram, code.T @ code, rtol=1e-4, atol=1e-6
            )
    finally:
        for h in handles:
            h.remove()
        for p in lora_params:
            p.grad = None
            p.requires_grad_(False)
        lora_run.head.zero_grad(set_to_none=True)


def test_untrained_state_is_seeded_and_leaves_the_run_alone(lora_run):
    before = _snapshot(lora_run)
    one, two = untrained_state(lora_run, 0.02, seed=3), untrained_state(lora_run, 0.02, seed=3)
    other = untrained_state(lora_run, 0.02, seed=4)
    name = next(iter(one.weights))
    assert torch.equal(one.weights[name][0], two.weights[name][0])
    assert not torch.equal(one.weights[name][0], other.weights[name][0])
    A, B = one.weights[name]
    assert (
        A.abs().max() <= 1 / math.sqrt(A.shape[1]) + 1e-6
    )  # kaiming_uniform(a=√5) bound = 1/√d_in
    assert B.std().item() == pytest.approx(0.02, rel=0.2)
    assert not torch.equal(one.head.projector.weight, lora_run.head.projector.weight)
    after = _snapshot(lora_run)
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])


def test_trained_weights_restored_after_an_error(lora_run, monkeypatch):
    import serlens.analysis.ab_dynamics as ab

    before = _snapshot(lora_run)
    calls = []

    def encoder_failing_on_second_call(encoder, batch):
        # The second forward is the untrained state's: its weights are loaded when it fails.
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return run_encoder(encoder, batch)

    monkeypatch.setattr(ab, "run_encoder", encoder_failing_on_second_call)
    with pytest.raises(RuntimeError, match="boom"):
        ab_dynamics_table(lora_run, np.arange(4), 4, 0.9, 0.02, seed=0)
    after = _snapshot(lora_run)
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])
    assert (
        before["requires_grad"] == after["requires_grad"]
        and before["training"] == after["training"]
    )


def test_run_without_adapters_is_refused(lora_run, monkeypatch):
    monkeypatch.setattr(lora_run, "lora_modules", dict)  # what a frozen run reports
    with pytest.raises(ValueError, match="LoRA runs only"):
        compute_ab_dynamics(lora_run, CFG, seed=0)


def test_memory_probe_reports(lora_run):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from ab_memory_probe import ab_memory_probe

    report = ab_memory_probe(lora_run, CFG, seed=0, n_utterances=4)
    assert report["n_utterances"] == 4 and report["n_frames"] > 0
    assert report["max_batch_frames"] >= report["n_frames"] / 2  # two batches of up to 3 clips
    assert report["one_batch_peak_rss_mb"] >= 0 and report["peak_rss_delta_mb"] >= 0
    for key in ("one_batch_peak_heap_mb", "peak_heap_delta_mb", "cuda_peak_mb"):
        assert report[key] is None or report[key] >= 0
    assert report["wall_s"] > 0
