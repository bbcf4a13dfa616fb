"""The claims table: known answers of each statistic and of the verdict rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from serlens.report.claims import (
    claims_table,
    late_minus_early,
    rank_log_ratio,
    t_interval,
    verdict,
)

SETTINGS = {"sesoi_uar": 0.02, "sesoi_share": 0.1, "sesoi_log_rank": 0.1, "sesoi_cka": 0.1}


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0.01, 0.2, "supported"),
        (-0.05, 0.015, "contradicted"),  # excludes an effect as large as 0.02
        (-0.05, 0.05, "inconclusive"),  # not significant, but a 0.02 effect is not excluded
        (np.nan, 0.1, "inconclusive"),
    ],
)
def test_verdict_rule(lo, hi, expected):
    assert verdict(lo, hi, 0.02) == expected


def significance(delta, lo, hi, p, method="lora_r8", baseline="frozen"):
    return pd.DataFrame(
        [
            {
                "model": "m",
                "method": method,
                "baseline": baseline,
                "delta_uar": delta,
                "ci_low": lo,
                "ci_high": hi,
                "p_holm": p,
                "n_folds": 5,
                "n_seeds": 1,
                "note": "",
            }
        ]
    )


def test_claim1_reads_either_orientation_and_needs_holm():
    table = claims_table(significance(0.1, 0.05, 0.15, 0.01), None, None, SETTINGS)
    row = table[table["claim"].str.startswith("1")].iloc[0]
    assert row["verdict"] == "supported" and row["estimate"] == pytest.approx(0.1)
    # the same comparison stored the other way round: frozen vs LoRA, negative delta
    flipped = significance(-0.1, -0.15, -0.05, 0.01, method="frozen", baseline="lora_r8")
    row = claims_table(flipped, None, None, SETTINGS).iloc[0]
    assert row["method"] == "lora_r8" and row["estimate"] == pytest.approx(0.1)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.05, 0.15))
    weak = claims_table(significance(0.1, 0.05, 0.15, 0.2), None, None, SETTINGS).iloc[0]
    assert weak["verdict"] == "inconclusive"  # the interval says yes, the corrected test not
    rows = claims_table(significance(0.1, 0.05, 0.15, 0.01), None, None, SETTINGS)
    assert rows[rows["claim"].str.startswith("3")]["verdict"].tolist() == ["not tested"]


def causal_runs(late: float, early: float, noise: float = 0.0, n_layers: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    half = n_layers // 2
    for fold in (1, 2, 3):
        for s in range(3):
            for family, layer, value in (
                ("adapters_from", half, late),
                ("adapters_upto", half - 1, early),
                ("adapter_off", 0, 0.5),
            ):
                rows.append(
                    dict(
                        model="m",
                        method="lora_r8",
                        seed=0,
                        fold=fold,
                        family=family,
                        variant=family,
                        layer=layer,
                        depth=(layer + 1) / n_layers,
                        quantity="share",
                        value=value + noise * rng.standard_normal(),
                        speaker=f"f{fold}s{s}",
                        n_utts=4,
                    )
                )
    return pd.DataFrame(rows)


def test_claim2_late_minus_early_share():
    diff = late_minus_early(causal_runs(0.9, 0.2))
    assert np.allclose(diff["value"], 0.7) and len(diff) == 9
    table = claims_table(
        significance(0.1, 0.05, 0.15, 0.01), causal_runs(0.9, 0.2, 0.05), None, SETTINGS
    )
    row = table[table["claim"].str.startswith("2")].iloc[0]
    assert row["estimate"] == pytest.approx(0.7, abs=0.05) and row["verdict"] == "supported"
    early = claims_table(
        significance(0.1, 0.05, 0.15, 0.01), causal_runs(0.2, 0.9, 0.05), None, SETTINGS
    )
    assert early[early["claim"].str.startswith("2")]["verdict"].iloc[0] == "contradicted"
    equal = claims_table(
        significance(0.1, 0.05, 0.15, 0.01), causal_runs(0.5, 0.5, 0.3), None, SETTINGS
    )
    assert equal[equal["claim"].str.startswith("2")]["verdict"].iloc[0] == "inconclusive"


def ab_runs(rho_a: float, rho_b: float, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(1, 6):
        for layer in range(4):
            for quantity, rho in (("a_out_centred_frac", rho_a), ("b_out_centred_frac", rho_b)):
                trained = 0.4 * rho * np.exp(noise * rng.standard_normal())
                for state, value in (("trained", trained), ("untrained", 0.4)):
                    rows.append(
                        dict(
                            model="m",
                            method="lora_r8",
                            seed=0,
                            fold=fold,
                            module=f"layers.{layer}.self_attn.v_proj",
                            layer=layer,
                            depth=(layer + 1) / 4,
                            quantity=quantity,
                            state=state,
                            value=value,
                        )
                    )
    return pd.DataFrame(rows)


def test_claim4_log_ratio_and_direction():
    per_run = rank_log_ratio(ab_runs(0.5, 1.0))
    assert np.allclose(per_run["value"], np.log(0.5)) and len(per_run) == 5
    sig = significance(0.1, 0.05, 0.15, 0.01)
    supported = claims_table(sig, None, ab_runs(0.5, 1.0, 0.05), SETTINGS)
    assert supported[supported["claim"].str.startswith("4")]["verdict"].iloc[0] == "supported"
    # identical codes: ratio 1 for both, log ratio 0 with no spread beyond the sesoi
    same = claims_table(sig, None, ab_runs(1.0, 1.0, 0.01), SETTINGS)
    assert same[same["claim"].str.startswith("4")]["verdict"].iloc[0] == "contradicted"
    noisy = claims_table(sig, None, ab_runs(1.0, 1.0, 1.0), SETTINGS)  # no effect, wide noise
    assert noisy[noisy["claim"].str.startswith("4")]["verdict"].iloc[0] == "inconclusive"


def test_t_interval_known_answer():
    lo, hi = t_interval(np.array([1.0, 2.0, 3.0]))
    # mean 2, s = 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3)
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert np.isnan(t_interval(np.array([1.0]))[0])


def lens_runs(early_gain: float, late_gain: float, noise: float = 0.0, seed: int = 0):
    """Per-speaker logit-lens rows of a 4-layer LoRA run on 3 folds x 2 speakers: the
    adapted encoder's accuracy advantage over the pre-trained one (same head) grows by
    ``early_gain`` over layers 0..2 and by ``late_gain`` over layers 2..4."""
    rng = np.random.default_rng(seed)
    advantage = {0: 0.0, 1: early_gain / 2, 2: early_gain, 3: early_gain + late_gain / 2}
    advantage[4] = early_gain + late_gain
    rows = []
    for fold in (1, 2, 3):
        for speaker in (f"s{fold}a", f"s{fold}b"):
            jitter = noise * rng.standard_normal()
            for layer, adv in advantage.items():
                base = 0.3 + 0.05 * layer
                scale = 1 + jitter if layer else 1  # layer 0: both encoders agree
                for variant, value in (("base", base), ("adapted", base + adv * scale)):
                    for lens in ("logit", "tuned"):
                        rows.append(
                            dict(
                                model="m",
                                method="lora_r8",
                                seed=0,
                                fold=fold,
                                lens=lens,
                                variant=variant,
                                layer=layer,
                                metric="war",
                                value=value if lens == "logit" else 0.9,
                                speaker=speaker,
                                n_utts=10,
                            )
                        )
    return pd.DataFrame(rows)


def test_claim2_from_the_logit_lens():
    from serlens.report.claims import lens_late_minus_early

    diff = lens_late_minus_early(lens_runs(0.1, 0.4))
    # gained late minus gained early: 0.4 − 0.1, for each of the 6 speakers
    assert len(diff) == 6 and np.allclose(diff["value"], 0.3)
    sig = significance(0.1, 0.05, 0.15, 0.01)
    late = claims_table(sig, None, None, SETTINGS, lens_runs=lens_runs(0.1, 0.4, 0.05))
    row = late[late["figure"] == "logit_lens"].iloc[0]
    assert row["claim"].startswith("2") and row["verdict"] == "supported"
    assert row["estimate"] == pytest.approx(0.3, abs=0.05) and row["n_runs"] == 3
    early = claims_table(sig, None, None, SETTINGS, lens_runs=lens_runs(0.4, 0.0, 0.05))
    assert early[early["figure"] == "logit_lens"]["verdict"].iloc[0] == "contradicted"
    # no adaptation at all: the advantage is 0 everywhere, so is the statistic
    flat = lens_late_minus_early(lens_runs(0.0, 0.0))
    assert np.allclose(flat["value"], 0.0)
    # frozen runs and rows without speakers give no lens row
    frozen = lens_runs(0.1, 0.4).assign(method="frozen")
    assert lens_late_minus_early(frozen).empty


def cka_runs(early_change: float, late_change: float, noise: float = 0.0, seed: int = 0):
    """Diagonal ``cka.tsv`` rows of three folds of a 4-layer LoRA run (layers 0..4): 1 − CKA
    grows linearly by ``early_change`` over layers 0..2 and ``late_change`` more over 2..4;
    plus an off-diagonal and a biased-kind row the statistic must ignore."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in (1, 2, 3):
        jitter = noise * rng.standard_normal()
        for layer in range(5):
            early = early_change * min(layer, 2) / 2
            late = (late_change + jitter) * max(layer - 2, 0) / 2
            common = {"model": "tiny", "method": "lora_r8", "seed": 0, "fold": fold}
            rows.append(
                {
                    **common,
                    "layer_frozen": layer,
                    "layer_lora": layer,
                    "kind": "debiased",
                    "value": 1.0 - early - late,
                }
            )
            rows.append(
                {
                    **common,
                    "layer_frozen": layer,
                    "layer_lora": layer,
                    "kind": "linear",
                    "value": 0.0,
                }
            )
            rows.append(
                {
                    **common,
                    "layer_frozen": (layer + 1) % 5,
                    "layer_lora": layer,
                    "kind": "debiased",
                    "value": -5.0,
                }
            )
    return pd.DataFrame(rows)


