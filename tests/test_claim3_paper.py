"""Claim 3 by the paper's own estimator (serlens.analysis.ab_cka.paper_cka): its kernels from
Grams against scikit-learn, the streamed Grams of flattened utterances, padding, the sketch,
the pass (pad30 vectors, gradient scale, baseline, fold 1) and the claims rows, on known answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics.pairwise import rbf_kernel

from serlens.analysis.ab_cka import (
    PAPER_ROLES,
    FlatGramSample,
    kernel_cka,
    paper_cka,
    paper_linear_cka,
    paper_rbf_cka,
    paper_rbf_cka_f32,
    paper_utterances,
    rbf_kernel_from_gram,
)
from serlens.analysis.cka import linear_cka
from serlens.report.claims import claim3_rows, claims_table

SETTINGS = {"sesoi_uar": 0.02, "sesoi_share": 0.1, "sesoi_log_rank": 0.1, "sesoi_cka": 0.1}


def _reference_cka(K, L):
    """The centred-kernel alignment written out: H K H, H L H, their cosine."""
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    Kc, Lc = H @ K @ H, H @ L @ H
    return float(np.sum(Kc * Lc) / np.sqrt(np.sum(Kc * Kc) * np.sum(Lc * Lc)))


# --------------------------------------------------------------------------- kernels


def test_paper_linear_cka_is_biased_linear_cka_and_one_for_identical_codes():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((40, 30)), rng.standard_normal((40, 12))
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    G = X @ X.T
    assert paper_linear_cka(G, G) == pytest.approx(1.0)
    Z = 3.0 * X @ Q + 5.0  # rotation, scale and shift leave it at 1
    assert paper_linear_cka(G, Z @ Z.T) == pytest.approx(1.0)
    assert paper_linear_cka(G, Y @ Y.T) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert paper_linear_cka(G, Y @ Y.T) == pytest.approx(_reference_cka(G, Y @ Y.T), abs=1e-12)


def test_paper_estimators_are_near_one_for_independent_long_vectors():
    """40 flattened vectors of many values: independent draws give a CKA near 1 under both
    of the paper's kernels (their centred kernels are both about a multiple of H) — why the
    paper's raw forward CKA needs a null."""
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((40, 20000)), rng.standard_normal((40, 20000))
    Gx, Gy = X @ X.T, Y @ Y.T
    assert paper_linear_cka(Gx, Gy) > 0.95
    assert paper_rbf_cka(Gx, 20000, Gy, 20000) > 0.95
    from serlens.analysis.ab_cka import debiased_cka

    assert abs(debiased_cka(X, Y)) < 0.05  # the sound estimator is not fooled


def test_rbf_cka_from_grams_equals_scikit_learn_default_gamma():
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((12, 30)), 0.3 * rng.standard_normal((12, 7))
    Gx, Gy = X @ X.T, Y @ Y.T
    np.testing.assert_allclose(rbf_kernel_from_gram(Gx, 30), rbf_kernel(X), atol=1e-12)
    np.testing.assert_allclose(rbf_kernel_from_gram(Gy, 7), rbf_kernel(Y), atol=1e-12)
    expected = _reference_cka(rbf_kernel(X), rbf_kernel(Y))
    assert paper_rbf_cka(Gx, 30, Gy, 7) == pytest.approx(expected, abs=1e-10)
    # an explicit bandwidth too: ‖x - y‖² = G_xx + G_yy - 2 G_xy for any γ
    np.testing.assert_allclose(
        rbf_kernel_from_gram(Gx, 30, gamma=0.5), rbf_kernel(X, gamma=0.5), atol=1e-12
    )


