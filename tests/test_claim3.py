"""Claim 3 (forward alignment, backward differentiation): the CKA quantities, the utterance
sample of frames, and the claims-table rows, on known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from serlens.analysis.ab_cka import (
    UtteranceFrameSample,
    b_features,
    claim3_cka,
    debiased_cka,
    pair_seed,
)
from serlens.analysis.cka import debiased_linear_cka, linear_cka
from serlens.report.claims import claim3_rows, claims_table

SETTINGS = {"sesoi_uar": 0.02, "sesoi_share": 0.1, "sesoi_log_rank": 0.1, "sesoi_cka": 0.1}


# --------------------------------------------------------------------------- the estimator


def test_debiased_cka_of_independent_gaussians_is_near_zero_where_biased_is_not():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((200, 100)), rng.standard_normal((200, 100))
    assert linear_cka(X, Y) > 0.25  # biased: far from 0 with n = 2d
    assert abs(debiased_cka(X, Y)) < 0.03
    assert debiased_cka(X, Y) == pytest.approx(debiased_linear_cka(X, Y), abs=1e-10)


def test_debiased_cka_known_answers():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 6))
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert debiased_cka(X, X) == pytest.approx(1.0)
    assert debiased_cka(X, 3.0 * X @ Q + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert np.isnan(debiased_cka(X[:3], X[:3]))  # the unbiased HSIC needs 4 rows
    with pytest.raises(ValueError):
        debiased_cka(X, X[:10])


def test_b_features_have_the_b_output_gram():
    rng = np.random.default_rng(2)
    a, B = rng.standard_normal((30, 4)), rng.standard_normal((40, 4))
    F = b_features(a, torch.from_numpy(B))
    np.testing.assert_allclose(F @ F.T, (a @ B.T) @ (a @ B.T).T, atol=1e-9)
    assert F.shape == (30, 4)


def test_pair_seed_differs_and_is_deterministic():
    assert pair_seed(0) == pair_seed(0) and pair_seed(0) != 0 and pair_seed(0) != pair_seed(1)


# --------------------------------------------------------------------------- the frame sample


def _batch(lengths, n_frames=20, dims=3, offset=0.0):
    """Blocks whose row values encode (utterance, frame) and the frame mask of ``lengths``
    audio frames (leading frames masked off by 2, to mimic leading silence)."""
    mask = torch.zeros(len(lengths), n_frames, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 2 : 2 + n] = True
    return mask


def _offer(sample, ids, lengths, n_frames=20):
    mask = _batch(lengths, n_frames)
    frames = torch.arange(n_frames, dtype=torch.float32)
    block = torch.stack([torch.stack([torch.full((n_frames,), float(u)), frames], 1) for u in ids])
    sample.offer(np.asarray(ids), mask, {"x": block, "y": block * 2})
    return mask


def test_utterance_sample_keeps_whole_capped_utterances_and_enough_frames():
    lengths = {u: 5 + (u % 7) for u in range(30)}  # 5-11 audio frames each
    sample = UtteranceFrameSample(range(30), target_frames=60, seed=3, per_utterance=6)
    for start in range(0, 30, 4):  # streamed in batches, pruned after each
        ids = list(range(start, min(start + 4, 30)))
        _offer(sample, ids, [lengths[u] for u in ids])
        sample.prune()
    X, Y = sample.sample("x"), sample.sample("y")
    np.testing.assert_array_equal(Y, 2 * X)  # keys paired row by row
    assert len(X) >= 60 and sample.n_frames == len(X)
    chosen = sample.selected()
    # the offline answer: utterances in seeded rank order until >= 60 frames
    ranked = sorted(range(30), key=sample.rank.__getitem__)
    counts = np.cumsum([min(lengths[u], 6) for u in ranked])
    assert chosen == ranked[: int(np.searchsorted(counts, 60) + 1)]
    for u in chosen:  # whole utterances: every kept frame of u, none of any other
        rows = X[X[:, 0] == u]
        assert len(rows) == min(lengths[u], 6)
        assert rows[:, 1].min() >= 2 and rows[:, 1].max() < 2 + lengths[u]  # audio frames only
        assert rows[0, 1] == 2 and rows[-1, 1] == 1 + lengths[u]  # evenly spaced, ends kept
    assert set(np.unique(X[:, 0]).astype(int)) == set(chosen)
    assert len(sample.rows) == len(chosen)  # the rest was dropped


def test_utterance_sample_keeps_everything_when_the_sample_is_short():
    sample = UtteranceFrameSample(range(4), target_frames=2000, seed=0)
    assert sample.per_utterance == 500  # ceil(2000 / 4)
    _offer(sample, [0, 1, 2, 3], [3, 4, 5, 6])
    sample.prune()
    assert sample.n_frames == 18 and sorted(sample.selected()) == [0, 1, 2, 3]


def test_utterance_sample_is_seeded():
    a = UtteranceFrameSample(range(50), target_frames=10, seed=1)
    b = UtteranceFrameSample(range(50), target_frames=10, seed=1)
    c = UtteranceFrameSample(range(50), target_frames=10, seed=2)
    assert a.rank == b.rank and a.rank != c.rank
    with pytest.raises(KeyError):
        _offer(a, [99], [3])


# --------------------------------------------------------------------------- claim3_cka


def _module_sample(codes: dict, grads: dict, n_utts=20, per=10):
    sample = UtteranceFrameSample(range(n_utts), target_frames=n_utts * per, seed=0)
    mask = torch.ones(n_utts, per, dtype=torch.bool)
    blocks = {}
    for state, a in codes.items():
        blocks[(state, "m", "a_code")] = torch.from_numpy(a).reshape(n_utts, per, -1)
    for state, (ga, gb) in grads.items():
        blocks[(state, "m", "a_out_grad")] = torch.from_numpy(ga).reshape(n_utts, per, -1)
        blocks[(state, "m", "b_out_grad")] = torch.from_numpy(gb).reshape(n_utts, per, -1)
    sample.offer(np.arange(n_utts), mask, blocks)
    sample.prune()
    return sample


def test_claim3_cka_identical_codes_give_one_and_independent_near_zero():
    rng = np.random.default_rng(4)
    n, r, d = 200, 4, 12
    x = rng.standard_normal((n, 16))
    A = rng.standard_normal((r, 16))
    a_t = x @ A.T
    a_pair = rng.standard_normal((n, r))  # independent of the others
    B = {s: torch.from_numpy(rng.standard_normal((d, r))) for s in ("untrained_pair",)}
    B["trained"] = B["untrained"] = torch.from_numpy(rng.standard_normal((d, r)))
    g_b = rng.standard_normal((n, d))
    grads = {"trained": (g_b @ B["trained"].numpy(), g_b), "untrained": (g_b[:, :r], g_b)}
    sample = _module_sample({"trained": a_t, "untrained": a_t, "untrained_pair": a_pair}, grads)
    values = claim3_cka(sample, "m", B)
    assert values["trained"]["cka_fwd_a"] == pytest.approx(1.0)
    assert values["trained"]["cka_fwd_b"] == pytest.approx(1.0)
    assert abs(values["untrained"]["cka_fwd_a_null"]) < 0.1
    # ∂L/∂a = ∂L/∂b B is a rank-r linear map of the d-dim ∂L/∂b: aligned, but not fully
    assert 0.2 < values["trained"]["cka_bwd_ba"] < 0.95
    assert values["untrained"]["cka_bwd_ba"] == pytest.approx(
        debiased_linear_cka(g_b, g_b[:, :r]), abs=1e-9
    )
    assert values["trained"]["cka_n_frames"] == n and values["trained"]["cka_n_utterances"] == 20


def test_leave_one_speaker_out_cka_equals_the_estimator_on_the_rows_left():
    from serlens.analysis.ab_cka import leave_one_group_out_cka

    rng = np.random.default_rng(4)
    n = 300
    X = rng.standard_normal((n, 5)) + 7.0  # an offset the sums must not feel
    Y = np.hstack([X @ rng.standard_normal((5, 3)), rng.standard_normal((n, 20))]) * 1e-5
    groups = rng.choice(["s1", "s2", "s3", "s4"], n)
    out = leave_one_group_out_cka({"x": X, "y": Y}, {"q": ("x", "y"), "self": ("y", "y")}, groups)
    estimate, held_out = out["q"]
    assert estimate == pytest.approx(debiased_cka(X, Y), abs=1e-10)
    for value, g in zip(held_out, ["s1", "s2", "s3", "s4"], strict=True):
        keep = groups != g
        assert value == pytest.approx(debiased_cka(X[keep], Y[keep]), abs=1e-10)
    assert out["self"][0] == pytest.approx(1.0) and np.allclose(out["self"][1], 1.0)
    assert leave_one_group_out_cka({"x": X, "y": Y}, {"q": ("x", "y")}, None)["q"][1].size == 0


def test_speaker_band_is_wide_where_speakers_disagree_and_narrow_where_they_agree():
    """Six speakers whose A codes follow the trained ones in the same way (agree) or, for
    half of them, not at all (disagree): the interval holds the estimate and is far wider
    when speakers disagree; fewer than 3 speakers give no band."""
    rng = np.random.default_rng(5)
    r, d, per = 4, 12, 60
    speakers = {u: f"spk{u % 6}" for u in range(30)}

    def sample_for(disagree: bool):
        codes = {"trained": [], "untrained": [], "untrained_pair": []}
        grads = {"trained": ([], []), "untrained": ([], [])}
        for u in range(30):
            a_t = rng.standard_normal((per, r))
            unrelated = disagree and u % 6 < 3
            a_u = (
                rng.standard_normal((per, r))
                if unrelated
                else a_t + 0.3 * rng.standard_normal((per, r))
            )
            codes["trained"].append(a_t)
            codes["untrained"].append(a_u)
            codes["untrained_pair"].append(rng.standard_normal((per, r)))
            for state in grads:
                g_b = rng.standard_normal((per, d))
                grads[state][0].append(g_b[:, :r])
                grads[state][1].append(g_b)
        sample = UtteranceFrameSample(range(30), target_frames=30 * per, seed=0)
        for u in range(30):
            blocks = {(s, "m", "a_code"): torch.from_numpy(codes[s][u])[None] for s in codes}
            for s, (ga, gb) in grads.items():
                blocks[(s, "m", "a_out_grad")] = torch.from_numpy(ga[u])[None]
                blocks[(s, "m", "b_out_grad")] = torch.from_numpy(gb[u])[None]
            sample.offer([u], torch.ones(1, per, dtype=torch.bool), blocks)
        return sample

    B = {
        s: torch.from_numpy(rng.standard_normal((d, r)))
        for s in ("trained", "untrained", "untrained_pair")
    }
    width = {}
    for disagree in (False, True):
        values = claim3_cka(sample_for(disagree), "m", B, speakers=speakers)["trained"]
        assert values["cka_n_speakers"] == 6
        assert values["cka_fwd_a_band_low"] < values["cka_fwd_a"] < values["cka_fwd_a_band_high"]
        width[disagree] = values["cka_fwd_a_band_high"] - values["cka_fwd_a_band_low"]
    assert width[True] > 5 * width[False]
    two = claim3_cka(sample_for(False), "m", B, speakers={u: f"spk{u % 2}" for u in range(30)})
    assert "cka_fwd_a_band_low" not in two["trained"] and "cka_n_speakers" not in two["trained"]


# --------------------------------------------------------------------------- claims rows


def ab_runs(fwd, null, bwd, noise=0.0, runs=5, layers=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(1, runs + 1):
        for layer in range(layers):
            base = dict(model="m", method="lora_r8", seed=0, fold=fold)
            base |= dict(module=f"layers.{layer}.v_proj", layer=layer, depth=(layer + 1) / layers)

            def add(q, state, v, base=base):
                rows.append({**base, "quantity": q, "state": state, "value": v})

            for q in ("cka_fwd_a", "cka_fwd_b"):
                add(q, "trained", fwd + noise * rng.standard_normal())
                add(f"{q}_null", "untrained", null + noise * rng.standard_normal())
            add("cka_bwd_ba", "trained", bwd + noise * rng.standard_normal())
            add("cka_bwd_ba", "untrained", bwd)
            for q in ("a_out_centred_frac", "b_out_centred_frac"):  # claim 4's rows beside
                add(q, "trained", 0.5)
                add(q, "untrained", 0.5)
    return pd.DataFrame(rows)


def _claim3(table):
    return table[table["claim"].str.startswith("3")].set_index("statistic")


def _sound(rows) -> pd.DataFrame:
    """The rows of the sound estimator (not those of the paper's estimator)."""
    rows = pd.DataFrame(rows)
    return rows[~rows["statistic"].str.startswith("paper's estimator")].reset_index(drop=True)


def test_identical_codes_support_forward_alignment():
    all_rows = pd.DataFrame(
        claim3_rows(ab_runs(1.0, 0.4, 0.2, noise=0.02), ["m"], ["lora_r8"], 0.1)
    )
    rows = _sound(all_rows)
    assert len(rows) == 2
    fwd, bwd = rows.iloc[0], rows.iloc[1]
    assert fwd["estimate"] == pytest.approx(0.6, abs=0.03)  # 1 − 0.4
    assert fwd["verdict"] == "supported" and fwd["ci_low"] > 0
    assert bwd["estimate"] == pytest.approx(0.8, abs=0.03)  # 1 − 0.2
    assert bwd["verdict"] == "supported"
    assert "paper's estimator" in fwd["note"] and fwd["n_runs"] == 5
    # no fold-1 rows of the paper's estimator in these tables: one "not tested" row for it
    paper = all_rows[all_rows["statistic"].str.startswith("paper's estimator")]
    assert paper["verdict"].tolist() == ["not tested"]


def test_independent_codes_sit_inside_the_null_and_are_inconclusive():
    rows = _sound(claim3_rows(ab_runs(0.0, 0.0, 0.0, noise=0.3), ["m"], ["lora_r8"], 0.1))
    fwd = rows.iloc[0]
    assert fwd["ci_low"] < 0 < fwd["ci_high"] and fwd["ci_high"] > 0.1
    assert fwd["verdict"] == "inconclusive"


def test_forward_equal_to_its_null_with_a_tight_interval_is_contradicted():
    rows = _sound(claim3_rows(ab_runs(0.9, 0.9, 0.9, noise=0.01), ["m"], ["lora_r8"], 0.1))
    assert rows["verdict"].tolist() == ["contradicted", "contradicted"]


def test_claims_table_marks_models_without_cka_rows_not_tested():
    sig = pd.DataFrame(
        [
            dict(model=m, method="lora_r8", baseline="frozen", delta_uar=0.1, ci_low=0.05)
            | dict(ci_high=0.15, p_holm=0.01, n_folds=5, n_seeds=1, note="")
            for m in ("m", "other")
        ]
    )
    table = claims_table(sig, None, ab_runs(1.0, 0.4, 0.2, noise=0.02), SETTINGS)
    c3 = table[table["claim"].str.startswith("3")]
    # the sound rows, then the paper's estimator's (not tested: no fold-1 rows of it here)
    assert c3[c3["model"] == "m"]["verdict"].tolist() == ["supported", "supported", "not tested"]
    assert c3[c3["model"] == "other"]["verdict"].tolist() == ["not tested"]


# --------------------------------------------------------------------------- the pass (tiny.en)


def _by(table):
    return table.set_index(["module", "quantity", "state"])["value"]


def test_pass_stores_the_claim3_quantities_on_every_audio_frame_of_a_short_sample(lora_run):
    from serlens.analysis.ab_dynamics import CLAIM3_SCALARS, ab_dynamics_table

    indices = np.arange(8)
    table = ab_dynamics_table(lora_run, indices, 3, 0.9, "matched_scale", seed=0)
    v = _by(table)
    modules = sorted(table["module"].unique())
    assert set(CLAIM3_SCALARS) <= set(table["quantity"])
    for name in modules:
        # fewer than 2000 audio frames in 8 short clips: every one is used, all utterances
        assert v[(name, "cka_n_frames", "trained")] == v[(name, "n_frames", "trained")]
        assert v[(name, "cka_n_utterances", "trained")] == 8
        for q, state in (
            ("cka_fwd_a", "trained"),
            ("cka_fwd_b", "trained"),
            ("cka_fwd_a_null", "untrained"),
            ("cka_fwd_b_null", "untrained"),
            ("cka_bwd_ba", "trained"),
            ("cka_bwd_ba", "untrained"),
        ):
            assert -0.2 < v[(name, q, state)] < 1.0 + 1e-9, (name, q, state)
        # two different random draws are not the same adapter
        assert v[(name, "cka_fwd_a_null", "untrained")] < 0.999
    assert not table.duplicated(["module", "quantity", "state"]).any()


def test_identical_trained_and_untrained_adapters_give_forward_cka_one(lora_run, monkeypatch):
    """Known answer through the whole pass: an 'untrained' state equal to the trained one
    (and so its second draw) has the same codes, outputs and gradients on the same frames."""
    import serlens.analysis.ab_dynamics as ab

    def same(run, baseline, seed, init_std=None):
        t = ab.trained_state(run)
        return ab.AdapterState("untrained", t.head, t.weights, t.magnitudes)

    monkeypatch.setattr(ab, "untrained_state", same)
    v = _by(ab.ab_dynamics_table(lora_run, np.arange(8), 3, 0.9, "matched_scale", seed=0))
    for name in {k[0] for k in v.index}:
        for q, state in (
            ("cka_fwd_a", "trained"),
            ("cka_fwd_b", "trained"),
            ("cka_fwd_a_null", "untrained"),
            ("cka_fwd_b_null", "untrained"),
        ):
            assert v[(name, q, state)] == pytest.approx(1.0, abs=1e-6)
        assert v[(name, "cka_bwd_ba", "trained")] == pytest.approx(
            v[(name, "cka_bwd_ba", "untrained")], abs=1e-6
        )


def test_claim3_frames_zero_leaves_the_quantities_out(lora_run):
    from serlens.analysis.ab_dynamics import ab_statistics

    tensors = ab_statistics(
        lora_run, np.arange(4), 4, "matched_scale", 0, claim3_frames=0, paper_per_class=0
    )
    assert not any("cka_fwd" in k or "cka_bwd" in k for k in tensors)
    assert any(k.endswith("cka_a_code_vs_b_out_grad") for k in tensors)


def test_claim3_rows_from_the_pass_tables(lora_run):
    """The pass's rows feed the claim: two runs (two seeds of the baseline and the frames)."""
    from serlens.analysis.ab_dynamics import ab_dynamics_table

    runs = pd.concat(
        [
            ab_dynamics_table(lora_run, np.arange(8), 3, 0.9, "matched_scale", seed=s).assign(
                model="tiny.en", method="lora_r4", seed=s, fold=1
            )
            for s in (0, 1)
        ]
    )
    rows = pd.DataFrame(claim3_rows(runs, ["tiny.en"], ["lora_r4"], 0.1))
    # two sound rows, then two of the paper's estimator (the fixture's run is fold 1)
    assert len(rows) == 4 and (rows["n_runs"] == 2).all()
    assert rows["statistic"].str.startswith("paper's estimator").tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert np.isfinite(rows[["estimate", "ci_low", "ci_high"]].to_numpy(float)).all()
    assert set(rows["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    trained = runs[(runs["quantity"] == "cka_fwd_a") & (runs["state"] == "trained")]
    null = runs[(runs["quantity"] == "cka_fwd_a_null") & (runs["state"] == "untrained")]
    assert len(trained) == len(null) > 0
