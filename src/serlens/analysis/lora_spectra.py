"""Spectra of the weight update ΔW per adapted module (``svd.tsv``) and the cross-rank subspace
similarity of the LoRA ``A`` matrices (``subspace.tsv``).

The metrics themselves live in :mod:`serlens.analysis.spectra` (effective rank, stable
rank, energy rank, subspace similarity, intruder dimensions); this module applies them to
a trained run's update and lays the numbers out as tidy tables. Everything is float64
numpy on CPU and needs no data pass.

The update ΔW of one module, by the method's kind (:func:`load_update`, :func:`update_deltas`):

* ``lora``: ``ΔW = s · B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA; Hu et
  al. 2021, eq. 3), of rank <= r; kept factored, so its spectrum costs O(d r²).
* ``dora``: ``ΔW = W' − W0`` with ``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row`` (Liu et al.
  2024, "DoRA", arXiv 2402.09353, eq. 5): ``m`` (``d_out``) the trained magnitude, the norm
  that of each row over the input dimension (the paper's column norm of ``W ∈ R^{d x k}``
  in its layout; peft's ``torch.linalg.norm(W, dim=1)`` of ``d_out x d_in``), as peft's
  ``merge_and_unload`` computes it. ``ΔW = (c − 1) ⊙ W0 + c ⊙ s B A`` with ``c = m / ‖W0 +
  s B A‖_row``: a row rescaling of W0 plus a rank-r term, so generically of full rank.
* ``full``: ``ΔW = W_ft − W0`` as the run stored it (``delta.safetensors``), dense.

``svd.tsv`` (one run), columns ``module, layer, depth, matrix, quantity, index, value``:

* ``module``: the adapted module's name inside the encoder (``layers.3.self_attn.v_proj``);
  ``layer`` its layer index ``i`` (0-based) and ``depth = (i + 1) / L``, the depth of the
  residual state the module writes into (so models of different size share an axis; L is
  the encoder's depth, from the model's ``config.json``, so runs that adapt some layers
  only keep the same axis).
* ``matrix`` is ``delta_w`` (ΔW above), ``lora_a`` (``A``, ``r x d_in``) and ``lora_b``
  (``B``, ``d_out x r``) for LoRA and DoRA, or ``merged`` (``W0 + ΔW`` against the
  pre-trained ``W0``).
* For ``delta_w``, ``lora_a`` and ``lora_b``: ``quantity`` ``effective_rank`` (Roy &
  Vetterli 2007), ``stable_rank`` and ``energy_rank`` (directions holding
  ``energy_fraction`` of ``Σσ²``), each with an empty ``index``; and ``sigma`` with
  ``index = 1..n`` the singular values in decreasing order. For LoRA ``n = r``: ``rank ΔW
  <= r``, so ``σ_i`` for ``i > r`` vanish identically (up to round-off) and are left out;
  for DoRA and full fine-tuning ``n = min(d_out, d_in)``, the whole spectrum. Either way
  the rows hold ΔW's whole non-zero spectrum.
* For ``merged``: ``intruder_count`` (empty ``index``) and ``intruder_max_cos`` with
  ``index = 1..k``: for the ``j``-th left singular vector of ``W0 + ΔW``, its best
  ``|cos|`` to any left singular vector of ``W0`` (Shuttleworth et al. 2024, "LoRA vs full
  fine-tuning: an illusion of equivalence"); an intruder when below ``intruder_epsilon``.
* Nulls, one seeded draw per module (``analysis_seed`` and the module's name), so that a
  number can be read against what structure-free updates give. Both use ``n``, the number
  of singular values above: the rank the method's update can reach (r for LoRA,
  ``min(d_out, d_in)`` for DoRA and full fine-tuning).

  - ``delta_w_null`` (same quantities as ``delta_w``): a random update of the same
    Frobenius norm and the same rank n, drawn the way the method is parametrised with
    i.i.d. standard normal parameters. LoRA: ``ΔW_0 = ‖ΔW‖_F · Z_B Z_A / ‖Z_B Z_A‖_F``
    with ``Z_B`` (``d_out x r``), ``Z_A`` (``r x d_in``): nearly flat for ``r ≪ d``, ranks
    near r. DoRA and full fine-tuning: ``ΔW_0 = ‖ΔW‖_F · Z / ‖Z‖_F`` with ``Z``
    (``d_out x d_in``), the maximum-entropy update of a given energy, of full rank, its
    spectrum the Marchenko–Pastur law. Either way the spectrum, effective, stable and
    energy rank of an update with the same energy and rank and no preferred directions; a
    trained ΔW well below it concentrates its energy in few directions. For DoRA, whose
    ΔW is a row rescaling of W0 plus a rank-r term, part of that concentration is built
    in: read it beside its ``lora_a``, ``lora_b`` rows and the LoRA runs.
  - ``merged_null`` (same quantities as ``merged``): ``W0 + U Σ Vᵀ`` with the trained
    singular values ``Σ`` of ΔW (all n) and Haar-random orthonormal ``U`` (``d_out x n``),
    ``V`` (``d_in x n``): the intruder dimensions that the trained *spectrum* alone would
    make in random directions. Trained intruders above it are directions that avoid W0's
    singular vectors more than chance; below it, directions aligned with them.

  For LoRA both cost O(d r²) draws and QRs, and one SVD of ``d_out x d_in`` per module (as
  ``merged`` does; the singular values of ΔW and its stable rank are taken from r x r
  factors). Dense updates cost a few SVDs of ``d_out x d_in`` per module.

``subspace.tsv`` (one model x fold, all short-form LoRA ranks, :attr:`Method.in_rank_family`),
columns ``model, fold, module, layer, depth, rank_a, rank_b, i, j, phi, phi_null``: for every
pair of ranks ``rank_a < rank_b`` and every adapted module, ``φ(A_rank_a, A_rank_b, i, j)`` of
Hu et al. 2021 (§7.2, eq. 4), and ``phi_null = max(i, j) / d_in``, its expectation for
independent uniformly random subspaces of dimensions ``i`` and ``j`` of ``R^d_in``
(:func:`random_subspace_phi`). The full ``r1 x r2`` grid is large for big ranks, so ``i``
and ``j`` run over :func:`similarity_grid` (powers of two up to the rank, and the rank
itself).
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from serlens.analysis.spectra import (
    effective_rank,
    energy_rank,
    lora_delta,
    subspace_similarity,
)

SVD_COLUMNS = ["module", "layer", "depth", "matrix", "quantity", "index", "value"]
SUBSPACE_COLUMNS = [
    "model",
    "fold",
    "module",
    "layer",
    "depth",
    "rank_a",
    "rank_b",
    "i",
    "j",
    "phi",
    "phi_null",
]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# PEFT saves adapters without the adapter name (``...v_proj.lora_A.weight``); older or
# hand-made files may keep it (``...v_proj.lora_A.default.weight``).
_ADAPTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)
# DoRA's magnitude m (``...v_proj.lora_magnitude_vector``; with the adapter name and a
# ``.weight`` in older or hand-made files).
_MAGNITUDE_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"
)


def layer_index(module: str) -> int | None:
    """Layer ``i`` of a module named ``...layers.<i>....``; None outside the layer stack."""
    match = _LAYER.search(module)
    return int(match[1]) if match else None


def _module_order(module: str) -> tuple[int, str]:
    layer = layer_index(module)
    return (-1 if layer is None else layer, module)


def _depth(layer: int | None, n_layers: int) -> float:
    return float("nan") if layer is None else (layer + 1) / n_layers


def _stable_rank(s: np.ndarray) -> float:
    """``‖M‖²_F / σ₁² = Σσ² / σ₁²`` from the singular values (0 for the zero matrix)."""
    top = float(s[0]) if len(s) else 0.0
    return float(np.sum(s**2)) / top**2 if top > 0 else 0.0


def _spectrum_rows(matrix: str, s: np.ndarray, n_sigma: int, fraction: float) -> list[dict]:
    rows = [
        {"matrix": matrix, "quantity": "effective_rank", "index": None, "value": effective_rank(s)},
        {"matrix": matrix, "quantity": "stable_rank", "index": None, "value": _stable_rank(s)},
        {
            "matrix": matrix,
            "quantity": "energy_rank",
            "index": None,
            "value": float(energy_rank(s, fraction)),
        },
    ]
    rows += [
        {"matrix": matrix, "quantity": "sigma", "index": i + 1, "value": float(v)}
        for i, v in enumerate(s[:n_sigma])
    ]
    return rows


def _intruder_rows(matrix: str, U0: np.ndarray, W: np.ndarray, k: int, epsilon: float):
    """Intruder dimensions of ``W`` against the left singular vectors ``U0`` of ``W0``
    (:func:`serlens.analysis.spectra.intruder_dimensions`, with ``U0`` computed once)."""
    U, _, _ = np.linalg.svd(W, full_matrices=False)
    max_cos = np.clip(np.abs(U[:, :k].T @ U0).max(axis=1), 0.0, 1.0)
    count = int(np.count_nonzero(max_cos < epsilon))
    rows = [{"matrix": matrix, "quantity": "intruder_count", "index": None, "value": float(count)}]
    rows += [
        {"matrix": matrix, "quantity": "intruder_max_cos", "index": j + 1, "value": float(c)}
        for j, c in enumerate(max_cos)
    ]
    return rows


def product_singular_values(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Singular values of ``left @ right`` (``d_out x r`` times ``r x d_in``), the ``r``
    largest, from r x r factors: with ``left = Q_L R_L`` and ``rightᵀ = Q_R R_R`` (thin
    QR), ``left @ right = Q_L (R_L R_Rᵀ) Q_Rᵀ`` has the singular values of ``R_L R_Rᵀ``.
    O(d r²) instead of the O(d³) of an SVD of the product."""
    r = left.shape[1]
    if r >= min(left.shape[0], right.shape[1]):
        return np.linalg.svd(left @ right, compute_uv=False)[:r]
    _, R_left = np.linalg.qr(left)
    _, R_right = np.linalg.qr(right.T)
    return np.linalg.svd(R_left @ R_right.T, compute_uv=False)