def test_claim2_from_the_representations():
    from serlens.report.claims import cka_late_minus_early

    per_run = cka_late_minus_early(cka_runs(0.1, 0.4))
    # change gained late minus gained early: 0.4 − 0.1, in each of the 3 folds
    assert len(per_run) == 3 and np.allclose(per_run["value"], 0.3)
    # half of the final change (0.25) is first reached at layer 3 of 4
    assert np.allclose(per_run["half_depth"], 0.75) and per_run["floor"].isna().all()
    sig = significance(0.1, 0.05, 0.15, 0.01)
    late = claims_table(sig, None, None, SETTINGS, cka_runs=cka_runs(0.1, 0.4, 0.02))
    row = late[late["figure"] == "cka"].iloc[0]
    assert row["claim"].startswith("2") and row["verdict"] == "supported"
    assert row["estimate"] == pytest.approx(0.3, abs=0.05) and row["n_runs"] == 3
    assert "no seed-to-seed floor" in row["compared_with"]
    early = claims_table(sig, None, None, SETTINGS, cka_runs=cka_runs(0.4, 0.0, 0.02))
    assert early[early["figure"] == "cka"]["verdict"].iloc[0] == "contradicted"
    # an unchanged encoder: CKA 1 at every layer, statistic 0, no half-change depth
    flat = cka_late_minus_early(cka_runs(0.0, 0.0))
    assert np.allclose(flat["value"], 0.0) and flat["half_depth"].isna().all()
    # frozen runs give no row
    assert cka_late_minus_early(cka_runs(0.1, 0.4).assign(method="frozen")).empty


def test_claim2_cka_against_the_seed_floor():
    """Reseeding that moves late layers as much as LoRA does leaves nothing to claim."""
    runs = cka_runs(0.1, 0.4, 0.02)
    floor = cka_runs(0.1, 0.4, 0.02, seed=1).rename(columns={"layer_lora": "layer"})
    floor = floor[(floor["kind"] == "debiased") & (floor["layer_frozen"] == floor["layer"])]
    floor = floor.assign(measure="cka_debiased", seed=1, reference_seed=0)
    from serlens.report.claims import cka_late_minus_early

    per_run = cka_late_minus_early(runs, floor)
    assert np.allclose(per_run["floor"], 0.3, atol=0.05)
    table = claims_table(
        significance(0.1, 0.05, 0.15, 0.01),
        None,
        None,
        SETTINGS,
        cka_runs=runs,
        floor_runs=floor,
    )
    row = table[table["figure"] == "cka"].iloc[0]
    assert abs(row["estimate"]) < 0.05 and row["verdict"] != "supported"
    assert "seed_floor.tsv" in row["compared_with"]
