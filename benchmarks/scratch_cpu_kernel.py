"""Scratch timing of the raw C++ CPU kernel (aladin_fast._C.score) vs torch.

For each case it reports GFLOP/s (2*W*R*D per pair, valid counts) of the kernel,
of the torch matmul-reshape formulation, of torch.mm on a 2048^2 sgemm and the
raw FMA peak (_C.fma_peak), all in the same process.  The machine may be shared
with other jobs, so every quantity is sampled in several interleaved rounds and
the best sample of each is kept (ratios of best samples approximate an idle
machine).
    python benchmarks/scratch_cpu_kernel.py [--rounds N] [case ...]
"""
import argparse
import time

import numpy as np
import torch

from aladin_fast import _C

NT = 2
torch.set_num_threads(NT)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make(nt, ni, W, R, D, dtype, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(nt * W, D, generator=g)
    images = torch.randn(ni * R, D, generator=g)
    if dtype == "bfloat16":
        tk = text.bfloat16().view(torch.int16).numpy().view(np.uint16)
        ik = images.bfloat16().view(torch.int16).numpy().view(np.uint16)
    elif dtype == "float16":
        tk, ik = text.half().numpy(), images.half().numpy()
    else:
        tk, ik = text.numpy(), images.numpy()
    toff = np.arange(nt, dtype=np.int64) * W
    ioff = np.arange(ni, dtype=np.int64) * R
    tlen = np.full(nt, W, np.int32)
    ilen = np.full(ni, R, np.int32)
    cand = None
    if k == "paired":
        cand = np.arange(nt, dtype=np.int64)[:, None].copy()
        k = 1
    elif k is not None:
        cand = np.stack([np.random.default_rng(seed + i).permutation(ni)[:k] for i in range(nt)]).astype(np.int64)
    out = np.zeros((nt, k if k is not None else ni), np.float32)
    args = (tk, toff, tlen, ik, ioff, ilen, cand, dtype, 0, False, W, R, out, None)
    return args, text, images, cand


def torch_formulation(text, images, nt, W, R, D, cand):
    if cand is not None and cand.shape[1] == 1:  # paired: batched bmm
        t, v = text.view(nt, W, D), images.view(nt, R, D)
        return lambda: torch.bmm(t, v.transpose(1, 2)).amax(-1).sum(-1)
    if cand is None:  # all pairs: one big mm, reshape, max over regions, sum over words
        return lambda: (text @ images.T).view(nt, W, -1, R).amax(-1).sum(1)
    t = text.view(nt, W, D)
    imgs = images.view(-1, R, D)

    def f():
        for i in range(nt):
            g = imgs[torch.from_numpy(cand[i])].reshape(-1, D)
            (t[i] @ g.T).view(W, -1, R).amax(-1).sum(0)

    return f


CASES = {
    "rerank_W32_R36_D1024_K1000_f32": dict(nt=1, ni=1000, W=32, R=36, D=1024, k=1000, dtype="float32"),
    "rerank_W32_R36_D1024_K1000_bf16": dict(nt=1, ni=1000, W=32, R=36, D=1024, k=1000, dtype="bfloat16"),
    "rerank_W20_R36_D768_K5000_f32": dict(nt=1, ni=5000, W=20, R=36, D=768, k=5000, dtype="float32"),
    "rerank_W20_R36_D768_K5000_bf16": dict(nt=1, ni=5000, W=20, R=36, D=768, k=5000, dtype="bfloat16"),
    "rerank_W4_R36_D768_K5000_f32": dict(nt=1, ni=5000, W=4, R=36, D=768, k=5000, dtype="float32"),
    "rerank_W4_R36_D768_K5000_bf16": dict(nt=1, ni=5000, W=4, R=36, D=768, k=5000, dtype="bfloat16"),
    "paired_1000_W32_R36_D1024_f32": dict(nt=1000, ni=1000, W=32, R=36, D=1024, k="paired", dtype="float32"),
    "allpairs_128x128_W32_R36_D1024_f32": dict(nt=128, ni=128, W=32, R=36, D=1024, k=None, dtype="float32"),
    "allpairs_128x128_W32_R36_D1024_bf16": dict(nt=128, ni=128, W=32, R=36, D=1024, k=None, dtype="bfloat16"),
    # fast-maxsim's own shape (ColBERT-like: 1 query x 3,000 documents of 300 tokens, D=128)
    "maxsim_Lq32_Ld300_D128_N3000_f32": dict(nt=1, ni=3000, W=32, R=300, D=128, k=None, dtype="float32"),
    "maxsim_Lq32_Ld300_D128_N3000_bf16": dict(nt=1, ni=3000, W=32, R=300, D=128, k=None, dtype="bfloat16"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("cases", nargs="*")
    opt = ap.parse_args()
    names = opt.cases or list(CASES)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    print(f"isa={opt.isa} (best {_C.best_isa()}) threads={NT}")
    for name in names:
        c = CASES[name]
        args, text, images, cand = make(c["nt"], c["ni"], c["W"], c["R"], c["D"], c["dtype"], c["k"])
        pairs = c["nt"] * (1 if c["k"] == "paired" else c["k"] if c["k"] is not None else c["ni"])
        flop = 2.0 * c["W"] * c["R"] * c["D"] * pairs
        kern = lambda: _C.score(*args, isa=opt.isa, num_threads=NT)
        tt_, it_ = (text.bfloat16(), images.bfloat16()) if c["dtype"] == "bfloat16" else (text, images)
        tf = torch_formulation(tt_, it_, c["nt"], c["W"], c["R"], c["D"], cand)
        kern(), tf(), torch.mm(a, b)
        best = dict(kernel=0.0, torch=0.0, sgemm=0.0, peak=0.0)
        for _ in range(opt.rounds):
            best["peak"] = max(best["peak"], _C.fma_peak(opt.isa, NT, 0.1))
            best["sgemm"] = max(best["sgemm"], 2 * 2048**3 / timed(lambda: torch.mm(a, b)) / 1e9)
            for _ in range(2):
                best["kernel"] = max(best["kernel"], flop / timed(kern) / 1e9)
            best["torch"] = max(best["torch"], flop / timed(tf) / 1e9)
        bytes_img = c["R"] * c["D"] * (4 if c["dtype"] == "float32" else 2) * pairs
        gbs = best["kernel"] * 1e9 / flop * bytes_img / 1e9
        print(f"{name:38s} kernel {best['kernel']:6.1f} GFLOP/s ({gbs:4.1f} GB/s img)"
              f" | torch-reshape {best['torch']:6.1f} | sgemm2048 {best['sgemm']:6.1f} | FMA peak {best['peak']:6.1f}"
              f" | kernel/sgemm {best['kernel'] / best['sgemm']:4.2f} kernel/peak {best['kernel'] / best['peak']:4.2f}",
              flush=True)


if __name__ == "__main__":
    main()
