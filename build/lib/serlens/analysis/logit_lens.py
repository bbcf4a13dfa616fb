"""Read the run's trained head off every layer of the residual stream: the logit lens and a tuned lens.

Logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): for layer l = 0..L,
take each frame's residual state ``resid[l]`` (``resid[0]`` = conv stem + positions,
``resid[l]`` = output of block l), apply the encoder's final LayerNorm, mean-pool over the
frames that hold audio and apply the trained head::

    p_l = softmax(head(mean_t LN(resid[l]_t)))

At l = L, ``LN(resid[L])`` is ``last_hidden_state``, so ``p_L`` is the model's own output.

Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): a per-layer affine translator ``T_l(x) = x + W_l x + b_l`` (``W_l`` D x D,
``b_l`` D; identity at initialisation, ``W_l = 0``, ``b_l = 0``) before the head,
``p_l = softmax(head(T_l(mean_t LN(resid[l]_t))))``, fitted on the fold's fixed
class-balanced training sample to minimise ``KL(p_L ‖ p_l)``; the last layer keeps the
identity. ``T_l`` is affine, so ``mean_t T_l(LN(resid[l]_t)) = T_l(mean_t LN(resid[l]_t))``:
translating frames and pooling equals translating the pooled state, and the lens is fitted
on cached pooled states (N x (L + 1) x D), which takes milliseconds.

Per layer the table reports, on the fold's test utterances: UAR and WAR of ``argmax p_l``
against the labels, ``agreement`` = share of utterances where ``argmax p_l`` equals the
run's prediction ``argmax p_L``, ``kl`` = mean over utterances of ``KL(p_L ‖ p_l)`` (nats)
and ``entropy`` = mean of ``H(p_l)`` (nats). Tuned-lens rows add ``fit_kl``, the same KL on
the training sample the translators were fitted on (compare with ``kl`` to see overfitting).

``variant``: ``adapted`` = the run's LoRA encoder, ``base`` = the pre-trained encoder (for
LoRA runs the same object with its adapters disabled, read with the *same* trained head).
Frozen runs hold only ``base`` rows. The reference ``p_L`` is always the run's own output
(the adapted model's for LoRA runs), so in a LoRA table ``base`` rows at layer L show how
far the head's reading of the pre-trained encoder is from what the run predicts. The tuned
lens is fitted only for the encoder the run classifies with.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pandas as pd
import torch
from torch import nn

from serlens.analysis.runs import balanced_sample
from serlens.metrics import uar, war
from serlens.models.encoder import masked_mean, run_encoder

__all__ = [
    "TunedLens",
    "affine_readout",
    "compute_logit_lens",
    "entropy",
    "fit_tuned_lens",
    "kl_divergence",
    "lens_metrics",
    "logit_lens",
    "pooled_normalised_states",
]

TUNED_LENS_LR = 1e-3  # Adam's default (Kingma & Ba 2015); not tuned on any split


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
    head: nn.Module, pooled_states: torch.Tensor, steps: int, lr: float = TUNED_LENS_LR
) -> TunedLens:
    """Fit the translators by full-batch Adam on ``Σ_l mean_n KL(p_L ‖ p_l)`` (the head stays fixed).

    Deterministic: identity initialisation, full batch. Layers do not interact (each
    translator sees only its layer), so the sum fits each layer as if alone. With a few dozen
    utterances and D² + D parameters per layer the translators can overfit the sample: the
    table's ``fit_kl`` (on the sample) beside ``kl`` (on test) shows by how much.

    For an affine head ``head(y) = H y + c`` the loss is computed as
    ``head(x) + x (H W_l)ᵀ + H b_l``, the same logits as ``head(T_l(x))`` at C·D² instead of
    N·D² cost per layer (C classes ≪ N utterances).
    """
    n_layers, d_model = pooled_states.shape[1] - 1, pooled_states.shape[2]
    head = copy.deepcopy(head).requires_grad_(False)  # the run's head is left untouched
    # A normal tensor even if it was made under inference_mode (autograd cannot save those).
    pooled_states = pooled_states.clone()
    lens = TunedLens(head, n_layers, d_model)
    readout = affine_readout(head, d_model)
    inner = pooled_states[:, :-1]
    with torch.no_grad():
        target = logit_lens(head, pooled_states[:, -1:]).expand(-1, n_layers, -1)
        untranslated = logit_lens(head, inner)

    def translated_logits() -> torch.Tensor:
        if readout is None:
            return lens(pooled_states)[:, :-1]
        weight = readout[0]
        through_head = torch.einsum("cd,lde->lce", weight, lens.weight)  # H W_l: (L, C, D)
        shift = lens.bias @ weight.T  # H b_l: (L, C)
        return untranslated + torch.einsum("nle,lce->nlc", inner, through_head) + shift

    optimiser = torch.optim.Adam([lens.weight, lens.bias], lr=lr, fused=True)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = kl_divergence(target, translated_logits()).mean(dim=0).sum()
        loss.backward()
        optimiser.step()
    lens.requires_grad_(False)
    return lens


def pooled_normalised_states(encoder: nn.Module, batch) -> torch.Tensor:
    """``mean_t LN(resid[l]_t)`` over audio frames for l = 0..L: ``(B, L + 1, D)``; layer L is pooled ``last_hidden_state``."""
    out = run_encoder(encoder, batch)
    states = [encoder.layer_norm(resid) for resid in out.resid[:-1]] + [out.last_hidden_state]
    return torch.stack([masked_mean(s, out.frame_mask) for s in states], dim=1)


def lens_metrics(
    logits: torch.Tensor, final_logits: torch.Tensor, labels: np.ndarray, n_classes: int
) -> list[dict]:
    """Per layer of ``logits`` (N, L + 1, C): uar, war, agreement, kl, entropy (see the module docstring)."""
    final_pred = final_logits.argmax(dim=-1).numpy()
    kl = kl_divergence(final_logits[:, None, :], logits).mean(dim=0)
    ent = entropy(logits).mean(dim=0)
    rows = []
    for layer in range(logits.shape[1]):
        pred = logits[:, layer].argmax(dim=-1).numpy()
        values = {
            "uar": uar(labels, pred, n_classes),
            "war": war(labels, pred),
            "agreement": float(np.mean(pred == final_pred)),
            "kl": float(kl[layer]),
            "entropy": float(ent[layer]),
        }
        rows += [{"layer": layer, "metric": k, "value": v} for k, v in values.items()]
    return rows


def _collect(
    run, split, batch_size: int, variants: list[str], indices: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Pooled normalised states of ``split`` (in split order) for each variant, one mel per batch."""
    n = len(split) if indices is None else len(indices)
    order = {int(i): k for k, i in enumerate(np.arange(len(split)) if indices is None else indices)}
    states: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for chunk, batch in run.batches(split, batch_size, indices):
            rows = torch.as_tensor([order[int(i)] for i in chunk])
            for variant in variants:
                # "base" of a frozen run is its own encoder; adapter_disabled() is then a no-op
                with run.adapter_disabled() if variant == "base" else contextlib.nullcontext():
                    pooled = pooled_normalised_states(run.encoder, batch).cpu()
                if variant not in states:
                    states[variant] = torch.zeros(n, *pooled.shape[1:], dtype=pooled.dtype)
                states[variant][rows] = pooled
    return states


