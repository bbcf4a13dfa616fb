"""Frozen-encoder baselines: heads trained on cached pooled features.

Two heads per fold: on the last layer (the paper's baseline) and on a learned
softmax-weighted sum of all layers (SUPERB). The encoder is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from serlens.io import write_json_atomic, write_tsv_atomic
from serlens.metrics import uar
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
    minibatches,
    set_seed,
)

HEADS = {"last": "", "wsum": "_wsum"}  # head kind -> file-name suffix


def _probs(head: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(head(x), dim=-1).numpy()


def train_frozen_head(
    kind: str,
    features: dict[str, torch.Tensor],
    splits: dict[str, Split],
    classes: list[str],
    train_cfg: dict,
    seed: int,
    checkpoint: Path | None = None,
    test_epochs: EpochPredictions | None = None,
):
    """Fit one head ("last" or "wsum") and return (head, FitResult); ``test_epochs``
    records the test split's predictions after every epoch (not used in training)."""
    set_seed(seed)
    n_layers, d_model = features["train"].shape[1:]
    pick = (lambda x: x[:, -1]) if kind == "last" else (lambda x: x)
    head = EmotionHead(
        d_model, len(classes), train_cfg["head_proj_size"], None if kind == "last" else n_layers
    )
    x_train, x_dev = pick(features["train"]), pick(features["dev"])
    y_train = torch.from_numpy(splits["train"].labels)
    weights = (
        class_weights(splits["train"].labels, len(classes))
        if train_cfg["balance"] == "loss_weights"
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights)

    def batches(epoch: int):
        gen = epoch_generator(seed, epoch)
        if train_cfg["balance"] == "sampler":
            idx = balanced_indices(splits["train"].labels, gen)
            return [
                idx[i : i + train_cfg["frozen_batch_size"]]
                for i in range(0, len(idx), train_cfg["frozen_batch_size"])
            ]
        return minibatches(len(y_train), train_cfg["frozen_batch_size"], gen)

    def loss_on(idx):
        idx = torch.as_tensor(idx)
        return loss_fn(head(x_train[idx]), y_train[idx]), len(idx)

    def dev_uar() -> float:
        return uar(splits["dev"].labels, _probs(head, x_dev).argmax(1), len(classes))

    cfg = LoopConfig.from_train_config(train_cfg, seed, prefix="frozen_")
    x_test = pick(features["test"])

    def snapshot(epoch: int) -> None:  # the paper's test-fold selection, never used here
        if test_epochs is not None:
            test_epochs.record(epoch, _probs(head, x_test))

    result = fit(
        head, batches, loss_on, dev_uar, cfg, checkpoint, desc=f"frozen-{kind}", snapshot=snapshot
    )
    return head, result, pick


def run_frozen(
    features: dict[str, torch.Tensor],
    splits: dict[str, Split],
    classes: list[str],
    train_cfg: dict,
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    run_info: dict,
    readouts: tuple[str, ...] = ("last",),
) -> None:
    """Train the head of each readout (``last``, ``wsum``) and write its run files.

    With one readout (what the workflow does: ``frozen`` and ``frozen_wsum`` are methods of
    their own, each with its run folder) the files are ``head.safetensors``, ``history.tsv``,
    ``predictions.tsv`` and ``metrics.json``; with several, each but ``last`` gets its suffix.
    """
    out_dir = Path(out_dir)
    for kind in readouts:
        suffix = HEADS[kind] if len(readouts) > 1 else ""
        tic = time.perf_counter()
        test_epochs = EpochPredictions(
            Path(checkpoint_dir) / f"test_epochs{suffix}", splits["test"], classes
        )
        head, result, pick = train_frozen_head(
            kind,
            features,
            splits,
            classes,
            train_cfg,
            seed,
            Path(checkpoint_dir) / f"{kind}.pt",
            test_epochs,
        )
        # The test split is touched once, here, with the head chosen on dev.
        probs = _probs(head, pick(features["test"]))
        predictions = predictions_frame(
            splits["test"].utt_ids, splits["test"].labels, probs, classes
        )
        metrics = metrics_from_predictions(predictions, classes)
        metrics.update(
            run_info,
            method="frozen" + HEADS[kind],
            head=kind,
            best_epoch=result.best_epoch,
            best_dev_uar=result.best_dev_uar,
            epochs_run=len(result.history),
            wall_s=time.perf_counter() - tic,
            versions=library_versions(),
        )
        if kind == "wsum":
            metrics["layer_weights"] = torch.softmax(head.layer_weights.detach(), 0).tolist()
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in head.state_dict().items()},
            str(out_dir / f"head{suffix}.safetensors"),
        )
        write_tsv_atomic(pd.DataFrame(result.history), out_dir / f"history{suffix}.tsv")
        write_tsv_atomic(
            test_epochs.frame(h["epoch"] for h in result.history),
            out_dir / f"test_epochs{suffix}.tsv",
        )
        write_tsv_atomic(predictions, out_dir / f"predictions{suffix}.tsv")
        write_json_atomic(metrics, out_dir / f"metrics{suffix}.json")
