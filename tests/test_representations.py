"""cka.tsv: frozen vs LoRA CKA on a real tiny.en encoder and a few synthetic clips."""

from pathlib import Path

import numpy as np
import pytest
import torch

from serlens.analysis.cka import cka_matrix
from serlens.analysis.representations import (
    CKA_COLUMNS,
    CKA_KINDS,
    cka_table,
    compute_cka,
    frozen_and_lora_states,
)
from serlens.analysis.runs import TrainedRun
from serlens.train.data import Split

REPO = Path(__file__).resolve().parents[1]
CFG = {"batch_size": 4, "rbf_threshold": 0.5}


def _clips(n, seed):
    """Tones and noise of different lengths, so the batches need padding."""
    rng = np.random.default_rng(seed)
    waves, durations = [], []
    for i in range(n):
        seconds = rng.uniform(0.3, 0.6)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * (110 + 40 * i) * t) + 0.02 * rng.standard_normal(len(t))
        waves.append(wave.astype(np.float32))
        durations.append(seconds)
    return Split(
        [f"u{i}" for i in range(n)], np.arange(n) % 4, np.array(durations), [""] * n, waves
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A rank-4 LoRA tiny.en encoder at initialisation (B = 0) with five short test clips."""
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
    model.eval()
    splits = {"test": _clips(5, 0)}
    return TrainedRun(
        "tiny.en",
        "lora_r4",
        1,
        model.encoder,
        model.head,
        splits,
        list("abcd"),
        "crop",
        30.0,
        4,
        model.peft_encoder,
    )


def _diagonal(table, kind):
    rows = table[(table.kind == kind) & (table.layer_frozen == table.layer_lora)]
    return rows.sort_values("layer_frozen")["value"].to_numpy()


def test_cka_at_initialisation_is_one_on_the_diagonal(lora_run):
    n_states = len(lora_run.encoder.layers) + 1
    table = compute_cka(lora_run, CFG, seed=0)
    assert list(table.columns) == CKA_COLUMNS
    assert len(table) == len(CKA_KINDS) * n_states**2
    assert set(table.kind) == set(CKA_KINDS)
    assert not table.value.isna().any()
    np.testing.assert_allclose(table.depth_frozen, table.layer_frozen / (n_states - 1))
    np.testing.assert_allclose(table.depth_lora, table.layer_lora / (n_states - 1))
    for kind in CKA_KINDS:
        np.testing.assert_allclose(_diagonal(table, kind), 1.0, atol=1e-9)


def test_a_trained_adapter_moves_the_late_layers_only(lora_run):
    from serlens.models.encoder import pooled_layer_states

    modules = lora_run.lora_modules()
    saved = {name: m.lora_B["default"].weight.detach().clone() for name, m in modules.items()}
    split = lora_run.splits["test"]
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            for m in modules.values():
                m.lora_B["default"].weight.normal_(0.0, 0.5)
        frozen, lora = frozen_and_lora_states(lora_run, "test", batch_size=3)
        with torch.inference_mode():
            alone = pooled_layer_states(lora_run.encoder, lora_run.logmel([split.waves[3]], "crop"))
    finally:
        with torch.no_grad():
            for name, m in modules.items():
                m.lora_B["default"].weight.copy_(saved[name])

    assert frozen.shape == (
        len(lora_run.encoder.layers) + 1,
        len(split),
        lora_run.encoder.config.d_model,
    )
    assert frozen.dtype == np.float64 and lora.dtype == np.float64
    # Rows are in split order although batches run in duration order.
    np.testing.assert_allclose(lora[:, 3], alone[0].double().numpy(), rtol=1e-4, atol=1e-4)
    table = cka_table(frozen, lora, CFG["rbf_threshold"])
    for kind in CKA_KINDS:
        diagonal = _diagonal(table, kind)
        assert diagonal[0] == pytest.approx(1.0, abs=1e-9)  # the conv stem has no adapter
        assert diagonal[-1] < 0.999
    # Frozen a vs LoRA b is not LoRA a vs frozen b.
    linear = table[table.kind == "linear"].set_index(["layer_frozen", "layer_lora"])["value"]
    assert not np.isclose(linear[(1, 3)], linear[(3, 1)])


def test_cka_table_matches_cka_matrix():
    rng = np.random.default_rng(3)
    frozen = rng.standard_normal((3, 10, 5))
    lora = frozen + 0.3 * rng.standard_normal((3, 10, 5))
    table = cka_table(frozen, lora, threshold=0.7)
    for kind in CKA_KINDS:
        expected = cka_matrix(list(frozen), list(lora), kind, threshold=0.7)
        got = table[table.kind == kind].pivot(
            index="layer_frozen", columns="layer_lora", values="value"
        )
        np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-12)
    same = cka_table(frozen, frozen)
    np.testing.assert_allclose(same[same.layer_frozen == same.layer_lora].value, 1.0, atol=1e-12)


def test_frozen_run_is_refused(lora_run):
    frozen = TrainedRun(
        "tiny.en",
        "frozen",
        1,
        lora_run.encoder,
        lora_run.head,
        lora_run.splits,
        lora_run.classes,
        "crop",
        30.0,
    )
    with pytest.raises(ValueError, match="no adapter"):
        compute_cka(frozen, CFG, seed=0)
