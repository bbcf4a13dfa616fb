"""One training loop, readable top to bottom, shared by frozen heads and LoRA runs.

AdamW, linear warm-up then linear decay, gradient clipping, model selection on the dev
split only (best dev UAR with patience), a checkpoint after every epoch so a killed run
resumes where it stopped and ends where an uninterrupted run would (the checkpoint holds
the torch CPU, CUDA, numpy and python random states as well as the model, optimiser and
schedule). Checkpoints hold only tensors and plain values and are loaded with
``weights_only=True``.

A step whose loss or clipped gradient norm is not finite does not update the model; such
steps are counted per epoch in the history's ``skipped_steps``, and an epoch in which every
step was skipped stops the run with :class:`NonFiniteTrainingError`.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
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


class NonFiniteTrainingError(FloatingPointError):
    """Every step of an epoch had a non-finite loss or gradient, so the model never trained."""


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


def _rng_state() -> dict:
    """The random states a resumed run needs, as tensors and plain values (``weights_only``-safe).

    ``cuda`` is there only when CUDA is available: dropout on the GPU draws from the CUDA
    generators, not the CPU one.
    """
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(saved: dict, desc: str) -> None:
    """Restore what :func:`_rng_state` saved; a CUDA state that cannot be restored only warns.

    Checkpoints written before the random states were grouped hold just the torch CPU state,
    under ``"rng"``.
    """
    state = saved["rng"] if isinstance(saved["rng"], dict) else {"torch": saved["rng"]}
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np_state = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": np_state["bit_generator"],
                "state": {
                    "key": np_state["key"].numpy().astype(np.uint32),
                    "pos": np_state["pos"],
                },
                "has_gauss": np_state["has_gauss"],
                "gauss": np_state["gauss"],
            }
        )
    if "python" in state:
        py_version, py_internal, py_gauss = state["python"]
        random.setstate((py_version, tuple(py_internal), py_gauss))

    cuda_here, cuda_saved = torch.cuda.is_available(), "cuda" in state
    reason = None
    if cuda_here and not cuda_saved:
        reason = "the checkpoint holds none (it was written on a machine without CUDA)"
    elif cuda_saved and not cuda_here:
        reason = "CUDA is not available on this machine"
    elif cuda_saved:
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception as error:  # a wrong device count, a malformed state, ...: warn, go on
            reason = (
                f"restoring the {len(state['cuda'])} saved generator state(s) on "
                f"{torch.cuda.device_count()} visible device(s) failed: {error}"
            )
    if reason is not None:
        log.warning(
            "%s: the CUDA random state could not be restored: %s; GPU dropout will draw "
            "differently from an uninterrupted run",
            desc,
            reason,
        )


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
    snapshot: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters; on return they hold the best-dev-UAR state.

    ``batches(epoch)`` gives the epoch's batches (deterministic in the epoch number, so a
    resumed run sees the batches an uninterrupted run would); ``loss_on(batch)`` returns the
    mean loss and the number of utterances; ``dev_uar()`` scores the model on the dev split.
    ``snapshot(epoch)`` is called with the model at the end of every epoch, before the
    checkpoint is written (so a resumed run has every epoch's snapshot); ``on_epoch_end``
    after it.
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
        _restore_rng_state(saved, desc)
        history, best, elapsed = saved["history"], saved["best"], saved["elapsed"]
        start_epoch = saved["epoch"] + 1
        log.info("%s: resumed from %s after epoch %d", desc, checkpoint, saved["epoch"])

    stopped_early = best["bad_epochs"] >= cfg.patience
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped_early:
            break
        tic = time.perf_counter()
        model.train()
        total_loss, seen, trained, steps, skipped = 0.0, 0, 0, 0, 0
        for batch in tqdm(batches(epoch), desc=f"{desc} epoch {epoch}", leave=False, disable=None):
            loss, n = loss_on(batch)
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            seen += n
            finite = bool(torch.isfinite(loss.detach()).all())
            if finite:
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                finite = bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                total_loss += float(loss.detach()) * n
                trained += n
            else:
                # No update: no AdamW step (so no weight decay and no moment update either),
                # and no NaN/inf gradients left behind.
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            # The schedule still advances on a skipped step: the learning rate is a function of
            # the position in the run (it reaches 0 at the last planned step, and a resumed run
            # lands on the same factor), not of how many updates happened to succeed. Torch warns
            # when the schedule steps before the optimiser ever has; on a skipped step that is meant.
            with warnings.catch_warnings():
                if not finite:
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
        train_s = time.perf_counter() - tic
        if steps and skipped == steps:
            # Raised before the dev pass and the checkpoint, so the last checkpoint is still the
            # last epoch that trained.
            raise NonFiniteTrainingError(
                f"{desc} epoch {epoch}: all {steps} steps had a non-finite loss or gradient "
                f"norm, so the model did not train; try a lower learning rate (lr={cfg.lr:g}) "
                f"or a smaller train.grad_clip (now {cfg.grad_clip:g})"
            )
        if skipped:
            log.warning(
                "%s epoch %d: skipped %d of %d steps with a non-finite loss or gradient norm",
                desc,
                epoch,
                skipped,
                steps,
            )
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
                # mean loss of the utterances in steps that updated the model
                "train_loss": total_loss / max(trained, 1),
                "dev_uar": uar,
                "lr": scheduler.get_last_lr()[0],
                "utt_per_s": seen / train_s if train_s > 0 else float("nan"),
                "epoch_s": epoch_s,
                "best": improved,
                # steps of this epoch with a non-finite loss or gradient norm (no update)
                "skipped_steps": skipped,
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
        if snapshot is not None:
            snapshot(epoch)
        if checkpoint is not None:
            _save_atomic(
                {
                    "epoch": epoch,
                    "model": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
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
