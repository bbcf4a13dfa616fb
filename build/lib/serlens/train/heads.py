"""The classification head shared by frozen and LoRA runs.

It mirrors transformers' ``WhisperForAudioClassification``: projector (d_model -> 256),
mean pooling over time, classifier (256 -> classes); optionally a learned softmax-weighted
sum of all L + 1 hidden states (SUPERB's weighted sum). The projector is linear, so
projecting frames and then averaging equals averaging then projecting: the head takes
*pooled* states, which is what lets frozen baselines train on cached pooled features and
what lets the logit lens apply the same head to any layer.
"""

from __future__ import annotations

import torch
from torch import nn


class EmotionHead(nn.Module):
    def __init__(
        self, d_model: int, n_classes: int, proj_size: int = 256, n_layers: int | None = None
    ):
        super().__init__()
        self.n_layers = n_layers
        if n_layers is not None:
            self.layer_weights = nn.Parameter(torch.zeros(n_layers))
        self.projector = nn.Linear(d_model, proj_size)
        self.classifier = nn.Linear(proj_size, n_classes)

    def combine(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) passes through; (B, L + 1, D) becomes its softmax-weighted layer sum."""
        if self.n_layers is None:
            return pooled
        weights = torch.softmax(self.layer_weights, dim=0)
        return torch.einsum("bld,l->bd", pooled, weights)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled states: (B, D), or (B, L + 1, D) for a weighted-sum head."""
        return self.classifier(self.projector(self.combine(pooled)))


def load_head(path) -> EmotionHead:
    """A head saved as ``head.safetensors`` (shapes, and the weighted sum, read from its tensors)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    proj = state["projector.weight"]
    n_layers = state["layer_weights"].shape[0] if "layer_weights" in state else None
    head = EmotionHead(proj.shape[1], state["classifier.weight"].shape[0], proj.shape[0], n_layers)
    head.load_state_dict(state)
    return head.eval()
