"""TERAN-style teacher: regions and words in one token space, scored by the fused alignment op.

Region features ``[B, R, F]`` (bottom-up, F = 2048) and caption token ids
``[B, L]`` go through small transformer encoders into L2-normalised D-dim
tokens; the score of caption t and image i is

    MrSw(t, i) = sum over valid words w of  max over valid regions r of  <t_w, v_r>

computed by :func:`aladin_fast.alignment_scores` (every teacher score, forward
and backward, goes through the fused op; the aggregation and padding rule are
configurable).

Two orientations appear in this module and are always named:

* ``scores`` / ``forward`` follow the op: ``[N_captions, N_images]`` (rows = texts);
* ``full_scores`` follows :mod:`aladin_fast.eval`: ``[N_images, N_captions]``.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import alignment_scores
from .encoders import CaptionEncoder, RegionEncoder, check_regions, check_token_ids, check_tokens

__all__ = ["Teacher", "TeacherOutput"]

AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")
PADDINGS = ("neg_inf", "zero")
BACKENDS = ("auto", "cpu", "triton", "reference")


class TeacherOutput(NamedTuple):
    """What :meth:`Teacher.forward` returns for a batch of B_c captions and B_i images.

    ``scores [B_c, B_i]`` float32 (caption rows, image columns);
    ``image_tokens [B_i, R, D]`` and ``caption_tokens [B_c, L, D]`` (unit rows,
    zero padding) with ``image_lengths [B_i]`` / ``caption_lengths [B_c]`` int64.
    """

    scores: torch.Tensor
    image_tokens: torch.Tensor
    image_lengths: torch.Tensor
    caption_tokens: torch.Tensor
    caption_lengths: torch.Tensor


class Teacher(nn.Module):
    """Fine-grained (word-region) matching model.

    Args:
        vocab_size: token-id table size (``len(vocabulary)``).
        feature_dim: region feature size F (2048 for bottom-up features).
        embed_dim: shared token width D (default 1024).
        layers: transformer layers of the region encoder (and of the caption
            encoder unless ``text_layers`` is given).
        heads: attention heads (must divide ``embed_dim``).
        ff_dim: feed-forward width (default ``4 * embed_dim``).
        dropout: dropout in the encoders.
        text_layers: caption-encoder layers (default ``layers``).
        aggregation / padding: passed to :func:`aladin_fast.alignment_scores`
            (``"MrSw"`` / ``"neg_inf"`` by default).
        backend: alignment backend (``"auto"``: C++ on CPU, Triton on CUDA).
        pad_id: padding token id (0 for :class:`~aladin_fast.data.Vocabulary`).

    ``hparams`` holds these arguments; ``Teacher(**teacher.hparams)`` rebuilds
    an identical (untrained) model, which is how checkpoints restore it.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int = 2048,
        embed_dim: int = 1024,
        layers: int = 2,
        heads: int = 8,
        ff_dim: Optional[int] = None,
        dropout: float = 0.1,
        text_layers: Optional[int] = None,
        aggregation: str = "MrSw",
        padding: str = "neg_inf",
        backend: str = "auto",
        pad_id: int = 0,
    ):
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        for name, value, choices in (("aggregation", aggregation, AGGREGATIONS), ("padding", padding, PADDINGS),
                                     ("backend", backend, BACKENDS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        text_layers = layers if text_layers is None else text_layers
        self.hparams: Dict[str, object] = dict(
            vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=embed_dim, layers=layers, heads=heads,
            ff_dim=ff_dim, dropout=dropout, text_layers=text_layers, aggregation=aggregation, padding=padding,
            backend=backend, pad_id=pad_id,
        )
        self.vocab_size, self.feature_dim, self.embed_dim = vocab_size, feature_dim, embed_dim
        self.aggregation, self.padding, self.backend = aggregation, padding, backend
        self.image_encoder = RegionEncoder(feature_dim, embed_dim, layers, heads, ff_dim, dropout)
        self.caption_encoder = CaptionEncoder(vocab_size, embed_dim, text_layers, heads, ff_dim, dropout, pad_id)

    # ---------------------------------------------------------------- encoding
    def encode_images(self, regions: torch.Tensor, image_lengths: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Region tokens for the alignment op (and a feature store).

        Args:
            regions: ``[B, R, feature_dim]`` floating region features (padding ignored).
            image_lengths: ``[B]`` int valid regions per image (None: all R).

        Returns:
            ``(tokens [B, R, embed_dim], lengths [B] int64)``: unit-norm rows,
            zero rows in the padding; dtype of the encoder's output (float32,
            or bf16 under autocast).
        """
        regions, lengths = check_regions(regions, image_lengths, self.feature_dim)
        tokens = self.image_encoder(regions, lengths)
        return F.normalize(tokens, dim=-1), lengths

    def encode_captions(self, captions: torch.Tensor, caption_lengths: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Word tokens for the alignment op.

        Args:
            captions: ``[B, L]`` int token ids (padded with ``pad_id``).
            caption_lengths: ``[B]`` int valid tokens per caption (None: all L).

        Returns:
            ``(tokens [B, L, embed_dim], lengths [B] int64)``, unit rows, zero padding.
        """
        captions, lengths = check_token_ids(captions, caption_lengths, self.vocab_size)
        tokens = self.caption_encoder(captions, lengths)
        return F.normalize(tokens, dim=-1), lengths

    # ----------------------------------------------------------------- scoring
    def score(self, caption_tokens: torch.Tensor, caption_lengths: torch.Tensor,
              image_tokens: torch.Tensor, image_lengths: torch.Tensor) -> torch.Tensor:
        """All-pairs alignment score of encoded tokens: ``[N_captions, N_images]`` float32.

        Differentiable in both token tensors (the op's argmax backward). Tokens
        are cast to float32 unless both share one kernel dtype (float32, float16, bfloat16).
        """
        caption_tokens, caption_lengths = check_tokens("caption_tokens", caption_tokens, caption_lengths, self.embed_dim)
        image_tokens, image_lengths = check_tokens("image_tokens", image_tokens, image_lengths, self.embed_dim)
        if caption_tokens.dtype != image_tokens.dtype or caption_tokens.dtype == torch.float64:
            caption_tokens, image_tokens = caption_tokens.float(), image_tokens.float()
        return alignment_scores(
            caption_tokens, image_tokens, caption_lengths, image_lengths,
            aggregation=self.aggregation, padding=self.padding, backend=self.backend,
        )

    def forward(self, regions: torch.Tensor, image_lengths: Optional[torch.Tensor],
                captions: torch.Tensor, caption_lengths: Optional[torch.Tensor]) -> TeacherOutput:
        """Encode a batch and score every caption against every image.

        Args:
            regions: ``[B_i, R, feature_dim]``; image_lengths: ``[B_i]``.
            captions: ``[B_c, L]`` token ids; caption_lengths: ``[B_c]``.

        Returns:
            :class:`TeacherOutput` with ``scores [B_c, B_i]`` (op orientation).
        """
        image_tokens, image_lengths = self.encode_images(regions, image_lengths)
        caption_tokens, caption_lengths = self.encode_captions(captions, caption_lengths)
        scores = self.score(caption_tokens, caption_lengths, image_tokens, image_lengths)
        return TeacherOutput(scores, image_tokens, image_lengths, caption_tokens, caption_lengths)

    @torch.no_grad()
    def full_scores(
        self,
        regions: torch.Tensor,
        image_lengths: Optional[torch.Tensor],
        captions: torch.Tensor,
        caption_lengths: Optional[torch.Tensor],
        *,
        image_block: int = 256,
        caption_block: int = 1024,
    ) -> torch.Tensor:
        """Exhaustive scores for evaluation: ``[N_images, N_captions]`` float32 on CPU.

        Images are encoded once (in blocks of ``image_block``) and kept as
        tokens; captions are encoded ``caption_block`` at a time and scored
        against all image tokens by the fused op, so memory stays
        ``O(N_images * R * D + caption_block * L * D)``. Inputs may live on the
        CPU; blocks are moved to the model's device. Runs in eval mode (and
        restores the previous mode).
        """
        for name, value in (("image_block", image_block), ("caption_block", caption_block)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        device = next(self.parameters()).device
        regions, image_lengths = check_regions(regions, image_lengths, self.feature_dim)
        captions, caption_lengths = check_token_ids(captions, caption_lengths, self.vocab_size)
        was_training = self.training
        self.eval()
        try:
            tokens, lengths = [], []
            for start in range(0, regions.shape[0], image_block):
                block_tokens, block_lengths = self.encode_images(
                    regions[start:start + image_block].to(device), image_lengths[start:start + image_block].to(device)
                )
                tokens.append(block_tokens.float())
                lengths.append(block_lengths)
            image_tokens = torch.cat(tokens) if tokens else torch.zeros(0, regions.shape[1], self.embed_dim,
                                                                         device=device)  # the model's device
            all_image_lengths = torch.cat(lengths) if lengths else image_lengths.to(device)
            out = torch.empty(regions.shape[0], captions.shape[0], dtype=torch.float32)
            for start in range(0, captions.shape[0], caption_block):
                caption_tokens, block_lengths = self.encode_captions(
                    captions[start:start + caption_block].to(device), caption_lengths[start:start + caption_block].to(device)
                )
                block = self.score(caption_tokens.float(), block_lengths, image_tokens, all_image_lengths)
                out[:, start:start + caption_tokens.shape[0]] = block.T.cpu()
            return out
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, aggregation={self.aggregation!r}, padding={self.padding!r}, "
                f"backend={self.backend!r}")
