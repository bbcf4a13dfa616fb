"""Activations and gradients of LoRA's (and DoRA's) A and B ("forward alignment, backward differentiation").

For an adapted linear module with frozen weight ``W`` (``d_out x d_in``), input frame ``x``
and PEFT's adapter ``A`` (``r x d_in``, ``lora_A``), ``B`` (``d_out x r``, ``lora_B``),
scale ``s = alpha / r`` (Hu et al. 2021, "LoRA", §4.1)::

    a = A x          (the r-dimensional code: output of lora_A)
    b = B a          (output of lora_B)
    y = W x + s b    (the module's output)

With ``g_y = ∂L/∂y`` per frame, ``g_b = ∂L/∂b = s g_y`` and ``g_a = ∂L/∂a = Bᵀ g_b``. Summing
over frames, the gradient of the full weight is ``G = ∂L/∂W = Σ g_y xᵀ`` and the chain rule
gives the factor gradients (:func:`lora_factor_gradients`)::

    ∂L/∂A = s Bᵀ G        ∂L/∂B = s G Aᵀ

A gradient step of size η on A alone changes ``ΔW = s B A`` by ``-η s B ∂L/∂A = -η s² B Bᵀ G``;
on B alone by ``-η s ∂L/∂B A = -η s² G Aᵀ A`` (to first order; :func:`delta_w_from_factor_steps`).
(ΔW is linear in each factor, so this is exact for a step on one factor.) Their norms and
the cosine between them (:func:`delta_w_comparison`) compare what A and B contribute to the
update, for the "forward alignment, backward differentiation" finding of the paper behind
this project ("Behind the Scenes: mechanistic interpretability of LoRA-adapted Whisper for
speech emotion recognition"). Both are computed from the accumulated ``∂L/∂A`` and ``∂L/∂B``
(``r x d_in`` and ``d_out x r``), so ``G`` (``d_out x d_in``) is never accumulated.

Energy ranks
------------
The number of directions of a ``frames x dims`` matrix ``M`` is its energy rank
(:func:`serlens.analysis.spectra.energy_rank`: the fewest singular directions holding
``energy_fraction`` of ``‖M‖²_F``). Two versions are reported:

* uncentred, on the singular values of ``M`` itself: the square roots of the eigenvalues of
  the ``dims x dims`` Gram ``G = MᵀM = Σ_batches M_bᵀ M_b``;
* centred, on those of ``M - 1 μᵀ`` (``μ`` the mean frame): the eigenvalues of
  ``G_c = G - n μ μᵀ = G - s sᵀ / n`` with ``s = Σ_t x_t`` (``= (n - 1) x`` the sample
  covariance). A shared offset of every frame is one direction holding most of the
  uncentred energy (offset + isotropic noise has uncentred rank 1 and a centred rank near
  ``energy_fraction · dims``), so only the centred rank counts directions of *variation*.

:class:`GramAccumulator` keeps ``G``, ``s`` and ``n`` (float64), so memory does not grow with
the number of frames. The B output ``b = a Bᵀ`` needs no accumulator of its own: its Gram is
``B G_a Bᵀ`` and its centred Gram ``B G_{a,c} Bᵀ`` (B is fixed during the pass; its mean is
``B μ_a``), whose non-zero eigenvalues are those of an ``r x r`` matrix
(:func:`product_singular_values`).

Counts live in spaces of different size: the A code and ``∂L/∂a`` are r-dimensional, ``b``
is d_out-dimensional but has rank at most r (it is ``B a``), ``∂L/∂b`` is d_out-dimensional
with no such bound. Each count is therefore also reported as a share of the largest rank
its matrix can have, ``max_rank = min(n_frames, len(σ))`` uncentred and
``min(n_frames - 1, len(σ))`` centred, with ``len(σ) = r`` for ``a``, ``b`` and ``∂L/∂a``
and ``d_out`` for ``∂L/∂b`` (``{quantity}_frac``, ``{quantity}_centred_frac``). A white
(isotropic) matrix has a share of about ``energy_fraction``; one direction is
``1 / max_rank``. "A compresses, B keeps diversity" is a statement about these shares, and
about the centred ones, not about raw counts in spaces of different dimension.

The CKA between the A-code and the B-output gradient (:func:`serlens.analysis.cka.linear_cka`)
uses a seeded uniform reservoir of frames (:class:`FrameReservoir`; Vitter 1985, "Random
sampling with a reservoir", Algorithm R).

Speaker band
------------
Where the run knows its speakers (the manifest's) and the training sample holds at least two,
the pass also keeps, per adapted module and state, the Gram, column sums and frame count of
the A code and of ∂L/∂a *per speaker* (r x r each: bounded by the number of speakers, not of
frames), and re-draws the sample by speaker :data:`BAND_RESAMPLES` times (the rescaled n − 1
cluster bootstrap of :func:`serlens.stats.cluster_multiplicities`: a draw's Gram is
``Σ_s w_s G_s``, its sums ``Σ_s w_s s_s``, its count ``Σ_s w_s n_s``). The spectra of every
draw are stored (``{state}/{module}/sv_draws/{q}``, ``sv_centred_draws/{q}``,
``n_frames_draws``), so the table takes the band at any ``energy_fraction``: rows
``{q}_frac_band_low/high`` and ``{q}_centred_frac_band_low/high`` are the 2.5 and 97.5
percentiles of the energy-rank share over the draws, for ``a_out``, ``b_out`` (from the
A code's Grams, as for the whole sample), ``a_out_grad`` and ``b_out_grad``
(``analysis.out_grad_band``, on by default): ∂L/∂b's Gram is d_out x d_out, so the pass keeps
one per speaker, and per distinct draw (a bootstrap of few speakers repeats draws), module and
state one d_out x d_out tridiagonalisation gives both its uncentred and its centred spectrum
(:func:`_out_grad_draw_spectra`; about 0.9 s per module and state at d_out = 384, 100 draws of
6 speakers, one core); with ``out_grad_band: false`` its curve keeps the spread over runs. The band says how much the share moves with *which training speakers* were
sampled; it is of one run, so the aggregated table averages the per-run limits over folds and
seeds (a typical run's band, as for probing).

The scalars of row 3 get bands from the same draws. The loss is a sum over utterances, so
∂L/∂A and ∂L/∂B are sums of each speaker's share, ``∂L/∂A_s = Σ g_a xᵀ`` and
``∂L/∂B_s = Σ g_b aᵀ`` over that speaker's utterances at every frame position (``x`` is
``lora_A``'s input; :meth:`ModuleAccumulators.add_speaker_gradients`; r x d_in and
d_out x r per speaker, kept while they take at most :data:`GRAD_BAND_MAX_BYTES` per module
and state). A draw's gradients are ``Σ_s w_s ∂L/∂A_s`` and ``Σ_s w_s ∂L/∂B_s``, and the
stored ``scalar_draws/{q}`` give ``grad_norm_ratio_B_A_band_low/high`` and
``dW_cos_band_low/high`` (percentiles; both quantities are scale-free, so a draw of n − 1
speakers needs no rescaling; :func:`gradient_draws`). The reservoir's CKA of a with ∂L/∂b
gets the speaker jackknife of :mod:`serlens.analysis.ab_cka` instead
(``cka_a_code_vs_b_out_grad_band_low/high``: each speaker's sampled frames left out in turn),
since a bootstrap repeats frames, which a kernel statistic does not take as new data.

Claim 3's CKA quantities
------------------------
The same pass also stores, per adapted module, the debiased linear CKA quantities of
:mod:`serlens.analysis.ab_cka` (:data:`CLAIM3_SCALARS`) on a sample of at least
``claim3_frames`` (2000) audio frames chosen by utterance (:class:`UtteranceFrameSample`),
the same frames in every state: ``cka_fwd_a``, ``cka_fwd_b`` (state trained: trained vs
untrained A codes and B outputs), ``cka_fwd_a_null``, ``cka_fwd_b_null`` (state untrained:
the untrained baseline vs a second, independent draw of it, ``untrained_pair``, seeded by
:func:`serlens.analysis.ab_cka.pair_seed`), ``cka_bwd_ba`` (per state: ∂L/∂b vs ∂L/∂a),
``cka_n_frames`` and ``cka_n_utterances``, and where the sample holds at least 3 speakers
each quantity's 95 % speaker-jackknife interval (:data:`CLAIM3_BANDS`, ``{q}_band_low/high``;
:mod:`serlens.analysis.ab_cka`, "Speaker band") and ``cka_n_speakers``. The codes, ∂L/∂a and ∂L/∂b are the trained and
untrained passes' own (no extra backward); the second draw costs one forward without
gradients per batch (about a sixth more encoder work than the two forward + backward
passes). Its B outputs come from the codes (``b bᵀ = a BᵀB aᵀ``), so no d_out-wide
activation is kept; ∂L/∂b is (``d_out`` float32 per frame, module and state, on the CPU).

In runs of fold 1 the pass also computes claim 3 by **the paper's own estimator**
(:data:`PAPER_SCALARS`, :func:`serlens.analysis.ab_cka.paper_cka`; what the paper's code
does and where is in that module's docstring): on at most 10 utterances per class of the
analysis sample (:func:`serlens.analysis.ab_cka.paper_utterances`), each utterance's A
code, B output, ∂L/∂a and ∂L/∂b flattened to one vector (every frame under ``pad30``; the
clip's own frames, zero-padded to the longest, under ``crop``, unless
``analysis.paper_estimator_input: pad30`` pads them to 30 s in a pass of their own,
:func:`_paper_own_pass`; ``paper_cka_pad30`` = 1 marks 30-s rows), linear CKA of the codes and
RBF CKA (``γ = 1 / n_features``) of the rest, between the trained adapters and **the
paper's baseline** (``A, B ~ N(0, 0.02²)``, fresh head: :func:`paper_state` at std 0.02,
whatever ``untrained_baseline`` is), with a second draw of it as the estimator's null. The
rows of that baseline are stored under state untrained beside the configured baseline's
other rows; the ``paper_`` prefix says whose they are. The trained state's rows are its
pass's own (gradients times the loss divisor ``N``: the paper's per-utterance
``∂CE_u/∂·``). With ``untrained_baseline: paper`` at ``untrained_init_std: 0.02`` the
untrained state and its second draw are the paper's and their rows are reused; otherwise
the paper's baseline runs one forward and backward (loss ``Σ_u CE_u``) and its second draw
one forward, on each batch's paper utterances only (:class:`PaperPass`). Memory: the
utterances' rows are kept until the end (the Gram of flattened vectors needs every pair),
exactly while a key (state, module, quantity) holds at most 8 MiB, then as a CountSketch of
5 MiB per 40 utterances (:class:`serlens.analysis.ab_cka.FlatGramSample`): at most four
keys per module for the trained state and the baseline and two for its second draw, so at
most 80 MiB per module; large-v2 (32 ``v_proj`` of 1280, ``pad30``, r = 32) holds about
1.6 GB (A codes and ∂L/∂a exact, ∂L/∂b sketched).

Untrained baselines
-------------------
Every quantity is computed for the trained adapters and head of a run and for an untrained
baseline on the same frames (``state`` trained / untrained; ``ratio`` = trained ÷ untrained).
``analysis.untrained_baseline`` chooses it (:func:`untrained_state`):

* ``matched_scale`` (default; :func:`matched_scale_state`): the run's *trained head* is
  kept (the same module, weights bit-identical), and per adapted module (so per layer)::

      A_u = ‖A‖_F · Z_A / ‖Z_A‖_F        B_u = ‖B‖_F · Z_B / ‖Z_B‖_F

  with ``Z_A`` (``r x d_in``), ``Z_B`` (``d_out x r``) seeded standard normal draws and
  ``A``, ``B`` the trained factors of that module. The baseline has the trained Frobenius
  norms of A and of B, layer by layer, and isotropic random directions. Gradient norms are
  scale-covariant (``∂L/∂A = s Bᵀ G`` scales with ‖B‖, ``∂L/∂B = s G Aᵀ`` with ‖A‖), so
  trained ÷ untrained compares *structure* (directions, alignment with the data and the
  head), not scale: rebalancing ``A → cA, B → B/c`` leaves ΔW and the function unchanged, and
  leaves every trained ÷ untrained ratio unchanged too. The head is kept so that the
  loss, hence ``G``, is the trained task's and not that of a random classifier.
* ``paper``: the baseline of the paper's code, ``A, B ~ N(0, untrained_init_std²)`` and a
  freshly initialised head. Its gradient norms scale with the arbitrary
  ``untrained_init_std`` (``‖∂L/∂A‖ ∝ ‖B‖``, ``‖∂L/∂B‖ ∝ ‖A‖``), so its trained ÷ untrained
  ratios mostly say how far the trained factors are from that scale (the project's earlier
  baseline, A at PEFT's init and B ~ N(0, std²), gave B/A gradient-norm ratios of 14.8,
  1.48, 0.148 for std 0.002, 0.02, 0.2); kept for the side-by-side comparison with the
  paper's numbers.

Gradients are autograd's
-----------------------
Every gradient stored (``∂L/∂a``, ``∂L/∂b``, ``∂L/∂A``, ``∂L/∂B`` and DoRA's ``∂L/∂m``) is
taken by ``torch.autograd.grad`` of the loss through the module's own forward, the A code
and B output read by forward hooks on ``lora_A`` / ``lora_B``. :func:`lora_factor_gradients`
is the closed form for plain LoRA only (it is what the tests check autograd against); the
pass never uses it, so it stays right for any forward peft builds around A and B.

DoRA
----
DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353,
eq. 5) splits the adapted weight into a trained magnitude ``m`` (``d_out``) and a direction::

    W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row        y = W' x + bias

(``‖·‖_row``: the norm of each output row of the ``d_out x d_in`` weight, the paper's
column norm ``‖·‖_c`` of its transposed convention; peft's ``lora_magnitude_vector``). The
closed forms above do not hold: with ``n = ‖W0 + s B A‖_row`` and ``g = m / n`` (per output
unit) peft's forward is ``y = W0 x + bias + (g - 1) ⊙ W0 x + g ⊙ s B A x``, and it treats
``n`` as a constant in the backward (DoRA §4.3, "we suggest treating ‖V + ΔV‖_c as a
constant ... it won't receive any gradient"), which is the gradient DoRA trains with. So
``∂L/∂b = s g ⊙ g_y`` and ``∂L/∂A = s Bᵀ diag(g) G``, ``∂L/∂B = s diag(g) G Aᵀ`` — what
autograd returns here, not ``s Bᵀ G`` and ``s G Aᵀ``. The A code ``a = A x`` and the B
output ``b = B a`` (``lora_B``'s output; the module adds ``s g ⊙ b``) are defined as for
LoRA. The ΔW rows compare the first-order change of the directional update ``s B A`` under
a step on each factor (:func:`delta_w_from_factor_steps` on the autograd gradients). peft
also calls ``lora_B(lora_A(I))`` on an identity matrix to build ``B A`` for the norm; the
hooks keep only the call on frames (a 3-d input), so that call is not counted.

The magnitude is reported beside the factors, per DoRA module and state
(:data:`DORA_SCALARS`)::

    magnitude_norm        = ‖m‖₂
    magnitude_rel_change  = ‖m - ‖W0‖_row‖₂ / ‖‖W0‖_row‖₂     (m at peft's init, B = 0, is ‖W0‖_row)
    magnitude_gain_rms    = sqrt(mean_i (m_i / n_i - 1)²)       (0: the module is W0 + s B A)
    grad_norm_m           = ‖∂L/∂m‖₂                             (and its trained ÷ untrained ratio)

The ``matched_scale`` baseline keeps the trained ``m`` (a scale, like the norms it keeps;
its gain ``m / n`` follows the random factors); the ``paper`` baseline sets
``m = ‖W0 + s B_u A_u‖_row``, DoRA's initialisation rule on its random factors, so the
untrained module computes ``W0 + s B_u A_u`` exactly (``magnitude_gain_rms = 0``).

Wide modules: bounded memory
----------------------------
``∂L/∂b`` is ``d_out``-dimensional and its Gram is ``d_out x d_out``: for ``fc1`` of
large-v2 (``d_out = 5120``, 32 layers, two states) that is 13 GB in float64. Modules with
``d_out <= EXACT_GRAM_MAX_DIMS`` (2048: every ``d_model``-wide module of every Whisper size,
at most 1280, stays exact, and so do fc1 of tiny and base) keep the exact Gram. Wider ones
estimate the spectrum of ``∂L/∂b`` from a seeded Gaussian sketch of the frames
(:class:`SketchedGram`, not a reservoir): ``S = Ω M`` with ``Ω`` a ``K x n_frames`` matrix
of ``N(0, 1/K)`` entries (``K`` = :data:`WIDE_SKETCH_ROWS`, drawn batch by batch, the same
columns for every module and both states), so ``E[SᵀS] = MᵀM``. The singular values are
those of ``S`` (centred: of ``S - (Ω1) μᵀ``, ``μ`` the exact mean), rescaled so that their
energy is the exact ``‖M‖²_F`` (``‖M‖²_F - ‖Σ_t x_t‖² / n`` centred; both accumulated
exactly), padded with zeros to ``d_out``. Memory per module and state: ``4 K d_out`` bytes
(float32) plus O(K + d_out), instead of ``8 d_out²`` (fc1 of large-v2: 42 MB, not 210 MB).
A uniform reservoir of frames was the other candidate. On ∂L/∂b of one fc1 of a DoRA run
on tiny.en (1833 frames, three seeds, ``K`` = 100-400) it put the leading singular value
15-84 % too high, depending on the seed (a few frames hold much of the gradient), where the
sketch was 2-15 % off and its energy ranks moved by at most 3 between seeds (on another
layer both were within 7 %). The sketch is still an estimate: the leading singular values
are off by about ``sqrt(k / K)`` (``k`` strong directions), and the spectrum of a ``K``-row
sketch is spread, so energy ranks are biased low once they are more than a few percent of
``K`` (at 90 % energy: 72 for a true 94 with ``K = 400``, 58 with ``K = 200``). Compare
sketched modules with each other, and trained with untrained (the same ``Ω``), not with
exact ones.
``b_out_grad_sketch_rows`` is ``K`` for a sketched module, 0 for an exact one.

:func:`compute_ab_dynamics` runs this on a fixed class-balanced sample of training
utterances, counting only frames that hold audio.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from serlens.analysis.ab_cka import (
    CLAIM3_TARGET_FRAMES,
    PAPER_FOLD,
    PAPER_INIT_STD,
    PAPER_PER_CLASS,
    FlatGramSample,
    UtteranceFrameSample,
    claim3_cka,
    jackknife_interval,
    pair_seed,
    paper_cka,
    paper_utterances,
)
from serlens.analysis.cka import linear_cka
from serlens.analysis.runs import TrainedRun, balanced_sample
from serlens.analysis.spectra import energy_rank, uncentred_and_centred_singular_values
from serlens.audio import MelBatch
from serlens.models.encoder import masked_mean, run_encoder
from serlens.stats import cluster_multiplicities
from serlens.train.heads import EmotionHead

log = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "CLAIM3_BANDS",
    "CLAIM3_SCALARS",
    "DORA_SCALARS",
    "PAPER_SCALARS",
    "EXACT_GRAM_MAX_DIMS",
    "WIDE_SKETCH_ROWS",
    "AdapterTaps",
    "FrameReservoir",
    "GramAccumulator",
    "ModuleAccumulators",
    "GaussianFrameSketch",
    "PaperPass",
    "SketchedGram",
    "ab_statistics",
    "ab_table_from_statistics",
    "compute_ab_dynamics",
    "delta_w_comparison",
    "delta_w_from_factor_steps",
    "gram_singular_values",
    "lora_factor_gradients",
    "matched_scale_state",
    "paper_state",
    "product_singular_values",
    "stream_ab_statistics",
    "trained_state",
    "untrained_state",
    "write_ab_statistics",
]

ADAPTER = "default"
#: Frames of the seeded reservoir (the CKA's, and the spectrum of ∂L/∂b of wide modules).
CKA_MAX_FRAMES = 2000
#: Widest ``d_out`` whose ∂L/∂b keeps an exact ``d_out x d_out`` Gram (float64, at most
#: 32 MiB per module and state); wider modules use :class:`SketchedGram` (module docstring).
#: 2048 keeps every ``d_model``-wide module of every Whisper size exact (at most 1280), so the
#: short-form ``v_proj`` runs are unchanged; fc1 of small, medium and large is sampled.
EXACT_GRAM_MAX_DIMS = 2048
#: Rows ``K`` of the Gaussian sketch of ∂L/∂b of the modules wider than that.
WIDE_SKETCH_ROWS = 2048
#: The untrained baselines (``analysis.untrained_baseline``; see the module docstring).
BASELINES = ("matched_scale", "paper")
#: Activation and gradient matrices whose singular values are stored (and energy ranks taken).
#: Bootstrap draws of the energy-rank shares' speaker band (module docstring, "Speaker band").
BAND_RESAMPLES = 100
#: Most bytes per module and state of the speakers' shares of ∂L/∂A and ∂L/∂B (float64) for
#: the band of the gradient-norm ratio and dW_cos; beyond it (many speakers in a wide module)
#: those quantities have no band and the pass logs so.
GRAD_BAND_MAX_BYTES = 16 * 2**20
#: Most bytes of the per-speaker ∂L/∂b Grams of one pass (every module and state, float64)
#: for ∂L/∂b's speaker band (``analysis.out_grad_band``): large-v2's 32 ``v_proj`` at 8
#: speakers take 6.7 GB.
OUT_GRAD_BAND_MAX_BYTES = 8 * 2**30
SPECTRA = ("a_out", "b_out", "a_out_grad", "b_out_grad")
ACTIVATIONS = SPECTRA
#: Quantities with a trained ÷ untrained row (counts: the shares have the same ratio).
RATIO_QUANTITIES = (
    *SPECTRA,
    *(f"{q}_centred" for q in SPECTRA),
    "grad_norm_A",
    "grad_norm_B",
    "grad_norm_ratio_B_A",
    "dW_from_A_norm",
    "dW_from_B_norm",
    "grad_norm_m",
)
SCALARS = (
    "grad_norm_A",
    "grad_norm_B",
    "grad_norm_ratio_B_A",
    "dW_from_A_norm",
    "dW_from_B_norm",
    "dW_cos",
    "cka_a_code_vs_b_out_grad",
    "n_frames",
    "b_out_grad_sketch_rows",
)
#: Speaker bands of row 3's scalars (module docstring, "Speaker band"): bootstrap
#: percentiles of the gradient-norm ratio and dW_cos, the jackknife interval of the CKA.
SCALAR_BANDS = tuple(
    f"{q}{bound}"
    for q in ("grad_norm_ratio_B_A", "dW_cos", "cka_a_code_vs_b_out_grad")
    for bound in ("_band_low", "_band_high")
)
#: Claim 3's CKA quantities (:mod:`serlens.analysis.ab_cka`; module docstring).
CLAIM3_SCALARS = (
    "cka_fwd_a",
    "cka_fwd_b",
    "cka_fwd_a_null",
    "cka_fwd_b_null",
    "cka_bwd_ba",
    "cka_n_frames",
    "cka_n_utterances",
)
#: Their speaker-jackknife bands (:func:`serlens.analysis.ab_cka.claim3_cka`), where the
#: sample holds at least 3 speakers, and the number of speakers.
CLAIM3_BANDS = (
    *(
        f"{q}{bound}"
        for q in ("cka_fwd_a", "cka_fwd_b", "cka_fwd_a_null", "cka_fwd_b_null", "cka_bwd_ba")
        for bound in ("_band_low", "_band_high")
    ),
    "cka_n_speakers",
)
#: Claim 3 by the paper's own estimator (:func:`serlens.analysis.ab_cka.paper_cka`), fold-1
#: runs only: the forward ones and the jackknife SEs under state trained, the null under
#: untrained (the paper's baseline, whatever ``untrained_baseline`` is), ``paper_cka_bwd_ba``
#: (and its ``_f32``, ``_exponent``) under both.
PAPER_SCALARS = (
    "paper_cka_fwd_a",
    "paper_cka_fwd_b",
    "paper_cka_fwd_a_null",
    "paper_cka_fwd_b_null",
    "paper_cka_bwd_ba",
    "paper_cka_fwd_b_f32",
    "paper_cka_fwd_b_null_f32",
    "paper_cka_bwd_ba_f32",
    "paper_cka_bwd_exponent",
    "paper_cka_excess_se",
    "paper_cka_fwd_minus_bwd_se",
    "paper_cka_n_utterances",
    "paper_cka_n_frames",
    "paper_cka_sketch_buckets",
    "paper_cka_pad30",
)
#: The paper's estimator's speaker jackknife (:func:`serlens.analysis.ab_cka.paper_cka`),
#: where its utterances come from at least 3 speakers.
PAPER_BANDS = (
    "paper_cka_excess_speaker_se",
    "paper_cka_fwd_minus_bwd_speaker_se",
    "paper_cka_n_speakers",
    *(
        f"paper_cka_{q}{bound}"
        for q in ("fwd_a", "fwd_b", "fwd_a_null", "fwd_b_null", "bwd_ba")
        for bound in ("_band_low", "_band_high")
    ),
)
#: ``analysis.paper_estimator_input``: the pass's own batches (``run``) or 30-s padding.
PAPER_INPUTS = ("run", "pad30")
#: DoRA's magnitude vector, per DoRA module and state (see the module docstring).
DORA_SCALARS = ("magnitude_norm", "magnitude_rel_change", "magnitude_gain_rms", "grad_norm_m")
TABLE_COLUMNS = ["module", "layer", "depth", "quantity", "state", "value"]


# --------------------------------------------------------------------------- pure functions


def lora_factor_gradients(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """Gradients of the LoRA factors from the full-weight gradient ``G = ∂L/∂W`` (``d_out x d_in``).

    For ``y = W x + s B A x``: ``∂L/∂A = s Bᵀ G`` (``r x d_in``) and ``∂L/∂B = s G Aᵀ``
    (``d_out x r``), with ``A`` ``r x d_in`` and ``B`` ``d_out x r`` as PEFT stores them.
    Plain LoRA only: under DoRA the gradients are ``s Bᵀ diag(m / n) G`` and
    ``s diag(m / n) G Aᵀ`` (module docstring). The pass takes them from autograd instead.
    """
    return scaling * B.T @ G, scaling * G @ A.T


def delta_w_from_factor_steps(
    grad_A: torch.Tensor, grad_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
):
    """First-order change of ``ΔW = s B A`` per unit (negative) step on one factor alone.

    Step on A: ``s B ∂L/∂A = s² B Bᵀ G``; step on B: ``s ∂L/∂B A = s² G Aᵀ A`` (both
    ``d_out x d_in``; the descent direction is minus these).
    """
    return scaling * B @ grad_A, scaling * grad_B @ A


def delta_w_comparison(grad_A, grad_B, A, B, scaling: float) -> dict[str, float]:
    """Norms and cosine of the two ΔW contributions of :func:`delta_w_from_factor_steps`.

    ``dW_from_A_norm = ‖s² B Bᵀ G‖_F``, ``dW_from_B_norm = ‖s² G Aᵀ A‖_F`` and
    ``dW_cos = <s² B Bᵀ G, s² G Aᵀ A>_F / (‖·‖_F ‖·‖_F)`` (flattened cosine; nan when either
    is zero). Computed in float64.
    """
    grad_A, grad_B, A, B = (torch.as_tensor(t).to(torch.float64) for t in (grad_A, grad_B, A, B))
    from_A, from_B = delta_w_from_factor_steps(grad_A, grad_B, A, B, scaling)
    norm_A = float(torch.linalg.matrix_norm(from_A))
    norm_B = float(torch.linalg.matrix_norm(from_B))
    den = norm_A * norm_B
    cos = float((from_A * from_B).sum()) / den if den > 0 else math.nan
    return {"dW_from_A_norm": norm_A, "dW_from_B_norm": norm_B, "dW_cos": cos}


def gradient_draws(grad_A, grad_B, A, B, weights) -> dict[str, np.ndarray]:
    """``grad_norm_ratio_B_A`` and ``dW_cos`` of the speaker-weighted factor gradients.

    ``grad_A`` (``S x r x d_in``) and ``grad_B`` (``S x d_out x r``): each speaker's share of
    ∂L/∂A and ∂L/∂B (they sum to the sample's: the loss is a sum over utterances);
    ``weights`` ``(draws x S)``. Per draw ``g_A = Σ_s w_s grad_A[s]`` (likewise ``g_B``),
    ``ratio = ‖g_B‖_F / ‖g_A‖_F`` and, as :func:`delta_w_comparison` (the factor ``s²``
    cancels), ``cos = <B g_A, g_B A>_F / (‖B g_A‖_F ‖g_B A‖_F)`` from ``r x r`` products
    only: ``‖B g_A‖² = <BᵀB, g_A g_Aᵀ>``, ``‖g_B A‖² = <AAᵀ, g_Bᵀ g_B>``,
    ``<B g_A, g_B A> = <Bᵀ g_B, g_A Aᵀ>``. Both are scale-free, so a draw of n − 1 speakers
    needs no rescaling."""
    f64 = torch.float64
    w = torch.as_tensor(np.asarray(weights), dtype=f64)
    gA = torch.einsum("ds,sij->dij", w, torch.as_tensor(grad_A, dtype=f64))
    gB = torch.einsum("ds,sij->dij", w, torch.as_tensor(grad_B, dtype=f64))
    A, B = (torch.as_tensor(t).detach().to("cpu", f64) for t in (A, B))
    norm_a, norm_b = gA.square().sum(dim=(1, 2)), gB.square().sum(dim=(1, 2))
    from_a = torch.einsum("ik,dij,dkj->d", B.T @ B, gA, gA)
    from_b = torch.einsum("jk,dij,dik->d", A @ A.T, gB, gB)
    inner = (torch.einsum("oi,doj->dij", B, gB) * torch.einsum("dik,jk->dij", gA, A)).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sqrt(norm_b.numpy() / norm_a.numpy())
        cos = inner.numpy() / np.sqrt(from_a.numpy() * from_b.numpy())
    return {"grad_norm_ratio_B_A": ratio, "dW_cos": cos}


def gram_singular_values(gram) -> np.ndarray:
    """Singular values of ``M`` from its Gram ``MᵀM``: ``σ_i = sqrt(λ_i(MᵀM))``, descending.

    Eigenvalues that round-off pushes below zero are clipped to 0. (Eigenvalues in torch,
    float64: numpy's own BLAS threads would fight torch's for the same cores.)
    """
    gram = torch.as_tensor(gram).detach().to("cpu", torch.float64)
    eig = torch.linalg.eigvalsh((gram + gram.T) / 2.0)
    return np.sqrt(np.clip(eig.numpy(), 0.0, None))[::-1].copy()


def _out_grad_draw_spectra(grams, totals, counts, weights) -> tuple[np.ndarray, np.ndarray]:
    """Uncentred and centred spectra of every draw of ∂L/∂b's per-speaker Grams
    (``grams`` ``S x d x d``, ``totals`` ``S x d``, ``counts`` ``S``; ``weights``
    ``draws x S``), each ``draws x d``.

    A draw's Gram is ``Σ_s w_s G_s``; both of its spectra come from one tridiagonalisation
    (:func:`serlens.analysis.spectra.uncentred_and_centred_singular_values`), and draws with
    the same weights (a bootstrap of few speakers repeats many) are solved once. One draw's
    Gram is in memory at a time, not every draw's.
    """
    from threadpoolctl import threadpool_limits

    G = torch.as_tensor(grams).detach().to("cpu", torch.float64).numpy()
    T = torch.as_tensor(totals).detach().to("cpu", torch.float64).numpy()
    n = torch.as_tensor(counts).detach().to("cpu", torch.float64).numpy()
    w = np.asarray(weights, dtype=np.float64)
    unique, inverse = np.unique(w, axis=0, return_inverse=True)
    sv, svc = [], []
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for row in unique:
            gram = np.tensordot(row, G, axes=(0, 0))
            s, sc = uncentred_and_centred_singular_values(gram, row @ T, float(row @ n))
            sv.append(s)
            svc.append(sc)
    inverse = np.asarray(inverse).reshape(-1)
    return np.stack(sv)[inverse], np.stack(svc)[inverse]


def product_singular_values(gram_a, B) -> np.ndarray:
    """Singular values of ``b = a Bᵀ`` (frames x d_out) from ``aᵀa`` (r x r) and ``B`` (d_out x r).

    ``bᵀb = B (aᵀa) Bᵀ`` shares its non-zero eigenvalues with the r x r matrix
    ``C^½ BᵀB C^½`` (``C = aᵀa``, ``C^½`` its PSD square root), so only r x r
    eigenproblems are solved. Returns the ``r`` values, descending. Given the centred Gram
    of ``a`` it gives those of the centred ``b`` (the mean of ``b`` is ``B`` times that of ``a``).
    """
    C = torch.as_tensor(gram_a).detach().to("cpu", torch.float64)
    B = torch.as_tensor(B).detach().to("cpu", torch.float64)
    lam, V = torch.linalg.eigh((C + C.T) / 2.0)
    root = (V * lam.clamp(min=0.0).sqrt()) @ V.T
    return gram_singular_values(root @ (B.T @ B) @ root)


def max_rank(n_singular: int, n_frames: int, centred: bool) -> int:
    """The largest rank a ``frames x dims`` matrix with ``n_singular`` stored singular values
    can have: ``min(n_frames, n_singular)``, one less in frames once the mean is removed."""
    return max(0, min(int(n_frames) - (1 if centred else 0), int(n_singular)))


@dataclass
class GramAccumulator:
    """``MᵀM``, the column sums ``Σ_t x_t`` and the row count of a ``frames x dims`` matrix
    given in row blocks (float64): enough for its uncentred and centred spectra."""

    dims: int
    gram: torch.Tensor | None = None
    total: torch.Tensor | None = None
    n_rows: int = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dims:
            raise ValueError(f"expected rows of shape (n, {self.dims}); got {tuple(rows.shape)}")
        block, total = rows.T @ rows, rows.sum(dim=0)
        self.gram = block if self.gram is None else self.gram.add_(block)
        self.total = total if self.total is None else self.total.add_(total)
        self.n_rows += rows.shape[0]

    def centred_gram(self) -> torch.Tensor | None:
        """``Σ_t (x_t - μ)(x_t - μ)ᵀ = G - s sᵀ / n`` (``= (n - 1) ×`` the sample covariance).

        Exact algebra; in float64 the cancellation loses about ``log10(‖μ‖² / λ)`` of 16
        digits for a centred eigenvalue ``λ`` (per frame), harmless for activations.
        """
        if self.gram is None:
            return None
        return self.gram - torch.outer(self.total, self.total) / self.n_rows

    def singular_values(self, centred: bool = False) -> np.ndarray:
        if self.gram is None:
            return np.zeros(0)
        return gram_singular_values(self.centred_gram() if centred else self.gram)

    def energy_rank(self, fraction: float, centred: bool = False) -> int:
        """Energy rank of the stacked matrix (see :func:`serlens.analysis.spectra.energy_rank`)."""
        return energy_rank(self.singular_values(centred), fraction)


class FrameReservoir:
    """A uniform random sample of at most ``capacity`` frames from a stream (Algorithm R).

    Every call to :meth:`offer` passes row blocks of the same frames under several keys;
    all keys keep the same frames, so sampled representations stay paired row by row.
    Frame ``t`` (0-based, counted over the stream) fills slot ``t`` while ``t < capacity``,
    afterwards replaces slot ``j ~ U{0..t}`` when ``j < capacity`` (Vitter 1985).
    """

    def __init__(self, capacity: int, seed: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self.capacity = int(capacity)
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.buffers: dict = {}

    def _plan(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, rows): row ``rows[i]`` of the block goes to slot ``slots[i]``."""
        t = self.seen + np.arange(n)
        slots = np.where(t < self.capacity, t, -1)
        late = t >= self.capacity
        slots[late] = self.rng.integers(0, t[late] + 1)
        self.seen += n
        keep = np.flatnonzero((slots >= 0) & (slots < self.capacity))
        # A slot hit twice in one block keeps the later frame, as a sequential pass would.
        _, last = np.unique(slots[keep][::-1], return_index=True)
        rows = keep[::-1][last]
        return slots[rows], rows

    def offer(self, blocks: dict) -> None:
        sizes = {b.shape[0] for b in blocks.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"blocks offered together must have the same number of rows; got {sorted(sizes)}"
            )
        slots, rows = self._plan(sizes.pop())
        if len(rows) == 0:
            return
        slots_t, rows_t = torch.as_tensor(slots), torch.as_tensor(rows)
        for key, block in blocks.items():
            block = block.detach()
            if key not in self.buffers:
                self.buffers[key] = torch.zeros(
                    (self.capacity, block.shape[1]), dtype=block.dtype, device=block.device
                )
            self.buffers[key][slots_t.to(block.device)] = block[rows_t.to(block.device)]

    def sample(self, key) -> np.ndarray:
        """The sampled rows stored under ``key`` (``min(seen, capacity) x dims``, float64)."""
        return self.buffers[key][: min(self.seen, self.capacity)].cpu().numpy().astype(np.float64)


class GaussianFrameSketch:
    """The seeded Gaussian mixing matrix ``Ω`` (``rows x n_frames``, entries ``N(0, 1 / rows)``)
    of a stream of frames, produced one block of columns at a time.

    ``block(start, n)`` is ``Ω[:, start:start + n]``; blocks are drawn in stream order from a
    CPU generator seeded by ``seed`` (float32) and the last one is kept, so every module
    (and every state) that adds the same frames in the same order gets the same columns:
    one draw per batch, and the states' sketches are paired frame for frame.
    """

    def __init__(self, rows: int, seed: int):
        if rows < 1:
            raise ValueError(f"rows must be >= 1; got {rows}")
        self.rows = int(rows)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.drawn = 0
        self._last: tuple[int, torch.Tensor] | None = None

    def block(self, start: int, n: int, device) -> torch.Tensor:
        if self._last is not None and self._last[0] == start and self._last[1].shape[1] == n:
            if self._last[1].device != torch.device(device):
                self._last = (start, self._last[1].to(device))
            return self._last[1]
        if start != self.drawn:
            raise RuntimeError(
                f"sketch columns are drawn in stream order: asked for frame {start}, "
                f"{self.drawn} drawn so far"
            )
        omega = torch.randn((self.rows, n), generator=self.gen) / math.sqrt(self.rows)
        self.drawn += n
        self._last = (start, omega.to(device))
        return self._last[1]


class SketchedGram:
    """The spectrum of a wide ``frames x dims`` matrix ``M`` from a Gaussian sketch of its rows.

    The bounded-memory stand-in for :class:`GramAccumulator` (same ``add``,
    ``singular_values``, ``energy_rank``, ``n_rows``). It keeps ``S = Ω M`` (``rows x dims``,
    float32), ``Ω 1`` (``rows``) with ``Ω`` the seeded ``N(0, 1/rows)`` matrix of
    :class:`GaussianFrameSketch` (a Johnson-Lindenstrauss sketch of the frames; Woodruff 2014,
    "Sketching as a tool for numerical linear algebra", §2), and, exactly in float64, the row
    count, the column sums ``Σ_t x_t`` and the energy ``Σ_t ‖x_t‖²``. ``E[ΩᵀΩ] = I``, so
    ``SᵀS`` is an unbiased estimate of ``MᵀM``; centred, ``S_c = S - (Ω 1) μᵀ = Ω (M - 1 μᵀ)``
    with the exact mean ``μ``. The singular values are those of ``S`` (``S_c``) rescaled so
    that their energy is the exact (centred) energy, from the ``rows x rows`` kernel when
    ``rows < dims``, padded with zeros to ``dims`` values as the exact path returns.

    Every frame enters through its random mix, so a few frames that hold most of the
    gradient do not make the estimate depend on which frames are kept, as a reservoir of
    frames does. What remains is the spread of a ``rows``-sample covariance: the leading
    singular values are off by about ``sqrt(k / rows)`` for a spectrum of ``k`` strong
    directions, and the spectrum is spread (energy ranks biased low, by about a fifth when
    the rank is a quarter of ``rows``). Memory: ``4 rows dims`` bytes plus O(rows + dims).
    """

    def __init__(self, dims: int, sketch: GaussianFrameSketch):
        self.dims = int(dims)
        self.sketch = sketch
        self.n_rows = 0
        self.S: torch.Tensor | None = None
        self.omega_sum: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.energy = 0.0

    @property
    def sketch_rows(self) -> int:
        return self.sketch.rows

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach()
        if rows.ndim != 2 or rows.shape[1] != self.dims:
            raise ValueError(f"expected rows of shape (n, {self.dims}); got {tuple(rows.shape)}")
        n = rows.shape[0]
        omega = self.sketch.block(self.n_rows, n, rows.device)
        block = omega @ rows.to(torch.float32)
        rows64 = rows.to(torch.float64)
        total, mixed = rows64.sum(dim=0), omega.sum(dim=1).to(torch.float64)
        if self.S is None:
            self.S, self.omega_sum, self.total = block, mixed, total
        else:
            self.S.add_(block)
            self.omega_sum.add_(mixed)
            self.total.add_(total)
        self.energy += float(rows64.pow(2).sum())
        self.n_rows += n

    def singular_values(self, centred: bool = False) -> np.ndarray:
        if self.S is None:
            return np.zeros(0)
        S = self.S.to(torch.float64)
        energy = self.energy
        if centred:
            mean = self.total / self.n_rows
            S = S - torch.outer(self.omega_sum, mean)
            energy -= float(self.total @ self.total) / self.n_rows
        sv = gram_singular_values(S @ S.T if S.shape[0] < S.shape[1] else S.T @ S)
        sketched = float(np.sum(sv**2))
        if sketched > 0:
            sv = sv * math.sqrt(max(energy, 0.0) / sketched)
        out = np.zeros(self.dims)
        out[: min(len(sv), self.dims)] = sv[: self.dims]
        return out

    def energy_rank(self, fraction: float, centred: bool = False) -> int:
        return energy_rank(self.singular_values(centred), fraction)


# --------------------------------------------------------------------------- adapters


def _layer_index(name: str) -> int:
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match is None:
        raise ValueError(
            f"adapted module {name!r} is not inside an encoder layer (no 'layers.<i>.' in its name)"
        )
    return int(match.group(1))


def _factors(module: nn.Module) -> tuple[nn.Linear, nn.Linear, float]:
    return module.lora_A[ADAPTER], module.lora_B[ADAPTER], float(module.scaling[ADAPTER])


def _magnitude(module: nn.Module) -> nn.Parameter | None:
    """DoRA's magnitude vector ``m`` (``d_out``) of an adapted module; None for plain LoRA."""
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    if magnitudes is None or ADAPTER not in magnitudes:
        return None
    return magnitudes[ADAPTER].weight


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen ``W0`` of an adapted module as ``d_out x d_in``."""
    weight = module.get_base_layer().weight
    return weight.T if getattr(module, "fan_in_fan_out", False) else weight


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W‖_row``: the norm of each output row of a ``d_out x d_in`` weight (float64)."""
    return torch.linalg.vector_norm(weight.detach().to(torch.float64), dim=1)


def _adapted_row_norms(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``‖W0 + s B A‖_row`` (DoRA's norm, the denominator of its direction), float64."""
    _, _, s = _factors(module)
    W0 = _base_weight(module).detach().to(torch.float64)
    return _row_norms(W0 + s * B.detach().to(W0) @ A.detach().to(W0))


@dataclass
class AdapterState:
    """One setting of every adapter (``weights[name] = (A, B)``; ``magnitudes[name] = m`` for
    DoRA modules) and the head that goes with it."""

    name: str
    head: nn.Module
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)


def trained_state(run: TrainedRun) -> AdapterState:
    """The run's own adapters (copied: A, B and DoRA's m) and head."""
    weights, magnitudes = {}, {}
    for name, module in sorted(run.lora_modules().items()):
        lora_A, lora_B, _ = _factors(module)
        weights[name] = (lora_A.weight.detach().clone(), lora_B.weight.detach().clone())
        m = _magnitude(module)
        if m is not None:
            magnitudes[name] = m.detach().clone()
    return AdapterState("trained", run.head, weights, magnitudes)


def _scaled_normal(like: torch.Tensor, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A seeded standard normal of ``like``'s shape rescaled to Frobenius norm ``norm``."""
    z = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    size = float(torch.linalg.matrix_norm(z))
    return (z * (norm / size if size > 0 else 0.0)).to(like)


def matched_scale_state(run: TrainedRun, seed: int) -> AdapterState:
    """The ``matched_scale`` baseline: the trained head, and per module random factors with
    the trained factors' Frobenius norms (see the module docstring).

    ``A_u = ‖A‖_F Z_A / ‖Z_A‖_F`` and ``B_u = ‖B‖_F Z_B / ‖Z_B‖_F``, ``Z`` standard normal
    from a generator seeded by ``seed`` (modules in name order, A then B), drawn in float64
    on the CPU and cast to the weights' dtype and device. The global random state is not
    touched. A trained B = 0 (an untrained run) gives B_u = 0. DoRA modules keep their
    trained magnitude ``m`` (a scale, as the norms are; nothing is drawn for it).
    """
    gen = torch.Generator().manual_seed(int(seed))
    trained = trained_state(run)
    weights = {}
    for name, (A, B) in trained.weights.items():
        norm_A = float(torch.linalg.matrix_norm(A.double()))
        norm_B = float(torch.linalg.matrix_norm(B.double()))
        weights[name] = (_scaled_normal(A, norm_A, gen), _scaled_normal(B, norm_B, gen))
    return AdapterState("untrained", run.head, weights, trained.magnitudes)


def paper_state(run: TrainedRun, init_std: float, seed: int) -> AdapterState:
    """The ``paper`` baseline: ``A, B ~ N(0, init_std²)`` and a fresh head, built aside.

    The head is a freshly initialised :class:`EmotionHead` of the run's head's shape. All
    seeded by ``seed`` (head first, then modules in name order, A then B) without disturbing
    the global random state. DoRA modules get ``m = ‖W0 + s B_u A_u‖_row`` (DoRA's
    initialisation rule on these factors: the untrained module computes ``W0 + s B_u A_u``).
    """
    device = run.head.projector.weight.device
    weights, magnitudes = {}, {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        head = EmotionHead(
            run.head.projector.in_features,
            run.head.classifier.out_features,
            run.head.projector.out_features,
        )
        for name, module in sorted(run.lora_modules().items()):
            lora_A, lora_B, _ = _factors(module)
            fresh_A = torch.randn(lora_A.weight.shape) * init_std
            fresh_B = torch.randn(lora_B.weight.shape) * init_std
            weights[name] = (fresh_A.to(lora_A.weight), fresh_B.to(lora_B.weight))
            m = _magnitude(module)
            if m is not None:
                magnitudes[name] = _adapted_row_norms(module, *weights[name]).to(m)
    head = head.to(device).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return AdapterState("untrained", head, weights, magnitudes)


def untrained_state(
    run: TrainedRun, baseline: str, seed: int, init_std: float | None = None
) -> AdapterState:
    """The untrained baseline ``baseline`` (one of :data:`BASELINES`) for ``run``; the run
    is not touched. ``init_std`` is the std of the ``paper`` baseline (unused otherwise)."""
    if baseline == "matched_scale":
        return matched_scale_state(run, seed)
    if baseline == "paper":
        if init_std is None:
            raise ValueError("the paper baseline needs init_std (analysis.untrained_init_std)")
        return paper_state(run, float(init_std), seed)
    raise ValueError(f"untrained baseline {baseline!r} is not one of {BASELINES}")


def _load_adapters(modules: dict[str, nn.Module], state: AdapterState) -> None:
    with torch.no_grad():
        for name, module in modules.items():
            lora_A, lora_B, _ = _factors(module)
            lora_A.weight.copy_(state.weights[name][0])
            lora_B.weight.copy_(state.weights[name][1])
            m = _magnitude(module)
            if m is not None:
                m.copy_(state.magnitudes[name])
                # peft may cache DoRA's weight norm (ENABLE_DORA_CACHING): not for new factors
                module.lora_magnitude_vector[ADAPTER]._cache_clear()


@contextlib.contextmanager
def _adapters_restored(run: TrainedRun):
    """Whatever is loaded inside, the run's own adapter weights (A, B, DoRA's m) are back on
    exit (even on error)."""
    saved = trained_state(run)
    try:
        yield
    finally:
        _load_adapters(dict(sorted(run.lora_modules().items())), saved)


def _adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``lora_A``, ``lora_B`` weights and, for DoRA, the magnitude ``m``, in that order."""
    lora_A, lora_B, _ = _factors(module)
    m = _magnitude(module)
    return [lora_A.weight, lora_B.weight] + ([] if m is None else [m])


@contextlib.contextmanager
def _gradients_through_adapters(run: TrainedRun, heads: list[nn.Module]):
    """Eval mode (LoRA dropout off) and grad-enabled adapter weights; both restored on exit."""
    modules = [run.encoder, *heads]
    training = [m.training for m in modules]
    weights = [w for m in run.lora_modules().values() for w in _adapter_parameters(m)]
    flags = [w.requires_grad for w in weights]
    try:
        for m in modules:
            m.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, was in zip(modules, training, strict=True):
            m.train(was)
        for w, was in zip(weights, flags, strict=True):
            w.requires_grad_(was)


class AdapterTaps:
    """Forward hooks on ``lora_A`` and ``lora_B`` of adapted modules, for autograd.

    Inside ``with AdapterTaps(modules) as taps``, every forward of the encoder records per
    module the code ``a = A x`` (``lora_A``'s output) and ``B a`` (``lora_B``'s output) of
    the call on frames (a 3-d input: batch x frames x features). Calls on 2-d inputs are
    ignored: DoRA builds ``B A`` from ``lora_B(lora_A(I))`` for its (detached) weight norm,
    and that product is not an activation. A module called twice on frames in one forward
    is an error (its activations would be half counted). :meth:`gradients` returns the
    autograd gradients of a loss w.r.t. those outputs and the adapter parameters.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = dict(modules)
        self.captured: dict[tuple[str, str], torch.Tensor] = {}
        self.handles: list = []

    def _hook(self, key):
        def hook(_module, inputs, output):
            if inputs[0].ndim < 3:
                return
            if key in self.captured:
                raise RuntimeError(
                    f"{key[0]}: lora_{key[1].upper()} ran twice on frames in one forward"
                )
            self.captured[key] = output
            if key[1] == "a" and torch.is_grad_enabled():
                # lora_A's input x (after LoRA dropout: x itself in eval), for the speakers'
                # shares of ∂L/∂A; not kept in forwards without gradients
                self.captured[(key[0], "x")] = inputs[0]

        return hook

    def __enter__(self) -> AdapterTaps:
        for name, module in self.modules.items():
            lora_A, lora_B, _ = _factors(module)
            self.handles.append(lora_A.register_forward_hook(self._hook((name, "a"))))
            self.handles.append(lora_B.register_forward_hook(self._hook((name, "b"))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.captured.clear()

    def clear(self) -> None:
        self.captured.clear()

    def gradients(self, loss: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per module: ``code`` (detached ``A x``) and, by ``torch.autograd.grad`` of ``loss``,
        ``code_grad`` = ∂L/∂a, ``out_grad`` = ∂L/∂(B a), ``grad_A``, ``grad_B`` and (DoRA)
        ``grad_m`` = ∂L/∂m, and ``x`` (detached ``lora_A``'s input). Activations keep their
        batch x frames shape."""
        names = list(self.modules)
        missing = [f"{n}/{p}" for n in names for p in "ab" if (n, p) not in self.captured]
        if missing:
            raise RuntimeError(f"no forward on frames reached {missing[:3]}")
        outputs = [self.captured[(name, part)] for name in names for part in ("a", "b")]
        params = [_adapter_parameters(self.modules[name]) for name in names]
        flat = [p for group in params for p in group]
        grads = torch.autograd.grad(loss, outputs + flat)
        out, k = {}, len(outputs)
        for i, name in enumerate(names):
            values = {
                "code": outputs[2 * i].detach(),
                "x": self.captured[(name, "x")].detach() if (name, "x") in self.captured else None,
                "code_grad": grads[2 * i],
                "out_grad": grads[2 * i + 1],
                "grad_A": grads[k],
                "grad_B": grads[k + 1],
            }
            if len(params[i]) == 3:
                values["grad_m"] = grads[k + 2]
            k += len(params[i])
            out[name] = values
        return out


# --------------------------------------------------------------------------- the streaming pass


@dataclass
class ModuleAccumulators:
    """What one adapted module keeps over the sample; its size does not depend on the sample.

    ``a_out`` and ``b_out_grad`` hold the Gram, column sums and count of the code ``a``
    (frames x r) and of ``g_b`` (frames x d_out); ``a_out_grad`` those of ``g_a = g_b B``
    (frames x r). The (centred) Gram of ``b = a Bᵀ`` is ``B`` (centred ``aᵀa``) ``Bᵀ``
    (exact, B being fixed during the pass), so it needs no accumulator of its own.
    ``b_out_grad`` is a :class:`GramAccumulator` for ``d_out <= EXACT_GRAM_MAX_DIMS`` and a
    :class:`SketchedGram` above (module docstring).
    ``grad_A``, ``grad_B``: ∂L/∂A, ∂L/∂B summed over batches. DoRA modules also keep ``m``,
    ``‖W0‖_row``, ``‖W0 + s B A‖_row`` and ``grad_m`` = ∂L/∂m summed (None for LoRA).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    a_out: GramAccumulator
    a_out_grad: GramAccumulator
    b_out_grad: GramAccumulator | SketchedGram
    grad_A: torch.Tensor
    grad_B: torch.Tensor
    magnitude: torch.Tensor | None = None
    base_row_norm: torch.Tensor | None = None
    adapted_row_norm: torch.Tensor | None = None
    grad_m: torch.Tensor | None = None
    #: quantity (``a_out``, ``a_out_grad``, ``b_out_grad``) -> speaker -> Gram of that
    #: speaker's frames, for the speaker band (None: no band; :meth:`keep_speakers`)
    by_speaker: dict[str, dict[str, GramAccumulator]] | None = None
    #: speaker -> that speaker's share of (∂L/∂A, ∂L/∂B), for the band of the gradient-norm
    #: ratio and dW_cos (None: no band; :meth:`keep_speakers`)
    grads_by_speaker: dict[str, list[torch.Tensor]] | None = None
    #: seconds spent on ∂L/∂b's speaker draws (logged as the pass's ``out_grad_band`` part)
    out_grad_band_s: float = 0.0

    def keep_speakers(self, out_grad: bool, gradients: bool = False) -> None:
        """Also accumulate per speaker (``out_grad``: ∂L/∂b too, else a and ∂L/∂a only;
        ``gradients``: each speaker's share of ∂L/∂A and ∂L/∂B)."""
        self.by_speaker = {"a_out": {}, "a_out_grad": {}} | ({"b_out_grad": {}} if out_grad else {})
        self.grads_by_speaker = {} if gradients else None

    def add_speaker_gradients(self, row_speakers, x, code, code_grad, out_grad) -> None:
        """Each speaker's share of a batch's factor gradients, from its rows (utterances) at
        every frame position (the weight gradient sums over all of them, as autograd's):
        ``∂L/∂A_s = Σ_{rows of s, t} g_a xᵀ`` and ``∂L/∂B_s = Σ g_b aᵀ`` (``a = A x``,
        ``b = B a``; ``lora_A`` and ``lora_B`` are linear maps without bias)."""
        if self.grads_by_speaker is None:
            return
        row_speakers = np.asarray(row_speakers)
        for speaker in np.unique(row_speakers):
            rows = torch.as_tensor(np.flatnonzero(row_speakers == speaker), device=code.device)
            g_a, g_b = code_grad[rows].double(), out_grad[rows].double()
            shares = (
                torch.einsum("btr,btd->rd", g_a, x[rows].double()).cpu(),
                torch.einsum("bto,btr->or", g_b, code[rows].double()).cpu(),
            )
            kept = self.grads_by_speaker.setdefault(str(speaker), [0.0, 0.0])
            kept[0], kept[1] = kept[0] + shares[0], kept[1] + shares[1]

    def gradient_draws(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``scalar_draws/{q}`` for ``q`` in ``grad_norm_ratio_B_A``, ``dW_cos``: the values
        of the sample re-drawn by speaker (:func:`gradient_draws`; speakers in sorted order,
        as :meth:`speaker_draws`)."""
        if not self.grads_by_speaker:
            return {}
        speakers = sorted(self.grads_by_speaker)
        if len(speakers) != np.asarray(weights).shape[1]:
            raise ValueError(
                f"{len(speakers)} speakers have gradients, the draws weigh {np.shape(weights)[1]}"
            )
        grad_A = torch.stack([self.grads_by_speaker[k][0] for k in speakers])
        grad_B = torch.stack([self.grads_by_speaker[k][1] for k in speakers])
        draws = gradient_draws(grad_A, grad_B, self.A, self.B, weights)
        return {f"scalar_draws/{q}": v for q, v in draws.items()}

    def add_by_speaker(self, frame_speakers: np.ndarray, code, code_grad, out_grad) -> None:
        """One batch's audio frames (rows of ``code`` etc.), split by ``frame_speakers``."""
        if self.by_speaker is None:
            return
        blocks = {"a_out": code, "a_out_grad": code_grad, "b_out_grad": out_grad}
        for speaker in np.unique(frame_speakers):
            rows = torch.as_tensor(frame_speakers == speaker, device=code.device)
            for quantity, accs in self.by_speaker.items():
                block = blocks[quantity]
                accs.setdefault(str(speaker), GramAccumulator(block.shape[1])).add(block[rows])

    def speaker_draws(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Spectra of the sample re-drawn by speaker: ``weights`` ``(draws, speakers)`` (of
        :func:`serlens.stats.cluster_multiplicities`, speakers in sorted order) weight each
        speaker's Gram, column sums and frame count. Returns ``sv_draws/{q}`` and
        ``sv_centred_draws/{q}`` (``draws x len(σ)``) for the quantities kept (``b_out``
        from the A code's, as for the whole sample) and ``n_frames_draws``."""
        if not self.by_speaker:
            return {}
        out: dict[str, np.ndarray] = {}
        w = torch.as_tensor(weights, dtype=torch.float64)
        n_frames = None
        for quantity, accs in self.by_speaker.items():
            speakers = sorted(accs)
            if len(speakers) != w.shape[1]:
                raise ValueError(
                    f"{quantity}: {len(speakers)} speakers have frames, the draws weigh {w.shape[1]}"
                )
            # on the CPU, where the draws' weights are (the accumulators live on the device)
            grams = torch.stack([accs[k].gram for k in speakers]).cpu()
            totals = torch.stack([accs[k].total for k in speakers]).cpu()
            counts = torch.as_tensor([float(accs[k].n_rows) for k in speakers], dtype=torch.float64)
            names = [quantity] + (["b_out"] if quantity == "a_out" else [])
            sv = {q: [] for q in names}
            svc = {q: [] for q in names}
            if quantity == "b_out_grad":
                tic = time.perf_counter()
                sv_b, svc_b = _out_grad_draw_spectra(grams, totals, counts, w)
                self.out_grad_band_s += time.perf_counter() - tic
                out["sv_draws/b_out_grad"], out["sv_centred_draws/b_out_grad"] = sv_b, svc_b
                continue
            for row in w:
                gram = torch.einsum("s,sij->ij", row, grams)
                total, n = row @ totals, float(row @ counts)
                centred = gram - torch.outer(total, total) / n
                sv[quantity].append(gram_singular_values(gram))
                svc[quantity].append(gram_singular_values(centred))
                if quantity == "a_out":
                    sv["b_out"].append(product_singular_values(gram, self.B))
                    svc["b_out"].append(product_singular_values(centred, self.B))
            for q in names:
                out[f"sv_draws/{q}"] = np.stack(sv[q])
                out[f"sv_centred_draws/{q}"] = np.stack(svc[q])
            n_frames = (w @ counts).numpy()
        out["n_frames_draws"] = n_frames
        return out

    @classmethod
    def for_weights(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        b_out_grad: GramAccumulator | SketchedGram | None = None,
        magnitude: torch.Tensor | None = None,
        base_weight: torch.Tensor | None = None,
    ) -> ModuleAccumulators:
        """Accumulators for factors ``A``, ``B`` (default: an exact ∂L/∂b Gram); DoRA:
        ``magnitude`` m and the frozen ``base_weight`` W0 (``d_out x d_in``)."""
        r, d_out = A.shape[0], B.shape[0]
        dora = {}
        if magnitude is not None:
            if base_weight is None:
                raise ValueError("a DoRA module needs its base weight W0 for ‖W0 + s B A‖_row")
            W0 = base_weight.detach().to(torch.float64)
            dora = {
                "magnitude": magnitude.detach().to(torch.float64).clone(),
                "base_row_norm": _row_norms(W0),
                "adapted_row_norm": _row_norms(
                    W0 + scaling * B.detach().to(W0) @ A.detach().to(W0)
                ),
                "grad_m": torch.zeros_like(magnitude, dtype=torch.float64),
            }
        return cls(
            A=A.detach().clone(),
            B=B.detach().clone(),
            scaling=scaling,
            a_out=GramAccumulator(r),
            a_out_grad=GramAccumulator(r),
            b_out_grad=GramAccumulator(d_out) if b_out_grad is None else b_out_grad,
            grad_A=torch.zeros_like(A, dtype=torch.float64),
            grad_B=torch.zeros_like(B, dtype=torch.float64),
            **dora,
        )

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def add(self, code, code_grad, out_grad, grad_A, grad_B, grad_m=None) -> None:
        """One batch: audio frames of the code and of the gradients, and the weight gradients."""
        self.a_out.add(code)
        self.a_out_grad.add(code_grad)
        self.b_out_grad.add(out_grad)
        self.grad_A += grad_A
        self.grad_B += grad_B
        if self.grad_m is not None:
            self.grad_m += grad_m

    def b_out_singular_values(self, centred: bool = False) -> np.ndarray:
        if self.a_out.gram is None:
            return np.zeros(0)
        gram = self.a_out.centred_gram() if centred else self.a_out.gram
        return product_singular_values(gram, self.B)

    def spectra(self, centred: bool = False) -> dict[str, np.ndarray]:
        """Singular values of the four frames x dims matrices (of :data:`SPECTRA`)."""
        return {
            "a_out": self.a_out.singular_values(centred),
            "b_out": self.b_out_singular_values(centred),
            "a_out_grad": self.a_out_grad.singular_values(centred),
            "b_out_grad": self.b_out_grad.singular_values(centred),
        }

    def scalars(self) -> dict[str, float]:
        """Gradient norms, their ratio, the ΔW comparison, the number of frames and the rows of
        the ∂L/∂b sketch (0: exact Gram); DoRA modules add :data:`DORA_SCALARS`."""
        values = {
            "grad_norm_A": float(torch.linalg.matrix_norm(self.grad_A)),
            "grad_norm_B": float(torch.linalg.matrix_norm(self.grad_B)),
        }
        values["grad_norm_ratio_B_A"] = (
            values["grad_norm_B"] / values["grad_norm_A"] if values["grad_norm_A"] > 0 else math.nan
        )
        values.update(delta_w_comparison(self.grad_A, self.grad_B, self.A, self.B, self.scaling))
        values["n_frames"] = float(self.a_out.n_rows)
        values["b_out_grad_sketch_rows"] = float(
            self.b_out_grad.sketch_rows if isinstance(self.b_out_grad, SketchedGram) else 0
        )
        if self.is_dora:
            values.update(self.magnitude_scalars())
        return values

    def magnitude_scalars(self) -> dict[str, float]:
        """DoRA's magnitude (:data:`DORA_SCALARS`; formulas in the module docstring)."""
        m, base, adapted = self.magnitude, self.base_row_norm, self.adapted_row_norm
        base_norm = float(torch.linalg.vector_norm(base))
        rel = float(torch.linalg.vector_norm(m - base)) / base_norm if base_norm > 0 else math.nan
        safe = torch.where(adapted > 0, adapted, torch.ones_like(adapted))
        gain = torch.where(adapted > 0, m / safe, torch.full_like(m, math.nan))
        return {
            "magnitude_norm": float(torch.linalg.vector_norm(m)),
            "magnitude_rel_change": rel,
            "magnitude_gain_rms": float((gain - 1.0).pow(2).mean().sqrt()),
            "grad_norm_m": float(torch.linalg.vector_norm(self.grad_m)),
        }


@dataclass
class StateAccumulators:
    modules: dict[str, ModuleAccumulators]
    reservoir: FrameReservoir


@dataclass
class PaperPass:
    """What the pass adds for the paper's estimator (module docstring, "Claim 3's CKA quantities").

    ``sample``: the :class:`~serlens.analysis.ab_cka.FlatGramSample` of the paper's
    utterances. ``sources[state name] = role``: the states of the pass whose codes (and
    gradients, for states with a backward) are offered under that role
    (:data:`~serlens.analysis.ab_cka.PAPER_ROLES`). ``backward`` / ``forward``: the paper's
    baseline and its second draw where no state of the pass is them: run on each batch's
    paper utterances only, one forward and backward (loss ``Σ_u CE_u``) or one forward.
    ``scale``: the pass's loss divisor ``N`` (its gradient rows times ``N`` are the paper's
    per-utterance ``∂CE_u/∂·``). ``own``: the (trained, paper, paper_pair) states when the
    estimator runs in a pass of its own on its utterances padded to 30 s
    (``analysis.paper_estimator_input: pad30`` for a ``crop`` run; :func:`_paper_own_pass`),
    in which case the main pass offers it nothing.
    """

    sample: FlatGramSample
    sources: dict[str, str]
    backward: AdapterState | None = None
    forward: AdapterState | None = None
    scale: float = 1.0
    own: tuple[AdapterState, AdapterState, AdapterState] | None = None

    def heads(self) -> list[nn.Module]:
        return [] if self.backward is None else [self.backward.head]

    def offer(self, role: str, idx, rows, lengths, parts: dict, scale: float) -> None:
        """Rows ``rows`` of a batch: ``parts[module]`` holds ``code`` and, with a backward,
        ``code_grad`` and ``out_grad`` (``batch x frames x dims``)."""
        blocks = {}
        for name, part in parts.items():
            blocks[(role, name, "a_code")] = part["code"][rows]
            if "code_grad" in part:
                blocks[(role, name, "a_out_grad")] = part["code_grad"][rows] * scale
                blocks[(role, name, "b_out_grad")] = part["out_grad"][rows] * scale
        self.sample.offer(np.asarray(idx)[rows.cpu().numpy()], lengths, blocks)


def _paper_rows(paper: PaperPass | None, idx, batch: MelBatch):
    """(rows of the batch in the paper's sample, frames kept of each) or None.

    ``pad30``: every frame (1500; what the paper flattens); ``crop``: the frames the clip
    occupies (``attended``, a prefix), zero-padded later to the sample's longest."""
    if paper is None:
        return None
    keep = [i for i, u in enumerate(np.asarray(idx).tolist()) if u in paper.sample.members]
    if not keep:
        return None
    rows = torch.as_tensor(keep, dtype=torch.long, device=batch.mel.device)
    return rows, _paper_lengths(batch)[rows.cpu()]


def _sub_batch(batch: MelBatch, rows: torch.Tensor) -> MelBatch:
    key = None if batch.key_mask is None else batch.key_mask[rows]
    return MelBatch(batch.mel[rows], batch.frame_mask[rows], batch.policy, key)


def _paper_backward(run, modules, taps, paper: PaperPass, state, role, batch, targets, idx) -> None:
    """One forward and backward of ``state`` on ``batch`` (every row one of the paper's
    utterances ``idx``), its rows offered under ``role``. Loss ``Σ_u CE_u``: each
    utterance's rows are its own ``∂CE_u/∂·``, the paper's batch of one."""
    _load_adapters(modules, state)
    taps.clear()
    out = run_encoder(run.encoder, batch)
    logits = state.head(masked_mean(out.last_hidden_state, out.frame_mask))
    loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    rows = torch.arange(len(idx), device=batch.mel.device)
    paper.offer(role, idx, rows, _paper_lengths(batch), taps.gradients(loss), 1.0)
    del out, logits, loss
    taps.clear()


def _paper_forward(run, modules, taps, paper: PaperPass, state, batch, idx) -> None:
    """One forward of ``state`` (the paper's second draw) on ``batch``, its codes offered."""
    _load_adapters(modules, state)
    taps.clear()
    with torch.no_grad():
        run_encoder(run.encoder, batch)
    codes = {name: {"code": taps.captured[(name, "a")]} for name in modules}
    rows = torch.arange(len(idx), device=batch.mel.device)
    paper.offer("paper_pair", idx, rows, _paper_lengths(batch), codes, 1.0)
    taps.clear()


def _paper_lengths(batch: MelBatch) -> torch.Tensor:
    """Frames kept of each row (:func:`_paper_rows`): all 1500 under ``pad30``, else the
    frames each clip occupies."""
    if batch.policy == "pad30":
        return torch.full((batch.mel.shape[0],), batch.n_frames)
    return batch.attended.sum(dim=1).cpu()


def _paper_extra(run, modules, taps, paper: PaperPass, batch, targets, idx, chosen) -> None:
    """The paper's baseline (and its second draw) on the batch's paper utterances, where
    no state of the pass is them."""
    rows, _ = chosen
    sub = _sub_batch(batch, rows)
    sub_idx = np.asarray(idx)[rows.cpu().numpy()]
    if paper.backward is not None:
        _paper_backward(
            run, modules, taps, paper, paper.backward, "paper", sub, targets[rows], sub_idx
        )
    if paper.forward is not None:
        _paper_forward(run, modules, taps, paper, paper.forward, sub, sub_idx)


def _paper_own_pass(run: TrainedRun, paper: PaperPass, batch_size: int) -> None:
    """The paper's estimator on its own utterances padded to 30 s (module docstring, "Claim
    3's CKA quantities"): per batch, the trained state and the paper's baseline one forward
    and backward each (:func:`_paper_backward`), its second draw one forward; every one of
    the 1500 frames of each utterance is offered (padding included, as the paper's code
    flattens them). The head reads the run's own pooling (the audio frames' mean): only the
    statistics see the padding."""
    trained, base, second = paper.own
    modules = dict(sorted(run.lora_modules().items()))
    train = run.splits["train"]
    device = next(run.encoder.parameters()).device
    labels = torch.as_tensor(train.labels)
    chosen = np.array(sorted(paper.sample.members), dtype=np.int64)
    with (
        _adapters_restored(run),
        _gradients_through_adapters(run, [trained.head, base.head]),
        AdapterTaps(modules) as taps,
    ):
        for idx, batch in run.batches(train, batch_size, chosen, policy="pad30"):
            batch = batch.to(device)
            targets = labels[torch.as_tensor(idx)].to(device)
            for role, state in (("trained", trained), ("paper", base)):
                _paper_backward(run, modules, taps, paper, state, role, batch, targets, idx)
            _paper_forward(run, modules, taps, paper, second, batch, idx)


def reservoir_cka_band(code, grad, speakers, estimate: float) -> dict[str, float]:
    """``cka_a_code_vs_b_out_grad_band_low/high``: the 95 % speaker-jackknife interval of the
    reservoir's linear CKA (:func:`serlens.analysis.ab_cka.jackknife_interval`; each speaker's
    sampled frames left out in turn); nothing with fewer than 3 speakers in the reservoir."""
    labels = np.unique(speakers)
    if len(labels) < 3:
        return {}
    held = [
        linear_cka(code[speakers != k], grad[speakers != k])
        if int((speakers != k).sum()) >= 2
        else math.nan
        for k in labels
    ]
    low, high = jackknife_interval(estimate, held)
    return {"cka_a_code_vs_b_out_grad_band_low": low, "cka_a_code_vs_b_out_grad_band_high": high}


def _module_accumulators(
    module: nn.Module,
    name: str,
    state: AdapterState,
    sketch: GaussianFrameSketch,
    exact_max_dims: int,
) -> ModuleAccumulators:
    A, B = state.weights[name]
    d_out = B.shape[0]
    wide = SketchedGram(d_out, sketch) if d_out > exact_max_dims else None
    magnitude = state.magnitudes.get(name)
    return ModuleAccumulators.for_weights(
        A,
        B,
        _factors(module)[2],
        b_out_grad=wide,
        magnitude=magnitude,
        base_weight=None if magnitude is None else _base_weight(module),
    )


def _speaker_of(run: TrainedRun, indices) -> dict[int, str] | None:
    """:func:`_sample_speakers` as training index -> speaker (None: no band)."""
    speakers = _sample_speakers(run, indices)
    if speakers is None:
        return None
    return dict(zip(np.asarray(indices).tolist(), speakers.tolist(), strict=True))


def _sample_speakers(run: TrainedRun, indices) -> np.ndarray | None:
    """The speaker of each sample utterance (training split positions ``indices``), or None
    when the run has no speakers or the sample fewer than 2 (no band)."""
    by_utt = getattr(run, "speakers", None)
    if not by_utt:
        return None
    utt_ids = run.splits["train"].utt_ids
    speakers = np.array([str(by_utt[utt_ids[int(i)]]) for i in np.asarray(indices)], dtype=object)
    return speakers if len(set(speakers.tolist())) >= 2 else None


def stream_ab_statistics(
    run: TrainedRun,
    states: list[AdapterState],
    indices: np.ndarray,
    batch_size: int,
    reservoir_frames: int,
    seed: int,
    exact_max_dims: int = EXACT_GRAM_MAX_DIMS,
    sketch_rows: int = WIDE_SKETCH_ROWS,
    frame_sample: UtteranceFrameSample | None = None,
    forward_only: tuple[AdapterState, ...] = (),
    paper: PaperPass | None = None,
    out_grad_band: bool = False,
) -> dict[str, StateAccumulators]:
    """One log-mel per batch, then per state one forward + backward; per-module accumulators.

    ``out_grad_band`` (``analysis.out_grad_band``): ∂L/∂b's speaker band too (per-speaker
    d_out x d_out Grams, while they take at most :data:`OUT_GRAD_BAND_MAX_BYTES` in all;
    modules with a sketched ∂L/∂b have none). Module docstring, "Speaker band".

    Loss = mean cross-entropy of ``head(masked_mean(last_hidden_state))`` over the sample
    (the forward of ``LoraEmotionModel``; no class weights: the sample is balanced).
    Activations and their gradients count only frames that hold audio; every gradient is
    autograd's through the module's own forward (:class:`AdapterTaps`; LoRA and DoRA alike).
    Each state's reservoir (``reservoir_frames``) uses the same seed, so both sample the
    same frames. ∂L/∂b of modules wider than ``exact_max_dims`` goes into a
    :class:`SketchedGram` of ``sketch_rows`` rows; one :class:`GaussianFrameSketch` (seeded
    by ``seed``) serves every module and state, so all share the same ``Ω``.

    ``frame_sample``: if given, every state offers it the code ``a``, ``∂L/∂a`` and ``∂L/∂b``
    of each module per batch (keys ``(state, module, "a_code" | "a_out_grad" |
    "b_out_grad")``), and each of ``forward_only`` (states with no accumulators) runs one
    forward without gradients and offers its codes; the sample is pruned after each batch.
    ``paper``: the paper's estimator (:class:`PaperPass`): on each batch with utterances of
    its sample, the states it names offer their rows, then its own states run on those
    utterances only.
    """
    modules = dict(sorted(run.lora_modules().items()))
    names = list(modules)
    train = run.splits["train"]
    device = next(run.encoder.parameters()).device
    sketch = GaussianFrameSketch(sketch_rows, seed)
    acc = {
        state.name: StateAccumulators(
            {
                name: _module_accumulators(modules[name], name, state, sketch, exact_max_dims)
                for name in names
            },
            FrameReservoir(reservoir_frames, seed),
        )
        for state in states
    }
    labels = torch.as_tensor(train.labels)
    by_utt = _speaker_of(run, indices)
    if by_utt is not None:  # module docstring, "Speaker band"
        n_speakers = len(set(by_utt.values()))
        exact = [
            m.B.shape[0]
            for state_acc in acc.values()
            for m in state_acc.modules.values()
            if isinstance(m.b_out_grad, GramAccumulator)
        ]
        out_grad_bytes = 8 * n_speakers * sum(d * d for d in exact)
        if out_grad_band and out_grad_bytes > OUT_GRAD_BAND_MAX_BYTES:
            log.warning(
                "analysis.out_grad_band: %d speakers' ∂L/∂b Grams would take %.1f GiB (more "
                "than %.1f): no speaker band for ∂L/∂b's energy ranks",
                n_speakers,
                out_grad_bytes / 2**30,
                OUT_GRAD_BAND_MAX_BYTES / 2**30,
            )
        keep_out_grad = out_grad_band and out_grad_bytes <= OUT_GRAD_BAND_MAX_BYTES
        for state_acc in acc.values():
            for name, m_acc in state_acc.modules.items():
                size = 8 * n_speakers * (m_acc.A.numel() + m_acc.B.numel())
                m_acc.keep_speakers(
                    out_grad=keep_out_grad and isinstance(m_acc.b_out_grad, GramAccumulator),
                    gradients=size <= GRAD_BAND_MAX_BYTES,
                )
                if size > GRAD_BAND_MAX_BYTES:
                    log.warning(
                        "%s: %d speakers' shares of ∂L/∂A and ∂L/∂B would take %.0f MiB "
                        "(more than %.0f): no speaker band for its gradient-norm ratio and dW_cos",
                        name,
                        n_speakers,
                        size / 2**20,
                        GRAD_BAND_MAX_BYTES / 2**20,
                    )
        speaker_index = {k: i for i, k in enumerate(sorted(set(by_utt.values())))}
    with (
        _adapters_restored(run),
        _gradients_through_adapters(
            run, [s.head for s in states] + ([] if paper is None else paper.heads())
        ),
        AdapterTaps(modules) as taps,
    ):
        for idx, batch in run.batches(train, batch_size, indices):
            batch = batch.to(device)
            targets = labels[torch.as_tensor(idx)].to(device)
            mask = batch.frame_mask
            chosen = _paper_rows(paper, idx, batch)
            frame_speakers = row_speakers = None
            if by_utt is not None:  # the speaker of every audio frame, in ``x[mask]`` order
                rows_of = mask.nonzero(as_tuple=True)[0].cpu().numpy()
                row_speakers = np.array([by_utt[int(i)] for i in np.asarray(idx)])
                frame_speakers = row_speakers[rows_of]
            for state in states:
                _load_adapters(modules, state)
                taps.clear()
                out = run_encoder(run.encoder, batch)
                logits = state.head(masked_mean(out.last_hidden_state, out.frame_mask))
                loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / len(
                    indices
                )
                grads = taps.gradients(loss)
                state_acc = acc[state.name]
                offered = {}
                for name in names:
                    g = grads[name]
                    code = g["code"][mask]
                    out_grad = g["out_grad"][mask]
                    state_acc.modules[name].add(
                        code,
                        g["code_grad"][mask],
                        out_grad,
                        g["grad_A"],
                        g["grad_B"],
                        g.get("grad_m"),
                    )
                    if frame_speakers is not None:
                        state_acc.modules[name].add_by_speaker(
                            frame_speakers, code, g["code_grad"][mask], out_grad
                        )
                        state_acc.modules[name].add_speaker_gradients(
                            row_speakers, g["x"], g["code"], g["code_grad"], g["out_grad"]
                        )
                    offered[(name, "a_code")] = code
                    offered[(name, "b_out_grad")] = out_grad
                if frame_speakers is not None:  # a key of its own: the sampled frames' speakers
                    row_index = [float(speaker_index[k]) for k in row_speakers]
                    offered[("speaker",)] = torch.as_tensor(row_index, device=mask.device)[
                        torch.as_tensor(rows_of, device=mask.device)
                    ][:, None]
                state_acc.reservoir.offer(offered)
                if chosen is not None and state.name in paper.sources:
                    paper.offer(paper.sources[state.name], idx, *chosen, grads, paper.scale)
                if frame_sample is not None:
                    frame_sample.offer(
                        idx,
                        mask,
                        {
                            (state.name, name, key): grads[name][part]
                            for name in names
                            for key, part in (
                                ("a_code", "code"),
                                ("a_out_grad", "code_grad"),
                                ("b_out_grad", "out_grad"),
                            )
                        },
                    )
                del out, logits, loss, grads, offered
                taps.clear()
            if frame_sample is not None:
                for state in forward_only:
                    _load_adapters(modules, state)
                    taps.clear()
                    with torch.no_grad():
                        run_encoder(run.encoder, batch)
                    frame_sample.offer(
                        idx,
                        mask,
                        {
                            (state.name, name, "a_code"): taps.captured[(name, "a")]
                            for name in names
                        },
                    )
                    if chosen is not None and state.name in paper.sources:
                        codes = {name: {"code": taps.captured[(name, "a")]} for name in names}
                        paper.offer(paper.sources[state.name], idx, *chosen, codes, 1.0)
                    taps.clear()
                frame_sample.prune()
            if chosen is not None and (paper.backward is not None or paper.forward is not None):
                _paper_extra(run, modules, taps, paper, batch, targets, idx, chosen)
    return acc


# --------------------------------------------------------------------------- stored statistics


def _check_run(run: TrainedRun, indices) -> None:
    if not run.lora_modules():
        raise ValueError(
            f"{run.model}/{run.method}/fold{run.fold}: no LoRA modules; A/B dynamics apply to "
            "LoRA runs only (DoRA included)"
        )
    if len(indices) == 0:
        raise ValueError(f"{run.model}/{run.method}/fold{run.fold}: the training sample is empty")


def ab_statistics(
    run: TrainedRun,
    indices: np.ndarray,
    batch_size: int,
    baseline: str,
    seed: int,
    init_std: float | None = None,
    cka_max_frames: int = CKA_MAX_FRAMES,
    exact_max_dims: int = EXACT_GRAM_MAX_DIMS,
    sketch_rows: int = WIDE_SKETCH_ROWS,
    claim3_frames: int = CLAIM3_TARGET_FRAMES,
    paper_per_class: int = PAPER_PER_CLASS,
    paper_input: str = "run",
    out_grad_band: bool = False,
) -> dict[str, torch.Tensor]:
    """Everything the ``ab_dynamics`` table needs, with no post-hoc setting applied.

    ``baseline`` and ``init_std``: the untrained baseline (:func:`untrained_state`). Keys
    ``{state}/{module}/sv/{quantity}`` and ``{state}/{module}/sv_centred/{quantity}``: the
    singular values of each activation and gradient matrix, uncentred and centred (energy
    ranks are taken from them at any ``energy_fraction``), and ``{state}/{module}/{scalar}``:
    the gradient norms, the ΔW comparison, the CKA, ``n_frames``,
    ``b_out_grad_sketch_rows`` and, for DoRA modules, :data:`DORA_SCALARS`. ``{module}`` is
    the adapted module's name in the encoder (``layers.3.fc1``): one per module and layer, so
    several targets per layer and a subset of the layers (``layers_to_transform``) each keep
    their own keys. ``cka_max_frames``: the reservoir's size; ``exact_max_dims``: the widest
    ∂L/∂b with an exact Gram, ``sketch_rows`` the sketch of wider ones (module docstring).
    ``claim3_frames``: the least frames of claim 3's utterance sample (:data:`CLAIM3_SCALARS`,
    keys ``{state}/{module}/{quantity}``); 0 leaves them out (and the second untrained draw).
    ``paper_per_class``: utterances per class of the paper's estimator (:data:`PAPER_SCALARS`;
    runs of fold :data:`~serlens.analysis.ab_cka.PAPER_FOLD` only; 0 leaves it out;
    :func:`paper_plan`). ``paper_input`` (``analysis.paper_estimator_input``): ``run`` = the
    estimator reads the pass's own batches (the run's input policy); ``pad30`` = its
    utterances padded to 30 s, every frame flattened (a pass of its own for a ``crop`` run:
    :func:`_paper_own_pass`). ``paper_cka_pad30`` says which the rows are (1 = 30-s padding).
    """
    if paper_input not in PAPER_INPUTS:
        raise ValueError(
            f"analysis.paper_estimator_input must be one of {', '.join(PAPER_INPUTS)}, "
            f"not {paper_input!r}"
        )
    _check_run(run, indices)
    states = [trained_state(run), untrained_state(run, baseline, seed, init_std)]
    pair: tuple[AdapterState, ...] = ()
    sample = None
    if claim3_frames > 0:
        second = untrained_state(run, baseline, pair_seed(seed), init_std)
        pair = (AdapterState("untrained_pair", second.head, second.weights, second.magnitudes),)
        sample = UtteranceFrameSample(indices, claim3_frames, seed)
    own_pass = paper_input == "pad30" and run.policy != "pad30"
    paper = paper_plan(
        run, indices, states, pair, baseline, init_std, seed, paper_per_class, own_pass
    )
    acc = stream_ab_statistics(
        run,
        states,
        indices,
        batch_size,
        cka_max_frames,
        seed,
        exact_max_dims,
        sketch_rows,
        frame_sample=sample,
        forward_only=pair,
        paper=paper,
        out_grad_band=out_grad_band,
    )
    if paper is not None and paper.own is not None:
        _paper_own_pass(run, paper, batch_size)
    by_utt = _speaker_of(run, indices)
    out = {}
    if paper is not None and paper.sample.selected():
        padded = float(run.policy == "pad30" or paper.own is not None)
        for name in acc["trained"].modules:
            out[f"trained/{name}/paper_cka_pad30"] = torch.tensor(padded, dtype=torch.float64)
            r, d_out = (
                acc["trained"].modules[name].A.shape[0],
                acc["trained"].modules[name].B.shape[0],
            )
            values = paper_cka(paper.sample, name, {"a": r, "b": d_out}, speakers=by_utt)
            for state, named in values.items():
                for key, value in named.items():
                    out[f"{state}/{name}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    if sample is not None:
        for name in acc["trained"].modules:
            factors = {s.name: s.weights[name][1] for s in (*states, *pair)}
            for state, values in claim3_cka(sample, name, factors, speakers=by_utt).items():
                for key, value in values.items():
                    out[f"{state}/{name}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    band_s = 0.0
    for state, state_acc in acc.items():
        for name, m_acc in state_acc.modules.items():
            for kind, centred in (("sv", False), ("sv_centred", True)):
                for quantity, sv in m_acc.spectra(centred).items():
                    out[f"{state}/{name}/{kind}/{quantity}"] = torch.from_numpy(
                        np.ascontiguousarray(sv)
                    )
            if m_acc.by_speaker:
                n_speakers = len(m_acc.by_speaker["a_out"])
                weights = cluster_multiplicities(n_speakers, BAND_RESAMPLES, seed)
                draws = m_acc.speaker_draws(weights) | m_acc.gradient_draws(weights)
                for key, values in draws.items():
                    out[f"{state}/{name}/{key}"] = torch.from_numpy(
                        np.ascontiguousarray(values, dtype=np.float64)
                    )
                band_s += m_acc.out_grad_band_s
            scalars = m_acc.scalars()
            code = state_acc.reservoir.sample((name, "a_code"))
            grad = state_acc.reservoir.sample((name, "b_out_grad"))
            scalars["cka_a_code_vs_b_out_grad"] = (
                linear_cka(code, grad) if code.shape[0] >= 2 else math.nan
            )
            if ("speaker",) in state_acc.reservoir.buffers:
                who = state_acc.reservoir.sample(("speaker",))[:, 0]
                scalars |= reservoir_cka_band(code, grad, who, scalars["cka_a_code_vs_b_out_grad"])
            for key, value in scalars.items():
                out[f"{state}/{name}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    if band_s:
        from serlens.analysis.passes import PART_LINE

        log.info(PART_LINE, "out_grad_band", band_s)
    return out


def paper_plan(
    run: TrainedRun,
    indices,
    states: list[AdapterState],
    pair: tuple[AdapterState, ...],
    baseline: str,
    init_std: float | None,
    seed: int,
    per_class: int = PAPER_PER_CLASS,
    own_pass: bool = False,
) -> PaperPass | None:
    """The paper's estimator for ``run`` (:class:`PaperPass`), or None: only in fold
    :data:`~serlens.analysis.ab_cka.PAPER_FOLD` (the paper's protocol) and with ``per_class > 0``.

    Sample: :func:`~serlens.analysis.ab_cka.paper_utterances` of the analysis sample
    (``per_class`` per class, seeded by ``seed``). Roles: ``trained`` is the pass's trained
    state (rows of its forward and backward). ``paper`` is :func:`paper_state` at the
    paper's std 0.02 seeded by ``seed`` and ``paper_pair`` the same at ``pair_seed(seed)``:
    with ``untrained_baseline: paper`` at that std they are the pass's own untrained state
    and second draw (their rows are reused: no extra encoder work); otherwise they run on
    the paper's utterances only (one forward and backward, one forward). B outputs come
    from the codes (``b_feat = a Rᵀ``, ``B = QR``). ``own_pass``: all three roles run in
    :func:`_paper_own_pass` on 30-s padded input instead (nothing reused from the pass).
    """
    if per_class <= 0 or int(run.fold) != PAPER_FOLD:
        return None
    chosen = paper_utterances(indices, run.splits["train"].labels, seed, per_class)
    if len(chosen) == 0:
        return None
    reuse = baseline == "paper" and init_std is not None and float(init_std) == PAPER_INIT_STD
    sources = {"trained": "trained"}
    backward = forward = None
    if reuse:
        sources[states[1].name] = "paper"
        paper = states[1]
    else:
        paper = backward = _renamed(paper_state(run, PAPER_INIT_STD, seed), "paper")
    if reuse and pair:
        sources[pair[0].name] = "paper_pair"
        second = pair[0]
    else:
        second = forward = _renamed(paper_state(run, PAPER_INIT_STD, pair_seed(seed)), "paper_pair")
    derived = {}
    for role, state in (("trained", states[0]), ("paper", paper), ("paper_pair", second)):
        for name, (_, B) in state.weights.items():
            R = torch.linalg.qr(B.detach().to("cpu", torch.float64), mode="reduced").R
            derived[(role, name, "b_feat")] = ((role, name, "a_code"), R.T)
    sample = FlatGramSample(chosen, derived=derived, seed=seed)
    if own_pass:
        return PaperPass(sample, {}, own=(states[0], paper, second))
    return PaperPass(sample, sources, backward, forward, float(len(indices)))


def _renamed(state: AdapterState, name: str) -> AdapterState:
    return AdapterState(name, state.head, state.weights, state.magnitudes)


def write_ab_statistics(
    run: TrainedRun,
    indices,
    batch_size: int,
    baseline: str,
    seed: int,
    path,
    init_std: float | None = None,
    exact_max_dims: int = EXACT_GRAM_MAX_DIMS,
    sketch_rows: int = WIDE_SKETCH_ROWS,
    paper_input: str = "run",
    out_grad_band: bool = False,
) -> None:
    """:func:`ab_statistics` of any run with a peft adapter (LoRA or DoRA, any targets and
    layers) written to ``path`` (safetensors, atomically); metadata: ``n_layers``, the
    baseline, the reservoir size, ``exact_max_dims``, ``sketch_rows`` and the paper
    estimator's input (``paper_input``, :func:`ab_statistics`)."""
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = ab_statistics(
        run,
        indices,
        batch_size,
        baseline,
        seed,
        init_std,
        exact_max_dims=exact_max_dims,
        sketch_rows=sketch_rows,
        paper_input=paper_input,
        out_grad_band=out_grad_band,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    metadata = {
        "n_layers": str(len(run.encoder.layers)),
        "untrained_baseline": baseline,
        "untrained_init_std": "" if init_std is None or baseline != "paper" else str(init_std),
        "cka_max_frames": str(CKA_MAX_FRAMES),
        "claim3_frames": str(CLAIM3_TARGET_FRAMES),
        "paper_fold": str(PAPER_FOLD),
        "paper_per_class": str(PAPER_PER_CLASS),
        "paper_estimator_input": paper_input,
        "out_grad_band": str(bool(out_grad_band)).lower(),
        "exact_gram_max_dims": str(int(exact_max_dims)),
        "wide_sketch_rows": str(int(sketch_rows)),
    }
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _energy_values(sv: np.ndarray, n_frames: float, fraction: float, centred: bool):
    """(count, share of the largest possible rank) of one stored spectrum."""
    count = float(energy_rank(sv, fraction))
    if not np.isfinite(n_frames):
        return count, math.nan
    bound = max_rank(len(sv), int(n_frames), centred)
    return count, count / bound if bound > 0 else math.nan


#: Keys of the speaker band's stored draws (``{state}/{module}/{kind}...``).
DRAW_KINDS = ("sv_draws/", "sv_centred_draws/", "n_frames_draws", "scalar_draws/")
#: Suffixes of the band rows: ``{q}_frac_band_low`` etc.
BAND_SUFFIXES = ("_band_low", "_band_high")


def _share_bands(stored: dict[str, np.ndarray], fraction: float) -> dict[str, float]:
    """``{q}_frac_band_low/high`` and ``{q}_centred_frac_band_low/high``: the 2.5 and 97.5
    percentiles of the energy-rank share over the speaker draws (module docstring)."""
    out = {}
    for key, values in stored.items():  # scalars re-drawn by speaker: their percentiles
        if key.startswith("scalar_draws/") and np.isfinite(values).any():
            low, high = np.nanpercentile(values, [2.5, 97.5])
            q = key.removeprefix("scalar_draws/")
            out[f"{q}_band_low"], out[f"{q}_band_high"] = float(low), float(high)
    n_frames = stored.get("n_frames_draws")
    if n_frames is None:
        return out
    for q in SPECTRA:
        for kind, suffix, centred in (
            ("sv_draws/", "_frac", False),
            ("sv_centred_draws/", "_centred_frac", True),
        ):
            sv = stored.get(kind + q)
            if sv is None:
                continue
            shares = np.array(
                [
                    _energy_values(row, n, fraction, centred)[1]
                    for row, n in zip(sv, n_frames, strict=True)
                ]
            )
            low, high = (
                np.nanpercentile(shares, [2.5, 97.5])
                if np.isfinite(shares).any()
                else (np.nan, np.nan)
            )
            out[f"{q}{suffix}_band_low"], out[f"{q}{suffix}_band_high"] = float(low), float(high)
    return out


def ab_table_from_statistics(tensors: dict, n_layers: int, energy_fraction: float) -> pd.DataFrame:
    """The ``ab_dynamics.tsv`` table from :func:`ab_statistics` (columns :data:`TABLE_COLUMNS`).

    Per adapted module and state (trained, untrained): for every ``q`` of :data:`SPECTRA`
    the energy ranks ``q`` (uncentred count), ``q_centred`` (count, mean removed),
    ``q_frac`` and ``q_centred_frac`` (the counts over the largest rank the matrix can have,
    :func:`max_rank`); then :data:`SCALARS`, for DoRA modules :data:`DORA_SCALARS`, and
    claim 3's :data:`CLAIM3_SCALARS` where stored (the forward ones under state trained,
    their nulls under untrained, ``cka_bwd_ba`` under both) and its paper estimator's
    :data:`PAPER_SCALARS` (fold-1 runs).
    ``ratio`` rows (trained ÷ untrained) for :data:`RATIO_QUANTITIES` held by both states.
    Keys ``module`` (the adapted module's name), ``layer`` (from ``layers.<i>.`` in it) and
    ``depth = (layer + 1) / n_layers``. Statistics written before the centred spectra and the frame
    count were stored give the uncentred counts and the scalars only.
    """
    spectra: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    scalars: dict[str, dict[str, dict[str, float]]] = {}
    draws: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, tensor in tensors.items():
        state, rest = key.split("/", 1)
        kind = next((k for k in DRAW_KINDS if f"/{k}" in rest), None)
        if kind is not None:
            name, quantity = rest.split(f"/{kind}", 1)
            draws.setdefault(state, {}).setdefault(name, {})[kind + quantity] = np.asarray(
                tensor, dtype=np.float64
            )
            continue
        for kind in ("sv", "sv_centred"):
            if f"/{kind}/" in rest:
                name, quantity = rest.split(f"/{kind}/")
                spectra.setdefault(state, {}).setdefault(name, {})[f"{kind}/{quantity}"] = (
                    np.asarray(tensor, dtype=np.float64)
                )
                break
        else:
            name, quantity = rest.rsplit("/", 1)
            scalars.setdefault(state, {}).setdefault(name, {})[quantity] = float(np.asarray(tensor))
    values: dict[str, dict[str, dict[str, float]]] = {}
    for state, by_module in scalars.items():
        for name, named in by_module.items():
            n_frames = named.get("n_frames", math.nan)
            out = values.setdefault(state, {}).setdefault(name, {})
            stored = spectra.get(state, {}).get(name, {})
            for q in SPECTRA:
                count, share = _energy_values(stored[f"sv/{q}"], n_frames, energy_fraction, False)
                out[q] = count
                if f"sv_centred/{q}" in stored:
                    c_count, c_share = _energy_values(
                        stored[f"sv_centred/{q}"], n_frames, energy_fraction, True
                    )
                    out[f"{q}_centred"] = c_count
                    out[f"{q}_frac"], out[f"{q}_centred_frac"] = share, c_share
            out.update(
                {
                    q: named[q]
                    for q in (
                        *SCALARS,
                        *SCALAR_BANDS,
                        *DORA_SCALARS,
                        *CLAIM3_SCALARS,
                        *CLAIM3_BANDS,
                        *PAPER_SCALARS,
                        *PAPER_BANDS,
                    )
                    if q in named
                }
            )
            out.update(_share_bands(draws.get(state, {}).get(name, {}), energy_fraction))
    order = [
        *SPECTRA,
        *(f"{q}_centred" for q in SPECTRA),
        *(f"{q}_frac" for q in SPECTRA),
        *(f"{q}_centred_frac" for q in SPECTRA),
        *SCALARS,
        *SCALAR_BANDS,
        *DORA_SCALARS,
        *CLAIM3_SCALARS,
        *CLAIM3_BANDS,
        *PAPER_SCALARS,
        *PAPER_BANDS,
        *(
            f"{q}{suffix}{bound}"
            for q in SPECTRA
            for suffix in ("_frac", "_centred_frac")
            for bound in BAND_SUFFIXES
        ),
    ]
    rows = []
    for name in sorted(values["trained"]):
        layer = _layer_index(name)
        base = {"module": name, "layer": layer, "depth": (layer + 1) / n_layers}
        for state in ("trained", "untrained"):
            rows += [
                {**base, "quantity": q, "state": state, "value": values[state][name][q]}
                for q in order
                if q in values[state][name]
            ]
        for q in RATIO_QUANTITIES:
            if q not in values["trained"][name] or q not in values["untrained"][name]:
                continue
            t, u = values["trained"][name][q], values["untrained"][name][q]
            rows.append(
                {**base, "quantity": q, "state": "ratio", "value": t / u if u != 0 else math.nan}
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def ab_dynamics_table(
    run: TrainedRun,
    indices: np.ndarray,
    batch_size: int,
    energy_fraction: float,
    baseline: str,
    seed: int,
    init_std: float | None = None,
    cka_max_frames: int = CKA_MAX_FRAMES,
    exact_max_dims: int = EXACT_GRAM_MAX_DIMS,
    sketch_rows: int = WIDE_SKETCH_ROWS,
) -> pd.DataFrame:
    """The table (:func:`ab_table_from_statistics`) on the training utterances ``indices``,
    computed in memory (:func:`ab_statistics`), with the run's key columns left out."""
    tensors = ab_statistics(
        run,
        indices,
        batch_size,
        baseline,
        seed,
        init_std,
        cka_max_frames,
        exact_max_dims,
        sketch_rows,
    )
    return ab_table_from_statistics(tensors, len(run.encoder.layers), energy_fraction)


def baseline_settings(cfg) -> tuple[str, float | None]:
    """``(untrained_baseline, untrained_init_std or None)`` from settings that hold the
    std only for the ``paper`` baseline (what :func:`serlens.analysis.passes.pass_settings` passes)."""
    baseline = cfg["untrained_baseline"]
    return baseline, (float(cfg["untrained_init_std"]) if baseline == "paper" else None)


def compute_ab_dynamics(run: TrainedRun, cfg, seed: int) -> pd.DataFrame:
    """A/B activation and gradient dynamics of a LoRA or DoRA run on its training sample, in memory.

    The sample is ``balanced_sample(train labels, cfg["train_sample"], seed)``; the baseline
    ``cfg["untrained_baseline"]`` (and ``cfg["untrained_init_std"]`` for ``paper``). Rows:
    see :func:`ab_table_from_statistics`. ``grad_norm_A`` = ‖∂L/∂A‖_F, ``grad_norm_B`` =
    ‖∂L/∂B‖_F, ``grad_norm_ratio_B_A`` = their ratio; ``dW_from_A_norm`` = ‖s²BBᵀG‖_F,
    ``dW_from_B_norm`` = ‖s²GAᵀA‖_F, ``dW_cos``; ``cka_a_code_vs_b_out_grad`` (linear CKA
    on at most 2000 reservoir-sampled frames). Energy ranks and the CKA use audio frames
    only; the weight gradients are the exact gradients of the loss (under ``pad30`` padded
    frames are attended to, so they contribute there).
    """
    indices = balanced_sample(run.splits["train"].labels, cfg["train_sample"], seed)
    baseline, init_std = baseline_settings(cfg)
    return ab_dynamics_table(
        run, indices, cfg["batch_size"], cfg["energy_fraction"], baseline, seed, init_std
    )


# --------------------------------------------------------------------------- the workflow's analysis


def gradient_norm_ratio(long: pd.DataFrame, run_columns: list[str]) -> pd.DataFrame:
    """``quantity = grad_norm_ratio_B_A`` = ‖∂L/∂B‖_F / ‖∂L/∂A‖_F per run and state, for
    tables that do not hold it already (tables written before it was a row of their own)."""
    if "grad_norm_ratio_B_A" in set(long["quantity"]) or not {"grad_norm_A", "grad_norm_B"} <= set(
        long["quantity"]
    ):
        return long.iloc[:0]
    keys = [*run_columns, "module", "layer", "depth", "state"]
    states = long["state"].isin(["trained", "untrained"])  # not the trained/untrained ratio rows
    norm_a = long[states & (long["quantity"] == "grad_norm_A")].set_index(keys)["value"]
    norm_b = long[states & (long["quantity"] == "grad_norm_B")].set_index(keys)["value"]
    ratio = norm_b / norm_a.replace(0, np.nan)
    return ratio.dropna().reset_index().assign(quantity="grad_norm_ratio_B_A")


def _compute(run, settings) -> pd.DataFrame:
    from safetensors import safe_open

    path = run.path("ab")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        n_layers = int(handle.metadata()["n_layers"])
    return ab_table_from_statistics(tensors, n_layers, settings["energy_fraction"])


def _draw(tables, model, context):
    from serlens.report.figures import ab_dynamics_figure

    return ab_dynamics_figure(
        tables["ab_dynamics"],
        model,
        context["energy_fraction"],
        untrained_baseline=context["untrained_baseline"],
    )


def _draw_cka(tables, model, context):
    from serlens.report.figures import ab_cka_figure

    return ab_cka_figure(tables["ab_dynamics"], model)


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="ab_dynamics",
        compute=_compute,
        applies_to=lambda method: method.kind in ("lora", "dora"),
        reads=frozenset({"ab"}),
        keys=("energy_fraction",),
        table=TableSpec(
            ("module", "layer", "depth", "quantity", "state"), derive=gradient_norm_ratio
        ),
        figures=(
            FigureSpec(
                "ab_dynamics",
                _draw,
                ("ab_dynamics",),
                "A/B dynamics",
                keys=("energy_fraction", "untrained_baseline"),
            ),
            FigureSpec("ab_cka", _draw_cka, ("ab_dynamics",), "A/B dynamics"),
        ),
        doc="energy ranks (uncentred, centred, as shares of the possible rank), gradient norms "
        "and ΔW contributions of LoRA's (and DoRA's) A and B, DoRA's magnitude, trained vs a "
        "scale-matched untrained baseline; claim 3's debiased CKA of trained vs untrained A codes "
        "and B outputs (with an untrained-vs-untrained null) and of B's vs A's gradients, and "
        "in fold 1 the same by the paper's own estimator (linear/RBF CKA of 40 flattened "
        "utterances, the paper's baseline, its own null)",
    )


SPEC = _spec()
