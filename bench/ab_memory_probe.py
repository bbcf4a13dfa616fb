"""Peak-memory probe of the A/B dynamics pass (used by bench_ab_memory.py; not part of the library)."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import numpy as np
import torch

from serlens.analysis.ab_dynamics import ab_dynamics_table, baseline_settings
from serlens.analysis.runs import TrainedRun, balanced_sample


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError as err:
        raise RuntimeError(
            f"/proc/self/statm: {err}; ab_memory_probe measures RSS on Linux only"
        ) from err


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_reader():
    """``() -> bytes`` the C heap has handed out (glibc ``mallinfo2``: uordblks + hblkhd), or None.

    Unlike RSS this ignores freed memory that glibc keeps, so it does not creep up with
    heap fragmentation over many differently sized batches. torch allocates CPU tensors
    with malloc, so they are counted.
    """
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return read


def _peak_memory(fn, poll_s: float) -> dict[str, float | None]:
    """Run ``fn()`` while polling; peak RSS and peak C-heap use above their values before it (MiB)."""
    gc.collect()
    heap = _heap_reader()
    readers = {"rss": _rss_bytes, **({"heap": heap} if heap is not None else {})}
    base = {k: read() for k, read in readers.items()}
    peak = dict(base)
    stop = threading.Event()

    def sample():
        for k, read in readers.items():
            peak[k] = max(peak[k], read())

    def poll():
        while not stop.is_set():
            sample()
            time.sleep(poll_s)

    poller = threading.Thread(target=poll, daemon=True)
    tic = time.perf_counter()
    poller.start()
    try:
        fn()
    finally:
        wall = time.perf_counter() - tic
        stop.set()
        poller.join()
    sample()
    out = {f"{k}_mb": (peak[k] - base[k]) / 2**20 for k in readers}
    out.setdefault("heap_mb", None)
    return {**out, "wall_s": wall}


def ab_memory_probe(
    run: TrainedRun, cfg: dict, seed: int, n_utterances: int, poll_s: float = 0.005
) -> dict:
    """Peak memory of the A/B dynamics on a balanced training sample of ``n_utterances``.

    For ``bench/``: run one size per fresh process. Waveforms are loaded first, then two
    calls are measured, polling every ``poll_s`` s both the RSS and the C heap in use
    (glibc ``mallinfo2``; torch's CPU tensors live there):

    * ``one_batch_peak_{rss,heap}_mb``: the analysis on the sample's ``batch_size`` longest
      clips alone, i.e. the largest batch plus the per-module accumulators;
    * ``peak_{rss,heap}_delta_mb``: then the analysis on the whole sample, above what the
      first call left. Streaming keeps the heap delta at about one batch whatever
      ``n_utterances``. The RSS delta creeps up with the number of batches because glibc
      keeps freed, fragmented heap (with ``MALLOC_MMAP_THRESHOLD_=65536`` in the
      environment it stays flat too).

    Also ``n_utterances`` (as sampled; fewer if a class runs out), ``n_frames`` (audio
    frames per pass), ``max_batch_frames`` (largest batch size x padded length),
    ``cuda_peak_mb`` (peak GPU allocation above the start of the whole-sample call, or
    None) and ``wall_s`` (of the whole-sample call). ``*_heap_*`` are None off glibc.
    """
    train = run.splits["train"]
    if train.waves is None:
        train.load()
    indices = balanced_sample(train.labels, n_utterances, seed)
    batch_size, fraction = cfg["batch_size"], cfg["energy_fraction"]
    baseline, init_std = baseline_settings(cfg)
    n_frames, max_batch_frames = 0, 0
    for _, batch in run.batches(train, batch_size, indices):
        n_frames += int(batch.frame_mask.sum())
        max_batch_frames = max(max_batch_frames, batch.frame_mask.numel())
    longest = indices[np.argsort(train.durations[indices], kind="stable")[-batch_size:]]
    one_batch = _peak_memory(
        lambda: ab_dynamics_table(run, longest, batch_size, fraction, baseline, seed, init_std),
        poll_s,
    )
    device = next(run.encoder.parameters()).device
    cuda_base = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    whole = _peak_memory(
        lambda: ab_dynamics_table(run, indices, batch_size, fraction, baseline, seed, init_std),
        poll_s,
    )
    cuda_peak = None
    if cuda_base is not None:
        cuda_peak = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20
    return {
        "n_utterances": int(len(indices)),
        "n_frames": n_frames,
        "max_batch_frames": max_batch_frames,
        "one_batch_peak_rss_mb": one_batch["rss_mb"],
        "one_batch_peak_heap_mb": one_batch["heap_mb"],
        "peak_rss_delta_mb": whole["rss_mb"],
        "peak_heap_delta_mb": whole["heap_mb"],
        "cuda_peak_mb": cuda_peak,
        "wall_s": whole["wall_s"],
    }
