"""Token encoders shared by the teacher and the student: regions and words -> D-dim tokens.

* :class:`TokenTransformer` — a pre-norm ``nn.TransformerEncoder`` over padded
  sequences with a key-padding mask built from lengths; padded outputs are zero.
* :class:`RegionEncoder` — region features ``[B, R, F]`` (bottom-up, F = 2048)
  -> linear -> transformer -> linear -> ``[B, R, D]``.
* :class:`CaptionEncoder` — token ids ``[B, L]`` -> embedding + sinusoidal
  positions -> transformer -> linear -> ``[B, L, D]``.

Neither encoder normalises its output: the caller (teacher, student) does, so
that the same encoder can feed an alignment head (unit tokens) or a pooling head.

Input checks live here (every model entry point goes through them) and raise
errors that name the argument, the shape seen and the shape expected.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = [
    "TokenTransformer",
    "RegionEncoder",
    "CaptionEncoder",
    "padding_mask",
    "check_regions",
    "check_token_ids",
    "check_tokens",
    "sinusoidal_positions",
]


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool, True at padded positions (the ``nn.Transformer`` key-padding convention)."""
    positions = torch.arange(width, device=lengths.device)
    return positions[None, :] >= lengths[:, None]


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[length, dim]`` fixed sine/cosine position codes (Vaswani et al.); no maximum length."""
    positions = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequencies = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(positions * frequencies)
    codes[:, 1::2] = torch.cos(positions * frequencies[: dim // 2])
    return codes.to(dtype)


def _check_lengths(name: str, lengths, count: int, width: int, device) -> torch.Tensor:
    """Validate ``lengths [count]`` (ints in [0, width]) and return it as int64 on ``device``."""
    if lengths is None:
        return torch.full((count,), width, dtype=torch.int64, device=device)
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.shape != (count,):
        raise ValueError(f"{name} must have shape [{count}], got {list(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.int64)
    if count and (int(lengths.min()) < 0 or int(lengths.max()) > width):
        raise ValueError(f"{name} must be in [0, {width}], got min {int(lengths.min())} and max {int(lengths.max())}")
    return lengths


def check_regions(regions, image_lengths, feature_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate region features ``[B, R, feature_dim]`` (floating) and ``image_lengths [B]``."""
    if not isinstance(regions, torch.Tensor):
        raise TypeError(f"regions must be a torch.Tensor, got {type(regions).__name__}")
    if regions.ndim != 3 or regions.shape[2] != feature_dim:
        raise ValueError(f"regions must have shape [B, R, {feature_dim}], got {list(regions.shape)}")
    if not regions.is_floating_point():
        raise TypeError(f"regions must be floating point, got dtype {regions.dtype}")
    return regions, _check_lengths("image_lengths", image_lengths, regions.shape[0], regions.shape[1], regions.device)


