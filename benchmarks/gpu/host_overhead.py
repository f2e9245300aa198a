"""Host-side cost of the training step's pieces on a GPU machine (no profiler: loops without syncs).

When the host is slower than the GPU, a loop of N un-synchronised calls takes N x host time per call.
    python benchmarks/gpu/host_overhead.py
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import time

import torch
import triton
import triton.language as tl

import aladin_fast


@triton.jit
def _noop(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / n * 1e6
    return host, total


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    # unit vectors, as in a trained model: scores spread little, so every pair gets upstream gradient
    text = torch.nn.functional.normalize(torch.randn(128, 32, 1024, device="cuda", generator=gen), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(128, 36, 1024, device="cuda", generator=gen), dim=-1)
    text, images = text.bfloat16().requires_grad_(), images.bfloat16().requires_grad_()
    small = torch.zeros(16, device="cuda")
    rows = {}
    rows["torch.full(128) cuda"] = per_call_us(lambda: torch.full((128,), 3, device="cuda"))
    rows["torch.zeros(4096x1024) cuda"] = per_call_us(lambda: torch.zeros(4096, 1024, device="cuda"))
    rows["x.add_(1) cuda"] = per_call_us(lambda: small.add_(1))
    rows["triton noop launch"] = per_call_us(lambda: _noop[(1,)](small, 16, BLOCK=16))
    with torch.no_grad():
        rows["forward no grad"] = per_call_us(lambda: aladin_fast.alignment_scores(text, images, backend="triton"))
    rows["forward with grad (argmax)"] = per_call_us(lambda: aladin_fast.alignment_scores(text, images,
                                                                                          backend="triton"))
    scores = aladin_fast.alignment_scores(text, images, backend="triton")
    upstream = torch.randn_like(scores)
    for strategy in ("dense", "segmented", "atomic"):
        os.environ["ALADIN_FAST_TRITON_BACKWARD"] = strategy
        rows[f"backward only ({strategy})"] = per_call_us(
            lambda: torch.autograd.grad(scores, (text, images), upstream, retain_graph=True))

        def step():
            text.grad = images.grad = None
            aladin_fast.alignment_scores(text, images, backend="triton").float().logsumexp(1).sum().backward()
        rows[f"fwd+bwd step ({strategy})"] = per_call_us(step)
    os.environ["ALADIN_FAST_TRITON_BACKWARD"] = "segmented"
    for name, (host, total) in rows.items():
        print(f"{name:36s} host {host:8.1f} us/call   with GPU {total:8.1f} us/call", flush=True)

    def step():
        text.grad = images.grad = None
        aladin_fast.alignment_scores(text, images, backend="triton").float().logsumexp(1).sum().backward()
    print_host_profile(step, steps=100, rows=35)


def print_host_profile(step, steps=100, rows=35, chars=9000):
    """cProfile of ``steps`` calls of ``step`` (after one warm call): the costliest functions by own and by
    cumulative host time."""
    step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumtime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(rows)
        print(stream.getvalue()[-chars:], flush=True)


if __name__ == "__main__":
    main()
