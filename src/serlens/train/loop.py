"""One training loop, readable top to bottom, shared by frozen heads and LoRA runs.

AdamW, linear warm-up then linear decay, gradient clipping, model selection on the dev
split only (best dev UAR with patience), a checkpoint after every epoch so a killed run
resumes where it stopped and ends where an uninterrupted run would. Checkpoints hold only
tensors and plain values and are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    epochs: int
    patience: int
    lr: float
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    @classmethod
    def from_train_config(cls, train_cfg: dict, seed: int, prefix: str = "") -> LoopConfig:
        """From ``config["train"]``: ``prefix="frozen_"`` reads the frozen heads' epochs, patience and lr."""
        return cls(
            epochs=train_cfg[f"{prefix}epochs"],
            patience=train_cfg[f"{prefix}patience"],
            lr=train_cfg[f"{prefix}lr"],
            weight_decay=train_cfg["weight_decay"],
            warmup_fraction=train_cfg["warmup_fraction"],
            grad_clip=train_cfg["grad_clip"],
            seed=seed,
        )


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_dev_uar: float
    wall_s: float
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (LoRA matrices and head), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise KeyError(f"checkpoint lacks trainable parameters {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def warmup_linear_decay(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Learning-rate factor: linear from 0 to 1 over the warm-up steps, then linear to 0."""
    warmup = max(1, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def fit(
    model: nn.Module,
    batches: Callable[[int], list],
    loss_on: Callable[[object], tuple[torch.Tensor, int]],
    dev_uar: Callable[[], float],
    cfg: LoopConfig,
    checkpoint: Path | None = None,
    desc: str = "train",
    on_epoch_end: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters; on return they hold the best-dev-UAR state.

    ``batches(epoch)`` gives the epoch's batches (deterministic in the epoch number, so a
    resumed run sees the batches an uninterrupted run would); ``loss_on(batch)`` returns the
    mean loss and the number of utterances; ``dev_uar()`` scores the model on the dev split.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(batches(0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(cfg.epochs * steps_per_epoch, cfg.warmup_fraction)
    )
    history: list[dict] = []
    best = {"epoch": 0, "uar": -1.0, "state": trainable_state(model), "bad_epochs": 0}
    start_epoch, elapsed = 1, 0.0

    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        load_trainable(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        history, best, elapsed = saved["history"], saved["best"], saved["elapsed"]
        start_epoch = saved["epoch"] + 1
        log.info("%s: resumed from %s after epoch %d", desc, checkpoint, saved["epoch"])

    stopped_early = best["bad_epochs"] >= cfg.patience
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped_early:
            break
        tic = time.perf_counter()
        model.train()
        total_loss, seen = 0.0, 0
        for batch in tqdm(batches(epoch), desc=f"{desc} epoch {epoch}", leave=False, disable=None):
            loss, n = loss_on(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if torch.isfinite(grad_norm):
                optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * n
            seen += n
        train_s = time.perf_counter() - tic
        model.eval()
        uar = dev_uar()
        epoch_s = time.perf_counter() - tic
        elapsed += epoch_s
        improved = uar > best["uar"]
        if improved:
            best = {"epoch": epoch, "uar": uar, "state": trainable_state(model), "bad_epochs": 0}
        else:
            best["bad_epochs"] += 1
        history.append(
            {
                "epoch": epoch,
                "train_loss": total_loss / max(seen, 1),
                "dev_uar": uar,
                "lr": scheduler.get_last_lr()[0],
                "utt_per_s": seen / train_s if train_s > 0 else float("nan"),
                "epoch_s": epoch_s,
                "best": improved,
            }
        )
        log.info(
            "%s epoch %d: train loss %.4f, dev UAR %.4f%s, %.1f utt/s",
            desc,
            epoch,
            history[-1]["train_loss"],
            uar,
            " (best)" if improved else "",
            history[-1]["utt_per_s"],
        )
        stopped_early = best["bad_epochs"] >= cfg.patience
        if checkpoint is not None:
            _save_atomic(
                {
                    "epoch": epoch,
                    "model": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "history": history,
                    "best": best,
                    "elapsed": elapsed,
                },
                checkpoint,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    load_trainable(model, best["state"])
    model.eval()
    return FitResult(history, best["epoch"], best["uar"], elapsed, stopped_early)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights N / (K n_k), so every class carries the same total weight."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = len(labels) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def balanced_indices(labels: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """A class-balanced resample of len(labels) indices (each class drawn equally often on average)."""
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return generator.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The random stream of one epoch, independent of what earlier epochs drew."""
    return np.random.default_rng([seed, epoch])


def minibatches(n: int, batch_size: int, generator: np.random.Generator) -> list[np.ndarray]:
    order = generator.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
