"""The workflow end to end on a small synthetic corpus, and what a rerun schedules."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def small_config(tmp: Path, **overrides) -> dict:
    """.test/config.yaml with results and resources under ``tmp``."""
    config = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    config |= {"results": str(tmp / "results"), "resources_dir": str(tmp / "resources")}
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def effective_config(config: dict) -> dict:
    """The config a run of the workflow sees: config/config.yaml, then ``config`` on top."""
    from serlens.cli import _merge
    from serlens.config import validate_config

    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    return validate_config(_merge(base, json.loads(json.dumps(config))))


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


def assert_read_exactly(settings) -> None:
    """Every key of a job's Settings (nested ones too) was read, and no other could be."""
    from serlens.analysis.registry import Settings

    assert settings.accessed == set(settings), set(settings) - settings.accessed
    for key in settings:
        if isinstance(settings[key], Settings):
            assert settings[key].accessed == set(settings[key]), (key, settings[key].accessed)


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
    results = tmp / "results/synthetic"
    manifest = pd.read_csv(results / "corpus/manifest.tsv", sep="\t")
    folds = pd.read_csv(results / "corpus/folds.tsv", sep="\t")
    performance = pd.read_csv(results / "tables/performance.tsv", sep="\t")
    assert set(performance.method) == {"frozen", "frozen_wsum", "lora_r4"}
    assert len(performance) == 3 * 2
    for fold in (1, 2):
        test_ids = set(folds.query("fold == @fold and split == 'test'").utt_id)
        for method in ("frozen", "frozen_wsum", "lora_r4"):
            run = results / f"train/tiny.en/{method}/seed0/fold{fold}"
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
    analysis = tmp / "results/synthetic/analysis/tiny.en"
    for name in ("contributions", "logit_lens", "probing"):
        for method in ("frozen", "lora_r4"):
            table = pd.read_csv(analysis / f"{method}/seed0/fold1/{name}.tsv", sep="\t")
            assert len(table) > 0 and {"model", "method", "seed", "fold"} <= set(table.columns)
    for name in ("svd", "ab_dynamics", "cka"):
        assert len(pd.read_csv(analysis / f"lora_r4/seed0/fold2/{name}.tsv", sep="\t")) > 0
    assert not (analysis / "frozen_wsum").exists()  # no analysis applies to a weighted-sum head


def test_causal_tests_and_claims_are_written(workflow):
    tmp, _ = workflow
    results = tmp / "results/synthetic"
    causal = pd.read_csv(results / "analysis/tiny.en/lora_r4/seed0/fold1/causal.tsv", sep="\t")
    share = causal[(causal["quantity"] == "share") & (causal["family"] == "reference")]
    on = share[share["variant"] == "on"]
    assert (on["value"] * on["n_utts"]).sum() / on["n_utts"].sum() == pytest.approx(1.0)
    assert {"adapter_off", "patch_adapted_into_frozen", "skip_adapted", "ab_swap"} <= set(
        causal["family"]
    )
    assert "init_a" in set(causal["variant"])  # the adapter's own epoch-0 A was found
    claims = pd.read_csv(results / "tables/claims.tsv", sep="\t")
    assert {c.split(":")[0] for c in claims["claim"]} == {"1", "2", "3", "4"}
    assert set(claims["verdict"]) <= {"supported", "contradicted", "inconclusive", "not tested"}
    claim2 = claims[claims["claim"].str.startswith("2")]
    assert {"causal", "logit_lens", "cka"} <= set(claim2["figure"])
    cka_row = claim2[claim2["figure"] == "cka"].iloc[0]
    assert np.isfinite(cka_row["estimate"]) and cka_row["n_runs"] == 2  # two folds, one seed


def test_every_rule_records_a_benchmark(workflow):
    tmp, _ = workflow
    benchmarks = tmp / "results/benchmarks"
    rules = {p.name.removesuffix(".tsv") for p in benchmarks.iterdir()}
    assert {"train_lora", "train_head", "pass_run", "pass_base", "probing", "table_cka"} <= rules
    for path in benchmarks.rglob("*.tsv"):
        assert "s" in pd.read_csv(path, sep="\t").columns, path


def test_figures_and_report(workflow):
    tmp, config = workflow
    figures = tmp / "results/synthetic/figures"
    pngs = sorted(figures.rglob("*.png"))
    assert len(pngs) >= 10
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
        assert png.with_suffix(".svg").is_file()
    report = tmp / "report.html"
    snakemake(tmp, config, "--report", str(report))
    assert report.stat().st_size > 100_000
    assert "performance" in report.read_text(errors="ignore")


