"""The encoder passes of a LoRA run on the GPU against the same passes on the CPU.

    python bench/gpu_analyses.py --tiny-en PATH_TO_TINY_EN_MODEL_DIR

Builds one run from the real tiny.en encoder (rank-8 LoRA with a seeded random B, a seeded
head, harmonic-tone clips), runs the base and the adapted pass (every encoder forward the
analyses read, and the A/B statistics) with the encoder on ``cpu`` and on ``cuda``, and
prints the largest difference of every stored array and the time of each pass. The
analyses themselves run on the CPU from these files.
"""

from __future__ import annotations

import argparse
import time

import torch
from gpu_check import tone_split  # bench/ is on sys.path when this script runs

from serlens.analysis.runs import TrainedRun
from serlens.config import default_config
from serlens.models.encoder import load_encoder
from serlens.train.lora import LoraEmotionModel


def build_run(model_dir, device):
    torch.manual_seed(0)
    config = default_config()
    model = LoraEmotionModel(load_encoder(model_dir), 4, 8, config["lora"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.to(device).eval()
    splits = {
        "train": tone_split(48, 0, "tr"),
        "dev": tone_split(8, 1, "dv"),
        "test": tone_split(24, 2, "te"),
    }
    run = TrainedRun(
        model="tiny.en", method="lora_r8", fold=1, encoder=model.encoder, head=model.head, splits=splits,
        classes=["neu", "hap", "ang", "sad"], policy="crop", max_seconds=30.0, rank=8,
        peft_encoder=model.peft_encoder, device=device,
    )  # fmt: skip
    speakers = {u: f"spk{i % 6}" for split in splits.values() for i, u in enumerate(split.utt_ids)}
    return run, config, speakers


def main():
    import tempfile
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file

    from serlens.analysis.passes import adapted_pass, base_pass, every_utterance

    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-en", required=True)
    parser.add_argument(
        "--devices", nargs=2, default=["cpu", "cuda"], help="the two devices compared"
    )
    args = parser.parse_args()
    first, second = args.devices
    out = Path(tempfile.mkdtemp(prefix="serlens-gpu-passes-"))
    from serlens.analysis.passes import pass_settings

    settings = pass_settings(default_config())
    files, times = {}, {}
    for side, device in (("cpu", first), ("cuda", second)):
        run, _, _ = build_run(args.tiny_en, device)
        base_run, folds = every_utterance(run)
        tic = time.perf_counter()
        base_pass(base_run, folds, settings, out / side / "base.safetensors")
        adapted_pass(run, settings, out / side / "run.safetensors", out / side / "ab.safetensors")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times[side] = time.perf_counter() - tic
        files[side] = {
            name: load_file(str(out / side / f"{name}.safetensors"))
            for name in ("base", "run", "ab")
        }
    for name in ("base", "run", "ab"):
        for key in sorted(files["cpu"][name]):
            cpu, gpu = files["cpu"][name][key], files["cuda"][name][key]
            diff = (
                float(np.abs(cpu.astype(np.float64) - gpu.astype(np.float64)).max())
                if cpu.size
                else 0.0
            )
            scale = float(np.abs(cpu).max()) if cpu.size else 0.0
            print(f"{name:5s} {key:60s} max |cpu - cuda| {diff:.2e} (max |cpu| {scale:.2e})")
    print(f"passes: {first} {times['cpu']:.1f} s, {second} {times['cuda']:.1f} s")


if __name__ == "__main__":
    main()
