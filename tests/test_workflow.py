"""The workflow end to end on a small synthetic corpus, and what a rerun schedules."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def small_config(tmp: Path, **overrides) -> dict:
    config = {
        "results": str(tmp / "results"),
        "resources_dir": str(tmp / "resources"),
        "corpus": {"synthetic": {"utterances_per_speaker": 4}},
        "folds": {"run": [1, 2]},
        "train": {"epochs": 1, "frozen_epochs": 3, "batch_size": 8},
        "lora": {"ranks": [4]},
        "analysis": {"train_sample": 8, "tuned_lens_steps": 20},
        "significance": {"resamples": 200},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def snakemake(
    tmp: Path, config: dict, *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    path = tmp / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("\n\n")[0]
    counts = {}
    for line in table.splitlines():
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if match and match[1] != "total":
            counts[match[1]] = int(match[2])
    return counts


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    config = small_config(tmp)
    snakemake(tmp, config)
    return tmp, config


def test_outputs_are_complete_and_consistent(workflow):
    tmp, _ = workflow
    results = tmp / "results"
    manifest = pd.read_csv(results / "corpus/manifest.tsv", sep="\t")
    folds = pd.read_csv(results / "corpus/folds.tsv", sep="\t")
    performance = pd.read_csv(results / "tables/performance.tsv", sep="\t")
    assert set(performance.method) == {"frozen", "frozen_wsum", "lora_r4"}
    assert len(performance) == 3 * 2
    for fold in (1, 2):
        test_ids = set(folds.query("fold == @fold and split == 'test'").utt_id)
        for method in ("frozen", "lora_r4"):
            run = results / f"train/tiny.en/{method}/fold{fold}"
            predictions = pd.read_csv(run / "predictions.tsv", sep="\t")
            assert set(predictions.utt_id) == test_ids and len(predictions) == len(test_ids)
            metrics = json.loads((run / "metrics.json").read_text())
            row = performance.query("method == @method and fold == @fold").iloc[0]
            assert row.uar == pytest.approx(metrics["uar"])
    assert len(manifest) == 10 * 4 + 10  # + exc, relabelled hap
    summary = pd.read_csv(results / "tables/performance_summary.tsv", sep="\t")
    assert (summary.n_folds == 2).all()
    significance = pd.read_csv(results / "tables/significance.tsv", sep="\t")
    assert (
        set(significance.method) == {"lora_r4", "frozen_wsum"}
        and (significance.resamples == 200).all()
    )


def test_every_analysis_table_is_written(workflow):
    tmp, _ = workflow
    analysis = tmp / "results/analysis/tiny.en"
    for name in ("contributions", "logit_lens", "probing"):
        for method in ("frozen", "lora_r4"):
            table = pd.read_csv(analysis / f"{method}/fold1/{name}.tsv", sep="\t")
            assert len(table) > 0 and {"model", "method", "fold"} <= set(table.columns)
    for name in ("svd", "ab_dynamics", "cka"):
        assert len(pd.read_csv(analysis / f"lora_r4/fold2/{name}.tsv", sep="\t")) > 0


def test_figures_and_report(workflow):
    tmp, config = workflow
    figures = tmp / "results/figures"
    pngs = sorted(figures.rglob("*.png"))
    assert len(pngs) >= 10
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
        assert png.with_suffix(".svg").is_file()
    report = tmp / "report.html"
    snakemake(tmp, config, "--report", str(report))
    assert report.stat().st_size > 100_000
    assert "performance" in report.read_text(errors="ignore")


def test_editing_a_figure_script_reruns_only_that_figure(workflow):
    tmp, config = workflow
    script = ROOT / "workflow/scripts/figure_probing.py"
    original, stat = script.read_text(), script.stat()
    try:
        script.write_text(original + "\n# edited\n")
        counts = job_counts(snakemake(tmp, config, "-n").stdout)
    finally:
        script.write_text(original)
        os.utime(
            script, ns=(stat.st_atime_ns, stat.st_mtime_ns)
        )  # Snakemake also compares the script's time
    assert counts == {"figure_probing": 1, "all": 1}


def test_complete_tree_has_nothing_to_do(workflow):
    tmp, config = workflow
    proc = snakemake(tmp, config, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_adding_a_rank_schedules_only_its_jobs(workflow):
    tmp, config = workflow
    counts = job_counts(snakemake(tmp, small_config(tmp, lora={"ranks": [4, 2]}), "-n").stdout)
    assert counts["train_lora"] == 2  # the new rank, two folds
    assert "train_frozen" not in counts and "features" not in counts
    for name in (
        "svd_lora",
        "ab_dynamics_lora",
        "cka_lora",
        "contributions_lora",
        "logit_lens_lora",
        "probing_lora",
    ):
        assert counts[name] == 2
    assert counts["subspace_similarity"] == 2 and counts["performance"] == 1
    assert not any(k.endswith("_frozen") for k in counts)


def test_changing_a_lora_hyperparameter_reruns_lora_training_only(workflow):
    tmp, config = workflow
    counts = job_counts(snakemake(tmp, small_config(tmp, train={"lr": 0.002}), "-n").stdout)
    assert counts["train_lora"] == 2
    assert "train_frozen" not in counts and "features" not in counts
    counts = job_counts(snakemake(tmp, small_config(tmp, train={"frozen_lr": 0.01}), "-n").stdout)
    assert counts["train_frozen"] == 2 and "train_lora" not in counts
