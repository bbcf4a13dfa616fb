"""The encoder passes store what the analyses used to compute in memory: same numbers, one model load."""

import numpy as np
import pandas as pd
import pytest
import torch
from test_ab_dynamics import CFG

from serlens.analysis.ab_dynamics import ab_dynamics_table, ab_table_from_statistics
from serlens.analysis.contributions import compute_contributions, contributions_from_states
from serlens.analysis.logit_lens import (
    compute_logit_lens,
    logit_lens_table,
    pooled_normalised_states,
    stored_residual_states,
)
from serlens.analysis.passes import (
    States,
    adapted_pass,
    analysis_sample,
    base_pass,
    every_utterance,
    pass_settings,
)
from serlens.analysis.representations import cka_table, compute_cka
from serlens.models.encoder import pooled_layer_states

SETTINGS = {**CFG, "seed": 0, "paper_estimator_input": "run", "out_grad_band": False}


@pytest.fixture(scope="module")
def passes(lora_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("passes")
    adapted_pass(lora_run, SETTINGS, tmp / "run/states.safetensors", tmp / "run/ab.safetensors")
    base_run, folds = every_utterance(lora_run)
    base_pass(base_run, folds, SETTINGS, tmp / "base/states.safetensors")
    base = States(tmp / "base/states.safetensors").fold_view(1)
    return States(tmp / "run/states.safetensors"), base, tmp


def one_by_one(run, split, fn, adapter=True):
    rows = []
    with torch.inference_mode():
        for _, batch in run.batches(split, 1):
            if adapter:
                rows.append(fn(run.encoder, batch)[0].float().numpy())
            else:
                with run.adapter_disabled():
                    rows.append(fn(run.encoder, batch)[0].float().numpy())
    order = np.argsort(split.durations, kind="stable")
    out = np.empty((len(split), *rows[0].shape), dtype=np.float32)
    out[order] = np.stack(rows)
    return out


def test_states_are_each_utterance_alone(lora_run, passes):
    """Rows in split order, equal to the utterance run alone (crop masks padding out)."""
    own, base, _ = passes
    test, train = lora_run.splits["test"], lora_run.splits["train"]
    assert own.utt_ids("test") == test.utt_ids and own.utt_ids("train") == train.utt_ids
    np.testing.assert_allclose(
        own["test/pooled"], one_by_one(lora_run, test, pooled_layer_states), atol=2e-5
    )
    np.testing.assert_allclose(
        own["test/normalised"],
        one_by_one(lora_run, test, pooled_normalised_states),
        atol=2e-5,
    )
    np.testing.assert_allclose(
        base["test/pooled"],
        one_by_one(lora_run, test, pooled_layer_states, adapter=False),
        atol=2e-5,
    )
    # the adapter changes the states, and the base pass really has it off
    assert np.abs(own["test/pooled"][:, -1] - base["test/pooled"][:, -1]).max() > 1e-4
    sample = analysis_sample(lora_run, SETTINGS)
    assert own.utt_ids("train_sample") == [train.utt_ids[i] for i in sample]
    # the per-model base pass gives each fold the same test rows and analysis sample
    assert base.utt_ids("test") == test.utt_ids
    assert base.utt_ids("train_sample") == own.utt_ids("train_sample")
    n_layers = len(lora_run.encoder.layers)
    assert own["test/contrib"].shape == (len(test), n_layers, 3, 2)
    assert (own["test/frames"] > 0).all()


def test_contributions_from_states_match_the_direct_analysis(lora_run, passes):
    own, base, _ = passes
    direct = compute_contributions(lora_run, {"batch_size": 3}, 0)
    stored = contributions_from_states(own, base, True)
    pd.testing.assert_frame_equal(
        stored.drop(columns="value"), direct.drop(columns="value"), check_dtype=False
    )
    np.testing.assert_allclose(stored["value"], direct["value"], rtol=1e-6, atol=1e-9)


def test_logit_lens_from_states_matches_the_direct_analysis(lora_run, passes):
    own, base, _ = passes
    cfg = {**CFG, "tuned_lens": True, "tuned_lens_steps": 5}
    direct = compute_logit_lens(lora_run, cfg, 0)
    stored = logit_lens_table(
        lora_run.head,
        {
            "adapted": torch.from_numpy(own["test/normalised"]),
            "base": torch.from_numpy(base["test/normalised"]),
        },
        "adapted",
        lora_run.splits["test"].labels,
        len(lora_run.classes),
        torch.from_numpy(own["train_sample/normalised"]),
        5,
        residual_states=stored_residual_states({"adapted": own, "base": base}),
    )
    assert "paper_no_final_ln" in set(stored["lens"])
    pd.testing.assert_frame_equal(stored.drop(columns="value"), direct.drop(columns="value"))
    np.testing.assert_allclose(stored["value"], direct["value"], rtol=1e-4, atol=1e-5)


def test_cka_from_states_matches_the_direct_analysis(lora_run, passes):
    own, base, _ = passes
    direct = compute_cka(lora_run, {"batch_size": 3, "rbf_threshold": 0.5}, 0)
    stored = cka_table(
        base["test/pooled"].astype(np.float64).transpose(1, 0, 2),
        own["test/pooled"].astype(np.float64).transpose(1, 0, 2),
        0.5,
    )
    np.testing.assert_allclose(stored["value"], direct["value"], atol=1e-5)


def test_ab_dynamics_from_stored_statistics_match_the_direct_analysis(lora_run, passes):
    from safetensors.torch import load_file

    _, _, tmp = passes
    tensors = load_file(str(tmp / "run/ab.safetensors"))
    sample = analysis_sample(lora_run, SETTINGS)
    for fraction in (0.9, 0.5):  # the energy fraction is applied afterwards
        direct = ab_dynamics_table(lora_run, sample, 3, fraction, "matched_scale", 0)
        stored = ab_table_from_statistics(tensors, len(lora_run.encoder.layers), fraction)
        key = ["module", "quantity", "state"]
        merged = direct.merge(stored, on=key, suffixes=("_direct", "_stored"))
        assert len(merged) == len(direct) == len(stored)
        np.testing.assert_allclose(
            merged["value_stored"], merged["value_direct"], rtol=1e-6, atol=1e-9
        )
    meta = safe_metadata(tmp / "run/ab.safetensors")
    assert meta["untrained_baseline"] == "matched_scale" and meta["untrained_init_std"] == ""


def safe_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_pass_settings_pass_the_paper_std_only_with_the_paper_baseline():
    """Every key passed is read: the std only with ``paper``, no baseline for the base pass."""
    from serlens.config import validate_config

    default = pass_settings(validate_config({}))
    assert default["untrained_baseline"] == "matched_scale"
    assert "untrained_init_std" not in default
    paper = pass_settings(validate_config({"analysis": {"untrained_baseline": "paper"}}))
    assert paper["untrained_baseline"] == "paper" and paper["untrained_init_std"] == 0.02
    assert default["paper_estimator_input"] == "run"
    base = pass_settings(validate_config({}), ab=False)
    assert default["out_grad_band"] is True
    assert not {
        "untrained_baseline",
        "untrained_init_std",
        "paper_estimator_input",
        "out_grad_band",
    } & set(base)
    assert {"batch_size", "train_sample", "seed", "classes", "audio"} <= set(base)


def test_adapted_pass_reads_every_setting_it_is_passed(lora_run, tmp_path):
    from serlens.analysis.registry import Settings

    for extra in (
        {"untrained_baseline": "matched_scale"},
        {"untrained_baseline": "paper", "untrained_init_std": 0.02},
    ):
        plain = {
            "batch_size": 4,
            "train_sample": 4,
            "seed": 0,
            "paper_estimator_input": "run",
            "out_grad_band": False,
            **extra,
        }
        settings = Settings("pass_run", plain)
        adapted_pass(lora_run, settings, tmp_path / "s.safetensors", tmp_path / "ab.safetensors")
        assert settings.accessed == set(plain), (extra, settings.accessed)
        assert (
            safe_metadata(tmp_path / "ab.safetensors")["untrained_baseline"]
            == extra["untrained_baseline"]
        )
