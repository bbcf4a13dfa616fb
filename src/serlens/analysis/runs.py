"""Load a trained run back for analysis: its encoder (adapted or not), its head and its fold's data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
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
    #: full fine-tuning: the pre-trained values of every parameter it trained (for
    #: ``adapter_disabled`` and ``update_in``); None for other runs.
    base_state: dict[str, torch.Tensor] | None = None
    #: utt_id -> speaker (the manifest's), for speaker bands of the pass's statistics; None
    #: for runs built without a manifest (no band)
    speakers: dict[str, str] | None = None
    logmel: LogMel = field(init=False)

    def __post_init__(self):
        self.logmel = LogMel(self.encoder.config.num_mel_bins)

    @property
    def is_lora(self) -> bool:
        return self.rank is not None

    @property
    def is_full(self) -> bool:
        return self.base_state is not None

    def adapter_disabled(self):
        """Context in which the encoder is the pre-trained one."""
        if self.peft_encoder is not None:
            return self.peft_encoder.disable_adapter()
        if self.base_state is not None:
            return self.update_in(set())
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def update_in(self, on: set[int] | None):
        """Context in which the run's update lives only in the encoder layers ``on`` (None:
        all) and every other layer is the pre-trained one; restored on exit.

        Adapters (LoRA, DoRA) of the other layers are disabled (the module then returns its
        base layer's output exactly; DoRA's magnitude goes with them). Full fine-tuning
        puts the pre-trained values back into the other layers' parameters; the convolutional
        stem counts as part of layer 0 and the final LayerNorm as part of the last layer, so
        no layer on is the pre-trained encoder and every layer on is the fine-tuned one.
        """
        n = len(self.encoder.layers)
        if on is None or set(on) >= set(range(n)):
            yield
            return
        if self.base_state is not None:
            params = dict(self.encoder.named_parameters())
            saved = {}
            with torch.no_grad():
                for name, base in self.base_state.items():
                    if _owning_layer(name, n) not in on:
                        saved[name] = params[name].detach().clone()
                        params[name].copy_(base)
            try:
                yield
            finally:
                with torch.no_grad():
                    for name, value in saved.items():
                        params[name].copy_(value)
            return
        from peft.tuners.lora import LoraLayer

        switched = []
        for li, layer in enumerate(self.encoder.layers):
            if li in on:
                continue
            for m in layer.modules():
                if isinstance(m, LoraLayer) and not m.disable_adapters:
                    # peft's per-module switch (what disable_adapter() flips for every
                    # module), set directly so trainability is left as it is.
                    m._disable_adapters = True
                    switched.append(m)
        try:
            yield
        finally:
            for m in switched:
                m._disable_adapters = False

    def batches(
        self,
        split: Split,
        batch_size: int = 8,
        indices: np.ndarray | None = None,
        policy: str | None = None,
    ) -> Iterator[tuple[np.ndarray, MelBatch]]:
        """(indices into ``split``, mel batch) in duration order, over ``indices`` or the whole
        split; ``policy``: the input policy when not the run's (``pad30`` for the paper's
        estimator of a ``crop`` run)."""
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
                self.logmel(
                    [split.waves[j] for j in chunk], policy or self.policy, self.max_seconds
                ).to(self.device),
            )

    def lora_modules(self) -> dict[str, nn.Module]:
        """Adapted modules by name (peft ``LoraLayer``s); empty for frozen runs."""
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in self.encoder.named_modules() if isinstance(m, LoraLayer)}


def _owning_layer(name: str, n_layers: int) -> int:
    """The encoder layer a parameter belongs to (the stem to layer 0, the final LayerNorm to
    the last layer)."""
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return n_layers - 1 if name.startswith("layer_norm") else 0


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
    """Rebuild a run from its files: weights, then the adapter (``adapter/``) or the fully
    fine-tuned parameters (``encoder.safetensors``), and the head (``method = "base"``: the
    pre-trained encoder alone). ``settings`` gives ``classes`` and ``audio``."""

    from serlens.corpus.manifest import speakers_from_manifest

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
    peft_encoder = None
    head = None
    base_state = None
    full_weights = None if run_dir is None else Path(run_dir) / "encoder.safetensors"
    if full_weights is not None and full_weights.is_file():  # full fine-tuning
        from safetensors.torch import load_file

        trained = load_file(str(full_weights))
        params = dict(encoder.named_parameters())
        unknown = sorted(set(trained) - set(params))
        if unknown:
            raise ValueError(f"{full_weights}: {unknown[:3]} are not parameters of {model}")
        base_state = {name: params[name].detach().clone().to(device) for name in trained}
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
    elif run_dir is not None and (Path(run_dir) / "adapter").is_dir():
        from peft import PeftModel

        peft_encoder = PeftModel.from_pretrained(
            encoder, Path(run_dir) / "adapter", is_trainable=False
        )
        peft_encoder.eval()
        encoder = peft_encoder.base_model.model
    if method != "base":
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
        rank=None if peft_encoder is None else peft_encoder.peft_config["default"].r,
        peft_encoder=peft_encoder,
        device=device,
        base_state=base_state,
        speakers=speakers_from_manifest(manifest_path),
    )
