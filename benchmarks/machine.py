"""Machine identification for benchmark results files (CPU model, flags, GPU name, a file-safe name)."""
from __future__ import annotations

import os
import platform
import re


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def cpu_flags() -> list[str]:
    """SIMD-related CPU flags (avx*, fma, f16c, amx*)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    return []


def machine_name(prefer_gpu: bool = True) -> str:
    """A file-safe machine name: the GPU when one is used, else CPU model and thread count."""
    if prefer_gpu:
        import torch

        if torch.cuda.is_available():
            return re.sub(r"[^A-Za-z0-9]+", "-", f"gpu-{torch.cuda.get_device_name(0)}").strip("-").lower()
    return re.sub(r"[^A-Za-z0-9]+", "-", f"cpu-{cpu_model()}-{os.cpu_count()}threads").strip("-").lower()


if __name__ == "__main__":  # the file-safe name of this CPU (the Makefile's default bench baseline)
    print(machine_name(prefer_gpu=False))
