"""The seed-to-seed floor on hand-made adapters and states with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from serlens.analysis.seed_floor import cka_rows, phi_rows

D, R, L = 16, 4, 2


def _adapter(folder, A_by_layer):
    folder.mkdir(parents=True)
    tensors = {}
    for i, A in enumerate(A_by_layer):
        key = f"base_model.model.layers.{i}.self_attn.v_proj.lora_"
        tensors[key + "A.weight"] = torch.from_numpy(A.astype(np.float32))
        tensors[key + "B.weight"] = torch.zeros(D, R)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 2 * R}))
    return folder


def test_phi_is_one_for_the_same_subspace_and_has_its_random_value(tmp_path):
    rng = np.random.default_rng(0)
    A = [rng.normal(size=(R, D)) for _ in range(L)]
    mixed = [np.linalg.qr(rng.normal(size=(R, R)))[0] @ a for a in A]  # same row space
    other = [rng.normal(size=(R, D)) for _ in range(L)]
    first = _adapter(tmp_path / "a", A)
    same = phi_rows(first, _adapter(tmp_path / "b", mixed), L)
    assert [row["value"] for row in same] == pytest.approx([1.0] * (L * R))
    assert [row["random_value"] for row in same] == pytest.approx(
        [i / D for i in range(1, R + 1)] * L
    )
    assert {row["depth"] for row in same} == {0.5, 1.0}
    different = phi_rows(first, _adapter(tmp_path / "c", other), L)
    assert max(row["value"] for row in different if row["i"] == 1) < 1.0


def test_cka_of_identical_states_is_one_and_of_unrelated_ones_near_zero():
    rng = np.random.default_rng(1)
    states = rng.normal(size=(40, L + 1, 8))
    rows = cka_rows(states, states.copy())
    assert all(r["value"] == pytest.approx(1.0) for r in rows)
    unrelated = cka_rows(states, rng.normal(size=states.shape))
    debiased = [r["value"] for r in unrelated if r["measure"] == "cka_debiased"]
    assert max(abs(v) for v in debiased) < 0.1
