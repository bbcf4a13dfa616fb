"""The paper's claims as tested hypotheses (``claims.tsv``): one row per claim, model and LoRA
method, with the statistic that tests it, its estimate and 95 % interval, what it is
compared with, and a verdict by a rule fixed before the data are seen.

The claims (Behind the Scenes, arXiv 2509.08454):

1. **LoRA beats the frozen encoder.** Statistic: ΔUAR = mean over runs of UAR(LoRA) −
   UAR(frozen head), against the last-layer and the weighted-sum frozen heads
   (``significance.tsv``: speaker-cluster bootstrap interval, exact sign-flip p, Holm over
   the model's pairs).
2. **Delayed specialisation** (early layers keep general features, late layers consolidate
   emotion). Statistic, causal: the share of the LoRA-vs-frozen gap carried by the adapters
   of the *last* half of the layers minus the share carried by those of the *first* half
   (``causal.tsv``: ``adapters_from`` at l = ⌈L/2⌉ minus ``adapters_upto`` at l = ⌈L/2⌉ − 1),
   per test speaker, its interval from resampling speakers within folds
   (:func:`serlens.stats.cluster_band`). Positive = the useful change sits late.
3. **Forward alignment, backward differentiation** of A and B: not tested here — it needs
   the paper's trained-vs-untrained CKA of the A codes and B outputs and the CKA of their
   gradients, which the workflow does not compute yet; the row says so.
4. **A compresses, B keeps reconstruction diversity.** Statistic: the mean over adapted
   layers of log(ρ_A) − log(ρ_B), ρ = centred, dimension-normalised 90 %-energy rank
   trained / untrained (``ab_dynamics.tsv``: ``a_out_centred_frac``, ``b_out_centred_frac``),
   one value per run; interval: Student t over runs (folds × seeds). Negative = A's codes
   lose more of their diversity under training than B's outputs do.

Verdicts (for an effect e whose hypothesised direction is positive, with interval
[lo, hi] and smallest effect size of interest δ, ``claims.sesoi_*`` in the config):
**supported** when lo > 0 (and, for claim 1, Holm p < 0.05); **contradicted** when hi < δ —
the interval excludes an effect as large as δ, not merely "not significant"; otherwise
**inconclusive**. Claim 4's direction is negative, so e = −(log ρ_A − log ρ_B).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [
    "claim",
    "model",
    "method",
    "statistic",
    "estimate",
    "ci_low",
    "ci_high",
    "compared_with",
    "sesoi",
    "verdict",
    "n_runs",
    "figure",
    "note",
]
CLAIMS = {
    1: "LoRA beats the frozen encoder",
    2: "delayed specialisation: the useful change sits in late layers",
    3: "forward alignment, backward differentiation of A and B",
    4: "A compresses, B keeps reconstruction diversity",
}


def verdict(lo: float, hi: float, sesoi: float, extra_ok: bool = True) -> str:
    """The module docstring's rule for an effect hypothesised positive."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if lo > 0 and extra_ok:
        return "supported"
    if hi < sesoi:
        return "contradicted"
    return "inconclusive"


def _row(
    claim, model, method, statistic, estimate, lo, hi, compared, sesoi, verdict_, n, figure, note=""
):
    return {
        "claim": f"{claim}: {CLAIMS[claim]}",
        "model": model,
        "method": method,
        "statistic": statistic,
        "estimate": estimate,
        "ci_low": lo,
        "ci_high": hi,
        "compared_with": compared,
        "sesoi": sesoi,
        "verdict": verdict_,
        "n_runs": n,
        "figure": figure,
        "note": note,
    }


