"""Greedy Whisper transcription with a converted model directory (a sanity check of the weights)."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from pathlib import Path

import numpy as np

from serlens.audio import SAMPLE_RATE, load_audio

MAX_SECONDS = 30.0

__all__ = ["load_whisper", "transcribe"]


@functools.lru_cache(maxsize=2)
def _load(model_dir: str, stamp: int):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.to("cpu").eval()
    return model, processor


def load_whisper(model_dir: str | Path):
    """(model, processor) of a converted directory: float32, CPU, eval mode; cached per directory."""
    model_dir = Path(model_dir).resolve()
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_dir}: not a transformers model directory (no config.json)")
    return _load(str(model_dir), config.stat().st_mtime_ns)


class _DropKnownNoise(logging.Filter):
    # transformers' Whisper generate() itself fills max_length=20 and passes suppress_tokens
    # next to generation_config, then warns about both on every call.
    _NOISE = ("seem to have been set", "Passing `generation_config` together with")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self._NOISE)


@contextlib.contextmanager
def _quiet_generate():
    logger = logging.getLogger("transformers.generation.utils")
    noise = _DropKnownNoise()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def _mono_16k(audio: np.ndarray | str | Path, sample_rate: int | None) -> np.ndarray:
    if isinstance(audio, str | Path):
        if sample_rate is not None:
            raise ValueError(
                f"{audio}: sample_rate is read from the file; pass it only with samples"
            )
        data, sample_rate = load_audio(audio, SAMPLE_RATE), SAMPLE_RATE
    else:
        data = np.asarray(audio, dtype=np.float32)
        if sample_rate is None:
            sample_rate = SAMPLE_RATE
        if data.ndim == 2:  # (frames, channels) or (channels, frames): average the short axis
            data = data.mean(axis=int(np.argmin(data.shape)))
        elif data.ndim != 1:
            raise ValueError(f"audio must be 1-D or 2-D, got shape {data.shape}")
    if data.size == 0:
        raise ValueError("audio is empty")
    if not np.all(np.isfinite(data)):
        raise ValueError("audio contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import librosa

        data = librosa.resample(data, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    if data.shape[0] > MAX_SECONDS * SAMPLE_RATE:
        raise ValueError(
            f"audio is {data.shape[0] / SAMPLE_RATE:.1f} s long; transcribe() handles one Whisper "
            f"window of at most {MAX_SECONDS:.0f} s"
        )
    return np.ascontiguousarray(data, dtype=np.float32)


def transcribe(
    model_dir: str | Path,
    audio: np.ndarray | str | Path,
    sample_rate: int | None = None,
    max_new_tokens: int = 128,
    language: str | None = "en",
) -> str:
    """Greedy transcript of ``audio``: a sound file, or samples at ``sample_rate``.

    Samples default to 16 kHz; a file's rate comes from its header. Audio is mixed to mono
    and resampled to 16 kHz; at most 30 s (one Whisper window) is accepted.

    ``language`` (a code such as ``"en"``, default English) is forced on a multilingual model
    (``bundled:base``), which otherwise detects the language (``language=None``). English-only
    models (``bundled:tiny.en``) always transcribe English; any other language is refused.
    """
    import torch

    model, processor = load_whisper(model_dir)
    gen = copy.deepcopy(model.generation_config)
    gen.update(num_beams=1, do_sample=False, max_new_tokens=max_new_tokens)
    forced = {}
    if getattr(gen, "is_multilingual", False):
        if language is not None:
            known = getattr(gen, "lang_to_id", None) or {}
            if f"<|{language}|>" not in known:
                codes = sorted(t[2:-2] for t in known)
                raise ValueError(
                    f"{model_dir}: language {language!r} is not one of the model's {codes}"
                )
            forced = {"language": language, "task": "transcribe"}
    elif language not in (None, "en"):
        raise ValueError(f"{model_dir}: English-only model, cannot transcribe {language!r}")
    wave = _mono_16k(audio, sample_rate)
    features = processor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode(), _quiet_generate():
        ids = model.generate(features.to(model.dtype), generation_config=gen, **forced)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
