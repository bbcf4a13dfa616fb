"""The weight analyses on every method with an update: LoRA and DoRA adapters of other modules
than v_proj on some layers only, and full fine-tuning's stored ΔW, on real tiny.en weights.

Known answers: DoRA's ΔW + W0 is peft's ``merge_and_unload`` weight (Liu et al. 2024, eq. 5);
full fine-tuning's ΔW is W_ft − W0 bit for bit; a rank-1 dense ΔW has effective rank 1 and a
Gaussian one reads as its own null (Marchenko–Pastur, same energy and rank).
"""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file
from threadpoolctl import threadpool_limits

from serlens.analysis.lora_spectra import (
    SVD_COLUMNS,
    compute_svd,
    encoder_weights,
    load_update,
    svd_from_files,
    update_deltas,
    update_kind,
)
from serlens.analysis.update_dynamics import update_from_files

CFG = {"energy_fraction": 0.9, "intruder_k": 10, "intruder_epsilon": 0.5}
RANK = 2
N_LAYERS = 4  # tiny.en
D = 384  # tiny.en's d_model; fc1 is 1536 x 384, fc2 384 x 1536


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(1):
        yield


def _value(table, module, matrix, quantity, index=None):
    sel = table[(table.module == module) & (table.matrix == matrix) & (table.quantity == quantity)]
    if index is not None:
        sel = sel[sel["index"] == index]
    assert len(sel) == 1, (module, matrix, quantity, index)
    return float(sel["value"].iloc[0])


def _sigma(table, module, matrix):
    sel = table[(table.module == module) & (table.matrix == matrix) & (table.quantity == "sigma")]
    return sel.sort_values("index")["value"].to_numpy()


def _adapter_run(weights, root, kind, targets, layers):
    """A peft run of ``kind`` (lora, dora) on ``targets`` of ``layers``: the snapshot at
    initialisation (epoch 0), then B, A (and DoRA's magnitude) perturbed, seeded (epoch 1 and
    ``adapter/``), as training would leave them."""
    from serlens.config import validate_config
    from serlens.models.encoder import load_encoder
    from serlens.train.lora import LoraEmotionModel, save_adapter_snapshot

    lora_cfg = {**validate_config({})["lora"], "target_modules": list(targets)}
    model = LoraEmotionModel(
        load_encoder(weights), 4, RANK, lora_cfg, layers=layers, use_dora=kind == "dora"
    )
    epochs = root / "adapter_epochs"
    save_adapter_snapshot(model.peft_encoder, epochs / "epoch0.safetensors")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.encoder.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0.0, 0.05, generator=gen)
                A = module.lora_A["default"].weight
                A.add_(0.3 * A.std() * torch.randn(A.shape, generator=gen))
                if kind == "dora":
                    m = module.lora_magnitude_vector["default"].weight
                    m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen))
    save_adapter_snapshot(model.peft_encoder, epochs / "epoch1.safetensors")
    model.peft_encoder.save_pretrained(root / "adapter", safe_serialization=True)
    model.eval()
    return SimpleNamespace(model=model, adapter=root / "adapter", epochs=epochs)


@pytest.fixture(scope="module")
def dora(weights, tmp_path_factory):
    return _adapter_run(weights, tmp_path_factory.mktemp("dora"), "dora", ("q_proj", "fc1"), [2, 3])


@pytest.fixture(scope="module")
def lora(weights, tmp_path_factory):
    return _adapter_run(weights, tmp_path_factory.mktemp("lora"), "lora", ("fc2",), [0])


@pytest.fixture(scope="module")
def full(weights, tmp_path_factory):
    """A full fine-tuning run's delta.safetensors, written by the training code's own
    ``weight_updates`` from a perturbed encoder (targets q_proj, fc2; k_proj moved too)."""
    from serlens.models.encoder import load_encoder
    from serlens.train.lora import save_safetensors_atomic, weight_updates

    encoder = load_encoder(weights)
    initial = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(("q_proj.weight", "fc2.weight", "k_proj.weight")):
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("full") / "delta.safetensors"
    save_safetensors_atomic(weight_updates(encoder, initial, ("q_proj", "fc2")), path)
    trained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return SimpleNamespace(path=path, initial=initial, trained=trained)


