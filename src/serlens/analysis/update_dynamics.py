"""How the LoRA update grows over training (``update_dynamics.tsv``), from the adapter saved at
initialisation (epoch 0) and after every epoch (``adapter_epochs/epoch{e}.safetensors``).

For every adapted module and epoch ``e`` (with A_e, B_e the factors, s the run's scaling
α/r or α/√r, ΔW_e = s·B_e·A_e):

- ``delta_w_norm``: ‖ΔW_e‖_F (0 at initialisation, where B = 0; Hu et al. 2021);
- ``delta_w_sigma1``: its largest singular value, ``delta_w_energy_rank``: the number of
  directions holding ``energy_fraction`` of ‖ΔW_e‖²_F (0 at epoch 0);
- ``a_change``: ‖A_e − A_0‖_F / ‖A_0‖_F, how far A moved from its random initialisation
  (a trained A is known to stay close to it: Zhu et al. 2024, "Asymmetry in low-rank adapters");
- ``a_init_phi``: φ(A_e, A_0) = ‖U_eᵀ U_0‖²_F / r for the right singular subspaces of A_e
  and A_0 (Hu et al. 2021, eq. 7) — 1 while A keeps its initial row space; ``random_value`` is r / d_in,
  the value for an unrelated random subspace;
- ``b_norm``: ‖B_e‖_F.

Columns ``module, layer, depth, epoch, quantity, value, random_value`` (``random_value`` empty where a
quantity has none). ``depth = (layer + 1) / L`` as in ``svd.tsv``. The epoch the run kept
(best dev UAR) is in its ``history.tsv``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["module", "layer", "depth", "epoch", "quantity", "value", "random_value"]
_EPOCH = re.compile(r"^epoch(\d+)\.safetensors$")


def epoch_files(folder: Path) -> dict[int, Path]:
    """``{epoch: file}`` of an ``adapter_epochs/`` folder, in epoch order; epoch 0 must be there."""
    folder = Path(folder)
    files = {
        int(m[1]): folder / name
        for name in sorted(p.name for p in folder.iterdir())
        if (m := _EPOCH.match(name))
    }
    if 0 not in files:
        raise FileNotFoundError(
            f"{folder}: no epoch0.safetensors (the adapter at initialisation); rerun its training"
        )
    return dict(sorted(files.items()))


def load_factors(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {"A": ..., "B": ...}}`` (float64) of one snapshot."""
    from safetensors.numpy import load_file

    from serlens.analysis.lora_spectra import _ADAPTER_KEY

    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        match = _ADAPTER_KEY.match(key)
        if match:
            out.setdefault(match["module"], {})[match["which"]] = value.astype(np.float64)
    if not out:
        raise ValueError(f"{path}: no LoRA weights (keys like '...v_proj.lora_A.weight')")
    return out


def update_table(
    snapshots: dict[int, dict], scalings: dict[str, float], n_layers: int, fraction: float
) -> pd.DataFrame:
    """The module docstring's quantities for every module of every snapshot; ``scalings``:
    each module's α/r (or α/√r) from the run's adapter config."""
    from serlens.analysis.lora_spectra import (
        _depth,
        _module_order,
        layer_index,
        product_singular_values,
        random_subspace_phi,
    )
    from serlens.analysis.spectra import energy_rank, subspace_similarity

    first = snapshots[min(snapshots)]
    rows = []
    for module in sorted(first, key=_module_order):
        A0 = first[module]["A"]
        rank, d_in = A0.shape
        layer = layer_index(module)
        where = {"module": module, "layer": layer, "depth": _depth(layer, n_layers)}
        for epoch, factors in snapshots.items():
            A, B = factors[module]["A"], factors[module]["B"]
            sigma = scalings[module] * product_singular_values(B, A)
            values = {
                "delta_w_norm": (float(np.sqrt(np.sum(sigma**2))), np.nan),
                "delta_w_sigma1": (float(sigma.max()), np.nan),
                "delta_w_energy_rank": (float(energy_rank(sigma, fraction)), np.nan),
                "a_change": (float(np.linalg.norm(A - A0) / np.linalg.norm(A0)), np.nan),
                "a_init_phi": (
                    subspace_similarity(A, A0, rank, rank),
                    random_subspace_phi(rank, rank, d_in),
                ),
                "b_norm": (float(np.linalg.norm(B)), np.nan),
            }
            rows += [
                {**where, "epoch": epoch, "quantity": q, "value": v, "random_value": n}
                for q, (v, n) in values.items()
            ]
    return pd.DataFrame(rows, columns=COLUMNS)


def update_from_files(epochs_dir: Path, adapter_dir: Path, fraction: float) -> pd.DataFrame:
    from serlens.analysis.lora_spectra import _n_layers, load_lora_factors

    snapshots = {e: load_factors(p) for e, p in epoch_files(epochs_dir).items()}
    scalings = {m: scale for m, (_, _, scale) in load_lora_factors(adapter_dir).items()}
    first = next(iter(snapshots.values()))
    return update_table(snapshots, scalings, _n_layers(adapter_dir, first), fraction)


def _compute(run, settings) -> pd.DataFrame:
    return update_from_files(
        run.path("adapter_epochs"), run.path("adapter"), settings["energy_fraction"]
    )


def _draw(tables, model, context):
    from serlens.report.figures.update import update_figure

    return update_figure(tables["update_dynamics"], model)


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="update_dynamics",
        compute=_compute,
        applies_to=lambda method: method.has_adapter,
        reads=frozenset({"adapter", "adapter_epochs"}),
        keys=("energy_fraction",),
        table=TableSpec(
            ("module", "layer", "depth", "epoch", "quantity"), ("value", "random_value")
        ),
        figures=(FigureSpec("update_dynamics", _draw, ("update_dynamics",), "LoRA spectra"),),
        doc="growth of ΔW and drift of A from its initialisation, epoch by epoch",
    )


SPEC = _spec()
