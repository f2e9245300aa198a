"""All-pairs backward as two dense GEMMs per chunk of captions (any device; the GPU default).

For all pairs (no candidate lists) the argmax terms of the backward form one
matrix ``G`` over padded token positions, rows ``(t, w)`` and columns ``(i, r)``::

    G[(t, w), (i, r)] = c_word[t, i] * [argmax[t, i, w] == r] + c[t, i] * [region_argmax[t, i, r] == w]

(word term for MrSw / MrAVGw / symm, region term for MwSr / symm). Then::

    d text = G @ images        d images = G^T @ text

Each chunk of ``G`` is a broadcast compare into a uint8 winner count times the
pair's coefficient (no scatter, no index tensors), and the products run in the GEMM library, on tensor cores on a GPU.
On the training shape (128 x 128, W = 32, R = 36, D = 1024) the two products are
2 x 38.7 GFLOP. ``G`` is never built whole: each chunk of captions holds at most
``DENSE_CHUNK_BYTES`` (8 MiB, with its temporaries), so the extra memory is that, a sanitised copy of
the argmax (O(pairs * W)) and, for packed inputs only, padded copies of the
token matrices. Nothing grows with pairs * W * R.

Precision: ``G`` and the products use the inputs' dtype for bfloat16 (the
upstream coefficients are rounded to bfloat16, as torch's own autograd of the
plain formulation does), float32 for float32 and float16 inputs (float16 has
too little range for arbitrary upstream gradients), float64 for float64.
Products accumulate in float32 (cuBLAS / oneDNN); chunks are summed in float32.

Exactness conditions: every entry of ``G`` outside the winners is an exact
zero, which multiplies a token; a non-finite token (even in padding) would turn
those zeros into NaN. :func:`dense_backward` therefore checks that the token
matrices are finite (one device sync, with the layout check) and returns None
otherwise; the caller falls back to the argmax kernels. Everything here is
deterministic: no atomics, and GEMMs with a fixed configuration.
"""
from __future__ import annotations

from typing import Optional

import torch

MRSW, MRAVGW, MWSR, SYMM = 0, 1, 2, 3
DENSE_AGGREGATIONS = (MRSW, MRAVGW, MWSR, SYMM)
DENSE_CHUNK_BYTES = 8 << 20  # bytes of G per chunk of captions