def test_a_post_hoc_setting_reruns_only_its_analysis(workflow):
    tmp, config = workflow
    changed = small_config(tmp, analysis={**config["analysis"], "probe_Cs": [0.1, 1.0]})
    counts = job_counts(snakemake(tmp, changed, "-n").stdout)
    assert counts == {"probing": 2 * 2, "table_probing": 1, "figure_probing": 1, "all": 1}


def test_a_pass_setting_reruns_the_passes_not_training(workflow):
    tmp, config = workflow
    changed = small_config(tmp, analysis={**config["analysis"], "train_sample": 4})
    counts = job_counts(snakemake(tmp, changed, "-n").stdout)
    assert counts["pass_base"] == 1 and counts["pass_run"] == 2  # one base pass per model
    assert "train_lora" not in counts and "train_head" not in counts


def test_complete_tree_has_nothing_to_do(workflow):
    tmp, config = workflow
    proc = snakemake(tmp, config, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_adding_a_rank_schedules_only_its_jobs(workflow):
    tmp, config = workflow
    counts = job_counts(snakemake(tmp, small_config(tmp, lora={"ranks": [4, 2]}), "-n").stdout)
    assert counts["train_lora"] == 2  # the new rank, two folds
    assert "train_head" not in counts and "features" not in counts and "pass_base" not in counts
    for name in ("pass_run", "svd", "ab_dynamics", "cka", "contributions", "logit_lens", "probing"):
        assert counts[name] == 2
    assert counts["subspace"] == 2 and counts["performance"] == 1


def test_changing_a_lora_hyperparameter_reruns_lora_training_only(workflow):
    tmp, config = workflow
    counts = job_counts(snakemake(tmp, small_config(tmp, train={"lr": 0.002}), "-n").stdout)
    assert counts["train_lora"] == 2
    assert "train_head" not in counts and "features" not in counts
    counts = job_counts(snakemake(tmp, small_config(tmp, train={"frozen_lr": 0.01}), "-n").stdout)
    assert counts["train_head"] == 2 * 2 and "train_lora" not in counts


def test_usable_as_a_snakemake_module(tmp_path):
    """The catalog's usage: another project imports the workflow with its own config."""
    config = small_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n\n\n'
        "module serlens:\n"
        f'    snakefile: "{ROOT / "workflow/Snakefile"}"\n'
        "    config: config\n\n\n"
        "use rule * from serlens\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "rules"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train_lora"] == 2 and counts["train_head"] == 2 * 2
    assert counts["pass_run"] == 2 and counts["pass_base"] == 1 and counts["cka"] == 2


def test_each_analysis_reads_exactly_the_settings_its_rule_passes(workflow):
    """spec -> params -> what the code reads: computed again on the run's files, every analysis
    reads every key its rule passes (a trigger it ignores would be a needless rerun) and no
    other (Settings refuses undeclared keys, so a key read from elsewhere would fail here)."""
    from serlens.analysis.registry import ANALYSES, RunData, Settings, run_inputs
    from serlens.methods import parse_method
    from serlens.paths import Paths

    tmp, config = workflow
    config = effective_config(config)
    paths = Paths(config["results"])
    corpus = "synthetic"
    for name, spec in ANALYSES.items():
        settings = Settings(name, spec.settings(config))
        if spec.scope == "run":
            method = spec.methods({m: parse_method(m) for m in ("frozen", "lora_r4")})[-1]
            inputs = run_inputs(spec, parse_method(method), paths, corpus, "tiny.en", 0, 1)
            data = RunData(
                corpus, "tiny.en", parse_method(method), 0, 1, config["corpus"]["classes"], inputs
            )
        else:
            continue  # the cross-rank analysis reads no settings (spec.keys is empty)
        table = spec.compute(data, settings)
        assert len(table) > 0, name
        assert settings.accessed == set(settings), (name, settings.accessed, set(settings))


