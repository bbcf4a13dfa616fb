"""Read the run's trained head off every layer of the residual stream: the logit lens and a tuned lens.

Logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): for layer l = 0..L,
take each frame's residual state ``resid[l]`` (``resid[0]`` = conv stem + positions,
``resid[l]`` = output of block l), apply the encoder's final LayerNorm, mean-pool over the
frames that hold audio and apply the trained head::

    p_l = softmax(head(mean_t LN(resid[l]_t)))

At l = L, ``LN(resid[L])`` is ``last_hidden_state``, so ``p_L`` is the model's own output.

The paper's logit lens (``lens = paper_no_final_ln``; arXiv 2509.08454, one of its protocol
deviations). What its code does (github.com/harryporry77/Behind-the-Scenes,
``analysis_utils.logit_lens(nmodel, test_data)``, called in ``analysis.ipynb`` "Experiment 2:
Logit-len" on the fold-1 LoRA and frozen ``WhisperForAudioClassification`` models, each read
with its own head): one test utterance at a time, through an nnsight trace, it saves
``nmodel.encoder.layers[l].output[0]`` for l = 0..L-1, the output of block l + 1, i.e.
``resid[l + 1]`` here, taken *before* the encoder's final LayerNorm (``WhisperEncoder``
applies it once, after the last block); it never reads the embedding ``resid[0]``. Each
state is mean-pooled over time (``.mean(dim=1)``, over all 1500 frames: the
``WhisperFeatureExtractor`` pads every clip to 30 s and no mask is passed), then projected
(``nmodel.projector``) and classified (``nmodel.classifier``). Pooling before the linear
projector equals ``WhisperForAudioClassification.forward``'s project, pool, classify, and
:class:`serlens.train.heads.EmotionHead` also pools first, so the head is the same map. Its
reference ``final_logits`` = ``classifier(projector(mean_t last_hidden_state))`` is the
model's output, final LayerNorm included. Per layer it averages over utterances
``F.kl_div(layer_probs.log(), final_probs, reduction="batchmean")`` = ``KL(p_final ‖ p_l)``
(the KL here, same direction) and the argmax agreement with the final prediction
(``avg_overlaps``), which the notebook plots (``plot_kl``) against index 0..L-1 (layers 1..L
here); the layer logits and labels are returned too. Its ``test_data`` is every utterance
of the fold-1 test speaker. So its last reading, ``head(mean_t resid[L]_t)``, is not the
model's output: its last-layer KL is not 0 and its agreement need not be 1 (the final
LayerNorm rescales, shifts and re-weights the state the head reads). (The code indexes the
tuple a ``WhisperEncoderLayer`` returned in the transformers of its time; in transformers 5
the layer returns the tensor and ``[0]`` would take the first utterance.)

Here its reading is, for l = 1..L (the paper's layers; no row at layer 0)::

    p_l = softmax(head(mean_t resid[l]_t))

with the run's own head, pooled over the frames that hold audio like every other reading
here, and with the same metrics and reference ``p_L`` (the run's output) as the honest lens,
for every variant the honest lens reads. Only the final LayerNorm differs between the two
lenses: the paper's 30-s padding inside the mean is a deviation of its whole model, not of
its lens (``pad30_all_frames`` of :data:`serlens.methods.DEVIATIONS`), and is not added here.
The pooled states come from the encoder passes: ``pooled[:, :L]`` (``resid[0..L-1]``, never
normalised) and ``resid_last`` (pooled ``resid[L]``;
:func:`serlens.analysis.passes.raw_residual_states`); states of a pass older than
``resid_last`` give no paper rows (a warning says to rerun it).

Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): a per-layer affine translator ``T_l(x) = x + W_l x + b_l`` (``W_l`` D x D,
``b_l`` D; identity at initialisation, ``W_l = 0``, ``b_l = 0``) before the head,
``p_l = softmax(head(T_l(mean_t LN(resid[l]_t))))``; the last layer keeps the identity.
It is fitted (:func:`fit_tuned_lens`) on every training utterance of the fold to minimise
``Σ_l mean_n KL(p_L ‖ p_l) + l2 · Σ_l (‖W_l‖²_F + ‖b_l‖²)``, the penalty shrinking each
translator toward the identity (the logit lens), and early-stopped on the fold's dev
speakers. Where the pass stored only the fixed class-balanced training sample (an older
pass), it is fitted on that, without early stopping; ``fit_split`` says which (``train``,
``train_sample``; ``none`` on logit-lens rows). ``T_l`` is affine, so
``mean_t T_l(LN(resid[l]_t)) = T_l(mean_t LN(resid[l]_t))``: translating frames and
pooling equals translating the pooled state, and the lens is fitted on cached pooled states
(N x (L + 1) x D), which takes about a second for a few thousand utterances of tiny.en.

``l2`` (``analysis.tuned_lens_l2``, default 1e-2) was chosen by the dev KL on the default
run (tiny.en, synthetic corpus, the five frozen runs; 102 training, 34 dev and 34 test
utterances per fold; 200 steps, patience 5): dev KL summed over layers 0.403, 0.402,
0.396, 0.377, 0.379 for l2 = 0, 1e-4, 1e-3, 1e-2, 1e-1 (test KL 0.497, 0.496, 0.487,
0.454, 0.445; the old fit, 32 sampled utterances without penalty, 0.663). Refitted on
states perturbed by 1e-3 relative noise (about TF32's precision), the per-layer test KL
moved by at most 3.4e-4 (the old fit: 9.6e-4), so this perturbation alone does not explain
the 4e-2 CPU/GPU difference once measured (README); rerun ``bench/gpu_analyses.py``.

Per layer the table reports, on the fold's test utterances: UAR and WAR of ``argmax p_l``
against the labels, ``agreement`` = share of utterances where ``argmax p_l`` equals the
run's prediction ``argmax p_L``, ``kl`` = mean over utterances of ``KL(p_L ‖ p_l)`` (nats)
and ``entropy`` = mean of ``H(p_l)`` (nats). Tuned-lens rows add ``fit_kl``, the same KL on
the utterances the translators were fitted on, and ``dev_kl`` on the dev utterances where
it was early-stopped (compare with ``kl`` to see overfitting).

Per-speaker rows: ``war``, ``agreement``, ``kl`` and ``entropy`` are means over test
utterances, so the workflow's table holds one row per test speaker (``speaker``,
``n_utts``) whose ``n_utts``-weighted mean is the run's value, and the aggregated table
gets a 95 % band from resampling test speakers within folds
(:mod:`serlens.report.aggregate`). ``uar`` (a mean over classes of per-class recalls) is
not a weighted mean of per-speaker UARs, and ``fit_kl``/``dev_kl`` are not on test
utterances: those keep one row per run (``speaker`` empty, ``n_utts`` = the utterances
behind the value), which the aggregator averages over runs and gives no band.

``lens``: ``logit``, ``tuned``, ``paper_no_final_ln`` (above). ``variant``: ``adapted`` =
the run's LoRA encoder, ``base`` = the pre-trained encoder (for LoRA runs the same object
with its adapters disabled, read with the *same* trained head).
Frozen runs hold only ``base`` rows. The reference ``p_L`` is always the run's own output
(the adapted model's for LoRA runs), so in a LoRA table ``base`` rows at layer L show how
far the head's reading of the pre-trained encoder is from what the run predicts. The tuned
lens is fitted only for the encoder the run classifies with.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import pandas as pd
import torch
from torch import nn

from serlens.analysis.runs import balanced_sample
from serlens.metrics import uar
from serlens.models.encoder import masked_mean, run_encoder

__all__ = [
    "PAPER_LENS",
    "TunedLens",
    "affine_readout",
    "compute_logit_lens",
    "entropy",
    "fit_tuned_lens",
    "kl_divergence",
    "lens_metrics",
    "logit_lens",
    "pooled_lens_states",
    "pooled_normalised_states",
]

log = logging.getLogger(__name__)

TUNED_LENS_LR = 1e-3  # Adam's default (Kingma & Ba 2015); not tuned on any split
#: Defaults of ``analysis.tuned_lens_l2`` and ``analysis.tuned_lens_patience`` (the schema's).
TUNED_LENS_L2 = 1e-2
TUNED_LENS_PATIENCE = 5
TUNED_LENS_EVAL_EVERY = 10  # optimisation steps between two evaluations on dev
#: The ``lens`` of the paper's reading: the head on the pooled residual stream without the
#: encoder's final LayerNorm (module docstring), at layers 1..L.
PAPER_LENS = "paper_no_final_ln"
#: The first layer the paper's lens reads (the output of block 1; it skips the embedding).
PAPER_FIRST_LAYER = 1


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` in nats, p = softmax(reference), q = softmax(logits).

    Over the last axis, ``(..., C) -> (...)``; computed from log-softmax so that tiny
    probabilities do not produce ``0 · log 0`` problems. It is the tuned lens' objective with
    the model's final prediction as p (Belrose et al. 2023, eq. 2).
    """
    log_p = torch.log_softmax(reference_logits, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``H(p) = −Σ_c p_c log p_c`` in nats of p = softmax(logits), ``(..., C) -> (...)``; at most ``log C``."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def logit_lens(head: nn.Module, pooled_states: torch.Tensor) -> torch.Tensor:
    """The head applied to every layer's pooled, normalised state: ``(N, L + 1, D) -> (N, L + 1, C)`` logits."""
    if getattr(head, "n_layers", None) is not None:
        raise ValueError(
            "the logit lens reads one layer at a time; a weighted-sum head (n_layers set) has no per-layer reading"
        )
    return head(pooled_states)


class TunedLens(nn.Module):
    """Per-layer affine translators in front of a fixed head; the last layer stays the identity.

    ``translate(x)[:, l] = x[:, l] + x[:, l] W_lᵀ + b_l`` for l < L; calling the lens returns the
    head's logits ``(N, L + 1, C)``.
    """

    def __init__(self, head: nn.Module, n_layers: int, d_model: int):
        super().__init__()
        self.head = head
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def translate(self, pooled_states: torch.Tensor) -> torch.Tensor:
        inner, last = pooled_states[:, :-1], pooled_states[:, -1:]
        translated = inner + torch.einsum("nld,led->nle", inner, self.weight) + self.bias
        return torch.cat([translated, last], dim=1)

    def forward(self, pooled_states: torch.Tensor) -> torch.Tensor:
        return logit_lens(self.head, self.translate(pooled_states))


def affine_readout(head: nn.Module, d_model: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H, c)`` with ``head(x) = x Hᵀ + c`` if the head is affine (EmotionHead is: two Linear layers), else None."""
    with torch.no_grad():
        probe = torch.cat([torch.zeros(1, d_model), torch.eye(d_model)])
        out = head(probe)
        bias, weight = out[0], (out[1:] - out[0]).T
        x = torch.randn(4, d_model, generator=torch.Generator().manual_seed(0))
        if not torch.allclose(head(x), x @ weight.T + bias, rtol=1e-4, atol=1e-4):
            return None
    return weight, bias


def fit_tuned_lens(
    head: nn.Module,
    train_states: torch.Tensor,
    steps: int,
    dev_states: torch.Tensor | None = None,
    l2: float = TUNED_LENS_L2,
    patience: int = TUNED_LENS_PATIENCE,
    lr: float = TUNED_LENS_LR,
    eval_every: int = TUNED_LENS_EVAL_EVERY,
) -> TunedLens:
    """Fit the translators by full-batch Adam (the head stays fixed), early-stopped on dev.

    The objective on the N training states is (Belrose et al. 2023, "Eliciting Latent
    Predictions from Transformers with the Tuned Lens", eq. 2, plus an L2 penalty)::

        J(W, b) = Σ_{l<L} mean_n KL(p_L(x_n) ‖ p_l(x_n)) + l2 · Σ_{l<L} (‖W_l‖²_F + ‖b_l‖²)

    The translator is ``T_l(x) = (I + W_l) x + b_l``, so the penalty is ‖(I + W_l) − I‖²_F +
    ‖b_l‖²: it shrinks every translator toward the identity, i.e. the tuned lens toward the
    logit lens (l2 → ∞ gives the logit lens; l2 = 0 the unregularised fit). The KL is a mean
    over utterances, so ``l2`` does not depend on N.

    Early stopping: with ``dev_states`` the dev objective ``Σ_l mean_n KL`` (no penalty) is
    evaluated at step 0 (the identity) and every ``eval_every`` steps; the translators of the
    best evaluation are kept (ties keep the earlier, more regularised one), and the fit stops
    after ``patience`` evaluations without improvement, or after ``steps``. Without dev states
    all ``steps`` are taken and the last translators kept.

    Deterministic: identity initialisation, full batch, no sampling. Layers do not interact
    (each translator sees only its layer), so the sum fits each layer as if alone. The lens
    carries ``best_step`` (the step of the translators kept) and ``history`` (per evaluation:
    ``step``, ``fit_objective`` J on the training states, ``dev_kl``).

    For an affine head ``head(y) = H y + c`` the logits are computed as
    ``head(x) + x (H W_l)ᵀ + H b_l``, the same as ``head(T_l(x))`` at C·D² instead of
    N·D² cost per layer (C classes ≪ N utterances).
    """
    if l2 < 0:
        raise ValueError(f"l2: must be non-negative, got {l2}")
    n_layers, d_model = train_states.shape[1] - 1, train_states.shape[2]
    head = copy.deepcopy(head).requires_grad_(False)  # the run's head is left untouched
    lens = TunedLens(head, n_layers, d_model)
    readout = affine_readout(head, d_model)

    def prepared(states: torch.Tensor):
        # A normal tensor even if it was made under inference_mode (autograd cannot save
        # those); stored states (from numpy) are used as they are, not copied.
        if states.is_inference():
            states = states.clone()
        with torch.no_grad():
            target = logit_lens(head, states[:, -1:]).expand(-1, n_layers, -1)
            untranslated = logit_lens(head, states[:, :-1])
        return states, target, untranslated

    def translated_logits(states, untranslated) -> torch.Tensor:
        if readout is None:
            return lens(states)[:, :-1]
        weight = readout[0]
        through_head = torch.einsum("cd,lde->lce", weight, lens.weight)  # H W_l: (L, C, D)
        shift = lens.bias @ weight.T  # H b_l: (L, C)
        return untranslated + torch.einsum("nle,lce->nlc", states[:, :-1], through_head) + shift

    def objective(data) -> torch.Tensor:
        states, target, untranslated = data
        kl = kl_divergence(target, translated_logits(states, untranslated)).mean(dim=0).sum()
        if l2:
            kl = kl + l2 * (lens.weight.square().sum() + lens.bias.square().sum())
        return kl

    train = prepared(train_states)
    dev = prepared(dev_states) if dev_states is not None else None
    history: list[dict] = []
    best = (float("inf"), 0, None)  # dev KL, step, translators

    def evaluate(step: int) -> bool:
        """Record one evaluation; True if it is the best so far."""
        nonlocal best
        with torch.no_grad():
            fit = float(objective(train))
            dev_kl = (
                float(kl_divergence(dev[1], translated_logits(dev[0], dev[2])).mean(0).sum())
                if dev is not None
                else float("nan")
            )
        history.append({"step": step, "fit_objective": fit, "dev_kl": dev_kl})
        if dev is not None and dev_kl < best[0]:
            best = (dev_kl, step, (lens.weight.detach().clone(), lens.bias.detach().clone()))
            return True
        return False

    optimiser = torch.optim.Adam([lens.weight, lens.bias], lr=lr, fused=True)
    if dev is not None:
        evaluate(0)
    stale, step = 0, 0
    for step in range(1, steps + 1):
        optimiser.zero_grad()
        objective(train).backward()
        optimiser.step()
        if dev is not None and (step % eval_every == 0 or step == steps):
            stale = 0 if evaluate(step) else stale + 1
            if stale >= patience:
                break
    lens.requires_grad_(False)
    if dev is not None:
        with torch.no_grad():
            lens.weight.copy_(best[2][0])
            lens.bias.copy_(best[2][1])
        lens.best_step = best[1]
    else:
        evaluate(step)
        lens.best_step = step
    lens.history = history
    return lens


def pooled_normalised_states(encoder: nn.Module, batch) -> torch.Tensor:
    """``mean_t LN(resid[l]_t)`` over audio frames for l = 0..L: ``(B, L + 1, D)``; layer L is pooled ``last_hidden_state``."""
    return pooled_lens_states(encoder, batch)[0]


def pooled_lens_states(encoder: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normalised, residual)``, each ``(B, L + 1, D)``, from one encoder run: the masked
    means of ``LN(resid[l])`` (the honest lens' input) and of ``resid[l]`` itself (the
    paper's, no final LayerNorm) for l = 0..L."""
    out = run_encoder(encoder, batch)
    normalised = [encoder.layer_norm(resid) for resid in out.resid[:-1]] + [out.last_hidden_state]
    pool = [masked_mean(s, out.frame_mask) for s in (*normalised, *out.resid)]
    n = len(out.resid)
    return torch.stack(pool[:n], dim=1), torch.stack(pool[n:], dim=1)


#: Metrics that are means over test utterances, so a speaker's value is the mean over its
#: utterances and the run's value the ``n_utts``-weighted mean of its speakers' (per-speaker rows).
PER_UTTERANCE = ("war", "agreement", "kl", "entropy")


def lens_metrics(
    logits: torch.Tensor,
    final_logits: torch.Tensor,
    labels: np.ndarray,
    n_classes: int,
    speakers: np.ndarray | None = None,
) -> list[dict]:
    """Per layer of ``logits`` (N, L + 1, C): uar, war, agreement, kl, entropy (module docstring).

    With ``speakers`` (one per row) the means over utterances (:data:`PER_UTTERANCE`) get one
    row per speaker (``speaker``, ``n_utts``); ``uar`` is not a mean over utterances (the
    mean over classes of per-class recalls), so it keeps one row for all N utterances
    (``speaker`` None, ``n_utts`` = N).
    """
    final_pred = final_logits.argmax(dim=-1).numpy()
    kl = kl_divergence(final_logits[:, None, :], logits).numpy()  # (N, L + 1)
    ent = entropy(logits).numpy()
    groups = (
        [(None, np.ones(len(labels), dtype=bool))]
        if speakers is None
        else [(s, np.asarray(speakers) == s) for s in sorted(set(np.asarray(speakers).tolist()))]
    )
    rows = []
    for layer in range(logits.shape[1]):
        pred = logits[:, layer].argmax(dim=-1).numpy()
        per_utt = {
            "war": pred == labels,
            "agreement": pred == final_pred,
            "kl": kl[:, layer],
            "entropy": ent[:, layer],
        }
        whole = {"layer": layer, "metric": "uar", "value": uar(labels, pred, n_classes)}
        if speakers is not None:
            whole |= {"speaker": None, "n_utts": len(labels)}
        rows.append(whole)
        for speaker, rows_of in groups:
            for metric in PER_UTTERANCE:
                row = {"layer": layer, "metric": metric}
                row["value"] = float(np.mean(per_utt[metric][rows_of], dtype=np.float64))
                if speakers is not None:
                    row |= {"speaker": speaker, "n_utts": int(rows_of.sum())}
                rows.append(row)
    return rows


def _collect(
    run, split, batch_size: int, variants: list[str], indices: np.ndarray | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Pooled states of ``split`` (in split order) for each variant, one mel per batch:
    ``{"normalised": {variant: (N, L + 1, D)}, "residual": {variant: ...}}``
    (:func:`pooled_lens_states`)."""
    n = len(split) if indices is None else len(indices)
    order = {int(i): k for k, i in enumerate(np.arange(len(split)) if indices is None else indices)}
    states: dict[str, dict[str, torch.Tensor]] = {"normalised": {}, "residual": {}}
    with torch.inference_mode():
        for chunk, batch in run.batches(split, batch_size, indices):
            rows = torch.as_tensor([order[int(i)] for i in chunk])
            for variant in variants:
                # "base" of a frozen run is its own encoder; adapter_disabled() is then a no-op
                with run.adapter_disabled() if variant == "base" else contextlib.nullcontext():
                    pooled = pooled_lens_states(run.encoder, batch)
                for kind, value in zip(("normalised", "residual"), pooled, strict=True):
                    value = value.cpu()
                    if variant not in states[kind]:
                        states[kind][variant] = torch.zeros(n, *value.shape[1:], dtype=value.dtype)
                    states[kind][variant][rows] = value
    return states


def compute_logit_lens(run, cfg: dict, seed: int) -> pd.DataFrame:
    """Logit lens, the paper's lens (no final LayerNorm) and, if ``cfg["tuned_lens"]``, the
    tuned lens per variant and layer on the test split.

    The in-memory reference of the workflow's analysis: the tuned lens is fitted on the
    analysis sample (``fit_split = train_sample``, no early stopping) with
    ``cfg.get("tuned_lens_l2", TUNED_LENS_L2)``; one row per run. ``seed`` fixes the sample.
    """
    own = "adapted" if run.is_lora else "base"
    variants = [own, "base"] if run.is_lora else [own]
    test = run.splits["test"]
    states = _collect(run, test, cfg["batch_size"], variants)
    train_states = None
    if cfg["tuned_lens"]:
        train = run.splits["train"]
        sample = balanced_sample(train.labels, cfg["train_sample"], seed)
        train_states = _collect(run, train, cfg["batch_size"], [own], sample)["normalised"][own]
    return logit_lens_table(
        run.head,
        states["normalised"],
        own,
        test.labels,
        len(run.classes),
        train_states,
        cfg["tuned_lens_steps"],
        l2=cfg.get("tuned_lens_l2", TUNED_LENS_L2),
        residual_states=states["residual"],
    )


def logit_lens_table(
    head: nn.Module,
    states: dict[str, torch.Tensor],
    own: str,
    labels: np.ndarray,
    n_classes: int,
    train_states: torch.Tensor | None = None,
    tuned_lens_steps: int = 0,
    *,
    speakers: np.ndarray | None = None,
    dev_states: torch.Tensor | None = None,
    l2: float = TUNED_LENS_L2,
    patience: int = TUNED_LENS_PATIENCE,
    fit_split: str = "train_sample",
    residual_states: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """The lens table from pooled normalised states ``(N, L + 1, D)`` per variant.

    ``residual_states`` (per variant, the same rows and shape): the pooled residual stream
    without the final LayerNorm; where given, the paper's lens (:data:`PAPER_LENS`, layers
    1..L, module docstring) adds rows, its ``kl`` and ``agreement`` against the same
    reference (the run's output: ``states[own]`` at layer L).

    ``own`` is the variant the run classifies with (its last layer is the reference output);
    the tuned lens is fitted on ``train_states`` when given (:func:`fit_tuned_lens`, with
    ``l2``, early-stopped on ``dev_states`` when given), and ``fit_split`` names them
    (``train``: every training utterance of the fold; ``train_sample``: the analysis sample).
    ``speakers`` (one per test row): per-speaker rows as in :func:`lens_metrics`.

    Columns: ``lens, variant, layer, depth, metric, [speaker, n_utts,] value, fit_split``
    (``fit_split`` = ``none`` on logit-lens rows). Tuned-lens rows add ``fit_kl`` (on the
    fitting states) and, with dev states, ``dev_kl``: per run (``speaker`` None, ``n_utts`` =
    the utterances they average).
    """
    head = copy.deepcopy(head).cpu().eval()  # the lens works on pooled states, on the CPU
    n_layers = next(iter(states.values())).shape[1] - 1
    with torch.inference_mode():
        logits = {v: logit_lens(head, s) for v, s in states.items()}
    final_logits = logits[own][:, -1]

    rows = []
    for variant in states:
        rows += [
            {"lens": "logit", "variant": variant, **r, "fit_split": "none"}
            for r in lens_metrics(logits[variant], final_logits, labels, n_classes, speakers)
        ]
    for variant, residual in (residual_states or {}).items():
        if residual.shape != states[variant].shape:
            raise ValueError(
                f"residual states of {variant} {tuple(residual.shape)} do not match its "
                f"normalised states {tuple(states[variant].shape)}"
            )
        with torch.inference_mode():
            paper_logits = logit_lens(head, residual)
        rows += [
            {"lens": PAPER_LENS, "variant": variant, **r, "fit_split": "none"}
            for r in lens_metrics(paper_logits, final_logits, labels, n_classes, speakers)
            if r["layer"] >= PAPER_FIRST_LAYER
        ]

    if train_states is not None:
        with torch.enable_grad():
            lens = fit_tuned_lens(
                head, train_states, tuned_lens_steps, dev_states, l2=l2, patience=patience
            )
        log.info(
            "tuned lens on %d %s utterances, l2 = %g: kept the translators of step %d of %d%s",
            len(train_states),
            fit_split,
            l2,
            lens.best_step,
            tuned_lens_steps,
            "" if dev_states is None else f" (best dev KL of {len(lens.history)} evaluations)",
        )
        with torch.inference_mode():
            tuned_logits = lens(states[own])
        tuned_rows = lens_metrics(tuned_logits, final_logits, labels, n_classes, speakers)
        for metric, fitted in (("fit_kl", train_states), ("dev_kl", dev_states)):
            if fitted is None:
                continue
            with torch.inference_mode():
                fitted_logits = lens(fitted)
                per_layer = kl_divergence(fitted_logits[:, -1:], fitted_logits).mean(dim=0)
            whole = {} if speakers is None else {"speaker": None, "n_utts": len(fitted)}
            tuned_rows += [
                {"layer": layer, "metric": metric, "value": float(per_layer[layer]), **whole}
                for layer in range(n_layers + 1)
            ]
        rows += [{"lens": "tuned", "variant": own, **r, "fit_split": fit_split} for r in tuned_rows]

    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("layer") + 1, "depth", table["layer"] / n_layers)
    if speakers is not None:
        table["n_utts"] = table["n_utts"].astype(int)
        table = table[
            [c for c in table.columns if c not in ("value", "fit_split")] + ["value", "fit_split"]
        ]
    return table.sort_values(["lens", "variant", "layer"], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- the workflow's analysis


def _stored(states, key: str) -> np.ndarray | None:
    """``states[key]``, or None where the pass did not store it (an older pass)."""
    try:
        return states[key]
    except KeyError:
        return None


def fitting_states(own_states, splits) -> tuple[str, np.ndarray, np.ndarray | None]:
    """What the tuned lens is fitted on: ``(fit_split, train, dev)``.

    ``train/normalised`` (every training utterance of the fold) and ``dev/normalised`` (for
    early stopping) where the pass stored them, their rows checked against the fold's
    ``splits``; else the analysis sample ``train_sample/normalised`` and no dev states (so
    no early stopping). ``train`` without ``dev`` is fitted for all steps.
    """
    train = _stored(own_states, "train/normalised")
    if train is None:
        return "train_sample", own_states["train_sample/normalised"], None
    dev = _stored(own_states, "dev/normalised")
    for name, stored in (("train", train), ("dev", dev)):
        if stored is not None and sorted(own_states.utt_ids(name)) != sorted(splits[name].utt_ids):
            raise ValueError(
                f"{own_states.path}: stored {name} utterances differ from the fold's; "
                "rerun its pass."
            )
    return "train", train, dev


def _compute(run, settings) -> pd.DataFrame:
    own_states = run.states("states")
    test = run.splits["test"]
    if own_states.utt_ids("test") != list(test.utt_ids):
        raise ValueError(
            f"{own_states.path}: test utterances differ from the fold's; rerun its pass."
        )
    own = "adapted" if run.method.trains_encoder else "base"
    stored = {own: own_states}
    if run.method.trains_encoder:
        stored["base"] = run.states("base_states")
    states = {v: torch.from_numpy(s["test/normalised"]) for v, s in stored.items()}
    residual_states = stored_residual_states(stored)
    speakers = np.array([run.speakers[u] for u in test.utt_ids], dtype=object)
    fit_split, train_states, dev_states = "train_sample", None, None
    if settings["tuned_lens"]:
        fit_split, train, dev = fitting_states(own_states, run.splits)
        train_states = torch.from_numpy(train)
        dev_states = None if dev is None else torch.from_numpy(dev)
    return logit_lens_table(
        run.head(),
        states,
        own,
        test.labels,
        len(run.classes),
        train_states,
        settings["tuned_lens_steps"],
        speakers=speakers,
        dev_states=dev_states,
        l2=settings["tuned_lens_l2"],
        patience=settings["tuned_lens_patience"],
        fit_split=fit_split,
        residual_states=residual_states,
    )


def stored_residual_states(stored: dict) -> dict[str, torch.Tensor] | None:
    """The paper's lens input per variant (``{variant: states file or fold view}``): the
    test split's pooled raw residual stream (:func:`serlens.analysis.passes.raw_residual_states`),
    or None, with a warning, where a pass older than ``resid_last`` wrote one of them."""
    from serlens.analysis.passes import raw_residual_states

    out = {}
    for variant, states in stored.items():
        last = _stored(states, "test/resid_last")
        if last is None:
            log.warning(
                "%s holds no test/resid_last (written by an older pass): no rows of the "
                "paper's logit lens (%s); rerun its pass for them",
                states.path,
                PAPER_LENS,
            )
            return None
        out[variant] = torch.from_numpy(raw_residual_states(states["test/pooled"], last))
    return out


def _draw(tables, model, context):
    from serlens.report.figures import logit_lens_figure

    return logit_lens_figure(tables["logit_lens"], model, context["n_classes"])


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="logit_lens",
        compute=_compute,
        applies_to=lambda method: method.readout == "last",
        reads=frozenset({"states", "base_states", "head"}),
        keys=("tuned_lens", "tuned_lens_steps", "tuned_lens_l2", "tuned_lens_patience"),
        table=TableSpec(("lens", "variant", "layer", "depth", "metric")),
        figures=(FigureSpec("logit_lens", _draw, ("logit_lens",), "Logit lens"),),
        doc=(
            "the run's head read off every layer (logit lens; the paper's variant without the "
            "final LayerNorm) and through fitted translators (tuned lens)"
        ),
    )


SPEC = _spec()
