"""Triton GPU kernels of aladin-fast (installed as ``aladin_fast.kernels``).

Only ``@triton.jit`` kernels, their launchers and launch heuristics live here: no
validation, no autograd (see aladin_fast/ops/ and docs/kernel_contract.md).
"""
from .alignment import LaunchConfig, alignment_launch_config, aot_specs, launch_alignment

__all__ = ["LaunchConfig", "alignment_launch_config", "aot_specs", "launch_alignment"]