def claim1_rows(significance: pd.DataFrame, sesoi: float) -> list[dict]:
    """ΔUAR of every LoRA method against each frozen head, from the significance table
    (rows in either orientation)."""
    rows = []
    for _, r in significance.iterrows():
        pairs = [(r["method"], r["baseline"], 1.0), (r["baseline"], r["method"], -1.0)]
        for lora, frozen, sign in pairs:
            if not str(lora).startswith("lora") or frozen not in ("frozen", "frozen_wsum"):
                continue
            est = sign * float(r["delta_uar"])
            lo, hi = sorted((sign * float(r["ci_low"]), sign * float(r["ci_high"])))
            p = float(r["p_holm"]) if pd.notna(r["p_holm"]) else np.nan
            rows.append(
                _row(
                    1,
                    r["model"],
                    lora,
                    f"ΔUAR {lora} − {frozen} (mean over runs)",
                    est,
                    lo,
                    hi,
                    f"0 (no difference); Holm-adjusted sign-flip p = {p:.3g}",
                    sesoi,
                    verdict(lo, hi, sesoi, extra_ok=bool(p < 0.05)),
                    int(r["n_folds"]) * int(r["n_seeds"]),
                    "performance",
                    str(r.get("note", "") or ""),
                )
            )
    return rows


def late_minus_early(causal_runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, seed, fold, speaker): share(adapters from ⌈L/2⌉ on) −
    share(adapters up to ⌈L/2⌉ − 1), with ``n_utts``."""
    share = causal_runs[causal_runs["quantity"] == "share"]
    out = []
    for (model, method), frame in share.groupby(["model", "method"], sort=False):
        layers = frame.loc[frame["layer"] >= 0, "layer"]
        if layers.empty:
            continue
        half = math.ceil((int(layers.max()) + 1) / 2)
        late = frame[(frame["family"] == "adapters_from") & (frame["layer"] == half)]
        early = frame[(frame["family"] == "adapters_upto") & (frame["layer"] == half - 1)]
        if late.empty or early.empty:
            raise ValueError(
                f"{model}/{method}: the causal tables lack the half split (adapters from layer "
                f"{half}, up to layer {half - 1}); rerun the run's pass (pass_run)"
            )
        keys = ["seed", "fold", "speaker"]
        merged = late.merge(early, on=keys, suffixes=("_late", "_early"))
        merged = merged.assign(
            model=model,
            method=method,
            value=merged["value_late"] - merged["value_early"],
            n_utts=merged["n_utts_late"],
        )
        out.append(merged[["model", "method", *keys, "value", "n_utts"]])
    if not out:
        return pd.DataFrame(
            columns=["model", "method", "seed", "fold", "speaker", "value", "n_utts"]
        )
    return pd.concat(out, ignore_index=True)


def claim2_rows(causal_runs: pd.DataFrame, sesoi: float, resamples: int, seed: int) -> list[dict]:
    from serlens import stats

    rows = []
    for (model, method), frame in late_minus_early(causal_runs).groupby(
        ["model", "method"], sort=False
    ):
        # the run's value is the n_utts-weighted mean over its speakers; the estimate the mean
        # over runs; the band resamples speakers within folds (seeds averaged per speaker)
        runs = frame.assign(w=frame["value"] * frame["n_utts"]).groupby(["seed", "fold"])
        per_run = runs["w"].sum() / runs["n_utts"].sum()
        estimate = float(per_run.mean())
        speaker = frame.groupby(["fold", "speaker"]).agg(
            value=("value", "mean"), n=("n_utts", "mean")
        )
        lo = hi = np.nan
        if speaker.index.get_level_values("speaker").nunique() >= 2:
            reps = np.maximum(np.rint(speaker["n"].to_numpy()).astype(int), 1)
            low, high = stats.cluster_band(
                np.repeat(speaker["value"].to_numpy(float), reps),
                np.repeat(speaker.index.get_level_values("speaker").astype(str), reps),
                np.repeat(speaker.index.get_level_values("fold").to_numpy(), reps),
                resamples=resamples,
                rng_seed=seed,
            )
            lo, hi = float(low[0]), float(high[0])
        rows.append(
            _row(
                2,
                model,
                method,
                "share of the gap carried by the last half's adapters − by the first half's",
                estimate,
                lo,
                hi,
                "0 (early and late adapters carry the same share); speaker band",
                sesoi,
                verdict(lo, hi, sesoi),
                int(len(per_run)),
                "causal",
            )
        )
    return rows


def claim3_rows(models: Sequence[str], methods: Sequence[str]) -> list[dict]:
    return [
        _row(
            3,
            model,
            method,
            "trained-vs-untrained CKA of A codes and B outputs; CKA of their gradients",
            np.nan,
            np.nan,
            np.nan,
            "",
            np.nan,
            "not tested",
            0,
            "ab_dynamics",
            "the claim-3 CKA quantities are not computed by this version of the workflow",
        )
        for model in models
        for method in methods
    ]


def rank_log_ratio(ab_runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: mean over layers of log ρ_A − log ρ_B (module docstring, claim 4)."""
    want = ab_runs[ab_runs["quantity"].isin(["a_out_centred_frac", "b_out_centred_frac"])]
    wide = want.pivot_table(
        index=["model", "method", "seed", "fold", "module", "quantity"],
        columns="state",
        values="value",
        aggfunc="mean",
    ).reset_index()
    wide["log_rho"] = np.log(wide["trained"] / wide["untrained"])
    per = wide.pivot_table(
        index=["model", "method", "seed", "fold", "module"], columns="quantity", values="log_rho"
    ).reset_index()
    per["value"] = per["a_out_centred_frac"] - per["b_out_centred_frac"]
    return per.groupby(["model", "method", "seed", "fold"], as_index=False)["value"].mean()


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """mean ± t_{n−1} · s / √n; NaN with fewer than two values."""
    from scipy import stats as st

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return np.nan, np.nan
    half = st.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def claim4_rows(ab_runs: pd.DataFrame, sesoi: float) -> list[dict]:
    rows = []
    for (model, method), frame in rank_log_ratio(ab_runs).groupby(["model", "method"], sort=False):
        values = frame["value"].to_numpy(float)
        lo, hi = t_interval(values)
        # the hypothesised direction is negative: test e = −(log ρ_A − log ρ_B)
        rows.append(
            _row(
                4,
                model,
                method,
                "mean over layers of log ρ_A − log ρ_B, ρ = centred energy-rank share trained / untrained",
                float(np.mean(values)),
                lo,
                hi,
                "0 (A and B lose the same share of diversity; hypothesised < 0); t interval over runs",
                sesoi,
                verdict(-hi, -lo, sesoi),
                int(len(values)),
                "ab_dynamics",
            )
        )
    return rows


