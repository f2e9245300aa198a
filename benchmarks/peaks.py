"""The machine's ceilings, measured in the benchmark run itself (a shared machine changes them).

* raw fp32 FMA peak of the code path the kernel uses (``_C.fma_peak``),
* streaming-read memory bandwidth (``_C.read_bandwidth``, a buffer far larger than the LLC),
* torch.mm sgemm on ``GEMM_SIZE``-square matrices (the practical GEMM rate).

Each is the best of a few short trials: load from other jobs only ever lowers a peak.
"""
from __future__ import annotations

import os
import time

import torch

from shapes import GEMM_SIZE

_CACHE: dict = {}


def sgemm_gflops(size: int, trials: int = 3) -> float:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def measure_peaks(quick: bool = False, threads: int | None = None) -> dict:
    """fma_peak_gflops, read_bandwidth_gbs, sgemm_gflops (+ how they were measured).

    ``quick``: tiny probes (smoke runs; the values are then meaningless). Cached per process.
    """
    threads = threads or torch.get_num_threads()
    key = (quick, threads)
    if key in _CACHE:
        return _CACHE[key]
    from aladin_fast import _C

    seconds, trials = (0.01, 1) if quick else (0.3, 3)
    buffer_bytes = (16 << 20) if quick else (512 << 20)
    peaks = {
        "fma_peak_gflops": max(_C.fma_peak("auto", threads, seconds) for _ in range(trials)),
        "read_bandwidth_gbs": max(_C.read_bandwidth(buffer_bytes, threads, seconds) for _ in range(trials)),
        "sgemm_gflops": sgemm_gflops(256 if quick else GEMM_SIZE, trials),
        "peak_probe": {
            "isa": _C.best_isa(), "isa_env": os.environ.get("ALADIN_FAST_ISA", ""), "threads": threads, "seconds": seconds, "trials": trials,
            "bandwidth_buffer_bytes": buffer_bytes, "sgemm_size": 256 if quick else GEMM_SIZE, "quick": quick,
            "torch": torch.__version__,
        },
    }
    _CACHE[key] = peaks
    return peaks