@pytest.mark.parametrize("method", ["frozen_wsum", "lora_r4"])
def test_training_reads_exactly_the_settings_its_rule_passes(workflow, method, tmp_path):
    """Method.train_settings -> params -> what training reads, key by key (nested too)."""
    from serlens.analysis.registry import Settings
    from serlens.methods import parse_method
    from serlens.paths import Paths
    from serlens.steps import train_run

    tmp, config = workflow
    config = effective_config(config)
    paths = Paths(config["results"])
    passed = {"classes": config["corpus"]["classes"], **parse_method(method).train_settings(config)}
    settings = Settings(
        method, {k: Settings(k, v) if isinstance(v, dict) else v for k, v in passed.items()}
    )
    train_run(
        settings,
        model="tiny.en",
        method=method,
        seed=0,
        fold=1,
        manifest_path=paths.corpus("synthetic", "manifest.tsv"),
        folds_path=paths.corpus("synthetic", "folds.tsv"),
        weights_json=paths.weights("tiny.en"),
        out_dir=tmp_path / "run",
        checkpoints=tmp_path / "checkpoints",
        features_path=paths.features("synthetic", "tiny.en"),
    )
    assert_read_exactly(settings)
    # the same settings give the same run as the workflow's (same seed, same predictions)
    ours = pd.read_csv(tmp_path / "run/predictions.tsv", sep="\t")
    theirs = pd.read_csv(
        f"{paths.run('synthetic', 'tiny.en', method, 0, 1)}/predictions.tsv", sep="\t"
    )
    pd.testing.assert_frame_equal(ours, theirs)


def test_svd_from_the_files_equals_svd_of_the_loaded_model(workflow):
    """The light SVD job (adapter + pre-trained safetensors, no peft) = the SVD of the live peft model."""
    from serlens.analysis.lora_spectra import compute_svd
    from serlens.analysis.runs import load_run
    from serlens.paths import Paths

    tmp, config = workflow
    config = effective_config(config)
    paths = Paths(config["results"])
    run = load_run(
        {"classes": config["corpus"]["classes"], "audio": config["audio"]},
        "tiny.en",
        "lora_r4",
        1,
        paths.corpus("synthetic", "manifest.tsv"),
        paths.corpus("synthetic", "folds.tsv"),
        paths.weights("tiny.en"),
        paths.run("synthetic", "tiny.en", "lora_r4", 0, 1),
    )
    live = compute_svd(run, config["analysis"], 0)
    stored = pd.read_csv(paths.analysis("synthetic", "tiny.en", "lora_r4", 0, 1, "svd"), sep="\t")
    assert len(stored) == len(live) > 0
    assert list(stored["module"]) == list(live["module"])
    assert (stored["quantity"] == live["quantity"]).all()
    assert stored["value"].to_numpy() == pytest.approx(
        live["value"].to_numpy(), rel=1e-6, abs=1e-9, nan_ok=True
    )


def test_cross_corpus_scores_the_trained_runs_on_another_corpus(workflow):
    """The fixture's runs (corpus ``synthetic``) on a second generated corpus with three of
    its classes: only the second corpus's manifest, features and the cross jobs run."""
    tmp, config = workflow
    small = config["corpus"]["synthetic"]
    cross = small_config(
        tmp,
        corpora={
            "synthetic": {"kind": "synthetic", "synthetic": small},
            "other": {
                "kind": "synthetic",
                "classes": ["neu", "ang", "sad"],
                "merge": {},
                "synthetic": {**small, "seed": 1},
            },
        },
        cross_corpus=[["synthetic", "other"]],
    )
    tables = tmp / "results/cross_corpus/synthetic_to_other/tables"
    targets = [str(tables / f"{n}.tsv") for n in ("performance_summary", "confusion")]
    counts = job_counts(snakemake(tmp, cross, "-n", *targets).stdout)
    assert (
        counts["cross_eval"] == 3 * 2 and "train_lora" not in counts and "train_head" not in counts
    )
    snakemake(tmp, cross, "-p", *targets)  # a flag ends --configfile's list
    manifest = pd.read_csv(tmp / "results/other/corpus/manifest.tsv", sep="\t")
    expected = set(manifest.loc[manifest["label"].isin(["neu", "ang", "sad"]), "utt_id"])
    for method in ("frozen", "frozen_wsum", "lora_r4"):
        for fold in (1, 2):
            run = (
                tmp
                / f"results/cross_corpus/synthetic_to_other/eval/tiny.en/{method}/seed0/fold{fold}"
            )
            predictions = pd.read_csv(run / "predictions.tsv", sep="\t")
            assert set(predictions["utt_id"]) == expected and len(predictions) == len(expected)
            assert set(predictions["pred"]) <= {"neu", "ang", "sad"}
            assert [c for c in predictions.columns if c.startswith("p_")] == [
                "p_neu",
                "p_ang",
                "p_sad",
            ]
            assert predictions[["p_neu", "p_ang", "p_sad"]].sum(axis=1).round(3).eq(1).all()
    summary = pd.read_csv(tables / "performance_summary.tsv", sep="\t")
    assert set(summary["method"]) == {"frozen", "frozen_wsum", "lora_r4"}
    assert (summary["n_folds"] == 2).all() and summary["uar_ci_low"].notna().all()


