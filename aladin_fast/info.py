"""``aladin_fast.info()`` / ``python -m aladin_fast info``: versions and backend availability."""
from __future__ import annotations

import os
import platform
import sys

from ._version import __version__


class MissingDependencyError(ImportError):
    """An optional dependency (a pip extra) is not installed; the message says what to install. The command line
    prints it and exits 2 instead of a traceback."""


def _module_version(name: str) -> str:
    try:
        module = __import__(name)
    except ImportError as err:
        return f"missing ({err})"
    return getattr(module, "__version__", "unknown")


def _triton_status() -> str:
    from .ops.backends import _triton_module, triton_interpreter_enabled

    module, reason = _triton_module()
    if module is None:
        return f"missing: {reason}"
    import torch

    if torch.cuda.is_available():
        return f"available: compiled GPU kernels on {torch.cuda.get_device_name(0)}"
    if triton_interpreter_enabled():
        return "available: interpreter (TRITON_INTERPRET=1, CPU tensors, slow; for tests)"
    return "unavailable: no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)"


def _cpu_status() -> str:
    from .ops.backends import _cpu_extension

    module, reason = _cpu_extension()
    if module is None:
        return f"missing: {reason}"
    build = module.build_info()
    details = ", ".join(f"{key}={value}" for key, value in sorted(build.items()))
    available = list(module.available_isas())
    try:  # resolves ALADIN_FAST_ISA and ALADIN_FAST_CPU_LAYOUT as every kernel call does (csrc/bindings.cpp)
        module.layout_for(1, 1, 1)
    except (ValueError, RuntimeError) as err:
        return f"error: built, but every backend='cpu' call fails: {err}; {details}"
    # the kernels run the ISA ALADIN_FAST_ISA names, not always best_isa(): reporting best_isa() alone
    # claimed "ISA avx2" while scalar code ran
    requested = os.environ.get("ALADIN_FAST_ISA", "").lower()
    isa = module.best_isa() if requested in ("", "auto") else \
        f"{requested} (forced by ALADIN_FAST_ISA; best {module.best_isa()})"
    return f"built: ISA {isa} (available: {', '.join(available)}); {details}"


def _faiss_status() -> str:
    try:
        import faiss
    except ImportError as err:
        return f"missing ({err}); install the extra: pip install 'aladin-fast[cpu]'"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    kind = f"gpu ({gpus} GPUs)" if gpus else "cpu"
    return f"{kind}, version {getattr(faiss, '__version__', 'unknown')}"


def info(file=None) -> dict:
    """Print and return versions and which backends can run (and why not)."""
    import torch

    report = {
        "aladin_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "triton_version": _module_version("triton"),
        "numpy": _module_version("numpy"),
        "backend.triton": _triton_status(),
        "backend.cpu": _cpu_status(),
        "backend.reference": "available: plain PyTorch (float64-capable)",
        "faiss": _faiss_status(),
    }
    width = max(len(key) for key in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}", file=file or sys.stdout)
    return report