def _haar_columns(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """``d x k`` orthonormal columns spanning a uniformly random subspace (QR of a Gaussian,
    signs fixed by R's diagonal so the basis too is Haar-distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, k)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def null_rng(seed: int, module: str) -> np.random.Generator:
    """The generator of one module's null draws: ``analysis_seed`` and the module's name."""
    return np.random.default_rng([int(seed), zlib.crc32(module.encode())])


def lora_update_spectra(
    A,
    B,
    scaling: float,
    W0,
    energy_fraction: float = 0.9,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Spectral summary of one LoRA layer: the ``matrix, quantity, index, value`` rows of ``svd.tsv``.

    ``A`` (``r x d_in``), ``B`` (``d_out x r``) as PEFT stores them, ``scaling = alpha / r``,
    ``W0`` the pre-trained ``d_out x d_in`` weight. ``ΔW = scaling · B A`` (Hu et al. 2021);
    for ``ΔW``, ``A`` and ``B``: effective rank ``exp(H(σ / ‖σ‖₁))`` (Roy & Vetterli 2007),
    stable rank ``‖M‖²_F / σ₁²``, energy rank (smallest ``k`` with ``Σ_{i<=k} σ_i² >=
    energy_fraction · Σσ²``) and the top-``r`` singular values; for ``W0 + ΔW``: intruder
    dimensions among its top ``intruder_k`` left singular vectors (Shuttleworth et al. 2024).
    With ``rng``, the ``delta_w_null`` and ``merged_null`` rows drawn from it. See the module
    docstring for the layout.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    W0 = np.asarray(W0, dtype=np.float64)
    r = A.shape[0]
    delta = lora_delta(A, B, alpha=float(scaling) * r, r=r)
    if W0.shape != delta.shape:
        raise ValueError(f"base weight W0 {W0.shape} does not match ΔW = B A {delta.shape}")
    k, epsilon = _intruder_args(W0, intruder_k, intruder_epsilon)
    sigma = float(scaling) * product_singular_values(B, A)
    rows = _spectrum_rows("delta_w", sigma, r, energy_fraction)
    for matrix, M in (("lora_a", A), ("lora_b", B)):
        rows += _spectrum_rows(matrix, np.linalg.svd(M, compute_uv=False), r, energy_fraction)
    U0, _, _ = np.linalg.svd(W0, full_matrices=False)
    rows += _intruder_rows("merged", U0, W0 + delta, k, epsilon)
    if rng is not None:
        d_out, d_in = delta.shape
        drawn = product_singular_values(
            rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in))
        )
        rows += _null_rows(rng, drawn, sigma, U0, W0, k, epsilon, energy_fraction)
    table = pd.DataFrame(rows, columns=["matrix", "quantity", "index", "value"])
    table["index"] = table["index"].astype("Int64")
    return table


def _null_rows(rng, drawn, sigma, U0, W0, k, epsilon, energy_fraction) -> list[dict]:
    """The nulls of one module: ``delta_w_null``, the singular values ``drawn`` of a random
    update rescaled to the trained ‖ΔW‖_F = ‖σ‖₂, and ``merged_null``, W0 plus the trained σ
    in Haar-random directions (the intruders the trained spectrum alone would make)."""
    n = len(sigma)
    size = float(np.sqrt(np.sum(drawn**2)))
    energy = float(np.sqrt(np.sum(sigma**2)))
    rows = _spectrum_rows(
        "delta_w_null", drawn * (energy / size if size > 0 else 0.0), n, energy_fraction
    )
    U, V = _haar_columns(rng, W0.shape[0], n), _haar_columns(rng, W0.shape[1], n)
    return rows + _intruder_rows("merged_null", U0, W0 + (U * sigma) @ V.T, k, epsilon)


def _intruder_args(W0: np.ndarray, intruder_k, intruder_epsilon) -> tuple[int, float]:
    k = int(intruder_k)
    if k > min(W0.shape):
        raise ValueError(f"intruder_k = {k} exceeds min(d_out, d_in) = {min(W0.shape)}")
    epsilon = float(intruder_epsilon)
    if not (0.0 < epsilon <= 1.0):
        raise ValueError(f"intruder_epsilon must be in (0, 1]; got {epsilon}")
    return k, epsilon


def dense_update_spectra(
    delta,
    W0,
    energy_fraction: float = 0.9,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
    rng: np.random.Generator | None = None,
    factors: tuple | None = None,
) -> pd.DataFrame:
    """The ``matrix, quantity, index, value`` rows of ``svd.tsv`` for a dense update ΔW
    (DoRA, full fine-tuning): :func:`lora_update_spectra`'s quantities with ΔW's whole
    spectrum (``n = min(d_out, d_in)`` singular values) and the dense nulls of the module
    docstring: ``delta_w_null = ‖ΔW‖_F · Z / ‖Z‖_F`` (``Z`` i.i.d. standard normal
    ``d_out x d_in``) and ``merged_null = W0 + U Σ Vᵀ`` (the trained σ, Haar-random ``U``,
    ``V`` of n columns). ``factors = (A, B)`` (DoRA) adds their ``lora_a``, ``lora_b`` rows.
    """
    delta = np.asarray(delta, dtype=np.float64)
    W0 = np.asarray(W0, dtype=np.float64)
    if delta.ndim != 2 or W0.shape != delta.shape:
        raise ValueError(f"base weight W0 {W0.shape} does not match ΔW {delta.shape}")
    k, epsilon = _intruder_args(W0, intruder_k, intruder_epsilon)
    sigma = np.linalg.svd(delta, compute_uv=False)
    n = len(sigma)
    rows = _spectrum_rows("delta_w", sigma, n, energy_fraction)
    if factors is not None:
        A, B = (np.asarray(M, dtype=np.float64) for M in factors)
        r = A.shape[0]
        for matrix, M in (("lora_a", A), ("lora_b", B)):
            rows += _spectrum_rows(matrix, np.linalg.svd(M, compute_uv=False), r, energy_fraction)
    U0, _, _ = np.linalg.svd(W0, full_matrices=False)
    rows += _intruder_rows("merged", U0, W0 + delta, k, epsilon)
    if rng is not None:
        d_out, d_in = delta.shape
        drawn = np.linalg.svd(rng.standard_normal((d_out, d_in)), compute_uv=False)
        rows += _null_rows(rng, drawn, sigma, U0, W0, k, epsilon, energy_fraction)
    table = pd.DataFrame(rows, columns=["matrix", "quantity", "index", "value"])
    table["index"] = table["index"].astype("Int64")
    return table


# --------------------------------------------------------------------------- ΔW of every kind


UPDATE_KINDS = ("lora", "dora", "full")


def dora_weight(A, B, scaling: float, magnitude, W0) -> np.ndarray:
    """DoRA's adapted weight ``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row`` (Liu et al. 2024,
    arXiv 2402.09353, eq. 5), float64.

    ``A`` (``r x d_in``), ``B`` (``d_out x r``), ``s = scaling``, ``magnitude`` ``m``
    (``d_out``), ``W0`` (``d_out x d_in``). The norm is each output row's over the input
    dimension (``‖V_i·‖₂``): the paper's column norm ``‖·‖_c`` of its ``d x k`` layout, and
    peft's ``torch.linalg.norm(W0 + s B A, dim=1)`` (``DoraLinearLayer.get_weight_norm``,
    ``fan_in_fan_out`` false), so ``W'`` is the weight peft's ``merge_and_unload`` writes.
    """
    A, B, W0 = (np.asarray(M, dtype=np.float64) for M in (A, B, W0))
    magnitude = np.asarray(magnitude, dtype=np.float64).reshape(-1)
    V = W0 + float(scaling) * (B @ A)
    if V.shape != W0.shape or magnitude.shape != (W0.shape[0],):
        raise ValueError(
            f"DoRA shapes do not fit: W0 {W0.shape}, B A {(B.shape[0], A.shape[1])}, "
            f"magnitude {magnitude.shape} (expected ({W0.shape[0]},))"
        )
    norm = np.linalg.norm(V, axis=1)
    if np.any(norm == 0):
        raise ValueError("W0 + s B A has a zero row; DoRA's direction is undefined there")
    return (magnitude / norm)[:, None] * V


def dora_delta(A, B, scaling: float, magnitude, W0) -> np.ndarray:
    """DoRA's update ``ΔW = W' − W0`` (:func:`dora_weight`); with ``c = m / ‖W0 + s B A‖_row``
    it is ``(c − 1) ⊙ W0 + c ⊙ s B A``, a row rescaling of W0 plus a rank-r term (so of full
    rank once m moves off ``‖W0‖_row``, its value at initialisation, where B = 0 and ΔW = 0)."""
    return dora_weight(A, B, scaling, magnitude, W0) - np.asarray(W0, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class ModuleUpdate:
    """One adapted module's update and its pre-trained weight ``W0`` (float64).

    ``kind`` ``lora`` (``A``, ``B``, ``scaling``: ΔW = s B A, kept factored), ``dora``
    (the same and ``magnitude``: :func:`dora_delta`) or ``full`` (``stored``: ΔW = W_ft − W0
    as the run wrote it).
    """

    kind: str
    W0: np.ndarray
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    scaling: float | None = None
    magnitude: np.ndarray | None = None
    stored: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"update kind {self.kind!r} is not one of {UPDATE_KINDS}")

    @property
    def delta(self) -> np.ndarray:
        """ΔW (``d_out x d_in``, float64), dense."""
        if self.kind == "lora":
            return float(self.scaling) * (self.B @ self.A)
        if self.kind == "dora":
            return dora_delta(self.A, self.B, self.scaling, self.magnitude, self.W0)
        return np.asarray(self.stored, dtype=np.float64)


def update_spectra(update: ModuleUpdate, cfg, rng: np.random.Generator | None) -> pd.DataFrame:
    """``svd.tsv`` rows of one module: LoRA by its factors (:func:`lora_update_spectra`),
    DoRA and full by the dense ΔW (:func:`dense_update_spectra`)."""
    options = {
        "energy_fraction": cfg["energy_fraction"],
        "intruder_k": cfg["intruder_k"],
        "intruder_epsilon": cfg["intruder_epsilon"],
        "rng": rng,
    }
    if update.kind == "lora":
        return lora_update_spectra(update.A, update.B, update.scaling, update.W0, **options)
    factors = (update.A, update.B) if update.kind == "dora" else None
    return dense_update_spectra(update.delta, update.W0, factors=factors, **options)


def _as_numpy(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").double().numpy()


def compute_svd(run, cfg: dict, seed: int) -> pd.DataFrame:
    """``svd.tsv`` of a live peft run (LoRA or DoRA): :func:`update_spectra` for every adapted module.

    Reads ``cfg["energy_fraction"]``, ``cfg["intruder_k"]``, ``cfg["intruder_epsilon"]``;
    ``seed`` seeds the null draws (:func:`null_rng`). Adapted modules are peft
    ``LoraLayer``s of the ``default`` adapter (``lora_A``, ``lora_B``, ``scaling``,
    ``base_layer``; DoRA's ``lora_magnitude_vector`` too). The workflow's job reads the
    files instead (:func:`svd_from_files`), which also covers full fine-tuning.
    """
    modules = run.lora_modules()
    if not modules:
        raise ValueError(
            f"svd: run {run.model}/{run.method}/fold{run.fold} has no LoRA modules (a frozen "
            "or fully fine-tuned run? read its files with svd_from_files)"
        )
    updates = {}
    for name, module in modules.items():
        if "default" not in module.lora_A:
            raise ValueError(
                f"svd: module {name} has no 'default' adapter (adapters: {list(module.lora_A)})"
            )
        magnitudes = getattr(module, "lora_magnitude_vector", None) or {}
        magnitude = _as_numpy(magnitudes["default"].weight) if "default" in magnitudes else None
        updates[name] = ModuleUpdate(
            "lora" if magnitude is None else "dora",
            _as_numpy(module.base_layer.weight),
            A=_as_numpy(module.lora_A["default"].weight),
            B=_as_numpy(module.lora_B["default"].weight),
            scaling=float(module.scaling["default"]),
            magnitude=magnitude,
        )
    return update_svd_table(updates, len(run.encoder.layers), cfg, seed)


def svd_table(factors: dict, base: dict, n_layers: int, cfg, seed: int | None) -> pd.DataFrame:
    """``svd.tsv`` of LoRA factors ``{module: (A, B, scaling)}`` and ``{module: W0}``
    (:func:`update_svd_table`)."""
    updates = {
        name: ModuleUpdate("lora", base[name], A=A, B=B, scaling=scaling)
        for name, (A, B, scaling) in factors.items()
    }
    return update_svd_table(updates, n_layers, cfg, seed)


def update_svd_table(
    updates: dict[str, ModuleUpdate], n_layers: int, cfg, seed: int | None
) -> pd.DataFrame:
    """``svd.tsv`` from ``{module: ModuleUpdate}`` (module order by layer); ``seed`` seeds
    the null rows (None: no null rows)."""
    if not updates:
        raise ValueError("svd: no adapted module")
    tables = []
    for name in sorted(updates, key=_module_order):
        table = update_spectra(
            updates[name], cfg, rng=None if seed is None else null_rng(seed, name)
        )
        layer = layer_index(name)
        table.insert(0, "depth", _depth(layer, n_layers))
        table.insert(0, "layer", layer)
        table.insert(0, "module", name)
        tables.append(table)
    out = pd.concat(tables, ignore_index=True)[SVD_COLUMNS]
    out["layer"] = out["layer"].astype("Int64")
    return out


# --------------------------------------------------------------------------- across ranks


def similarity_grid(rank: int) -> list[int]:
    """Subspace sizes compared for a rank: 1, 2, 4, 8, ... up to ``rank``, and ``rank`` itself."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1; got {rank}")
    sizes = {rank}
    size = 1
    while size < rank:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def random_subspace_phi(i: int, j: int, d: int) -> float:
    """``E[φ(i, j)] = max(i, j) / d`` for independent uniformly random subspaces of
    dimensions ``i`` and ``j`` of ``R^d`` (exact for every ``d``).

    With ``U`` (``d x i``) fixed and ``V`` (``d x j``) a Haar-random orthonormal basis, each
    column ``u`` of ``U`` has ``E‖Vᵀu‖² = j / d`` (a random j-dimensional projection keeps
    ``j / d`` of a unit vector's energy on average), so ``E‖UᵀV‖²_F = i j / d`` and
    ``E[φ] = i j / (d · min(i, j)) = max(i, j) / d``.
    """
    if not (1 <= i <= d and 1 <= j <= d):
        raise ValueError(f"need 1 <= i, j <= d; got i = {i}, j = {j}, d = {d}")
    return max(i, j) / d


