"""Digital silence (exact zeros at either end of a file) is not audio."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from serlens.audio import SAMPLES_PER_ENCODER_FRAME, LogMel, digital_silence, load_audio
from serlens.corpus.manifest import check_audio


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t + 0.5)).astype(np.float32)


def test_digital_silence_spans_the_nonzero_samples_only():
    x = np.concatenate([np.zeros(100), [0.0, 1e-6, 0.5, 0.0, -0.2], np.zeros(50)])
    start, stop = digital_silence(x)
    assert (start, stop) == (101, 105)  # quiet but non-zero (1e-6) is audio; inner zeros stay
    stereo = np.zeros((10, 2))
    stereo[3, 1] = 0.1
    assert digital_silence(stereo) == (3, 4)  # a sample is audio when any channel is non-zero
    assert digital_silence(np.zeros(7)) == (0, 7)  # all zeros: nothing trimmed


def test_zero_padding_is_cut_on_load_and_in_the_manifest_duration(tmp_path):
    audio = tone(0.6)
    lead = np.zeros(8000, np.float32)
    padded = np.concatenate([lead, audio, np.zeros(24000, np.float32)])
    path = tmp_path / "padded.wav"
    sf.write(path, padded, 16000, subtype="FLOAT")
    loaded = load_audio(path)
    # the trailing zeros are cut; the leading ones stay (they are the clip's onset)
    assert len(loaded) == len(lead) + len(audio)
    assert np.allclose(loaded[len(lead) :], audio, atol=1e-6)
    duration, rate = check_audio(path, "test")
    assert rate == 16000 and abs(duration - 0.6) < 1e-3  # not the file's 2.6 s


def test_padding_does_not_enter_the_frame_mask(tmp_path):
    audio = tone(1.0)
    sf.write(tmp_path / "a.wav", audio, 16000, subtype="FLOAT")
    padded = np.concatenate([audio, np.zeros(16000, np.float32)])
    sf.write(tmp_path / "b.wav", padded, 16000, subtype="FLOAT")
    logmel = LogMel(80)
    a = logmel([load_audio(tmp_path / "a.wav")], "crop", 30)
    b = logmel([load_audio(tmp_path / "b.wav")], "crop", 30)
    assert int(b.frame_mask.sum()) == int(a.frame_mask.sum()) == 16000 // SAMPLES_PER_ENCODER_FRAME
    assert np.allclose(a.mel.numpy(), b.mel.numpy(), atol=1e-5)


def test_leading_silence_is_attended_but_not_pooled(tmp_path):
    """Frames inside a clip's leading zeros leave the frame mask (pooling, statistics) but
    stay in the attention keys; a clip without them keeps its plain prefix mask."""
    from serlens.models.encoder import attention_mask

    audio = tone(1.0)
    lead = np.zeros(5 * SAMPLES_PER_ENCODER_FRAME + 100, np.float32)  # 5 whole frames + a bit
    logmel = LogMel(80)
    batch = logmel([np.concatenate([lead, audio]), audio], "crop", 30)
    n_lead = (len(lead) + len(audio) + SAMPLES_PER_ENCODER_FRAME - 1) // SAMPLES_PER_ENCODER_FRAME
    assert int(batch.key_mask[0].sum()) == n_lead
    assert not batch.frame_mask[0, :5].any() and batch.frame_mask[0, 5:n_lead].all()
    assert int(batch.frame_mask[1].sum()) == int(batch.key_mask[1].sum()) == 50
    keys = attention_mask(batch, torch.float32)[:, 0, 0]
    assert (keys[0, :n_lead] == 0).all() and (keys[0, n_lead:] < -1e30).all()
    plain = logmel([audio], "crop", 30)
    assert plain.key_mask is None and int(plain.frame_mask.sum()) == 50
    moved = batch.to("cpu")
    assert torch.equal(moved.key_mask, batch.key_mask)
