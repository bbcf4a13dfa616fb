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
from serlens.metrics import uar
from serlens.models.encoder import masked_mean, run_encoder
from serlens.train.data import (
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


def lora_config(rank: int, lora_cfg: dict) -> LoraConfig:
    """Adapters on ``target_modules`` of every encoder layer; alpha = alpha_per_rank x rank (the paper: 2r)."""
    return LoraConfig(
        r=rank,
        lora_alpha=lora_cfg["alpha_per_rank"] * rank,
        lora_dropout=lora_cfg["dropout"],
        target_modules=list(lora_cfg["target_modules"]),
        bias="none",
    )


class LoraEmotionModel(nn.Module):
    """A peft-wrapped encoder and an :class:`EmotionHead` on its pooled last hidden state."""

    def __init__(
        self, encoder: nn.Module, n_classes: int, rank: int, lora_cfg: dict, proj_size: int = 256
    ):
        super().__init__()
        self.peft_encoder: PeftModel = get_peft_model(encoder, lora_config(rank, lora_cfg))
        self.head = EmotionHead(encoder.config.d_model, n_classes, proj_size)

    @property
    def encoder(self) -> nn.Module:
        """The adapted encoder (its LoRA layers are live unless inside ``disable_adapter()``)."""
        return self.peft_encoder.base_model.model

    def forward(self, batch) -> torch.Tensor:
        out = run_encoder(self.encoder, batch)
        return self.head(masked_mean(out.last_hidden_state, out.frame_mask))


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(tmp))
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
    """Fine-tune with LoRA, select on dev, predict test once, write the run's files."""
    tic = time.perf_counter()
    seed, train_cfg, audio_cfg = config["seed"], config["train"], config["audio"]
    set_seed(seed)
    model = LoraEmotionModel(
        encoder, len(classes), rank, config["lora"], train_cfg["head_proj_size"]
    ).to(device)
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

    # The adapter at initialisation (epoch 0) and after every epoch, kept beside the
    # checkpoint (which survives a killed job) and moved into the run at the end.
    epochs_dir = (Path(checkpoint).parent if checkpoint else Path(out_dir)) / "adapter_epochs"

    def snapshot(epoch: int) -> None:
        save_adapter_snapshot(model.peft_encoder, epochs_dir / f"epoch{epoch}.safetensors")

    if not (epochs_dir / "epoch0.safetensors").is_file():
        snapshot(0)
    cfg = LoopConfig.from_train_config(train_cfg, seed)
    result = fit(
        model, batches, loss_on, dev_uar, cfg, checkpoint, desc=f"lora_r{rank}", snapshot=snapshot
    )

    # The test split is touched once, here, with the epoch chosen on dev.
    probs = predict(model, splits["test"], logmel, audio_cfg, train_cfg["batch_size"], device)
    predictions = predictions_frame(splits["test"].utt_ids, splits["test"].labels, probs, classes)
    metrics = metrics_from_predictions(predictions, classes)
    metrics.update(
        run_info,
        method=f"lora_r{rank}",
        rank=rank,
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
    model.peft_encoder.save_pretrained(out_dir / "adapter", safe_serialization=True)
    if epochs_dir != out_dir / "adapter_epochs":
        shutil.rmtree(out_dir / "adapter_epochs", ignore_errors=True)
        shutil.copytree(epochs_dir, out_dir / "adapter_epochs")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(out_dir / "head.safetensors"),
    )
    write_tsv_atomic(pd.DataFrame(result.history), out_dir / "history.tsv")
    write_tsv_atomic(predictions, out_dir / "predictions.tsv")
    write_json_atomic(metrics, out_dir / "metrics.json")
    return model