def load_lora_a(adapter_dir: Path) -> dict[str, np.ndarray]:
    """``{module: A}`` (``r x d_in``, float64) from a PEFT ``adapter/`` folder, no model needed."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no adapter weights; is {adapter_dir} a LoRA run's adapter/ folder?"
        )
    weights = {}
    for key, value in load_file(str(path)).items():
        match = _ADAPTER_KEY.match(key)
        if match and match["which"] == "A":
            weights[match["module"]] = value.astype(np.float64)
    if not weights:
        raise ValueError(f"{path}: no lora_A weights (keys like '...v_proj.lora_A.weight')")
    return weights


def _n_layers(adapter_dir: Path | None, modules) -> int:
    """Encoder depth L from the adapted modules, valid when every layer is adapted.

    The short-form adapters target module names in every layer (``layers_to_transform`` is
    unset), so L = 1 + the largest layer index; anything else would give a wrong depth. Runs
    that adapt some layers take L from the model (:func:`encoder_depth`).
    """
    config_path = Path(adapter_dir or ".") / "adapter_config.json"
    if (
        adapter_dir is not None
        and config_path.is_file()
        and json.loads(config_path.read_text()).get("layers_to_transform") is not None
    ):
        raise ValueError(
            f"{config_path}: layers_to_transform is set, so the encoder depth cannot be read off the adapter"
        )
    layers = {layer_index(m) for m in modules} - {None}
    if not layers:
        raise ValueError(
            f"{adapter_dir}: no adapted module sits in an encoder layer ('layers.<i>.')"
        )
    if layers != set(range(max(layers) + 1)):
        raise ValueError(
            f"{adapter_dir}: adapted layers {sorted(layers)} are not 0..L-1; cannot infer the depth"
        )
    return max(layers) + 1


def subspace_similarity_table(adapters: dict[int, Path], model: str, fold: int) -> pd.DataFrame:
    """φ(A_rank_a, A_rank_b, i, j) for every pair of ranks, module and grid point (see module docstring)."""
    loaded = {int(rank): load_lora_a(path) for rank, path in adapters.items()}
    for rank, weights in loaded.items():
        found = {a.shape[0] for a in weights.values()}
        if found != {rank}:
            raise ValueError(
                f"{adapters[rank]}: expected rank {rank}, the lora_A weights have ranks {sorted(found)}"
            )
    rows = []
    for rank_a, rank_b in itertools.combinations(sorted(loaded), 2):
        modules_a, modules_b = loaded[rank_a], loaded[rank_b]
        if set(modules_a) != set(modules_b):
            raise ValueError(
                f"{adapters[rank_a]} and {adapters[rank_b]} adapt different modules: "
                f"{sorted(set(modules_a) ^ set(modules_b))}"
            )
        n_layers = _n_layers(adapters[rank_b], modules_b)
        for module in sorted(modules_a, key=_module_order):
            A1, A2 = modules_a[module], modules_b[module]
            layer = layer_index(module)
            grid_a = [i for i in similarity_grid(rank_a) if i <= min(A1.shape)]
            grid_b = [j for j in similarity_grid(rank_b) if j <= min(A2.shape)]
            for i, j in itertools.product(grid_a, grid_b):
                rows.append(
                    {
                        "model": model,
                        "fold": int(fold),
                        "module": module,
                        "layer": layer,
                        "depth": _depth(layer, n_layers),
                        "rank_a": rank_a,
                        "rank_b": rank_b,
                        "i": i,
                        "j": j,
                        "phi": subspace_similarity(A1, A2, i, j),
                        "phi_null": random_subspace_phi(i, j, A1.shape[1]),
                    }
                )
    table = pd.DataFrame(rows, columns=SUBSPACE_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    return table


def write_subspace_similarity(
    adapters: dict[int, Path], output: Path, model: str, fold: int
) -> pd.DataFrame:
    """Compute :func:`subspace_similarity_table` from ``{rank: adapter/ folder}`` and write ``subspace.tsv``.

    With a single rank there is no pair: the table is written with its header only.
    """
    # Imported late: serlens.train.data pulls in the audio stack (librosa, transformers),
    # so importing this module for the tables alone stays light.
    from serlens.io import write_tsv_atomic

    table = subspace_similarity_table(adapters, model, fold)
    write_tsv_atomic(table, Path(output))
    return table


# --------------------------------------------------------------------------- the workflow's analyses


def load_lora_factors(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{module: (A, B, scaling)}`` (float64) from a PEFT ``adapter/`` folder, no peft needed.

    ``scaling = lora_alpha / r`` (Hu et al. 2021), or ``lora_alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023), as PEFT computes it.
    """
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    path = adapter_dir / "adapter_model.safetensors"
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        match = _ADAPTER_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = value.astype(np.float64)
    if not factors:
        raise ValueError(f"{path}: no LoRA weights (keys like '...v_proj.lora_A.weight')")
    out = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: module {module} lacks lora_{({'A', 'B'} - set(pair)).pop()}")
        rank = pair["A"].shape[0]
        alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
        rank_cfg = config.get("rank_pattern", {}).get(module, config["r"])
        if rank_cfg != rank:
            raise ValueError(f"{path}: module {module} has rank {rank}, its config says {rank_cfg}")
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        out[module] = (pair["A"], pair["B"], float(scaling))
    return out