def test_float32_emulation_matches_a_float32_pipeline_and_rounds_tiny_kernels_to_one():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((10, 50)).astype(np.float32)
    Y = (0.5 * rng.standard_normal((10, 8))).astype(np.float32)

    def float32_pipeline(A, B):  # scikit-learn on float32 rows, centring and sums in float32
        K, L = rbf_kernel(A), rbf_kernel(B)
        assert K.dtype == np.float32

        def centre(M):
            return M - M.mean(axis=1, keepdims=True) - M.mean(axis=0, keepdims=True) + M.mean()

        Kc, Lc = centre(K), centre(L)
        den = np.sqrt(np.sum(Kc * Kc)) * np.sqrt(np.sum(Lc * Lc))
        return 0.0 if den == 0 else float(np.sum(Kc * Lc) / den)

    def grams(A, B):
        A, B = A.astype(np.float64), B.astype(np.float64)
        return A @ A.T, 50, B @ B.T, 8

    assert paper_rbf_cka_f32(*grams(X, Y)) == pytest.approx(float32_pipeline(X, Y), abs=2e-5)
    assert paper_rbf_cka_f32(*grams(X, Y)) == pytest.approx(paper_rbf_cka(*grams(X, Y)), abs=1e-4)
    # gradient-sized values: γ‖x - y‖² ~ 1e-10, exp rounds to 1 in float32, the centred kernel is
    # 0 and the paper's code returns 0.0; in float64 the RBF CKA is the linear one
    tiny_x, tiny_y = X * np.float32(1e-5), Y * np.float32(1e-5)
    assert float32_pipeline(tiny_x, tiny_y) == 0.0
    assert paper_rbf_cka_f32(*grams(tiny_x, tiny_y)) == 0.0
    linear = paper_linear_cka(*grams(X, Y)[::2])
    assert paper_rbf_cka(*grams(tiny_x, tiny_y)) == pytest.approx(linear, abs=1e-6)


def test_kernel_cka_is_nan_for_a_constant_kernel_and_batches_over_leading_axes():
    K = np.ones((5, 5))
    assert np.isnan(kernel_cka(K, np.eye(5)))
    rng = np.random.default_rng(4)
    stack = rng.standard_normal((3, 6, 6))
    stack = stack @ stack.transpose(0, 2, 1)
    batched = kernel_cka(stack, stack[::-1])
    assert batched.shape == (3,)
    assert batched[0] == pytest.approx(_reference_cka(stack[0], stack[2]))


# --------------------------------------------------------------------------- the sample


def test_paper_utterances_take_ten_per_class_of_the_analysis_sample():
    labels = np.arange(200) % 4
    indices = np.arange(0, 200, 2)  # the analysis sample: two classes only, 50 each
    chosen = paper_utterances(indices, labels, seed=0)
    assert len(chosen) == 20 and set(chosen) <= set(indices)
    assert np.all(np.diff(chosen) > 0)  # ascending: the rows of every Gram
    assert np.bincount(labels[chosen]).tolist() == [10, 0, 10]
    assert np.array_equal(chosen, paper_utterances(indices, labels, seed=0))
    assert not np.array_equal(chosen, paper_utterances(indices, labels, seed=1))
    few = paper_utterances(np.arange(8), np.arange(8) % 4, seed=0)
    assert few.tolist() == list(range(8))  # fewer than 10 per class: all of them


def _utterances(n=10, dims=4, seed=5):
    rng = np.random.default_rng(seed)
    lengths = [3 + i for i in range(n)]
    return {u: rng.standard_normal((lengths[u], dims)) for u in range(n)}


def _offer(sample, rows: dict, batches, keys=("x",)):
    """Offer ``rows`` in ``batches`` (lists of ids), each padded to its own longest, with junk
    beyond every utterance's frames (it must be ignored) and an utterance not in the sample."""
    for ids in batches:
        T = max(len(rows[u]) for u in ids) + 2
        dims = next(iter(rows.values())).shape[1]
        block = torch.full((len(ids) + 1, T, dims), 99.0, dtype=torch.float64)
        for i, u in enumerate(ids):
            block[i, : len(rows[u])] = torch.from_numpy(rows[u])
        lengths = [len(rows[u]) for u in ids] + [T]
        sample.offer([*ids, 1000], lengths, {k: block for k in keys})


def _close(got, expected, rel=1e-6):
    """Equal up to float32 storage: errors relative to the Gram's largest diagonal entry."""
    np.testing.assert_allclose(got, expected, rtol=0, atol=rel * np.abs(np.diag(expected)).max())


def _flat_gram(rows: dict, order, M=None):
    T = max(len(r) for r in rows.values())
    flat = []
    for u in order:
        r = rows[u] if M is None else rows[u] @ M
        padded = np.zeros((T, r.shape[1]))
        padded[: len(r)] = r
        flat.append(padded.reshape(-1))
    F = np.stack(flat)
    return F @ F.T


