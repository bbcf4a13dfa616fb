"""The causal tests' shortcuts against computing every variant as asked, in one run.

    python bench/bench_causal.py --tiny-en PATH_TO_TINY_EN_MODEL_DIR

Builds the LoRA run of bench/gpu_analyses.py (the real tiny.en encoder, rank-8 adapters on
v_proj with a seeded random B, 24 test clips), runs ``causal_logits`` with the default
settings with and without its shortcuts (:class:`serlens.analysis.causal.ReferenceStreams`),
alternating, best of three each, on one thread, and prints the time ratio and whether the
logits are identical (they must be, bit for bit).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gpu_analyses import build_run  # bench/ is on sys.path when this script runs

from serlens.analysis.causal import causal_logits
from serlens.analysis.passes import pass_settings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-en", default="resources/weights/tiny.en")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run, config, _ = build_run(args.tiny_en, "cpu")
    settings = pass_settings(config)
    best = {True: float("inf"), False: float("inf")}
    logits = {}
    for _ in range(args.rounds):
        for shortcuts in (True, False):
            tic = time.perf_counter()
            logits[shortcuts], _variants = causal_logits(run, settings, shortcuts=shortcuts)
            best[shortcuts] = min(best[shortcuts], time.perf_counter() - tic)
    same = np.array_equal(logits[True], logits[False])
    print(
        f"causal tests of one run: {best[False]:.2f} s as asked, {best[True]:.2f} s with shortcuts"
    )
    print(
        f"bench: causal shortcuts {best[False] / best[True]:.2f}x, "
        f"logits {'identical' if same else 'DIFFERENT'}"
    )
    if not same:
        raise SystemExit("the shortcuts changed a logit")


if __name__ == "__main__":
    main()