def encoder_weights(model_dir: Path, modules) -> dict[str, np.ndarray]:
    """Pre-trained ``W0`` (float64) of encoder modules, read from the model's safetensors.

    ``modules`` are encoder-relative names (``layers.3.self_attn.v_proj``); checkpoints name
    them ``model.encoder.<module>.weight`` (or ``encoder.<module>.weight``), in one file or
    sharded under ``model.safetensors.index.json``.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text())["weight_map"]
    else:
        single = model_dir / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{model_dir}: no model.safetensors; rerun the weights rule.")
        with safe_open(str(single), framework="numpy") as handle:
            shards = dict.fromkeys(handle.keys(), "model.safetensors")
    out = {}
    for module in modules:
        key = next(
            (
                f"{p}{module}.weight"
                for p in ("model.encoder.", "encoder.")
                if f"{p}{module}.weight" in shards
            ),
            None,
        )
        if key is None:
            raise KeyError(f"{model_dir}: no weight for encoder module {module!r}")
        with safe_open(str(model_dir / shards[key]), framework="numpy") as handle:
            out[module] = handle.get_tensor(key).astype(np.float64)
    return out


def load_dora_magnitudes(adapter_dir: Path) -> dict[str, np.ndarray]:
    """``{module: m}`` (``d_out``, float64): DoRA's magnitude vectors of a peft ``adapter/``
    folder or an ``adapter_epochs/epoch{k}.safetensors`` snapshot (empty for plain LoRA)."""
    path = Path(adapter_dir)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    out = {}
    for key, value in load_file(str(path)).items():
        match = _MAGNITUDE_KEY.match(key)
        if match:
            out[match["module"]] = value.astype(np.float64).reshape(-1)
    return out


def load_full_delta(path: Path) -> dict[str, np.ndarray]:
    """``{module: ΔW}`` (float64) of a full fine-tuning run's ``delta.safetensors``, whose keys
    are ``WhisperEncoder`` weight names (``layers.3.self_attn.v_proj.weight``: ΔW = W_ft − W0,
    :func:`serlens.train.lora.weight_updates`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weight update; rerun the full fine-tuning run")
    out = {}
    for key, value in load_file(str(path)).items():
        if not key.endswith(".weight") or value.ndim != 2:
            raise ValueError(
                f"{path}: key {key!r} {value.shape} is not a module's 2-D weight "
                "('layers.<i>.<...>.weight')"
            )
        out[key.removesuffix(".weight")] = value.astype(np.float64)
    if not out:
        raise ValueError(f"{path}: holds no weight update")
    return out


def update_kind(path: Path) -> str:
    """What a run's ``update`` product is: ``lora`` or ``dora`` (a peft adapter folder, by its
    config's ``use_dora``) or ``full`` (a ``.safetensors`` file of ΔW)."""
    path = Path(path)
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"{path}: a folder without adapter_config.json is no peft adapter"
            )
        return "dora" if json.loads(config.read_text()).get("use_dora") else "lora"
    if path.suffix == ".safetensors" and path.is_file():
        return "full"
    raise FileNotFoundError(
        f"{path}: neither a peft adapter folder (adapter_config.json) nor a delta.safetensors"
    )


