"""Backend availability probes and the backend choice for one call.

Optional backends are imported lazily and each probe says why a backend cannot
run. ``backend="auto"`` picks triton for CUDA tensors, the C++ kernel for CPU
tensors, and the reference otherwise; an explicitly requested backend that
cannot run raises ``RuntimeError`` and never falls back silently.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")


# the probes' results, filled at the first call: a plain dict, not functools.lru_cache, which torch.compile
# warns about ("Dynamo ignores the cache wrapper") in every graph that picks a backend
_PROBED: dict = {}


def _probe_cpu_extension():
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as err:
        return None, f"C++ extension aladin_fast._C is not built ({err}); reinstall with `pip install -e .`"
    return _C, None


def _probe_triton():
    try:
        import triton  # noqa: F401  (availability probe)

        from .. import kernels
    except ImportError as err:
        return None, f"triton is not importable ({err})"
    return kernels, None


def _cpu_extension():
    """Return ``(module, None)`` or ``(None, reason)`` for the C++ extension."""
    if "cpu" not in _PROBED:
        _PROBED["cpu"] = _probe_cpu_extension()
    return _PROBED["cpu"]


def _triton_module():
    """Return ``(aladin_fast.kernels, None)`` or ``(None, reason)`` for the Triton kernels."""
    if "triton" not in _PROBED:
        _PROBED["triton"] = _probe_triton()
    return _PROBED["triton"]


# the values triton's own getenv_bool reads as true (triton.knobs: TRITON_INTERPRET=true turns its interpreter on)
_TRUE_WORDS = ("1", "true", "yes", "on", "y")


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for triton's CPU interpreter, read as triton reads it (``1``, ``true``,
    ``yes``, ``on``, ``y``, any case): accepting only "1" refused ``backend='triton'`` while triton itself
    interpreted."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE_WORDS


def cpu_kernels():
    module, reason = _cpu_extension()
    if module is None:
        raise RuntimeError(f"backend='cpu' is unavailable: {reason}")
    return module


def triton_kernels():
    module, reason = _triton_module()
    if module is None:
        raise RuntimeError(f"backend='triton' is unavailable: {reason}")
    return module


def cpu_unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the C++ kernel runs on CPU tensors, got tensors on {device}; move them with .cpu() or use backend='triton'"
    return _cpu_extension()[1]


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    reason = _triton_module()[1]
    if reason:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return (
        f"Triton kernels run on CUDA tensors, got tensors on {device} "
        "(set TRITON_INTERPRET=1 before importing triton to run them on CPU in the interpreter)"
    )


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Return the concrete backend ('triton' | 'cpu' | 'reference') for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return backend
    if dtype == torch.float64:
        if backend == "auto":
            return "reference"
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 inputs, got float64; use backend='reference'")
    if backend == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        if device.type == "cpu" and cpu_unavailable_reason(device) is None:
            return "cpu"
        return "reference"
    reason = cpu_unavailable_reason(device) if backend == "cpu" else triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
    return backend
