"""Packed-tile forward: several images x several captions per GEMM tile, pooled in the epilogue.

The per-pair kernel in ``alignment.py`` runs one ``[W, R]`` similarity tile at a
time (32 x 64 for TERAN shapes): too small for tensor cores to run near peak, and
every pair re-reads its caption from L2. Here one program computes a GEMM tile

    acc[m, n] = <v_m, t_n>,   m: regions of IMGS images stacked (R_pad rows each, not
                                 rounded up per image: 3 x 36 = 108 of 128 rows for R = 36),
                              n: words of CAPS captions stacked (W_pad columns each),

streaming D in BLOCK_K slices (a plain pipelined ``tl.dot`` loop: mma / wgmma for
16-bit inputs) and then pools it per (caption, image) pair in registers:

* word -> region max (MrSw, MrAVGw, symm, argmax): for image slot g, the max over
  its rows of each column, then per caption the sum over its valid columns;
* region -> word max (MwSr, symm, region argmax): for caption c, the max over its
  columns of each row, then per image the sum over its valid rows;
* sum / mean: masked column sums per image, then per caption.

All max reductions propagate NaN (``PropagateNan.ALL``), so a NaN among a pair's
valid similarities reaches its score with no separate NaN count. All-pairs mode
packs captions and images (grouped tile order for L2 reuse); rerank mode packs
IMGS consecutive candidates of one query (CAPS = 1). Semantics, argmax rules and
determinism are those of docs/kernel_contract.md: every pair is reduced by one
program in an order fixed by the block sizes.

Used when a whole caption and a whole image fit one tile (W_pad, R_pad <= 128);
longer sequences go to the per-pair kernel's block loops.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ._host import cached_config, cdiv, next_power_of_2
from .alignment_exact import _exact_image_rows, _exact_text_rows, _nonfinite

_NO_INDEX = tl.constexpr(1 << 30)
MAX_PACKED = 8  # images (captions) per tile: the epilogue is unrolled over them


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(x, axis: tl.constexpr, NAN_VIA_FLAG: tl.constexpr):
    """Max along ``axis`` that returns NaN where any element is NaN.

    Compiled: one reduction with a NaN-propagating combine. Interpreted: ``tl.max`` plus an
    any-NaN flag (the interpreter runs a custom combine in Python, ~200x slower).
    """
    if NAN_VIA_FLAG:
        best = tl.max(x, axis)
        return tl.where(tl.max((x != x).to(tl.int32), axis) > 0, float("nan"), best)
    return tl.reduce(x, axis, _max_nan)


@triton.jit
def _put(tile, ci, gi, c: tl.constexpr, g: tl.constexpr, value):
    """tile[c, g] += value (a scalar) on a small [CAPS_P2, IMGS_P2] register tile."""
    return tile + tl.where((ci[:, None] == c) & (gi[None, :] == g), value, 0.0)


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _packed_alignment_kernel(
    text_ptr, text_offsets_ptr, text_lengths_ptr,
    images_ptr, image_offsets_ptr, image_lengths_ptr,
    candidates_ptr, out_ptr, argmax_ptr, region_argmax_ptr,
    num_texts, num_candidates, D, text_pad, image_pad,
    AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr, WRITE_REGION_ARGMAX: tl.constexpr,
    IMGS: tl.constexpr, CAPS: tl.constexpr, IMGS_P2: tl.constexpr, CAPS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr = False, NAN_VIA_FLAG: tl.constexpr = False,
):
    NEED_ROWMAX: tl.constexpr = (AGGREGATION == 0) or (AGGREGATION == 1) or (AGGREGATION == 3) or WRITE_ARGMAX
    NEED_COLMAX: tl.constexpr = (AGGREGATION == 2) or (AGGREGATION == 3) or WRITE_REGION_ARGMAX
    NEED_SUM: tl.constexpr = (AGGREGATION == 4) or (AGGREGATION == 5)

    # ---- program -> (first caption, first candidate position)
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(num_candidates, IMGS)
    if HAS_CANDIDATES:
        text0 = pid // k_tiles
        k0 = (pid % k_tiles) * IMGS
    else:
        cap_tiles = tl.cdiv(num_texts, CAPS)
        per_group = GROUP_SIZE * k_tiles
        group = pid // per_group
        first = group * GROUP_SIZE
        rows = tl.minimum(cap_tiles - first, GROUP_SIZE)
        text0 = (first + (pid % per_group) % rows) * CAPS
        k0 = ((pid % per_group) // rows) * IMGS

    # ---- M side: regions of IMGS images, R_pad rows each
    offs_m = tl.arange(0, BLOCK_M)
    g_m = offs_m // image_pad
    r_m = offs_m % image_pad
    k_m = k0 + g_m
    slot_m = (g_m < IMGS) & (k_m < num_candidates)
    if HAS_CANDIDATES:
        img_m = tl.load(candidates_ptr + text0.to(tl.int64) * num_candidates + k_m, mask=slot_m, other=0)
    else:
        img_m = k_m
    img_row0_m = tl.load(image_offsets_ptr + img_m, mask=slot_m, other=0)
    n_r_m = tl.load(image_lengths_ptr + img_m, mask=slot_m, other=0)
    row_ok = slot_m & (r_m < n_r_m)

    # ---- N side: words of CAPS captions, W_pad columns each
    offs_n = tl.arange(0, BLOCK_N)
    c_n = offs_n // text_pad
    w_n = offs_n % text_pad
    cap_n = text0 + c_n
    slot_n = (c_n < CAPS) & (cap_n < num_texts)
    text_row0_n = tl.load(text_offsets_ptr + cap_n, mask=slot_n, other=0)
    n_w_n = tl.load(text_lengths_ptr + cap_n, mask=slot_n, other=0)
    col_ok = slot_n & (w_n < n_w_n)

    # ---- similarities: acc[m, n] = <image row m, text row n>, fp32 accumulation
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = images_ptr + (img_row0_m + r_m)[:, None] * D + offs_k[None, :]
    b_ptrs = text_ptr + (text_row0_n + w_n)[None, :] * D + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - d0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # ---- per-pair pooling into small [CAPS_P2, IMGS_P2] tiles
    ci = tl.arange(0, CAPS_P2)
    gi = tl.arange(0, IMGS_P2)
    row_part = tl.zeros((CAPS_P2, IMGS_P2), dtype=tl.float32)
    col_part = tl.zeros((CAPS_P2, IMGS_P2), dtype=tl.float32)
    total = tl.zeros((CAPS_P2, IMGS_P2), dtype=tl.float32)
    if NEED_ROWMAX or NEED_SUM:
        for g in tl.static_range(IMGS):
            in_g = row_ok & (g_m == g)
            # image slot g (a slot past the last candidate reads a valid id: nothing of it is stored)
            k_g = tl.minimum(k0 + g, num_candidates - 1)
            if HAS_CANDIDATES:
                img_g = tl.load(candidates_ptr + text0.to(tl.int64) * num_candidates + k_g)
            else:
                img_g = k_g
            n_r = tl.load(image_lengths_ptr + img_g)
            if NEED_ROWMAX:
                masked = tl.where(in_g[:, None], acc, float("-inf"))
                best = _nan_max(masked, 0, NAN_VIA_FLAG)  # [BLOCK_N]: max over image g's regions, NaN-propagating
                hit = in_g[:, None] & (masked == best[None, :])
                arg = tl.min(tl.where(hit, r_m[:, None], _NO_INDEX), axis=0)
                empty = n_r == 0
                m = tl.where(empty, 0.0, best)
                arg = tl.where(empty | (arg == _NO_INDEX), -1, arg)  # NaN columns: -1 (unspecified, in range)
                if ZERO_PADDING:
                    # padded regions are zero vectors: 0 competes when n_r < R_pad and wins only strictly
                    pad_wins = (n_r < image_pad) & (empty | (0.0 > best))
                    m = tl.where(pad_wins, 0.0, m)
                    arg = tl.where(pad_wins, n_r, arg)
                m = tl.where(col_ok, m, 0.0)
                if WRITE_ARGMAX:
                    pair_n = cap_n.to(tl.int64) * num_candidates + (k0 + g)
                    tl.store(argmax_ptr + pair_n * text_pad + w_n, tl.where(col_ok, arg, -1),
                             mask=slot_n & (k0 + g + 0 * offs_n < num_candidates))
                for c in tl.static_range(CAPS):
                    row_part = _put(row_part, ci, gi, c, g, tl.sum(tl.where(c_n == c, m, 0.0)))
            if NEED_SUM:
                col_sums = tl.sum(tl.where(in_g[:, None] & col_ok[None, :], acc, 0.0), axis=0)
                for c in tl.static_range(CAPS):
                    total = _put(total, ci, gi, c, g, tl.sum(tl.where(c_n == c, col_sums, 0.0)))
    if NEED_COLMAX:
        for c in tl.static_range(CAPS):
            in_c = col_ok & (c_n == c)
            n_w = tl.load(text_lengths_ptr + tl.minimum(text0 + c, num_texts - 1))  # past the end: never stored
            masked = tl.where(in_c[None, :], acc, float("-inf"))
            best = _nan_max(masked, 1, NAN_VIA_FLAG)  # [BLOCK_M]: max over caption c's words
            hit = in_c[None, :] & (masked == best[:, None])
            arg = tl.min(tl.where(hit, w_n[None, :], _NO_INDEX), axis=1)
            empty = n_w == 0
            cmax = tl.where(empty, 0.0, best)
            arg = tl.where(empty | (arg == _NO_INDEX), -1, arg)
            if ZERO_PADDING:
                pad_wins = (n_w < text_pad) & (empty | (0.0 > best))
                cmax = tl.where(pad_wins, 0.0, cmax)
                arg = tl.where(pad_wins, n_w, arg)
            cmax = tl.where(row_ok, cmax, 0.0)
            if WRITE_REGION_ARGMAX:
                pair_m = (text0 + c).to(tl.int64) * num_candidates + k_m
                tl.store(region_argmax_ptr + pair_m * image_pad + r_m, tl.where(row_ok, arg, -1),
                         mask=slot_m & (text0 + c + 0 * offs_m < num_texts))
            for g in tl.static_range(IMGS):
                col_part = _put(col_part, ci, gi, c, g, tl.sum(tl.where(g_m == g, cmax, 0.0)))

    # ---- scores of the CAPS x IMGS pairs
    cap = text0 + ci
    k = k0 + gi
    pair_ok = (ci[:, None] < CAPS) & (gi[None, :] < IMGS) & (cap < num_texts)[:, None] & (k < num_candidates)[None, :]
    pair = cap.to(tl.int64)[:, None] * num_candidates + k[None, :]
    n_w = tl.load(text_lengths_ptr + cap, mask=(ci < CAPS) & (cap < num_texts), other=0)
    if HAS_CANDIDATES:
        img = tl.load(candidates_ptr + pair, mask=pair_ok, other=0)
    else:
        img = k[None, :] + 0 * ci[:, None]
    n_r = tl.load(image_lengths_ptr + img, mask=pair_ok, other=0)
    if AGGREGATION == 0:
        score = row_part
    elif AGGREGATION == 1:
        score = tl.where(n_w[:, None] > 0, row_part / tl.maximum(n_w, 1).to(tl.float32)[:, None], 0.0)
    elif AGGREGATION == 2:
        score = col_part
    elif AGGREGATION == 3:
        score = row_part + col_part
    elif AGGREGATION == 4:
        score = total
    else:
        if ZERO_PADDING:
            # TERAN divides by the padded sizes (a [CAPS_P2, IMGS_P2] tile without touching `total`: a NaN or
            # inf sum must not turn the divisor into NaN)
            cells = tl.zeros_like(total) + text_pad.to(tl.float32) * image_pad.to(tl.float32)
        else:
            cells = n_w.to(tl.float32)[:, None] * n_r.to(tl.float32)
        score = tl.where(cells > 0, total / tl.maximum(cells, 1.0), 0.0)
    tl.store(out_ptr + pair, score, mask=pair_ok)


class PackedConfig(NamedTuple):
    IMGS: int
    CAPS: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_SIZE: int
    num_warps: int
    num_stages: int
    grid: tuple


def packed_fits(text_pad: int, image_pad: int) -> bool:
    return 1 <= text_pad <= 128 and 1 <= image_pad <= 128


@cached_config
def packed_launch_config(*, num_texts: int, num_candidates: int, text_pad: int, image_pad: int, element_size: int,
                         all_pairs: bool, override: dict | None = None) -> PackedConfig:
    """Tile shape of ``_packed_alignment_kernel`` (``override`` for tests / tuning)."""
    override = dict(override or {})
    block_m = override.pop("BLOCK_M", min(128, next_power_of_2(max(16, image_pad * MAX_PACKED))))
    imgs = override.pop("IMGS", max(1, min(block_m // image_pad, MAX_PACKED, num_candidates)))
    if all_pairs:
        # 128 x 64 tiles: 128 x 128 ones spill registers in the pooling epilogue (sm_90 AOT: 255 regs + stack)
        block_n = override.pop("BLOCK_N", max(next_power_of_2(text_pad),
                                              min(64, next_power_of_2(max(16, text_pad * MAX_PACKED)))))
        caps = override.pop("CAPS", max(1, min(block_n // text_pad, MAX_PACKED, num_texts)))
    else:
        block_n = override.pop("BLOCK_N", next_power_of_2(max(16, text_pad)))
        caps = override.pop("CAPS", 1)
    block_k = override.pop("BLOCK_K", 64 if element_size <= 2 else 32)
    group_size = override.pop("GROUP_SIZE", 8)
    # H200, training shape (bf16, D=1024), 128 x 64 tiles: 4 warps 0.167 ms, 8 warps 0.261 ms (GPU run 3 sweep)
    num_warps = override.pop("num_warps", 8 if block_m * block_n > 128 * 64 else 4)
    num_stages = override.pop("num_stages", 3 if element_size <= 2 else 2)
    if override:
        raise KeyError(f"unknown packed launch override(s): {sorted(override)}")
    if imgs * image_pad > block_m or caps * text_pad > block_n or (not all_pairs and caps != 1):
        raise ValueError(f"tile {block_m}x{block_n} cannot hold {imgs} images of {image_pad} regions and "
                         f"{caps} captions of {text_pad} words")
    tiles = cdiv(num_candidates, imgs) * (cdiv(num_texts, caps) if all_pairs else num_texts)
    return PackedConfig(imgs, caps, block_m, block_n, block_k, group_size, num_warps, num_stages, (tiles, ))


# --------------------------------------------------------------------------- backward (all pairs)


@triton.jit
def _tile_rows(image_offsets_ptr, image_lengths_ptr, k0, num_candidates, image_pad, BLOCK_M: tl.constexpr,
               IMGS: tl.constexpr):
    """M side of an all-pairs tile: (image slot, region, row offset, length, slot ok, row ok) per row."""
    offs_m = tl.arange(0, BLOCK_M)
    g_m = offs_m // image_pad
    r_m = offs_m % image_pad
    img_m = k0 + g_m
    slot_m = (g_m < IMGS) & (img_m < num_candidates)
    row0_m = tl.load(image_offsets_ptr + img_m, mask=slot_m, other=0)
    n_r_m = tl.load(image_lengths_ptr + img_m, mask=slot_m, other=0)
    return g_m, r_m, row0_m, n_r_m, slot_m & (r_m < n_r_m)


@triton.jit
def _pair_weight_tile(grad_ptr, argmax_ptr, region_argmax_ptr, text0, k0, num_texts, num_candidates, text_pad,
                      image_pad, g_m, r_m, n_r_m, row_ok, c_n, w_n, n_w_n, col_ok,
                      AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, IMGS: tl.constexpr,
                      CAPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """P[m, n] in fp32: the upstream gradient of pair (caption c(n), image g(m)), scaled (1/n_w, 1/cells), times
    its weight at (region r(m), word w(n)): 1 where the word's max went to the region, 1 where the region's max
    went to the word (symm: both), 1 on every valid cell for sum / mean."""
    weights = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cap_n = text0 + c_n
    if AGGREGATION != 2:  # per image slot: the words' winners and coefficients as column vectors
        for g in tl.static_range(IMGS):
            k_g = k0 + g
            ok = col_ok & (k_g + 0 * c_n < num_candidates)
            pair = cap_n.to(tl.int64) * num_candidates + k_g
            coef = tl.load(grad_ptr + pair, mask=ok, other=0.0)
            if AGGREGATION == 1:
                coef = coef / tl.maximum(n_w_n, 1).to(tl.float32)
            if AGGREGATION >= 4:  # sum / mean: every cell (mean without zero padding: 1/cells below)
                if AGGREGATION == 5 and ZERO_PADDING:  # TERAN divides by the padded sizes
                    coef = coef / tl.maximum(text_pad.to(tl.float32) * image_pad.to(tl.float32), 1.0)
                weights += tl.where((g_m == g)[:, None], coef[None, :], 0.0)
            else:
                winner = tl.load(argmax_ptr + pair * text_pad + w_n, mask=ok, other=-1)
                weights += tl.where((g_m == g)[:, None] & (winner[None, :] == r_m[:, None]), coef[None, :], 0.0)
    if AGGREGATION == 2 or AGGREGATION == 3:  # per caption: the regions' winners as row vectors
        for c in tl.static_range(CAPS):
            ok = row_ok & (text0 + c + 0 * g_m < num_texts)
            pair = (text0 + c).to(tl.int64) * num_candidates + (k0 + g_m)
            coef = tl.load(grad_ptr + pair, mask=ok, other=0.0)
            winner = tl.load(region_argmax_ptr + pair * image_pad + r_m, mask=ok, other=-1)
            weights += tl.where((c_n == c)[None, :] & (winner[:, None] == w_n[None, :]), coef[:, None], 0.0)
    if AGGREGATION == 5 and not ZERO_PADDING:
        cells = n_w_n.to(tl.float32)[None, :] * n_r_m.to(tl.float32)[:, None]
        weights = weights / tl.maximum(cells, 1.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], weights, 0.0)


@triton.jit
def _split_dot(weights, tokens, acc, TRANSPOSE: tl.constexpr, SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc += weights @ tokens (weights.T @ tokens): 16-bit tokens take the fp32 weights as a hi + lo pair
    of the tokens' dtype (two tensor-core products, ~16 mantissa bits), fp32 tokens take them exactly."""
    if TRANSPOSE:
        weights = tl.trans(weights)
    if DOT_IN_FP32:
        return tl.dot(weights, tokens.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    hi = weights.to(tokens.dtype)
    acc = tl.dot(hi, tokens, acc, input_precision="ieee", out_dtype=tl.float32)
    if SPLIT:
        lo = (weights - hi.to(tl.float32)).to(tokens.dtype)
        acc = tl.dot(lo, tokens, acc, input_precision="ieee", out_dtype=tl.float32)
    return acc


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _packed_backward_kernel(
    grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, images_ptr, image_offsets_ptr, image_lengths_ptr,
    argmax_ptr, region_argmax_ptr, out_ptr,
    num_texts, num_images, D, text_pad, image_pad,
    AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, TEXT_SIDE: tl.constexpr,
    IMGS: tl.constexpr, CAPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr = False,
):
    """All-pairs backward, one output tile per program (no atomics, fixed order: deterministic).

    TEXT_SIDE: rows of CAPS captions x a D slice; loops over image tiles, acc += P.T @ V.
    else:      rows of IMGS images x a D slice; loops over caption tiles, acc += P @ T.
    """
    owner = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    c_n = offs_n // text_pad
    w_n = offs_n % text_pad
    if TEXT_SIDE:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        text0 = owner * CAPS
        steps = tl.cdiv(num_images, IMGS)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        k0 = owner * IMGS
        steps = tl.cdiv(num_texts, CAPS)
    for step in range(0, steps):
        if TEXT_SIDE:
            k0 = step * IMGS
        else:
            text0 = step * CAPS
        cap_n = text0 + c_n
        slot_n = (c_n < CAPS) & (cap_n < num_texts)
        text_row0_n = tl.load(text_offsets_ptr + cap_n, mask=slot_n, other=0)
        n_w_n = tl.load(text_lengths_ptr + cap_n, mask=slot_n, other=0)
        col_ok = slot_n & (w_n < n_w_n)
        g_m, r_m, row0_m, n_r_m, row_ok = _tile_rows(image_offsets_ptr, image_lengths_ptr, k0, num_images,
                                                     image_pad, BLOCK_M, IMGS)
        weights = _pair_weight_tile(grad_ptr, argmax_ptr, region_argmax_ptr, text0, k0, num_texts, num_images,
                                    text_pad, image_pad, g_m, r_m, n_r_m, row_ok, c_n, w_n, n_w_n, col_ok,
                                    AGGREGATION, ZERO_PADDING, IMGS, CAPS, BLOCK_M, BLOCK_N)
        if TEXT_SIDE:
            v = tl.load(images_ptr + (row0_m + r_m)[:, None] * D + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            acc = _split_dot(weights, v, acc, True, SPLIT, DOT_IN_FP32)
        else:
            t = tl.load(text_ptr + (text_row0_n + w_n)[:, None] * D + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = _split_dot(weights, t, acc, False, SPLIT, DOT_IN_FP32)
    if TEXT_SIDE:
        cap_n = owner * CAPS + c_n
        slot_n = (c_n < CAPS) & (cap_n < num_texts)
        text_row0_n = tl.load(text_offsets_ptr + cap_n, mask=slot_n, other=0)
        n_w_n = tl.load(text_lengths_ptr + cap_n, mask=slot_n, other=0)
        rows = text_row0_n + w_n
        ok = slot_n & (w_n < n_w_n)
    else:
        g_m, r_m, row0_m, n_r_m, ok = _tile_rows(image_offsets_ptr, image_lengths_ptr, owner * IMGS, num_images,
                                                 image_pad, BLOCK_M, IMGS)
        rows = row0_m + r_m
    exact = False
    if AGGREGATION < 4:  # argmax terms: the one-hot tiles spread 0 x inf; store the sparse sums instead
        exact = _nonfinite(acc)
    if exact:
        zero = owner * 0
        if TEXT_SIDE:
            for c in tl.static_range(CAPS):
                text_idx = owner * CAPS + c
                if text_idx < num_texts:
                    _exact_text_rows(grad_ptr, images_ptr, image_offsets_ptr, image_lengths_ptr, grad_ptr, argmax_ptr,
                                     region_argmax_ptr, out_ptr, text_idx, tl.load(text_offsets_ptr + text_idx),
                                     tl.load(text_lengths_ptr + text_idx), zero, offs_d, d_ok, num_images, D,
                                     text_pad, image_pad, AGGREGATION, ZERO_PADDING, False, BLOCK_N)
        else:
            for g in tl.static_range(IMGS):
                image_idx = owner * IMGS + g
                if image_idx < num_images:
                    first = zero.to(tl.int64)
                    _exact_image_rows(grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, grad_ptr, argmax_ptr,
                                      region_argmax_ptr, out_ptr, image_idx, tl.load(image_offsets_ptr + image_idx),
                                      tl.load(image_lengths_ptr + image_idx), zero, offs_d, d_ok, first,
                                      first + num_texts, num_images, D, text_pad, image_pad, AGGREGATION,
                                      ZERO_PADDING, False, BLOCK_M)
    else:
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=ok[:, None] & d_ok[None, :])


def packed_backward_config(*, num_texts: int, num_images: int, dim: int, text_pad: int, image_pad: int,
                           element_size: int, override: dict | None = None) -> dict:
    """Tile shapes of ``_packed_backward_kernel`` (same packing as the forward's all-pairs tiles)."""
    override = dict(override or {})
    fwd = packed_launch_config(num_texts=num_texts, num_candidates=num_images, text_pad=text_pad,
                               image_pad=image_pad, element_size=element_size, all_pairs=True,
                               override={key: override.pop(key) for key in ("BLOCK_M", "BLOCK_N", "IMGS", "CAPS")
                                         if key in override})
    cfg = dict(IMGS=fwd.IMGS, CAPS=fwd.CAPS, BLOCK_M=fwd.BLOCK_M, BLOCK_N=fwd.BLOCK_N,
               BLOCK_D=override.pop("BLOCK_D", min(64, next_power_of_2(max(16, dim)))),
               SPLIT=override.pop("SPLIT", element_size <= 2),
               num_warps=override.pop("num_warps", 8), num_stages=override.pop("num_stages", 2))
    if override:
        raise KeyError(f"unknown packed backward override(s): {sorted(override)}")
    return cfg


# --------------------------------------------------------------------------- ahead-of-time specialisations


def _aot_spec(name, kernel, dtype_name, constexprs, options, dim=1024):
    from .alignment import _FP_FUSION, AotSpec

    element = "*" + dtype_name
    pointer_types = {"text_ptr": element, "images_ptr": element, "out_ptr": "*fp32", "grad_ptr": "*fp32",
                     "text_offsets_ptr": "*i64", "image_offsets_ptr": "*i64", "candidates_ptr": "*i64"}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointer_types.get(arg, "*i32")
        else:
            signature[arg] = "i32"
    aligned = [key for key, kind in signature.items() if kind.startswith("*")] + (["D"] if dim % 16 == 0 else [])
    attrs = {(kernel.arg_names.index(key), ): [["tt.divisibility", 16]] for key in aligned}
    return AotSpec(name, kernel, signature, constexprs, dict(options, enable_fp_fusion=_FP_FUSION), attrs)


def packed_aot_specs() -> list:
    """Packed-tile forward and backward at the training / rerank shapes (W=32, R=36, D=1024)."""
    specs = []
    for name, dtype_name, size, all_pairs, aggregation, argmax, region in (
            ("packed_all_pairs_bf16_MrSw", "bf16", 2, True, 0, False, False),
            ("packed_all_pairs_bf16_symm_argmaxes", "bf16", 2, True, 3, True, True),
            ("packed_rerank_fp16_MrSw_argmax", "fp16", 2, False, 0, True, False),
            ("packed_all_pairs_fp32_mean", "fp32", 4, True, 5, False, False)):
        cfg = packed_launch_config(num_texts=128, num_candidates=128 if all_pairs else 1000, text_pad=32,
                                   image_pad=36, element_size=size, all_pairs=all_pairs)
        constexprs = dict(AGGREGATION=aggregation, ZERO_PADDING=False, HAS_CANDIDATES=not all_pairs,
                          WRITE_ARGMAX=argmax, WRITE_REGION_ARGMAX=region, IMGS=cfg.IMGS, CAPS=cfg.CAPS,
                          IMGS_P2=next_power_of_2(cfg.IMGS), CAPS_P2=next_power_of_2(cfg.CAPS),
                          BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_SIZE=cfg.GROUP_SIZE,
                          DOT_IN_FP32=False, NAN_VIA_FLAG=False)
        specs.append(_aot_spec(name, _packed_alignment_kernel, dtype_name, constexprs,
                               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    bwd = packed_backward_config(num_texts=128, num_images=128, dim=1024, text_pad=32, image_pad=36, element_size=2)
    for side in (True, False):
        constexprs = dict(AGGREGATION=3, ZERO_PADDING=True, TEXT_SIDE=side, IMGS=bwd["IMGS"], CAPS=bwd["CAPS"],
                          BLOCK_M=bwd["BLOCK_M"], BLOCK_N=bwd["BLOCK_N"], BLOCK_D=bwd["BLOCK_D"], SPLIT=bwd["SPLIT"],
                          DOT_IN_FP32=False)
        specs.append(_aot_spec(f"packed_bwd_{'text' if side else 'images'}_bf16_symm_zero", _packed_backward_kernel,
                               "bf16", constexprs, {"num_warps": bwd["num_warps"], "num_stages": bwd["num_stages"]}))
    return specs