def compute_logit_lens(run, cfg: dict, seed: int) -> pd.DataFrame:
    """Logit lens (and, if ``cfg["tuned_lens"]``, tuned lens) per variant and layer on the test split.

    Columns: ``lens, variant, layer, depth, metric, value``. ``seed`` fixes the training
    sample the tuned lens is fitted on.
    """
    own = "adapted" if run.is_lora else "base"
    variants = [own, "base"] if run.is_lora else [own]
    test = run.splits["test"]
    states = _collect(run, test, cfg["batch_size"], variants)
    train_states = None
    if cfg["tuned_lens"]:
        train = run.splits["train"]
        sample = balanced_sample(train.labels, cfg["train_sample"], seed)
        train_states = _collect(run, train, cfg["batch_size"], [own], sample)[own]
    return logit_lens_table(
        run.head, states, own, test.labels, len(run.classes), train_states, cfg["tuned_lens_steps"]
    )


def logit_lens_table(
    head: nn.Module,
    states: dict[str, torch.Tensor],
    own: str,
    labels: np.ndarray,
    n_classes: int,
    train_states: torch.Tensor | None = None,
    tuned_lens_steps: int = 0,
) -> pd.DataFrame:
    """The lens table from pooled normalised states ``(N, L + 1, D)`` per variant.

    ``own`` is the variant the run classifies with (its last layer is the reference output);
    the tuned lens is fitted on ``train_states`` (the analysis sample) when given.
    """
    head = copy.deepcopy(head).cpu().eval()  # the lens works on pooled states, on the CPU
    n_layers = next(iter(states.values())).shape[1] - 1
    with torch.inference_mode():
        logits = {v: logit_lens(head, s) for v, s in states.items()}
    final_logits = logits[own][:, -1]

    rows = []
    for variant in states:
        rows += [
            {"lens": "logit", "variant": variant, **r}
            for r in lens_metrics(logits[variant], final_logits, labels, n_classes)
        ]

    if train_states is not None:
        with torch.enable_grad():
            lens = fit_tuned_lens(head, train_states, tuned_lens_steps)
        with torch.inference_mode():
            tuned_logits = lens(states[own])
            fit_logits = lens(train_states)
            fit_kl = kl_divergence(fit_logits[:, -1:], fit_logits).mean(dim=0)
        tuned_rows = lens_metrics(tuned_logits, final_logits, labels, n_classes)
        tuned_rows += [
            {"layer": layer, "metric": "fit_kl", "value": float(fit_kl[layer])}
            for layer in range(n_layers + 1)
        ]
        rows += [{"lens": "tuned", "variant": own, **r} for r in tuned_rows]

    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("layer") + 1, "depth", table["layer"] / n_layers)
    return table.sort_values(["lens", "variant", "layer"], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- the workflow's analysis


def _compute(run, settings) -> pd.DataFrame:
    own_states = run.states("states")
    test = run.splits["test"]
    if own_states.utt_ids("test") != list(test.utt_ids):
        raise ValueError(
            f"{own_states.path}: test utterances differ from the fold's; rerun its pass."
        )
    own = "adapted" if run.method.trains_encoder else "base"
    states = {own: torch.from_numpy(own_states["test/normalised"])}
    if run.method.trains_encoder:
        states["base"] = torch.from_numpy(run.states("base_states")["test/normalised"])
    train_states = None
    if settings["tuned_lens"]:
        train_states = torch.from_numpy(own_states["train_sample/normalised"])
    return logit_lens_table(
        run.head(),
        states,
        own,
        test.labels,
        len(run.classes),
        train_states,
        settings["tuned_lens_steps"],
    )


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
        keys=("tuned_lens", "tuned_lens_steps"),
        table=TableSpec(("lens", "variant", "layer", "depth", "metric")),
        figures=(FigureSpec("logit_lens", _draw, ("logit_lens",), "Logit lens"),),
        doc="the run's head read off every layer (logit lens) and through fitted translators (tuned lens)",
    )


SPEC = _spec()
