"""Known answers of serlens.analysis.ab_dynamics, and the analysis on the real tiny.en encoder."""

import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from serlens.analysis.ab_dynamics import (
    SPECTRA,
    FrameReservoir,
    GramAccumulator,
    _layer_index,
    ab_dynamics_table,
    ab_table_from_statistics,
    compute_ab_dynamics,
    delta_w_comparison,
    delta_w_from_factor_steps,
    gram_singular_values,
    lora_factor_gradients,
    max_rank,
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


def test_centred_gram_from_accumulators_equals_numpy_covariance():
    """G - s sᵀ / n from the accumulated Gram, column sums and count = (n - 1) x np.cov."""
    rng = _rng(5)
    X = rng.standard_normal((257, 6)) @ rng.standard_normal((6, 6)) + rng.normal(3.0, 2.0, 6)
    acc = GramAccumulator(6)
    for lo, hi in [(0, 1), (1, 100), (100, 257)]:
        acc.add(torch.from_numpy(X[lo:hi]))
    assert acc.n_rows == 257
    np.testing.assert_allclose(acc.total.numpy(), X.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.gram.numpy(), X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(
        acc.centred_gram().numpy(), np.cov(X, rowvar=False) * (257 - 1), rtol=1e-9, atol=1e-9
    )
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(acc.singular_values(centred=True), s, rtol=1e-8)
    assert GramAccumulator(3).singular_values(centred=True).size == 0  # nothing seen


def test_offset_plus_isotropic_noise_has_uncentred_rank_one_and_a_high_centred_rank():
    """A shared offset holds the uncentred energy; the mean removed, the noise is isotropic."""
    rng = _rng(6)
    n, d = 4000, 32
    offset = 10.0 * rng.standard_normal(d)  # ‖μ‖² ≈ 100 d ≫ the noise energy d per frame
    X = offset + rng.standard_normal((n, d))
    acc = GramAccumulator(d)
    for block in np.array_split(X, 7):
        acc.add(torch.from_numpy(block))
    assert acc.energy_rank(0.9) == 1
    centred = acc.energy_rank(0.9, centred=True)
    # isotropic: ceil(0.9 d) = 29 in the limit; the sample spectrum (n / d = 125) spreads ±18 %
    assert 0.8 * d <= centred <= math.ceil(0.9 * d)
    # the B output b = a Bᵀ: its centred spectrum from the centred Gram of a
    B = rng.standard_normal((50, d))
    b = X @ B.T
    s_c = np.linalg.svd(b - b.mean(axis=0), compute_uv=False)[:d]
    np.testing.assert_allclose(
        product_singular_values(acc.centred_gram(), B), s_c, rtol=1e-6, atol=1e-8 * s_c[0]
    )
    assert energy_rank(product_singular_values(acc.gram, B), 0.9) == 1


def _stats(state, name, spectra, scalars):
    out = {}
    for kind, by_q in spectra.items():
        for q, sv in by_q.items():
            out[f"{state}/{name}/{kind}/{q}"] = torch.tensor(sv, dtype=torch.float64)
    for key, value in scalars.items():
        out[f"{state}/{name}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    return out


def test_table_from_statistics_counts_shares_and_ratios_known_answers():
    """Counts on known spectra; shares = count / min(n_frames [- 1 centred], len(σ)); ratios."""
    name = "layers.1.self_attn.v_proj"
    flat4, one4 = [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]
    # b_out_grad: 10 stored values but only 6 frames -> at most rank 6 (5 once centred).
    grad10 = [1.0] * 6 + [0.0] * 4
    trained = {
        "sv": {"a_out": one4, "b_out": one4, "a_out_grad": flat4, "b_out_grad": grad10},
        "sv_centred": {"a_out": flat4, "b_out": flat4, "a_out_grad": flat4, "b_out_grad": grad10},
    }
    untrained = {
        "sv": {q: flat4 for q in ("a_out", "b_out", "a_out_grad")} | {"b_out_grad": grad10},
        "sv_centred": {q: flat4 for q in ("a_out", "b_out", "a_out_grad")}
        | {"b_out_grad": [1.0] * 5 + [0.0] * 5},
    }
    scalars_t = {"grad_norm_A": 2.0, "grad_norm_B": 6.0, "grad_norm_ratio_B_A": 3.0}
    scalars_u = {"grad_norm_A": 1.0, "grad_norm_B": 1.5, "grad_norm_ratio_B_A": 1.5}
    tensors = {
        **_stats("trained", name, trained, {**scalars_t, "n_frames": 6}),
        **_stats("untrained", name, untrained, {**scalars_u, "n_frames": 6}),
    }
    table = ab_table_from_statistics(tensors, n_layers=2, energy_fraction=0.9)
    assert (table["layer"] == 1).all() and np.allclose(table["depth"], 1.0)
    v = table.set_index(["state", "quantity"])["value"]
    # 90 % of four equal values needs 4; one non-zero value needs 1; six equal ones need 6.
    assert v["trained", "a_out"] == 1 and v["trained", "a_out_centred"] == 4
    assert v["trained", "a_out_frac"] == pytest.approx(1 / 4)
    assert v["trained", "a_out_centred_frac"] == pytest.approx(4 / 4)  # min(6 - 1, 4) = 4
    assert v["trained", "b_out_grad"] == 6 and v["trained", "b_out_grad_frac"] == 1.0
    assert v["trained", "b_out_grad_centred"] == 6  # 6 equal values (a made-up spectrum)
    assert v["trained", "b_out_grad_centred_frac"] == pytest.approx(6 / 5)
    assert v["untrained", "b_out_grad_centred"] == 5
    assert v["untrained", "b_out_grad_centred_frac"] == pytest.approx(1.0)
    assert v["ratio", "a_out"] == pytest.approx(1 / 4)
    assert v["ratio", "grad_norm_ratio_B_A"] == pytest.approx(2.0)
    assert v["ratio", "a_out_centred"] == 1.0
    assert ("ratio", "a_out_frac") not in v.index  # same bound for both states: the count's ratio
    assert max_rank(10, 6, centred=False) == 6 and max_rank(4, 6, centred=True) == 4


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


CFG = {
    "batch_size": 3,
    "train_sample": 8,
    "energy_fraction": 0.9,
    "untrained_baseline": "matched_scale",
}
PAPER = {**CFG, "untrained_baseline": "paper", "untrained_init_std": 0.02}


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
    n_frames = wide.xs("n_frames", level="quantity")[["trained", "untrained"]].to_numpy()
    n = n_frames[0, 0]
    assert np.all(n_frames == n) and 4 < n < 384  # the same frames in each state
    for q, hi in [("a_out", 4), ("a_out_grad", 4), ("b_out", 4), ("b_out_grad", 384)]:
        for suffix, bound in (("", min(n, hi)), ("_centred", min(n - 1, hi))):
            ranks = wide.xs(q + suffix, level="quantity")[["trained", "untrained"]].to_numpy()
            assert np.all((ranks >= 1) & (ranks <= hi)) and np.all(ranks == np.round(ranks))
            shares = wide.xs(f"{q}{suffix}_frac", level="quantity")[["trained", "untrained"]]
            np.testing.assert_allclose(shares.to_numpy(), ranks / bound)
    ratios = wide.dropna(subset=["ratio"])
    np.testing.assert_allclose(ratios["ratio"], ratios["trained"] / ratios["untrained"], rtol=1e-12)
    for q in ("dW_cos", "cka_a_code_vs_b_out_grad", "n_frames", "a_out_frac"):
        assert wide.xs(q, level="quantity")["ratio"].isna().all()
    assert wide.xs("grad_norm_ratio_B_A", level="quantity")["ratio"].notna().all()
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


def test_matched_scale_baseline_has_the_trained_norms_and_keeps_the_head(lora_run):
    """Per module ‖A_u‖_F = ‖A‖_F and ‖B_u‖_F = ‖B‖_F, random directions; the trained head itself."""
    before = _snapshot(lora_run)
    rng_state = torch.random.get_rng_state()
    one = untrained_state(lora_run, "matched_scale", seed=3)
    two = untrained_state(lora_run, "matched_scale", seed=3)
    other = untrained_state(lora_run, "matched_scale", seed=4)
    assert torch.equal(rng_state, torch.random.get_rng_state())
    trained = trained_state(lora_run).weights
    assert one.weights.keys() == trained.keys() and len(trained) == 4
    for name, (A, B) in trained.items():
        A_u, B_u = one.weights[name]
        assert A_u.shape == A.shape and B_u.shape == B.shape and A_u.dtype == A.dtype
        for mine, theirs in ((A_u, A), (B_u, B)):
            norm = torch.linalg.matrix_norm(theirs.double())
            torch.testing.assert_close(
                torch.linalg.matrix_norm(mine.double()), norm, rtol=1e-6, atol=0
            )
            cos = (mine.double() * theirs.double()).sum() / norm**2
            assert abs(float(cos)) < 0.2  # a random direction, not the trained one
        assert torch.equal(A_u, two.weights[name][0]) and torch.equal(B_u, two.weights[name][1])
        assert not torch.equal(A_u, other.weights[name][0])
    # the head is the run's own: its weights bit-identical, before and after a whole table
    assert one.head is lora_run.head
    compute_ab_dynamics(lora_run, CFG, seed=0)
    after = _snapshot(lora_run)
    assert all(torch.equal(before["head"][k], after["head"][k]) for k in before["head"])
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])


def test_paper_baseline_is_seeded_with_its_std_and_a_fresh_head(lora_run):
    before = _snapshot(lora_run)
    one, two = (
        untrained_state(lora_run, "paper", 3, 0.02),
        untrained_state(lora_run, "paper", 3, 0.02),
    )
    other = untrained_state(lora_run, "paper", 4, 0.02)
    name = next(iter(one.weights))
    assert torch.equal(one.weights[name][0], two.weights[name][0])
    assert not torch.equal(one.weights[name][0], other.weights[name][0])
    A, B = one.weights[name]
    assert A.std().item() == pytest.approx(0.02, rel=0.1)
    assert B.std().item() == pytest.approx(0.02, rel=0.1)
    assert one.head is not lora_run.head
    assert not torch.equal(one.head.projector.weight, lora_run.head.projector.weight)
    assert torch.equal(one.head.projector.weight, two.head.projector.weight)
    after = _snapshot(lora_run)
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])
    with pytest.raises(ValueError, match="untrained_init_std"):
        untrained_state(lora_run, "paper", 3)
    with pytest.raises(ValueError, match="not one of"):
        untrained_state(lora_run, "kaiming", 3)


