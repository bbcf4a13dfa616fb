"""The workflow through a real SLURM (profiles/slurm) gives the same outputs as a local run.

A one-node cluster is started by tests/slurm/start-cluster.sh for this module and stopped at
teardown. The SLURM run uses the workflow profile exactly as a user would
(`snakemake --executor slurm --workflow-profile profiles/slurm`) plus command-line options
that only this throwaway cluster needs -- command-line values win over the profile:

- `--slurm-status-command squeue`: the test cluster has no accounting, so `sacct` fails;
- `--slurm-init-seconds-before-status-checks 2 --seconds-between-status-checks 2`: short jobs;
- `--set-threads features=1 train_lora=1 pass_base=1 pass_run=1`: the node has few CPUs (the profile asks 4), and
  the local run of the same slice (`--cores 2`) uses 1 thread for them as well;
- `--jobs 2 --retries 0 --latency-wait 5`, `--slurm-logdir` in the test's tmp directory and
  `--slurm-keep-successful-logs`, so the job logs can be shown when something fails.

The slice: synthetic corpus (4 utterances per speaker), fold 1, the frozen run and the LoRA
rank-4 run of tiny.en, 1 LoRA epoch. The local run goes at the same time (the SLURM run
mostly waits on status checks) into its own `results`/`resources_dir`.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import small_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "slurm"
pytestmark = pytest.mark.slurm

START_TIMEOUT_S = 600  # may apt-get install slurm + munge on a fresh root machine
RUN_TIMEOUT_S = 900
RUNS = [
    "synthetic/train/tiny.en/frozen/seed0/fold1/predictions.tsv",
    "synthetic/train/tiny.en/frozen_wsum/seed0/fold1/predictions.tsv",
    "synthetic/train/tiny.en/lora_r4/seed0/fold1/predictions.tsv",
]
# A LoRA run's analyses go through the run's encoder pass (a GPU job on a cluster).
TARGETS = [*RUNS, "synthetic/analysis/tiny.en/lora_r4/seed0/fold1/cka.tsv"]


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as error:
        return f"<unreadable: {error}>"


@pytest.fixture(scope="module")
def cluster():
    """A running test cluster; yields the environment (SLURM_CONF, PATH with the srun shim)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM test cluster runs on Linux only")
    # Short path: munged's socket lives under it (unix socket paths are limited to ~107 bytes).
    state = Path(tempfile.mkdtemp(prefix="serlens-slurm-"))
    started = None
    try:
        try:
            started = subprocess.run(
                [str(SCRIPTS / "start-cluster.sh"), str(state)],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"start-cluster.sh did not finish in {START_TIMEOUT_S} s:\n{error.stderr}")
        if started.returncode == 3:
            pytest.skip(f"no SLURM test cluster here: {started.stderr.strip()}")
        if started.returncode != 0 or "ready" not in started.stdout:
            logs = "\n".join(
                f"--- {log}\n{tail(log)}" for log in sorted((state / "log").glob("*.log"))
            )
            pytest.fail(
                f"start-cluster.sh failed (rc={started.returncode}):\n{started.stderr[-4000:]}\n{logs}"
            )
        dump = subprocess.run(
            ["bash", "-c", f'source "{state}/env.sh" && env -0'], capture_output=True, check=True
        ).stdout.decode()
        env = dict(item.split("=", 1) for item in dump.split("\0") if "=" in item)
        yield {"env": env, "state": state}
    finally:
        # Always stop (also after a partial start: the script stops only what it recorded).
        subprocess.run(
            [str(SCRIPTS / "stop-cluster.sh"), str(state)], capture_output=True, timeout=120
        )
        shutil.rmtree(state, ignore_errors=True)


def slice_config(tmp: Path, name: str) -> Path:
    config = small_config(
        tmp / name,
        folds={"run": [1]},
        model_resources={"default": {"mem_mb": 1500, "runtime": 10, "gpu": 0}},
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 -- closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", *args],
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, deadline: float) -> str | None:
    """Wait for a snakemake run until ``deadline``; None when it succeeded, else what went wrong."""
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return None if rc == 0 else f"exited with {rc}"
    except subprocess.TimeoutExpired:
        proc.terminate()  # snakemake cancels its SLURM jobs on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return f"timed out after {RUN_TIMEOUT_S} s"


