"""svd.tsv and subspace.tsv: known answers on synthetic adapters, layout on a real peft encoder."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file
from threadpoolctl import threadpool_limits

from serlens.analysis.lora_spectra import (
    SUBSPACE_COLUMNS,
    SVD_COLUMNS,
    _haar_columns,
    compute_svd,
    layer_index,
    load_lora_a,
    lora_update_spectra,
    null_rng,
    product_singular_values,
    random_subspace_phi,
    similarity_grid,
    subspace_similarity_table,
    write_subspace_similarity,
)
from serlens.analysis.spectra import intruder_dimensions, stable_rank, subspace_similarity

REPO = Path(__file__).resolve().parents[1]
CFG = {"energy_fraction": 0.9, "intruder_k": 10, "intruder_epsilon": 0.5}


@pytest.fixture(autouse=True)
def one_blas_thread():
    # As in the workflow (threads: 1): multithreaded BLAS on a shared 2-core machine is slower.
    with threadpool_limits(1):
        yield


def _value(table, matrix, quantity, index=None):
    rows = table[(table.matrix == matrix) & (table.quantity == quantity)]
    if index is not None:
        rows = rows[rows["index"] == index]
    assert len(rows) == 1, (matrix, quantity, index)
    return float(rows["value"].iloc[0])


def _orthonormal(d, k, rng):
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


# --------------------------------------------------------------------------- svd.tsv


def test_rank_one_update_has_effective_and_energy_rank_one():
    rng = np.random.default_rng(0)
    d_out, d_in, r = 12, 10, 4
    u, v = rng.standard_normal(d_out), rng.standard_normal(d_in)
    A = np.zeros((r, d_in))
    B = np.zeros((d_out, r))
    A[0], B[:, 0] = v, u  # B A = u vᵀ
    W0 = rng.standard_normal((d_out, d_in))
    table = lora_update_spectra(A, B, 2.0, W0, intruder_k=3)
    assert _value(table, "delta_w", "effective_rank") == pytest.approx(1.0, abs=1e-9)
    assert _value(table, "delta_w", "energy_rank") == 1
    assert _value(table, "delta_w", "stable_rank") == pytest.approx(1.0, abs=1e-9)
    sigma1 = 2.0 * np.linalg.norm(u) * np.linalg.norm(v)
    assert _value(table, "delta_w", "sigma", 1) == pytest.approx(sigma1, rel=1e-12)
    assert _value(table, "delta_w", "sigma", 2) == pytest.approx(0.0, abs=1e-9)
    assert _value(table, "lora_a", "effective_rank") == pytest.approx(1.0, abs=1e-9)
    # r singular values of each of ΔW, A, B; k max-cosines.
    counts = table.groupby(["matrix", "quantity"]).size()
    assert counts[("delta_w", "sigma")] == r and counts[("lora_b", "sigma")] == r
    assert counts[("merged", "intruder_max_cos")] == 3


def test_zero_b_leaves_the_weight_intact_and_has_no_intruders():
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((16, 16))
    A = rng.standard_normal((4, 16))
    table = lora_update_spectra(A, np.zeros((16, 4)), 2.0, W0, intruder_k=5)
    assert _value(table, "merged", "intruder_count") == 0
    cosines = table[table.quantity == "intruder_max_cos"]["value"]
    np.testing.assert_allclose(cosines, 1.0, atol=1e-9)
    for quantity in ("effective_rank", "stable_rank", "energy_rank"):
        assert _value(table, "delta_w", quantity) == 0
    assert _value(table, "lora_a", "energy_rank") >= 1


def test_a_large_update_off_the_pretrained_basis_is_an_intruder():
    # W0's left singular vectors are the standard basis; a dominant update along the
    # uniform direction u has |cos(u, e_i)| = 1/4 for every i (d = 16), below epsilon = 0.5.
    d = 16
    W0 = np.diag(np.linspace(2.0, 1.0, d))
    u = np.full(d, 1 / np.sqrt(d))
    A = np.zeros((2, d))
    B = np.zeros((d, 2))
    A[0], B[:, 0] = 10 * u, u  # ΔW = 10 u uᵀ (scaling 1)
    table = lora_update_spectra(A, B, 1.0, W0, intruder_k=2, intruder_epsilon=0.5)
    assert _value(table, "merged", "intruder_count") == 1
    assert _value(table, "merged", "intruder_max_cos", 1) < 0.5
    assert _value(table, "merged", "intruder_max_cos", 2) > 0.5


def test_delta_w_spectrum_from_factors_equals_the_direct_svd():
    """σ(B A) from the r x r product of the QR factors = the SVD of the d_out x d_in product;
    the table's stable rank and intruders = those of :mod:`serlens.analysis.spectra`."""
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((5, 40)), rng.standard_normal((30, 5)) * np.arange(1, 6)
    direct = np.linalg.svd(B @ A, compute_uv=False)[:5]
    np.testing.assert_allclose(product_singular_values(B, A), direct, rtol=1e-10)
    W0 = rng.standard_normal((30, 40))
    table = lora_update_spectra(A, B, 0.5, W0, intruder_k=4)
    assert _value(table, "delta_w", "stable_rank") == pytest.approx(stable_rank(0.5 * B @ A))
    count, cos = intruder_dimensions(W0, W0 + 0.5 * B @ A, k=4, epsilon=0.5)
    assert _value(table, "merged", "intruder_count") == count
    for j in range(4):
        assert _value(table, "merged", "intruder_max_cos", j + 1) == pytest.approx(cos[j])
    assert not (table.matrix.str.endswith("_null")).any()  # no rng, no nulls


