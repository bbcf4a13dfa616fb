"""Representational similarity between the frozen and the LoRA encoder (``cka.tsv``).

Both encoders are the same object (``TrainedRun.adapter_disabled()`` switches the adapter
off), so each batch of the fold's test utterances is run twice: adapter on, adapter off.
A layer's representation is its pooled hidden state (masked mean over the frames that hold
audio) for each of the ``L + 1`` hidden states of
:func:`serlens.models.encoder.pooled_layer_states` (index 0 = conv stem + positions,
``L`` = final LayerNorm output): an ``n_test x d_model`` matrix per layer, in float64.

``cka.tsv`` columns ``layer_frozen, layer_lora, depth_frozen, depth_lora, kind, value``:
CKA between frozen layer ``layer_frozen`` and LoRA layer ``layer_lora`` for every pair
(``(L + 1)²`` rows per kind), ``depth = layer / L``. The layer-by-layer comparison is the
diagonal ``layer_frozen == layer_lora`` of the same rows; no separate table is written.
``kind`` is ``linear`` (biased linear CKA, Kornblith et al. 2019), ``debiased`` (linear
CKA with the unbiased HSIC of Song et al. 2012; may be slightly negative) or ``rbf`` (RBF
CKA with bandwidth ``rbf_threshold x`` median pairwise distance, per representation). The
matrix is not symmetric: entry (a, b) compares frozen a with LoRA b.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from serlens.analysis.cka import cka_matrix
from serlens.models.encoder import pooled_layer_states

CKA_KINDS = ("linear", "debiased", "rbf")
CKA_COLUMNS = ["layer_frozen", "layer_lora", "depth_frozen", "depth_lora", "kind", "value"]


def frozen_and_lora_states(
    run, split: str = "test", batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled layer states of ``split`` with the adapter off and on: two ``(L + 1, n, d)`` float64 arrays.

    Rows are in the split's order (batches run in duration order and are put back).
    """
    data = run.splits[split]
    n_states = len(run.encoder.layers) + 1
    d_model = run.encoder.config.d_model
    frozen = np.empty((n_states, len(data), d_model), dtype=np.float64)
    lora = np.empty_like(frozen)
    with torch.inference_mode():
        for idx, batch in run.batches(data, batch_size):
            lora[:, idx] = (
                pooled_layer_states(run.encoder, batch).double().cpu().numpy().transpose(1, 0, 2)
            )
            with run.adapter_disabled():
                frozen[:, idx] = (
                    pooled_layer_states(run.encoder, batch)
                    .double()
                    .cpu()
                    .numpy()
                    .transpose(1, 0, 2)
                )
    return frozen, lora


def cka_table(frozen: np.ndarray, lora: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """Tidy all-pairs CKA of every kind between ``frozen[a]`` and ``lora[b]`` (``(L + 1, n, d)`` arrays)."""
    if frozen.shape[0] != lora.shape[0]:
        raise ValueError(
            f"frozen and LoRA states differ in layer count: {frozen.shape} vs {lora.shape}"
        )
    n_states = frozen.shape[0]
    depth = np.arange(n_states) / max(n_states - 1, 1)
    layer_a, layer_b = np.meshgrid(np.arange(n_states), np.arange(n_states), indexing="ij")
    tables = []
    for kind in CKA_KINDS:
        values = cka_matrix(list(frozen), list(lora), kind, threshold=threshold)
        tables.append(
            pd.DataFrame(
                {
                    "layer_frozen": layer_a.ravel(),
                    "layer_lora": layer_b.ravel(),
                    "depth_frozen": depth[layer_a.ravel()],
                    "depth_lora": depth[layer_b.ravel()],
                    "kind": kind,
                    "value": values.ravel(),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)[CKA_COLUMNS]


def compute_cka(run, cfg: dict, seed: int) -> pd.DataFrame:
    """``cka.tsv`` of a LoRA run: frozen vs LoRA CKA on the fold's test utterances.

    Reads ``cfg["batch_size"]`` and ``cfg["rbf_threshold"]``; ``seed`` is unused (every
    test utterance is used, nothing is sampled). Layout in the module docstring.
    """
    if not run.is_lora:
        raise ValueError(
            f"cka: run {run.model}/{run.method}/fold{run.fold} has no adapter; CKA compares frozen with LoRA"
        )
    frozen, lora = frozen_and_lora_states(run, "test", cfg["batch_size"])
    return cka_table(frozen, lora, cfg["rbf_threshold"])


# --------------------------------------------------------------------------- the workflow's analysis


def _compute(run, settings) -> pd.DataFrame:
    own, base = run.states("states"), run.states("base_states")
    if own.utt_ids("test") != base.utt_ids("test"):
        raise ValueError(
            f"{own.path} and {base.path} hold different test utterances; rerun both passes."
        )
    frozen = base["test/pooled"].astype(np.float64).transpose(1, 0, 2)
    lora = own["test/pooled"].astype(np.float64).transpose(1, 0, 2)
    return cka_table(frozen, lora, settings["rbf_threshold"])


def _draw(tables, model, context):
    from serlens.report.figures import cka_figure

    return cka_figure(tables["cka"], model)


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="cka",
        compute=_compute,
        applies_to=lambda method: method.trains_encoder,
        reads=frozenset({"states", "base_states"}),
        keys=("rbf_threshold",),
        table=TableSpec(("layer_frozen", "layer_lora", "depth_frozen", "depth_lora", "kind")),
        figures=(FigureSpec("cka", _draw, ("cka",), "CKA"),),
        doc="linear, debiased and RBF CKA between every frozen and adapted layer",
    )


SPEC = _spec()
