"""Host-side integer helpers for launch configurations and grids.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in newer
Triton releases: a wrapper that unwraps every argument costs microseconds per
call, and each launch makes several. These are the same integer functions
without the wrapper (tests/test_triton_aot.py checks them against Triton's).
"""
from __future__ import annotations

import functools
import types


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 >= n (0 for n = 0, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def cached_config(fn):
    """Memoise a launch-configuration function of hashable arguments (ints, bools) for calls without an
    ``override``: configurations are pure functions of their arguments, and every launch asks for one
    (microseconds of Python each, per training step). Dict results come back as read-only views."""
    cached = functools.lru_cache(maxsize=1024)(lambda *args, **kwargs: _frozen(fn(*args, **kwargs)))

    @functools.wraps(fn)
    def config(*args, override=None, **kwargs):
        if override:
            return fn(*args, override=override, **kwargs)
        return cached(*args, **kwargs)

    config.cache_clear = cached.cache_clear
    return config


def _frozen(value):
    return types.MappingProxyType(value) if isinstance(value, dict) else value
