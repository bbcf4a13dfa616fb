"""Speed ratios of serlens' training path, measured in one run on one machine.

    .venv/bin/python bench/bench_training.py [--utterances 48] [--threads N]

Prints, for the bundled Whisper tiny.en on clips of IEMOCAP-like length (mean about 4.5 s):
- crop vs pad30 throughput of encoding and of a LoRA training step;
- frozen baselines of five folds from the feature cache vs re-encoding every fold;
- achieved FLOP/s of the encoder forward and of a training step against the machine's
  measured float32 matmul FLOP/s (the ceiling);
and ends with one summary line. Ratios, not absolute times, are what carry across machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from serlens.audio import LogMel
from serlens.config import validate_config
from serlens.models.encoder import load_encoder, masked_mean, pooled_layer_states, run_encoder
from serlens.models.resolve import resolve_weights
from serlens.train.data import Split
from serlens.train.frozen import train_frozen_head
from serlens.train.lora import LoraEmotionModel


def iemocap_like_waves(n: int, seed: int = 0) -> list[np.ndarray]:
    """Band-limited noise bursts with gamma-distributed durations (mean 4.5 s, 1-12 s)."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.gamma(4.0, 4.5 / 4.0, n), 1.0, 12.0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul FLOP/s (best of several)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best


def encoder_flops(config, frames: int, batch: int) -> float:
    """Forward FLOPs: conv stem + per layer (QKVO, MLP, attention scores and mixing)."""
    d, ffn, layers, mels = (
        config.d_model,
        config.encoder_ffn_dim,
        config.encoder_layers,
        config.num_mel_bins,
    )
    stem = 2 * (mels * d * 3 * 2 * frames) + 2 * (d * d * 3 * frames)
    per_layer = 2 * frames * (4 * d * d + 2 * d * ffn) + 2 * 2 * frames * frames * d
    return batch * (stem + layers * per_layer)


def batches_of(waves, size):
    order = np.argsort([len(w) for w in waves])
    return [[waves[i] for i in order[j : j + size]] for j in range(0, len(order), size)]


def time_encode(encoder, logmel, waves, policy, batch_size) -> tuple[float, float, float]:
    """Seconds to encode ``waves`` (log-mel included), seconds in the encoder alone, and its forward FLOPs."""
    flops, encoder_s = 0.0, 0.0
    tic = time.perf_counter()
    with torch.inference_mode():
        for chunk in batches_of(waves, batch_size):
            batch = logmel(chunk, policy)
            start = time.perf_counter()
            pooled_layer_states(encoder, batch)
            encoder_s += time.perf_counter() - start
            flops += encoder_flops(encoder.config, batch.n_frames, len(chunk))
    return time.perf_counter() - tic, encoder_s, flops


