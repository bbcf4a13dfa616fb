"""Whisper's encoder run explicitly, so the input policy, the padding mask and the captured
residual stream are visible rather than hidden in ``WhisperEncoder.forward``.

``transformers``' ``WhisperEncoder.forward`` insists on 3000 mel frames (30 s); here the
positional table is cut to the batch's length under ``crop`` and padding frames are masked
out of attention, so an utterance's states do not depend on what it is batched with.
Under ``pad30`` nothing is masked: that is how Whisper was trained and how the paper runs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serlens.audio import MelBatch
from serlens.errors import WeightsError


@dataclass
class EncoderOutput:
    """The residual stream of one batch.

    ``resid[l]`` is the stream entering layer l (``resid[0]`` = conv + positions,
    ``resid[L]`` = output of the last layer); ``last_hidden_state`` = final LayerNorm of
    ``resid[L]``. ``hidden_states`` follows transformers' convention: ``resid[:L]`` then
    ``last_hidden_state`` (L + 1 entries).
    """

    resid: list[torch.Tensor]
    last_hidden_state: torch.Tensor
    frame_mask: torch.Tensor

    @property
    def hidden_states(self) -> list[torch.Tensor]:
        return [*self.resid[:-1], self.last_hidden_state]


def load_encoder(model_dir: str | Path) -> nn.Module:
    """The encoder of a transformers Whisper checkpoint, float32, eval mode, SDPA attention."""
    from transformers import WhisperForAudioClassification
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise WeightsError(
            f"{model_dir}: no config.json; not a transformers model folder. Rerun the models rule."
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the classifier head it would add is unused; silence its warning
    try:
        model = WhisperForAudioClassification.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    encoder = model.encoder
    encoder.eval()
    return encoder


def attention_mask(batch: MelBatch, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key-padding mask (B, 1, 1, T) under crop; None under pad30."""
    if batch.policy == "pad30":
        return None
    keys = batch.attended  # leading digital silence is attended to; batch padding is not
    mask = torch.zeros(keys.shape, dtype=dtype, device=keys.device)
    mask = mask.masked_fill(~keys, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def embed(encoder: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """Conv stem and sinusoidal positions, the table cut to the batch's length."""
    x = nn.functional.gelu(encoder.conv1(mel))
    x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    return x + encoder.embed_positions.weight[: x.shape[1]]


def run_encoder(encoder: nn.Module, batch: MelBatch, layers: int | None = None) -> EncoderOutput:
    """Run the encoder on a batch, keeping every layer's residual stream.

    ``layers`` stops after that many layers (the final LayerNorm is then applied to the
    last computed state).
    """
    x = embed(encoder, batch.mel)
    mask = attention_mask(batch, x.dtype)
    resid = [x]
    for layer in encoder.layers[:layers]:
        x = layer(x, mask)
        resid.append(x)
    return EncoderOutput(
        resid=resid, last_hidden_state=encoder.layer_norm(x), frame_mask=batch.frame_mask
    )


def masked_mean(states: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the frames that hold audio: (B, T, D) -> (B, D)."""
    weights = frame_mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pooled_layer_states(encoder: nn.Module, batch: MelBatch) -> torch.Tensor:
    """Masked mean of each of the L + 1 hidden states: (B, L + 1, D)."""
    out = run_encoder(encoder, batch)
    return torch.stack([masked_mean(h, out.frame_mask) for h in out.hidden_states], dim=1)


def quiet_transformers_logging() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
