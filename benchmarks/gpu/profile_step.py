"""Kernel-level breakdown of one training step on the GPU (torch.profiler): where fwd + bwd time goes.

    python benchmarks/gpu/profile_step.py [--aggregations MrSw,symm] [--strategies dense,segmented]
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import aladin_fast


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--aggregations", default="MrSw,symm")
    parser.add_argument("--strategies", default="dense,segmented")
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(128, 32, args.dim, device="cuda", generator=gen), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(128, 36, args.dim, device="cuda", generator=gen), dim=-1)
    text, images = text.bfloat16().requires_grad_(), images.bfloat16().requires_grad_()
    for aggregation in args.aggregations.split(","):
        def forward_grad():
            return aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="triton")

        def forward_nograd():
            with torch.no_grad():
                return aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="triton")
        print(f"{aggregation}: forward (no grad) {do_bench(forward_nograd):.3f} ms, "
              f"forward (grad, argmax) {do_bench(forward_grad):.3f} ms", flush=True)
        for strategy in args.strategies.split(","):
            os.environ["ALADIN_FAST_TRITON_BACKWARD"] = strategy

            def step():
                text.grad = images.grad = None
                forward_grad().float().logsumexp(1).sum().backward()
            print(f"{aggregation} {strategy}: fwd+bwd {do_bench(step):.3f} ms", flush=True)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60),
                  flush=True)


if __name__ == "__main__":
    main()
