"""Triton GPU kernels of aladin-fast (installed as ``aladin_fast.kernels``).

Only ``@triton.jit`` kernels, their launchers and launch heuristics live here: no
validation, no autograd (see aladin_fast/ops/ and docs/kernel_contract.md).
"""
from .alignment import LaunchConfig, alignment_launch_config, forward_writes_every_output, launch_alignment
from .alignment import aot_specs as _forward_aot_specs
from .alignment_packed import packed_aot_specs
from .alignment_backward import STRATEGIES, backward_aot_specs, backward_launch_blocks, launch_alignment_backward
from .alignment_gather import (GATHER_IMAGE_AGGREGATIONS, GATHER_TEXT_AGGREGATIONS, gather_aot_specs,
                               launch_gather_backward)
from .alignment_weights import alignment_weights_aot_specs, launch_alignment_weights, token_sequence_ids, weights_dtype
from .alignment_winner_gemm import launch_winner_gemm_backward, winner_gemm_aot_specs, winner_gemm_fits


def aot_specs() -> list:
    """Forward and backward specialisations for ahead-of-time compilation (see ``alignment.aot_specs``)."""
    return (_forward_aot_specs() + packed_aot_specs() + backward_aot_specs() + winner_gemm_aot_specs()
            + alignment_weights_aot_specs() + gather_aot_specs())


__all__ = ["GATHER_IMAGE_AGGREGATIONS", "GATHER_TEXT_AGGREGATIONS", "LaunchConfig", "STRATEGIES",
           "alignment_launch_config", "aot_specs", "backward_launch_blocks", "forward_writes_every_output", "launch_alignment",
           "launch_alignment_backward", "launch_alignment_weights", "launch_gather_backward",
           "launch_winner_gemm_backward",
           "token_sequence_ids", "weights_dtype", "winner_gemm_fits"]