def test_gram_streamed_over_batches_equals_the_flattened_gram():
    rows = _utterances()
    M = np.random.default_rng(6).standard_normal((4, 3))
    sample = FlatGramSample(range(10), derived={"b": ("x", torch.from_numpy(M))})
    _offer(sample, rows, [[7, 2, 9], [0, 5], [1, 3, 4, 6, 8]])
    assert sample.selected() == list(range(10)) and sample.n_frames == 12
    _close(sample.gram("x"), _flat_gram(rows, range(10)))
    _close(sample.gram("b"), _flat_gram(rows, range(10), M))
    assert not sample.sketched("x") and not sample.sketched("b")
    with pytest.raises(ValueError):  # an utterance comes with one frame count
        sample.offer([3], [5], {"x": torch.zeros(1, 6, 4)})


def test_zero_padding_to_the_longest_changes_no_inner_product_only_gamma():
    rows = _utterances(n=6)
    padded = {u: np.vstack([r, np.zeros((8 - len(r), 4))]) for u, r in rows.items()}
    own, full = FlatGramSample(range(6)), FlatGramSample(range(6))
    _offer(own, rows, [[0, 1, 2], [3, 4, 5]])
    _offer(full, padded, [[0, 1, 2, 3, 4, 5]])  # every utterance at 8 frames, as pad30 has 1500
    _close(own.gram("x"), full.gram("x"))
    assert own.n_frames == full.n_frames == 8  # the longest: γ = 1 / (8 · dims)
    G = own.gram("x")
    assert paper_rbf_cka(G, 8 * 4, G, 8 * 4) == pytest.approx(1.0)