def load_update(path: Path, model_dir: Path) -> dict[str, ModuleUpdate]:
    """``{module: ModuleUpdate}`` of a run's update (its ``adapter/`` folder or its
    ``delta.safetensors``, :func:`update_kind`), with ``W0`` read from the pre-trained
    weights in ``model_dir``; no model built, no peft needed."""
    kind = update_kind(path)
    if kind == "full":
        stored = load_full_delta(path)
        base = encoder_weights(model_dir, stored)
        for name, delta in stored.items():
            if delta.shape != base[name].shape:
                raise ValueError(f"{path}: ΔW of {name} is {delta.shape}, W0 {base[name].shape}")
        return {name: ModuleUpdate("full", base[name], stored=stored[name]) for name in stored}
    factors = load_lora_factors(path)
    base = encoder_weights(model_dir, factors)
    magnitudes = load_dora_magnitudes(path)
    if kind == "dora" and set(magnitudes) != set(factors):
        raise ValueError(
            f"{path}: a DoRA adapter (use_dora) without the magnitude of "
            f"{sorted(set(factors) - set(magnitudes))[:3]}"
        )
    if kind == "lora" and magnitudes:
        raise ValueError(f"{path}: lora_magnitude_vector weights, but use_dora is not set")
    return {
        name: ModuleUpdate(
            kind, base[name], A=A, B=B, scaling=scaling, magnitude=magnitudes.get(name)
        )
        for name, (A, B, scaling) in factors.items()
    }


