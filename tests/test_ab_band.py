"""The A/B dynamics' speaker band: the energy-rank shares re-drawn by training speaker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from serlens.analysis.ab_dynamics import (
    SPECTRA,
    ModuleAccumulators,
    ab_statistics,
    ab_table_from_statistics,
    compute_ab_dynamics,
    delta_w_comparison,
    gradient_draws,
    gram_singular_values,
    product_singular_values,
    stream_ab_statistics,
    trained_state,
    untrained_state,
)
from serlens.stats import cluster_multiplicities

CFG = {
    "batch_size": 3,
    "train_sample": 8,
    "energy_fraction": 0.9,
    "untrained_baseline": "matched_scale",
}


def _module(r=3, d_out=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, 7, generator=gen), torch.randn(d_out, r, generator=gen)
    module = ModuleAccumulators.for_weights(A, B, 2.0)
    module.keep_speakers(out_grad=True)
    return module


def _frames(module, speakers, seed=1):
    """Random frames for ``speakers`` (one entry per frame), added whole and by speaker."""
    rng = np.random.default_rng(seed)
    n, r, d = len(speakers), module.A.shape[0], module.B.shape[0]
    code = torch.as_tensor(rng.normal(size=(n, r)) + 0.5)
    code_grad = torch.as_tensor(rng.normal(size=(n, r)))
    out_grad = torch.as_tensor(rng.normal(size=(n, d)))
    module.add(code, code_grad, out_grad, torch.zeros_like(module.A), torch.zeros_like(module.B))
    module.add_by_speaker(np.asarray(speakers), code, code_grad, out_grad)


def test_every_speaker_once_gives_the_whole_samples_spectra():
    module = _module()
    _frames(module, ["s1"] * 6 + ["s2"] * 4 + ["s3"] * 5)
    draws = module.speaker_draws(np.ones((1, 3)))
    for centred, kind in ((False, "sv_draws/"), (True, "sv_centred_draws/")):
        whole = module.spectra(centred)
        for q in SPECTRA:
            np.testing.assert_allclose(draws[kind + q][0], whole[q], rtol=1e-9, atol=1e-9)
    assert draws["n_frames_draws"].tolist() == [15]


def test_a_speaker_drawn_twice_counts_twice():
    module = _module()
    _frames(module, ["s1"] * 6 + ["s2"] * 4)
    draws = module.speaker_draws(np.array([[2.0, 0.0]]))
    gram = 2 * module.by_speaker["a_out"]["s1"].gram
    np.testing.assert_allclose(draws["sv_draws/a_out"][0], gram_singular_values(gram))
    np.testing.assert_allclose(
        draws["sv_draws/b_out"][0], product_singular_values(gram, module.B), atol=1e-9
    )
    assert draws["n_frames_draws"].tolist() == [12]


def test_cluster_multiplicities_draw_n_minus_one_speakers():
    counts = cluster_multiplicities(4, 500, rng_seed=3)
    assert counts.shape == (500, 4) and np.all(counts.sum(axis=1) == 3)
    assert np.array_equal(counts, cluster_multiplicities(4, 500, rng_seed=3))
    assert (counts > 0).mean() == pytest.approx(1 - (3 / 4) ** 3, abs=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        cluster_multiplicities(1, 10)


def test_gradient_draws_of_unit_weights_are_the_whole_samples_values():
    """Speakers' shares summed with weight 1 give the ratio and dW_cos of the summed
    gradients (:func:`delta_w_comparison`); a speaker drawn twice counts twice."""
    rng = np.random.default_rng(2)
    r, d_in, d_out, S = 3, 7, 5, 4
    gA, gB = rng.standard_normal((S, r, d_in)), rng.standard_normal((S, d_out, r))
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    weights = np.array([[1.0] * S, [2.0, 0.0, 1.0, 0.0]])
    draws = gradient_draws(gA, gB, A, B, weights)
    for d, w in enumerate(weights):
        sum_a, sum_b = np.tensordot(w, gA, 1), np.tensordot(w, gB, 1)
        expected = delta_w_comparison(torch.tensor(sum_a), torch.tensor(sum_b), A, B, 2.0)
        assert draws["dW_cos"][d] == pytest.approx(expected["dW_cos"], rel=1e-10)
        ratio = np.linalg.norm(sum_b) / np.linalg.norm(sum_a)
        assert draws["grad_norm_ratio_B_A"][d] == pytest.approx(ratio, rel=1e-10)


def test_speakers_shares_of_the_factor_gradients_sum_to_autograds(lora_run):
    """Each speaker's ∂L/∂A and ∂L/∂B, built from its utterances' rows at every frame
    position, sum to the gradients autograd gives the whole sample."""
    utt_ids = lora_run.splits["train"].utt_ids
    run = dataclasses.replace(lora_run, speakers={u: f"spk{i % 3}" for i, u in enumerate(utt_ids)})
    states = [trained_state(run), untrained_state(run, "matched_scale", 0)]
    acc = stream_ab_statistics(run, states, np.arange(len(utt_ids)), 3, 50, 0)
    for state_acc in acc.values():
        for m_acc in state_acc.modules.values():
            shares = m_acc.grads_by_speaker
            assert sorted(shares) == ["spk0", "spk1", "spk2"]
            total_A = sum(v[0] for v in shares.values())
            total_B = sum(v[1] for v in shares.values())
            scale = float(m_acc.grad_A.abs().max())
            torch.testing.assert_close(total_A, m_acc.grad_A, atol=1e-5 * scale, rtol=1e-4)
            torch.testing.assert_close(
                total_B, m_acc.grad_B, atol=1e-5 * float(m_acc.grad_B.abs().max()), rtol=1e-4
            )


def test_table_gets_band_rows_that_bracket_the_draws(lora_run):
    utt_ids = lora_run.splits["train"].utt_ids
    run = dataclasses.replace(lora_run, speakers={u: f"spk{i % 4}" for i, u in enumerate(utt_ids)})
    table = compute_ab_dynamics(run, CFG, seed=0)
    # ∂L/∂b has no band (a d_out³ eigenproblem per draw)
    assert not table["quantity"].str.contains("^b_out_grad.*_band_").any()
    for q in ("a_out", "b_out", "a_out_grad"):
        for suffix in ("_frac", "_centred_frac"):
            low = table[table["quantity"] == f"{q}{suffix}_band_low"].set_index(["module", "state"])
            high = table[table["quantity"] == f"{q}{suffix}_band_high"].set_index(
                ["module", "state"]
            )
            assert len(low) == len(high) == 8, (q, suffix)  # 4 layers x trained, untrained
            assert (low["value"] <= high["value"]).all() and low["value"].between(0, 1).all()
    # row 3's scalars get a band too: bootstrap percentiles (ratio, dW_cos), the jackknife
    # interval around the estimate (the reservoir's CKA)
    v = table.set_index(["module", "quantity", "state"])["value"]
    for module in table["module"].unique():
        for state in ("trained", "untrained"):
            for q in ("grad_norm_ratio_B_A", "dW_cos", "cka_a_code_vs_b_out_grad"):
                low, high = (
                    v[(module, f"{q}_band_low", state)],
                    v[(module, f"{q}_band_high", state)],
                )
                assert low < high, (module, q, state)
            cka = v[(module, "cka_a_code_vs_b_out_grad", state)]
            assert v[(module, "cka_a_code_vs_b_out_grad_band_low", state)] < cka
            assert cka < v[(module, "cka_a_code_vs_b_out_grad_band_high", state)]
            assert -1 <= v[(module, "dW_cos_band_low", state)] <= 1
    # claim 3's CKA quantities get the speaker-jackknife interval around their estimate
    v = table.set_index(["module", "quantity", "state"])["value"]
    for q, state in (("cka_fwd_a", "trained"), ("cka_fwd_b_null", "untrained")):
        for module in table["module"].unique():
            low, high = v[(module, f"{q}_band_low", state)], v[(module, f"{q}_band_high", state)]
            assert low < v[(module, q, state)] < high, (module, q)
            assert v[(module, "cka_n_speakers", "trained")] == 4
    # a run without speakers (or one speaker) has no band rows, and its other rows are unchanged
    plain = compute_ab_dynamics(lora_run, CFG, seed=0)
    assert not plain["quantity"].str.contains("_band_|cka_n_speakers|_speaker_se").any()
    same = table[~table["quantity"].str.contains("_band_|cka_n_speakers|_speaker_se")].reset_index(
        drop=True
    )
    pd.testing.assert_frame_equal(same, plain)


def test_out_grad_band_equals_the_draws_one_by_one(lora_run, monkeypatch):
    """analysis.out_grad_band (the default): ∂L/∂b's shares get band rows too; each draw's
    uncentred and centred spectra (one tridiagonalisation, repeated draws solved once) are
    the eigenvalues of that draw's Gram and of its explicitly centred Gram."""
    import serlens.analysis.ab_dynamics as ab

    monkeypatch.setattr(ab, "BAND_RESAMPLES", 12)  # 384 x 384 eigenproblems: few draws suffice
    utt_ids = lora_run.splits["train"].utt_ids
    run = dataclasses.replace(lora_run, speakers={u: f"spk{i % 4}" for i, u in enumerate(utt_ids)})
    indices = np.arange(len(utt_ids))
    tensors = ab_statistics(
        run, indices, 3, "matched_scale", 0, claim3_frames=0, out_grad_band=True
    )
    table = ab_table_from_statistics(tensors, 4, 0.9)
    for suffix in ("_frac", "_centred_frac"):
        low = table[table["quantity"] == f"b_out_grad{suffix}_band_low"]
        high = table[table["quantity"] == f"b_out_grad{suffix}_band_high"]
        assert len(low) == len(high) == 8
        assert (low["value"].to_numpy() <= high["value"].to_numpy()).all()
    module = _module(d_out=6)
    _frames(module, ["s1"] * 5 + ["s2"] * 4 + ["s3"] * 3)
    weights = cluster_multiplicities(3, 7, rng_seed=1)
    weights = np.vstack([weights, weights[:2]])  # repeated draws, as a small bootstrap has
    draws = module.speaker_draws(weights)
    accs = module.by_speaker["b_out_grad"]
    for d, row in enumerate(weights):
        parts = list(zip(row, sorted(accs), strict=True))
        gram = sum(w * accs[k].gram for w, k in parts)
        total = sum(w * accs[k].total for w, k in parts)
        n = sum(w * accs[k].n_rows for w, k in parts)
        centred = gram - torch.outer(total, total) / n
        for kind, expected in (("sv_draws/", gram), ("sv_centred_draws/", centred)):
            sv = gram_singular_values(expected)
            # zero eigenvalues come back as the root of their round-off (~1e-8 of the top)
            np.testing.assert_allclose(
                draws[kind + "b_out_grad"][d], sv, rtol=1e-9, atol=1e-7 * sv[0]
            )


def test_band_follows_the_energy_fraction_without_a_new_pass(lora_run):
    utt_ids = lora_run.splits["train"].utt_ids
    run = dataclasses.replace(lora_run, speakers={u: f"spk{i % 2}" for i, u in enumerate(utt_ids)})
    indices = np.arange(len(utt_ids))
    tensors = ab_statistics(run, indices, 3, "matched_scale", seed=0)
    assert any("/sv_draws/" in key for key in tensors)
    wide, narrow = (ab_table_from_statistics(tensors, 4, f) for f in (0.99, 0.5))
    key = "a_out_grad_centred_frac_band_high"
    high_wide = wide.loc[wide["quantity"] == key, "value"].to_numpy()
    high_narrow = narrow.loc[narrow["quantity"] == key, "value"].to_numpy()
    assert np.all(high_wide >= high_narrow) and np.any(high_wide > high_narrow)