# --------------------------------------------------------------------------- ΔW of every kind


def test_dora_delta_plus_w0_is_peft_merged_weight(dora, weights):
    deltas = update_deltas(dora.adapter, weights)
    expected = {f"layers.{i}.{m}" for i in (2, 3) for m in ("self_attn.q_proj", "fc1")}
    assert set(deltas) == expected
    assert update_kind(dora.adapter) == "dora"
    base = encoder_weights(weights, deltas)
    merged = copy.deepcopy(dora.model.peft_encoder).merge_and_unload()
    updates = load_update(dora.adapter, weights)
    for name, delta in deltas.items():
        W = merged.get_submodule(name).weight.detach().double().numpy()
        assert delta.shape == W.shape == base[name].shape
        assert np.linalg.norm(delta) > 0.1  # the perturbation moved it
        np.testing.assert_allclose(base[name] + delta, W, rtol=0, atol=2e-6)
        np.testing.assert_allclose(delta, W - base[name], rtol=0, atol=2e-6)
        # the magnitude matters: DoRA's ΔW is not LoRA's s·B·A
        u = updates[name]
        low_rank = u.scaling * (u.B @ u.A)
        assert np.linalg.norm(delta - low_rank) > 0.1 * np.linalg.norm(delta)


def test_full_delta_is_w_ft_minus_w0_exactly(full, weights):
    deltas = update_deltas(full.path, weights)
    expected = {f"layers.{i}.{m}" for i in range(N_LAYERS) for m in ("self_attn.q_proj", "fc2")}
    assert set(deltas) == expected  # k_proj moved but is no target
    assert update_kind(full.path) == "full"
    base = encoder_weights(weights, deltas)
    for name, delta in deltas.items():
        key = f"{name}.weight"
        diff = (full.trained[key].float() - full.initial[key].float()).numpy().astype(np.float64)
        assert np.array_equal(delta, diff)
        assert np.array_equal(base[name], full.initial[key].double().numpy())
        assert np.linalg.norm(delta) > 0


