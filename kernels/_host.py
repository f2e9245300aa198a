"""Host-side integer helpers for launch configurations and grids.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in newer
Triton releases: a wrapper that unwraps every argument costs microseconds per
call, and each launch makes several. These are the same integer functions
without the wrapper (tests/test_triton_aot.py checks them against Triton's).
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 >= n (0 for n = 0, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()
