"""LoRA on Whisper's encoder (peft), with the emotion head trained jointly."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from serlens.audio import LogMel, length_buckets
from serlens.io import write_json_atomic, write_tsv_atomic
from serlens.methods import Method
from serlens.metrics import uar
from serlens.models.encoder import masked_mean, run_encoder
from serlens.train.data import (
    EpochPredictions,
    Split,
    library_versions,
    metrics_from_predictions,
    predictions_frame,
)
from serlens.train.heads import EmotionHead
from serlens.train.loop import (
    LoopConfig,
    balanced_indices,
    class_weights,
    epoch_generator,
    fit,
    set_seed,
)


def lora_config(
    rank: int, lora_cfg: dict, layers: list[int] | None = None, use_dora: bool = False
) -> LoraConfig:
    """Adapters on ``target_modules`` of the encoder layers ``layers`` (None: every layer;
    peft ``layers_to_transform``); alpha = alpha_per_rank x rank (the paper: 2r);
    ``use_dora``: DoRA's magnitude and direction (Liu et al. 2024)."""
    return LoraConfig(
        r=rank,
        lora_alpha=lora_cfg["alpha_per_rank"] * rank,
        lora_dropout=lora_cfg["dropout"],
        target_modules=list(lora_cfg["target_modules"]),
        layers_to_transform=None if layers is None else list(layers),
        layers_pattern=None if layers is None else "layers",
        use_dora=use_dora,
        bias="none",
    )


def pooled(encoder: nn.Module, batch, all_frames: bool = False) -> torch.Tensor:
    """The mean of the last hidden state over the audio frames (``frame_mask``), or, with
    ``all_frames`` (the paper's protocol: WhisperForAudioClassification on 30-s padded
    input), over every frame of the batch, padding included."""
    out = run_encoder(encoder, batch)
    mask = torch.ones_like(out.frame_mask) if all_frames else out.frame_mask
    return masked_mean(out.last_hidden_state, mask)


class LoraEmotionModel(nn.Module):
    """A peft-wrapped encoder and an :class:`EmotionHead` on its pooled last hidden state."""

    def __init__(
        self,
        encoder: nn.Module,
        n_classes: int,
        rank: int,
        lora_cfg: dict,
        proj_size: int = 256,
        layers: list[int] | None = None,
        use_dora: bool = False,
        pool_all_frames: bool = False,
    ):
        super().__init__()
        config = lora_config(rank, lora_cfg, layers, use_dora)
        self.peft_encoder: PeftModel = get_peft_model(encoder, config)
        self.head = EmotionHead(encoder.config.d_model, n_classes, proj_size)
        self.pool_all_frames = pool_all_frames

    @property
    def encoder(self) -> nn.Module:
        """The adapted encoder (its LoRA layers are live unless inside ``disable_adapter()``)."""
        return self.peft_encoder.base_model.model

    def forward(self, batch) -> torch.Tensor:
        return self.head(pooled(self.encoder, batch, self.pool_all_frames))