def update_deltas(path: Path, model_dir: Path) -> dict[str, np.ndarray]:
    """ΔW (dense, float64, ``d_out x d_in``) of every adapted module of a run with an update:
    LoRA ``s B A``, DoRA ``W' − W0`` (:func:`dora_delta`), full fine-tuning ``W_ft − W0``
    as stored (module docstring)."""
    return {name: update.delta for name, update in load_update(path, model_dir).items()}


def encoder_depth(model_dir: Path) -> int | None:
    """The encoder's number of layers L (``encoder_layers`` of the model's ``config.json``);
    None when the folder has no config."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    layers = json.loads(config.read_text()).get("encoder_layers")
    return None if layers is None else int(layers)


def svd_from_files(update_path: Path, model_dir: Path, cfg, seed: int | None) -> pd.DataFrame:
    """``svd.tsv`` from a run's update (``adapter/`` folder or ``delta.safetensors``) and the
    pre-trained weights (no model built); for LoRA and DoRA the same table as
    :func:`compute_svd` of the live model."""
    updates = load_update(update_path, model_dir)
    n_layers = encoder_depth(model_dir)
    if n_layers is None:  # no config.json: infer L, valid when every layer is adapted
        n_layers = _n_layers(update_path if Path(update_path).is_dir() else None, updates)
    return update_svd_table(updates, n_layers, cfg, seed)


def _svd(run, settings) -> pd.DataFrame:
    from serlens.steps import model_path

    return svd_from_files(
        run.path("weight_update"), model_path(run.path("weights")), settings, settings["seed"]
    )


def _subspace(runs, settings) -> pd.DataFrame:
    """``runs``: ``{rank: RunData}`` of one model, seed and fold."""
    first = next(iter(runs.values()))
    table = subspace_similarity_table(
        {rank: data.path("adapter") for rank, data in runs.items()}, first.model, first.fold
    )
    table.insert(table.columns.get_loc("fold"), "seed", int(first.seed))
    return table


def _draw_spectra(tables, model, context):
    from serlens.report.figures import spectra_figure

    return spectra_figure(
        tables["svd"],
        tables["subspace"],
        model,
        context["intruder_epsilon"],
        energy_fraction=context["energy_fraction"],
    )


def _specs():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    svd = AnalysisSpec(
        name="svd",
        compute=_svd,
        applies_to=lambda method: method.has_update,
        reads=frozenset({"weight_update", "weights"}),
        keys=("energy_fraction", "intruder_k", "intruder_epsilon"),
        uses_seed=True,  # the null draws
        table=TableSpec(("module", "layer", "depth", "matrix", "quantity", "index")),
        figures=(
            FigureSpec(
                "spectra",
                _draw_spectra,
                ("svd", "subspace"),
                "LoRA spectra",
                keys=("intruder_epsilon", "energy_fraction"),
            ),
        ),
        doc="singular spectra, effective and energy ranks of the update ΔW (LoRA s·BA, DoRA "
        "W' − W0, full W_ft − W0), intruder dimensions, each with a random null (same energy "
        "and rank; same spectrum in random directions)",
    )
    subspace = AnalysisSpec(
        name="subspace",
        compute=_subspace,
        applies_to=lambda method: method.in_rank_family,
        reads=frozenset({"adapter"}),
        keys=(),
        table=TableSpec(
            ("module", "layer", "depth", "rank_a", "rank_b", "i", "j"), ("phi", "phi_null")
        ),
        scope="lora_ranks",
        doc="Grassmann similarity of the A subspaces of two ranks (Hu et al. 2021, §7.2), "
        "and its random-subspace expectation max(i, j) / d",
    )
    return svd, subspace


SPEC, SUBSPACE_SPEC = _specs()
