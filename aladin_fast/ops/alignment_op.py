"""``torch.library`` registration of the fused alignment op: forward, fake, autograd.

``aladin_fast::score_tokens`` takes the kernel layout of docs/kernel_contract.md
(2-D token matrices + offsets + lengths, optional candidate ids) and runs the
C++ or Triton kernel. Its backward, ``aladin_fast::score_tokens_backward``, is
an op of its own so that ``torch.compile`` treats it as opaque.

Backward uses the argmax saved by the forward (int32 ``[pairs, W]``), never a
``[pairs, W, R]`` tensor:

* MrSw / MrAVGw / symm (word term): ``d t_w += c * v_{argmax(w)}``,
  ``d v_{argmax(w)} += c * t_w`` -- a sparse matrix with one entry per
  (pair, valid word) multiplied with the token matrices.
* MwSr / symm (region term): the same with the region -> word argmax, which is
  recomputed by the kernel with the roles of text and images swapped (all
  pairs and paired mode) or by the chunked reference (rerank).
* sum / mean: closed form through per-sequence token sums.

A padded position that wins a max in ``padding="zero"`` mode is a zero vector:
it receives and passes no gradient. Gradients are accumulated in float32 and
returned in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import reference
from .._inputs import AGGREGATIONS, TokenBatch
from .backends import cpu_kernels, triton_kernels

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MRSW, MRAVGW, MWSR, SYMM, SUM, MEAN = range(6)


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor (bf16 as its uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy()
    return tensor.numpy()


def run_kernel(backend, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
               aggregation, zero_padding, text_pad, image_pad, out, argmax):
    """Launch one backend kernel on kernel-layout tensors (writes ``out`` and ``argmax``)."""
    if out.numel() == 0:
        return
    if backend == "cpu":
        cpu_kernels().score(
            _numpy_view(text), text_offsets.numpy(), text_lengths.numpy(),
            _numpy_view(images), image_offsets.numpy(), image_lengths.numpy(),
            None if candidates is None else candidates.numpy(),
            _DTYPE_NAMES[text.dtype], aggregation, zero_padding, text_pad, image_pad,
            out.numpy(), None if argmax is None else argmax.numpy(), "auto", torch.get_num_threads(),
        )
    elif backend == "triton":
        triton_kernels().launch_alignment(
            text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
            aggregation, zero_padding, text_pad, image_pad, out, argmax,
        )
    else:  # pragma: no cover - the op layer only passes kernel backends here
        raise RuntimeError(f"score_tokens runs kernel backends only, got {backend!r}")


@torch.library.custom_op("aladin_fast::score_tokens", mutates_args=())
def score_tokens(
    text: torch.Tensor, text_offsets: torch.Tensor, text_lengths: torch.Tensor,
    images: torch.Tensor, image_offsets: torch.Tensor, image_lengths: torch.Tensor,
    candidates: Optional[torch.Tensor], aggregation: int, zero_padding: bool,
    text_pad: int, image_pad: int, backend: str, want_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused scores ``[Nt, K]`` float32 and argmax ``[Nt, K, text_pad]`` int32 (``[0]`` if not wanted)."""
    count = text_offsets.shape[0]
    k = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    out = torch.zeros(count, k, dtype=torch.float32, device=text.device)
    argmax = (
        torch.full((count, k, text_pad), -1, dtype=torch.int32, device=text.device)
        if want_argmax else torch.empty(0, dtype=torch.int32, device=text.device)
    )
    run_kernel(backend, text.contiguous(), text_offsets, text_lengths, images.contiguous(), image_offsets,
               image_lengths, candidates, aggregation, zero_padding, text_pad, image_pad, out,
               argmax if want_argmax else None)
    return out, argmax


@score_tokens.register_fake
def _(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
      zero_padding, text_pad, image_pad, backend, want_argmax):
    count = text_offsets.shape[0]
    k = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    out = text.new_empty((count, k), dtype=torch.float32)
    argmax = text.new_empty((count, k, text_pad) if want_argmax else (0,), dtype=torch.int32)
    return out, argmax


def _pair_images(candidates: Optional[torch.Tensor], text_count: int, image_count: int, device) -> torch.Tensor:
    """Image id of every pair ``[Nt, K]`` (all pairs: ``arange(Ni)`` on every row)."""
    if candidates is None:
        return torch.arange(image_count, device=device).expand(text_count, image_count)
    return candidates


ARGMAX_CHUNK_ENTRIES = 1 << 19  # sparse entries per backward chunk: bounds the index/value buffers


