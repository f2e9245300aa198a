"""Exact recomputation of backward rows for non-finite values (the kernel contract's sparse sums).

The backward kernels multiply one-hot (0 / 1 / 2) weight tiles with token tiles on tensor cores. With a NaN
or inf token, a weight of 0 times inf is NaN, where the contract (docs/kernel_contract.md, the C++
backward) adds nothing. Such a value leaves the program's whole fp32 accumulator column NaN or inf, so each
program tests its accumulator (``_nonfinite``) and, where it ended non-finite, stores its rows from these
helpers instead: one row at a time, scalar loops over the winners, a [BLOCK_D] fp32 accumulator (few
registers, so the hot loop is unchanged), no product with a weight of 0. Slow, and only for the programs
that met a non-finite value.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_coefficient(grad_ptr, pair, n_w, n_r, text_pad, image_pad, AGGREGATION: tl.constexpr,
                      ZERO_PADDING: tl.constexpr):
    """Upstream gradient of one pair, with the 1/n_w (MrAVGw) or 1/cells (mean) scale folded in."""
    c = tl.load(grad_ptr + pair)
    if AGGREGATION == 1:
        c = tl.where(n_w > 0, c / tl.maximum(n_w, 1).to(tl.float32), 0.0)
    elif AGGREGATION == 5:
        if ZERO_PADDING:
            cells = text_pad.to(tl.float32) * image_pad.to(tl.float32)  # TERAN divides by the padded sizes
        else:
            cells = n_w.to(tl.float32) * n_r.to(tl.float32)
        c = tl.where(cells > 0, c / tl.maximum(cells, 1.0), 0.0)
    return c


@triton.jit
def _nonfinite(acc):
    """Whether any entry of an fp32 accumulator is NaN or inf (a scalar)."""
    return tl.sum(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32)) > 0


@triton.jit
def _exact_text_rows(grad_ptr, images_ptr, image_offsets_ptr, image_lengths_ptr, candidates_ptr, argmax_ptr,
                     region_argmax_ptr, out_ptr, text_idx, text_row0, n_w, w0, offs_d, d_ok, num_candidates, D,
                     text_pad, image_pad, AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr,
                     HAS_CANDIDATES: tl.constexpr, BLOCK_W: tl.constexpr):
    """Store a caption's rows ``[w0, w0 + BLOCK_W)`` (one D block) by the contract's sparse sum, one row at a
    time: ``d t_w = sum over pairs of c * (v_argmax(w) + sum of v_r over the regions r whose winner is w)``, pairs
    with a zero coefficient skipped (a NaN one is not). No product with a weight of 0, so a NaN / inf token
    reaches exactly the rows the C++ backward's does. Scalar loops and one [BLOCK_D] fp32 accumulator (few
    registers): the recomputation of a program whose one-hot tile dots met a NaN / inf (argmax aggregations)."""
    zero = text_idx * 0  # loop indices as tensors (the interpreter's are Python ints)
    for w in range(w0, tl.minimum(w0 + BLOCK_W, n_w)):
        acc = offs_d * 0.0
        for k in range(0, num_candidates):
            pair = text_idx.to(tl.int64) * num_candidates + k
            if HAS_CANDIDATES:
                image_idx = tl.load(candidates_ptr + pair)
            else:
                image_idx = k + zero
            n_r = tl.load(image_lengths_ptr + image_idx)
            c = _pair_coefficient(grad_ptr, pair, n_w, n_r, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            if c != 0.0:
                image_row0 = tl.load(image_offsets_ptr + image_idx)
                if AGGREGATION != 2:  # the word's winning region (a winning zero pad, index n_r: nothing)
                    won = tl.load(argmax_ptr + pair * text_pad + w)
                    if (won >= 0) & (won < n_r):
                        acc += c * tl.load(images_ptr + (image_row0 + won) * D + offs_d, mask=d_ok,
                                           other=0.0).to(tl.float32)
                if AGGREGATION == 2 or AGGREGATION == 3:  # the regions this word won
                    for r in range(0, n_r):
                        if tl.load(region_argmax_ptr + pair * image_pad + r) == w:
                            acc += c * tl.load(images_ptr + (image_row0 + r) * D + offs_d, mask=d_ok,
                                               other=0.0).to(tl.float32)
        tl.store(out_ptr + (text_row0 + w) * D + offs_d, acc, mask=d_ok)


@triton.jit
def _pair_image_row(text_ptr, argmax_ptr, region_argmax_ptr, pair, c, text_row0, n_w, r, offs_d, d_ok, D, text_pad,
                    image_pad, AGGREGATION: tl.constexpr):
    """One pair's share of image row r (one D block, fp32) by the contract's sparse sum: ``c`` times the rows
    of the words that won region r, plus the region's winning word (a zero pad: nothing). No product with a
    weight of 0; see ``_exact_text_rows``."""
    acc = offs_d * 0.0
    if AGGREGATION != 2:  # the words that won this region
        for w in range(0, n_w):
            if tl.load(argmax_ptr + pair * text_pad + w) == r:
                acc += c * tl.load(text_ptr + (text_row0 + w) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if AGGREGATION == 2 or AGGREGATION == 3:  # the region's winning word
        won = tl.load(region_argmax_ptr + pair * image_pad + r)
        if (won >= 0) & (won < n_w):
            acc += c * tl.load(text_ptr + (text_row0 + won) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _exact_image_rows(grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, pair_order_ptr, argmax_ptr,
                      region_argmax_ptr, out_ptr, image_idx, image_row0, n_r, r0, offs_d, d_ok, seg_begin, seg_end,
                      num_candidates, D, text_pad, image_pad, AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr,
                      HAS_CANDIDATES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Store an image's rows ``[r0, r0 + BLOCK_R)`` (one D block) by the contract's sparse sum over its pairs
    ``seg_begin .. seg_end`` (the same pairs, in the same order, as ``_backward_images_kernel``); see
    ``_exact_text_rows``."""
    zero = image_idx * 0
    for r in range(r0, tl.minimum(r0 + BLOCK_R, n_r)):
        acc = offs_d * 0.0
        for s in range(seg_begin, seg_end):
            if HAS_CANDIDATES:
                pair = tl.load(pair_order_ptr + s)
                text_idx = pair // num_candidates
            else:
                text_idx = s + zero
                pair = text_idx.to(tl.int64) * num_candidates + image_idx
            n_w = tl.load(text_lengths_ptr + text_idx)
            c = _pair_coefficient(grad_ptr, pair, n_w, n_r, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            if c != 0.0:
                acc += _pair_image_row(text_ptr, argmax_ptr, region_argmax_ptr, pair, c,
                                       tl.load(text_offsets_ptr + text_idx), n_w, r, offs_d, d_ok, D, text_pad,
                                       image_pad, AGGREGATION)
        tl.store(out_ptr + (image_row0 + r) * D + offs_d, acc, mask=d_ok)
