"""Backend availability probes and the backend choice for one call.

Optional backends are imported lazily and each probe says why a backend cannot
run. ``backend="auto"`` picks triton for CUDA tensors, the C++ kernel for CPU
tensors, and the reference otherwise; an explicitly requested backend that
cannot run raises ``RuntimeError`` and never falls back silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")


# the probes' results, filled at the first call: a plain dict, not functools.lru_cache, which torch.compile
# warns about ("Dynamo ignores the cache wrapper") in every graph that picks a backend
_PROBED: dict = {}


# what a source checkout that pip has not installed lacks: the compiled _C, and aladin_fast.kernels (setup.py maps
# the top-level kernels/ folder into the package, so that name exists only in an install, editable or not)
_INSTALL_HINT = "(re)install aladin-fast: `pip install .`, or `pip install -e .` in a source checkout (`make` does it)"


def warn_if_not_installed() -> None:
    """At import: warn when the compiled ``_C`` or ``aladin_fast.kernels`` cannot be found at all, i.e. the package
    is imported from a source tree that was never installed. Silently, ``backend="auto"`` ran the plain-PyTorch
    reference on CPU (tens of times slower) and only ``info`` or an explicit backend said why."""
    missing = [name for name in ("aladin_fast._C", "aladin_fast.kernels") if importlib.util.find_spec(name) is None]
    if missing:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        warnings.warn(f"aladin_fast imported from {package} has no {' and no '.join(missing)}: backend='auto' runs the "
                      f"slow reference on CPU tensors, and backend='cpu' / 'triton' raise; {_INSTALL_HINT}; "
                      "`python -m aladin_fast info` shows what can run", UserWarning, stacklevel=3)


def _probe_cpu_extension():
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as err:  # not built, or a broken / foreign .so (dlopen errors are ImportErrors too)
        return None, f"C++ extension aladin_fast._C is not built or not importable ({err}); {_INSTALL_HINT}"
    return _C, None


def _probe_triton():
    try:
        importlib.import_module("triton")  # availability probe
    except ImportError as err:
        return None, f"triton is not importable ({err})"
    try:
        from .. import kernels
    except ImportError as err:  # said "triton is not importable" while triton imported fine
        return None, f"the Triton kernels aladin_fast.kernels are not importable ({err}); {_INSTALL_HINT}"
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