def claims_table(
    significance: pd.DataFrame,
    causal_runs: pd.DataFrame | None,
    ab_runs: pd.DataFrame | None,
    settings: Mapping,
    resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Every claim's rows (module docstring); ``settings``: the config's ``claims``."""
    rows = claim1_rows(significance, settings["sesoi_uar"])
    if causal_runs is not None and len(causal_runs):
        rows += claim2_rows(causal_runs, settings["sesoi_share"], resamples, seed)
    lora = [
        m
        for m in significance.get("method", pd.Series(dtype=str)).unique()
        if str(m).startswith("lora")
    ]
    models = list(significance.get("model", pd.Series(dtype=str)).unique())
    rows += claim3_rows(models, lora)
    if ab_runs is not None and len(ab_runs):
        rows += claim4_rows(ab_runs, settings["sesoi_log_rank"])
    return pd.DataFrame(rows, columns=COLUMNS)


def write_claims(
    significance: Path,
    causal_files: Mapping[tuple, Path],
    ab_files: Mapping[tuple, Path],
    settings: Mapping,
    output: Path,
    resamples: int,
    seed: int,
) -> pd.DataFrame:
    from serlens.io import write_tsv_atomic
    from serlens.report.aggregate import read_runs

    table = claims_table(
        pd.read_csv(significance, sep="\t"),
        read_runs(causal_files) if causal_files else None,
        read_runs(ab_files) if ab_files else None,
        settings,
        resamples,
        seed,
    )
    write_tsv_atomic(table, Path(output))
    return table
