"""Job-seconds of one workflow run, from Snakemake's `benchmark:` files, split into compute and overhead.

    .venv/bin/python bench/job_seconds.py [results]

Every rule declares `benchmark:` (results/benchmarks/{rule}/<output path>.tsv: wall seconds
`s`, max RSS, ...). Heavy jobs (scripts: corpus, features, training, encoder passes) also log
`job compute: X s` (serlens.steps.COMPUTE_LINE) around their encoder passes or training
steps; the rest of their wall time is overhead: interpreter start-up, imports, model loads,
writing files. Light jobs run in Snakemake's own process (`run:` rules): all of their time
counts as compute (reading stored states, fitting probes, drawing), they pay no start-up.
Prints one line per rule and the totals, with the overhead share of all job-seconds. A run's
encoder pass also logs `part compute: NAME X s` for its parts (states, A/B statistics, causal
tests; serlens.analysis.passes.PART_LINE): they are summed over the passes, and the causal
tests' and ∂L/∂b's speaker band's job-seconds are each set against the rest of the same
run's (their issues' budgets are 25 % and, with the other nulls, 15 % of the run without
them; measured in one run, so the machine's speed cancels).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

COMPUTE = re.compile(r"job compute: ([0-9.]+) s")
PART = re.compile(r"part compute: (\w+) ([0-9.]+) s")
#: Parts whose job-seconds are set against the rest of the run (each one's issue has a budget).
#: out_grad_band (∂L/∂b's speaker band) is a part of ab_statistics, so the listing counts it
#: twice; the shares do not.
SHARES = {"causal": "causal tests", "out_grad_band": "∂L/∂b's speaker band (within ab_statistics)"}


def job_seconds(results: Path) -> pd.DataFrame:
    """One row per job: rule, wall seconds, compute seconds (None when the job logs none)."""
    rows = []
    for bench in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = bench.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        wall = float(pd.read_csv(bench, sep="\t")["s"].iloc[-1])
        below = (
            bench.relative_to(results / "benchmarks" / rule)
            if bench.parent != results / "benchmarks"
            else None
        )
        log = (
            results / "logs" / (str(below).removesuffix(".tsv") + ".log")
            if below
            else results / "logs" / f"{rule}.log"
        )
        compute, parts = None, {}
        if log.is_file():
            text = log.read_text(errors="replace")
            found = COMPUTE.findall(text)
            if found:
                compute = float(found[-1])
            # the parts of the last job in the log (a rerun appends to it): the text
            # between the last two compute lines
            last_job = text.rsplit("job compute:", 2)[-2] if found else text
            parts = {name: float(seconds) for name, seconds in PART.findall(last_job)}
        rows.append({"rule": rule, "wall_s": wall, "compute_s": compute, "parts": parts})
    return pd.DataFrame(rows)


def main(results: Path) -> None:
    jobs = job_seconds(results)
    if jobs.empty:
        sys.exit(f"{results}/benchmarks holds no benchmark files: run the workflow first")
    scripted = jobs["compute_s"].notna()
    # A script job without a compute line (weights, manifest, folds, rulegraph) is all overhead.
    script_rules = {"weights", "manifest", "folds", "figure_rulegraph"}
    jobs["kind"] = [
        "script" if s or r in script_rules else "in-process"
        for s, r in zip(scripted, jobs["rule"], strict=True)
    ]
    jobs["compute_s"] = jobs["compute_s"].where(jobs["kind"] == "script", jobs["wall_s"])
    jobs["compute_s"] = jobs["compute_s"].fillna(0.0).clip(upper=jobs["wall_s"])
    jobs["overhead_s"] = jobs["wall_s"] - jobs["compute_s"]
    per_rule = jobs.groupby("rule").agg(
        jobs=("wall_s", "size"),
        wall_s=("wall_s", "sum"),
        compute_s=("compute_s", "sum"),
        overhead_s=("overhead_s", "sum"),
        kind=("kind", "first"),
    )
    print(per_rule.sort_values("wall_s", ascending=False).round(1).to_string())
    total = defaultdict(float, jobs[["wall_s", "compute_s", "overhead_s"]].sum().to_dict())
    share = total["overhead_s"] / total["wall_s"] if total["wall_s"] else float("nan")
    print(
        f"\njob-seconds of {len(jobs)} jobs: {total['wall_s']:.0f} s = compute {total['compute_s']:.0f} s"
        f" + overhead {total['overhead_s']:.0f} s (start-up, imports, model loads); "
        f"overhead share {share:.0%}"
    )
    parts: dict[str, float] = defaultdict(float)
    for found in jobs["parts"]:
        for name, seconds in found.items():
            parts[name] += seconds
    if parts:
        listed = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in sorted(parts.items()))
        print(f"parts of the encoder passes: {listed}")
    for part, what in SHARES.items():
        if parts.get(part):
            rest = total["wall_s"] - parts[part]
            print(
                f"{what}: {parts[part]:.0f} job-s, {parts[part] / rest:.0%} of the "
                f"other {rest:.0f} job-seconds of this run"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
