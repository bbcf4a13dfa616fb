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
    with pytest.raises(ConfigError, match=r"allowed forms: 'frozen'.*lora_r"):
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