def dense_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``G`` and of the GEMMs for token dtype ``dtype``."""
    if dtype in (torch.bfloat16, torch.float64):
        return dtype
    return torch.float32


def dense_backward_supported(candidates, aggregation: int) -> bool:
    """All pairs (no candidate lists) and an argmax aggregation (no device work)."""
    return candidates is None and aggregation in DENSE_AGGREGATIONS


def _regular(offsets: torch.Tensor, rows: int, pad: int) -> torch.Tensor:
    """Device bool: sequence i starts at row i * pad and the matrix has count * pad rows (padded layout)."""
    count = offsets.shape[0]
    if rows != count * pad:
        return torch.zeros((), dtype=torch.bool, device=offsets.device)
    return (offsets.long() == torch.arange(count, device=offsets.device) * pad).all()


def _padded(tokens, offsets, lengths, pad, regular, dtype):
    """``[count * pad, D]`` tokens in padded layout (a view when ``regular``), positions past a length zeroed
    (garbage there is harmless: it meets only exact zeros of ``G``); plus ``(rows, valid)`` to scatter back."""
    if regular:
        return tokens.to(dtype), None, None
    device = tokens.device
    positions = torch.arange(pad, device=device)
    valid = (positions[None, :] < lengths.long()[:, None]).reshape(-1, 1)
    rows = (offsets.long()[:, None] + positions[None, :]).reshape(-1).clamp(0, max(tokens.shape[0] - 1, 0))
    rows = torch.where(valid[:, 0], rows, torch.zeros((), dtype=rows.dtype, device=device))
    padded = torch.where(valid, tokens[rows].to(dtype), torch.zeros((), dtype=dtype, device=device))
    return padded, rows, valid


def _unpad(padded_grad, shape, rows, valid, dtype):
    """Gradient rows in the input layout: a view when regular, else an index_add of the valid rows."""
    if rows is None:
        return padded_grad.to(dtype)
    out = torch.zeros(shape, dtype=dtype, device=padded_grad.device)
    zero = torch.zeros((), dtype=dtype, device=padded_grad.device)
    # invalid positions add exact zeros to row 0; valid rows are distinct unless sequences overlap
    return out.index_add_(0, rows, torch.where(valid, padded_grad.to(dtype), zero))


def dense_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, argmax,
                   region_argmax, aggregation, zero_padding, text_pad, image_pad,
                   chunk_bytes: Optional[int] = None):
    """``(d text, d images)`` for all pairs ``grad [Nt, Ni]``, or None when a token is not finite.

    ``argmax [Nt, Ni, text_pad]`` (word -> region) is used for MrSw / MrAVGw / symm,
    ``region_argmax [Nt, Ni, image_pad]`` (region -> word) for MwSr / symm; the
    layout is docs/kernel_contract.md's (token matrices, offsets, lengths). Gradients
    come back in float32 (float64 for float64 inputs; ``d text`` of bfloat16 inputs
    in bfloat16, the dtype it is returned in). ``chunk_bytes`` bounds each chunk of
    ``G`` (default ``DENSE_CHUNK_BYTES``).
    """
    del zero_padding  # a winning zero pad is excluded by the length test (it carries no gradient)
    if aggregation not in DENSE_AGGREGATIONS:
        raise ValueError(f"dense_backward handles MrSw / MrAVGw / MwSr / symm, got aggregation code {aggregation}")
    device = text.device
    accumulate = torch.float64 if text.dtype == torch.float64 else torch.float32
    compute = dense_compute_dtype(text.dtype)
    count, image_count = grad.shape
    if count == 0 or image_count == 0 or text.shape[0] == 0 or images.shape[0] == 0 or text_pad * image_pad == 0:
        return (torch.zeros(text.shape, dtype=accumulate, device=device),
                torch.zeros(images.shape, dtype=accumulate, device=device))
    # one sync: finite tokens (exactness) and whether the layouts are already padded (no copies)
    flags = torch.stack([torch.isfinite(text).all() & torch.isfinite(images).all(),
                         _regular(text_offsets, text.shape[0], text_pad),
                         _regular(image_offsets, images.shape[0], image_pad)]).tolist()
    if not flags[0]:
        return None
    text_padded, text_rows, text_valid = _padded(text, text_offsets, text_lengths, text_pad, flags[1], compute)
    images_padded, image_rows, image_valid = _padded(images, image_offsets, image_lengths, image_pad, flags[2],
                                                     compute)
    word_term, region_term = aggregation in (MRSW, MRAVGW, SYMM), aggregation in (MWSR, SYMM)
    t_len, i_len = text_lengths.long(), image_lengths.long()
    index_dtype = torch.int16 if max(text_pad, image_pad) < 2**15 else torch.int32  # halves the winners' copy
    minus_one = torch.full((), -1, dtype=index_dtype, device=device)
    coefficient = grad.to(accumulate)
    if aggregation == MRAVGW:
        coefficient = coefficient / t_len.clamp(min=1).to(accumulate)[:, None]
    coefficient = coefficient.to(compute)[:, None, :, None]  # [Nt, 1, Ni, 1]: one value per pair
    if word_term:  # winners of valid words; -1 where the word is padding or the winner is a zero pad / empty
        words = torch.arange(text_pad, device=device)
        winner = argmax.int()
        ok = (words < t_len[:, None, None]) & (winner >= 0) & (winner < i_len[None, :, None])
        word_winner = torch.where(ok, winner.to(index_dtype), minus_one).transpose(1, 2)[..., None]  # [Nt,W,Ni,1]
        region_index = torch.arange(image_pad, device=device, dtype=index_dtype)
    if region_term:  # winners of valid regions
        regions = torch.arange(image_pad, device=device)
        winner = region_argmax.int()
        ok = (regions < i_len[None, :, None]) & (winner >= 0) & (winner < t_len[:, None, None])
        region_winner = torch.where(ok, winner.to(index_dtype), minus_one)[:, None]  # [Nt, 1, Ni, R]
        word_index = torch.arange(text_pad, device=device, dtype=index_dtype)[None, :, None, None]
    del winner, ok
    grad_text_padded = torch.empty(count * text_pad, text.shape[1], dtype=compute, device=device)
    grad_images_padded = torch.zeros(image_count * image_pad, images.shape[1], dtype=accumulate, device=device)
    # bytes per entry of a chunk: G, the uint8 winner count and (symm) the region term's bool match
    per_entry = torch.empty((), dtype=compute).element_size() + 1 + (word_term and region_term)
    per_chunk = max(1, (DENSE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
                    // max(1, text_pad * image_count * image_pad * per_entry))
    for start in range(0, count, per_chunk):
        stop = min(count, start + per_chunk)
        shape = (stop - start, text_pad, image_count, image_pad)
        counts = torch.empty(shape, dtype=torch.uint8, device=device)  # 0, 1 or 2 (symm) winners per entry
        if word_term:
            torch.eq(word_winner[start:stop], region_index, out=counts)
        if region_term:
            match = region_winner[start:stop] == word_index
            if word_term:
                counts.add_(match)
            else:
                counts.copy_(match)
            del match
        G = torch.mul(counts, coefficient[start:stop]).view(shape[0] * text_pad, image_count * image_pad)
        del counts
        block = slice(start * text_pad, stop * text_pad)
        torch.mm(G, images_padded, out=grad_text_padded[block])
        if compute == accumulate:
            grad_images_padded.addmm_(G.t(), text_padded[block])
        else:
            grad_images_padded.add_(G.t() @ text_padded[block])
        del G
    text_dtype = compute if compute == torch.bfloat16 else accumulate
    return (_unpad(grad_text_padded, text.shape, text_rows, text_valid, text_dtype),
            _unpad(grad_images_padded, images.shape, image_rows, image_valid, accumulate))
