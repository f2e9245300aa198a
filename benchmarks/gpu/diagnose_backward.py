"""Where the all-pairs backward's time goes on a GPU: GPU-busy time vs wall time vs host launch time.

Per configuration (backward strategy, workspace cap, with / without the backward's finiteness sync) at the
training shape (bf16 unit vectors, 128 x 128, W=32, R=36, upstream = logsumexp over images):
  * ``fwd_bwd_ms``: do_bench of one step, median (CUDA events; what the benchmarks report; session 5: mean);
  * ``gpu_busy_ms``: the sum of the step's CUDA kernel times (torch.profiler, mean over 10 steps);
  * ``host_ms``: host time per step of 30 un-synchronised steps (when the GPU is faster than the host,
    the step costs the host time; a sync inside the step makes host and GPU time meet);
  * the step's five costliest kernels.
``--assume-finite`` rows replace the finiteness check (one device sync per backward) with ``True``: a
measurement only, never a product setting (non-finite tokens need the fallback).

    python benchmarks/gpu/diagnose_backward.py [--out diag.json] [--configs dense,gemm:8,gemm:64,...]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from host_overhead import print_host_profile  # (this folder: the script's own directory is on sys.path)
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import aladin_fast
from aladin_fast.ops import alignment_op


def parse_config(text):
    """"gemm:8:nosync" -> ("gemm", 8.0, True); "dense" -> ("dense", None, False)."""
    parts = text.split(":")
    cap = float(parts[1]) if len(parts) > 1 and parts[1] else None
    return parts[0], cap, "nosync" in parts[2:]


def set_config(config, real_check):
    strategy, cap, nosync = parse_config(config)
    os.environ["ALADIN_FAST_TRITON_BACKWARD"] = strategy
    os.environ.pop("ALADIN_FAST_BACKWARD_WORKSPACE_MB", None)
    if cap is not None:
        os.environ["ALADIN_FAST_BACKWARD_WORKSPACE_MB"] = str(cap)
    alignment_op._tokens_finite = (lambda *args: True) if nosync else real_check


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--configs", default="auto,dense,dense::nosync,gemm:8,gemm:8:nosync,gemm:64,gemm:64:nosync,lik",
                        help="strategy[:workspace MiB[:nosync]], or lik (late-interaction-kernels, MrSw only)")
    parser.add_argument("--aggregations", default="MrSw")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--cprofile", default=None, help="a config whose 50 steps run under cProfile (host time)")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(128, 32, args.dim, device="cuda", generator=gen), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(128, 36, args.dim, device="cuda", generator=gen), dim=-1)
    text, images = text.bfloat16().requires_grad_(), images.bfloat16().requires_grad_()
    real_check = alignment_op._tokens_finite
    rows = []
    try:
        import late_interaction_kernels as lik
    except Exception:  # noqa: BLE001 - an optional baseline
        lik = None
    for aggregation in args.aggregations.split(","):
        def ours(t, v):
            return aladin_fast.alignment_scores(t, v, aggregation=aggregation, backend="triton")

        for config in args.configs.split(","):
            if config == "lik" and (lik is None or aggregation != "MrSw"):
                continue
            score = (lambda t, v: lik.maxsim(t, v)) if config == "lik" else ours

            def step():
                text.grad = images.grad = None
                score(text, images).float().logsumexp(1).sum().backward()
            set_config("auto" if config == "lik" else config, real_check)
            try:
                step()
                fwd_bwd = do_bench(step, warmup=25, rep=100, return_mode="median")
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(30):
                    step()
                host = (time.perf_counter() - start) / 30 * 1e3
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                kernels = sorted(((e.key, e.device_time_total / 10 / 1e3, e.count // 10)
                                  for e in prof.key_averages() if e.device_time_total > 0),
                                 key=lambda k: -k[1])
                busy = sum(ms for _, ms, _ in kernels)
                row = dict(aggregation=aggregation, config=config, fwd_bwd_ms=fwd_bwd, gpu_busy_ms=busy,
                           host_ms=host, kernels=[dict(name=n[:90], ms=ms, per_step=c) for n, ms, c in kernels[:8]])
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                row = dict(aggregation=aggregation, config=config, error=f"{type(err).__name__}: {err}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.cprofile:
            def step():
                text.grad = images.grad = None
                ours(text, images).float().logsumexp(1).sum().backward()
            set_config(args.cprofile, real_check)
            print_host_profile(step, steps=50, rows=40, chars=12000)
    alignment_op._tokens_finite = real_check
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