def test_svd_nulls_same_energy_and_same_spectrum_in_random_directions():
    """delta_w_null: a Gaussian rank-r update scaled to ‖ΔW‖_F (ranks near r for r ≪ d);
    merged_null: the trained σ in random directions, whose large update is an intruder."""
    d, r = 64, 4
    W0 = np.diag(np.linspace(2.0, 1.0, d))  # left singular vectors: the standard basis
    # a rank-one trained update along e_1: aligned with W0's top singular vector
    A, B = np.zeros((r, d)), np.zeros((d, r))
    A[0, 0], B[0, 0] = 10.0, 1.0
    table = lora_update_spectra(A, B, 1.0, W0, intruder_k=2, rng=null_rng(0, "layers.0.fc1"))
    sigma = table[(table.matrix == "delta_w_null") & (table.quantity == "sigma")]["value"]
    assert np.sum(sigma.to_numpy() ** 2) == pytest.approx(10.0**2)  # same energy as ΔW
    assert _value(table, "delta_w", "energy_rank") == 1
    assert _value(table, "delta_w_null", "energy_rank") >= 3  # isotropic: ceil(0.9 r) = 4 ± 1
    assert _value(table, "delta_w_null", "effective_rank") > 3
    # the trained update keeps W0's top direction: no intruder; at random it is one
    assert _value(table, "merged", "intruder_count") == 0
    assert _value(table, "merged_null", "intruder_count") >= 1
    assert _value(table, "merged_null", "intruder_max_cos", 1) < 0.5
    # reproducible per (seed, module), independent across modules
    again = lora_update_spectra(A, B, 1.0, W0, intruder_k=2, rng=null_rng(0, "layers.0.fc1"))
    pd.testing.assert_frame_equal(table, again)
    other = lora_update_spectra(A, B, 1.0, W0, intruder_k=2, rng=null_rng(0, "layers.1.fc1"))
    assert not np.allclose(other["value"], table["value"])


