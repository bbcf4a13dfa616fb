"""Audio loading and Whisper's log-mel front end, batched in torch, with the two input policies.

Whisper's encoder maps 2 mel frames (10 ms hop each) to one encoder frame (20 ms); its
positional table holds 1500 frames = 30 s. ``pad30`` pads every clip to 30 s as Whisper was
trained (and as the paper does); ``crop`` pads only to the longest clip of the batch and
masks the padding, which on IEMOCAP-length clips (mean about 4.5 s) costs about a ninth.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from serlens.errors import CorpusError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400
SAMPLES_PER_ENCODER_FRAME = 2 * HOP
MAX_ENCODER_FRAMES = 1500
POLICIES = ("crop", "pad30")


def digital_silence(data: np.ndarray) -> tuple[int, int]:
    """``(start, stop)``: the span of ``data`` (samples x channels, or samples) between its
    leading and trailing *digital* silence, runs of samples that are exactly zero in every
    channel (a file padded with zeros, as the EmoDB 2-s copy is). Quiet but non-zero
    samples are audio. An all-zero signal gives ``(0, len(data))``: nothing is trimmed (the
    manifest rejects silent files)."""
    voiced = np.flatnonzero(np.any(np.asarray(data).reshape(len(data), -1) != 0, axis=1))
    if voiced.size == 0:
        return 0, len(data)
    return int(voiced[0]), int(voiced[-1]) + 1


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``; other rates are resampled (and logged).

    Trailing digital silence (:func:`digital_silence`: exact zeros, as the EmoDB 2-s copy
    pads its short clips) is cut before resampling, so zero padding in a file is not audio
    to the pooling, the frame masks or any frame statistic; it is what ``crop`` itself pads
    a batch with, and under ``pad30`` the clip is padded to 30 s again as Whisper expects.
    Leading zeros stay in the signal (cutting them shifts the clip's onset, which changes
    what Whisper hears), but :class:`LogMel` leaves the frames inside them out of the
    ``frame_mask`` that pooling and the frame statistics average over."""
    import soundfile as sf

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:
        raise CorpusError(f"{path}: unreadable audio ({exc}).") from exc
    _, stop = digital_silence(data)
    data = data[:stop].mean(axis=1)
    if rate != sample_rate:
        import librosa

        log.info("%s: resampling %d Hz -> %d Hz", path, rate, sample_rate)
        data = librosa.resample(data, orig_sr=rate, target_sr=sample_rate).astype(np.float32)
    return data


@dataclass
class MelBatch:
    """Log-mel input of one batch and which encoder frames hold audio.

    ``frame_mask`` marks the frames that are audio: what pooling and every frame statistic
    average over. It leaves out the batch padding and any leading digital silence of a clip
    (exact zeros before its first sample, :func:`digital_silence`; trailing zeros are cut
    on load). ``key_mask`` marks the frames the clip occupies, leading silence included:
    what attention may look at under ``crop`` (the encoder sees the clip as it is).
    """

    mel: torch.Tensor  # (B, n_mels, 2 * T) float32
    frame_mask: torch.Tensor  # (B, T) bool, True where the encoder frame holds audio
    policy: str
    key_mask: torch.Tensor | None = None  # (B, T) bool; None = frame_mask

    @property
    def attended(self) -> torch.Tensor:
        return self.frame_mask if self.key_mask is None else self.key_mask

    @property
    def n_frames(self) -> int:
        return self.frame_mask.shape[1]

    def to(self, device) -> MelBatch:
        key = None if self.key_mask is None else self.key_mask.to(device)
        return MelBatch(self.mel.to(device), self.frame_mask.to(device), self.policy, key)


class LogMel:
    """Whisper's log-mel spectrogram (n_fft 400, hop 160, Slaney mel, log10, max-8 floor, (x+4)/4)."""

    def __init__(self, n_mels: int = 80):
        self.n_mels = n_mels
        filters = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.filters = torch.from_numpy(filters.T.astype(np.float32)).contiguous()
        self.window = torch.hann_window(N_FFT)

    def log_mel(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_mels, samples / hop), normalised per clip as Whisper does."""
        stft = torch.stft(batch, N_FFT, HOP, window=self.window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    def __call__(
        self, waves: list[np.ndarray], policy: str = "crop", max_seconds: float = 30.0
    ) -> MelBatch:
        if policy not in POLICIES:
            raise ValueError(f"audio.input_policy must be one of {POLICIES}, not {policy!r}")
        max_frames = min(
            MAX_ENCODER_FRAMES, int(max_seconds * SAMPLE_RATE) // SAMPLES_PER_ENCODER_FRAME
        )
        lengths = [min(len(w), max_frames * SAMPLES_PER_ENCODER_FRAME) for w in waves]
        audio_frames = [max(1, math.ceil(n / SAMPLES_PER_ENCODER_FRAME)) for n in lengths]
        frames = MAX_ENCODER_FRAMES if policy == "pad30" else max(audio_frames)
        key = torch.arange(frames)[None, :] < torch.tensor(audio_frames)[:, None]
        # frames wholly inside a clip's leading digital silence are not audio (at least one
        # frame of each clip stays)
        lead = [
            min(digital_silence(np.asarray(w[:n]))[0] // SAMPLES_PER_ENCODER_FRAME, f - 1)
            for w, n, f in zip(waves, lengths, audio_frames, strict=True)
        ]
        mask = key & (torch.arange(frames)[None, :] >= torch.tensor(lead)[:, None])
        key = None if not any(lead) else key
        if policy == "pad30":
            # Whisper's own input: every clip zero-padded to 30 s, one spectrogram over it all.
            batch = torch.zeros(len(waves), frames * SAMPLES_PER_ENCODER_FRAME)
            for i, (w, n) in enumerate(zip(waves, lengths, strict=True)):
                batch[i, :n] = torch.from_numpy(np.asarray(w[:n], dtype=np.float32))
            return MelBatch(self.log_mel(batch), mask, policy, key)
        # crop: each clip's spectrogram at its own length, the batch padded with zeros, which is
        # what the conv stem's own zero padding sees; with the attention mask this makes a
        # clip's states independent of what it is batched with.
        log_spec = torch.zeros(len(waves), self.n_mels, 2 * frames)
        for i, (w, n, f) in enumerate(zip(waves, lengths, audio_frames, strict=True)):
            clip = torch.zeros(1, f * SAMPLES_PER_ENCODER_FRAME)
            clip[0, :n] = torch.from_numpy(np.asarray(w[:n], dtype=np.float32))
            log_spec[i, :, : 2 * f] = self.log_mel(clip)[0]
        return MelBatch(log_spec, mask, policy, key)


def length_buckets(
    durations: np.ndarray, batch_size: int, generator: np.random.Generator
) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, the batch order shuffled.

    Sorting by duration with a little noise keeps padding small under ``crop`` while the
    batches still differ from epoch to epoch.
    """
    noisy = durations * generator.uniform(0.9, 1.1, size=len(durations))
    order = np.argsort(noisy, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    generator.shuffle(batches)
    return batches
