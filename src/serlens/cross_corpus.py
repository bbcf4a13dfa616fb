"""Cross-corpus tests: the runs trained on one corpus, scored on every utterance of another.

As in EmoBox's cross-corpus setting (Ma et al., Interspeech 2024), a run trained on corpus A
(its own fold's train split, its head chosen on its dev split) classifies *all* utterances of
corpus B whose label is in the classes A and B share; nothing of B is used for training or
selection. The classifier still has A's outputs: its prediction is the shared class of
highest probability (the probabilities are renormalised over the shared classes), so UAR is
over the shared classes and chance is 1/|shared|. Labels mean the same on both sides because
every reader maps its corpus's labels to the project's three-letter codes.

Each fold's run of A is a different model scoring the same utterances of B; performance
tables average over those runs and resample B's speakers (:mod:`serlens.stats`), exactly as
within a corpus, with B's manifest giving the clusters.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from serlens.corpus.manifest import read_manifest
from serlens.errors import CorpusError
from serlens.io import write_tsv_atomic
from serlens.train.data import manifest_split, predictions_frame

log = logging.getLogger(__name__)


def shared_classes(train_classes: list[str], test_classes: list[str]) -> list[str]:
    """The classes both corpora have, in the training corpus's output order."""
    shared = [c for c in train_classes if c in test_classes]
    if len(shared) < 2:
        raise CorpusError(
            f"cross-corpus: the classes {list(train_classes)} and {list(test_classes)} share "
            f"{shared}; a test needs at least two"
        )
    return shared


def restrict(probs: np.ndarray, train_classes: list[str], shared: list[str]) -> np.ndarray:
    """Probabilities over ``train_classes`` -> renormalised probabilities over ``shared``."""
    columns = [list(train_classes).index(c) for c in shared]
    kept = np.asarray(probs, dtype=np.float64)[:, columns]
    total = kept.sum(axis=1, keepdims=True)
    return (kept / np.where(total > 0, total, 1.0)).astype(np.float32)


def _head_probs(head, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [torch.softmax(head(x[i : i + batch]), -1).numpy() for i in range(0, len(x), batch)]
        )


def cross_predict(
    method: str,
    run_dir: Path,
    train_classes: list[str],
    test_manifest: Path,
    test_classes: list[str],
    out: Path,
    weights_json: Path | None = None,
    test_features: Path | None = None,
    audio: dict | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> pd.DataFrame:
    """``predictions.tsv`` of one trained run on every shared-class utterance of the test
    corpus. Heads on pre-trained features read ``test_features`` (the test corpus's cached
    pooled states; the head's own tensors say last layer or weighted sum); runs that adapt
    the encoder load it with their adapter (``adapter/``) or their fully fine-tuned
    parameters (``encoder.safetensors``) and run it. ``method`` names the run in the log."""
    from serlens.train.heads import load_head

    shared = shared_classes(train_classes, test_classes)
    manifest = read_manifest(test_manifest)
    manifest = manifest[manifest["label"].isin(shared)]
    ids = manifest["utt_id"].tolist()
    split = manifest_split(manifest, ids, shared)
    head = load_head(Path(run_dir) / "head.safetensors")
    if head.classifier.out_features != len(train_classes):
        raise CorpusError(
            f"{run_dir}/head.safetensors has {head.classifier.out_features} outputs; the "
            f"training corpus has {len(train_classes)} classes {list(train_classes)}"
        )
    if test_features is not None:
        from serlens.train.features import load_features

        features = load_features(test_features, ids)
        x = features[:, -1] if head.n_layers is None else features
        probs = _head_probs(head, x)
    else:
        probs = _encoder_probs(run_dir, head, split, weights_json, audio, batch_size, device)
    predictions = predictions_frame(
        split.utt_ids, split.labels, restrict(probs, train_classes, shared), shared
    )
    write_tsv_atomic(predictions, out)
    log.info(
        "%s (%s): %d utterances of the test corpus over %s", out, method, len(predictions), shared
    )
    return predictions


def _encoder_probs(run_dir, head, split, weights_json, audio, batch_size, device) -> np.ndarray:
    from peft import PeftModel
    from torch import nn

    from serlens.audio import LogMel, load_audio
    from serlens.models.encoder import load_encoder, masked_mean, run_encoder
    from serlens.steps import model_path
    from serlens.train.lora import predict

    encoder = load_encoder(model_path(weights_json))
    full = Path(run_dir) / "encoder.safetensors"
    if full.is_file():  # full fine-tuning: its trained parameters over the pre-trained ones
        from safetensors.torch import load_file

        encoder.load_state_dict(load_file(str(full)), strict=False)
        adapted = encoder
    else:
        adapted = PeftModel.from_pretrained(encoder, Path(run_dir) / "adapter").base_model.model

    class Adapted(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = adapted, head

        def forward(self, batch):
            out = run_encoder(self.encoder, batch)
            return self.head(masked_mean(out.last_hidden_state, out.frame_mask))

    model = Adapted().to(device).eval()
    split.waves = [load_audio(p) for p in split.paths]
    logmel = LogMel(encoder.config.num_mel_bins)
    return predict(model, split, logmel, audio, batch_size, device)
