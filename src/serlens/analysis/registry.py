"""The analyses the workflow runs on each trained run, and which config keys each depends on."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from serlens.io import write_tsv_atomic


@dataclass(frozen=True)
class Analysis:
    name: str
    module: str
    function: str
    lora_only: bool
    keys: tuple[str, ...]  # keys of config["analysis"] it reads (rerun triggers)


ANALYSES = {
    a.name: a
    for a in [
        Analysis(
            "contributions",
            "serlens.analysis.contributions",
            "compute_contributions",
            False,
            ("batch_size",),
        ),
        Analysis(
            "logit_lens",
            "serlens.analysis.logit_lens",
            "compute_logit_lens",
            False,
            ("batch_size", "train_sample", "tuned_lens", "tuned_lens_steps"),
        ),
        Analysis(
            "probing",
            "serlens.analysis.probing",
            "compute_probing",
            False,
            ("batch_size", "probe_cv_folds", "probe_Cs"),
        ),
        Analysis(
            "svd",
            "serlens.analysis.lora_spectra",
            "compute_svd",
            True,
            ("energy_fraction", "intruder_k", "intruder_epsilon"),
        ),
        Analysis(
            "ab_dynamics",
            "serlens.analysis.ab_dynamics",
            "compute_ab_dynamics",
            True,
            ("batch_size", "train_sample", "energy_fraction", "untrained_init_std"),
        ),
        Analysis(
            "cka",
            "serlens.analysis.representations",
            "compute_cka",
            True,
            ("batch_size", "rbf_threshold"),
        ),
    ]
}


def analysis_params(config: dict, name: str) -> dict:
    """The slice of the config an analysis depends on (what Snakemake's params trigger on)."""
    keys = ANALYSES[name].keys
    return {
        "seed": config["seed"],
        "audio": config["audio"],
        **{k: config["analysis"][k] for k in keys},
    }


def run_analysis(
    name: str,
    config: dict,
    model: str,
    method: str,
    fold: int,
    manifest: Path,
    folds: Path,
    weights: Path,
    run_dir: Path,
    output: Path,
    features: Path | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Load the run, compute one analysis, write its tidy TSV (with model/method/fold columns)."""
    from serlens.analysis.runs import load_run

    spec = ANALYSES[name]
    run = load_run(config, model, method, fold, manifest, folds, weights, run_dir, device)
    compute = getattr(importlib.import_module(spec.module), spec.function)
    kwargs = {"features_path": features, "manifest_path": manifest} if name == "probing" else {}
    table = compute(run, config["analysis"], config["seed"], **kwargs)
    table.insert(0, "fold", int(fold))
    table.insert(0, "method", method)
    table.insert(0, "model", model)
    write_tsv_atomic(table, output)
    return table
