"""ALADIN-style student: one global embedding per image and per caption, for kNN search.

A small transformer head per modality reads a sequence of tokens with a
learned first token prepended (a CLS slot); the head's output at that first
position, projected to ``embed_dim`` (D_s, default 768) and L2-normalised, is
the embedding. The score of caption t and image i is the dot product
``<e_t, e_i>`` (cosine), so retrieval is a faiss ``IndexFlatIP`` search.

Where the tokens come from (``backbone``):

* ``"shared"`` (ALADIN): the teacher's region / word tokens. The student owns
  only the heads; pass the teacher to the encoding methods. With the teacher
  frozen this distils a matching head on top of a fixed alignment model; with
  both trainable it is ALADIN's joint training of two heads on one backbone.
* ``"separate"``: the student owns its own region and caption encoders (a
  global-embedding model on its own; also the baseline of the acceptance test
  when trained with the hinge loss only).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import (
    CaptionEncoder,
    RegionEncoder,
    TokenTransformer,
    check_regions,
    check_token_ids,
    check_tokens,
)
from .teacher import Teacher

__all__ = ["Student", "PoolingHead"]

BACKBONES = ("shared", "separate")


POOLINGS = ("first", "mean", "max")


def _masked_max(values: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Max of ``values [B, L, C]`` over the valid positions (``valid [B, L, 1]``): ``[B, C]``.

    Padded slots never win; a row without valid positions pools to zeros (a finite embedding), also when the
    whole batch has width L = 0 (``amax`` refuses an empty dimension).
    """
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0], values.shape[2])
    pooled = values.masked_fill(~valid, float("-inf")).amax(dim=1)
    return torch.where(lengths[:, None] > 0, pooled, torch.zeros_like(pooled))


