"""Plain-PyTorch definition of every aladin-fast op: the spec and the test oracle.

Readable, not fast. Works in float64 (pass float64 tensors), otherwise
accumulates in float32 like the kernels. Memory stays bounded: pairs are
processed in chunks so the [pairs, W, R] similarity tensor never exceeds
``CHUNK_ELEMENTS`` elements at a time.

Semantics for a caption with n_w valid words and an image with n_r valid
regions, s_wr = <t_w, v_r>:

* ``MrSw``   = sum over valid words of max over valid regions of s_wr
* ``MrAVGw`` = MrSw / n_w
* ``MwSr``   = sum over valid regions of max over valid words
* ``symm``   = MrSw + MwSr
* ``sum``    = sum of s_wr over valid (w, r); ``mean`` = sum / (n_w * n_r)

``padding="neg_inf"``: padded positions never take part. ``padding="zero"``
(TERAN-compatible): padded tokens are zero vectors, so a padded position scores
0 and takes part in maxes (it wins when every valid score is negative), sums
still run over valid tokens only, and ``mean`` divides by the padded sizes
(W_pad * R_pad) as TERAN does. A max over an empty set and any aggregation of
a row with no valid tokens give 0, never NaN. A NaN in a valid token makes the
scores of the pairs using it NaN and nothing else.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._inputs import (
    AGGREGATIONS,
    PADDINGS,
    REFERENCE_DTYPES,
    TokenBatch,
    check_candidates,
    check_choice,
    check_pair,
    normalized,
    token_batch,
)

__all__ = ["alignment_scores", "paired_scores", "rerank_scores", "score_token_batches", "aggregate"]

CHUNK_ELEMENTS = 1 << 22  # 4M similarity entries per chunk (32 MB in float64, a few copies live)


def aggregate(
    sim: torch.Tensor,
    word_lengths: torch.Tensor,
    region_lengths: torch.Tensor,
    aggregation: str,
    zero_padding: bool,
    want_argmax: bool = False,
):
    """Pool similarities ``sim [A, B, W, R]`` into scores ``[A, B]``.

    ``word_lengths`` broadcasts to ``[A, B]`` (valid words per pair) and
    ``region_lengths`` likewise (valid regions). Returns ``(scores, argmax)``;
    ``argmax [A, B, W]`` int32 is the first winning region per word (``-1``
    for padded words and empty maxes) or None.
    """
    a, b, w_pad, r_pad = sim.shape
    n_w = word_lengths.expand(a, b)
    n_r = region_lengths.expand(a, b)
    word_valid = torch.arange(w_pad, device=sim.device)[None, None, :] < n_w[..., None]  # [A, B, W]
    region_valid = torch.arange(r_pad, device=sim.device)[None, None, :] < n_r[..., None]  # [A, B, R]
    pair_valid = word_valid[..., :, None] & region_valid[..., None, :]
    zero = sim.new_zeros(())

    def masked_max(along_regions: bool):
        # max over regions (per word) if along_regions else over words (per region)
        fill = zero if zero_padding else sim.new_full((), float("-inf"))
        if along_regions:
            values = torch.where(region_valid[..., None, :], sim, fill)
            other_valid, own_pad, own_count = word_valid, r_pad, n_r
        else:
            values = torch.where(word_valid[..., :, None], sim, fill).transpose(-1, -2)
            other_valid, own_pad, own_count = region_valid, w_pad, n_w
        if own_pad == 0:
            maxima = sim.new_zeros(values.shape[:-1])
            index = torch.full(values.shape[:-1], -1, dtype=torch.int32, device=sim.device)
            return maxima, index
        largest = values.amax(dim=-1)
        first = (values == largest[..., None]).to(torch.uint8).argmax(dim=-1)
        # the value at the first winner, so that autograd sends the whole gradient there as every kernel backend
        # does (amax would split it evenly between tied entries); a NaN max stays amax's (it has no winner)
        maxima = torch.where(largest.isnan(), largest, values.gather(-1, first[..., None]).squeeze(-1))
        first = first.to(torch.int32)
        # neg_inf mode with nothing valid to take the max over: contributes 0
        empty = (own_count == 0)[..., None].expand_as(maxima) if not zero_padding else torch.zeros_like(maxima, dtype=torch.bool)
        maxima = torch.where(empty, zero, maxima)
        first = torch.where(empty | ~other_valid, torch.full_like(first, -1), first)
        return torch.where(other_valid, maxima, zero), first

    row_max, argmax = masked_max(True) if (want_argmax or aggregation in ("MrSw", "MrAVGw", "symm")) else (None, None)
    if aggregation in ("MrSw", "MrAVGw", "symm"):
        scores = row_max.sum(dim=-1)
        if aggregation == "MrAVGw":
            scores = torch.where(n_w > 0, scores / n_w.clamp(min=1).to(scores.dtype), zero)
        if aggregation == "symm":
            scores = scores + masked_max(False)[0].sum(dim=-1)
    elif aggregation == "MwSr":
        scores = masked_max(False)[0].sum(dim=-1)
    else:
        total = torch.where(pair_valid, sim, zero).sum(dim=(-1, -2))
        if aggregation == "sum":
            scores = total
        elif zero_padding:
            scores = total / (w_pad * r_pad) if w_pad * r_pad else torch.zeros_like(total)
        else:
            count = (n_w * n_r).to(total.dtype)
            scores = torch.where(count > 0, total / count.clamp(min=1), zero)
    return scores, (argmax if want_argmax else None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def score_token_batches(
    text: TokenBatch,
    images: TokenBatch,
    candidates: Optional[torch.Tensor],
    aggregation: str,
    zero_padding: bool,
    want_argmax: bool,
):
    """Reference scoring on validated :class:`TokenBatch` inputs.

    candidates None: all pairs -> ``[Nt, Ni]``; otherwise ``[Nt, K]`` image ids -> ``[Nt, K]``.
    """
    compute = _compute_dtype(text.tokens.dtype)
    text_padded, text_len = text.padded()
    image_padded, image_len = images.padded()
    text_padded, image_padded = text_padded.to(compute), image_padded.to(compute)
    nt, w_pad = text.count, text.pad
    ni, r_pad = images.count, images.pad
    k = ni if candidates is None else candidates.shape[1]
    out_dtype = torch.float64 if compute == torch.float64 else torch.float32
    scores = torch.zeros(nt, k, dtype=out_dtype, device=text.tokens.device)
    argmax = torch.full((nt, k, w_pad), -1, dtype=torch.int32, device=text.tokens.device) if want_argmax else None
    per_pair = max(1, w_pad * r_pad)
    if candidates is None:
        image_chunk = max(1, min(ni, CHUNK_ELEMENTS // per_pair))
        text_chunk = max(1, CHUNK_ELEMENTS // (per_pair * image_chunk))
        for t0 in range(0, nt, text_chunk):
            t1 = min(nt, t0 + text_chunk)
            for i0 in range(0, ni, image_chunk):
                i1 = min(ni, i0 + image_chunk)
                sim = torch.einsum("awd,brd->abwr", text_padded[t0:t1], image_padded[i0:i1])
                s, a = aggregate(
                    sim, text_len[t0:t1, None], image_len[None, i0:i1], aggregation, zero_padding, want_argmax
                )
                scores[t0:t1, i0:i1] = s.to(out_dtype)
                if want_argmax:
                    argmax[t0:t1, i0:i1] = a
        return _connected(scores, text_padded, image_padded), argmax
    text_chunk = max(1, CHUNK_ELEMENTS // (per_pair * max(1, k)))
    for t0 in range(0, nt, text_chunk):
        t1 = min(nt, t0 + text_chunk)
        ids = candidates[t0:t1]
        sim = torch.einsum("awd,akrd->akwr", text_padded[t0:t1], image_padded[ids])
        s, a = aggregate(sim, text_len[t0:t1, None], image_len[ids], aggregation, zero_padding, want_argmax)
        scores[t0:t1] = s.to(out_dtype)
        if want_argmax:
            argmax[t0:t1] = a
    return _connected(scores, text_padded, image_padded), argmax


def _connected(scores: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
    """``scores`` in the autograd graph of ``tokens`` even where no similarity reached it (no pairs, no
    words / regions, every token masked): like the kernel backends, such scores then backpropagate zero
    gradients instead of raising "does not require grad". The added term is an empty sum: exactly 0, and
    never NaN whatever the tokens hold."""
    if scores.requires_grad or not torch.is_grad_enabled() or not any(t.requires_grad for t in tokens):
        return scores
    return scores + sum(t.flatten()[:0].sum() for t in tokens).to(scores.dtype)


def _prepare(text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, aggregation, padding, normalize):
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("padding", padding, PADDINGS)
    text_batch = token_batch("text", text, text_lengths, text_cu_seqlens, allowed_dtypes=REFERENCE_DTYPES)
    image_batch = token_batch("images", images, image_lengths, image_cu_seqlens, allowed_dtypes=REFERENCE_DTYPES)
    check_pair(text_batch, image_batch)
    if normalize:
        text_batch, image_batch = normalized(text_batch), normalized(image_batch)
    return text_batch, image_batch


def alignment_scores(
    text, images, text_lengths=None, image_lengths=None, aggregation="MrSw", padding="neg_inf",
    normalize=False, return_argmax=False, *, text_cu_seqlens=None, image_cu_seqlens=None,
):
    """All pairs: ``[Nt, Ni]`` scores (float64 for float64 inputs, else float32)."""
    t, v = _prepare(text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, aggregation, padding, normalize)
    scores, argmax = score_token_batches(t, v, None, aggregation, padding == "zero", return_argmax)
    return (scores, argmax) if return_argmax else scores


def paired_scores(
    text, images, text_lengths=None, image_lengths=None, aggregation="MrSw", padding="neg_inf",
    normalize=False, return_argmax=False, *, text_cu_seqlens=None, image_cu_seqlens=None,
):
    """Row i of text with row i of images: ``[N]`` scores."""
    t, v = _prepare(text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, aggregation, padding, normalize)
    if t.count != v.count:
        raise ValueError(f"paired_scores needs as many texts as images, got {t.count} and {v.count}")
    ids = torch.arange(t.count, device=t.tokens.device)[:, None]
    scores, argmax = score_token_batches(t, v, ids, aggregation, padding == "zero", return_argmax)
    scores = scores[:, 0]
    return (scores, argmax[:, 0]) if return_argmax else scores


def rerank_scores(
    text, images, candidates, text_lengths=None, image_lengths=None, aggregation="MrSw", padding="neg_inf",
    normalize=False, return_argmax=False, *, text_cu_seqlens=None, image_cu_seqlens=None,
):
    """Each text against its own candidate images ``candidates [Nt, K]``: ``[Nt, K]`` scores."""
    t, v = _prepare(text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, aggregation, padding, normalize)
    ids = check_candidates(candidates, t.count, v.count, t.tokens.device)
    scores, argmax = score_token_batches(t, v, ids, aggregation, padding == "zero", return_argmax)
    return (scores, argmax) if return_argmax else scores