def test_over_budget_keys_are_count_sketched_the_same_way_whenever_they_switch():
    rng = np.random.default_rng(7)
    rows = {u: rng.standard_normal((50, 40)) + 0.5 for u in range(12)}  # 2000 values each
    M = torch.from_numpy(rng.standard_normal((40, 6)))
    derived = {"b": ("x", M)}
    exact = FlatGramSample(range(12), derived=derived)
    at_once = FlatGramSample(range(12), derived=derived, exact_max_bytes=0, buckets=4096)
    midway = FlatGramSample(range(12), derived=derived, exact_max_bytes=40_000, buckets=4096)
    for s in (exact, at_once, midway):
        _offer(s, rows, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    assert at_once.sketched("x") and at_once.sketched("b") and not exact.sketched("x")
    assert midway.sketched("x")  # crossed the budget after a few utterances
    _close(midway.gram("x"), at_once.gram("x"))
    _close(midway.gram("b"), at_once.gram("b"))
    # unbiased, error about ‖x_u - x̄‖ ‖x_v - x̄‖ / √K on the centred Gram
    H = np.eye(12) - 1.0 / 12
    true, est = H @ exact.gram("x") @ H, H @ at_once.gram("x") @ H
    scale = np.sqrt(np.outer(np.diag(true), np.diag(true)))
    assert np.max(np.abs(est - true) / scale) < 6 / np.sqrt(4096)
    assert paper_linear_cka(est, true) > 0.99


# --------------------------------------------------------------------------- paper_cka


def _constructed_sample(rng, n=16, T=5, r=3, d=7, same=True):
    """A FlatGramSample of every role with the trained and paper codes equal when ``same``."""
    B = {role: torch.from_numpy(rng.standard_normal((d, r))) for role in PAPER_ROLES}
    if same:
        B["paper"] = B["trained"]
    derived = {}
    for role in PAPER_ROLES:
        R = torch.linalg.qr(B[role], mode="reduced").R
        derived[(role, "m", "b_feat")] = ((role, "m", "a_code"), R.T)
    sample = FlatGramSample(range(n), derived=derived)
    codes = {role: torch.from_numpy(rng.standard_normal((n, T, r))) for role in PAPER_ROLES}
    if same:
        codes["paper"] = codes["trained"]
    blocks = {(role, "m", "a_code"): codes[role] for role in PAPER_ROLES}
    for role in ("trained", "paper"):
        g_b = torch.from_numpy(rng.standard_normal((n, T, d)))
        blocks[(role, "m", "b_out_grad")] = g_b
        blocks[(role, "m", "a_out_grad")] = g_b @ B[role]
    sample.offer(np.arange(n), [T] * n, blocks)
    return sample, codes, B


def test_paper_cka_identical_trained_and_untrained_codes_give_one():
    rng = np.random.default_rng(8)
    sample, codes, B = _constructed_sample(rng)
    v = paper_cka(sample, "m", {"a": 3, "b": 7})
    t, u = v["trained"], v["untrained"]
    assert t["paper_cka_fwd_a"] == pytest.approx(1.0) and t["paper_cka_fwd_b"] == pytest.approx(1.0)
    # the B outputs' Gram comes from the codes: against b = a Bᵀ flattened directly
    b = {role: (codes[role] @ B[role].T).reshape(16, -1).numpy() for role in PAPER_ROLES}
    K_paper, K_pair = rbf_kernel(b["paper"]), rbf_kernel(b["paper_pair"])
    assert u["paper_cka_fwd_b_null"] == pytest.approx(_reference_cka(K_paper, K_pair), abs=1e-9)
    a = {role: codes[role].reshape(16, -1).numpy() for role in PAPER_ROLES}
    assert u["paper_cka_fwd_a_null"] == pytest.approx(linear_cka(a["paper"], a["paper_pair"]))
    assert 0 < t["paper_cka_excess_se"] < 1 and 0 < t["paper_cka_fwd_minus_bwd_se"] < 1
    assert t["paper_cka_n_utterances"] == 16 and t["paper_cka_n_frames"] == 5
    assert t["paper_cka_sketch_buckets"] == 0
    assert 0.0 <= t["paper_cka_bwd_ba"] <= 1.0 and t["paper_cka_bwd_exponent"] > 0
    # the jackknife leaves one utterance out of every kernel: by hand for the backward one
    from serlens.analysis.ab_cka import jackknife_se

    G_gb, G_ga = sample.gram(("trained", "m", "b_out_grad")), sample.gram(("trained", "m", "a_out_grad"))  # fmt: skip
    loo = []
    for i in range(16):
        keep = np.delete(np.arange(16), i)
        cut = [G[np.ix_(keep, keep)] for G in (G_gb, G_ga)]
        loo.append(1.0 - paper_rbf_cka(cut[0], 5 * 7, cut[1], 5 * 3))  # fwd_a = fwd_b = 1
    assert t["paper_cka_fwd_minus_bwd_se"] == pytest.approx(jackknife_se(loo))


# --------------------------------------------------------------------------- the pass (tiny.en)


def _direct(run, utterances, name, policy):
    """Per utterance, alone in its batch (the paper's batch_size=1, mean loss of one): the
    flattened A code and ∂CE_u/∂a, ∂CE_u/∂b of module ``name`` under ``policy``."""
    import serlens.analysis.ab_dynamics as ab
    from serlens.models.encoder import masked_mean, run_encoder

    run = dataclasses.replace(run, policy=policy)
    train = run.splits["train"]
    modules = dict(sorted(run.lora_modules().items()))
    labels = torch.as_tensor(train.labels)
    out = {"a_code": [], "a_out_grad": [], "b_out_grad": []}
    with ab._gradients_through_adapters(run, [run.head]), ab.AdapterTaps(modules) as taps:
        for u in utterances:
            idx, batch = next(run.batches(train, 1, np.array([u])))
            states = run_encoder(run.encoder, batch)
            logits = run.head(masked_mean(states.last_hidden_state, states.frame_mask))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[torch.as_tensor(idx)])
            g = taps.gradients(loss)[name]
            n = batch.n_frames if policy == "pad30" else int(batch.attended[0].sum())
            for key, part in (("a_code", "code"), ("a_out_grad", "code_grad"), ("b_out_grad", "out_grad")):  # fmt: skip
                out[key].append(g[part][0, :n].double())
            taps.clear()
    return out


def _padded_gram(parts):
    T = max(p.shape[0] for p in parts)
    F = torch.zeros(len(parts), T * parts[0].shape[1], dtype=torch.float64)
    for i, p in enumerate(parts):
        F[i, : p.numel()] = p.reshape(-1)
    return (F @ F.T).numpy()