def _argmax_term(coefficient, argmax, from_offsets, from_lengths, to_offsets, to_lengths, from_tokens, to_tokens,
                 grad_from, grad_to):
    """Gradient of ``sum_{pairs, p} coefficient * <from_p, to_{argmax(p)}>``.

    All per-pair arguments are ``[Nt, K]`` (``argmax [Nt, K, P]``): position p
    of the pair's "from" sequence won the max at position argmax of its "to"
    sequence. Returns ``(d from_tokens, d to_tokens)`` in float32, built as a
    sparse matrix with one entry per (pair, valid position), in chunks of pairs
    so the index buffers stay small; never a [pairs, P, D] tensor.
    """
    device = argmax.device
    count, k, pad = argmax.shape
    if count * k * pad == 0:
        return
    positions = torch.arange(pad, device=device)
    rows_per_chunk = max(1, ARGMAX_CHUNK_ENTRIES // max(1, k * pad))
    shape = (from_tokens.shape[0], to_tokens.shape[0])
    for start in range(0, count, rows_per_chunk):
        chunk = slice(start, min(count, start + rows_per_chunk))
        winner = argmax[chunk].long()
        valid = (positions < from_lengths[chunk].long()[..., None]) & (winner >= 0)
        valid &= winner < to_lengths[chunk].long()[..., None]  # a winning zero pad carries no gradient
        rows = (from_offsets[chunk][..., None] + positions)[valid]
        cols = (to_offsets[chunk][..., None] + winner)[valid]
        values = coefficient[chunk][..., None].expand(winner.shape)[valid]
        matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, device=device,
                                         check_invariants=False).coalesce()
        grad_from.addmm_(matrix, to_tokens)
        grad_to.addmm_(matrix.t(), from_tokens)
        del matrix, rows, cols, values, valid, winner


def _region_argmax(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                   zero_padding, text_pad, image_pad, backend):
    """Region -> word argmax ``[Nt, K, image_pad]`` (first index wins), via the swapped forward."""
    count, image_count = text_offsets.shape[0], image_offsets.shape[0]
    if candidates is None or (candidates.shape[1] == 1 and count == image_count and torch.equal(
            candidates[:, 0], torch.arange(count, device=candidates.device))):
        swapped = None if candidates is None else candidates
        _, transposed = score_tokens(images, image_offsets, image_lengths, text, text_offsets, text_lengths,
                                     swapped, MRSW, zero_padding, image_pad, text_pad, backend, True)
        return transposed.transpose(0, 1) if candidates is None else transposed
    # rerank: the chunked reference on the swapped problem, one query at a time
    out = torch.empty(count, candidates.shape[1], image_pad, dtype=torch.int32, device=text.device)
    text_batch = TokenBatch(text.float(), text_offsets, text_lengths, text_pad)
    image_batch = TokenBatch(images.float(), image_offsets, image_lengths, image_pad)
    text_padded, _ = text_batch.padded()
    image_padded, _ = image_batch.padded()
    for i in range(count):
        ids = candidates[i]
        sim = torch.einsum("krd,wd->krw", image_padded[ids], text_padded[i])[None]  # [1, K, R, W]
        _, argmax = reference.aggregate(sim, image_lengths[ids].long()[None], text_lengths[i].long().view(1, 1),
                                        "MrSw", zero_padding, want_argmax=True)
        out[i] = argmax[0]
    return out


def _segment_sums(tokens, offsets, lengths, count_pad):
    """Sum of each sequence's valid tokens ``[N, D]`` in float32."""
    prefix = torch.nn.functional.pad(tokens.float().cumsum(0), (0, 0, 1, 0))
    return prefix[offsets + lengths.long()] - prefix[offsets]