class PoolingHead(nn.Module):
    """Tokens ``[B, L, token_dim]`` -> embedding ``[B, embed_dim]`` (unit norm; with ``project_tokens`` an
    empty sequence gives the zero vector instead, see below).

    ``pooling="first"`` (ALADIN): a learned token is prepended, the sequence
    runs through ``layers`` pre-norm transformer layers (padding masked), and
    the first position is projected to ``embed_dim`` and L2-normalised; an
    empty sequence still has the learned token, so every row gets a finite
    embedding. ``"mean"`` / ``"max"`` (VSE-style): the tokens run through the
    layers and their mean / element-wise max over valid positions is projected
    and normalised (an empty sequence pools to zeros: a finite embedding too).

    ``project_tokens=True`` (``"mean"`` / ``"max"`` only) swaps the last two
    steps: every valid token is projected to ``embed_dim`` first and the
    projections are pooled (VSE-infinity style). With a max this matters: a
    set of objects is summarised by ``embed_dim`` per-feature maxima instead of
    ``token_dim`` ones, which on SyntheticScenes lifts a distilled student's
    R@1 far more than a transformer layer in the head (docs/training.md).
    Only valid tokens are projected (padding would be a third to a half of the
    work), so an empty sequence has nothing to pool: its embedding is the zero
    vector (finite, cosine 0 with everything, like the op's score of a caption
    without words), not a unit vector. ``projection_hidden`` makes the
    projection an MLP with one GELU hidden layer of that width (default: one
    linear layer).
    """

    def __init__(self, token_dim: int, embed_dim: int, layers: int, heads: int, ff_dim: Optional[int] = None,
                 dropout: float = 0.1, pooling: str = "first", project_tokens: bool = False,
                 projection_hidden: Optional[int] = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if project_tokens and pooling == "first":
            raise ValueError("project_tokens=True needs pooling 'mean' or 'max' (the first token is one token)")
        if projection_hidden is not None and (not isinstance(projection_hidden, int) or isinstance(
                projection_hidden, bool) or projection_hidden < 1):
            raise ValueError(f"projection_hidden must be None or a positive int, got {projection_hidden!r}")
        self.pooling, self.project_tokens = pooling, bool(project_tokens)
        if pooling == "first":
            self.first_token = nn.Parameter(torch.randn(token_dim) * token_dim ** -0.5)
        self.input_norm = nn.LayerNorm(token_dim)
        self.transformer = TokenTransformer(token_dim, layers, heads, ff_dim, dropout)
        if projection_hidden is None:
            self.output = nn.Linear(token_dim, embed_dim)
        else:
            self.output = nn.Sequential(nn.Linear(token_dim, projection_hidden), nn.GELU(),
                                        nn.Linear(projection_hidden, embed_dim))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = (torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None])[..., None]
        if not torch.is_autocast_enabled(tokens.device.type):  # any floating dtype (autocast picks its own)
            tokens = tokens.to(self.input_norm.weight.dtype)
        # padded tokens never reach the layers: a huge / inf / NaN value there made NaN embeddings and gradients
        tokens = tokens.masked_fill(~valid, 0.0)
        if self.pooling == "first":
            first = self.first_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            sequence = self.input_norm(torch.cat([first, tokens], dim=1))
            hidden = self.transformer(sequence, lengths + 1)
            return F.normalize(self.output(hidden[:, 0]), dim=-1)
        hidden = self.transformer(self.input_norm(tokens), lengths)  # padded outputs are zero
        if self.project_tokens:
            return F.normalize(self._pool_projected(hidden, lengths, valid[..., 0]), dim=-1)
        if self.pooling == "mean":
            pooled = hidden.sum(dim=1) / lengths.clamp(min=1)[:, None].to(hidden.dtype)
        else:
            pooled = _masked_max(hidden, valid, lengths)
        return F.normalize(self.output(pooled), dim=-1)

    def _pool_projected(self, hidden: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Project the valid rows of ``hidden [B, L, token_dim]`` (``valid [B, L]``), then pool: ``[B, embed_dim]``."""
        rows, positions = valid.nonzero(as_tuple=True)
        projected = self.output(hidden[rows, positions])  # [P, embed_dim], padding never projected
        count, width = hidden.shape[0], hidden.shape[1]
        if self.pooling == "mean":
            summed = projected.new_zeros(count, projected.shape[1]).index_add(0, rows, projected)
            return summed / lengths.clamp(min=1)[:, None].to(summed.dtype)
        grid = projected.new_zeros(count, width, projected.shape[1]).index_put((rows, positions), projected)
        return _masked_max(grid, valid[..., None], lengths)


class Student(nn.Module):
    """Global-embedding matching model.

    Args:
        embed_dim: output embedding size D_s (default 768).
        token_dim: width of the tokens the heads read: the teacher's
            ``embed_dim`` for ``backbone="shared"``, the student's own encoder
            width for ``"separate"``.
        layers: transformer layers of each pooling head.
        heads: attention heads (must divide ``token_dim``).
        ff_dim / dropout: of the heads (and own encoders).
        pooling: how the heads pool tokens: ``"first"`` (ALADIN's first-token
            transformer), ``"mean"`` or ``"max"`` (see :class:`PoolingHead`).
        project_tokens / projection_hidden: project every token to
            ``embed_dim`` before pooling (mean / max), with a linear layer or
            an MLP of that hidden width (see :class:`PoolingHead`).
        backbone: ``"shared"`` (read a teacher's tokens) or ``"separate"``.
        vocab_size / feature_dim / backbone_layers / pad_id: the own encoders
            of ``backbone="separate"`` (``vocab_size`` is required there).

    ``hparams`` holds these arguments (``Student(**student.hparams)`` rebuilds it).
    """

    def __init__(
        self,
        embed_dim: int = 768,
        token_dim: int = 1024,
        layers: int = 1,
        heads: int = 8,
        ff_dim: Optional[int] = None,
        dropout: float = 0.1,
        backbone: str = "shared",
        vocab_size: Optional[int] = None,
        feature_dim: int = 2048,
        backbone_layers: int = 1,
        pad_id: int = 0,
        pooling: str = "first",
        project_tokens: bool = False,
        projection_hidden: Optional[int] = None,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        for name, value in (("embed_dim", embed_dim), ("token_dim", token_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hparams: Dict[str, object] = dict(
            embed_dim=embed_dim, token_dim=token_dim, layers=layers, heads=heads, ff_dim=ff_dim, dropout=dropout,
            backbone=backbone, vocab_size=vocab_size, feature_dim=feature_dim, backbone_layers=backbone_layers,
            pad_id=pad_id, pooling=pooling, project_tokens=project_tokens, projection_hidden=projection_hidden,
        )
        self.embed_dim, self.token_dim, self.backbone = embed_dim, token_dim, backbone
        head = (token_dim, embed_dim, layers, heads, ff_dim, dropout, pooling, project_tokens, projection_hidden)
        self.image_head, self.caption_head = PoolingHead(*head), PoolingHead(*head)
        self.image_encoder: Optional[RegionEncoder] = None
        self.caption_encoder: Optional[CaptionEncoder] = None
        if backbone == "separate":
            if vocab_size is None:
                raise ValueError("vocab_size is required for backbone='separate' (the student's own word embedding)")
            self.vocab_size, self.feature_dim = vocab_size, feature_dim
            self.image_encoder = RegionEncoder(feature_dim, token_dim, backbone_layers, heads, ff_dim, dropout)
            self.caption_encoder = CaptionEncoder(vocab_size, token_dim, backbone_layers, heads, ff_dim, dropout, pad_id)

    @classmethod
    def for_teacher(cls, teacher: Teacher, embed_dim: int = 768, **kwargs) -> "Student":
        """A shared-backbone student whose heads read ``teacher``'s tokens (``token_dim = teacher.embed_dim``)."""
        return cls(embed_dim=embed_dim, token_dim=teacher.embed_dim, backbone="shared", **kwargs)

    # ---------------------------------------------------------------- backbone
    def _check_teacher(self, teacher: Optional[Teacher]) -> Teacher:
        if teacher is None:
            raise ValueError("teacher is required: this student has backbone='shared' and reads the teacher's tokens")
        if not isinstance(teacher, Teacher) or teacher.embed_dim != self.token_dim:
            raise ValueError(
                f"teacher must be a Teacher with embed_dim == token_dim={self.token_dim}, "
                f"got {type(teacher).__name__} with embed_dim={getattr(teacher, 'embed_dim', None)}"
            )
        return teacher

    def image_tokens(self, regions: torch.Tensor, image_lengths: Optional[torch.Tensor] = None,
                     teacher: Optional[Teacher] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens ``([B, R, token_dim] unit rows, lengths [B] int64)`` of region features ``[B, R, F]``."""
        if self.backbone == "shared":
            return self._check_teacher(teacher).encode_images(regions, image_lengths)
        regions, lengths = check_regions(regions, image_lengths, self.feature_dim)
        return F.normalize(self.image_encoder(regions, lengths), dim=-1), lengths

    def caption_tokens(self, captions: torch.Tensor, caption_lengths: Optional[torch.Tensor] = None,
                       teacher: Optional[Teacher] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens ``([B, L, token_dim], lengths [B])`` of token ids ``[B, L]``."""
        if self.backbone == "shared":
            return self._check_teacher(teacher).encode_captions(captions, caption_lengths)
        captions, lengths = check_token_ids(captions, caption_lengths, self.vocab_size)
        return F.normalize(self.caption_encoder(captions, lengths), dim=-1), lengths

    # ------------------------------------------------------------------ heads
    def embed_image_tokens(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image embeddings ``[B, embed_dim]`` (unit norm; zero for an empty sequence with ``project_tokens``)
        from backbone tokens ``[B, R, token_dim]``."""
        tokens, lengths = check_tokens("image_tokens", tokens, lengths, self.token_dim)
        return self.image_head(tokens, lengths)

    def embed_caption_tokens(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Caption embeddings ``[B, embed_dim]`` (unit norm; zero for an empty sequence with ``project_tokens``)
        from backbone tokens ``[B, L, token_dim]``."""
        tokens, lengths = check_tokens("caption_tokens", tokens, lengths, self.token_dim)
        return self.caption_head(tokens, lengths)

    def encode_images(self, regions: torch.Tensor, image_lengths: Optional[torch.Tensor] = None,
                      teacher: Optional[Teacher] = None) -> torch.Tensor:
        """Image embeddings ``[B, embed_dim]`` float32 (unit norm) from region features ``[B, R, F]``."""
        return self.embed_image_tokens(*self.image_tokens(regions, image_lengths, teacher))

    def encode_captions(self, captions: torch.Tensor, caption_lengths: Optional[torch.Tensor] = None,
                        teacher: Optional[Teacher] = None) -> torch.Tensor:
        """Caption embeddings ``[B, embed_dim]`` (unit norm) from token ids ``[B, L]``."""
        return self.embed_caption_tokens(*self.caption_tokens(captions, caption_lengths, teacher))

    def forward(self, regions: torch.Tensor, image_lengths: Optional[torch.Tensor], captions: torch.Tensor,
                caption_lengths: Optional[torch.Tensor], teacher: Optional[Teacher] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(image_embeddings [B_i, embed_dim], caption_embeddings [B_c, embed_dim])``; see :meth:`scores`."""
        return (self.encode_images(regions, image_lengths, teacher),
                self.encode_captions(captions, caption_lengths, teacher))

    @staticmethod
    def scores(caption_embeddings: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine scores ``[N_captions, N_images]`` (the op's orientation) of unit embeddings."""
        for name, value in (("caption_embeddings", caption_embeddings), ("image_embeddings", image_embeddings)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [N, D], got {type(value).__name__}")
        if caption_embeddings.ndim != 2 or image_embeddings.ndim != 2 or \
                caption_embeddings.shape[1] != image_embeddings.shape[1]:
            raise ValueError(
                f"caption_embeddings [Nc, D] and image_embeddings [Ni, D] must share D, got "
                f"{list(caption_embeddings.shape)} and {list(image_embeddings.shape)}"
            )
        return caption_embeddings.float() @ image_embeddings.float().T

    @torch.no_grad()
    def full_scores(
        self,
        regions: torch.Tensor,
        image_lengths: Optional[torch.Tensor],
        captions: torch.Tensor,
        caption_lengths: Optional[torch.Tensor],
        teacher: Optional[Teacher] = None,
        *,
        block: int = 512,
    ) -> torch.Tensor:
        """Exhaustive scores for evaluation: ``[N_images, N_captions]`` float32 on CPU (eval orientation).

        Embeds ``block`` rows at a time on the model's device, in eval mode
        (the teacher too, for a shared backbone; both modes are restored).
        """
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        device = next(self.parameters()).device
        modules = [self] + ([self._check_teacher(teacher)] if self.backbone == "shared" else [])
        # check the whole inputs up front (like Teacher.full_scores): a block-wise check named the shape of a
        # block, and lengths given as a list failed on ``.to``
        backbone = modules[-1]
        regions, image_lengths = check_regions(regions, image_lengths, backbone.feature_dim)
        captions, caption_lengths = check_token_ids(captions, caption_lengths, backbone.vocab_size)
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            images = [self.encode_images(regions[s:s + block].to(device), image_lengths[s:s + block].to(device), teacher)
                      for s in range(0, regions.shape[0], block)]
            texts = [self.encode_captions(captions[s:s + block].to(device), caption_lengths[s:s + block].to(device), teacher)
                     for s in range(0, captions.shape[0], block)]
            image_embeddings = torch.cat(images) if images else torch.zeros(0, self.embed_dim, device=device)
            caption_embeddings = torch.cat(texts) if texts else torch.zeros(0, self.embed_dim, device=device)
            return self.scores(caption_embeddings, image_embeddings).T.cpu().contiguous()
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, token_dim={self.token_dim}, backbone={self.backbone!r}, "
                f"pooling={self.image_head.pooling!r}, project_tokens={self.image_head.project_tokens}")