def check_token_ids(captions, caption_lengths, vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate token ids ``[B, L]`` (int, in [0, vocab_size)) and ``caption_lengths [B]``."""
    if not isinstance(captions, torch.Tensor):
        raise TypeError(f"captions must be a torch.Tensor of token ids, got {type(captions).__name__}")
    if captions.ndim != 2:
        raise ValueError(f"captions must have shape [B, L] (token ids), got {list(captions.shape)}")
    if captions.dtype.is_floating_point or captions.dtype == torch.bool:
        raise TypeError(f"captions must hold integer token ids, got dtype {captions.dtype}")
    if captions.numel() and (int(captions.min()) < 0 or int(captions.max()) >= vocab_size):
        raise ValueError(
            f"captions ids must be in [0, vocab_size={vocab_size}), got min {int(captions.min())} "
            f"and max {int(captions.max())}"
        )
    lengths = _check_lengths("caption_lengths", caption_lengths, captions.shape[0], captions.shape[1], captions.device)
    return captions.long(), lengths


def check_tokens(name: str, tokens, lengths, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate token features ``[B, L, dim]`` and their lengths (argument ``{name}_lengths``)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.ndim != 3 or tokens.shape[2] != dim:
        raise ValueError(f"{name} must have shape [B, L, {dim}], got {list(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {tokens.dtype}")
    return tokens, _check_lengths(f"{name}_lengths", lengths, tokens.shape[0], tokens.shape[1], tokens.device)


def check_heads(dim: int, heads: int, name: str = "heads") -> None:
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ValueError(f"{name} must be a positive int dividing the model width {dim}, got {heads!r}")


class TokenTransformer(nn.Module):
    """Pre-norm transformer encoder over padded sequences.

    Args:
        dim: token width D.
        layers: encoder layers (0 = identity).
        heads: attention heads (must divide ``dim``).
        ff_dim: feed-forward width (default ``4 * dim``).
        dropout: dropout inside the layers.

    ``forward(tokens [B, L, D], lengths [B] int64) -> [B, L, D]``: padded keys
    are masked out and padded outputs are set to zero. A row of length 0 gives
    all zeros (no NaN from a fully masked softmax).
    """

    def __init__(self, dim: int, layers: int, heads: int, ff_dim: Optional[int] = None, dropout: float = 0.1):
        super().__init__()
        if not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be a non-negative int, got {layers!r}")
        check_heads(dim, heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.layers = layers
        self.encoder = None
        if layers:
            layer = nn.TransformerEncoderLayer(
                dim, heads, ff_dim or 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            # nested tensors would make padded outputs (and thus results) depend on the fast path
            self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        padded = padding_mask(lengths, tokens.shape[1])
        # zero the padding first: a masked key still multiplies its (zero) attention weight into its value, so a
        # NaN / inf there would reach every valid output (0 * NaN = NaN)
        tokens = tokens.masked_fill(padded[..., None], 0.0)
        if self.encoder is not None and tokens.shape[0] and tokens.shape[1]:  # (an empty batch: nothing to encode)
            mask = padded.clone()
            # an empty row would softmax over nothing (NaN): let it attend to its first (zero) slot
            mask[:, 0] &= lengths > 0
            tokens = self.encoder(tokens, src_key_padding_mask=mask)
        return tokens.masked_fill(padded[..., None], 0.0)


class RegionEncoder(nn.Module):
    """Region features ``[B, R, feature_dim]`` -> tokens ``[B, R, dim]`` (not normalised).

    Regions carry no order (detector output), so no position codes are added.
    """

    def __init__(self, feature_dim: int, dim: int, layers: int, heads: int, ff_dim: Optional[int] = None,
                 dropout: float = 0.1):
        super().__init__()
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.feature_dim = feature_dim
        self.input = nn.Sequential(nn.Linear(feature_dim, dim), nn.LayerNorm(dim))
        self.transformer = TokenTransformer(dim, layers, heads, ff_dim, dropout)
        self.output = nn.Linear(dim, dim)

    def forward(self, regions: torch.Tensor, image_lengths: torch.Tensor) -> torch.Tensor:
        padded = padding_mask(image_lengths, regions.shape[1])[..., None]
        # padded features never reach the layers (a huge / inf / NaN value there made NaN tokens and gradients);
        # any floating dtype is accepted (cast to the weights' dtype; autocast still picks the compute dtype)
        regions = regions.to(self.input[0].weight.dtype).masked_fill(padded, 0.0)
        hidden = self.transformer(self.input(regions), image_lengths)
        return self.output(hidden).masked_fill(padded, 0.0)


class CaptionEncoder(nn.Module):
    """Token ids ``[B, L]`` -> tokens ``[B, L, dim]`` (not normalised).

    Word embedding (``pad_id`` row fixed at zero) plus sinusoidal positions, so
    captions of any length are accepted.
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, ff_dim: Optional[int] = None,
                 dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be an int in [0, vocab_size={vocab_size}), got {pad_id!r}")
        self.vocab_size, self.dim = vocab_size, dim
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.input_norm = nn.LayerNorm(dim)
        self.transformer = TokenTransformer(dim, layers, heads, ff_dim, dropout)
        self.output = nn.Linear(dim, dim)

    def forward(self, captions: torch.Tensor, caption_lengths: torch.Tensor) -> torch.Tensor:
        width = captions.shape[1]
        embedded = self.embedding(captions) * math.sqrt(self.dim)
        embedded = embedded + sinusoidal_positions(width, self.dim, captions.device, embedded.dtype)[None]
        hidden = self.transformer(self.input_norm(embedded), caption_lengths)
        return self.output(hidden) * (~padding_mask(caption_lengths, width))[..., None].to(hidden.dtype)
