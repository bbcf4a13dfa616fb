"""Causal tests: where in the encoder does the adaptation do its work? (``causal.tsv``)

Every other analysis describes how the adapted encoder differs from the frozen one; these
intervene on it and measure what the run's own classifier loses. The paper names this as its
limitation and proposes the checks ("remove LoRA's A or B", "intervene on the layers"); the
tools are those of activation patching and ablation (Meng et al. 2022, "Locating and editing
factual associations in GPT"; Heimersheim & Nanda 2024, "How to use and interpret activation
patching"; Zhang & Nanda 2024, "Towards best practices of activation patching").

The run's pass (:func:`causal_logits`, one model load, streamed over batches of the test
split) computes the head's logits on every test utterance under each *variant*:

- ``reference``: ``on`` (every adapter on: the run itself) and ``off`` (every adapter off:
  the frozen encoder read out with the LoRA head);
- ``adapter_off`` (layer l's adapters off, all others on), ``adapter_only`` (only layer l's
  on), ``adapters_upto`` (on in layers 0..l), ``adapters_from`` (on in layers l..L-1): is the
  useful change early or late? (the causal test of "delayed specialisation");
- ``patch_frozen_into_adapted`` (the adapted encoder with layer l's residual-stream output
  replaced by the frozen encoder's on the same utterance) and ``patch_adapted_into_frozen``
  (the converse), everything else unchanged: the share of the gap one site carries;
  ``patch_vproj_frozen_into_adapted`` / ``patch_vproj_adapted_into_frozen``: the same with
  layer l's ``v_proj`` output (the site the paper's adapters write to) swapped instead of its
  whole output;
- ``skip_adapted`` / ``skip_frozen``: layer l skipped (its output set to its input; the
  paper's "residual erasure", ``analysis_utils.residual_erasure``, here on every test
  utterance of every fold); ``skip_upto_adapted``: layers 0..l skipped (its
  ``progressive_residual_erasure``);
- ``ablate_attn_{adapted,frozen}`` / ``ablate_mlp_{adapted,frozen}``: layer l's attention
  (or MLP) output replaced, the causal counterpart of the contribution norms. With
  ``analysis.causal_ablation: resample`` (variant ``resample``) by the same component's
  output on a randomly paired training utterance of the fold, run through the same encoder
  (resample-ablation; Chan et al. 2022, "Causal scrubbing"), frames aligned cyclically over
  its audio frames (:func:`cyclic_align`); with ``mean`` (variant ``mean``, the cheaper
  option) by its mean over the audio frames of the fold's analysis sample;
- ``ab_swap``: ``init_a`` (trained B with the adapter's own initial A, from
  ``adapter_epochs/epoch0``) and ``rotated_b`` (trained A with B·Q, Q a seeded random r × r
  orthogonal matrix: same norms, rotated code space).

Per utterance u with true class y and logits z (the analysis, :func:`causal_table`):

- ``kl`` = KL(p_on ‖ p_variant) = Σ_c p_on,c (log p_on,c − log p_variant,c), the output change;
- ``logit_diff`` = z_y − mean_{c≠y} z_c, the evidence for the true class;
- ``correct`` = [argmax z = y] (its mean is WAR);
- ``paper_score``: the paper code's "contribution" of an erasure, (acc_on − acc_v) +
  0.5 (conf_on − conf_v) − 0.1 (loss_v − loss_on), with conf the top probability and loss
  the cross-entropy, per utterance (its mean is the paper's score over the utterances
  averaged; the paper used 50 random test utterances of fold 1);
- ``share`` = (ld_variant,u − LD_off) / (LD_on − LD_off), with LD the run's mean logit
  difference: its mean over utterances is the variant's share of the gap, exactly 0 for
  ``off`` and 1 for ``on``. The denominator is the run's, so resampling speakers holds it
  fixed (the band is of the numerator).

Rows are per test speaker (``speaker, n_utts``), so the aggregated table carries a speaker
band, as the contributions table does. Fold 1 also gets the paper's own protocol of the
erasures: ``paper_skip_adapted`` and ``paper_skip_upto_adapted`` (variant ``fold1_50``) are
``skip_adapted`` and ``skip_upto_adapted`` on 50 test utterances drawn with the analysis seed
(speaker ``all``), so its reading of one fold's subset sits beside every fold's. Columns ``family, variant, layer, depth, quantity,
value`` (``layer`` −1 and ``depth`` empty for variants of the whole encoder). A frozen run has
no adapter, so the analysis applies to runs with one.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from serlens.models.encoder import attention_mask, embed, masked_mean

COLUMNS = ["family", "variant", "layer", "depth", "quantity", "value"]
QUANTITIES = ("kl", "logit_diff", "correct", "share", "paper_score")
PER_LAYER = (
    "adapter_off",
    "adapter_only",
    "adapters_upto",
    "adapters_from",
    "patch_frozen_into_adapted",
    "patch_adapted_into_frozen",
    "patch_vproj_frozen_into_adapted",
    "patch_vproj_adapted_into_frozen",
    "skip_adapted",
    "skip_frozen",
    "skip_upto_adapted",
    "ablate_attn_adapted",
    "ablate_mlp_adapted",
    "ablate_attn_frozen",
    "ablate_mlp_frozen",
)


# --- the encoder, run with interventions --------------------------------------------------


def attn_out(layer: nn.Module, x: torch.Tensor, mask) -> torch.Tensor:
    """A Whisper encoder layer's attention update (pre-LN, as its forward computes it)."""
    out, _ = layer.self_attn(hidden_states=layer.self_attn_layer_norm(x), attention_mask=mask)
    return out


