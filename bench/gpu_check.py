"""The CUDA path of training: bf16 autocast, throughput and peak memory per Whisper size.

    python bench/gpu_check.py --tiny-en PATH_TO_TINY_EN_MODEL_DIR

1. The real bundled tiny.en through ``run_lora`` (the workflow's own function) on short
   harmonic-tone clips, on the GPU with bf16 autocast: it must train and write its files.
2. For every Whisper size (tiny ... large-v2, the real architectures with random weights,
   since the GPU machine has no hub access): LoRA r=8 training steps with bf16 autocast,
   batch 8, on IEMOCAP-like clips (mean 4.5 s) under ``crop`` and on 30 s inputs under
   ``pad30``; peak GPU memory and utterances/s of each (log-mel on the CPU not counted,
   every batch shape warmed up once before timing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from serlens.audio import LogMel
from serlens.config import default_config
from serlens.models.encoder import load_encoder, masked_mean, run_encoder
from serlens.train.data import Split
from serlens.train.lora import LoraEmotionModel, run_lora

SIZES = {  # d_model, layers, heads (OpenAI's Whisper encoders)
    "tiny": (384, 4, 6),
    "base": (512, 6, 8),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large-v2": (1280, 32, 20),
}


def tone_split(n, seed, prefix):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    waves, durations = [], []
    for label in labels:
        seconds = rng.uniform(1.0, 3.0)
        t = np.arange(int(seconds * 16000)) / 16000
        f0 = 120 + 60 * label + rng.normal(0, 5)
        waves.append(
            (0.2 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(len(t))).astype(
                np.float32
            )
        )
        durations.append(seconds)
    return Split([f"{prefix}{i}" for i in range(n)], labels, np.array(durations), [""] * n, waves)


def check_run_lora(model_dir: Path) -> None:
    config = default_config()
    config["train"].update(epochs=3, batch_size=8)
    config["seed"] = config["seeds"][0]  # run_lora trains one seed of the grid
    splits = {
        "train": tone_split(64, 0, "tr"),
        "dev": tone_split(16, 1, "dv"),
        "test": tone_split(16, 2, "te"),
    }
    torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        model = run_lora(
            load_encoder(model_dir),
            splits,
            ["neu", "hap", "ang", "sad"],
            8,
            config,
            Path(out),
            None,
            {},
            "cuda",
        )
        import json

        metrics = json.loads((Path(out) / "metrics.json").read_text())
    print(
        f"run_lora on cuda (tiny.en, bf16 autocast): {time.perf_counter() - tic:.1f} s for 3 epochs of 64 clips, "
        f"test UAR {metrics['uar']:.3f}, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, "
        f"lora dtype {next(p for n, p in model.named_parameters() if 'lora_A' in n).dtype}"
    )


def iemocap_like(n, seed=0):
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.gamma(4.0, 4.5 / 4.0, n), 1.0, 12.0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


def step_stats(size: str, policy: str, waves, batch_size=8):
    d, layers, heads = SIZES[size]
    cfg = WhisperConfig(
        d_model=d,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d,
        decoder_layers=1,
        decoder_attention_heads=heads,
        num_mel_bins=80,
    )
    cfg._attn_implementation = "sdpa"
    encoder = WhisperEncoder(cfg).eval()
    model = LoraEmotionModel(encoder, 4, 8, default_config()["lora"]).cuda()
    logmel = LogMel(80)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = np.argsort([len(w) for w in waves])
    batches = [
        [waves[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)
    ]
    mels = [logmel(chunk, policy).to("cuda") for chunk in batches]

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run_encoder(model.encoder, batch)
            logits = model.head(masked_mean(out.last_hidden_state, out.frame_mask))
        loss = logits.float().logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    for batch in mels:  # warm-up: every batch shape once (crop batches differ in length)
        step(batch)
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for batch in mels:
        step(batch)
    torch.cuda.synchronize()
    elapsed, seen = time.perf_counter() - tic, sum(b.mel.shape[0] for b in mels)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return seen / elapsed, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-en", type=Path, required=True)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_run_lora(args.tiny_en)
    waves = iemocap_like(64)
    print("size      policy  utt/s (train step)  peak GiB")
    for size in SIZES:
        for policy in ("crop", "pad30"):
            rate, peak = step_stats(size, policy, waves)
            torch.cuda.empty_cache()
            print(f"{size:9s} {policy:6s}  {rate:18.1f}  {peak:8.2f}")


if __name__ == "__main__":
    main()
