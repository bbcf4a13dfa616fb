import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from serlens.config import validate_config
from serlens.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def default_config():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_default_config_is_valid_and_defaults_fill_in():
    config = validate_config(default_config())
    assert config["train"]["head_proj_size"] == 256
    assert config["significance"]["resamples"] >= 100
    empty = validate_config({})
    assert empty["corpus"]["classes"] == ["neu", "hap", "ang", "sad"]
    assert empty["corpus"]["merge"] == {"exc": "hap"}
    assert empty["models"] == {"tiny.en": "bundled:tiny.en"}


def test_numbers_that_arrive_as_strings_become_numbers_beside_keywords():
    """Snakemake's --config hands nested values over as strings: "4" is the stride 4, "auto"
    stays the keyword."""
    for given, expected in (("4", 4), ("auto", "auto")):
        config = validate_config({"analysis": {"causal_stride": given}})
        assert config["analysis"]["causal_stride"] == expected


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["audio"].update(input_policy="pad"),
            r"audio.input_policy: 'pad' is not allowed; allowed values: \['crop', 'pad30'\]",
        ),
        (
            lambda c: c["train"].update(epochz=3),
            r"config key train: unknown key\(s\) \['epochz'\]; allowed keys: \[.*'epochs'",
        ),
        (
            lambda c: c["train"].update(epochs="ten"),
            r"config key train.epochs: 'ten' is not of type 'integer'",
        ),
        (
            lambda c: c.setdefault("models", {}).update(base="openai/whisper-base"),
            r"config key models.base: weight source 'openai/whisper-base'",
        ),
        (
            lambda c: c["corpus"].update(kind="iemocap", root="/no/such/IEMOCAP"),
            r"corpus.root: '/no/such/IEMOCAP' does not exist",
        ),
        (lambda c: c["corpus"].update(kind="iemocap", root=None), r"corpus.root: must be set"),
        (
            lambda c: c["corpus"].update(merge={"exc": "joy"}),
            r"corpus.merge: target\(s\) \{'exc': 'joy'\}",
        ),
        (lambda c: c["folds"].update(run=[1, 6]), r"folds.run: fold\(s\) \[6\] do not exist"),
        (
            lambda c: c["model_resources"].update({"small": {"mem_mb": 9000}}),
            r"model_resources: unknown model key\(s\) \['small'\]",
        ),
        (lambda c: c.update(corpuss={}), r"unknown key\(s\) \['corpuss'\]"),
        (lambda c: c.update(seed=3), r"config key seed: replaced by seeds .*seeds: \[3\]"),
        (lambda c: c.update(seeds=[0, 0]), r"config key seeds: .*non-unique"),
        (lambda c: c.update(seeds=[]), r"config key seeds: .*"),
        (
            lambda c: c.setdefault("analysis", {}).update(causal_stride="every"),
            r"analysis.causal_stride: 'every' is not allowed; use an integer >= 1 or 'auto'",
        ),
    ],
)
def test_bad_config_names_the_key(edit, message):
    config = default_config()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_snakemake_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("audio:\n  input_policy: pad31\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--configfile",
            str(bad),
            "--directory",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert (
        "audio.input_policy: 'pad31' is not allowed; allowed values: ['crop', 'pad30']"
        in proc.stdout + proc.stderr
    )
    assert "Job stats" not in proc.stdout


def test_every_schema_key_has_a_description_and_a_default():
    from serlens.config import load_schema

    def walk(schema, path):
        for name, sub in schema.get("properties", {}).items():
            key = f"{path}{name}"
            assert sub.get("description"), f"{key} has no description"
            assert "default" in sub, f"{key} has no default"
            walk(sub, key + ".")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra.get("properties"):
            walk(extra, path + "<name>.")

    walk(load_schema(), "")


def test_conda_environment_matches_the_lock():
    env = yaml.safe_load((ROOT / "workflow/envs/serlens.yaml").read_text())
    pip = env["dependencies"][-1]["pip"]
    # serlens itself, from this checkout (the repository root, relative to the env file)
    assert pip[-1] == "../.." and (ROOT / "workflow/envs" / pip[-1] / "pyproject.toml").is_file()
    pins = dict(line.split("==") for line in pip[:-1])
    lock = dict(
        line.strip().split("==")
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name, version in pins.items():
        if name != "torch":  # torch is installed separately (Makefile TORCH_SPEC)
            assert lock.get(name) == version, (
                f"envs/serlens.yaml pins {name}=={version}, the lock has {lock.get(name)}"
            )


def test_paper_grid_builds_its_dag(tmp_path):
    from iemocap_tree import write_tree

    tree = write_tree(tmp_path / "IEMOCAP_full_release")
    root = tmp_path / "root.yaml"
    root.write_text(f"corpus:\n  root: {tree}\nresults: {tmp_path / 'results'}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--quiet",
            "rules",
            "--configfile",
            str(ROOT / "config/paper.yaml"),
            str(root),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    counts = {
        m[0]: int(m[1])
        for m in (line.split() for line in out.splitlines())
        if len(m) == 2 and m[1].isdigit()
    }
    # 5 models x (3 ranks | 2 heads) x 3 seeds x 5 folds: the seed dimension triples training
    assert (
        counts["train_lora"] == 5 * 3 * 3 * 5
        and counts["train_head"] == 5 * 2 * 3 * 5
        and counts["weights"] == 5
    )
    # one model load per run for all analyses: a pass per LoRA run, one base pass per model
    assert counts["pass_run"] == 225 and counts["pass_base"] == 5
    assert counts["svd"] == 225 and counts["probing"] == 5 * 4 * 3 * 5
    # the seed-to-seed floor: every seed but the first against the first, per LoRA run
    assert counts["seed_floor"] == 5 * 3 * 2 * 5
    # the causal tests of every LoRA run are computed in its pass, and one claims table
    assert counts["causal"] == 225 and counts["claims"] == 1


def test_config_readme_table_is_the_schema_s():
    from serlens.config import README_BEGIN, README_END, readme_table

    readme = (ROOT / "config/README.md").read_text()
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == readme_table(), "config/README.md is out of date: run `make config-readme`"


def test_config_readme_documents_every_schema_key():
    from serlens.config import load_schema

    readme = (ROOT / "config/README.md").read_text()

    def walk(schema, path):
        for name, sub in schema.get("properties", {}).items():
            key = f"{path}{name}"
            assert f"`{key}`" in readme, f"config/README.md does not document {key}"
            walk(sub, key + ".")

    walk(load_schema(), "")


def test_unknown_corpus_kind_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"corpus.kind: 'emodbx' is not a known corpus; allowed values"
    ):
        validate_config({"corpus": {"kind": "emodbx", "root": "/tmp"}})


def test_folds_come_from_the_data(tmp_path):
    from iemocap_tree import write_tree

    tree = write_tree(tmp_path / "IEMOCAP_full_release")
    sessions = sorted(p.name for p in tree.glob("Session*"))
    config = {
        "corpus": {"kind": "iemocap", "root": str(tree)},
        "folds": {"run": [len(sessions) + 1]},
    }
    with pytest.raises(ConfigError, match=rf"allowed values are 1..{len(sessions)}"):
        validate_config(config)


def test_schema_ships_as_package_data(tmp_path):
    """A non-editable install finds the schema inside the package and validates a config."""
    import shutil

    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("serlens-*.whl"))
    import zipfile

    assert "serlens/schemas/config.schema.yaml" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import serlens.config as c; c.validate_config({}); print(c.SCHEMA)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert str(target) in check.stdout


def test_numbers_given_as_strings_on_the_command_line_are_read_as_numbers():
    """``--config 'seeds=[0,1]'`` and nested ``--config`` values reach the config as strings."""
    config = validate_config(
        {"seeds": ["0", "1"], "corpus": {"synthetic": {"scripted_fraction": "0.25"}}}
    )
    assert config["seeds"] == [0, 1]
    assert config["corpus"]["synthetic"]["scripted_fraction"] == 0.25
    with pytest.raises(ConfigError, match=r"train.epochs: 'ten' is not of type 'integer'"):
        validate_config({"train": {"epochs": "ten"}})


def dry_run_plan(*args: str, cwd: Path) -> list[str]:
    """The sorted ``rule``/``output:`` lines of a dry run of the workflow (paths as planned)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--snakefile",
            str(ROOT / "workflow/Snakefile"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    return sorted(line for line in lines if re.match(r"^(\s+output:|rule |localrule )", line))


def test_the_short_form_plans_the_jobs_and_paths_it_always_did(tmp_path):
    """frozen, frozen_wsum and lora.ranks, without methods:, plan the default grid of before
    methods were declarable (tests/data/default_plan.txt), path for path."""
    golden = [
        line
        for line in (ROOT / "tests/data/default_plan.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    plan = dry_run_plan("--configfile", str(ROOT / "config/config.yaml"), cwd=tmp_path)
    assert plan == sorted(golden), "\n".join(sorted(set(plan) ^ set(golden))[:20])


def test_methods_grid_builds_its_dag(tmp_path):
    """config/methods.yaml: every method trains per fold, and each analysis runs on the
    methods of the kinds it applies to (README: its job counts)."""
    plan = dry_run_plan(
        "--configfile",
        str(ROOT / "config/config.yaml"),
        str(ROOT / "config/methods.yaml"),
        "--config",
        f"results={tmp_path / 'results'}",
        f"resources_dir={tmp_path / 'resources'}",
        cwd=tmp_path,
    )
    rules = Counter(line.split()[1].rstrip(":") for line in plan if not line.startswith(" "))
    folds = 2
    assert rules["train_head"] == 2 * folds  # frozen, frozen_wsum
    assert rules["train_lora"] == 5 * folds  # lora_r8, lora_all_r8, dora_r8, early, late
    assert rules["train_full"] == folds and rules["pass_full"] == folds
    assert rules["pass_run"] == 5 * folds
    # every encoder-trained method (6): its causal tests, CKA and weight-update spectra
    assert rules["causal"] == rules["cka"] == rules["svd"] == 6 * folds
    # A/B statistics: LoRA and DoRA (5), not full fine-tuning
    assert rules["ab_dynamics"] == 5 * folds
    # contributions, lenses, probes: the last-layer frozen head and the 6 others
    assert rules["probing"] == rules["logit_lens"] == 7 * folds
    assert "subspace" not in rules  # one short-form rank: nothing to compare across ranks


def test_protocol_gap_grid_trains_each_deviation_and_analyses_none(tmp_path):
    """config/protocol_gap.yaml: the honest LoRA and each deviation of the paper's training
    (prefix folds on the two dialog prefixes of fold 1); the deviations are tested only,
    never analysed (README: its job counts)."""
    plan = dry_run_plan(
        "--configfile",
        str(ROOT / "config/config.yaml"),
        str(ROOT / "config/protocol_gap.yaml"),
        "--config",
        f"results={tmp_path / 'results'}",
        f"resources_dir={tmp_path / 'resources'}",
        cwd=tmp_path,
    )
    rules = Counter(line.split()[1].rstrip(":") for line in plan if not line.startswith(" "))
    # lora_r8 (fold 1), pad30 (1), pad30_all_frames (1), prefix (folds 1, 2), paper (1, 2)
    assert rules["train_lora"] == 7
    assert rules["folds_prefix"] == 1 and rules["protocol_gap"] == 1
    assert rules["pass_run"] == 1 and rules["causal"] == 1  # lora_r8 only
    outputs = " ".join(line for line in plan if line.startswith(" "))
    assert "lora_r8_paper/seed0/fold2/" in outputs and "lora_r8_paper/seed0/fold3/" not in outputs
    assert "analysis/tiny.en/lora_r8_paper" not in outputs
