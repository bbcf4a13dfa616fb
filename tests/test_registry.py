"""Every analysis is one declaration, and everything the workflow builds from it is consistent."""

from pathlib import Path

import pytest

from serlens.analysis.registry import ANALYSES, PRODUCTS, Settings
from serlens.config import load_schema, validate_config
from serlens.methods import configured_methods

ROOT = Path(__file__).resolve().parents[1]


def test_every_analysis_module_is_found():
    assert list(ANALYSES) == [
        "contributions",
        "logit_lens",
        "probing",
        "svd",
        "subspace",
        "update_dynamics",
        "ab_dynamics",
        "cka",
        "seed_floor",
        "causal",
    ]


@pytest.mark.parametrize("name", list(ANALYSES))
def test_spec_is_complete(name):
    spec = ANALYSES[name]
    schema = load_schema()["properties"]["analysis"]["properties"]
    for key in spec.keys:
        assert key in schema, f"{name} reads analysis.{key}, which the schema does not declare"
    assert set(spec.reads) <= set(PRODUCTS)
    for figure in spec.figures:
        caption = ROOT / "workflow/report" / f"{figure.name}.rst"
        assert caption.is_file(), f"{name}: figure {figure.name} has no caption {caption}"
        for key in figure.keys:
            assert key in schema
    methods = configured_methods(validate_config({"lora": {"ranks": [4, 8]}}))
    assert spec.methods(methods), f"{name} applies to no configured method"
    settings = spec.settings(validate_config({}))
    assert set(settings) == set(spec.keys) | ({"seed"} if spec.uses_seed else set())


def test_settings_refuse_undeclared_keys():
    settings = Settings("analysis probing", {"probe_Cs": [1.0]})
    assert settings["probe_Cs"] == [1.0]
    with pytest.raises(
        KeyError, match=r"analysis probing read setting 'batch_size'.*declared: \['probe_Cs'\]"
    ):
        settings["batch_size"]


def test_no_analysis_applies_to_a_weighted_sum_head_or_frozen_update():
    methods = configured_methods(validate_config({}))
    assert not any("frozen_wsum" in spec.methods(methods) for spec in ANALYSES.values())
    for name in ("svd", "ab_dynamics", "cka", "subspace"):
        assert "frozen" not in ANALYSES[name].methods(methods)


def test_run_inputs_map_products_to_the_run_and_pass_files():
    from serlens.analysis.registry import run_inputs
    from serlens.methods import parse_method
    from serlens.paths import Paths

    paths = Paths("r")
    frozen = run_inputs(ANALYSES["probing"], parse_method("frozen"), paths, "c", "m", 0, 1)
    assert frozen["states"] == "r/c/states/m/base/states.safetensors"  # the base pass is its own
    assert frozen["features"] == "r/c/features/m/pooled.safetensors"
    assert "base_states" not in frozen and set(frozen) == {
        "manifest",
        "folds",
        "states",
        "features",
    }
    lora = run_inputs(ANALYSES["cka"], parse_method("lora_r8"), paths, "c", "m", 0, 1)
    assert lora["states"] == "r/c/states/m/lora_r8/seed0/fold1/states.safetensors"
    assert lora["base_states"] == "r/c/states/m/base/states.safetensors"
    assert set(lora) == {"manifest", "folds", "states", "base_states"}
    svd = run_inputs(ANALYSES["svd"], parse_method("lora_r8"), paths, "c", "m", 0, 1)
    assert svd["weight_update"] == "r/c/train/m/lora_r8/seed0/fold1/adapter"
    from serlens.methods import Method

    full = Method("full", "full", targets=("v_proj",), lr=1e-5)
    svd_full = run_inputs(ANALYSES["svd"], full, paths, "c", "m", 0, 1)
    assert svd_full["weight_update"] == "r/c/train/m/full/seed0/fold1/delta.safetensors"
    assert svd["weights"] == "r/models/m.json"


def test_the_architecture_notes_state_which_analysis_applies_to_which_kind():
    from pathlib import Path

    from serlens.analysis.registry import (
        APPLICABILITY_BEGIN,
        APPLICABILITY_END,
        applicability_table,
    )

    doc = (Path(__file__).resolve().parents[1] / "docs/architecture.md").read_text()
    table = doc.split(APPLICABILITY_BEGIN, 1)[1].split(APPLICABILITY_END, 1)[0].strip()
    assert table == applicability_table(), (
        "docs/architecture.md is out of date: paste serlens.analysis.registry.applicability_table()"
    )
