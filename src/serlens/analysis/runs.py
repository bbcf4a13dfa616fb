"""Load a trained run back for analysis: its encoder (adapted or not), its head and its fold's data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from serlens.audio import LogMel, MelBatch, load_audio
from serlens.models.encoder import load_encoder
from serlens.steps import model_path
from serlens.train.data import Split, read_fold_splits
from serlens.train.heads import EmotionHead, load_head


@dataclass
class TrainedRun:
    """One ``model x method x fold`` run, ready to be opened up.

    ``encoder`` is what the run classifies with: for LoRA runs its adapters are live, and
    ``adapter_disabled()`` turns them off (the frozen encoder, from the same object); for
    frozen runs it is the pre-trained encoder and ``adapter_disabled()`` changes nothing.
    """

    model: str
    method: str
    fold: int
    encoder: nn.Module
    head: EmotionHead
    splits: dict[str, Split]
    classes: list[str]
    policy: str
    max_seconds: float
    rank: int | None = None
    peft_encoder: nn.Module | None = None
    device: str = "cpu"  # where the encoder and head live; batches are moved there
    logmel: LogMel = field(init=False)

    def __post_init__(self):
        self.logmel = LogMel(self.encoder.config.num_mel_bins)

    @property
    def is_lora(self) -> bool:
        return self.rank is not None

    def adapter_disabled(self):
        """Context in which the encoder is the pre-trained one."""
        return (
            self.peft_encoder.disable_adapter()
            if self.peft_encoder is not None
            else contextlib.nullcontext()
        )

    def batches(
        self, split: Split, batch_size: int = 8, indices: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, MelBatch]]:
        """(indices into ``split``, mel batch) in duration order, over ``indices`` or the whole split."""
        idx = np.arange(len(split)) if indices is None else np.asarray(indices)
        # Load only the clips asked for: an analysis on a training sample need not read the
        # whole training split (thousands of files on IEMOCAP).
        if split.waves is None:
            split.waves = [None] * len(split)
        for j in idx:
            if split.waves[j] is None:
                split.waves[j] = load_audio(split.paths[j])
        idx = idx[np.argsort(split.durations[idx], kind="stable")]
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            yield (
                chunk,
                self.logmel([split.waves[j] for j in chunk], self.policy, self.max_seconds).to(
                    self.device
                ),
            )

    def lora_modules(self) -> dict[str, nn.Module]:
        """Adapted modules by name (peft ``LoraLayer``s); empty for frozen runs."""
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in self.encoder.named_modules() if isinstance(m, LoraLayer)}


def balanced_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A fixed, seeded, class-balanced sample of indices (at most ``size``; fewer if a class runs out)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(1, size // len(classes))
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(picks))


def load_run(
    settings: dict,
    model: str,
    method: str,
    fold: int,
    manifest_path: Path,
    folds_path: Path,
    weights_json: Path,
    run_dir: Path | None = None,
    device: str = "cpu",
) -> TrainedRun:
    """Rebuild a run from its files: weights, adapter and head (``method = "base"``: the
    pre-trained encoder alone). ``settings`` gives ``classes`` and ``audio``."""
    from serlens.methods import parse_method

    classes = list(settings["classes"])
    if method == "base":  # every utterance of the corpus, in manifest order
        from serlens.corpus.manifest import read_manifest
        from serlens.train.data import manifest_split

        manifest = read_manifest(manifest_path)
        splits = {"all": manifest_split(manifest, manifest["utt_id"].tolist(), classes)}
    else:
        splits = read_fold_splits(manifest_path, folds_path, fold, classes)
    encoder = load_encoder(model_path(weights_json))
    for p in encoder.parameters():
        p.requires_grad_(False)
    spec = None if method == "base" else parse_method(method)
    peft_encoder = None
    head = None
    if spec is not None and spec.has_adapter:
        from peft import PeftModel

        peft_encoder = PeftModel.from_pretrained(
            encoder, Path(run_dir) / "adapter", is_trainable=False
        )
        peft_encoder.eval()
        encoder = peft_encoder.base_model.model
    if spec is not None:
        head = load_head(Path(run_dir) / "head.safetensors").to(device)
    encoder.to(device)
    return TrainedRun(
        model=model,
        method=method,
        fold=0 if fold is None else int(fold),
        encoder=encoder,
        head=head,
        splits=splits,
        classes=classes,
        policy=settings["audio"]["input_policy"],
        max_seconds=settings["audio"]["max_seconds"],
        rank=None if spec is None else spec.rank,
        peft_encoder=peft_encoder,
        device=device,
    )
