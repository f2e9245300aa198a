"""``torch.nn`` modules over the functional ops."""
from __future__ import annotations

from typing import Optional

import torch

from .ops import alignment_scores, paired_scores, rerank_scores


class AlignmentScore(torch.nn.Module):
    """Fused word-region alignment score as a module.

    ``forward(text [Nt, W, D], images [Ni, R, D], text_lengths=None, image_lengths=None, candidates=None,
    paired=False)`` returns all-pairs scores ``[Nt, Ni]``, or ``[Nt, K]`` with ``candidates [Nt, K]``, or
    ``[N]`` with ``paired=True``; float32, differentiable w.r.t. both inputs.
    """

    def __init__(self, aggregation: str = "MrSw", padding: str = "neg_inf", normalize: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.aggregation, self.padding, self.normalize, self.backend = aggregation, padding, normalize, backend

    def forward(self, text: torch.Tensor, images: torch.Tensor, text_lengths: Optional[torch.Tensor] = None,
                image_lengths: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
                paired: bool = False) -> torch.Tensor:
        options = dict(aggregation=self.aggregation, padding=self.padding, normalize=self.normalize,
                       backend=self.backend)
        if paired:
            if candidates is not None:
                raise ValueError("give either candidates or paired=True, not both")
            return paired_scores(text, images, text_lengths, image_lengths, **options)
        if candidates is not None:
            return rerank_scores(text, images, candidates, text_lengths, image_lengths, **options)
        return alignment_scores(text, images, text_lengths, image_lengths, **options)

    def extra_repr(self) -> str:
        return f"aggregation={self.aggregation!r}, padding={self.padding!r}, normalize={self.normalize}, backend={self.backend!r}"
