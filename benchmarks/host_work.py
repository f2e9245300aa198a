"""Host work of one training step on the Triton backend, counted with the kernels stubbed out (no GPU needed).

On a GPU the training-shape step (128 x 128, W=32, R=36) was host-bound (benchmarks/results/gpu-nvidia-h200/
SUMMARY.md): what the host does per step -- Python, torch ops (each a CUDA launch), Triton launches, syncs --
decides the wall time. This script runs the op under ``TRITON_INTERPRET=1`` on CPU tensors with every Triton
launch replaced by a no-op and counts, for the forward and the backward of ``alignment_scores`` separately:

* ``launches``: Triton kernel launches (by name);
* ``torch_ops``: aten ops that do work (views, detach and ``empty`` excluded), ``fills`` (zeros / full / fill)
  and ``syncs`` (ops that read a device value on the host: ``.item()``, ``torch.equal``, ``nonzero``, ...);
* ``python_us``: host time of forward + ``autograd.grad`` with stubbed kernels on tiny tensors (8 x 8
  sequences, W=32, R=36, D=16, so the CPU torch ops and fills cost next to nothing; best of ``--rounds``).
  Python and dispatch cost only: a real Triton launch and a CUDA launch per torch op come on top on a GPU
  machine.

Syncs are counted on CPU tensors: where a GPU backward reads a check its forward started (a
``FiniteCheck`` behind an event: the "dense" and "gemm" strategies), the CPU path syncs instead.

    python benchmarks/host_work.py [--out host_work.json] [--label HEAD]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels become InterpretedFunction objects

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import aladin_fast  # noqa: E402

NO_WORK = {"view", "detach", "empty", "unsqueeze", "expand", "alias", "_unsafe_view", "as_strided", "t",
           "transpose", "slice", "select", "squeeze", "permute"}
FILLS = {"zeros", "full", "fill_", "zero_", "ones", "new_zeros", "new_full", "zeros_like", "full_like"}
SYNCS = {"_local_scalar_dense", "equal", "nonzero", "is_nonzero", "item", "masked_select", "unique",
         "_unique2", "repeat_interleave"}
LAUNCHES = collections.Counter()


def _stub(self, grid):
    def launch(*args, **kwargs):
        LAUNCHES[self.fn.__name__] += 1
    return launch


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _summary(names, launches):
    work = [name for name in names if name not in NO_WORK]
    return dict(launches=dict(launches), torch_ops=len(work), ops=dict(collections.Counter(work)),
                fills=sum(name in FILLS for name in work), syncs=sum(name in SYNCS for name in work))


def measure(aggregation, dtype, rounds, steps, count=8, dim=16):
    text = torch.randn(count, 32, dim).to(dtype).requires_grad_()
    images = torch.randn(count, 36, dim).to(dtype).requires_grad_()

    def forward():
        return aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="triton")

    scores = forward()
    upstream = torch.ones_like(scores)
    torch.autograd.grad(scores, (text, images), upstream)  # warm caches
    LAUNCHES.clear()
    with _Ops() as forward_ops:
        scores = forward()
    forward_launches = dict(LAUNCHES)
    LAUNCHES.clear()
    with _Ops() as backward_ops:
        torch.autograd.grad(scores, (text, images), upstream)
    backward_launches = dict(LAUNCHES)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            torch.autograd.grad(forward(), (text, images), upstream)
        best = min(best, (time.perf_counter() - start) / steps * 1e6)
    return dict(aggregation=aggregation, dtype=str(dtype).replace("torch.", ""),
                forward=_summary(forward_ops.names, forward_launches),
                backward=_summary(backward_ops.names, backward_launches), python_us=best)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--label", default="", help="stored with the rows (e.g. a commit)")
    parser.add_argument("--aggregations", default="MrSw,MrAVGw,MwSr",
                        help="symm (\"gemm\") multiplies real torch.mm products here: its python_us is CPU compute")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    InterpretedFunction.__getitem__ = _stub
    torch.set_num_threads(1)
    rows = []
    for aggregation in args.aggregations.split(","):
        for dtype in (torch.bfloat16, torch.float32):
            row = measure(aggregation, dtype, args.rounds, args.steps)
            row["label"] = args.label
            rows.append(row)
            print(f"{args.label:>10s} {aggregation:6s} {row['dtype']:8s} python {row['python_us']:6.0f} us | "
                  + " | ".join(f"{phase}: {sum(row[phase]['launches'].values())} launches, "
                               f"{row[phase]['torch_ops']} torch ops ({row[phase]['fills']} fills), "
                               f"{row[phase]['syncs']} syncs" for phase in ("forward", "backward")), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