def mlp_out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))


def layer_forward(layer, x, mask, ablate: tuple[str, torch.Tensor] | None = None):
    """The layer as :class:`WhisperEncoderLayer` computes it in eval mode; ``ablate``
    ``(component, mean)`` replaces that component's update by ``mean`` (a D-vector)."""
    component = None if ablate is None else ablate[0]
    # the replaced component is not computed at all (its output would be discarded)
    if component == "attn":
        a = ablate[1].to(x.dtype).expand_as(x)
    else:
        a = attn_out(layer, x, mask)
    h = x + a
    if component == "mlp":
        m = ablate[1].to(h.dtype).expand_as(h)
    else:
        m = mlp_out(layer, h)
    return h + m


def run_variant(
    encoder,
    head,
    batch,
    *,
    start: tuple[int, torch.Tensor] | None = None,
    skip: int | set[int] | None = None,
    ablate: tuple[int, str, torch.Tensor] | None = None,
    patch_v: tuple[int, torch.Tensor] | None = None,
    capture: bool = False,
):
    """Head logits of one batch under one intervention.

    ``start = (i, x)``: begin at layer i with ``x`` as its input (the residual stream
    entering layer i of a reference run), so layers below an intervention, which it leaves
    unchanged, are not recomputed; i = L runs no layer. ``skip``: layers whose output is set
    to their input; ``ablate = (l, component, mean)``: :func:`layer_forward`'s ablation at
    layer l; ``patch_v = (l, v)``: layer l's ``v_proj`` output replaced by ``v`` (B, T, D).
    With ``capture`` also the residual stream entering every layer and leaving the last
    (``resid[0..L]``)."""
    if patch_v is not None:
        module = encoder.layers[patch_v[0]].self_attn.v_proj
        handle = module.register_forward_hook(lambda _m, _i, out: patch_v[1].to(out.dtype))
        try:
            return run_variant(
                encoder, head, batch, start=start, skip=skip, ablate=ablate, capture=capture
            )
        finally:
            handle.remove()
    mask = attention_mask(batch, torch.float32 if start is None else start[1].dtype)
    first, x = (0, embed(encoder, batch.mel)) if start is None else start
    resid = [x]
    skipped = {skip} if isinstance(skip, int) else set(skip or ())
    for li in range(first, len(encoder.layers)):
        layer = encoder.layers[li]
        if li in skipped:
            y = x
        elif ablate is not None and ablate[0] == li:
            y = layer_forward(layer, x, mask, ablate[1:])
        else:
            y = layer(x, mask)
        resid.append(y)
        x = y
    logits = head(masked_mean(encoder.layer_norm(x), batch.frame_mask))
    return (logits, resid) if capture else logits


@contextlib.contextmanager
def captured_outputs(encoder, layers):
    """Record every listed layer's ``v_proj`` output and attention update (its ``self_attn``
    output, before the residual sum) while the context is open: ``({l: v}, {l: a})``, each
    (B, T, D)."""
    v: dict[int, torch.Tensor] = {}
    attn: dict[int, torch.Tensor] = {}
    handles = []
    for li in layers:
        block = encoder.layers[li].self_attn
        handles.append(
            block.v_proj.register_forward_hook(
                lambda _m, _i, y, li=li: v.__setitem__(li, y.detach())
            )
        )
        handles.append(
            block.register_forward_hook(
                lambda _m, _i, y, li=li: attn.__setitem__(li, y[0].detach())
            )
        )
    try:
        yield v, attn
    finally:
        for handle in handles:
            handle.remove()


