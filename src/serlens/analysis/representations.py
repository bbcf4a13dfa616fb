"""Representational similarity between the frozen and the LoRA encoder (``cka.tsv``).

Both encoders are the same object (``TrainedRun.adapter_disabled()`` switches the adapter
off), so each batch of the fold's test utterances is run twice: adapter on, adapter off.
A layer's representation is its pooled hidden state (masked mean over the frames that hold
audio) for each of the ``L + 1`` hidden states of
:func:`serlens.models.encoder.pooled_layer_states` (index 0 = conv stem + positions,
``L`` = final LayerNorm output): an ``n_test x d_model`` matrix per layer, in float64.
The workflow's analysis reads the same pooled states from the encoder passes (the base
pass for the frozen encoder, the run's pass for the LoRA one).

``cka.tsv`` columns ``layer_frozen, layer_lora, depth_frozen, depth_lora, kind, value,
null_mean, null_q95, ci_low, ci_high``: ``value`` is the CKA between frozen layer
``layer_frozen`` and LoRA layer ``layer_lora`` for every pair (``(L + 1)²`` rows per kind),
``depth = layer / L``. The layer-by-layer comparison is the diagonal ``layer_frozen ==
layer_lora`` of the same rows; no separate table is written. ``kind`` is ``linear``
(biased linear CKA, Kornblith et al. 2019), ``debiased`` (linear CKA with the unbiased
HSIC of Song et al. 2012; may be slightly negative) or ``rbf`` (RBF CKA with bandwidth
``rbf_threshold x`` the median distance, per representation; ``rbf_bandwidth`` says which
median, Kornblith et al.'s reference one by default, :func:`serlens.analysis.cka.rbf_gram`).
The matrix is not symmetric: entry (a, b) compares frozen a with LoRA b.

On the diagonal rows only (the other rows leave them empty), with the seeded generator of
``analysis_seed`` (the same permutations and speaker draws for every layer and kind):

* ``null_mean``, ``null_q95``: mean and 95th percentile of the permutation null, CKA of
  the frozen layer against the LoRA layer with the test utterances shuffled
  (``cka_permutations`` permutations; 0 = none, columns empty). A layer's CKA means
  something only above ``null_q95`` (:func:`serlens.analysis.cka.cka_permutation_null`).
* ``ci_low``, ``ci_high``: 95 % percentile band of a speaker-cluster bootstrap
  (``cka_resamples`` resamples; 0 = none): the fold's test speakers (from the manifest)
  are drawn with replacement and CKA is recomputed on the drawn speakers' utterances with
  multiplicity (weights, no copied rows; the debiased kind uses the weighted U-statistic,
  :func:`serlens.analysis.cka.hsic_unbiased_weighted`). With two test speakers per fold
  (leave-one-session-out) the band is coarse: it spans about the two one-speaker values.
  Empty with one test speaker.

Cost: the null and the band reuse each diagonal layer's prepared Gram matrix (one ``n²``
gather and inner product per permutation, about ten ``n²`` passes per resample); nothing
is recomputed from the features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from serlens.analysis.cka import (
    KINDS,
    cka_layers,
    cluster_bootstrap_weights,
    permutation_indices,
)

CKA_KINDS = KINDS
CKA_KEYS = ["layer_frozen", "layer_lora", "depth_frozen", "depth_lora", "kind"]
#: The diagonal's statistics (empty off the diagonal).
CKA_STATISTICS = ["null_mean", "null_q95", "ci_low", "ci_high"]
CKA_VALUES = ["value", *CKA_STATISTICS]
CKA_COLUMNS = [*CKA_KEYS, *CKA_VALUES]


def frozen_and_lora_states(
    run, split: str = "test", batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled layer states of ``split`` with the adapter off and on: two ``(L + 1, n, d)`` float64 arrays.

    Rows are in the split's order (batches run in duration order and are put back).
    """
    import torch

    from serlens.models.encoder import pooled_layer_states

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


