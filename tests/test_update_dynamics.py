"""The update-over-epochs analysis on hand-made adapter snapshots with known answers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from serlens.analysis.update_dynamics import epoch_files, update_from_files

D, R, L = 12, 3, 2
KEY = "base_model.model.layers.{i}.self_attn.v_proj.lora_{w}.weight"


def _write(folder, epoch, factors):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        KEY.format(i=i, w=w): torch.from_numpy(m.astype(np.float32))
        for i, (A, B) in enumerate(factors)
        for w, m in (("A", A), ("B", B))
    }
    save_file(tensors, str(folder / f"epoch{epoch}.safetensors"))


@pytest.fixture
def snapshots(tmp_path):
    rng = np.random.default_rng(0)
    A0 = [rng.normal(size=(R, D)) for _ in range(L)]
    zeros = np.zeros((D, R))
    B1 = [rng.normal(size=(D, R)) for _ in range(L)]
    epochs = tmp_path / "adapter_epochs"
    _write(epochs, 0, [(a, zeros) for a in A0])
    # epoch 1: B trained, A unchanged; epoch 2: A rotated out of its row space in layer 1
    _write(epochs, 1, [(a, b) for a, b in zip(A0, B1, strict=True)])
    moved = [A0[0], rng.normal(size=(R, D))]
    _write(epochs, 2, [(a, b) for a, b in zip(moved, B1, strict=True)])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 2 * R}))
    shutil.copy(epochs / "epoch2.safetensors", adapter / "adapter_model.safetensors")
    return epochs, adapter, A0, B1, moved


def test_known_answers(snapshots):
    epochs, adapter, A0, B1, moved = snapshots
    table = update_from_files(epochs, adapter, 0.9).set_index(["layer", "epoch", "quantity"])
    value = table["value"]
    for layer in range(L):
        # initialisation: B = 0, so no update; A is where it started
        assert value[(layer, 0, "delta_w_norm")] == 0
        assert value[(layer, 0, "a_change")] == 0
        assert value[(layer, 0, "a_init_phi")] == pytest.approx(1.0)
        # epoch 1: ΔW = (α/r) B A, computed directly
        direct = 2.0 * B1[layer] @ A0[layer]
        assert value[(layer, 1, "delta_w_norm")] == pytest.approx(np.linalg.norm(direct), rel=1e-5)
        sigma1 = np.linalg.svd(direct, compute_uv=False)[0]
        assert value[(layer, 1, "delta_w_sigma1")] == pytest.approx(sigma1, rel=1e-5)
        assert value[(layer, 1, "b_norm")] == pytest.approx(np.linalg.norm(B1[layer]), rel=1e-5)
    # layer 0 kept A; layer 1's A moved to a random row space: φ drops toward r / d
    assert value[(0, 2, "a_init_phi")] == pytest.approx(1.0)
    assert value[(1, 2, "a_init_phi")] < 0.9
    change = np.linalg.norm(moved[1] - A0[1]) / np.linalg.norm(A0[1])
    assert value[(1, 2, "a_change")] == pytest.approx(change, rel=1e-5)
    assert table["random_value"][(1, 2, "a_init_phi")] == pytest.approx(R / D)
    assert table.reset_index()["depth"].max() == 1.0


def test_missing_initialisation_is_an_error(snapshots):
    epochs, *_ = snapshots
    (epochs / "epoch0.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="epoch0"):
        epoch_files(epochs)