def cyclic_align(values: torch.Tensor, frame_mask: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(B, T', D) component outputs of paired utterances as (B, n_frames, D): frame t of
    utterance b takes the paired utterance's (t mod n_b)-th audio frame (n_b its audio frames,
    ``frame_mask``), so a replacement never carries padding or leading silence."""
    rows = []
    for b in range(values.shape[0]):
        valid = torch.nonzero(frame_mask[b], as_tuple=False).flatten()
        if len(valid) == 0:
            valid = torch.arange(values.shape[1], device=values.device)
        index = valid[torch.arange(n_frames, device=values.device) % len(valid)]
        rows.append(values[b, index])
    return torch.stack(rows)


def paired_components(run, indices: np.ndarray, layers, n_frames: int) -> dict[str, dict]:
    """Each listed layer's attention and MLP update on the training utterances ``indices``
    (one per test utterance of a batch, in its order), adapted and frozen, aligned to
    ``n_frames`` by :func:`cyclic_align`: ``{f"{which}/{component}": {l: (B, n_frames, D)}}``
    (resample-ablation)."""
    from serlens.audio import load_audio

    train = run.splits["train"]
    if train.waves is None:
        train.waves = [None] * len(train)
    for j in indices:
        if train.waves[j] is None:
            train.waves[j] = load_audio(train.paths[j])
    batch = run.logmel([train.waves[j] for j in indices], run.policy, run.max_seconds).to(
        run.device
    )
    encoder, wanted, out = run.encoder, set(layers), {}
    for which in ("adapted", "frozen"):
        context = contextlib.nullcontext() if which == "adapted" else run.adapter_disabled()
        with context:
            x = embed(encoder, batch.mel)
            mask = attention_mask(batch, x.dtype)
            for li, layer in enumerate(encoder.layers):
                if li > max(wanted):
                    break
                a = attn_out(layer, x, mask)
                m = mlp_out(layer, x + a)
                if li in wanted:
                    for name, value in (("attn", a), ("mlp", m)):
                        aligned = cyclic_align(value, batch.frame_mask, n_frames)
                        out.setdefault(f"{which}/{name}", {})[li] = aligned
                x = x + a + m
    return out


def layer_stride(n_layers: int, stride: int | str) -> int:
    """``analysis.causal_stride`` for an L-layer model: the integer itself, or for ``auto``
    max(1, ⌊L/8⌋) (every layer of tiny to small, every 3rd of medium, every 4th of large-v2:
    at least 8 points per curve, and the causal tests within the cost of training the run,
    README "GPU hours")."""
    if stride == "auto":
        return max(1, n_layers // 8)
    return max(int(stride), 1)


def tested_layers(n_layers: int, stride: int | str) -> list[int]:
    """The layers the per-layer interventions visit: every ``stride``-th (counting from
    the last layer down; :func:`layer_stride`), always the last, and the two layers on
    either side of the middle (⌈L/2⌉ − 1 and ⌈L/2⌉: the claims table's first-half /
    last-half split, :mod:`serlens.report.claims`); stride 1 is every layer."""
    stride = layer_stride(n_layers, stride)
    half = math.ceil(n_layers / 2)
    middle = {half - 1, half} & set(range(n_layers))
    return sorted({*range(n_layers - 1, -1, -stride), *middle})


def component_means(run, indices: np.ndarray, batch_size: int) -> dict[str, torch.Tensor]:
    """Mean over the audio frames of the sample ``indices`` (training split) of each layer's
    attention and MLP update, adapted (``adapted``) and frozen (``frozen``):
    ``{f"{which}/{component}": (L, D)}``."""
    encoder = run.encoder
    sums: dict[str, torch.Tensor] = {}
    frames = 0.0
    for which in ("adapted", "frozen"):
        context = contextlib.nullcontext() if which == "adapted" else run.adapter_disabled()
        with context, torch.inference_mode():
            for _, batch in run.batches(run.splits["train"], batch_size, indices):
                x = embed(encoder, batch.mel)
                mask = attention_mask(batch, x.dtype)
                w = batch.frame_mask.to(torch.float64).unsqueeze(-1)
                if which == "adapted":
                    frames += float(w.sum())
                for li, layer in enumerate(encoder.layers):
                    a = attn_out(layer, x, mask)
                    m = mlp_out(layer, x + a)
                    for name, value in (("attn", a), ("mlp", m)):
                        key = f"{which}/{name}"
                        total = (value.double() * w).sum(dim=(0, 1))
                        if key not in sums:
                            sums[key] = torch.zeros(
                                len(encoder.layers), total.shape[0], dtype=torch.float64
                            )
                        sums[key][li] += total.cpu()
                    x = x + a + m
    return {k: (v / max(frames, 1.0)).float() for k, v in sums.items()}


@contextlib.contextmanager
def swapped_factors(encoder, replace: dict[str, tuple[str, torch.Tensor]]):
    """Temporarily set LoRA factors: ``{module_name: ("A" | "B", weight)}``."""
    modules = dict(encoder.named_modules())
    saved = []
    for name, (which, weight) in replace.items():
        layer = modules[name]
        target = (layer.lora_A if which == "A" else layer.lora_B)["default"].weight
        saved.append((target, target.data.clone()))
        target.data.copy_(weight.to(target.dtype).to(target.device))
    try:
        yield
    finally:
        for target, data in saved:
            target.data.copy_(data)


def ab_swaps(encoder, epoch0: Path | None, seed: int) -> dict[str, dict]:
    """The two factor swaps: ``init_a`` (A from ``epoch0``, the adapter at initialisation;
    :func:`serlens.analysis.update_dynamics.load_factors`) and ``rotated_b`` (B·Q, Q a
    Haar-random r × r orthogonal matrix from ``seed``; Mezzadri 2007)."""
    from serlens.analysis.update_dynamics import load_factors

    modules = {n: m for n, m in encoder.named_modules() if _is_lora(m)}
    swaps: dict[str, dict] = {}
    if not modules:  # full fine-tuning: no factors to swap
        return swaps
    if epoch0 is not None:
        init = load_factors(Path(epoch0))
        missing = sorted(set(modules) - set(init))
        if missing:
            raise KeyError(
                f"{epoch0}: no initial A for {missing[:3]}; rerun training (it saves epoch 0)"
            )
        swaps["init_a"] = {n: ("A", torch.from_numpy(init[n]["A"]).float()) for n in modules}
    generator = torch.Generator().manual_seed(int(seed))
    replace = {}
    for name, m in modules.items():
        B = m.lora_B["default"].weight.detach().float().cpu()
        q, r = torch.linalg.qr(torch.randn(B.shape[1], B.shape[1], generator=generator))
        replace[name] = ("B", B @ (q * torch.sign(torch.diagonal(r))))
    swaps["rotated_b"] = replace
    return swaps


def update_only_in_v_proj(run) -> set[int]:
    """The layers whose update is all in ``self_attn.v_proj`` (adapters on v_proj only; never
    for full fine-tuning, which changes every parameter of a layer)."""
    if getattr(run, "base_state", None) is not None:
        return set()
    where: dict[int, set[str]] = {}
    for name, module in run.encoder.named_modules():
        if _is_lora(module) and name.startswith("layers."):
            parts = name.split(".")
            where.setdefault(int(parts[1]), set()).add(".".join(parts[2:]))
    return {li for li, names in where.items() if names == {"self_attn.v_proj"}}


class ReferenceStreams:
    """One batch's two reference runs (every update on: ``adapted``; every update off:
    ``frozen``), and which interventions reproduce them.

    A variant that starts at layer i from a stream equal to reference S's input to layer i,
    with layer i in S's state (its update on for the adapted run, off for the frozen one),
    computes S's output of layer i, so it starts at layer i + 1 from S's stream instead
    (:meth:`advance`). The same holds when layer i's ``v_proj`` output is replaced by S's at
    that layer and the layer's whole update is in ``v_proj`` (``v_only``). Streams equal in
    both runs (below the first updated layer, e.g. layer 0's input, which the convolutional
    stem computes before any adapter) are one object, so such variants also share the
    causal pass's computations by key. Every shortcut is exact: the skipped layer would run
    on the same input with the same weights and give the stored output bit for bit.
    """

    def __init__(self, adapted, frozen, v: dict, attn: dict, v_only: set[int], on: bool = True):
        self.adapted, self.frozen = list(adapted), list(frozen)
        self.on = on  # off: every variant computed as asked (what the tests compare with)
        for i, (a, f) in enumerate(zip(self.adapted, self.frozen, strict=True)):
            if on and a is not f and torch.equal(a, f):
                self.frozen[i] = a
        # {"adapted" | "frozen": {layer: output}} of v_proj and of the attention block
        self.v, self.attn = v, attn
        self.v_only = set(v_only)
        self.n_layers = len(self.adapted) - 1

    def is_reference(self, x: torch.Tensor) -> bool:
        return any(x is s for s in (*self.adapted, *self.frozen))

    def _references_at(self, i: int, x: torch.Tensor) -> list[str]:
        return [name for name in ("adapted", "frozen") if getattr(self, name)[i] is x]

    def advance(self, start, on_layers, extra: dict):
        """``(start, extra)`` of the same computation, moved past every layer it would
        recompute exactly (class docstring)."""
        i, x = start
        extra = dict(extra)
        while self.on and i < self.n_layers:
            refs = self._references_at(i, x)
            if not refs:
                break
            if "ablate" in extra:
                # the MLP ablated at layer i of a reference's own state: its attention update
                # is the reference's, so only the residual sums are left to compute
                layer, component, value = extra["ablate"]
                for name in refs:
                    a = self.attn.get(name, {}).get(i)
                    if layer == i and component == "mlp" and a is not None:
                        if (i in on_layers) == (name == "adapted"):
                            h = x + a
                            x = h + value.to(h.dtype).expand_as(h)
                            del extra["ablate"]
                            return (i + 1, x), extra
                break
            patch = extra.get("patch_v")
            nxt = None
            for name in refs:
                state = name == "adapted"
                if patch is not None and patch[0] == i:
                    same_v = self.v.get(name, {}).get(i) is patch[1]
                    if same_v and (i in self.v_only or (i in on_layers) == state):
                        nxt = name
                elif patch is None or patch[0] > i:
                    if (i in on_layers) == state:
                        nxt = name
                if nxt is not None:
                    break
            if nxt is None:
                break
            if patch is not None and patch[0] == i:
                del extra["patch_v"]
            i, x = i + 1, getattr(self, nxt)[i + 1]
        return (i, x), extra


def layer_plans(li: int, streams: ReferenceStreams, values: dict) -> list[tuple]:
    """The per-layer variants at layer ``li`` (:data:`PER_LAYER`), each as ``(family, layers
    with their update on, start = (layer, reference stream entering it), extra)``: ``extra``
    is :func:`run_variant`'s ``patch_v`` or ``ablate``; ``values["{which}/{component}"]`` the
    ablation's replacement (a mean D-vector, or the paired utterances' aligned outputs)."""
    adapted, frozen, n_layers = streams.adapted, streams.frozen, streams.n_layers
    v_adapted, v_frozen = streams.v.get("adapted", {}), streams.v.get("frozen", {})
    every = set(range(n_layers))
    plans = [
        ("adapter_off", every - {li}, (li, adapted[li]), {}),
        ("adapter_only", {li}, (li, frozen[li]), {}),
        ("adapters_upto", set(range(li + 1)), (li + 1, adapted[li + 1]), {}),
        ("adapters_from", set(range(li, n_layers)), (li, frozen[li]), {}),
        ("patch_frozen_into_adapted", every, (li + 1, frozen[li + 1]), {}),
        ("patch_adapted_into_frozen", set(), (li + 1, adapted[li + 1]), {}),
        ("patch_vproj_frozen_into_adapted", every, (li, adapted[li]), {"patch_v": (li, v_frozen.get(li))}),
        ("patch_vproj_adapted_into_frozen", set(), (li, frozen[li]), {"patch_v": (li, v_adapted.get(li))}),
        ("skip_adapted", every, (li + 1, adapted[li]), {}),
        ("skip_frozen", set(), (li + 1, frozen[li]), {}),
        ("skip_upto_adapted", every, (li + 1, adapted[0]), {}),
    ]  # fmt: skip
    for which, on_layers, stream in (("adapted", every, adapted), ("frozen", set(), frozen)):
        for comp in ("attn", "mlp"):
            ablate = {"ablate": (li, comp, values[f"{which}/{comp}"])}
            plans.append((f"ablate_{comp}_{which}", on_layers, (li, stream[li]), ablate))
    return plans


def computation_key(start, on_layers, extra: dict, streams: ReferenceStreams) -> tuple | None:
    """What a variant computes, for variants without ``extra`` that start from a reference
    stream (objects that live for the batch, so their ``id`` is theirs): those that run the same
    layers from the same stream with the same update above it are one computation
    (``adapters_upto(l)`` is ``patch_adapted_into_frozen(l)``; ``adapters_from(l + 1)`` is
    ``patch_frozen_into_adapted(l)``). The last layer's state is part of the key even below
    the start: it also decides the final LayerNorm (full fine-tuning)."""
    if extra or not streams.is_reference(start[1]):
        return None
    n_layers = streams.n_layers
    above = frozenset(on_layers) & frozenset(range(start[0], n_layers))
    return (start[0], id(start[1]), above, n_layers - 1 in on_layers)


def causal_passes(
    n_layers: int, stride: int | str, resample: bool = False, v_only: bool = True, swaps: int = 2
) -> float:
    """Encoder-pass equivalents of a run's causal tests over its test split (layer
    computations ÷ L, counted with the pass's own plans and shortcuts: :func:`layer_plans`,
    :meth:`ReferenceStreams.advance`, :func:`computation_key`), for adapters on v_proj of
    every layer (``v_only``; otherwise the v_proj shortcuts do not apply): layer 0's input
    is the one stream both runs share, as for any method whose stem is not trained (a layer
    subset shares more, full fine-tuning none, so their counts are lower or higher). An ablation
    replacing a component counts as the layer's other part (attention 0.45, MLP 0.55 of a
    layer, Whisper's FLOPs at crop length); resample-ablation adds the paired training
    utterances' passes up to the deepest tested layer in both encoders; the A/B swaps add one
    pass each (``swaps``: 2, or 1 without the initial adapter). Mean-ablation's means cost two
    passes over the analysis sample, not the test split, and are left out.
    """
    n = n_layers
    layers = tested_layers(n, stride)
    ref = [torch.full((1,), float(i)) for i in range(n + 1)]
    frozen = [ref[0]] + [torch.full((1,), -float(i)) for i in range(1, n + 1)]
    v = {k: {i: torch.zeros(1) for i in range(n)} for k in ("adapted", "frozen")}
    attn = {k: {i: torch.zeros(1) for i in range(n)} for k in ("adapted", "frozen")}
    streams = ReferenceStreams(ref, frozen, v, attn, set(range(n)) if v_only else set())
    share = {"attn": 0.45, "mlp": 0.55}
    total, seen = 2.0 * n, set()
    for li in layers:
        values = {f"{w}/{c}": torch.zeros(1) for w in ("adapted", "frozen") for c in share}
        for _, on_layers, start, extra in layer_plans(li, streams, values):
            moved, rest = streams.advance(start, on_layers, extra)
            key = computation_key(moved, on_layers, rest, streams)
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            layers_run = n - moved[0]
            if "ablate" in rest:  # its first layer runs only the other component
                layers_run -= share[rest["ablate"][1]]
            total += layers_run
    if resample:
        total += 2 * (max(layers) + 1)
    return total / n + swaps


def _is_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and "default" in module.lora_A


def causal_logits(
    run, settings: dict, epoch0: Path | None = None, shortcuts: bool = True
) -> tuple[np.ndarray, list[dict]]:
    """``(V, N, C)`` head logits of every variant (module docstring) on the test split, in
    its order, and the variants' ``{family, variant, layer}``.

    Per batch, the two reference runs (all adapters on, all off) keep their residual
    streams; every per-layer variant starts from the reference stream at the first layer it
    changes (:func:`run_variant`'s ``start``), so a variant at layer l costs L − l layers,
    about 15 · L/2 + 4 encoder passes per batch in all (+ 2 for the paired training
    utterances of resample-ablation). Variants that repeat a reference run's layer start
    past it, and variants that are one computation are computed once
    (:class:`ReferenceStreams`; ``shortcuts=False`` computes each as asked, for the tests):
    on tiny.en that is 20 of the 120 layer computations of a batch at stride 1, and an
    ablated component is never computed. ``settings["causal_stride"]`` visits every k-th
    layer only (:func:`tested_layers`; for 32-layer models). Memory: one batch of frame
    states per reference plus the logits."""
    from serlens.analysis.passes import analysis_sample

    encoder, head, test = run.encoder, run.head, run.splits["test"]
    n_layers = len(encoder.layers)
    layers = tested_layers(n_layers, settings["causal_stride"])
    resample = settings["causal_ablation"] == "resample"
    if resample:  # one randomly paired training utterance per test utterance, seeded
        rng = np.random.default_rng([int(settings["seed"]), 12])
        pairs = rng.integers(0, len(run.splits["train"]), size=len(test))
    else:
        means = component_means(run, analysis_sample(run, settings), settings["batch_size"])
    ablation = "resample" if resample else "mean"
    swaps = ab_swaps(encoder, epoch0, settings["seed"])
    variants: list[dict] = [
        {"family": "reference", "variant": "on", "layer": -1},
        {"family": "reference", "variant": "off", "layer": -1},
    ]
    variants += [
        {"family": f, "variant": ablation if f.startswith("ablate_") else f, "layer": li}
        for f in PER_LAYER
        for li in layers
    ]
    variants += [{"family": "ab_swap", "variant": name, "layer": -1} for name in swaps]
    index = {(v["family"], v["variant"], v["layer"]): k for k, v in enumerate(variants)}
    v_only = update_only_in_v_proj(run)
    out = np.zeros((len(variants), len(test), head.classifier.out_features), dtype=np.float32)

    def put(family, li, rows, logits, variant=None):
        if variant is None:
            variant = ablation if family.startswith("ablate_") else family
        out[index[(family, variant, li)], rows] = logits.float().cpu().numpy()

    with torch.inference_mode():
        for rows, batch in run.batches(test, settings["batch_size"]):
            with run.update_in(None), captured_outputs(encoder, layers) as (v_adapted, a_adapted):
                on, adapted = run_variant(encoder, head, batch, capture=True)
            with run.update_in(set()), captured_outputs(encoder, layers) as (v_frozen, a_frozen):
                off, frozen = run_variant(encoder, head, batch, capture=True)
            streams = ReferenceStreams(
                adapted,
                frozen,
                {"adapted": v_adapted, "frozen": v_frozen},
                {"adapted": a_adapted, "frozen": a_frozen},
                v_only,
                shortcuts,
            )
            adapted, frozen = streams.adapted, streams.frozen
            if resample:
                paired = paired_components(run, pairs[rows], layers, adapted[0].shape[1])
            put("reference", -1, rows, on, "on")
            put("reference", -1, rows, off, "off")
            same: dict[tuple, torch.Tensor] = {}  # this batch's computations, by what they run
            for li in layers:
                values = {}
                for which in ("adapted", "frozen"):
                    for comp in ("attn", "mlp"):
                        values[f"{which}/{comp}"] = (
                            paired[f"{which}/{comp}"][li]
                            if resample
                            else means[f"{which}/{comp}"][li].to(batch.mel.device)
                        )
                for family, on_layers, start, extra in layer_plans(li, streams, values):
                    start, extra = streams.advance(start, on_layers, extra)
                    key = computation_key(start, on_layers, extra, streams) if shortcuts else None
                    if key is not None and key in same:
                        logits = same[key]
                    else:
                        with run.update_in(on_layers):
                            logits = run_variant(encoder, head, batch, start=start, **extra)
                        if key is not None:
                            same[key] = logits
                    put(family, li, rows, logits)
            for name, replace in swaps.items():
                with swapped_factors(encoder, replace):
                    put("ab_swap", -1, rows, run_variant(encoder, head, batch), name)
    return out, variants


def write_causal(
    path: Path, logits: np.ndarray, variants: list[dict], utt_ids: list[str], n_layers: int
) -> None:
    """``causal.safetensors``: ``test/logits`` (V, N, C); the variants and the rows' ids in
    the metadata (:func:`serlens.analysis.passes.write_states`)."""
    from serlens.analysis.passes import write_states

    write_states(
        path,
        {"test": {"logits": logits}},
        {"test": utt_ids},
        {"variants": json.dumps(variants), "n_layers": str(int(n_layers))},
    )


# --- the analysis: metrics from the stored logits -------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logit_diff(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z_y − mean_{c≠y} z_c per utterance (rows of ``z``)."""
    z = z.astype(np.float64)
    true = z[np.arange(len(labels)), labels]
    others = (z.sum(axis=1) - true) / (z.shape[1] - 1)
    return true - others


def per_utterance(logits: np.ndarray, variants: list[dict], labels: np.ndarray) -> dict:
    """``{quantity: (V, N)}`` of the module docstring's per-utterance quantities."""
    ref = {(v["family"], v["variant"]): k for k, v in enumerate(variants)}
    on, off = ref[("reference", "on")], ref[("reference", "off")]
    logp = _log_softmax(logits)
    p_on = np.exp(logp[on])
    kl = (p_on[None] * (logp[on][None] - logp)).sum(axis=-1)
    ld = np.stack([logit_diff(z, labels) for z in logits])
    gap = ld[on].mean() - ld[off].mean()
    share = (ld - ld[off].mean()) / gap if abs(gap) > 1e-12 else np.full_like(ld, np.nan)
    correct = (logits.argmax(axis=-1) == labels[None]).astype(np.float64)
    confidence = np.exp(logp).max(axis=-1)
    loss = -logp[:, np.arange(len(labels)), labels]
    paper = (correct[on] - correct) + 0.5 * (confidence[on] - confidence) - 0.1 * (loss - loss[on])
    return {
        "kl": np.maximum(kl, 0.0),
        "logit_diff": ld,
        "correct": correct,
        "share": share,
        "paper_score": paper,
    }


def causal_table(
    logits: np.ndarray,
    variants: list[dict],
    labels: np.ndarray,
    speakers: np.ndarray,
    n_layers: int,
) -> pd.DataFrame:
    """Per-speaker rows (``speaker, n_utts``) of every variant and quantity."""
    values = per_utterance(logits, variants, labels)
    speakers = np.asarray(speakers, dtype=object)
    rows = []
    for speaker in sorted(set(speakers.tolist())):
        member = speakers == speaker
        for k, v in enumerate(variants):
            layer = int(v["layer"])
            depth = (layer + 1) / n_layers if layer >= 0 else np.nan
            for quantity in QUANTITIES:
                rows.append(
                    {
                        "family": v["family"],
                        "variant": v["variant"],
                        "layer": layer,
                        "depth": depth,
                        "quantity": quantity,
                        "value": float(values[quantity][k, member].mean()),
                        "speaker": speaker,
                        "n_utts": int(member.sum()),
                    }
                )
    return pd.DataFrame(rows, columns=[*COLUMNS, "speaker", "n_utts"])


PAPER_FAMILIES = ("skip_adapted", "skip_upto_adapted")
PAPER_SUBSET = 50


def paper_rows(
    logits: np.ndarray, variants: list[dict], labels: np.ndarray, n_layers: int, seed: int
) -> pd.DataFrame:
    """The paper code's residual erasure protocol: single and progressive layer skips of the
    adapted encoder on ``PAPER_SUBSET`` random test utterances (its fold 1), every quantity
    (``paper_score`` is its "contribution"), as families ``paper_<family>``."""
    rng = np.random.default_rng([int(seed), 50])
    n = logits.shape[1]
    pick = np.sort(rng.choice(n, size=min(PAPER_SUBSET, n), replace=False))
    keep = [
        k
        for k, v in enumerate(variants)
        if v["family"] == "reference" or v["family"] in PAPER_FAMILIES
    ]
    sub = [variants[k] for k in keep]
    values = per_utterance(logits[keep][:, pick], sub, labels[pick])
    rows = []
    for k, v in enumerate(sub):
        if v["family"] == "reference":
            continue
        layer = int(v["layer"])
        for quantity in QUANTITIES:
            rows.append(
                {
                    "family": f"paper_{v['family']}",
                    "variant": f"fold1_{PAPER_SUBSET}",
                    "layer": layer,
                    "depth": (layer + 1) / n_layers,
                    "quantity": quantity,
                    "value": float(values[quantity][k].mean()),
                    "speaker": "all",
                    "n_utts": len(pick),
                }
            )
    return pd.DataFrame(rows, columns=[*COLUMNS, "speaker", "n_utts"])


def read_causal(path: Path) -> tuple[np.ndarray, list[dict], list[str], int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        meta = handle.metadata()
        logits = handle.get_tensor("test/logits")
    return (
        logits,
        json.loads(meta["variants"]),
        json.loads(meta["test/utt_ids"]),
        int(meta["n_layers"]),
    )


def _compute(run, settings) -> pd.DataFrame:
    logits, variants, utt_ids, n_layers = read_causal(run.path("causal"))
    test = run.splits["test"]
    if list(test.utt_ids) != list(utt_ids):
        raise ValueError(
            f"{run.path('causal')}: its test rows are not the fold's test split; rerun its pass"
        )
    speakers = np.array([run.speakers[u] for u in utt_ids], dtype=object)
    labels = np.asarray(test.labels)
    table = causal_table(logits, variants, labels, speakers, n_layers)
    if int(run.fold) == 1:
        paper = paper_rows(logits, variants, labels, n_layers, settings["seed"])
        table = pd.concat([table, paper], ignore_index=True)
    return table


def _draw(tables, model, context):
    from serlens.report.figures.causal import causal_figure

    return causal_figure(tables["causal"], model, context["n_classes"])


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="causal",
        compute=_compute,
        applies_to=lambda method: method.has_update,
        reads=frozenset({"causal"}),
        keys=(),
        uses_seed=True,  # the paper protocol's 50 utterances of fold 1
        table=TableSpec(("family", "variant", "layer", "depth", "quantity")),
        figures=(FigureSpec("causal", _draw, ("causal",), "Causal tests"),),
        doc="adapter ablation, activation patching (layer output, v_proj), layer skips, component ablation and A/B swaps",
    )


SPEC = _spec()