def _stream_sample(run, indices, baseline="matched_scale", init_std=None, batch_size=3):
    import serlens.analysis.ab_dynamics as ab

    states = [ab.trained_state(run), ab.untrained_state(run, baseline, 0, init_std)]
    plan = ab.paper_plan(run, indices, states, (), baseline, init_std, seed=0)
    ab.stream_ab_statistics(run, states, indices, batch_size, 100, 0, paper=plan)
    return plan


def test_pass_pad30_vectors_are_the_papers_1500_frames_per_utterance(lora_run):
    """Under pad30 the flattened A code is every one of the 1500 frames, as one utterance
    alone in its batch gives it; ∂L/∂a is the paper's per-utterance ∂CE_u/∂a."""
    run = dataclasses.replace(lora_run, policy="pad30")
    indices = np.arange(4)  # one utterance per class
    plan = _stream_sample(run, indices)
    sample = plan.sample
    assert sample.selected() == [0, 1, 2, 3] and sample.n_frames == 1500
    name = sorted(run.lora_modules())[1]
    direct = _direct(lora_run, [0, 1, 2, 3], name, "pad30")
    assert all(p.shape[0] == 1500 for p in direct["a_code"])
    for key in ("a_code", "a_out_grad"):
        got = sample.gram(("trained", name, key))
        np.testing.assert_allclose(got, _padded_gram(direct[key]), rtol=2e-4, atol=0)
    assert sample.sketched(("trained", name, "b_out_grad"))  # 4 x 1500 x 384 floats: sketched


def test_pass_crop_rows_are_per_utterance_gradients_zero_padded(lora_run):
    """Under crop each utterance keeps its own frames, zero-padded to the longest; the pass's
    loss Σ CE / N is undone, so the Grams are those of ∂CE_u/∂·, the paper's scale."""
    indices = np.arange(8)
    plan = _stream_sample(lora_run, indices, batch_size=5)
    sample = plan.sample
    name = sorted(lora_run.lora_modules())[0]
    direct = _direct(lora_run, list(range(8)), name, "crop")
    assert sample.n_frames == max(p.shape[0] for p in direct["a_code"])
    for key in ("a_code", "a_out_grad", "b_out_grad"):
        got, expected = sample.gram(("trained", name, key)), _padded_gram(direct[key])
        atol = 1e-5 * np.abs(np.diag(expected)).max()
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=atol)
        assert not sample.sketched(("trained", name, key))


def _paper_values(tensors):
    return {k: float(v) for k, v in tensors.items() if k.split("/")[-1].startswith("paper_cka")}


def test_pass_paper_rows_use_the_paper_baseline_whatever_is_configured(lora_run, monkeypatch):
    """With untrained_baseline: paper at std 0.02 the pass's own untrained state and its
    second draw are the paper's (no extra encoder work); with matched_scale the paper's
    baseline runs beside it. The rows are the same."""
    import serlens.analysis.ab_dynamics as ab
    from serlens.analysis.ab_dynamics import PAPER_SCALARS, ab_statistics, ab_table_from_statistics

    extra = []
    real = ab._paper_extra
    monkeypatch.setattr(ab, "_paper_extra", lambda *a: (extra.append(1), real(*a)))
    matched = ab_statistics(lora_run, np.arange(8), 4, "matched_scale", 0)
    runs_matched = len(extra)
    paper = ab_statistics(lora_run, np.arange(8), 4, "paper", 0, 0.02)
    assert runs_matched == 2 and len(extra) == 2  # two batches; none with the paper baseline
    a, b = _paper_values(matched), _paper_values(paper)
    assert a.keys() == b.keys() and {k.split("/")[-1] for k in a} == set(PAPER_SCALARS)
    # three of them under both states (the gradients' CKA, its float32 value, its exponent)
    assert len(a) == (len(PAPER_SCALARS) + 3) * len(lora_run.lora_modules())  # no speakers
    for key in a:
        # float32 kernels of gradient-sized values are rounding: compare those loosely
        tol = 2e-2 if key.endswith("_f32") else 1e-5
        assert a[key] == pytest.approx(b[key], abs=tol, rel=1e-4, nan_ok=True), key
    table = ab_table_from_statistics(matched, 4, 0.9)
    paper_rows = table[table["quantity"].str.startswith("paper_cka")]
    assert set(paper_rows["quantity"]) == set(PAPER_SCALARS)
    assert set(paper_rows.loc[paper_rows["quantity"] == "paper_cka_bwd_ba", "state"]) == {
        "trained",
        "untrained",
    }
    assert (paper_rows.loc[paper_rows["quantity"] == "paper_cka_fwd_a_null", "state"] == "untrained").all()  # fmt: skip
    assert (paper_rows.loc[paper_rows["quantity"] == "paper_cka_n_utterances", "value"] == 8).all()
    assert not table.duplicated(["module", "quantity", "state"]).any()


