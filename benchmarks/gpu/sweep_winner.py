"""Launch-configuration sweep of the winner-GEMM backward at the training shape (one GPU process).

Session 3 (H200, runs 4-5 in benchmarks/results/gpu-nvidia-h200/session3/) ran an earlier form of
this script that also timed a padded-layout path (row offsets computed instead of loaded; removed since,
it was no faster); no variant was reliably faster than the configuration kept as the default (all
1.69-2.05 ms, late-interaction-kernels 1.77 ms).

Each variant runs the full ``alignment_scores`` forward + backward (bf16 unit vectors, 128 x 128, W=32,
R=36, D=1024, upstream = logsumexp over images) with its tile overrides; gradients are checked against
the default configuration. late-interaction-kernels (when installed) is timed in the same process.

    python benchmarks/gpu/sweep_winner.py [--out sweep.json]
"""
from __future__ import annotations

import argparse
import json

import torch
from bench_gpu import save_sweep  # (this folder: the script's own directory is on sys.path)
from triton.testing import do_bench

import aladin_fast
from aladin_fast.kernels import alignment_winner_gemm as winner

VARIANTS = [
    ("default", {}),
    ("IMGS=2", {"IMGS": 2}),
    ("IMAGE_CAPS=4, IMAGE_BLOCK_D=128", {"IMAGE_CAPS": 4, "IMAGE_BLOCK_D": 128}),
    ("IMGS=2, IMAGE_CAPS=4, IMAGE_BLOCK_D=128", {"IMGS": 2, "IMAGE_CAPS": 4, "IMAGE_BLOCK_D": 128}),
    ("TEXT_CAPS=2, IMGS=2", {"TEXT_CAPS": 2, "IMGS": 2}),
    ("IMGS=2, num_stages=4", {"IMGS": 2, "num_stages": 4}),
    ("IMAGE_BLOCK_D=128", {"IMAGE_BLOCK_D": 128}),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(128, 32, 1024, device="cuda", generator=gen), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(128, 36, 1024, device="cuda", generator=gen), dim=-1)
    text, images = text.bfloat16().requires_grad_(), images.bfloat16().requires_grad_()
    original_config = winner.winner_gemm_config

    def step(fn=lambda t, v: aladin_fast.alignment_scores(t, v, backend="triton")):
        text.grad = images.grad = None
        fn(text, images).float().logsumexp(1).sum().backward()

    rows, reference = [], None
    for name, override in VARIANTS:
        winner.winner_gemm_config = lambda override_=override, **kw: original_config(
            **{**kw, "override": {**(kw.get("override") or {}), **override_}})
        try:
            step()
            grads = (text.grad.float().clone(), images.grad.float().clone())
            if reference is None:
                reference = grads
            error = max((a - b).abs().max().item() for a, b in zip(grads, reference))
            ms = do_bench(step, warmup=25, rep=200)
            row = dict(variant=name, override=override, fwd_bwd_ms=ms, max_abs_diff_vs_default=error)
        except Exception as err:  # noqa: BLE001
            row = dict(variant=name, override=override, error=f"{type(err).__name__}: {err}"[:300])
        finally:
            winner.winner_gemm_config = original_config
        rows.append(row)
        print(json.dumps(row), flush=True)
    try:
        import late_interaction_kernels as lik

        step(lambda t, v: lik.maxsim(t, v))
        rows.append(dict(variant="late-interaction-kernels", fwd_bwd_ms=do_bench(
            lambda: step(lambda t, v: lik.maxsim(t, v)), warmup=25, rep=200)))
        print(json.dumps(rows[-1]), flush=True)
    except Exception as err:  # noqa: BLE001
        print("late-interaction-kernels unavailable:", err)
    save_sweep(args.out, rows)


if __name__ == "__main__":
    main()
