"""Shared test helpers: input generators and dtype-scaled tolerances."""
from __future__ import annotations

import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")
PADDINGS = ("neg_inf", "zero")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def make_tokens(generator, count, length, dim, *, unit=True, min_length=0):
    """Random token features [count, length, dim] (unit vectors) and lengths in [min_length, length]."""
    tokens = torch.randn(count, length, dim, generator=generator, dtype=torch.float64)
    if unit:
        tokens = torch.nn.functional.normalize(tokens, dim=-1)
    if length == 0:
        lengths = torch.zeros(count, dtype=torch.int64)
    else:
        lengths = torch.randint(min_length, length + 1, (count,), generator=generator)
        if count >= 2:
            lengths[0] = length  # always one full row
            lengths[-1] = min_length  # and one shortest row
    # garbage in padding: kernels must never read it
    positions = torch.arange(length)[None, :, None]
    tokens = torch.where(positions < lengths[:, None, None], tokens, torch.full_like(tokens, 1e3))
    return tokens, lengths


def fp32_tolerance(dim: int, words: int, regions: int, magnitude: float = 1.0) -> float:
    """Absolute error allowed for fp32 accumulation of unit-vector dot products summed over tokens."""
    return 4e-6 * math.sqrt(max(dim, 1)) * (words + regions + 1) * magnitude


def low_precision_tolerance(reference_fn, text, images, dtype, base_tolerance):
    """At most 2x the error of plain PyTorch doing the same computation in ``dtype`` (plus an fp32 floor).

    ``reference_fn(text, images, compute_dtype)`` computes the same scores from
    the rounded inputs; run with compute dtype ``dtype`` it is plain PyTorch in
    low precision, with float64 it is the oracle.
    """
    exact = reference_fn(text.double(), images.double())
    low = reference_fn(text.to(dtype), images.to(dtype), low_precision=True)
    torch_error = (low.double() - exact).abs().nan_to_num(0).max().item() if exact.numel() else 0.0
    return 2.0 * torch_error + base_tolerance