DECLARED = {
    "dora_r4": {"kind": "dora", "rank": 4},
    "lora_wide_r2": {
        "kind": "lora",
        "rank": 2,
        "targets": ["q_proj", "fc1"],
        "layers": "last_half",
    },
    "full": {"kind": "full", "lr": 1e-4},
}


#: The analysis tables the declared-methods run checks.
DECLARED_TABLES = ("contributions", "logit_lens", "probing", "cka", "causal", "svd", "ab_dynamics")


def test_declared_methods_run_with_every_analysis_that_applies(tmp_path):
    """DoRA, LoRA on other modules of some layers and full fine-tuning, end to end: each is
    in the performance table and has exactly the analyses that apply to its kind."""
    config = small_config(
        tmp_path,
        folds={"run": [1]},
        methods=DECLARED,
        train={"keep_full_weights": False},
        analysis={"causal_stride": 4},  # the last layer only: what applies, not the curve
    )
    results = tmp_path / "results/synthetic"
    tables = ["performance", *DECLARED_TABLES]
    # the tables only (the figures of every method are tests/test_figures_methods.py's)
    snakemake(tmp_path, config, "--", *(str(results / f"tables/{name}.tsv") for name in tables))
    performance = pd.read_csv(results / "tables/performance.tsv", sep="\t")
    assert set(performance.method) == {"frozen", "frozen_wsum", "lora_r4", *DECLARED}
    analysis = results / "analysis/tiny.en"
    applies = {
        "contributions": set(DECLARED),
        "logit_lens": set(DECLARED),
        "probing": set(DECLARED),
        "cka": set(DECLARED),
        "causal": set(DECLARED),
        "svd": set(DECLARED),
        "ab_dynamics": {"dora_r4", "lora_wide_r2"},
    }
    for name, methods in applies.items():
        table = pd.read_csv(results / f"tables/{name}.tsv", sep="\t")
        assert methods <= set(table.method), (name, set(table.method))
        for method in set(DECLARED) - methods:
            assert not (analysis / f"{method}/seed0/fold1/{name}.tsv").exists(), (name, method)
    # the subspace similarity compares the short-form ranks only; A/B never sees full
    assert not (analysis / "full/seed0/fold1/ab_dynamics.tsv").exists()
    # full fine-tuning: its encoder weights are dropped once read, its update is kept
    run = results / "train/tiny.en/full/seed0/fold1"
    assert (run / "delta.safetensors").is_file() and not (run / "encoder.safetensors").exists()
    causal = pd.read_csv(analysis / "full/seed0/fold1/causal.tsv", sep="\t")
    share = causal[(causal["quantity"] == "share") & (causal["family"] == "reference")]
    on = share[share["variant"] == "on"]
    assert (on["value"] * on["n_utts"]).sum() / on["n_utts"].sum() == pytest.approx(1.0)
    assert "ab_swap" not in set(causal["family"])  # no factors to swap
    wide = pd.read_csv(analysis / "lora_wide_r2/seed0/fold1/svd.tsv", sep="\t")
    assert {"q_proj", "fc1"} <= {str(m).split(".")[-1] for m in wide["module"]}
    # a declared method's training reads exactly the settings its rule passes
    from serlens.analysis.registry import Settings
    from serlens.methods import configured_methods
    from serlens.paths import Paths
    from serlens.steps import train_run

    effective = effective_config(config)
    paths, methods = Paths(effective["results"]), configured_methods(effective)
    for name in ("full", "lora_wide_r2"):
        passed = {
            "classes": effective["corpus"]["classes"],
            **methods[name].train_settings(effective),
        }
        settings = Settings(
            name, {k: Settings(k, v) if isinstance(v, dict) else v for k, v in passed.items()}
        )
        train_run(
            settings,
            model="tiny.en",
            method=name,
            seed=0,
            fold=1,
            manifest_path=paths.corpus("synthetic", "manifest.tsv"),
            folds_path=paths.corpus("synthetic", "folds.tsv"),
            weights_json=paths.weights("tiny.en"),
            out_dir=tmp_path / name,
            checkpoints=tmp_path / f"checkpoints-{name}",
        )
        assert_read_exactly(settings)
