"""How much each encoder layer writes into the residual stream, and in which direction.

Whisper's encoder layers are pre-LN residual blocks. Block l (1..L) reads the stream
``h = resid[l-1]`` and writes ``resid[l] = h + a + m`` with

* ``a`` = ``attn_out`` = ``self_attn(self_attn_layer_norm(h))`` (before the residual add),
* ``m`` = ``mlp_out`` = ``resid[l] - (h + a)`` = ``fc2(gelu(fc1(final_layer_norm(h + a))))``.

Per block, over the frames that hold audio of the fold's test utterances, this module
reports the size of each update relative to the stream it is added to (norm ratio) and its
direction relative to that stream (cosine), for ``a``, ``m`` and the block's whole update
``a + m``. The per-frame values are averaged over each utterance's audio frames, then over
utterances (each test utterance weighs the same, whatever its length)::

    value = (1/N) Σ_u (1/T_u) Σ_{t ≤ T_u} metric(u, t)

so the value is a mean over test utterances and splits by speaker: the workflow's table
has one row per test speaker (``speaker``, ``n_utts``: the mean over that speaker's
utterances), whose ``n_utts``-weighted mean is the run's value, and the aggregated table
gets a 95 % band from resampling test speakers within folds
(:mod:`serlens.report.aggregate`). ``n_frames`` counts the audio frames behind a row.

``layer`` is the block number 1..L, so block l produces the hidden state the logit lens calls
layer l; ``depth`` = layer / L puts models of different depth on one axis.

``variant`` says which encoder the numbers come from: ``adapted`` = the run's LoRA encoder
(LoRA runs only), ``base`` = the pre-trained encoder, for LoRA runs the same object with its
adapters disabled. A frozen run classifies with the pre-trained encoder, so its table holds
only ``base`` rows (identical to the ``base`` rows of any LoRA run of the same model and
fold). ``adapted − base`` within one LoRA table is the adapter's effect on one model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from serlens.models.encoder import attention_mask, embed

__all__ = [
    "COMPONENTS",
    "LayerComponents",
    "capture_attn_out",
    "compute_contributions",
    "contribution_sums",
    "contributions_from_states",
    "encoder_utterance_means",
    "layer_components",
    "residual_cosine",
    "residual_norm_ratio",
]

COMPONENTS = ("attn", "mlp", "attn+mlp")
METRICS = ("norm_ratio", "cosine")


def residual_norm_ratio(
    update: torch.Tensor, resid: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Per-frame relative size of an update to the residual stream: ``‖u_t‖₂ / ‖h_t‖₂``.

    ``update`` and ``resid`` are ``(..., D)``; the result is ``(...)``. The norm-based view of a
    transformer layer's contribution follows Kobayashi, Kuribayashi, Yokoi & Inui 2021,
    "Incorporating Residual and Normalization Layers into Analysis of Masked Language Models"
    (EMNLP), who compare the norm of what attention writes with the norm of the residual it
    is added to (and Kobayashi et al. 2020, "Attention is Not Only a Weight", for the
    norm-based analysis itself). A ratio well below 1 means the layer barely moves the stream.
    ``eps`` guards an all-zero stream.
    """
    return update.norm(dim=-1) / resid.norm(dim=-1).clamp_min(eps)