def test_pad30_input_of_a_crop_run_gives_the_rows_of_a_pad30_pass(lora_run):
    """analysis.paper_estimator_input: pad30 on a crop run runs the estimator in a pass of its
    own on 30-s padded input: the same rows as the pass of the run under pad30 (every frame
    flattened), marked paper_cka_pad30 = 1; the crop rows differ and are marked 0."""
    from serlens.analysis.ab_dynamics import ab_statistics

    # one utterance per class; the paper's baseline as the configured one, so the pad30
    # run reuses its untrained state (one backward less)
    args = (np.arange(4), 4, "paper", 0, 0.02)
    own = _paper_values(ab_statistics(lora_run, *args, claim3_frames=0, paper_input="pad30"))
    padded_run = dataclasses.replace(lora_run, policy="pad30")
    reference = _paper_values(ab_statistics(padded_run, *args, claim3_frames=0))
    crop = _paper_values(ab_statistics(lora_run, *args, claim3_frames=0))
    assert own.keys() == reference.keys() == crop.keys()
    for key in own:
        if key.endswith("paper_cka_n_frames"):
            assert own[key] == reference[key] == 1500 and crop[key] < 1500
        if key.endswith("paper_cka_pad30"):
            assert own[key] == reference[key] == 1.0 and crop[key] == 0.0
        tol = 2e-2 if key.endswith("_f32") else 1e-4
        assert own[key] == pytest.approx(reference[key], abs=tol, rel=1e-3, nan_ok=True), key
    fwd = [k for k in own if k.endswith("/paper_cka_fwd_a_null")]
    assert any(abs(own[k] - crop[k]) > 1e-3 for k in fwd)  # padding frames' codes count
    with pytest.raises(ValueError, match="paper_estimator_input"):
        ab_statistics(lora_run, *args, paper_input="pad_30")


def test_pass_paper_rows_only_in_fold_1(lora_run):
    from serlens.analysis.ab_dynamics import ab_statistics

    fold2 = dataclasses.replace(lora_run, fold=2)
    tensors = ab_statistics(fold2, np.arange(4), 4, "matched_scale", 0, claim3_frames=0)
    assert not _paper_values(tensors)
    off = ab_statistics(
        lora_run, np.arange(4), 4, "matched_scale", 0, claim3_frames=0, paper_per_class=0
    )
    assert not _paper_values(off)


# --------------------------------------------------------------------------- claims rows


def ab_runs_paper(fwd, null, bwd, se, runs=1, layers=4, sound=True):
    """Per-run tables with the paper's estimator's rows (fold 1) and the sound ones."""
    rows = []
    for seed in range(runs):
        for layer in range(layers):
            base = dict(model="m", method="lora_r8", seed=seed, fold=1)
            base |= dict(module=f"layers.{layer}.v_proj", layer=layer, depth=(layer + 1) / layers)

            def add(q, state, v, base=base):
                rows.append({**base, "quantity": q, "state": state, "value": v})

            for q in ("paper_cka_fwd_a", "paper_cka_fwd_b"):
                add(q, "trained", fwd)
                add(f"{q}_null", "untrained", null)
            add("paper_cka_bwd_ba", "trained", bwd)
            add("paper_cka_bwd_ba", "untrained", 0.5)
            add("paper_cka_fwd_b_f32", "trained", fwd)
            add("paper_cka_fwd_b_null_f32", "untrained", null)
            add("paper_cka_bwd_ba_f32", "trained", 0.0)
            add("paper_cka_bwd_ba_f32", "untrained", 0.0)
            add("paper_cka_bwd_exponent", "trained", 1e-9)
            add("paper_cka_excess_se", "trained", se)
            add("paper_cka_fwd_minus_bwd_se", "trained", se)
            add("paper_cka_n_utterances", "trained", 40)
            add("paper_cka_n_frames", "trained", 1500)
            add("paper_cka_sketch_buckets", "trained", 32768)
            if sound:
                for q in ("cka_fwd_a", "cka_fwd_b"):
                    add(q, "trained", 0.5)
                    add(f"{q}_null", "untrained", 0.1)
                add("cka_bwd_ba", "trained", 0.2)
                add("cka_bwd_ba", "untrained", 0.2)
                for q in ("a_out_centred_frac", "b_out_centred_frac"):  # claim 4's rows beside
                    add(q, "trained", 0.5)
                    add(q, "untrained", 0.5)
    return pd.DataFrame(rows)


