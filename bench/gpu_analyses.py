"""Every analysis of a LoRA run on the GPU against the same analysis on the CPU.

    python bench/gpu_analyses.py --tiny-en PATH_TO_TINY_EN_MODEL_DIR

Builds one run from the real tiny.en encoder (rank-8 LoRA with a seeded random B, a seeded
head, harmonic-tone clips), computes each analysis with the encoder on ``cpu`` and on
``cuda``, and prints the largest difference of the numeric columns and the time of each.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from gpu_check import tone_split  # bench/ is on sys.path when this script runs

from serlens.analysis.registry import ANALYSES
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-en", required=True)
    args = parser.parse_args()
    import importlib

    runs = {device: build_run(args.tiny_en, device) for device in ("cpu", "cuda")}
    for name, spec in ANALYSES.items():
        compute = getattr(importlib.import_module(spec.module), spec.function)
        tables, times = {}, {}
        for device, (run, config, speakers) in runs.items():
            kwargs = {"speakers": speakers} if name == "probing" else {}
            tic = time.perf_counter()
            tables[device] = compute(run, copy.deepcopy(config["analysis"]), 0, **kwargs)
            times[device] = time.perf_counter() - tic
        cpu, gpu = tables["cpu"], tables["cuda"]
        numeric = cpu.select_dtypes("number").columns
        same_shape = cpu.shape == gpu.shape
        diff = (cpu[numeric] - gpu[numeric]).abs().max().max() if same_shape else float("nan")
        print(
            f"{name:14s} rows {len(cpu):5d}/{len(gpu):5d}  max |cpu - cuda| {diff:.2e}  "
            f"cpu {times['cpu']:.1f} s, cuda {times['cuda']:.1f} s"
        )


if __name__ == "__main__":
    main()
