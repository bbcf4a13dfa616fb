"""Spectra of the LoRA update per adapted module (``svd.tsv``) and the cross-rank subspace
similarity of the ``A`` matrices (``subspace.tsv``).

The metrics themselves live in :mod:`serlens.analysis.spectra` (effective rank, stable
rank, energy rank, subspace similarity, intruder dimensions); this module applies them to
a trained run's adapters and lays the numbers out as tidy tables. Everything is float64
numpy on CPU and needs no data pass.

``svd.tsv`` (one LoRA run), columns ``module, layer, depth, matrix, quantity, index, value``:

* ``module``: the adapted module's name inside the encoder (``layers.3.self_attn.v_proj``);
  ``layer`` its layer index ``i`` (0-based) and ``depth = (i + 1) / L``, the depth of the
  residual state the module writes into (so models of different size share an axis).
* ``matrix`` is ``delta_w`` (``ΔW = (alpha / r) · B A``), ``lora_a`` (``A``, ``r x d_in``),
  ``lora_b`` (``B``, ``d_out x r``) or ``merged`` (``W0 + ΔW`` against the pre-trained
  ``W0``).
* For ``delta_w``, ``lora_a`` and ``lora_b``: ``quantity`` ``effective_rank`` (Roy &
  Vetterli 2007), ``stable_rank`` and ``energy_rank`` (directions holding
  ``energy_fraction`` of ``Σσ²``), each with an empty ``index``; and ``sigma`` with
  ``index = 1..r`` the singular values in decreasing order. ``rank ΔW <= r``, so ``σ_i`` of
  ``ΔW`` for ``i > r`` vanish identically (up to round-off) and are left out: the rows hold
  its whole non-zero spectrum.
* For ``merged``: ``intruder_count`` (empty ``index``) and ``intruder_max_cos`` with
  ``index = 1..k``: for the ``j``-th left singular vector of ``W0 + ΔW``, its best
  ``|cos|`` to any left singular vector of ``W0`` (Shuttleworth et al. 2024); an intruder
  when below ``intruder_epsilon``.

``subspace.tsv`` (one model x fold, all ranks), columns
``model, fold, module, layer, depth, rank_a, rank_b, i, j, phi``: for every pair of ranks
``rank_a < rank_b`` and every adapted module, ``φ(A_rank_a, A_rank_b, i, j)`` of Hu et al.
2021 (§7.2, eq. 4). The full ``r1 x r2`` grid is large for big ranks, so ``i`` and ``j``
run over :func:`similarity_grid` (powers of two up to the rank, and the rank itself).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from serlens.analysis.spectra import (
    effective_rank,
    energy_rank,
    intruder_dimensions,
    lora_delta,
    stable_rank,
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
]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# PEFT saves adapters without the adapter name (``...v_proj.lora_A.weight``); older or
# hand-made files may keep it (``...v_proj.lora_A.default.weight``).
_ADAPTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
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


def _spectrum_rows(
    matrix: str, M: np.ndarray, s: np.ndarray, n_sigma: int, fraction: float
) -> list[dict]:
    rows = [
        {"matrix": matrix, "quantity": "effective_rank", "index": None, "value": effective_rank(s)},
        {"matrix": matrix, "quantity": "stable_rank", "index": None, "value": stable_rank(M)},
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


def lora_update_spectra(
    A,
    B,
    scaling: float,
    W0,
    energy_fraction: float = 0.9,
    intruder_k: int = 10,
    intruder_epsilon: float = 0.5,
) -> pd.DataFrame:
    """Spectral summary of one LoRA layer: the ``matrix, quantity, index, value`` rows of ``svd.tsv``.

    ``A`` (``r x d_in``), ``B`` (``d_out x r``) as PEFT stores them, ``scaling = alpha / r``,
    ``W0`` the pre-trained ``d_out x d_in`` weight. ``ΔW = scaling · B A`` (Hu et al. 2021);
    for ``ΔW``, ``A`` and ``B``: effective rank ``exp(H(σ / ‖σ‖₁))`` (Roy & Vetterli 2007),
    stable rank ``‖M‖²_F / σ₁²``, energy rank (smallest ``k`` with ``Σ_{i<=k} σ_i² >=
    energy_fraction · Σσ²``) and the top-``r`` singular values; for ``W0 + ΔW``: intruder
    dimensions among its top ``intruder_k`` left singular vectors (Shuttleworth et al. 2024).
    See the module docstring for the layout.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    W0 = np.asarray(W0, dtype=np.float64)
    r = A.shape[0]
    delta = lora_delta(A, B, alpha=float(scaling) * r, r=r)
    if W0.shape != delta.shape:
        raise ValueError(f"base weight W0 {W0.shape} does not match ΔW = B A {delta.shape}")
    rows = []
    for matrix, M in (("delta_w", delta), ("lora_a", A), ("lora_b", B)):
        s = np.linalg.svd(M, compute_uv=False)
        rows += _spectrum_rows(matrix, M, s, r, energy_fraction)
    count, max_cos = intruder_dimensions(W0, W0 + delta, k=intruder_k, epsilon=intruder_epsilon)
    rows.append(
        {"matrix": "merged", "quantity": "intruder_count", "index": None, "value": float(count)}
    )
    rows += [
        {"matrix": "merged", "quantity": "intruder_max_cos", "index": j + 1, "value": float(c)}
        for j, c in enumerate(max_cos)
    ]
    table = pd.DataFrame(rows, columns=["matrix", "quantity", "index", "value"])
    table["index"] = table["index"].astype("Int64")
    return table