def test_update_kinds_are_read_off_the_path(dora, weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        update_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        update_kind(tmp_path / "nothing.safetensors")
    # an adapter with magnitudes but no use_dora is refused, not read as LoRA
    wrong = tmp_path / "adapter"
    shutil.copytree(dora.adapter, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    assert update_kind(wrong) == "lora"
    with pytest.raises(ValueError, match="use_dora is not set"):
        load_update(wrong, weights)


# --------------------------------------------------------------------------- svd.tsv


def test_dora_svd_is_dense_with_full_rank_null_and_matches_the_live_model(dora, weights):
    from peft.tuners.lora import LoraLayer

    table = svd_from_files(dora.adapter, weights, CFG, seed=0)
    assert list(table.columns) == SVD_COLUMNS
    deltas = update_deltas(dora.adapter, weights)
    assert set(table.module) == set(deltas)
    # the depth is L = 4 from the model, though only layers 2 and 3 are adapted
    np.testing.assert_allclose(table.depth, (table.layer + 1) / N_LAYERS)
    assert set(table.layer) == {2, 3}
    for name, delta in deltas.items():
        sigma = _sigma(table, name, "delta_w")
        assert len(sigma) == min(delta.shape) == D  # the whole spectrum, not r values
        np.testing.assert_allclose(sigma, np.linalg.svd(delta, compute_uv=False), rtol=1e-9)
        assert len(_sigma(table, name, "lora_a")) == len(_sigma(table, name, "lora_b")) == RANK
        null = _sigma(table, name, "delta_w_null")
        assert len(null) == D
        assert np.sum(null**2) == pytest.approx(np.sum(sigma**2), rel=1e-9)  # same energy
        # the trained update concentrates its energy more than the isotropic null
        assert _value(table, name, "delta_w_null", "effective_rank") > _value(
            table, name, "delta_w", "effective_rank"
        )
        k = CFG["intruder_k"]
        for matrix in ("merged", "merged_null"):
            cos = table[(table.module == name) & (table.matrix == matrix)]
            assert (cos.quantity == "intruder_max_cos").sum() == k
    # the live peft model gives the same table (its DoRA modules are read there too)
    encoder = dora.model.encoder
    run = SimpleNamespace(
        lora_modules=lambda: {n: m for n, m in encoder.named_modules() if isinstance(m, LoraLayer)},
        encoder=encoder,
        model="tiny.en",
        method="dora",
        fold=1,
    )
    live = compute_svd(run, CFG, seed=0)
    assert list(live.module) == list(table.module) and list(live.matrix) == list(table.matrix)
    np.testing.assert_allclose(live["value"], table["value"], rtol=1e-7, atol=1e-10)


def test_lora_of_fc2_on_one_layer_keeps_the_factored_rank_r_path(lora, weights):
    table = svd_from_files(lora.adapter, weights, CFG, seed=0)
    assert set(table.module) == {"layers.0.fc2"} and set(table.depth) == {1 / N_LAYERS}
    u = load_update(lora.adapter, weights)["layers.0.fc2"]
    assert u.kind == "lora" and u.W0.shape == (D, 4 * D)
    sigma = _sigma(table, "layers.0.fc2", "delta_w")
    assert len(sigma) == RANK == len(_sigma(table, "layers.0.fc2", "delta_w_null"))
    direct = np.linalg.svd(u.scaling * u.B @ u.A, compute_uv=False)[:RANK]
    np.testing.assert_allclose(sigma, direct, rtol=1e-9)


def test_full_svd_known_answers_rank_one_and_gaussian(weights, tmp_path):
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(4 * D), rng.standard_normal(D)
    W0 = encoder_weights(weights, ["layers.0.fc1"])["layers.0.fc1"]
    top = np.linalg.svd(W0, compute_uv=False)[0]
    one = np.outer(u, v) * (10 * top / (np.linalg.norm(u) * np.linalg.norm(v)))
    gauss = 0.01 * rng.standard_normal((4 * D, D))
    path = tmp_path / "delta.safetensors"
    save_file(
        {
            "layers.0.fc1.weight": one.astype(np.float32),
            "layers.1.fc1.weight": gauss.astype(np.float32),
        },
        str(path),
    )
    table = svd_from_files(path, weights, CFG, seed=0)
    assert set(table.matrix) == {"delta_w", "merged", "delta_w_null", "merged_null"}  # no A, B
    np.testing.assert_allclose(table.depth, (table.layer + 1) / N_LAYERS)
    # rank 1: effective and energy rank 1, σ₁ = its norm; its null spreads the same energy
    r1 = "layers.0.fc1"
    assert _value(table, r1, "delta_w", "effective_rank") == pytest.approx(1.0, abs=0.01)
    assert _value(table, r1, "delta_w", "energy_rank") == 1
    assert _value(table, r1, "delta_w", "sigma", 1) == pytest.approx(10 * top, rel=1e-5)
    assert _value(table, r1, "delta_w_null", "effective_rank") > 100
    # ten times W0's top direction, off its basis: an intruder, trained and in the null
    assert _value(table, r1, "merged", "intruder_max_cos", 1) < 0.5
    assert _value(table, r1, "merged_null", "intruder_max_cos", 1) < 0.5
    assert _value(table, r1, "merged", "intruder_count") >= 1
    # a Gaussian ΔW has no structure: it reads as its null (same law, another draw)
    g = "layers.1.fc1"
    for quantity in ("effective_rank", "stable_rank", "energy_rank"):
        trained = _value(table, g, "delta_w", quantity)
        assert _value(table, g, "delta_w_null", quantity) == pytest.approx(trained, rel=0.03)
    # seeded nulls: the same seed, the same table
    pd.testing.assert_frame_equal(table, svd_from_files(path, weights, CFG, seed=0))


def test_full_svd_from_the_run_file(full, weights):
    table = svd_from_files(full.path, weights, CFG, seed=1)
    assert len(table.module.unique()) == 2 * N_LAYERS
    for name, delta in update_deltas(full.path, weights).items():
        sigma = _sigma(table, name, "delta_w")
        np.testing.assert_allclose(sigma, np.linalg.svd(delta, compute_uv=False), rtol=1e-9)
        assert len(_sigma(table, name, "delta_w_null")) == min(delta.shape)


# --------------------------------------------------------------------------- update_dynamics


def test_dora_update_dynamics_uses_the_dora_delta(dora, weights):
    table = update_from_files(dora.epochs, dora.adapter, 0.9, weights)
    value = table.set_index(["module", "epoch", "quantity"])["value"]
    deltas = update_deltas(dora.adapter, weights)
    base = encoder_weights(weights, deltas)
    first = load_update(dora.adapter, weights)
    from serlens.analysis.update_dynamics import load_factors

    m0 = load_factors(dora.epochs / "epoch0.safetensors")
    for name, delta in deltas.items():
        # initialisation: B = 0 and m = ‖W0‖_row, so ΔW vanishes up to float32 round-off
        assert value[(name, 0, "delta_w_norm")] < 1e-5 * np.linalg.norm(base[name])
        assert value[(name, 0, "magnitude_change")] == 0
        # epoch 1 is the saved adapter: the same ΔW as svd.tsv's
        assert value[(name, 1, "delta_w_norm")] == pytest.approx(np.linalg.norm(delta), rel=1e-9)
        sigma1 = np.linalg.svd(delta, compute_uv=False)[0]
        assert value[(name, 1, "delta_w_sigma1")] == pytest.approx(sigma1, rel=1e-9)
        m, start = first[name].magnitude, m0[name]["m"]
        change = np.linalg.norm(m - start) / np.linalg.norm(start)
        assert value[(name, 1, "magnitude_change")] == pytest.approx(change, rel=1e-9)
        assert 0.05 < change < 0.2  # the 10 % perturbation
    np.testing.assert_allclose(table.depth, (table.layer + 1) / N_LAYERS)
    with pytest.raises(ValueError, match="DoRA"):
        update_from_files(dora.epochs, dora.adapter, 0.9)  # no W0


def test_lora_update_dynamics_on_some_layers_has_no_magnitude(lora, weights):
    table = update_from_files(lora.epochs, lora.adapter, 0.9, weights)
    assert "magnitude_change" not in set(table.quantity)
    assert set(table.depth) == {1 / N_LAYERS}
    norm = table[(table.epoch == 1) & (table.quantity == "delta_w_norm")]["value"].item()
    delta = update_deltas(lora.adapter, weights)["layers.0.fc2"]
    assert norm == pytest.approx(np.linalg.norm(delta), rel=1e-9)


# --------------------------------------------------------------------------- registry


def test_specs_apply_to_the_methods_with_an_update():
    from serlens.analysis.registry import ANALYSES, run_inputs
    from serlens.methods import Method, short_form
    from serlens.paths import Paths

    methods = {
        "frozen": short_form("frozen"),
        "lora_r8": short_form("lora_r8"),
        "lora_qf": Method("lora_qf", "lora", rank=2, targets=("q_proj", "fc2"), layers=(0,)),
        "dora_r2": Method("dora_r2", "dora", rank=2, targets=("q_proj", "fc1")),
        "full_ft": Method("full_ft", "full", targets=("v_proj",), lr=1e-5),
    }
    svd, dynamics, subspace = (ANALYSES[n] for n in ("svd", "update_dynamics", "subspace"))
    assert svd.methods(methods) == ["lora_r8", "lora_qf", "dora_r2", "full_ft"]
    assert dynamics.methods(methods) == ["lora_r8", "lora_qf", "dora_r2"]
    assert subspace.methods(methods) == ["lora_r8"]
    assert "weight_update" in svd.reads and "adapter" not in svd.reads
    paths = Paths("r")
    run = "r/c/train/m/{}/seed0/fold1"
    got = run_inputs(svd, methods["full_ft"], paths, "c", "m", 0, 1)
    assert got["weight_update"] == run.format("full_ft") + "/delta.safetensors"
    got = run_inputs(svd, methods["dora_r2"], paths, "c", "m", 0, 1)
    assert got["weight_update"] == run.format("dora_r2") + "/adapter"


# --------------------------------------------------------------------------- figures


def _figure_axes(fig):
    axes = list(fig.axes)
    for sub in getattr(fig, "subfigs", []):
        axes += _figure_axes(sub)
    return axes


@pytest.fixture
def declared():
    from serlens.methods import _DECLARED, Method, declare, short_form

    saved = dict(_DECLARED)
    methods = {
        "lora_r8": short_form("lora_r8"),
        "lora_fc2": Method("lora_fc2", "lora", rank=RANK, targets=("fc2",), layers=(0,)),
        "dora_r2": Method("dora_r2", "dora", rank=RANK, targets=("q_proj", "fc1"), layers=(2, 3)),
        "full_ft": Method("full_ft", "full", targets=("q_proj", "fc2"), lr=1e-5),
    }
    declare(methods)
    yield methods
    declare(saved)


def _aggregate(name, tables, root):
    from serlens.report.aggregate import aggregate_runs

    files = {}
    for method, frame in tables.items():
        path = root / method / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, sep="\t", index=False)
        files[("tiny.en", method, 0, 1)] = path
    return aggregate_runs(name, files)


def test_figures_draw_dora_full_and_declared_lora(declared, lora, dora, full, weights, tmp_path):
    from serlens.report.figures import spectra_figure
    from serlens.report.figures.style import method_label
    from serlens.report.figures.update import update_figure

    svd = _aggregate(
        "svd",
        {
            "lora_fc2": svd_from_files(lora.adapter, weights, CFG, 0),
            "dora_r2": svd_from_files(dora.adapter, weights, CFG, 0),
            "full_ft": svd_from_files(full.path, weights, CFG, 0),
        },
        tmp_path / "svd",
    )
    fig = spectra_figure(svd, None, "tiny.en", 0.5, energy_fraction=0.9)
    axes = _figure_axes(fig)
    titles = [ax.get_title() for ax in axes]
    for method in ("lora_fc2", "dora_r2", "full_ft"):
        assert f"{method_label(method)}: singular values of ΔW" in titles
        assert method_label(method) != method  # labels from the declaration
    legends = {
        ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()]
        for ax in axes
        if ax.get_legend() is not None and "singular values" in ax.get_title()
    }
    assert "rank-r" in legends[f"{method_label('lora_fc2')}: singular values of ΔW"][0]
    assert "full-rank" in legends[f"{method_label('dora_r2')}: singular values of ΔW"][0]
    full_ax = next(a for a in axes if a.get_title().startswith(method_label("full_ft")))
    assert len(full_ax.get_lines()) == 2 * N_LAYERS + 1  # a line per module, and the null
    ranks = [a for a in axes if a.get_ylabel().startswith("effective rank")]
    assert ranks and ranks[0].get_yscale() == "log"  # dense ranks beside LoRA's r

    dynamics = _aggregate(
        "update_dynamics",
        {
            "lora_fc2": update_from_files(lora.epochs, lora.adapter, 0.9, weights),
            "dora_r2": update_from_files(dora.epochs, dora.adapter, 0.9, weights),
        },
        tmp_path / "update",
    )
    fig = update_figure(dynamics, "tiny.en")
    grid = np.array(fig.axes).reshape(2, 4)  # two methods; DoRA adds the magnitude panel
    assert [ax.get_ylabel() for ax in grid[:, 0]] == [
        method_label("lora_fc2"),
        method_label("dora_r2"),
    ]
    assert len(grid[0, 3].get_lines()) == 0 and len(grid[1, 3].get_lines()) == 4
    assert len(grid[1, 0].get_lines()) == 4  # one line per DoRA module, two per layer
