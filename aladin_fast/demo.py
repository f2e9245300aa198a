"""A small scoring demo on synthetic features: backends agree, and how fast each is.

(The end-to-end train/distill/search pipeline replaces this in a later release.)
"""
from __future__ import annotations

import time

import torch

from .info import info
from .ops import alignment_scores, rerank_scores
from .ops.backends import resolve_backend


def _timed(fn, repeats: int = 3) -> tuple[float, object]:
    result = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _synthetic(generator, count, length, dim, dtype):
    tokens = torch.nn.functional.normalize(torch.randn(count, length, dim, generator=generator), dim=-1)
    lengths = torch.randint(1, length + 1, (count,), generator=generator)
    return tokens.to(dtype), lengths


def _torch_matmul_reshape(text, images, image_lengths, candidates):
    """The plain-PyTorch formulation a user would write (MrSw, full-length captions)."""
    gathered = images[candidates[0]]  # [K, R, D]
    k, r, d = gathered.shape
    sim = (text[0] @ gathered.reshape(k * r, d).T).reshape(-1, k, r)  # [W, K, R]
    valid = torch.arange(r)[None, :] < image_lengths[candidates[0]][:, None]
    sim = sim.masked_fill(~valid[None], float("-inf"))
    return sim.amax(dim=-1).sum(dim=0)[None]


def run_demo(quick: bool = False, seed: int = 0) -> None:
    info()
    generator = torch.Generator().manual_seed(seed)
    num_texts, num_images = (32, 128) if quick else (128, 500)
    words, regions, dim = 32, 36, 1024 if not quick else 256
    text, text_lengths = _synthetic(generator, num_texts, words, dim, torch.float32)
    images, image_lengths = _synthetic(generator, num_images, regions, dim, torch.float32)
    backend = resolve_backend("auto", text.device, text.dtype)
    print(f"\n== all pairs: {num_texts} captions x {num_images} images, W={words} R={regions} D={dim}, backend={backend}")
    elapsed, scores = _timed(lambda: alignment_scores(text, images, text_lengths, image_lengths), repeats=2)
    flops = 2.0 * text_lengths.sum().item() * image_lengths.sum().item() * dim
    print(f"scores[:3, :5] =\n{scores[:3, :5]}")
    print(f"time {elapsed * 1e3:.1f} ms, {flops / elapsed / 1e9:.1f} GFLOP/s (valid tokens)")
    subset = slice(0, 8)
    ref = alignment_scores(text[subset].double(), images.double(), text_lengths[subset], image_lengths, backend="reference")
    error = (scores[subset].double() - ref).abs().max().item()
    print(f"max |{backend} - float64 reference| on 8 captions: {error:.2e}")

    candidates_count = 1000 if not quick else 200
    query = text[:1]
    candidates = torch.randperm(num_images, generator=generator)[: min(candidates_count, num_images)][None]
    print(f"\n== rerank: 1 query x K={candidates.shape[1]} candidates (MrSw, full-length query)")
    ours, ours_scores = _timed(lambda: rerank_scores(query, images, candidates, None, image_lengths))
    eager, eager_scores = _timed(lambda: _torch_matmul_reshape(query, images, image_lengths, candidates))
    agree = torch.allclose(ours_scores, eager_scores, atol=1e-3, rtol=1e-4)
    print(f"aladin_fast ({backend}) {ours * 1e3:.2f} ms | torch matmul-reshape {eager * 1e3:.2f} ms | "
          f"speed-up {eager / ours:.2f}x | results agree: {agree}")
    top = torch.topk(ours_scores[0], 5)
    print(f"top-5 candidates: {candidates[0, top.indices].tolist()} scores {[round(v, 3) for v in top.values.tolist()]}")