def diagnostics(tmp: Path, cluster: dict) -> str:
    parts = []
    for log in [tmp / "slurm-run.log", tmp / "local-run.log"]:
        parts.append(f"===== {log.name} (tail)\n{tail(log, 80)}")
    # SLURM job logs (--slurm-logdir, instead of .snakemake/slurm_logs), then the rules' logs.
    for root in [
        tmp / "slurm_logs",
        tmp / "slurm" / "results" / "logs",
        tmp / "local" / "results" / "logs",
    ]:
        for log in sorted(root.glob("**/*.log")):
            parts.append(f"===== {log} (tail)\n{tail(log, 40)}")
    for log in sorted((cluster["state"] / "log").glob("*.log")):
        parts.append(f"===== {log} (tail)\n{tail(log, 20)}")
    squeue = subprocess.run(
        ["squeue", "-t", "all", "-o", "%i %j %T %r %M"],
        env=cluster["env"],
        capture_output=True,
        text=True,
    )
    parts.append(f"===== squeue -t all\n{squeue.stdout}{squeue.stderr}")
    return "\n".join(parts)


def test_slurm_run_matches_local_run(cluster, tmp_path):
    slurm_config, local_config = slice_config(tmp_path, "slurm"), slice_config(tmp_path, "local")
    slurm_results, local_results = tmp_path / "slurm" / "results", tmp_path / "local" / "results"
    t0 = time.monotonic()
    # Targets before --configfile (it takes several values).
    local = start(
        [
            *(str(local_results / t) for t in TARGETS),
            "--cores",
            "2",
            "--configfile",
            str(local_config),
        ],
        tmp_path / "local-run.log",
    )
    slurm = start(
        [
            *(str(slurm_results / t) for t in TARGETS),
            "--executor", "slurm",
            "--workflow-profile", "profiles/slurm",
            "--configfile", str(slurm_config),
            "--slurm-status-command", "squeue",
            "--slurm-init-seconds-before-status-checks", "2",
            "--seconds-between-status-checks", "2",
            "--set-threads", "features=1", "train_lora=1", "pass_base=1", "pass_run=1",
            "--jobs", "2",
            "--retries", "0",
            "--latency-wait", "5",
            "--slurm-logdir", str(tmp_path / "slurm_logs"),
            "--slurm-keep-successful-logs",
        ],
        tmp_path / "slurm-run.log",
        env=cluster["env"],
    )  # fmt: skip
    deadline = t0 + RUN_TIMEOUT_S
    slurm_error, local_error = finish(slurm, deadline), finish(local, deadline)
    elapsed = time.monotonic() - t0
    print(f"SLURM + local run: {elapsed:.0f} s")
    if slurm_error or local_error:
        pytest.fail(
            f"SLURM run: {slurm_error or 'ok'}; local run: {local_error or 'ok'} ({elapsed:.0f} s)\n"
            + diagnostics(tmp_path, cluster)
        )

    # Every job really went through SLURM, and found the venv's Python there.
    slurm_log = (tmp_path / "slurm-run.log").read_text()
    for rule in [
        "synth_corpus",
        "weights",
        "manifest",
        "folds",
        "features",
        "train_head",
        "train_lora",
        "pass_base",
        "pass_run",
        "cka",
    ]:
        logs = list((tmp_path / "slurm_logs" / f"rule_{rule}").glob("**/*.log"))
        assert logs or f"localrule {rule}:" in slurm_log, (
            f"{rule}: neither a SLURM job log nor a local job"
        )
    assert "has been submitted with SLURM jobid" in slurm_log

    def table(results: Path, name: str, resources: Path | None = None) -> pd.DataFrame:
        df = pd.read_csv(results / name, sep="\t")
        if resources is not None:  # absolute audio paths: compare them relative to resources_dir
            df["path"] = [str(Path(p).relative_to(resources)) for p in df["path"]]
        return df

    pd.testing.assert_frame_equal(
        table(slurm_results, "synthetic/corpus/manifest.tsv", tmp_path / "slurm" / "resources"),
        table(local_results, "synthetic/corpus/manifest.tsv", tmp_path / "local" / "resources"),
    )
    for name in ["synthetic/corpus/folds.tsv", "synthetic/corpus/summary.tsv"]:
        assert (slurm_results / name).read_bytes() == (local_results / name).read_bytes(), name
    for name in RUNS:
        on_slurm, here = table(slurm_results, name), table(local_results, name)
        assert list(on_slurm.columns) == list(here.columns), name
        assert len(on_slurm) > 0 and on_slurm[["utt_id", "label"]].equals(
            here[["utt_id", "label"]]
        ), name
        probs = [c for c in here.columns if c.startswith("p_")]
        assert probs, name
        pd.testing.assert_frame_equal(
            on_slurm[probs], here[probs], check_exact=False, atol=1e-5, rtol=0, obj=name
        )
        # predictions follow from the probabilities; allow a flip only on a near-tie
        differ = on_slurm["pred"] != here["pred"]
        if differ.any():
            top2 = here.loc[differ, probs].apply(
                lambda r: r.nlargest(2).diff().abs().iloc[-1], axis=1
            )
            assert (top2 < 1e-4).all(), (
                f"{name}: predictions differ beyond ties:\n{on_slurm[differ]}\n{here[differ]}"
            )