def test_layer_index():
    assert layer_index("layers.3.self_attn.v_proj") == 3
    assert layer_index("base_model.model.layers.12.fc1") == 12
    assert layer_index("conv1") is None


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A peft-wrapped tiny.en encoder (rank 4, v_proj) with random B, as a TrainedRun."""
    from serlens.analysis.runs import TrainedRun
    from serlens.config import validate_config
    from serlens.models.encoder import load_encoder
    from serlens.models.resolve import resolve_weights
    from serlens.train.lora import LoraEmotionModel

    # The workflow's converted copy when there is one; otherwise convert (about 6 s).
    resources = REPO / "resources"
    if not (resources / "weights" / "tiny.en" / "config.json").is_file():
        resources = tmp_path_factory.mktemp("resources")
    weights = resolve_weights("bundled:tiny.en", resources)
    model = LoraEmotionModel(load_encoder(weights), 4, 4, validate_config({})["lora"])
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.encoder.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_(0.0, 0.05)
    model.eval()
    return TrainedRun(
        "tiny.en",
        "lora_r4",
        1,
        model.encoder,
        model.head,
        {},
        ["a"] * 4,
        "crop",
        30.0,
        4,
        model.peft_encoder,
    )


def test_svd_table_on_a_real_peft_encoder(lora_run):
    table = compute_svd(lora_run, CFG, seed=0)
    assert list(table.columns) == SVD_COLUMNS
    modules = lora_run.lora_modules()
    n_layers = len(lora_run.encoder.layers)
    assert sorted(table.module.unique()) == sorted(modules) and len(modules) == n_layers
    # Per module: 3 x (3 summaries + r sigmas) + 1 intruder count + k max-cosines, and the
    # nulls: 3 summaries + r sigmas, 1 intruder count + k max-cosines.
    k = CFG["intruder_k"]
    assert len(table) == n_layers * (3 * (3 + 4) + 1 + k + (3 + 4) + 1 + k)
    assert set(table.matrix) == {
        "delta_w",
        "lora_a",
        "lora_b",
        "merged",
        "delta_w_null",
        "merged_null",
    }
    for name, rows in table.groupby("module"):
        layer = int(name.split(".")[1])
        assert (rows.layer == layer).all() and np.allclose(rows.depth, (layer + 1) / n_layers)
        # Our ΔW is peft's delta weight.
        expected = torch.linalg.svdvals(
            modules[name].get_delta_weight("default").detach().double()
        )[:4].numpy()
        sigma = rows[(rows.matrix == "delta_w") & (rows.quantity == "sigma")].sort_values("index")[
            "value"
        ]
        np.testing.assert_allclose(sigma, expected, rtol=1e-5)
        assert 1 <= _value(rows, "delta_w", "effective_rank") <= 4
    assert table["index"].isna().sum() == n_layers * (3 * 3 + 1 + 3 + 1)
    # seeded: the same seed gives the same nulls, another seed other ones
    pd.testing.assert_frame_equal(table, compute_svd(lora_run, CFG, seed=0))
    other = compute_svd(lora_run, CFG, seed=1)
    assert not np.allclose(
        other.loc[other.matrix == "delta_w_null", "value"],
        table.loc[table.matrix == "delta_w_null", "value"],
    )
    trained = table.matrix.isin(["delta_w", "lora_a", "lora_b", "merged"])
    pd.testing.assert_frame_equal(other[trained], table[trained])


# --------------------------------------------------------------------------- subspace.tsv


def _write_adapter(folder, a_by_layer):
    folder.mkdir(parents=True)
    tensors = {}
    for layer, A in enumerate(a_by_layer):
        prefix = f"base_model.model.layers.{layer}.self_attn.v_proj"
        tensors[f"{prefix}.lora_A.weight"] = A.astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.zeros((A.shape[1], A.shape[0]), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": a_by_layer[0].shape[0], "layers_to_transform": None})
    )
    return folder


def test_similarity_grid():
    assert similarity_grid(1) == [1]
    assert similarity_grid(8) == [1, 2, 4, 8]
    assert similarity_grid(12) == [1, 2, 4, 8, 12]


def test_subspace_similarity_of_nested_and_unrelated_adapters(tmp_path):
    rng = np.random.default_rng(2)
    d, r1, r2 = 256, 4, 8
    basis = _orthonormal(d, r2, rng)
    # Layer 0: A_8's top-4 right-singular subspace is A_4's row space (larger singular values).
    nested_4 = np.diag([8.0, 7.0, 6.0, 5.0]) @ basis[:, :r1].T
    nested_8 = np.diag([9.0, 7.5, 6.5, 5.5, 1.0, 0.9, 0.8, 0.7]) @ basis.T
    # Layer 1: independent random matrices.
    random_4, random_8 = rng.standard_normal((r1, d)), rng.standard_normal((r2, d))
    small = _write_adapter(tmp_path / "r4" / "adapter", [nested_4, random_4])
    large = _write_adapter(tmp_path / "r8" / "adapter", [nested_8, random_8])
    out = tmp_path / "analysis" / "subspace.tsv"

    table = write_subspace_similarity({4: small, 8: large}, out, model="tiny.en", fold=2)
    assert list(table.columns) == SUBSPACE_COLUMNS
    assert len(table) == 2 * len(similarity_grid(4)) * len(similarity_grid(8))
    assert (table.rank_a == 4).all() and (table.rank_b == 8).all() and (table.fold == 2).all()
    np.testing.assert_allclose(table.depth, (table.layer + 1) / 2)
    nested = table[table.layer == 0]
    np.testing.assert_allclose(nested[nested.i == nested.j].phi, 1.0, atol=1e-6)
    np.testing.assert_allclose(nested[nested.j >= nested.i].phi, 1.0, atol=1e-6)
    unrelated = table[table.layer == 1]
    assert (unrelated.phi < 0.15).all()  # about max(i, j) / d for random subspaces
    np.testing.assert_allclose(table["phi_null"], np.maximum(table.i, table.j) / d)

    written = pd.read_csv(out, sep="\t")
    assert list(written.columns) == SUBSPACE_COLUMNS and len(written) == len(table)


def test_a_single_rank_writes_a_header_only_table(tmp_path):
    adapter = _write_adapter(tmp_path / "adapter", [np.eye(2, 8)])
    table = write_subspace_similarity({2: adapter}, tmp_path / "subspace.tsv", model="m", fold=1)
    assert table.empty
    assert list(pd.read_csv(tmp_path / "subspace.tsv", sep="\t").columns) == SUBSPACE_COLUMNS


def test_rank_mismatch_and_missing_adapter_name_the_folder(tmp_path):
    adapter = _write_adapter(tmp_path / "adapter", [np.eye(2, 8)])
    with pytest.raises(ValueError, match="expected rank 4"):
        subspace_similarity_table({4: adapter, 8: adapter}, "m", 1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lora_a(tmp_path / "nowhere")


@pytest.mark.parametrize(("d", "i", "j"), [(16, 1, 1), (32, 2, 8), (32, 4, 4), (64, 8, 16)])
def test_phi_of_random_subspaces_matches_its_null_max_i_j_over_d(d, i, j):
    """Monte Carlo: φ of independent uniformly random subspaces averages max(i, j) / d."""
    rng = np.random.default_rng(100 + d + i + j)
    reps = 2000
    phis = np.empty(reps)
    for k in range(reps):
        U, V = _haar_columns(rng, d, i), _haar_columns(rng, d, j)
        phis[k] = np.sum((U.T @ V) ** 2) / min(i, j)
    se = phis.std(ddof=1) / np.sqrt(reps)
    assert abs(phis.mean() - random_subspace_phi(i, j, d)) < 4 * se
    # the same through the analysis' own φ on Gaussian A matrices (Haar right-singular subspaces)
    via = [
        subspace_similarity(rng.standard_normal((i, d)), rng.standard_normal((j, d)), i, j)
        for _ in range(500)
    ]
    assert abs(np.mean(via) - max(i, j) / d) < 4 * np.std(via, ddof=1) / np.sqrt(500)


def test_random_subspace_phi_known_values():
    assert random_subspace_phi(1, 1, 384) == pytest.approx(1 / 384)
    assert random_subspace_phi(8, 32, 384) == pytest.approx(32 / 384)
    assert random_subspace_phi(4, 4, 4) == 1.0  # the whole space
    with pytest.raises(ValueError, match="1 <= i, j <= d"):
        random_subspace_phi(5, 1, 4)
