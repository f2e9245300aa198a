"""``torch.nn`` modules over the functional ops."""
from __future__ import annotations

from typing import Optional

import torch

from ._inputs import AGGREGATIONS, PADDINGS, check_choice, check_flag
from .ops import alignment_scores, paired_scores, rerank_scores
from .ops.backends import BACKENDS


class AlignmentScore(torch.nn.Module):
    """Fused word-region alignment score as a module.

    ``forward(text [Nt, W, D], images [Ni, R, D], text_lengths=None, image_lengths=None, candidates=None,
    paired=False)`` returns all-pairs scores ``[Nt, Ni]``, or ``[Nt, K]`` with ``candidates [Nt, K]``, or
    ``[N]`` with ``paired=True``; float32 (float64 for float64 inputs, which run on the ``"cpu"`` or
    ``"reference"`` backend), differentiable w.r.t. both inputs.
    """

    def __init__(self, aggregation: str = "MrSw", padding: str = "neg_inf", normalize: bool = False,
                 backend: str = "auto"):
        super().__init__()
        # checked here, so a bad option fails where the module is built, not at its first forward
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("padding", padding, PADDINGS)
        check_choice("backend", backend, BACKENDS)
        self.aggregation, self.padding, self.backend = aggregation, padding, backend
        self.normalize = check_flag("normalize", normalize)

    def forward(self, text: torch.Tensor, images: torch.Tensor, text_lengths: Optional[torch.Tensor] = None,
                image_lengths: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
                paired: bool = False) -> torch.Tensor:
        paired = check_flag("paired", paired)
        options = dict(aggregation=self.aggregation, padding=self.padding, normalize=self.normalize,
                       backend=self.backend)
        if paired:
            if candidates is not None:
                raise ValueError("give either candidates or paired=True, not both")
            return paired_scores(text, images, text_lengths, image_lengths, **options)
        if candidates is not None:
            return rerank_scores(text, images, candidates, text_lengths, image_lengths, **options)
        return alignment_scores(text, images, text_lengths, image_lengths, **options)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first: a clear refusal instead of a TorchScript
        # frontend error somewhere inside the op layer (Python-level validation, numpy and C++ / Triton calls)
        raise RuntimeError(
            "AlignmentScore cannot be compiled by torch.jit.script (TorchScript does not support the aladin_fast "
            "op layer); use torch.export.export or torch.compile instead")

    def extra_repr(self) -> str:
        return f"aggregation={self.aggregation!r}, padding={self.padding!r}, normalize={self.normalize}, backend={self.backend!r}"