def time_train(model, logmel, waves, policy, batch_size, steps) -> tuple[float, int, float]:
    """Seconds for ``steps`` LoRA training steps, utterances seen, and forward FLOPs."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    chunks = batches_of(waves, batch_size)
    chunks = [chunks[i % len(chunks)] for i in range(steps)]
    seen, flops = 0, 0.0
    tic = time.perf_counter()
    for chunk in chunks:
        batch = logmel(chunk, policy)
        out = run_encoder(model.encoder, batch)
        loss = model.head(masked_mean(out.last_hidden_state, out.frame_mask)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(chunk)
        flops += encoder_flops(model.encoder.config, batch.n_frames, len(chunk))
    return time.perf_counter() - tic, seen, flops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; the best of each is kept"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    )

    weights = resolve_weights("bundled:tiny.en", os.environ.get("SERLENS_RESOURCES", "resources"))
    encoder = load_encoder(weights)
    logmel = LogMel(encoder.config.num_mel_bins)
    waves = iemocap_like_waves(args.utterances)
    print(f"clips: {len(waves)}, mean {np.mean([len(w) for w in waves]) / 16000:.2f} s")

    peak = matmul_peak()
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    # Alternate the measurements and keep each one's best round: on a shared machine other
    # load only ever slows a measurement down, and alternating exposes both sides to it alike.
    sub = waves[: args.batch_size]  # pad30 is slow by design: one batch of it
    time_encode(encoder, logmel, sub, "crop", args.batch_size)  # warm-up
    crop_enc, pad_enc = [], []
    for _ in range(args.rounds):
        crop_enc.append(time_encode(encoder, logmel, waves, "crop", args.batch_size))
        pad_enc.append(time_encode(encoder, logmel, sub, "pad30", args.batch_size))
    crop_s, crop_encoder_s, crop_flops = min(crop_enc)
    pad_s = min(r[0] for r in pad_enc)
    crop_encoder_s = min(r[1] for r in crop_enc)
    encode_ratio = (len(waves) / crop_s) / (len(sub) / pad_s)
    # The encoder forward alone (log-mel, on the CPU before it, is in the throughput above).
    forward_pct = 100 * crop_flops / crop_encoder_s / peak
    print(
        f"encode: crop {len(waves) / crop_s:.1f} utt/s, pad30 {len(sub) / pad_s:.2f} utt/s -> {encode_ratio:.1f}x"
    )

    # LoRA training steps: crop vs pad30.
    model = LoraEmotionModel(encoder, 4, 8, validate_config({})["lora"])
    model.train()
    time_train(model, logmel, sub, "crop", args.batch_size, 1)  # warm-up
    steps = max(2, len(waves) // args.batch_size)
    crop_train, pad_train = [], []
    for _ in range(args.rounds):
        crop_train.append(time_train(model, logmel, waves, "crop", args.batch_size, steps))
        pad_train.append(time_train(model, logmel, sub, "pad30", args.batch_size, 1))
    crop_train_s, crop_seen, crop_train_flops = min(crop_train)
    pad_train_s, pad_seen, _ = min(pad_train)
    train_ratio = (crop_seen / crop_train_s) / (pad_seen / pad_train_s)
    # A LoRA step runs the forward and the backward through every layer's activations
    # (no weight gradients for frozen weights): about 2x the forward FLOPs.
    train_pct = 100 * 2 * crop_train_flops / crop_train_s / peak
    print(
        f"train: crop {crop_seen / crop_train_s:.1f} utt/s, pad30 {pad_seen / pad_train_s:.2f} utt/s -> {train_ratio:.1f}x"
    )
    model.peft_encoder.unload()

    # Frozen baselines of five folds. From the cache: encode every utterance once (E), then
    # train the two heads of each fold (5 H). Re-encoding: every fold encodes all its
    # utterances (each utterance is in some split of every fold) before its heads: 5 (E + H).
    labels = np.arange(len(waves)) % 4
    train_cfg = validate_config({})["train"]
    n = len(waves)
    parts = {
        "train": np.arange(0, n * 3 // 5),
        "dev": np.arange(n * 3 // 5, n * 4 // 5),
        "test": np.arange(n * 4 // 5, n),
    }
    with torch.inference_mode():
        features = torch.cat(
            [
                pooled_layer_states(encoder, logmel(c, "crop"))
                for c in batches_of(waves, args.batch_size)
            ]
        )
    splits = {
        k: Split([str(i) for i in v], labels[v], np.ones(len(v)), [""] * len(v))
        for k, v in parts.items()
    }
    feats = {k: features[v] for k, v in parts.items()}
    head_s = []
    for _ in range(args.rounds):
        tic = time.perf_counter()
        for kind in ("last", "wsum"):
            train_frozen_head(kind, feats, splits, ["a", "b", "c", "d"], train_cfg, 0)
        head_s.append(time.perf_counter() - tic)
    encode_all_s, heads_s = crop_s, min(head_s)
    cache_s, recompute_s = encode_all_s + 5 * heads_s, 5 * (encode_all_s + heads_s)
    cache_ratio = recompute_s / cache_s
    print(
        f"frozen, five folds: encode {encode_all_s:.1f} s, heads of one fold {heads_s:.2f} s -> "
        f"cache {cache_s:.1f} s, re-encode per fold {recompute_s:.1f} s -> {cache_ratio:.1f}x"
    )
    print(
        f"forward at crop length: {forward_pct:.0f}% of matmul peak; train step: {train_pct:.0f}%"
    )
    print(
        f"bench: crop/pad30 train {train_ratio:.1f}x, encode {encode_ratio:.1f}x; cache/recompute {cache_ratio:.1f}x; "
        f"forward {forward_pct:.0f}% of matmul peak, train step {train_pct:.0f}%"
    )


if __name__ == "__main__":
    main()
