"""How an adapter's update grows over training (``update_dynamics.tsv``), from the adapter saved
at initialisation (epoch 0) and after every epoch (``adapter_epochs/epoch{e}.safetensors``).

It applies to the methods with a peft adapter, LoRA and DoRA (:attr:`Method.has_adapter`):
their snapshots hold A, B and, for DoRA, the magnitude m. Full fine-tuning saves no
per-epoch weights (its encoder is too large to keep every epoch), so it has no trajectory.

For every adapted module and epoch ``e`` (with A_e, B_e the factors, s the run's scaling
α/r or α/√r, W0 the pre-trained weight):

- ΔW_e, the update at epoch ``e``: LoRA ``ΔW_e = s·B_e·A_e`` (Hu et al. 2021); DoRA
  ``ΔW_e = m_e ⊙ (W0 + s·B_e·A_e) / ‖W0 + s·B_e·A_e‖_row − W0`` (Liu et al. 2024, arXiv
  2402.09353, eq. 5; :func:`serlens.analysis.lora_spectra.dora_delta`), the same ΔW as
  ``svd.tsv``'s. DoRA's ΔW is dense (generically of full rank), so its singular values come
  from a full SVD; LoRA's from r x r factors.
- ``delta_w_norm``: ‖ΔW_e‖_F (0 at initialisation, where B = 0, and for DoRA m_0 = ‖W0‖_row:
  up to the float32 round-off of the stored m, about 1e-7 ‖W0‖_F);
- ``delta_w_sigma1``: its largest singular value, ``delta_w_energy_rank``: the number of
  directions holding ``energy_fraction`` of ‖ΔW_e‖²_F (0 at epoch 0);
- ``a_change``: ‖A_e − A_0‖_F / ‖A_0‖_F, how far A moved from its random initialisation
  (a trained A is known to stay close to it: Zhu et al. 2024, "Asymmetry in low-rank adapters");
- ``a_init_phi``: φ(A_e, A_0) = ‖U_eᵀ U_0‖²_F / r for the right singular subspaces of A_e
  and A_0 (Hu et al. 2021, eq. 7) — 1 while A keeps its initial row space; ``random_value`` is r / d_in,
  the value for an unrelated random subspace;
- ``b_norm``: ‖B_e‖_F;
- DoRA only, ``magnitude_change``: ‖m_e − m_0‖₂ / ‖m_0‖₂, how far the magnitude moved from
  its initial value m_0 = ‖W0‖_row (Liu et al. 2024, §3: the magnitude part of the update).

Columns ``module, layer, depth, epoch, quantity, value, random_value`` (``random_value`` empty where a
quantity has none). ``depth = (layer + 1) / L`` as in ``svd.tsv`` (L from the model's
config, so adapters of some layers only share the axis). The epoch the run kept (best dev
UAR) is in its ``history.tsv``.
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
    """``{module: {"A": ..., "B": ...}}`` (float64) of one snapshot, and ``"m"`` (DoRA's
    magnitude, ``d_out``) where the snapshot holds one."""
    from safetensors.numpy import load_file

    from serlens.analysis.lora_spectra import _ADAPTER_KEY, _MAGNITUDE_KEY

    out: dict[str, dict[str, np.ndarray]] = {}
    magnitudes = {}
    for key, value in load_file(str(path)).items():
        match = _ADAPTER_KEY.match(key)
        if match:
            out.setdefault(match["module"], {})[match["which"]] = value.astype(np.float64)
        elif match := _MAGNITUDE_KEY.match(key):
            magnitudes[match["module"]] = value.astype(np.float64).reshape(-1)
    if not out:
        raise ValueError(f"{path}: no LoRA weights (keys like '...v_proj.lora_A.weight')")
    for module, m in magnitudes.items():
        if module not in out:
            raise ValueError(f"{path}: a magnitude for {module}, which has no lora_A / lora_B")
        out[module]["m"] = m
    return out


def update_table(
    snapshots: dict[int, dict],
    scalings: dict[str, float],
    n_layers: int,
    fraction: float,
    base: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """The module docstring's quantities for every module of every snapshot; ``scalings``:
    each module's α/r (or α/√r) from the run's adapter config; ``base``: ``{module: W0}``,
    needed for the DoRA modules (those whose snapshots hold a magnitude ``m``)."""
    from serlens.analysis.lora_spectra import (
        _depth,
        _module_order,
        dora_delta,
        layer_index,
        product_singular_values,
        random_subspace_phi,
    )
    from serlens.analysis.spectra import energy_rank, subspace_similarity

    first = snapshots[min(snapshots)]
    rows = []
    for module in sorted(first, key=_module_order):
        A0 = first[module]["A"]
        dora = "m" in first[module]
        if dora and (base is None or module not in base):
            raise ValueError(
                f"update_dynamics: {module} is a DoRA module; its ΔW needs the pre-trained W0"
            )
        rank, d_in = A0.shape
        layer = layer_index(module)
        where = {"module": module, "layer": layer, "depth": _depth(layer, n_layers)}
        for epoch, factors in snapshots.items():
            if module not in factors or ("m" in factors[module]) != dora:
                raise ValueError(f"update_dynamics: epoch {epoch} lacks (part of) {module}")
            A, B = factors[module]["A"], factors[module]["B"]
            scaling = scalings[module]
            if dora:
                delta = dora_delta(A, B, scaling, factors[module]["m"], base[module])
                sigma = np.linalg.svd(delta, compute_uv=False)
            else:
                sigma = scaling * product_singular_values(B, A)
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
            if dora:
                m, m0 = factors[module]["m"], first[module]["m"]
                values["magnitude_change"] = (
                    float(np.linalg.norm(m - m0) / np.linalg.norm(m0)),
                    np.nan,
                )
            rows += [
                {**where, "epoch": epoch, "quantity": q, "value": v, "random_value": n}
                for q, (v, n) in values.items()
            ]
    return pd.DataFrame(rows, columns=COLUMNS)


def update_from_files(
    epochs_dir: Path, adapter_dir: Path, fraction: float, model_dir: Path | None = None
) -> pd.DataFrame:
    """:func:`update_table` of a run's ``adapter_epochs/`` and ``adapter/`` (its scaling);
    ``model_dir``, the pre-trained weights, gives W0 (needed for DoRA) and the depth L
    (without it L is inferred from the adapted layers, valid when every layer is adapted)."""
    from serlens.analysis.lora_spectra import (
        _n_layers,
        encoder_depth,
        encoder_weights,
        load_lora_factors,
    )

    snapshots = {e: load_factors(p) for e, p in epoch_files(epochs_dir).items()}
    scalings = {m: scale for m, (_, _, scale) in load_lora_factors(adapter_dir).items()}
    first = next(iter(snapshots.values()))
    dora = [module for module, factors in first.items() if "m" in factors]
    if dora and model_dir is None:
        raise ValueError(f"{epochs_dir}: a DoRA adapter; its ΔW needs the pre-trained weights")
    n_layers = None if model_dir is None else encoder_depth(model_dir)
    if n_layers is None:
        n_layers = _n_layers(adapter_dir, first)
    base = encoder_weights(model_dir, dora) if dora else None
    return update_table(snapshots, scalings, n_layers, fraction, base)


def _compute(run, settings) -> pd.DataFrame:
    from serlens.steps import model_path

    return update_from_files(
        run.path("adapter_epochs"),
        run.path("adapter"),
        settings["energy_fraction"],
        model_path(run.path("weights")),
    )


def _draw(tables, model, context):
    from serlens.report.figures.update import update_figure

    return update_figure(tables["update_dynamics"], model)


def _spec():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    return AnalysisSpec(
        name="update_dynamics",
        compute=_compute,
        # LoRA and DoRA: their adapter_epochs/ hold every epoch's factors (and magnitude);
        # full fine-tuning keeps no per-epoch weights.
        applies_to=lambda method: method.has_adapter,
        reads=frozenset({"adapter", "adapter_epochs", "weights"}),
        keys=("energy_fraction",),
        table=TableSpec(
            ("module", "layer", "depth", "epoch", "quantity"), ("value", "random_value")
        ),
        figures=(FigureSpec("update_dynamics", _draw, ("update_dynamics",), "LoRA spectra"),),
        doc="growth of ΔW (LoRA s·BA, DoRA W' − W0), drift of A from its initialisation and "
        "of DoRA's magnitude, epoch by epoch",
    )


SPEC = _spec()
