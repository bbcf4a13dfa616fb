"""The frozen-feature cache: one encoder pass per utterance, every layer's masked mean-pooled state.

All folds and every frozen baseline read this cache; nothing re-encodes per fold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from serlens.audio import LogMel, load_audio
from serlens.errors import CorpusError
from serlens.models.encoder import pooled_layer_states


def duration_batches(durations: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices sorted by duration and cut into batches, so crop pads little."""
    order = np.argsort(durations, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def encode_pooled(
    encoder: torch.nn.Module,
    waves: list[np.ndarray],
    policy: str,
    max_seconds: float,
    batch_size: int,
    device: str = "cpu",
    desc: str = "encode",
) -> torch.Tensor:
    """(N, L + 1, D) float32 pooled states of every wave, in input order."""
    logmel = LogMel(encoder.config.num_mel_bins)
    durations = np.array([len(w) for w in waves], dtype=np.float64)
    out: torch.Tensor | None = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    for idx in tqdm(duration_batches(durations, batch_size), desc=desc, leave=False, disable=None):
        batch = logmel([waves[i] for i in idx], policy, max_seconds).to(device)
        with autocast:
            states = pooled_layer_states(encoder, batch).float().cpu()
        if out is None:
            out = torch.empty((len(waves), *states.shape[1:]), dtype=torch.float32)
        out[torch.as_tensor(idx)] = states
    return out


def cache_features(
    encoder: torch.nn.Module,
    manifest: pd.DataFrame,
    out_path: Path,
    policy: str,
    max_seconds: float,
    batch_size: int,
    device: str = "cpu",
) -> None:
    """Write ``pooled.safetensors`` with tensor ``states`` (N, L + 1, D) in manifest order and the ids in its metadata."""
    waves = [load_audio(p) for p in manifest["path"]]
    states = encode_pooled(encoder, waves, policy, max_seconds, batch_size, device)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    save_file(
        {"states": states.contiguous()},
        str(tmp),
        metadata={
            "utt_ids": "\n".join(manifest["utt_id"]),
            "policy": policy,
            "max_seconds": str(max_seconds),
        },
    )
    tmp.replace(out_path)


def load_features(path: Path, utt_ids: list[str]) -> torch.Tensor:
    """Rows of the cache for ``utt_ids``, in that order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        cached_ids = handle.metadata()["utt_ids"].split("\n")
    states = load_file(str(path))["states"]
    index = {u: i for i, u in enumerate(cached_ids)}
    missing = [u for u in utt_ids if u not in index]
    if missing:
        raise CorpusError(
            f"{path}: no cached features for {missing[:3]}...; rerun the features rule."
        )
    return states[torch.tensor([index[u] for u in utt_ids])]