class FullEmotionModel(nn.Module):
    """Full fine-tuning: every encoder weight trains (Whisper's fixed sinusoidal positions
    excepted), with an :class:`EmotionHead` on the pooled last hidden state."""

    def __init__(
        self,
        encoder: nn.Module,
        n_classes: int,
        proj_size: int = 256,
        pool_all_frames: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.pool_all_frames = pool_all_frames
        for name, p in encoder.named_parameters():
            p.requires_grad_(not name.startswith("embed_positions"))
        self.head = EmotionHead(encoder.config.d_model, n_classes, proj_size)

    def forward(self, batch) -> torch.Tensor:
        return self.head(pooled(self.encoder, batch, self.pool_all_frames))


def trained_encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder parameters full fine-tuning trains, by their ``WhisperEncoder`` names."""
    return {
        name: p.detach().float().cpu().contiguous()
        for name, p in encoder.named_parameters()
        if p.requires_grad
    }


def weight_updates(
    encoder: nn.Module, initial: dict[str, torch.Tensor], targets: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """ΔW = W_ft − W0 of the ``targets`` of every layer (``layers.{i}.{...}.{target}.weight``),
    in float32, from the weights before training (``initial``)."""
    out = {}
    for name, p in encoder.named_parameters():
        module = name.removesuffix(".weight")
        if (
            name.endswith(".weight")
            and module.split(".")[-1] in targets
            and name.startswith("layers.")
        ):
            out[name] = (p.detach().float().cpu() - initial[name].float()).contiguous()
    return out


def predict(
    model: LoraEmotionModel,
    split: Split,
    logmel: LogMel,
    audio_cfg: dict,
    batch_size: int,
    device: str,
) -> np.ndarray:
    """Class probabilities of every utterance of ``split``, in its order."""
    probs = np.zeros((len(split), model.head.classifier.out_features), dtype=np.float32)
    order = np.argsort(split.durations, kind="stable")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    model.eval()
    with torch.inference_mode(), autocast:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch = logmel(
                [split.waves[j] for j in idx], audio_cfg["input_policy"], audio_cfg["max_seconds"]
            )
            probs[idx] = torch.softmax(model(batch.to(device)).float(), dim=-1).cpu().numpy()
    return probs


def save_adapter_snapshot(peft_encoder: nn.Module, path: Path) -> None:
    """The adapter's weights only (``...lora_A.weight``, ``...lora_B.weight``: the keys of
    peft's ``adapter_model.safetensors``), written atomically; the scaling is in the run's
    ``adapter/adapter_config.json``."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_encoder)
    save_safetensors_atomic(
        {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path
    )


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def run_lora(
    encoder: nn.Module,
    splits: dict[str, Split],
    classes: list[str],
    rank: int,
    config: dict,
    out_dir: Path,
    checkpoint: Path | None,
    run_info: dict,
    device: str = "cpu",
) -> LoraEmotionModel:
    """The short-form ``lora_r{rank}`` run on ``lora.target_modules`` of every layer."""
    method = Method(
        f"lora_r{rank}",
        "lora",
        rank=rank,
        targets=tuple(config["lora"]["target_modules"]),
        short=True,
    )
    return run_encoder_method(
        encoder, splits, classes, method, config, out_dir, checkpoint, run_info, device
    )


def build_model(encoder: nn.Module, method: Method, n_classes: int, config: dict) -> nn.Module:
    """The trainable model of a method that adapts the encoder (lora, dora, full)."""
    proj = config["train"]["head_proj_size"]
    if method.kind == "full":
        return FullEmotionModel(encoder, n_classes, proj, method.pools_all_frames)
    n_layers = len(encoder.layers)
    layers = None if method.layers == "all" else method.layer_indices(n_layers)
    lora_cfg = {**config["lora"], "target_modules": list(method.targets)}
    return LoraEmotionModel(
        encoder,
        n_classes,
        method.rank,
        lora_cfg,
        proj,
        layers,
        use_dora=method.kind == "dora",
        pool_all_frames=method.pools_all_frames,
    )


def run_encoder_method(
    encoder: nn.Module,
    splits: dict[str, Split],
    classes: list[str],
    method: Method,
    config: dict,
    out_dir: Path,
    checkpoint: Path | None,
    run_info: dict,
    device: str = "cpu",
) -> nn.Module:
    """Fine-tune the encoder (LoRA, DoRA or full), select on dev, predict test once, write
    the run's files: an adapter (``adapter/``, ``adapter_epochs/``) or, for full
    fine-tuning, the trained encoder parameters (``encoder.safetensors``) and the update
    of the method's targets (``delta.safetensors``: ΔW = W_ft − W0)."""
    tic = time.perf_counter()
    seed, train_cfg, audio_cfg = config["seed"], config["train"], config["audio"]
    if method.lr is not None:
        train_cfg = {**{k: train_cfg[k] for k in train_cfg if k != "lr"}, "lr": method.lr}
    if method.input_policy is not None:  # the paper's protocol: 30-s padded input
        audio_cfg = {**audio_cfg, "input_policy": method.input_policy}
    set_seed(seed)
    initial = (
        {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        if method.kind == "full"
        else None
    )
    model = build_model(encoder, method, len(classes), config).to(device)
    logmel = LogMel(encoder.config.num_mel_bins)
    train = splits["train"]
    y_train = torch.from_numpy(train.labels)
    weights = (
        class_weights(train.labels, len(classes))
        if train_cfg["balance"] == "loss_weights"
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def batches(epoch: int):
        gen = epoch_generator(seed, epoch)
        if train_cfg["balance"] == "sampler":
            pool = balanced_indices(train.labels, gen)
            return [
                pool[b] for b in length_buckets(train.durations[pool], train_cfg["batch_size"], gen)
            ]
        return length_buckets(train.durations, train_cfg["batch_size"], gen)

    def loss_on(idx):
        batch = logmel(
            [train.waves[i] for i in idx], audio_cfg["input_policy"], audio_cfg["max_seconds"]
        )
        with autocast:
            logits = model(batch.to(device))
        return loss_fn(logits.float(), y_train[torch.as_tensor(idx)].to(device)), len(idx)

    def dev_uar() -> float:
        probs = predict(model, splits["dev"], logmel, audio_cfg, train_cfg["batch_size"], device)
        return uar(splits["dev"].labels, probs.argmax(1), len(classes))

    adapter = method.has_adapter
    # The adapter at initialisation (epoch 0) and after every epoch, kept beside the
    # checkpoint (which survives a killed job) and moved into the run at the end.
    epochs_dir = (Path(checkpoint).parent if checkpoint else Path(out_dir)) / "adapter_epochs"

    test_epochs = EpochPredictions(epochs_dir.parent / "test_epochs", splits["test"], classes)

    def snapshot(epoch: int) -> None:
        if adapter:
            save_adapter_snapshot(model.peft_encoder, epochs_dir / f"epoch{epoch}.safetensors")
        if epoch > 0:  # recorded for the paper's test-fold selection, never used here
            test_epochs.record(
                epoch,
                predict(model, splits["test"], logmel, audio_cfg, train_cfg["batch_size"], device),
            )

    if adapter and not (epochs_dir / "epoch0.safetensors").is_file():
        snapshot(0)
    cfg = LoopConfig.from_train_config(train_cfg, seed)
    result = fit(
        model,
        batches,
        loss_on,
        dev_uar,
        cfg,
        checkpoint,
        desc=method.name,
        snapshot=snapshot,
    )

    # The test split is touched once, here, with the epoch chosen on dev.
    probs = predict(model, splits["test"], logmel, audio_cfg, train_cfg["batch_size"], device)
    predictions = predictions_frame(splits["test"].utt_ids, splits["test"].labels, probs, classes)
    metrics = metrics_from_predictions(predictions, classes)
    metrics.update(
        run_info,
        method=method.name,
        kind=method.kind,
        rank=method.rank,
        best_epoch=result.best_epoch,
        best_dev_uar=result.best_dev_uar,
        epochs_run=len(result.history),
        wall_s=time.perf_counter() - tic,
        train_utt_per_s=float(np.nanmean([h["utt_per_s"] for h in result.history])),
        device=device,
        versions=library_versions(),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if adapter:
        model.peft_encoder.save_pretrained(out_dir / "adapter", safe_serialization=True)
        if epochs_dir != out_dir / "adapter_epochs":
            shutil.rmtree(out_dir / "adapter_epochs", ignore_errors=True)
            shutil.copytree(epochs_dir, out_dir / "adapter_epochs")
    else:
        save_safetensors_atomic(
            trained_encoder_state(model.encoder), out_dir / "encoder.safetensors"
        )
        save_safetensors_atomic(
            weight_updates(model.encoder, initial, method.targets), out_dir / "delta.safetensors"
        )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(out_dir / "head.safetensors"),
    )
    write_tsv_atomic(pd.DataFrame(result.history), out_dir / "history.tsv")
    write_tsv_atomic(
        test_epochs.frame(h["epoch"] for h in result.history), out_dir / "test_epochs.tsv"
    )
    if test_epochs.directory.parent == out_dir:  # no checkpoint folder: leave no scratch
        shutil.rmtree(test_epochs.directory, ignore_errors=True)
    write_tsv_atomic(predictions, out_dir / "predictions.tsv")
    write_json_atomic(metrics, out_dir / "metrics.json")
    return model
