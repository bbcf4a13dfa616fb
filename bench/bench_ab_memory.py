"""Peak memory of the A/B dynamics analysis against the number of utterances (it streams).

    .venv/bin/python bench/bench_ab_memory.py [--sizes 8 16 32 64]

Each size runs in a fresh process on the bundled tiny.en with a rank-8 LoRA adapter (B set
to a seeded normal so gradients flow as in a trained run) and IEMOCAP-like clips. The heap
in use above one batch's worth should stay flat as the sample grows: the analysis keeps
per-module accumulators, not activations (the paper's notebook keeps every activation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def probe(n: int) -> dict:
    import torch
    from ab_memory_probe import ab_memory_probe

    from serlens.analysis.runs import TrainedRun
    from serlens.config import validate_config
    from serlens.models.encoder import load_encoder
    from serlens.models.resolve import resolve_weights
    from serlens.train.data import Split
    from serlens.train.lora import LoraEmotionModel

    torch.manual_seed(0)
    config = validate_config({})
    weights = resolve_weights("bundled:tiny.en", os.environ.get("SERLENS_RESOURCES", "resources"))
    model = LoraEmotionModel(load_encoder(weights), 4, 8, config["lora"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    rng = np.random.default_rng(0)
    seconds = np.clip(rng.gamma(4.0, 4.5 / 4.0, n), 1.0, 12.0)
    waves = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    labels = np.arange(n) % 4
    train = Split([f"u{i}" for i in range(n)], labels, seconds, [""] * n, waves)
    run = TrainedRun(
        model="tiny.en", method="lora_r8", fold=1, encoder=model.encoder, head=model.head,
        splits={"train": train}, classes=["neu", "hap", "ang", "sad"], policy="crop",
        max_seconds=30.0, rank=8, peft_encoder=model.peft_encoder,
    )  # fmt: skip
    return ab_memory_probe(run, config["analysis"], 0, n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(probe(args.one)))
        return
    rows = []
    for n in args.sizes:
        out = (
            subprocess.run(
                [sys.executable, __file__, "--one", str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append(json.loads(out))
    print("utterances  frames  one-batch heap MB  whole-sample heap delta MB  RSS delta MB  wall s")
    for r in rows:
        heap1 = r.get("one_batch_peak_heap_mb")
        heap = r.get("peak_heap_delta_mb")
        print(
            f"{r['n_utterances']:10d}  {r['n_frames']:6d}  {heap1 if heap1 is None else round(heap1, 1)!s:>17}  "
            f"{heap if heap is None else round(heap, 1)!s:>26}  {r['peak_rss_delta_mb']:12.1f}  {r['wall_s']:6.1f}"
        )
    first, last = rows[0], rows[-1]
    key = (
        "peak_heap_delta_mb" if last.get("peak_heap_delta_mb") is not None else "peak_rss_delta_mb"
    )
    ratio_n = last["n_utterances"] / first["n_utterances"]
    ratio_mem = (last[key] + 1.0) / (first[key] + 1.0)
    print(f"bench: A/B dynamics memory {ratio_mem:.2f}x for {ratio_n:.0f}x the utterances ({key})")


if __name__ == "__main__":
    main()
