"""What each training method of config/methods.yaml costs per training step, relative to LoRA
r = 8 on v_proj (the paper's method), measured in one run on this machine.

    .venv/bin/python bench/methods_cost.py [--model tiny.en|base|small|...] [--steps 6]

For each method: trainable parameters, the bytes its optimizer keeps (Adam: two float32
moments per trainable parameter, plus the parameter's gradient), and the seconds of one
training step (forward, backward, AdamW step) on a batch of 8 clips of 4.5 s under ``crop``,
median over ``--steps`` after one warm-up step. ``tiny.en`` uses the bundled real weights;
other sizes the real architecture with random weights (no download). The ratios are CPU
ratios: on a GPU at batch 8 the small models are bound by kernel launches, so the step-time
ratios there are closer to 1 than here; the memory ratios carry over.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from serlens.audio import LogMel  # noqa: E402
from serlens.config import validate_config  # noqa: E402
from serlens.methods import configured_methods  # noqa: E402
from serlens.train.lora import build_model  # noqa: E402

SIZES = {  # d_model, layers, heads (Whisper's encoder)
    "base": (512, 6, 8),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large-v2": (1280, 32, 20),
}


def encoder(model: str):
    if model == "tiny.en":
        from serlens.models.encoder import load_encoder
        from serlens.models.resolve import resolve_weights

        return load_encoder(resolve_weights("bundled:tiny.en", ROOT / "resources"))
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    d, layers, heads = SIZES[model]
    config = WhisperConfig(
        d_model=d,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d,
        num_mel_bins=80,
    )
    torch.manual_seed(0)
    return WhisperEncoder(config).eval()


def step_seconds(model, batch, labels, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(steps + 1):
        tic = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "config/methods.yaml").read_text())
    config = validate_config({**base, **overlay, "lora": {**base["lora"], **overlay["lora"]}})
    methods = {n: m for n, m in configured_methods(config).items() if m.trains_encoder}
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(int(4.5 * 16000)).astype(np.float32) for _ in range(8)]
    labels = torch.arange(8) % 4
    rows = []
    for name, method in methods.items():
        torch.manual_seed(0)
        enc = encoder(args.model)
        batch = LogMel(enc.config.num_mel_bins)(waves, "crop")
        model = build_model(enc, method, 4, config).train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = step_seconds(model, batch, labels, args.steps)
        rows.append((name, method.label, trainable, 3 * 4 * trainable, seconds))
    ref = next(r for r in rows if r[0] == "lora_r8")
    print(f"{args.model}, batch 8 x 4.5 s, crop, CPU ({torch.get_num_threads()} threads)")
    print(f"{'method':16} {'trainable':>12} {'optimizer+grad':>15} {'step s':>8} {'x LoRA v':>9}")
    for name, _label, trainable, nbytes, seconds in rows:
        print(
            f"{name:16} {trainable:12,d} {nbytes / 2**20:12.1f} MiB {seconds:8.3f} "
            f"{seconds / ref[4]:8.2f}x"
        )


if __name__ == "__main__":
    main()
