"""The seed-to-seed floor (``seed_floor.tsv``): how similar two runs are that differ only in seed.

A LoRA-vs-frozen similarity (CKA of a layer, the overlap of two ranks' subspaces) means
little until it is set against what two trainings of the *same* method give when only the
training seed changes (initialisation of A and the head, data order, dropout). For every
LoRA method, fold and seed ``s`` other than the first configured seed ``s0``, this analysis
compares run ``s`` with run ``s0`` of the same model, method and fold:

- ``cka_linear``, ``cka_debiased``: CKA (Kornblith et al. 2019; debiased with the unbiased
  HSIC of Song et al. 2012) between the two runs' adapted encoders on the fold's test
  utterances, layer by layer (pooled states, layer 0 = conv stem … L = final LayerNorm).
  A LoRA-vs-frozen CKA below this floor is a difference as large as reseeding makes.
- ``phi``: Hu et al. (2021, §7.2)'s normalised subspace similarity between the two runs'
  A matrices of each adapted module, φ(i) = ‖U_iᵀ V_i‖²_F / i for the top-i right singular
  vectors U_i, V_i of A_s and A_s0, i = 1..r (0 = orthogonal, 1 = the same subspace); its
  random-subspace expectation is i / d_in (φ(i, i) of independent uniform subspaces),
  given as ``random_value`` beside it (a column named ``null`` would read back as empty).

Columns: ``reference_seed, measure, module, layer, depth, i, value, random_value`` (``module`` and
``i`` empty for CKA rows). With one configured seed there is no pair: the aggregated table
says that the floor needs two or more seeds instead of being left out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["reference_seed", "measure", "module", "layer", "depth", "i", "value", "random_value"]
NEEDS_SEEDS = "the seed-to-seed floor needs two or more training seeds (config key seeds)"


def cka_rows(states: np.ndarray, reference: np.ndarray) -> list[dict]:
    """Layer-by-layer CKA between two ``(n, L + 1, d)`` pooled-state arrays of the same utterances."""
    from serlens.analysis.cka import debiased_linear_cka, linear_cka

    n_layers = states.shape[1] - 1
    rows = []
    for layer in range(n_layers + 1):
        X = states[:, layer].astype(np.float64)
        Y = reference[:, layer].astype(np.float64)
        common = {"module": "", "layer": layer, "depth": layer / n_layers, "i": np.nan}
        rows.append(
            {"measure": "cka_linear", **common, "value": linear_cka(X, Y), "random_value": np.nan}
        )
        rows.append(
            {
                "measure": "cka_debiased",
                **common,
                "value": debiased_linear_cka(X, Y) if len(X) >= 4 else np.nan,
                "random_value": 0.0,  # debiased CKA of independent representations (Song et al. 2012)
            }
        )
    return rows


def phi_rows(adapter, reference_adapter, n_layers: int) -> list[dict]:
    """φ(i) between the A matrices of two adapters, for every module both adapt, i = 1..r."""
    from serlens.analysis.lora_spectra import (
        _depth,
        _module_order,
        layer_index,
        load_lora_a,
        random_subspace_phi,
    )
    from serlens.analysis.spectra import subspace_similarity

    ours, theirs = load_lora_a(adapter), load_lora_a(reference_adapter)
    if set(ours) != set(theirs):
        raise ValueError(
            f"{adapter} and {reference_adapter} adapt different modules "
            f"({sorted(set(ours) ^ set(theirs))}); they are not two seeds of one method"
        )
    rows = []
    for module in sorted(ours, key=_module_order):
        A, A_ref = ours[module], theirs[module]
        rank, d_in = A.shape
        layer = layer_index(module)
        for i in range(1, rank + 1):
            rows.append(
                {
                    "measure": "phi",
                    "module": module.split(".", 2)[-1] if layer is not None else module,
                    "layer": layer,
                    "depth": _depth(layer, n_layers),
                    "i": i,
                    "value": subspace_similarity(A, A_ref, i, i),
                    "random_value": random_subspace_phi(i, i, d_in),
                }
            )
    return rows


def _compute(runs, settings) -> pd.DataFrame:
    """``runs``: ``{"run": RunData, "reference": RunData}`` of one model, method and fold."""
    run, reference = runs["run"], runs["reference"]
    ours, theirs = run.states("states"), reference.states("states")
    if ours.utt_ids("test") != theirs.utt_ids("test"):
        raise ValueError(
            f"{ours.path} and {theirs.path} hold different test utterances; rerun their passes"
        )
    states, ref_states = ours["test/pooled"], theirs["test/pooled"]
    n_layers = states.shape[1] - 1
    rows = cka_rows(states, ref_states) + phi_rows(
        run.path("adapter"), reference.path("adapter"), n_layers
    )
    table = pd.DataFrame(rows, columns=COLUMNS[1:])
    table.insert(0, "reference_seed", int(reference.seed))
    return table


def _spec():
    from serlens.analysis.registry import AnalysisSpec, TableSpec

    return AnalysisSpec(
        name="seed_floor",
        compute=_compute,
        applies_to=lambda method: method.trains_encoder,
        reads=frozenset({"states", "adapter"}),
        keys=(),
        table=TableSpec(("measure", "module", "layer", "depth", "i"), ("value", "random_value")),
        scope="seed_pairs",
        doc="CKA and subspace similarity between two runs that differ only in the training seed",
    )


SPEC = _spec()
