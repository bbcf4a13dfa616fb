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
   (:func:`serlens.stats.cluster_band`). Positive = the useful change sits late. A second,
   correlational row reads the logit lens (``logit_lens.tsv``, the honest lens's per-speaker
   accuracy; :func:`lens_late_minus_early`): with adv(l) the accuracy of the run's head on
   the adapted encoder's layer l minus on the pre-trained encoder's, the advantage gained in
   the last half of the layers minus that gained in the first, [adv(L) − adv(h)] −
   [adv(h) − adv(0)], h = ⌈L/2⌉; δ = ``claims.sesoi_uar``, the same speaker band. A third,
   also correlational, reads the representations (``cka.tsv``, debiased linear CKA of frozen
   layer l against adapted layer l; :func:`cka_late_minus_early`): with D(l) = 1 − CKA(l),
   [D(L) − D(h)] − [D(h) − D(0)], one value per run, Student t interval over runs, δ =
   ``claims.sesoi_cka``; with two or more seeds minus the same statistic between two seeds
   of the method on the fold (``seed_floor.tsv``), with one seed against 0 (the row says so).
3. **Forward alignment, backward differentiation** of A and B (``ab_dynamics.tsv``,
   :mod:`serlens.analysis.ab_cka`: debiased linear CKA over ≥ 2000 audio frames sampled by
   utterance, per adapted module). Two rows, each one value per run (mean over the adapted
   modules), interval: Student t over runs (folds × seeds):

   - *forward*: e = mean over layers of ½[(CKA(a_T, a_U) − CKA(a_U, a_U')) +
     (CKA(b_T, b_U) − CKA(b_U, b_U'))], the trained-vs-untrained CKA of the A codes and
     B outputs minus the same CKA between two independent untrained draws U, U'. Positive =
     training leaves the forward codes more aligned with the untrained ones than two random
     adapters are with each other; a high CKA equal to its null is no evidence of
     alignment (two random projections of the same inputs already share their structure).
   - *backward*: e = mean over layers of ½[CKA(a_T, a_U) + CKA(b_T, b_U)] − CKA(∂L/∂b,
     ∂L/∂a) of the trained model. Positive = the gradients of B and A are less alike than
     the forward codes are across training (the untrained model's CKA(∂L/∂b, ∂L/∂a) is the
     reference in the note). Layer dependence is in the figure, not tested here.

   Two more rows test the same two statistics with **the paper's own estimator**
   (:func:`serlens.analysis.ab_cka.paper_cka`, fold-1 runs only, as the paper's code runs
   it): ≤ 40 training utterances of fold 1 (10 per class), each utterance's A code, B
   output or gradient flattened to one vector of ``frames · dims`` values, biased linear CKA
   of the A codes, RBF CKA (γ = 1 / n_features, scikit-learn's default) of the B outputs
   and of ∂L/∂b vs ∂L/∂a, the paper's untrained baseline (A, B ~ N(0, 0.02²), fresh head)
   and, as its null, a second draw of that baseline under the same estimator:

   - *forward, paper's estimator*: e = mean over layers of ½[(CKA_lin(a_T, a_U) −
     CKA_lin(a_U, a_U')) + (CKA_rbf(b_T, b_U) − CKA_rbf(b_U, b_U'))];
   - *backward, paper's estimator*: e = mean over layers of ½[CKA_lin(a_T, a_U) +
     CKA_rbf(b_T, b_U)] − CKA_rbf(∂L/∂b, ∂L/∂a) of the trained model.

   There is one sample of one fold, so no interval over folds: the interval is a
   jackknife over the sample's training speakers (each speaker's utterances left out in
   turn: utterances of one speaker are not independent; a bootstrap is biased for kernels,
   whose repeated utterances bring self-similarities off the diagonal), over the utterances
   for a run without speakers: per layer the pass stores the jackknife standard error, with
   the same speaker (utterance) left out of every kernel; the interval is the estimate ±
   t_{G−1} (t_{n−1}) times those standard errors averaged over the layers
   and, with several seeds of fold 1 (the same utterances), over those runs. The mean of
   the per-layer standard errors is at least the layer mean's own jackknife standard error
   (Minkowski's inequality over the leave-one-out deviations), so the interval is
   conservative. The verdict rule is the one below, with the same δ. The paper itself reads
   the raw forward CKA (high = alignment) without a null; that value, its null and the
   gradient CKA in the paper's float32 arithmetic (where its RBF kernels round to 1) are in
   the rows' note. A model and method with sound rows but no fold-1 rows of the paper's
   estimator gets a "not tested" row for it.
4. **A compresses, B keeps reconstruction diversity.** Statistic: the mean over adapted
   layers of log(ρ_A) − log(ρ_B), ρ = centred, dimension-normalised 90 %-energy rank
   trained / untrained (``ab_dynamics.tsv``: ``a_out_centred_frac``, ``b_out_centred_frac``),
   one value per run; interval: Student t over runs (folds × seeds). Negative = A's codes
   lose more of their diversity under training than B's outputs do.

Verdicts (for an effect e whose hypothesised direction is positive, with interval
[lo, hi] and smallest effect size of interest δ, ``claims.sesoi_*`` in the config):
**supported** when lo > 0 (and, for claim 1, Holm p < 0.05); **contradicted** when hi < δ —
the interval excludes an effect as large as δ, not merely "not significant"; otherwise
**inconclusive**. Claim 3 uses δ = ``claims.sesoi_cka`` (CKA units). Claim 4's direction is negative, so e = −(log ρ_A − log ρ_B).
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


def _is_lora(name: str) -> bool:
    """A LoRA method of the grid (short form or declared; not DoRA or full fine-tuning)."""
    from serlens.errors import ConfigError
    from serlens.methods import parse_method

    try:
        return parse_method(name).kind == "lora"
    except ConfigError:
        return False


def claim1_rows(significance: pd.DataFrame, sesoi: float) -> list[dict]:
    """ΔUAR of every LoRA method against each frozen head, from the significance table
    (rows in either orientation)."""
    rows = []
    for _, r in significance.iterrows():
        pairs = [(r["method"], r["baseline"], 1.0), (r["baseline"], r["method"], -1.0)]
        for lora, frozen, sign in pairs:
            if not _is_lora(str(lora)) or frozen not in ("frozen", "frozen_wsum"):
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


def speaker_estimate(
    frame: pd.DataFrame, resamples: int, seed: int
) -> tuple[float, float, float, int]:
    """(estimate, band low, band high, runs) of per-speaker values (columns ``seed, fold,
    speaker, value, n_utts``): a run's value is the ``n_utts``-weighted mean over its
    speakers, the estimate the mean over runs; the band resamples speakers within folds
    (seeds averaged per speaker; :func:`serlens.stats.cluster_band`), NaN with one speaker."""
    from serlens import stats

    runs = frame.assign(w=frame["value"] * frame["n_utts"]).groupby(["seed", "fold"])
    per_run = runs["w"].sum() / runs["n_utts"].sum()
    speaker = frame.groupby(["fold", "speaker"]).agg(value=("value", "mean"), n=("n_utts", "mean"))
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
    return float(per_run.mean()), lo, hi, int(len(per_run))


def claim2_rows(causal_runs: pd.DataFrame, sesoi: float, resamples: int, seed: int) -> list[dict]:
    rows = []
    for (model, method), frame in late_minus_early(causal_runs).groupby(
        ["model", "method"], sort=False
    ):
        estimate, lo, hi, n = speaker_estimate(frame, resamples, seed)
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
                n,
                "causal",
            )
        )
    return rows


def lens_late_minus_early(lens_runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, seed, fold, speaker) of the LoRA runs: the logit lens's accuracy
    advantage of the adapted encoder over the pre-trained one read out with the same (the
    run's) head, ``adv(l) = acc_adapted(l) − acc_base(l)`` (honest lens, ``metric`` war, the
    per-speaker rows), gained in the last half of the layers minus gained in the first:
    ``[adv(L) − adv(h)] − [adv(h) − adv(0)]``, h = ⌈L/2⌉ (lens layer l = the output of
    block l, 0 = the embeddings, where both encoders agree). With ``n_utts``."""
    keys = ["seed", "fold", "speaker"]
    columns = ["model", "method", *keys, "value", "n_utts"]
    if lens_runs is None or lens_runs.empty or "speaker" not in lens_runs:
        return pd.DataFrame(columns=columns)
    sel = lens_runs[
        (lens_runs["lens"] == "logit")
        & (lens_runs["metric"] == "war")
        & lens_runs["speaker"].notna()
        & lens_runs["method"].map(_is_lora)
    ]
    out = []
    for (model, method), frame in sel.groupby(["model", "method"], sort=False):
        last = int(frame["layer"].max())
        half = math.ceil(last / 2)

        value_at = frame.set_index(["layer", "variant", *keys])["value"].sort_index()
        adv = {
            layer: value_at.loc[(layer, "adapted")] - value_at.loc[(layer, "base")]
            for layer in (0, half, last)
        }
        value = (adv[last] - adv[half]) - (adv[half] - adv[0])
        n_utts = frame[(frame["layer"] == last) & (frame["variant"] == "adapted")]
        value = value.dropna()
        if value.empty:
            continue
        merged = value.rename("value").reset_index()
        merged = merged.merge(n_utts[[*keys, "n_utts"]], on=keys)
        out.append(merged.assign(model=model, method=method)[columns])
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=columns)


def claim2_lens_rows(
    lens_runs: pd.DataFrame, sesoi: float, resamples: int, seed: int
) -> list[dict]:
    """Claim 2 from the logit lens (:func:`lens_late_minus_early`), in accuracy units, with
    δ = ``claims.sesoi_uar``; its speaker band as in the causal row."""
    rows = []
    for (model, method), frame in lens_late_minus_early(lens_runs).groupby(
        ["model", "method"], sort=False
    ):
        estimate, lo, hi, n = speaker_estimate(frame, resamples, seed)
        rows.append(
            _row(
                2,
                model,
                method,
                "logit lens: accuracy the adapted encoder gains over the pre-trained one (same "
                "head) in the last half of the layers − in the first half",
                estimate,
                lo,
                hi,
                "0 (the lens advantage grows as much early as late); speaker band",
                sesoi,
                verdict(lo, hi, sesoi),
                n,
                "logit_lens",
                "correlational: what the head can read at each depth, not what it uses "
                "(the causal row tests that)",
            )
        )
    return rows


def _cka_profile_statistic(frame: pd.DataFrame) -> tuple[float, float]:
    """(late − early change, half-change depth) of one run's layer-by-layer CKA ``frame``
    (columns ``layer, value``, layers 0..L): with D(l) = 1 − CKA(l) and h = ⌈L/2⌉,
    ``[D(L) − D(h)] − [D(h) − D(0)]``, and the smallest l / L with D(l) ≥ D(L) / 2 (NaN
    when D(L) ≤ 0: nothing changed)."""
    profile = frame.groupby("layer")["value"].mean().sort_index()
    last = int(profile.index.max())
    half = math.ceil(last / 2)
    if not {0, half, last} <= set(int(i) for i in profile.index):
        return np.nan, np.nan
    change = 1.0 - profile
    value = (change[last] - change[half]) - (change[half] - change[0])
    depth = np.nan
    if change[last] > 0:
        reached = change.index[change.to_numpy() >= change[last] / 2]
        depth = int(reached.min()) / last
    return float(value), float(depth)


def cka_late_minus_early(
    cka_runs: pd.DataFrame | None,
    floor_runs: pd.DataFrame | None = None,
    kind: str = "debiased",
) -> pd.DataFrame:
    """Per LoRA run (``model, method, seed, fold``): how much more the adapted encoder's
    layers move away from the pre-trained encoder's late than early, from the diagonal of
    ``cka.tsv`` (``kind`` CKA of frozen layer l against adapted layer l, the fold's test
    utterances). With D(l) = 1 − CKA(l), h = ⌈L/2⌉ (layer 0 = the conv stem, where both
    encoders agree; L = the final LayerNorm):

        value = [D(L) − D(h)] − [D(h) − D(0)]

    and ``half_depth``, the relative depth where D first reaches half of D(L). With the
    seed-to-seed floor (``seed_floor.tsv``, two or more seeds), ``floor`` is the same
    statistic of 1 − CKA between two seeds of the method on the same fold (mean over the
    seed pairs of the fold): what reseeding alone changes, layer profile included; NaN
    without it."""
    columns = ["model", "method", "seed", "fold", "value", "half_depth", "floor"]
    if cka_runs is None or cka_runs.empty:
        return pd.DataFrame(columns=columns)
    diag = cka_runs[
        (cka_runs["kind"] == kind)
        & (cka_runs["layer_frozen"] == cka_runs["layer_lora"])
        & cka_runs["method"].map(_is_lora)
    ].rename(columns={"layer_lora": "layer"})
    floors: dict[tuple, float] = {}
    if floor_runs is not None and len(floor_runs):
        sel = floor_runs[floor_runs["measure"] == f"cka_{kind}"]
        per_pair = pd.Series(
            {
                key: _cka_profile_statistic(frame)[0]
                for key, frame in sel.groupby(["model", "method", "fold", "seed"], sort=False)
            }
        )
        floors = per_pair.groupby(level=[0, 1, 2]).mean().to_dict()
    rows = []
    for (model, method, seed, fold), frame in diag.groupby(
        ["model", "method", "seed", "fold"], sort=False
    ):
        value, depth = _cka_profile_statistic(frame)
        floor = floors.get((model, method, fold), np.nan)
        rows.append([model, method, seed, fold, value, depth, floor])
    return pd.DataFrame(rows, columns=columns)


def claim2_cka_rows(
    cka_runs: pd.DataFrame | None, floor_runs: pd.DataFrame | None, sesoi: float
) -> list[dict]:
    """Claim 2 from the representations (:func:`cka_late_minus_early`, debiased linear CKA),
    in CKA units with δ = ``claims.sesoi_cka``; one value per run, Student t interval over
    runs (folds × seeds). With two or more seeds the tested effect is the run's value minus
    its fold's seed-to-seed floor (the change late-minus-early beyond what reseeding makes);
    with one seed there is no floor and the value is tested against 0, which the row says."""
    rows = []
    for (model, method), frame in cka_late_minus_early(cka_runs, floor_runs).groupby(
        ["model", "method"], sort=False
    ):
        floored = frame["floor"].notna().all()
        values = (frame["value"] - frame["floor"] if floored else frame["value"]).to_numpy(float)
        lo, hi = t_interval(values)
        if floored:
            compared = (
                "the same statistic between two training seeds (seed_floor.tsv; floor "
                f"{frame['floor'].mean():+.3f}); t interval over runs"
            )
        else:
            compared = (
                "0 (the encoder changes as much early as late); one training seed, so no "
                "seed-to-seed floor (config key seeds): t interval over runs (folds)"
            )
        depth = frame["half_depth"].mean()
        rows.append(
            _row(
                2,
                model,
                method,
                "CKA: change 1 − CKA(frozen, adapted) gained in the last half of the layers − "
                "in the first half (debiased linear CKA, test utterances)"
                + (" − the seed-to-seed floor" if floored else ""),
                float(np.mean(values)),
                lo,
                hi,
                compared,
                sesoi,
                verdict(lo, hi, sesoi),
                int(len(values)),
                "cka",
                f"half of the last layer's change is reached at relative depth {depth:.2f} "
                "(mean over runs); correlational, as the logit-lens row",
            )
        )
    return rows


#: The claim-3 quantities of ``ab_dynamics.tsv`` (:mod:`serlens.analysis.ab_cka`).
CLAIM3_QUANTITIES = ("cka_fwd_a", "cka_fwd_b", "cka_fwd_a_null", "cka_fwd_b_null", "cka_bwd_ba")
PAPER_VARIANT = "the paper's own estimator: the rows marked 'paper's estimator' (fold 1)"
#: (quantity, state) of the paper's estimator in ``ab_dynamics.tsv`` -> column of
#: :func:`paper_forward_backward_cka` (:data:`serlens.analysis.ab_dynamics.PAPER_SCALARS`).
PAPER_COLUMNS = {
    ("paper_cka_fwd_a", "trained"): "fwd_a",
    ("paper_cka_fwd_b", "trained"): "fwd_b",
    ("paper_cka_fwd_a_null", "untrained"): "null_a",
    ("paper_cka_fwd_b_null", "untrained"): "null_b",
    ("paper_cka_bwd_ba", "trained"): "bwd",
    ("paper_cka_bwd_ba", "untrained"): "bwd_untrained",
    ("paper_cka_fwd_b_f32", "trained"): "fwd_b_f32",
    ("paper_cka_fwd_b_null_f32", "untrained"): "null_b_f32",
    ("paper_cka_bwd_ba_f32", "trained"): "bwd_f32",
    ("paper_cka_bwd_ba_f32", "untrained"): "bwd_untrained_f32",
    ("paper_cka_bwd_exponent", "trained"): "exponent",
    ("paper_cka_excess_se", "trained"): "excess_se",
    ("paper_cka_fwd_minus_bwd_se", "trained"): "fwd_minus_bwd_se",
    ("paper_cka_n_utterances", "trained"): "n_utts",
    ("paper_cka_n_frames", "trained"): "n_frames",
    ("paper_cka_sketch_buckets", "trained"): "sketch",
    ("paper_cka_pad30", "trained"): "pad30",
    ("paper_cka_excess_speaker_se", "trained"): "excess_speaker_se",
    ("paper_cka_fwd_minus_bwd_speaker_se", "trained"): "fwd_minus_bwd_speaker_se",
    ("paper_cka_n_speakers", "trained"): "n_speakers",
}


def forward_backward_cka(ab_runs: pd.DataFrame) -> pd.DataFrame:
    """Per run (model, method, seed, fold), means over modules (module docstring, claim 3):
    ``fwd_a``, ``fwd_b`` (trained vs untrained), ``null_a``, ``null_b`` (untrained vs
    untrained), ``bwd`` (trained ∂L/∂b vs ∂L/∂a), ``bwd_untrained``, ``excess`` =
    ½[(fwd_a − null_a) + (fwd_b − null_b)] and ``fwd_minus_bwd`` = ½(fwd_a + fwd_b) − bwd,
    both taken per module first. Empty when the table has no claim-3 rows."""
    keys = ["model", "method", "seed", "fold"]
    columns = [*keys, "fwd_a", "fwd_b", "null_a", "null_b", "bwd", "bwd_untrained"]
    # (quantity, state) -> column: forward CKA under trained, its null under untrained,
    # the gradients' CKA under both
    where = {
        ("cka_fwd_a", "trained"): "fwd_a",
        ("cka_fwd_b", "trained"): "fwd_b",
        ("cka_fwd_a_null", "untrained"): "null_a",
        ("cka_fwd_b_null", "untrained"): "null_b",
        ("cka_bwd_ba", "trained"): "bwd",
        ("cka_bwd_ba", "untrained"): "bwd_untrained",
    }
    column = [where.get(k) for k in zip(ab_runs["quantity"], ab_runs["state"], strict=True)]
    want = ab_runs.assign(column=column)
    want = want[want["column"].notna()]
    if want.empty:
        return pd.DataFrame(columns=[*columns, "excess", "fwd_minus_bwd"])
    per = want.pivot_table(
        index=[*keys, "module"], columns="column", values="value", aggfunc="mean"
    )
    for c in columns[len(keys) :]:
        if c not in per:
            per[c] = np.nan
    per["excess"] = ((per["fwd_a"] - per["null_a"]) + (per["fwd_b"] - per["null_b"])) / 2
    per["fwd_minus_bwd"] = (per["fwd_a"] + per["fwd_b"]) / 2 - per["bwd"]
    return (
        per.groupby(keys)[columns[len(keys) :] + ["excess", "fwd_minus_bwd"]].mean().reset_index()
    )


def _not_tested(model, method, paper: bool = False) -> dict:
    if paper:
        statistic = (
            "paper's estimator: trained-vs-untrained CKA of A codes and B outputs; "
            "CKA of their gradients"
        )
        note = (
            "no rows of the paper's estimator in ab_dynamics.tsv for this model and method: "
            "it runs in fold-1 passes only (a fold-1 run and its pass are needed)"
        )
    else:
        statistic = "trained-vs-untrained CKA of A codes and B outputs; CKA of their gradients"
        note = "no claim-3 CKA rows in ab_dynamics.tsv for this model and method (rerun the pass)"
    return _row(
        3, model, method, statistic, np.nan, np.nan, np.nan, "", np.nan, "not tested", 0,
        "ab_cka", note,
    )  # fmt: skip


def paper_forward_backward_cka(ab_runs: pd.DataFrame) -> pd.DataFrame:
    """Per run (model, method, seed, fold) with rows of the paper's estimator, means over
    modules of :data:`PAPER_COLUMNS` and, per module first, ``excess`` =
    ½[(fwd_a − null_a) + (fwd_b − null_b)], ``fwd_minus_bwd`` = ½(fwd_a + fwd_b) − bwd and
    ``fwd_minus_bwd_f32`` (the same with the float32 RBF values); ``*_se``: the layer means
    of the per-layer jackknife standard errors. Empty without such rows."""
    keys = ["model", "method", "seed", "fold"]
    columns = list(dict.fromkeys(PAPER_COLUMNS.values()))
    derived = ["excess", "fwd_minus_bwd", "fwd_minus_bwd_f32"]
    column = [PAPER_COLUMNS.get(k) for k in zip(ab_runs["quantity"], ab_runs["state"], strict=True)]
    want = ab_runs.assign(column=column)
    want = want[want["column"].notna()]
    if want.empty:
        return pd.DataFrame(columns=[*keys, *columns, *derived])
    per = want.pivot_table(
        index=[*keys, "module"], columns="column", values="value", aggfunc="mean"
    )
    for c in columns:
        if c not in per:
            per[c] = np.nan
    per["excess"] = ((per["fwd_a"] - per["null_a"]) + (per["fwd_b"] - per["null_b"])) / 2
    per["fwd_minus_bwd"] = (per["fwd_a"] + per["fwd_b"]) / 2 - per["bwd"]
    per["fwd_minus_bwd_f32"] = (per["fwd_a"] + per["fwd_b_f32"]) / 2 - per["bwd_f32"]
    return per.groupby(keys)[[*columns, *derived]].mean().reset_index()


def jackknife_interval(
    estimate: float, se: np.ndarray, n_utterances: float, level: float = 0.95
) -> tuple[float, float]:
    """``estimate ± t_{n−1} · mean(se)`` over the runs' layer-mean jackknife standard errors
    ``se`` (``n`` utterances); NaN when no standard error is finite or ``n < 3``."""
    from scipy import stats as st

    se = np.asarray(se, dtype=float)
    if not np.isfinite(estimate) or not np.isfinite(se).any() or not n_utterances >= 3:
        return np.nan, np.nan
    half = float(st.t.ppf(0.5 + level / 2, int(round(n_utterances)) - 1)) * float(np.nanmean(se))
    return estimate - half, estimate + half


def claim3_paper_rows(frame: pd.DataFrame, model, method, sesoi: float) -> list[dict]:
    """The two rows of the paper's estimator of one model and method (module docstring),
    from its runs' :func:`paper_forward_backward_cka`."""
    n = int(frame["excess"].notna().sum())
    m = {c: float(frame[c].mean()) for c in frame.columns[4:]}
    padding = (
        ", each padded to 30 s and every frame flattened, padding included (the paper's input)"
        if m["pad30"] == 1
        else ", each its own frames zero-padded to the longest (analysis.paper_estimator_input: "
        "pad30 gives the paper's 30-s padding)"
        if m["pad30"] == 0
        else ""
    )
    sample = (
        f"{m['n_utts']:.0f} training utterances of fold 1 × {m['n_frames']:.0f} frames"
        + padding
        + (
            f" (∂L/∂b Grams from a {m['sketch']:.0f}-bucket CountSketch)"
            if m["sketch"] > 0
            else " (exact Grams)"
        )
    )

    def speaker_se(column: str) -> bool:
        return bool(np.isfinite(frame[f"{column}_speaker_se"].to_numpy(float)).any())

    def interval(column: str) -> str:
        return (
            f"jackknife over the sample's {m['n_speakers']:.0f} training speakers (each "
            "speaker's utterances left out in turn; estimate ± t_{G−1} × the per-layer "
            "standard errors averaged over layers and runs: conservative)"
            if speaker_se(column)
            else "jackknife over the utterances (estimate ± t_{n−1} × the per-layer standard "
            "errors averaged over layers and runs: conservative; no speaker standard error)"
        ) + "; one sample of one fold, no interval over folds"

    forward_note = (
        f"as the paper reads it, CKA(trained, untrained): A (linear) {m['fwd_a']:.3f}, "
        f"B (RBF) {m['fwd_b']:.3f} (high = alignment, no null); two untrained draws under "
        f"the same estimator: A {m['null_a']:.3f}, B {m['null_b']:.3f}; {sample}"
    )
    backward_note = (
        f"RBF CKA(∂L/∂b, ∂L/∂a): trained {m['bwd']:.3f}, untrained {m['bwd_untrained']:.3f}; "
        f"in the paper's float32 arithmetic: trained {m['bwd_f32']:.3f}, untrained "
        f"{m['bwd_untrained_f32']:.3f}, statistic {m['fwd_minus_bwd_f32']:.3f} (median "
        f"γ‖x − y‖² of ∂L/∂b {m['exponent']:.2g}; below about 6e-8 the float32 kernel is all "
        f"ones); {sample}"
    )
    rows = []
    for statistic, column, compared, note in (
        (
            "paper's estimator: mean over layers of CKA(trained, untrained) − CKA(untrained, "
            "untrained'), linear CKA of A codes and RBF CKA of B outputs averaged (flattened "
            "utterances, paper baseline N(0, 0.02²))",
            "excess",
            f"0 (trained as aligned with untrained as two untrained draws); {interval('excess')}",
            forward_note,
        ),
        (
            "paper's estimator: mean over layers of forward CKA(trained, untrained) − "
            "RBF CKA(∂L/∂b, ∂L/∂a) trained",
            "fwd_minus_bwd",
            f"0 (gradients as alike as the forward codes); {interval('fwd_minus_bwd')}",
            backward_note,
        ),
    ):
        values = frame[column].to_numpy(float)
        estimate = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
        if speaker_se(column):
            se, n_units = frame[f"{column}_speaker_se"].to_numpy(float), m["n_speakers"]
        else:
            se, n_units = frame[f"{column}_se"].to_numpy(float), m["n_utts"]
        lo, hi = jackknife_interval(estimate, se, n_units)
        rows.append(
            _row(
                3,
                model,
                method,
                statistic,
                estimate,
                lo,
                hi,
                compared,
                sesoi,
                verdict(lo, hi, sesoi),
                n,
                "ab_cka",
                note,
            )
        )
    return rows


def claim3_rows(
    ab_runs: pd.DataFrame | None,
    models: Sequence[str],
    methods: Sequence[str],
    sesoi: float,
) -> list[dict]:
    """Claim 3's forward and backward rows per (model, method) with CKA rows in ``ab_runs``,
    each followed by the two rows of the paper's estimator (:func:`claim3_paper_rows`; a
    "not tested" row where its fold-1 rows are absent); every other pair of ``models`` ×
    ``methods`` gets one "not tested" row."""
    has_rows = ab_runs is not None and len(ab_runs)
    per_run = forward_backward_cka(ab_runs) if has_rows else None
    paper = paper_forward_backward_cka(ab_runs) if has_rows else None
    paper_groups = (
        {} if paper is None else dict(list(paper.groupby(["model", "method"], sort=False)))
    )
    rows, seen = [], set()
    groups = [] if per_run is None else per_run.groupby(["model", "method"], sort=False)
    for (model, method), frame in groups:
        seen.add((model, method))
        n = int(frame["excess"].notna().sum())
        mean = {c: float(frame[c].mean()) for c in frame.columns[4:]}
        detail = (
            f"A: {mean['fwd_a']:.3f} vs null {mean['null_a']:.3f}; "
            f"B: {mean['fwd_b']:.3f} vs null {mean['null_b']:.3f}"
        )
        for statistic, column, compared, note in (
            (
                "mean over layers of CKA(trained, untrained) − CKA(untrained, untrained'), "
                "A codes and B outputs averaged (debiased linear CKA)",
                "excess",
                "0 (trained as aligned with untrained as two untrained draws); t interval over runs",
                detail,
            ),
            (
                "mean over layers of forward CKA(trained, untrained) − CKA(∂L/∂b, ∂L/∂a) trained",
                "fwd_minus_bwd",
                "0 (gradients as alike as the forward codes); t interval over runs",
                f"{detail}; CKA(∂L/∂b, ∂L/∂a): trained {mean['bwd']:.3f}, "
                f"untrained {mean['bwd_untrained']:.3f}",
            ),
        ):
            values = frame[column].to_numpy(float)
            lo, hi = t_interval(values)
            rows.append(
                _row(
                    3,
                    model,
                    method,
                    statistic,
                    float(np.nanmean(values)) if np.isfinite(values).any() else np.nan,
                    lo,
                    hi,
                    compared,
                    sesoi,
                    verdict(lo, hi, sesoi),
                    n,
                    "ab_cka",
                    f"{note}; {PAPER_VARIANT}",
                )
            )
        if (model, method) in paper_groups:
            rows += claim3_paper_rows(paper_groups[(model, method)], model, method, sesoi)
        else:
            rows.append(_not_tested(model, method, paper=True))
    for (model, method), frame in paper_groups.items():  # the paper's rows without sound ones
        if (model, method) not in seen:
            seen.add((model, method))
            rows.append(_not_tested(model, method))
            rows += claim3_paper_rows(frame, model, method, sesoi)
    rows += [
        _not_tested(model, method)
        for model in models
        for method in methods
        if (model, method) not in seen
    ]
    return rows


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
    lens_runs: pd.DataFrame | None = None,
    cka_runs: pd.DataFrame | None = None,
    floor_runs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every claim's rows (module docstring); ``settings``: the config's ``claims``."""
    rows = claim1_rows(significance, settings["sesoi_uar"])
    if causal_runs is not None and len(causal_runs):
        rows += claim2_rows(causal_runs, settings["sesoi_share"], resamples, seed)
    if lens_runs is not None and len(lens_runs):
        rows += claim2_lens_rows(lens_runs, settings["sesoi_uar"], resamples, seed)
    if cka_runs is not None and len(cka_runs):
        rows += claim2_cka_rows(cka_runs, floor_runs, settings["sesoi_cka"])
    lora = [
        m
        for m in significance.get("method", pd.Series(dtype=str)).unique()
        if str(m).startswith("lora")
    ]
    models = list(significance.get("model", pd.Series(dtype=str)).unique())
    rows += claim3_rows(ab_runs, models, lora, settings["sesoi_cka"])
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
    lens_files: Mapping[tuple, Path] | None = None,
    cka_files: Mapping[tuple, Path] | None = None,
    floor_files: Mapping[tuple, Path] | None = None,
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
        read_runs(lens_files) if lens_files else None,
        read_runs(cka_files) if cka_files else None,
        read_runs(floor_files) if floor_files else None,
    )
    write_tsv_atomic(table, Path(output))
    return table