def _paper_rows(rows):
    rows = pd.DataFrame(rows)
    return rows[rows["statistic"].str.startswith("paper's estimator")].reset_index(drop=True)


def test_claim3_paper_rows_supported_by_a_jackknife_interval_above_zero():
    rows = _paper_rows(claim3_rows(ab_runs_paper(0.95, 0.75, 0.6, 0.05), ["m"], ["lora_r8"], 0.1))
    assert len(rows) == 2
    fwd, bwd = rows.iloc[0], rows.iloc[1]
    assert fwd["estimate"] == pytest.approx(0.2)  # 0.95 − 0.75
    assert bwd["estimate"] == pytest.approx(0.35)  # 0.95 − 0.6
    half = 2.0226909 * 0.05  # t_{39, 0.975}: 40 utterances
    assert (fwd["ci_low"], fwd["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert rows["verdict"].tolist() == ["supported", "supported"]
    assert fwd["n_runs"] == 1 and "jackknife over the utterances" in fwd["compared_with"]
    # the paper's own reading and the float32 values are in the notes
    assert "A (linear) 0.950" in fwd["note"] and "two untrained draws" in fwd["note"]
    assert "float32" in bwd["note"] and "trained 0.000" in bwd["note"]
    assert "CountSketch" in fwd["note"]


def test_claim3_paper_rows_use_the_speaker_jackknife_where_the_pass_stored_it():
    """With speaker SEs the interval is t_{G−1} over the G speakers, not t_{n−1} over the
    utterances: wider for the same SE."""
    runs = ab_runs_paper(0.95, 0.75, 0.6, 0.05)
    extra = runs[runs["quantity"] == "paper_cka_excess_se"].copy()
    speaker_rows = pd.concat(
        [
            extra.assign(quantity="paper_cka_excess_speaker_se", value=0.05),
            extra.assign(quantity="paper_cka_fwd_minus_bwd_speaker_se", value=0.05),
            extra.assign(quantity="paper_cka_n_speakers", value=6.0),
        ]
    )
    rows = _paper_rows(claim3_rows(pd.concat([runs, speaker_rows]), ["m"], ["lora_r8"], 0.1))
    fwd = rows.iloc[0]
    half = 2.5705818 * 0.05  # t_{5, 0.975}: 6 speakers
    assert (fwd["ci_low"], fwd["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert "jackknife over the sample's 6 training speakers" in fwd["compared_with"]


def test_pass_paper_rows_get_a_speaker_jackknife_band(lora_run):
    """A run that knows its speakers gets, per paper quantity, an interval around it and
    the statistics' speaker SEs; leaving a speaker out equals the estimator on the rest."""
    from serlens.analysis.ab_cka import jackknife_interval as interval
    from serlens.analysis.ab_cka import kernel_cka
    from serlens.analysis.ab_dynamics import ab_statistics

    utt_ids = lora_run.splits["train"].utt_ids
    run = dataclasses.replace(lora_run, speakers={u: f"spk{i % 4}" for i, u in enumerate(utt_ids)})
    values = _paper_values(ab_statistics(run, np.arange(8), 4, "matched_scale", 0, claim3_frames=0))
    name = sorted(run.lora_modules())[0]
    t = {k.split("/")[-1]: v for k, v in values.items() if k.startswith(f"trained/{name}/")}
    assert t["paper_cka_n_speakers"] == 4
    assert t["paper_cka_fwd_a_band_low"] < t["paper_cka_fwd_a"] < t["paper_cka_fwd_a_band_high"]
    assert np.isfinite(t["paper_cka_excess_speaker_se"])
    # by hand: the trained codes' Grams with each speaker's two utterances left out
    plan = _stream_sample(run, np.arange(8), batch_size=4)
    G_t, G_p = (plan.sample.gram((role, name, "a_code")) for role in ("trained", "paper"))
    who = np.array([i % 4 for i in plan.sample.selected()])
    held = [kernel_cka(G_t[np.ix_(who != g, who != g)], G_p[np.ix_(who != g, who != g)]) for g in range(4)]  # fmt: skip
    low, high = interval(kernel_cka(G_t, G_p), held)
    assert t["paper_cka_fwd_a_band_low"] == pytest.approx(low, abs=1e-6)
    assert t["paper_cka_fwd_a_band_high"] == pytest.approx(high, abs=1e-6)
    plain = _paper_values(ab_statistics(lora_run, np.arange(8), 4, "matched_scale", 0, claim3_frames=0))  # fmt: skip
    assert not any(k.endswith(("_band_low", "_speaker_se", "n_speakers")) for k in plain)


def test_claim3_paper_rows_contradicted_when_at_the_null_and_inconclusive_without_interval():
    at_null = claim3_rows(ab_runs_paper(0.97, 0.97, 0.97, 0.01), ["m"], ["lora_r8"], 0.1)
    assert _paper_rows(at_null)["verdict"].tolist() == ["contradicted", "contradicted"]
    wide = claim3_rows(ab_runs_paper(0.97, 0.9, 0.9, 0.1), ["m"], ["lora_r8"], 0.1)
    assert _paper_rows(wide)["verdict"].tolist() == ["inconclusive", "inconclusive"]
    no_interval = ab_runs_paper(0.97, 0.5, 0.5, np.nan)
    rows = _paper_rows(claim3_rows(no_interval, ["m"], ["lora_r8"], 0.1))
    assert rows["verdict"].tolist() == ["inconclusive", "inconclusive"]
    assert np.isnan(rows["ci_low"]).all() and np.isfinite(rows["estimate"]).all()


def test_claim3_paper_rows_average_seeds_of_fold_1_and_sit_beside_the_sound_rows():
    runs = ab_runs_paper(0.95, 0.75, 0.6, 0.05, runs=3)
    sig = pd.DataFrame(
        [
            dict(model="m", method="lora_r8", baseline="frozen", delta_uar=0.1, ci_low=0.05)
            | dict(ci_high=0.15, p_holm=0.01, n_folds=1, n_seeds=3, note="")
        ]
    )
    table = claims_table(sig, None, runs, SETTINGS)
    c3 = table[table["claim"].str.startswith("3")].reset_index(drop=True)
    assert len(c3) == 4
    assert c3["statistic"].str.startswith("paper's estimator").tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert (c3.loc[2:, "n_runs"] == 3).all()
    # paper rows without sound ones still appear (after a "not tested" sound row)
    alone = pd.DataFrame(claim3_rows(ab_runs_paper(0.9, 0.5, 0.5, 0.05, sound=False), [], [], 0.1))
    assert alone["verdict"].tolist() == ["not tested", "supported", "supported"]


def test_jackknife_of_a_mean_is_its_standard_error_and_the_claims_interval_is_t():
    """For the mean, the leave-one-out SE is s / √n: estimate ± t_{n-1} SE is the t interval."""
    from scipy import stats as st

    from serlens.analysis.ab_cka import jackknife_se
    from serlens.report.claims import jackknife_interval

    x = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    loo = np.array([np.delete(x, i).mean() for i in range(len(x))])
    se = jackknife_se(loo)
    assert se == pytest.approx(x.std(ddof=1) / np.sqrt(5))
    half = st.t.ppf(0.975, 4) * se
    assert jackknife_interval(x.mean(), [se], 5) == pytest.approx(
        (x.mean() - half, x.mean() + half)
    )
    assert (
        np.isnan(jackknife_se([1.0, 2.0])) and np.isnan(jackknife_interval(1.0, [np.nan], 40)).all()
    )