def cka_table(
    frozen: np.ndarray,
    lora: np.ndarray,
    threshold: float = 0.5,
    *,
    bandwidth: str = "kornblith",
    permutations: int = 0,
    resamples: int = 0,
    speakers=None,
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy all-pairs CKA of every kind between ``frozen[a]`` and ``lora[b]`` (``(L + 1, n, d)``
    arrays), with the diagonal's permutation null and speaker band (module docstring).

    ``speakers``: the speaker of each of the ``n`` utterances (needed when ``resamples`` >
    0). ``seed`` seeds the permutations, drawn first, then the speaker draws.
    """
    if frozen.shape[0] != lora.shape[0]:
        raise ValueError(
            f"frozen and LoRA states differ in layer count: {frozen.shape} vs {lora.shape}"
        )
    n_states, n = frozen.shape[0], frozen.shape[1]
    rng = np.random.default_rng(seed)
    perms = permutation_indices(n, permutations, rng) if permutations > 0 else None
    weights = None
    if resamples > 0:
        if speakers is None or len(speakers) != n:
            raise ValueError(
                f"cka: the speaker band needs one speaker per test utterance ({n}); "
                f"got {None if speakers is None else len(speakers)}"
            )
        weights = cluster_bootstrap_weights(speakers, resamples, rng)
    depth = np.arange(n_states) / max(n_states - 1, 1)
    layer_a, layer_b = np.meshgrid(np.arange(n_states), np.arange(n_states), indexing="ij")
    diagonal = (layer_a == layer_b).ravel()
    tables = []
    for kind in CKA_KINDS:
        result = cka_layers(
            list(frozen),
            list(lora),
            kind,
            threshold=threshold,
            bandwidth=bandwidth,
            perms=perms,
            weights=weights,
        )
        table = pd.DataFrame(
            {
                "layer_frozen": layer_a.ravel(),
                "layer_lora": layer_b.ravel(),
                "depth_frozen": depth[layer_a.ravel()],
                "depth_lora": depth[layer_b.ravel()],
                "kind": kind,
                "value": result.matrix.ravel(),
            }
        )
        for column, values in result.summary().items():
            table[column] = np.nan
            table.loc[diagonal, column] = values  # diagonal rows come in layer order
        tables.append(table)
    return pd.concat(tables, ignore_index=True)[CKA_COLUMNS]


def compute_cka(run, cfg: dict, seed: int) -> pd.DataFrame:
    """``cka.tsv`` of a LoRA run: frozen vs LoRA CKA on the fold's test utterances.

    Reads ``cfg["batch_size"]`` and ``cfg["rbf_threshold"]`` (and ``rbf_bandwidth``,
    ``cka_permutations`` where given; no speaker band, a live run carries no speakers);
    ``seed`` seeds the permutations. Layout in the module docstring.
    """
    if not run.is_lora:
        raise ValueError(
            f"cka: run {run.model}/{run.method}/fold{run.fold} has no adapter; CKA compares frozen with LoRA"
        )
    frozen, lora = frozen_and_lora_states(run, "test", cfg["batch_size"])
    return cka_table(
        frozen,
        lora,
        cfg["rbf_threshold"],
        bandwidth=cfg.get("rbf_bandwidth", "kornblith"),
        permutations=cfg.get("cka_permutations", 0),
        seed=seed,
    )


# --------------------------------------------------------------------------- the workflow's analysis


def speakers_of(run, utt_ids) -> list[str]:
    """The speaker of each test utterance, from the run's manifest."""
    speakers = run.speakers
    missing = [u for u in utt_ids if u not in speakers]
    if missing:
        raise ValueError(
            f"cka: {len(missing)} test utterances have no speaker in {run.path('manifest')} "
            f"(e.g. {missing[:3]}); rebuild the corpus tables."
        )
    return [str(speakers[u]) for u in utt_ids]


def _compute(run, settings) -> pd.DataFrame:
    own, base = run.states("states"), run.states("base_states")
    utt_ids = own.utt_ids("test")
    if utt_ids != base.utt_ids("test"):
        raise ValueError(
            f"{own.path} and {base.path} hold different test utterances; rerun both passes."
        )
    frozen = base["test/pooled"].astype(np.float64).transpose(1, 0, 2)
    lora = own["test/pooled"].astype(np.float64).transpose(1, 0, 2)
    resamples = settings["cka_resamples"]
    return cka_table(
        frozen,
        lora,
        settings["rbf_threshold"],
        bandwidth=settings["rbf_bandwidth"],
        permutations=settings["cka_permutations"],
        resamples=resamples,
        speakers=speakers_of(run, utt_ids) if resamples > 0 else None,
        seed=settings["seed"],
    )


def _draw(tables, model, context):
    from serlens.report.figures import cka_figure

    return cka_figure(tables["cka"], model, tables.get("seed_floor"))


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="cka",
        compute=_compute,
        applies_to=lambda method: method.trains_encoder,
        reads=frozenset({"states", "base_states"}),
        keys=("rbf_threshold", "rbf_bandwidth", "cka_permutations", "cka_resamples"),
        uses_seed=True,
        table=TableSpec(tuple(CKA_KEYS), tuple(CKA_VALUES)),
        figures=(FigureSpec("cka", _draw, ("cka", "seed_floor"), "CKA"),),
        doc=(
            "linear, debiased and RBF CKA between every frozen and adapted layer, with a "
            "permutation null and a speaker-bootstrap band for the same layer"
        ),
    )


SPEC = _spec()
