"""claim_gpu: one GPU per process from a pool, by file locks; nothing at all without GPUs."""

import os
import subprocess
import sys
import time

import pytest

from serlens import gpu

# A child that claims a GPU, prints "<id> <CUDA_VISIBLE_DEVICES> <cuda initialised>" and
# holds the claim until its stdin is closed.
HOLDER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from serlens.gpu import claim_gpu
got = claim_gpu(poll_s=0.1, timeout_s=float(sys.argv[1]))
import os, torch
print(got, os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), torch.cuda.is_initialized(), flush=True)
sys.stdin.read()
"""


def env_for(lock_dir, **extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SERLENS_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
    }
    env["SERLENS_GPU_LOCK_DIR"] = str(lock_dir)
    env.update(extra)
    return env


def holder(env, timeout_s=30.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(timeout_s)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    """The child's first stdout line, read without blocking past ``timeout``."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"no claim within {timeout} s; child stderr:\n{proc.communicate()[1]}")
    return proc.stdout.readline().split()


def release(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in ("SERLENS_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SERLENS_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setattr(gpu, "_claim", None)
    return tmp_path / "locks"


def test_two_processes_get_different_gpus_and_a_third_waits(tmp_path):
    env = env_for(tmp_path / "locks", SERLENS_GPUS="0,1")
    a, b = holder(env), holder(env)
    c = None
    try:
        line_a, line_b = first_line(a), first_line(b)
        assert {line_a[0], line_b[0]} == {"0", "1"}
        # each child sees only its own GPU, and claiming did not initialise CUDA
        assert line_a[1] == line_a[0] and line_b[1] == line_b[0]
        assert line_a[2] == line_b[2] == "False"

        c = holder(env)
        time.sleep(1.5)
        assert c.poll() is None, c.communicate()[1]  # still waiting: both GPUs are taken
        release(a)
        line_c = first_line(c, timeout=20)
        assert line_c[0] == line_a[0]  # the GPU the first one freed
    finally:
        for proc in (a, b, c):
            if proc is not None:
                release(proc)
    assert "waiting for one" in c.stderr.read()


def test_waiting_gives_up_after_timeout(tmp_path):
    env = env_for(tmp_path / "locks", SERLENS_GPUS="5")
    a = holder(env)
    try:
        assert first_line(a)[0] == "5"
        late = subprocess.run(
            [sys.executable, "-c", HOLDER, "0.5"],
            env=env,
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert late.returncode != 0 and "TimeoutError: no free GPU among 5" in late.stderr
    finally:
        release(a)


def test_claim_sets_visible_devices_and_is_idempotent(clean_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # restored by monkeypatch afterwards
    assert gpu.claim_gpu() == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert gpu.claim_gpu() == "2"
    assert (clean_env / "gpu-2.lock").read_text().strip() == str(os.getpid())
    gpu._claim[1].close()  # release, for the other tests of this process


def test_explicit_pool_argument_wins(clean_env, monkeypatch):
    monkeypatch.setenv("SERLENS_GPUS", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.claim_gpu(pool=[7]) == "7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    gpu._claim[1].close()


@pytest.mark.parametrize(
    "env",
    [
        {"CUDA_VISIBLE_DEVICES": ""},
        {"CUDA_VISIBLE_DEVICES": "-1"},
        {"SERLENS_GPUS": ""},
        {"SLURM_JOB_ID": "123", "CUDA_VISIBLE_DEVICES": "0"},  # SLURM already bound the GPU
    ],
)
def test_nothing_to_claim(clean_env, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(gpu, "_count_gpus", lambda: pytest.fail("must not count GPUs"))
    assert gpu.claim_gpu() is None
    assert {k: os.environ.get(k) for k in env} == env
    assert not clean_env.exists()


def test_no_gpu_machine_returns_none(clean_env, monkeypatch):
    monkeypatch.setattr(gpu, "_count_gpus", lambda: 0)
    assert gpu.claim_gpu() is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not clean_env.exists()


def test_counted_gpus_form_the_pool(clean_env, monkeypatch):
    monkeypatch.setattr(gpu, "_count_gpus", lambda: 2)
    assert gpu.gpu_pool() == ["0", "1"]


@pytest.mark.skipif(gpu._count_gpus() > 0, reason="this machine has a GPU")
def test_on_this_cpu_machine_nothing_is_claimed_and_cuda_untouched(tmp_path):
    code = "from serlens.gpu import claim_gpu; import torch; print(claim_gpu(), torch.cuda.is_initialized())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env_for(tmp_path / "locks"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]
    assert not (tmp_path / "locks").exists()
