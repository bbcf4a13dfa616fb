"""One GPU per job for local runs.

Snakemake's local executor counts a ``gpu`` resource (``--resources gpu=N`` caps how many
GPU jobs run at once) but does not tell a job *which* GPU is its own, so every job would
use ``cuda:0``. :func:`claim_gpu` picks a free GPU by taking a non-blocking exclusive
``flock`` on a per-GPU lock file, keeps the lock for the life of the process (the kernel
drops it when the process exits, however it exits) and restricts the process to that GPU
with ``CUDA_VISIBLE_DEVICES`` -- before torch initialises CUDA, which reads the variable
once. When every GPU is taken it waits, polling.

Which GPUs form the pool, in order of precedence:

1. ``pool`` (an argument), else ``SERLENS_GPUS="0,1,2"`` (empty: no GPU, claim nothing);
2. inside a SLURM job (``SLURM_JOB_ID`` set) nothing is claimed: SLURM already gave the
   job its GPUs and set ``CUDA_VISIBLE_DEVICES``;
3. ``CUDA_VISIBLE_DEVICES`` when set (``""`` or ``-1``: no GPU);
4. the GPUs ``nvidia-smi -L`` lists, else -- only for a CUDA build of torch without
   ``nvidia-smi`` -- ``torch.cuda.device_count()`` run in a child process, so that this
   process's CUDA is not initialised before ``CUDA_VISIBLE_DEVICES`` is set.

Lock files live in ``$SERLENS_GPU_LOCK_DIR``, default ``/tmp/serlens-gpu-locks-<uid>``
(``/tmp`` on purpose, not ``$TMPDIR``: every job on the machine must see the same files).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: (gpu id, open lock file) of this process's claim; the open file holds the lock.
_claim: tuple[str, object] | None = None


def lock_dir() -> Path:
    return Path(os.environ.get("SERLENS_GPU_LOCK_DIR") or f"/tmp/serlens-gpu-locks-{os.getuid()}")


def _split(ids: str) -> list[str]:
    return [part.strip() for part in ids.split(",") if part.strip()]


def _count_gpus() -> int:
    """How many GPUs this machine has, without initialising CUDA in this process."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return 0
        if out.returncode != 0:
            return 0
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    try:
        import torch  # importing torch does not initialise CUDA
    except ImportError:
        return 0
    if torch.version.cuda is None:  # a CPU build
        return 0
    # torch.cuda.device_count() would initialise the CUDA driver here, which fixes
    # CUDA_VISIBLE_DEVICES for the rest of the process: count in a child instead.
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def gpu_pool(pool: Iterable[str | int] | None = None) -> list[str]:
    """The GPU ids to choose from (see the module docstring); ``[]`` means claim nothing."""
    if pool is not None:
        return [str(gpu) for gpu in pool]
    if "SERLENS_GPUS" in os.environ:
        return _split(os.environ["SERLENS_GPUS"])
    if os.environ.get("SLURM_JOB_ID"):
        return []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        visible = _split(os.environ["CUDA_VISIBLE_DEVICES"])
        return [] if not visible or visible[0].startswith("-") else visible
    return [str(i) for i in range(_count_gpus())]


def _try_lock(path: Path):
    handle = open(path, "a+")  # noqa: SIM115 -- kept open: the open file holds the lock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def claim_gpu(
    pool: Iterable[str | int] | None = None,
    *,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> str | None:
    """Claim a free GPU for this process; return its id, or None when there is none to claim.

    Sets ``CUDA_VISIBLE_DEVICES`` to the claimed id (so the job sees it as ``cuda:0``) and
    holds its lock until the process exits. Calling it again returns the same id. When all
    GPUs of the pool are taken it logs once and polls every ``poll_s`` seconds; with
    ``timeout_s`` it raises :class:`TimeoutError` after that long.
    """
    global _claim
    if _claim is not None:
        return _claim[0]
    ids = gpu_pool(pool)
    if not ids:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning(
            "CUDA was initialised before claim_gpu(): CUDA_VISIBLE_DEVICES cannot take effect"
        )
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    waiting_logged = False
    while True:
        for gpu in ids:
            handle = _try_lock(directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock")
            if handle is not None:
                _claim = (gpu, handle)
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                if waiting_logged:
                    log.info(
                        "GPU %s is free after %.0f s; claimed it", gpu, time.monotonic() - started
                    )
                else:
                    log.info("claimed GPU %s (lock in %s)", gpu, directory)
                return gpu
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            raise TimeoutError(
                f"no free GPU among {','.join(ids)} after {timeout_s} s (locks in {directory})"
            )
        if not waiting_logged:
            log.info(
                "all GPUs (%s) are in use by other jobs; waiting for one (locks in %s)",
                ",".join(ids),
                directory,
            )
            waiting_logged = True
        time.sleep(poll_s)