def residual_cosine(update: torch.Tensor, resid: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-frame direction of an update relative to the stream: ``cos(u_t, h_t) = u_t·h_t / (‖u_t‖ ‖h_t‖)``.

    Positive: the update reinforces what the stream already holds; negative: it erases it;
    near 0: it writes into directions orthogonal to the stream. ``(..., D) -> (...)``; a zero
    vector gets cosine 0 (norms clamped at ``eps``).
    """
    dot = (update * resid).sum(dim=-1)
    return dot / (update.norm(dim=-1).clamp_min(eps) * resid.norm(dim=-1).clamp_min(eps))


@dataclass
class LayerComponents:
    """One block's residual decomposition: ``resid_post = resid_pre + attn_out + mlp_out``."""

    resid_pre: torch.Tensor  # (B, T, D) stream entering the block
    attn_out: torch.Tensor  # (B, T, D) self-attention output before the residual add
    mlp_out: torch.Tensor  # (B, T, D) MLP output = resid_post - (resid_pre + attn_out)
    resid_post: torch.Tensor  # (B, T, D) the block's output


@contextlib.contextmanager
def capture_attn_out(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hook on ``layer.self_attn`` that stores its output (before dropout and the residual add) as ``["attn_out"]``."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["attn_out"] = output[0] if isinstance(output, tuple) else output

    handle = layer.self_attn.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def layer_components(
    layer: nn.Module, resid_pre: torch.Tensor, mask: torch.Tensor | None
) -> LayerComponents:
    """Run one ``WhisperEncoderLayer`` as the model does, capturing its attention output on the way.

    The block itself is called (so LoRA adapters, SDPA and any transformers detail apply as
    in the run); the MLP output is what remains of its update once attention is taken out.
    """
    with capture_attn_out(layer) as captured:
        resid_post = layer(resid_pre, mask)
    if "attn_out" not in captured:
        raise RuntimeError(
            f"{type(layer).__name__}: self_attn was not called; not a pre-LN Whisper encoder layer?"
        )
    attn_out = captured["attn_out"]
    return LayerComponents(resid_pre, attn_out, resid_post - resid_pre - attn_out, resid_post)


def contribution_sums(
    parts: LayerComponents, frame_mask: torch.Tensor
) -> dict[tuple[str, str], float]:
    """Sums over audio frames of each (component, metric) of :data:`COMPONENTS` x :data:`METRICS` (float64)."""
    updates = {
        "attn": parts.attn_out,
        "mlp": parts.mlp_out,
        "attn+mlp": parts.attn_out + parts.mlp_out,
    }
    weights = frame_mask.to(torch.float64)
    sums = {}
    for component, update in updates.items():
        ratio = residual_norm_ratio(update, parts.resid_pre).double()
        cosine = residual_cosine(update, parts.resid_pre).double()
        sums[(component, "norm_ratio")] = float((ratio * weights).sum())
        sums[(component, "cosine")] = float((cosine * weights).sum())
    return sums


def encoder_utterance_means(encoder: nn.Module, batch) -> torch.Tensor:
    """``(B, L, components, metrics)`` float64: each utterance's mean over its audio frames."""
    from serlens.analysis.passes import utterance_contributions

    x = embed(encoder, batch.mel)
    mask = attention_mask(batch, x.dtype)
    frames = batch.frame_mask.sum(dim=1).to(torch.float64).cpu()
    means = []
    for layer in encoder.layers:
        parts = layer_components(layer, x, mask)
        means.append(utterance_contributions(parts, batch.frame_mask) / frames[:, None, None])
        x = parts.resid_post
    return torch.stack(means, dim=1)


def compute_contributions(run, cfg: dict, seed: int) -> pd.DataFrame:
    """Per block, variant, component and metric: the mean over test utterances of each
    utterance's mean over its audio frames (the module docstring), one row per run.

    The in-memory reference of :func:`contributions_from_states`. Columns: ``variant, layer,
    depth, component, metric, value, n_frames``. ``seed`` is unused (the analysis is
    deterministic); it is accepted for the registry's signature.
    """
    del seed
    variants = ["adapted", "base"] if run.is_lora else ["base"]
    test = run.splits["test"]
    totals = {v: None for v in variants}
    n_frames = 0
    with torch.inference_mode():
        for _, batch in run.batches(test, cfg["batch_size"]):
            n_frames += int(batch.frame_mask.sum())
            for variant in variants:
                # "base" of a frozen run is its own encoder; adapter_disabled() is then a no-op
                with run.adapter_disabled() if variant == "base" else contextlib.nullcontext():
                    means = encoder_utterance_means(run.encoder, batch).sum(dim=0)
                totals[variant] = means if totals[variant] is None else totals[variant] + means
    if n_frames == 0:
        raise ValueError(
            f"{run.model}/{run.method}/fold{run.fold}: the test split holds no audio frames."
        )
    n_layers = len(run.encoder.layers)
    rows = [
        {
            "variant": variant,
            "layer": layer,
            "depth": layer / n_layers,
            "component": component,
            "metric": metric,
            "value": float(totals[variant][layer - 1, c, m]) / len(test),
            "n_frames": n_frames,
        }
        for variant in variants
        for layer in range(1, n_layers + 1)
        for c, component in enumerate(COMPONENTS)
        for m, metric in enumerate(METRICS)
    ]
    return pd.DataFrame(rows).astype({"value": np.float64})


# --------------------------------------------------------------------------- the workflow's analysis


def contributions_from_states(
    own, base, is_adapted: bool, speakers: np.ndarray | None = None
) -> pd.DataFrame:
    """The table of :func:`compute_contributions` from stored per-utterance frame sums.

    ``value = (1/N) Σ_u contrib_u / frames_u`` over the fold's test utterances, per variant
    (``adapted`` from the run's own pass, ``base`` from the pre-trained encoder's pass).
    With ``speakers`` (one per test row) one row per speaker: the mean over its utterances,
    with ``speaker`` and ``n_utts`` (``n_frames``: its audio frames) after ``metric``.
    """
    variants = {"adapted": own, "base": base} if is_adapted else {"base": own}
    rows = []
    for variant, states in variants.items():
        sums, frames = states["test/contrib"], states["test/frames"]
        if int(frames.sum()) == 0:
            raise ValueError(f"{states.path}: the test split holds no audio frames.")
        if np.any(frames <= 0):
            raise ValueError(f"{states.path}: a test utterance holds no audio frames.")
        means = sums / frames[:, None, None, None]  # (N, L, components, metrics)
        if speakers is None:
            groups = [(None, np.ones(len(frames), dtype=bool))]
        else:
            speakers = np.asarray(speakers)
            if len(speakers) != len(frames):
                raise ValueError(
                    f"{states.path}: {len(frames)} test utterances, {len(speakers)} speakers"
                )
            groups = [(s, speakers == s) for s in sorted(set(speakers.tolist()))]
        n_layers = means.shape[1]
        for speaker, member in groups:
            totals = means[member].mean(axis=0)
            who = {} if speaker is None else {"speaker": speaker, "n_utts": int(member.sum())}
            for layer in range(1, n_layers + 1):
                for c, component in enumerate(COMPONENTS):
                    for m, metric in enumerate(METRICS):
                        rows.append(
                            {
                                "variant": variant,
                                "layer": layer,
                                "depth": layer / n_layers,
                                "component": component,
                                "metric": metric,
                                **who,
                                "value": float(totals[layer - 1, c, m]),
                                "n_frames": int(frames[member].sum()),
                            }
                        )
    return pd.DataFrame(rows).astype({"value": np.float64})


def adapter_delta(long: pd.DataFrame, run_columns: list[str]) -> pd.DataFrame:
    """``variant = delta`` = ``adapted − base`` of the same run, per fold (before averaging).

    ``run_columns`` identify a run's row apart from the table's keys: the run, and for
    per-speaker rows ``speaker, n_utts`` (so the delta is taken per speaker, and its
    ``n_utts``-weighted mean is the run's delta).
    """
    if not {"adapted", "base"} <= set(long["variant"]):
        return long.iloc[:0]
    keys = [*run_columns, "layer", "depth", "component", "metric"]
    adapted = long[long["variant"] == "adapted"].set_index(keys)["value"]
    base = long[long["variant"] == "base"].set_index(keys)["value"]
    return (adapted - base).dropna().reset_index().assign(variant="delta")


def _compute(run, settings) -> pd.DataFrame:
    adapted = run.method.trains_encoder
    own = run.states("states")
    test = list(run.splits["test"].utt_ids)
    base = run.states("base_states") if adapted else None
    for states in (own, base):
        if states is not None and states.utt_ids("test") != test:
            raise ValueError(
                f"{states.path}: test utterances differ from the fold's; rerun its pass."
            )
    speakers = np.array([run.speakers[u] for u in test], dtype=object)
    return contributions_from_states(own, base, adapted, speakers)


def _draw(tables, model, context):
    from serlens.report.figures import contributions_figure

    return contributions_figure(tables["contributions"], model)


def _draw_depth(tables, model, context):
    from serlens.report.figures import contributions_depth_figure

    return contributions_depth_figure(tables["contributions"], context["models"])


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="contributions",
        compute=_compute,
        applies_to=lambda method: method.readout == "last",
        reads=frozenset({"states", "base_states"}),
        keys=(),
        table=TableSpec(("variant", "layer", "depth", "component", "metric"), derive=adapter_delta),
        figures=(
            FigureSpec("contributions", _draw, ("contributions",), "Layer contributions"),
            FigureSpec(
                "contributions_depth",
                _draw_depth,
                ("contributions",),
                "Layer contributions",
                per_model=False,
            ),
        ),
        doc="norm ratio and cosine of each block's attention and MLP update to the residual stream",
    )


SPEC = _spec()
