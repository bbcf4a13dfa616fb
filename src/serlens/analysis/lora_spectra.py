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
* Nulls, one seeded draw per module (``analysis_seed`` and the module's name), so that a
  number can be read against what structure-free updates give:

  - ``delta_w_null`` (same quantities as ``delta_w``): a random rank-r update of the same
    Frobenius norm, ``ΔW_0 = ‖ΔW‖_F · Z_B Z_A / ‖Z_B Z_A‖_F`` with ``Z_B`` (``d_out x r``),
    ``Z_A`` (``r x d_in``) standard normal: the spectrum, effective, stable and energy
    rank of an update with the same energy and no preferred directions (nearly flat for
    ``r ≪ d``: ranks near r). A trained ΔW well below it concentrates its energy.
  - ``merged_null`` (same quantities as ``merged``): ``W0 + U Σ Vᵀ`` with the trained
    singular values ``Σ`` of ΔW and Haar-random orthonormal ``U`` (``d_out x r``), ``V``
    (``d_in x r``): the intruder dimensions that the trained *spectrum* alone would make
    in random directions. Trained intruders above it are directions that avoid W0's
    singular vectors more than chance; below it, directions aligned with them.

  Both cost O(d r²) draws and QRs; the second one SVD of ``d_out x d_in`` per module (as
  ``merged`` does; the singular values of ΔW and its stable rank are taken from r x r
  factors, so the table costs about what it did without nulls).

``subspace.tsv`` (one model x fold, all ranks), columns
``model, fold, module, layer, depth, rank_a, rank_b, i, j, phi, phi_null``: for every pair of
ranks ``rank_a < rank_b`` and every adapted module, ``φ(A_rank_a, A_rank_b, i, j)`` of Hu
et al. 2021 (§7.2, eq. 4), and ``phi_null = max(i, j) / d_in``, its expectation for
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
    k = int(intruder_k)
    if k > min(W0.shape):
        raise ValueError(f"intruder_k = {k} exceeds min(d_out, d_in) = {min(W0.shape)}")
    epsilon = float(intruder_epsilon)
    if not (0.0 < epsilon <= 1.0):
        raise ValueError(f"intruder_epsilon must be in (0, 1]; got {epsilon}")
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
        size = float(np.sqrt(np.sum(drawn**2)))
        energy = float(np.sqrt(np.sum(sigma**2)))
        rows += _spectrum_rows(
            "delta_w_null", drawn * (energy / size if size > 0 else 0.0), r, energy_fraction
        )
        U, V = _haar_columns(rng, d_out, r), _haar_columns(rng, d_in, r)
        rows += _intruder_rows("merged_null", U0, W0 + (U * sigma) @ V.T, k, epsilon)
    table = pd.DataFrame(rows, columns=["matrix", "quantity", "index", "value"])
    table["index"] = table["index"].astype("Int64")
    return table


def _as_numpy(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").double().numpy()


def compute_svd(run, cfg: dict, seed: int) -> pd.DataFrame:
    """``svd.tsv`` of a LoRA run: :func:`lora_update_spectra` for every adapted module.

    Reads ``cfg["energy_fraction"]``, ``cfg["intruder_k"]``, ``cfg["intruder_epsilon"]``;
    ``seed`` seeds the null draws (:func:`null_rng`). Adapted modules are peft
    ``LoraLayer``s of the ``default`` adapter (``lora_A``, ``lora_B``, ``scaling``,
    ``base_layer``).
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
    return svd_table(factors, base, len(run.encoder.layers), cfg, seed)


def svd_table(factors: dict, base: dict, n_layers: int, cfg, seed: int | None) -> pd.DataFrame:
    """``svd.tsv`` from ``{module: (A, B, scaling)}`` and ``{module: W0}`` (module order by
    layer); ``seed`` seeds the null rows (None: no null rows)."""
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
            rng=None if seed is None else null_rng(seed, name),
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


def svd_from_files(adapter_dir: Path, model_dir: Path, cfg, seed: int | None) -> pd.DataFrame:
    """:func:`compute_svd` from the adapter folder and the pre-trained weights (no model built)."""
    factors = load_lora_factors(adapter_dir)
    base = encoder_weights(model_dir, factors)
    return svd_table(factors, base, _n_layers(adapter_dir, factors), cfg, seed)


def _svd(run, settings) -> pd.DataFrame:
    from serlens.steps import model_path

    return svd_from_files(
        run.path("adapter"), model_path(run.path("weights")), settings, settings["seed"]
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

    has_update = lambda method: method.has_adapter  # noqa: E731
    svd = AnalysisSpec(
        name="svd",
        compute=_svd,
        applies_to=has_update,
        reads=frozenset({"adapter", "weights"}),
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
        doc="singular spectra, effective and energy ranks of ΔW = s·BA, intruder dimensions, "
        "each with a random null (same energy; same spectrum in random directions)",
    )
    subspace = AnalysisSpec(
        name="subspace",
        compute=_subspace,
        applies_to=has_update,
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