@contextlib.contextmanager
def _factors_scaled(run, scale_A, scale_B):
    """The run's adapters with A x scale_A and B x scale_B inside, restored on exit."""
    weights = [
        (m.lora_A["default"].weight, m.lora_B["default"].weight)
        for m in run.lora_modules().values()
    ]
    saved = [(A.detach().clone(), B.detach().clone()) for A, B in weights]
    try:
        with torch.no_grad():
            for A, B in weights:
                A.mul_(scale_A)
                B.mul_(scale_B)
        yield
    finally:
        with torch.no_grad():
            for (A, B), (A0, B0) in zip(weights, saved, strict=True):
                A.copy_(A0)
                B.copy_(B0)


def _wide(table):
    return table.pivot_table(index=["module", "quantity"], columns="state", values="value")


def test_matched_scale_ratios_are_invariant_to_rebalancing_the_factors(lora_run):
    """A -> cA, B -> B/c leaves ΔW = sBA, hence the function and G, unchanged, and multiplies
    ‖∂L/∂B‖ / ‖∂L/∂A‖ by c². The matched-scale baseline follows (its factors are rescaled by
    the same c), so trained ÷ untrained does not move; the paper baseline's is multiplied by c²."""
    c = 3.0
    base = _wide(compute_ab_dynamics(lora_run, CFG, seed=0))
    base_paper = _wide(compute_ab_dynamics(lora_run, PAPER, seed=0))
    with _factors_scaled(lora_run, c, 1 / c):
        scaled = _wide(compute_ab_dynamics(lora_run, CFG, seed=0))
        scaled_paper = _wide(compute_ab_dynamics(lora_run, PAPER, seed=0))
    ratio = "grad_norm_ratio_B_A"
    for state in ("trained", "untrained"):
        np.testing.assert_allclose(
            scaled.xs(ratio, level="quantity")[state],
            c**2 * base.xs(ratio, level="quantity")[state],
            rtol=2e-3,
        )
    np.testing.assert_allclose(
        scaled.xs(ratio, level="quantity")["ratio"],
        base.xs(ratio, level="quantity")["ratio"],
        rtol=2e-3,
    )
    np.testing.assert_allclose(
        scaled_paper.xs(ratio, level="quantity")["ratio"],
        c**2 * base_paper.xs(ratio, level="quantity")["ratio"],
        rtol=2e-3,
    )
    # energy ranks do not depend on the scale of a factor either
    for q in (*SPECTRA, *(f"{q}_centred" for q in SPECTRA)):
        np.testing.assert_array_equal(
            scaled.xs(q, level="quantity")["untrained"], base.xs(q, level="quantity")["untrained"]
        )


def test_matched_scale_baseline_follows_the_trained_scale(lora_run):
    """Both trained factors x c: the baseline is the same draw, c times larger (paper's is fixed)."""
    c = 2.5
    base = untrained_state(lora_run, "matched_scale", seed=0).weights
    paper = untrained_state(lora_run, "paper", 0, 0.02).weights
    with _factors_scaled(lora_run, c, c):
        scaled = untrained_state(lora_run, "matched_scale", seed=0).weights
        scaled_paper = untrained_state(lora_run, "paper", 0, 0.02).weights
    for name in base:
        for k in (0, 1):
            torch.testing.assert_close(scaled[name][k], c * base[name][k], rtol=1e-5, atol=1e-8)
            assert torch.equal(scaled_paper[name][k], paper[name][k])


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
        ab_dynamics_table(lora_run, np.arange(4), 4, 0.9, "matched_scale", seed=0)
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
