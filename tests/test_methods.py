"""Method names are built, parsed and read in one place (serlens.methods)."""

import pytest

from serlens.config import validate_config
from serlens.errors import ConfigError
from serlens.methods import (
    ENCODER_TRAIN_KEYS,
    HEAD_TRAIN_KEYS,
    configured_methods,
    method_label,
    method_sort_key,
    parse_method,
)


def test_names_parse_to_methods():
    assert parse_method("frozen").readout == "last" and not parse_method("frozen").has_adapter
    wsum = parse_method("frozen_wsum")
    assert wsum.readout == "wsum" and wsum.uses_features and wsum.encoder_variant == "base"
    lora = parse_method("lora_r16")
    assert (lora.kind, lora.rank, lora.has_adapter, lora.trains_encoder) == ("lora", 16, True, True)
    assert lora.encoder_variant == "lora_r16"


@pytest.mark.parametrize("name", ["lora_r0", "lora_r", "lora_rx", "Frozen", "dora_r8", "lora_r8_"])
def test_unknown_names_are_config_errors_listing_the_forms(name):
    with pytest.raises(ConfigError, match=r"frozen, frozen_wsum and lora_r<rank>.*methods:"):
        parse_method(name)


def test_configured_grid_and_order():
    config = validate_config({"lora": {"ranks": [32, 8]}})
    assert list(configured_methods(config)) == ["frozen", "frozen_wsum", "lora_r8", "lora_r32"]
    names = ["lora_r32", "frozen_wsum", "lora_r8", "frozen"]
    assert sorted(names, key=method_sort_key) == ["frozen", "frozen_wsum", "lora_r8", "lora_r32"]
    assert method_label("lora_r8") == "LoRA r = 8"


def test_each_kind_of_run_reads_only_its_own_training_keys():
    config = validate_config({})
    head = parse_method("frozen").train_settings(config)
    lora = parse_method("lora_r8").train_settings(config)
    assert set(HEAD_TRAIN_KEYS) <= set(head["train"]) and not set(ENCODER_TRAIN_KEYS) & set(
        head["train"]
    )
    assert set(ENCODER_TRAIN_KEYS) <= set(lora["train"]) and not set(HEAD_TRAIN_KEYS) & set(
        lora["train"]
    )
    assert set(lora["lora"]) == {"target_modules", "alpha_per_rank", "dropout"}
    assert "audio" in lora and "audio" not in head
    # a LoRA setting changes LoRA runs' params only
    changed = validate_config({"lora": {"dropout": 0.3}})
    assert parse_method("frozen").train_settings(changed) == head
    assert parse_method("lora_r8").train_settings(changed) != lora


METHODS = {
    "lora_qv_r8": {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]},
    "lora_early_r8": {"kind": "lora", "rank": 8, "layers": "first_half"},
    "lora_some": {"kind": "lora", "rank": 4, "layers": [2, 0]},
    "dora_r8": {"kind": "dora", "rank": 8},
    "full": {"kind": "full", "lr": 1e-5},
}


def test_declared_methods_join_the_short_form_in_report_order():
    config = validate_config({"lora": {"ranks": [8]}, "methods": METHODS})
    methods = configured_methods(config)
    assert list(methods) == ["frozen", "frozen_wsum", "lora_r8", *METHODS]
    qv, early, some, dora, full = (methods[n] for n in METHODS)
    assert qv.targets == ("q_proj", "v_proj") and qv.layers == "all" and not qv.short
    assert early.targets == ("v_proj",)  # lora.target_modules by default
    assert early.layer_indices(4) == [0, 1] and some.layer_indices(4) == [0, 2]
    assert (dora.kind, dora.has_adapter, dora.has_update) == ("dora", True, True)
    assert (full.has_adapter, full.has_update, full.trains_encoder, full.lr) == (
        False,
        True,
        True,
        1e-5,
    )
    assert not any(m.in_rank_family for m in (qv, early, dora, full))
    assert methods["lora_r8"].in_rank_family
    order = sorted(
        ["full", "dora_r8", "lora_r8", "frozen", "lora_qv_r8"], key=method_sort_key_of(methods)
    )
    assert order[:2] == ["frozen", "lora_r8"] and order[-1] == "full"


def method_sort_key_of(methods):
    from serlens.methods import declare

    declare(methods)
    return method_sort_key


def test_declared_runs_carry_their_spec_and_short_form_runs_do_not():
    from serlens.methods import Method

    config = validate_config({"methods": METHODS})
    methods = configured_methods(config)
    short = methods["lora_r8"].train_settings(config)
    assert "method" not in short  # the settings (so the rerun trigger) of before
    for name in METHODS:
        settings = methods[name].train_settings(config)
        assert Method.from_settings(name, settings) == methods[name]
    assert Method.from_settings("lora_r8", short) == methods["lora_r8"]
    assert methods["lora_qv_r8"].train_settings(config)["lora"]["target_modules"] == [
        "q_proj",
        "v_proj",
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "adapter"}, r"methods\.x\.kind.*frozen.*lora.*dora.*full"),
        (
            {"kind": "lora", "rank": 8, "targets": ["v_proj", "w_proj"]},
            r"methods\.x\.targets.*q_proj",
        ),
        ({"kind": "lora", "rank": 8, "layers": "middle"}, r"methods\.x\.layers"),
        ({"kind": "lora", "rank": 8, "layers": [-1]}, r"methods\.x\.layers"),
        ({"kind": "lora"}, r"methods\.x\.rank"),
        ({"kind": "full"}, r"methods\.x\.lr"),
        ({"kind": "full", "lr": 1e-5, "rank": 4}, r"methods\.x.*rank.*do not apply"),
    ],
)
def test_bad_method_specs_are_config_errors_naming_the_method(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"methods": {"x": spec}})


def test_layer_indices_beyond_the_encoder_name_the_method():
    config = validate_config({"methods": {"deep": {"kind": "lora", "rank": 2, "layers": [1, 9]}}})
    with pytest.raises(ConfigError, match=r"methods\.deep\.layers.*\[9\].*0-3"):
        configured_methods(config)["deep"].layer_indices(4)


def test_a_short_form_name_cannot_mean_another_run():
    with pytest.raises(ConfigError, match="lora_r8 is a short-form name"):
        validate_config(
            {"lora": {"ranks": [8]}, "methods": {"lora_r8": {"kind": "dora", "rank": 8}}}
        )
    same = validate_config(
        {"lora": {"ranks": [8]}, "methods": {"lora_r8": {"kind": "lora", "rank": 8}}}
    )
    assert configured_methods(same)["lora_r8"].short
    with pytest.raises(ConfigError, match="path component"):
        validate_config({"methods": {"base": {"kind": "full", "lr": 1e-5}}})
