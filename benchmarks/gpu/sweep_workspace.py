"""Workspace-cap sweep of the "gemm" backward at the training shape (one GPU process, about a minute).

Per aggregation (MrSw, MwSr, symm) and D (1024, 768), bf16 unit vectors, 128 x 128, W=32, R=36,
upstream = logsumexp over images: the forward alone, forward + backward with the default strategy,
with "segmented", and with "gemm" at each workspace cap (ALADIN_FAST_BACKWARD_WORKSPACE_MB in MiB);
plain torch (materialised similarity, max, autograd) and late-interaction-kernels (MrSw, when
installed) in the same process. Every "gemm" row's gradients are compared with the default strategy's
(max_abs_diff_vs_default); the backward's time is the row minus the forward row.

    python benchmarks/gpu/sweep_workspace.py [--out sweep.json] [--caps 4,8,16,32,64] [--dims 1024,768]
"""
from __future__ import annotations

import argparse
import json

import torch
from bench_gpu import plain_matmul, save_sweep, with_env  # (this folder: the script's own directory is on sys.path)
from triton.testing import do_bench

import aladin_fast

AGGREGATIONS = ("MrSw", "MwSr", "symm")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--caps", default="4,8,16,32,64", help="workspace caps in MiB")
    parser.add_argument("--dims", default="1024,768")
    args = parser.parse_args()
    caps = [float(cap) for cap in args.caps.split(",")]
    rows = []

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    def measure(name, fn, **fields):
        try:
            emit(variant=name, ms=do_bench(fn, warmup=25, rep=100), **fields)
        except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others
            emit(variant=name, error=f"{type(err).__name__}: {err}"[:300], **fields)

    try:
        import late_interaction_kernels as lik
    except Exception as err:  # noqa: BLE001
        lik = None
        print("late-interaction-kernels unavailable:", err)
    for dim in (int(d) for d in args.dims.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(dim)
        text = torch.nn.functional.normalize(torch.randn(128, 32, dim, device="cuda", generator=gen), dim=-1)
        images = torch.nn.functional.normalize(torch.randn(128, 36, dim, device="cuda", generator=gen), dim=-1)
        text, images = text.bfloat16().requires_grad_(), images.bfloat16().requires_grad_()

        def step(fn):
            def run():
                text.grad = images.grad = None
                fn(text, images).float().logsumexp(1).sum().backward()
            return run

        for aggregation in AGGREGATIONS:
            def ours(t, v, aggregation=aggregation):
                return aladin_fast.alignment_scores(t, v, aggregation=aggregation, backend="triton")
            shape = dict(dim=dim, aggregation=aggregation)
            with torch.no_grad():
                measure("forward", lambda: ours(text, images), **shape)
            step(ours)()
            reference = (text.grad.float().clone(), images.grad.float().clone())
            measure("fwd_bwd default", step(ours), **shape)
            measure("fwd_bwd segmented", with_env({"ALADIN_FAST_TRITON_BACKWARD": "segmented"}, step(ours)), **shape)
            for cap in caps:
                run = with_env({"ALADIN_FAST_TRITON_BACKWARD": "gemm", "ALADIN_FAST_BACKWARD_WORKSPACE_MB": str(cap)},
                               step(ours))
                try:
                    run()
                    error = max((a.float() - b).abs().max().item()
                                for a, b in zip((text.grad, images.grad), reference))
                except Exception as err:  # noqa: BLE001
                    emit(variant=f"fwd_bwd gemm {cap:g} MiB", error=f"{type(err).__name__}: {err}"[:300], **shape)
                    continue
                measure(f"fwd_bwd gemm {cap:g} MiB", run, workspace_mib=cap, max_abs_diff_vs_default=error, **shape)
        measure("fwd_bwd plain torch", step(plain_matmul), dim=dim, aggregation="MrSw")
        if lik is not None:
            measure("fwd_bwd late-interaction-kernels", step(lambda t, v: lik.maxsim(t, v)), dim=dim,
                    aggregation="MrSw")
    save_sweep(args.out, rows)


if __name__ == "__main__":
    main()