def _as_numpy(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").double().numpy()


def compute_svd(run, cfg: dict, seed: int) -> pd.DataFrame:
    """``svd.tsv`` of a LoRA run: :func:`lora_update_spectra` for every adapted module.

    Reads ``cfg["energy_fraction"]``, ``cfg["intruder_k"]``, ``cfg["intruder_epsilon"]``;
    ``seed`` is unused (nothing is sampled). Adapted modules are peft ``LoraLayer``s of the
    ``default`` adapter (``lora_A``, ``lora_B``, ``scaling``, ``base_layer``).
    """
    modules = run.lora_modules()
    if not modules:
        raise ValueError(
            f"svd: run {run.model}/{run.method}/fold{run.fold} has no LoRA modules (a frozen run?)"
        )
    factors, base = {}, {}
    for name, module in modules.items():
        if "default" not in module.lora_A:
            raise ValueError(
                f"svd: module {name} has no 'default' adapter (adapters: {list(module.lora_A)})"
            )
        factors[name] = (
            _as_numpy(module.lora_A["default"].weight),
            _as_numpy(module.lora_B["default"].weight),
            float(module.scaling["default"]),
        )
        base[name] = _as_numpy(module.base_layer.weight)
    return svd_table(factors, base, len(run.encoder.layers), cfg)


def svd_table(factors: dict, base: dict, n_layers: int, cfg) -> pd.DataFrame:
    """``svd.tsv`` from ``{module: (A, B, scaling)}`` and ``{module: W0}`` (module order by layer)."""
    tables = []
    for name in sorted(factors, key=_module_order):
        A, B, scaling = factors[name]
        table = lora_update_spectra(
            A,
            B,
            scaling,
            base[name],
            energy_fraction=cfg["energy_fraction"],
            intruder_k=cfg["intruder_k"],
            intruder_epsilon=cfg["intruder_epsilon"],
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


def _n_layers(adapter_dir: Path, modules) -> int:
    """Encoder depth L from the adapted modules, valid because every layer is adapted.

    The project's adapters target module names in every layer (``layers_to_transform`` is
    unset), so L = 1 + the largest layer index; anything else would give a wrong depth.
    """
    config_path = Path(adapter_dir) / "adapter_config.json"
    if (
        config_path.is_file()
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


def svd_from_files(adapter_dir: Path, model_dir: Path, cfg) -> pd.DataFrame:
    """:func:`compute_svd` from the adapter folder and the pre-trained weights (no model built)."""
    factors = load_lora_factors(adapter_dir)
    base = encoder_weights(model_dir, factors)
    return svd_table(factors, base, _n_layers(adapter_dir, factors), cfg)


def _svd(run, settings) -> pd.DataFrame:
    from serlens.steps import model_path

    return svd_from_files(run.path("adapter"), model_path(run.path("weights")), settings)


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

    return spectra_figure(tables["svd"], tables["subspace"], model, context["intruder_epsilon"])


def _specs():
    from serlens.analysis.registry import AnalysisSpec, FigureSpec, TableSpec

    has_update = lambda method: method.has_adapter  # noqa: E731
    svd = AnalysisSpec(
        name="svd",
        compute=_svd,
        applies_to=has_update,
        reads=frozenset({"adapter", "weights"}),
        keys=("energy_fraction", "intruder_k", "intruder_epsilon"),
        table=TableSpec(("module", "layer", "depth", "matrix", "quantity", "index")),
        figures=(
            FigureSpec(
                "spectra",
                _draw_spectra,
                ("svd", "subspace"),
                "LoRA spectra",
                keys=("intruder_epsilon",),
            ),
        ),
        doc="singular spectra, effective and energy ranks of ΔW = s·BA, intruder dimensions",
    )
    subspace = AnalysisSpec(
        name="subspace",
        compute=_subspace,
        applies_to=has_update,
        reads=frozenset({"adapter"}),
        keys=(),
        table=TableSpec(("module", "layer", "depth", "rank_a", "rank_b", "i", "j"), ("phi",)),
        scope="lora_ranks",
        doc="Grassmann similarity of the A subspaces of two ranks (Hu et al. 2021, §7.2)",
    )
    return svd, subspace


SPEC, SUBSPACE_SPEC = _specs()