@torch.library.custom_op("aladin_fast::score_tokens_backward", mutates_args=())
def score_tokens_backward(
    grad: torch.Tensor, text: torch.Tensor, text_offsets: torch.Tensor, text_lengths: torch.Tensor,
    images: torch.Tensor, image_offsets: torch.Tensor, image_lengths: torch.Tensor,
    candidates: Optional[torch.Tensor], argmax: torch.Tensor, aggregation: int, zero_padding: bool,
    text_pad: int, image_pad: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d text [T_text, D], d images [T_img, D])`` in the inputs' dtype."""
    device = text.device
    count, image_count = text_offsets.shape[0], image_offsets.shape[0]
    grad = grad.float()
    text_f, images_f = text.float(), images.float()
    grad_text = torch.zeros(text.shape, dtype=torch.float32, device=device)
    grad_images = torch.zeros(images.shape, dtype=torch.float32, device=device)
    if grad.numel() == 0:
        return grad_text.to(text.dtype), grad_images.to(images.dtype)
    pair_images = _pair_images(candidates, count, image_count, device)
    image_offsets_pair = image_offsets[pair_images]
    image_lengths_pair = image_lengths[pair_images]
    shape = (text.shape[0], images.shape[0])
    text_offsets_pair = text_offsets[:, None].expand_as(pair_images)
    text_lengths_pair = text_lengths[:, None].expand_as(pair_images)
    if aggregation in (MRSW, MRAVGW, SYMM):  # word -> region term
        coefficient = grad
        if aggregation == MRAVGW:
            coefficient = grad / text_lengths.clamp(min=1).float()[:, None]
        _argmax_term(coefficient, argmax, text_offsets_pair, text_lengths_pair, image_offsets_pair,
                     image_lengths_pair, text_f, images_f, grad_text, grad_images)
    if aggregation in (MWSR, SYMM):  # region -> word term
        region_argmax = _region_argmax(text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                       candidates, zero_padding, text_pad, image_pad, backend)
        _argmax_term(grad, region_argmax, image_offsets_pair, image_lengths_pair, text_offsets_pair,
                     text_lengths_pair, images_f, text_f, grad_images, grad_text)
        del region_argmax
    if aggregation in (SUM, MEAN):
        coefficient = grad
        if aggregation == MEAN:
            if zero_padding:
                coefficient = grad / float(max(text_pad * image_pad, 1)) if text_pad * image_pad else grad * 0
            else:
                pairs_count = (text_lengths.float()[:, None] * image_lengths_pair.float())
                coefficient = torch.where(pairs_count > 0, grad / pairs_count.clamp(min=1), torch.zeros_like(grad))
        image_sums = _segment_sums(images, image_offsets, image_lengths, image_pad)  # [Ni, D]
        text_sums = _segment_sums(text, text_offsets, text_lengths, text_pad)  # [Nt, D]
        if candidates is None:
            per_text = coefficient @ image_sums  # [Nt, D]
            per_image = coefficient.t() @ text_sums  # [Ni, D]
        else:
            per_text = torch.einsum("ik,ikd->id", coefficient, image_sums[candidates])
            per_image = torch.zeros(image_count, text.shape[1], device=device).index_add_(
                0, candidates.reshape(-1), (coefficient[..., None] * text_sums[:, None, :]).reshape(-1, text.shape[1]))
        _add_to_tokens(grad_text, per_text, text_offsets, text_lengths)
        _add_to_tokens(grad_images, per_image, image_offsets, image_lengths)
    return grad_text.to(text.dtype), grad_images.to(images.dtype)


def _add_to_tokens(out, per_sequence, offsets, lengths):
    """Add ``per_sequence[i]`` to every valid token row of sequence i of ``out`` (index_add: rows may repeat)."""
    lengths = lengths.long()
    sequence = torch.repeat_interleave(torch.arange(offsets.shape[0], device=offsets.device), lengths)
    starts = torch.repeat_interleave(offsets, lengths)
    within = torch.arange(sequence.shape[0], device=offsets.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)
    rows = starts + within
    out.index_add_(0, rows, per_sequence[sequence])


@score_tokens_backward.register_fake
def _(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax,
      aggregation, zero_padding, text_pad, image_pad, backend):
    return torch.empty_like(text), torch.empty_like(images)


def _setup_context(ctx, inputs, output):
    (text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
     zero_padding, text_pad, image_pad, backend, want_argmax) = inputs
    ctx.save_for_backward(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, output[1])
    ctx.options = (aggregation, zero_padding, text_pad, image_pad, backend, want_argmax)


def _backward(ctx, grad_scores, grad_argmax):
    text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax = ctx.saved_tensors
    aggregation, zero_padding, text_pad, image_pad, backend, want_argmax = ctx.options
    if aggregation in (MRSW, MRAVGW, SYMM) and not want_argmax:
        raise RuntimeError("score_tokens was called with want_argmax=False; the op layer must request the argmax "
                           f"when gradients are needed ({AGGREGATIONS[aggregation]})")
    grad_text, grad_images = score_tokens_backward(
        grad_scores, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax,
        aggregation, zero_padding, text_pad, image_pad, backend,
    )
    return grad_text, None, None, grad_images, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("aladin_fast::score_tokens", _backward, setup_context=_setup_context)
