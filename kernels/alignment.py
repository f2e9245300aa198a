"""Fused word-region alignment scores: Triton kernel, launch heuristics, launcher.

One kernel serves every mode of ``docs/kernel_contract.md``:

* all pairs (``candidates is None``): caption i against every image; programs are
  laid out in groups of ``GROUP_SIZE`` captions that sweep the same image blocks
  together, so a block of images stays in L2 while several captions use it;
* rerank / paired (``candidates`` given): caption i against its own K image ids,
  gathered by id (offset and length read from ``image_offsets``/``image_lengths``).

Each program owns one caption and ``BLOCK_K`` consecutive candidates and scores
them one after the other.  A pair's similarity tile ``[BLOCK_W, BLOCK_R]`` lives
in registers as an fp32 accumulator while D is streamed in ``BLOCK_D`` chunks
through ``tl.dot`` (tensor cores for fp16/bf16; exact fp32 FMA for fp32 via
``input_precision="ieee"``).  When the padded caption or image is longer than one
block, the kernel loops over word blocks (row maxes, argmax, sums) and, for MwSr
and symm, over region blocks (column maxes) in a second pass.

Every pair is reduced by exactly one program in an order fixed by BLOCK_W /
BLOCK_R / BLOCK_D, which depend only on the shapes and dtype: scores are
deterministic (BLOCK_K and the grid, which follow the SM count, only decide which
program reduces a pair, not how).

Known gaps (performance only): regions of several images are not yet packed
side by side along N (R = 36 pads to 64, 44% of the MMA work wasted in all-pairs
mode), nor captions along M; with BLOCK_W = 32 Hopper runs mma.sync rather than
wgmma (which needs 64 rows per warpgroup); fp32 inputs use exact FMA dots, not
tensor cores.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2

from .alignment_packed import _packed_alignment_kernel, packed_fits, packed_launch_config

# aggregation codes (docs/kernel_contract.md)
MRSW, MRAVGW, MWSR, SYMM, SUM, MEAN = 0, 1, 2, 3, 4, 5

_NO_INDEX = tl.constexpr(1 << 30)  # "no valid region has won yet" marker for the running argmax


# --------------------------------------------------------------------------- kernels


@triton.jit
def _similarity_tile(text_ptr, text_row0, n_w, w0, image_ptr, image_row0, n_r, r0, D, query_tile,
                     QUERY_RESIDENT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """s[w, r] = <t_{w0+w}, v_{r0+r}> in fp32 for one [BLOCK_W, BLOCK_R] tile (zero outside the lengths)."""
    offs_w = w0 + tl.arange(0, BLOCK_W)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    w_ok = offs_w < n_w
    r_ok = offs_r < n_r
    # image chunk loaded transposed ([BLOCK_D, BLOCK_R]) so the dot is a plain A @ B
    b_ptrs = image_ptr + (image_row0 + offs_r)[None, :] * D + offs_d[:, None]
    if QUERY_RESIDENT:
        # the whole caption fits one tile and D one chunk: the caller loaded it once
        b = tl.load(b_ptrs, mask=(offs_d < D)[:, None] & r_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            b = b.to(tl.float32)
        acc = tl.dot(query_tile, b, input_precision="ieee", out_dtype=tl.float32)
    else:
        a_ptrs = text_ptr + (text_row0 + offs_w)[:, None] * D + offs_d[None, :]
        acc = tl.zeros((BLOCK_W, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = offs_d < D - d0
            a = tl.load(a_ptrs, mask=w_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            # "ieee": fp32 inputs stay exact (no TF32); fp16/bf16 products are exact in fp32 anyway
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
            a_ptrs += BLOCK_D
            b_ptrs += BLOCK_D
    return acc


@triton.jit
def _update_row_max(acc, valid, offs_r, run_max, run_arg):
    """Fold one region block into the running per-word max / first-index argmax."""
    masked = tl.where(valid, acc, float("-inf"))
    block_max = tl.max(masked, axis=1)
    # first index attaining the max; a NaN max matches nothing (NaN pairs are flagged separately)
    hit = valid & (masked == block_max[:, None])
    block_arg = tl.min(tl.where(hit, offs_r[None, :], _NO_INDEX), axis=1)
    # strict '>' keeps the earlier block on ties: region blocks are visited in increasing order
    take = (block_arg < _NO_INDEX) & ((block_max > run_max) | (run_arg == _NO_INDEX))
    run_max = tl.where(take, block_max, run_max)
    run_arg = tl.where(take, block_arg, run_arg)
    return run_max, run_arg


@triton.jit
def _finish_rows(run_max, run_arg, w_ok, n_r, image_pad, ZERO_PADDING: tl.constexpr):
    """Row maxes m_w -> (sum over valid words, argmax with the padding / empty-set rules)."""
    empty = run_arg == _NO_INDEX  # n_r == 0 (or only NaN): an empty max contributes 0
    m = tl.where(empty, 0.0, run_max)
    arg = tl.where(empty, -1, run_arg)
    if ZERO_PADDING:
        # padded regions are zero vectors: 0 competes when n_r < R_pad, and wins only strictly
        pad_wins = (n_r < image_pad) & (empty | (0.0 > run_max))
        m = tl.where(pad_wins, 0.0, m)
        arg = tl.where(pad_wins, n_r, arg)
    arg = tl.where(w_ok, arg, -1)
    return tl.sum(tl.where(w_ok, m, 0.0), axis=0), arg


@triton.jit
def _finish_cols(col_max, r_ok, n_w, text_pad, ZERO_PADDING: tl.constexpr):
    """Column maxes c_r -> sum over valid regions (MwSr)."""
    c = col_max
    if ZERO_PADDING:
        c = tl.where(n_w < text_pad, tl.maximum(c, 0.0), c)
    c = tl.where(n_w == 0, 0.0, c)  # empty max (or max over {0} alone) contributes 0
    return tl.sum(tl.where(r_ok, c, 0.0), axis=0)


@triton.jit
def _count_nan(acc, valid):
    return tl.sum(((acc != acc) & valid).to(tl.int32))


# text_pad / image_pad must stay runtime i32 (a value of 1 would otherwise become a constexpr)
@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _alignment_kernel(
    text_ptr, text_offsets_ptr, text_lengths_ptr,
    images_ptr, image_offsets_ptr, image_lengths_ptr,
    candidates_ptr, out_ptr, argmax_ptr, region_argmax_ptr,
    num_texts, num_candidates, D, text_pad, image_pad,
    AGGREGATION: tl.constexpr,      # 0 MrSw, 1 MrAVGw, 2 MwSr, 3 symm, 4 sum, 5 mean
    ZERO_PADDING: tl.constexpr,     # padding="zero" (TERAN) instead of "neg_inf"
    HAS_CANDIDATES: tl.constexpr,   # rerank / paired; else all pairs (candidate k is image k)
    WRITE_ARGMAX: tl.constexpr,
    WRITE_REGION_ARGMAX: tl.constexpr,  # region -> winning word [pairs, image_pad] (MwSr / symm backward)
    SINGLE_TILE: tl.constexpr,      # text_pad <= BLOCK_W and image_pad <= BLOCK_R
    QUERY_RESIDENT: tl.constexpr,   # SINGLE_TILE and D <= BLOCK_D: caption loaded once per program
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,          # candidates scored by one program
    GROUP_SIZE: tl.constexpr,       # captions sweeping the same candidate blocks together (L2 reuse)
    DOT_IN_FP32: tl.constexpr = False,  # interpreter only: its dot multiplies bf16 bit patterns
):
    # ---- program -> (caption, candidate block), grouped ordering
    pid = tl.program_id(0)
    num_k_blocks = tl.cdiv(num_candidates, BLOCK_K)
    programs_per_group = GROUP_SIZE * num_k_blocks
    group = pid // programs_per_group
    first_text = group * GROUP_SIZE
    group_rows = tl.minimum(num_texts - first_text, GROUP_SIZE)
    text_idx = first_text + (pid % programs_per_group) % group_rows
    k_block = (pid % programs_per_group) // group_rows

    NEED_ROWMAX: tl.constexpr = (AGGREGATION == 0) or (AGGREGATION == 1) or (AGGREGATION == 3) or WRITE_ARGMAX
    NEED_COLMAX: tl.constexpr = (AGGREGATION == 2) or (AGGREGATION == 3) or WRITE_REGION_ARGMAX
    NEED_SUM: tl.constexpr = (AGGREGATION == 4) or (AGGREGATION == 5)
    ROW_PASS: tl.constexpr = NEED_ROWMAX or NEED_SUM

    text_row0 = tl.load(text_offsets_ptr + text_idx)
    n_w = tl.load(text_lengths_ptr + text_idx)
    text_idx64 = text_idx.to(tl.int64)

    offs_w0 = tl.arange(0, BLOCK_W)
    offs_r0 = tl.arange(0, BLOCK_R)
    if QUERY_RESIDENT:
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = text_ptr + (text_row0 + offs_w0)[:, None] * D + offs_d[None, :]
        query_tile = tl.load(q_ptrs, mask=(offs_w0 < n_w)[:, None] & (offs_d < D)[None, :], other=0.0)
        if DOT_IN_FP32:
            query_tile = query_tile.to(tl.float32)
    else:
        query_tile = 0.0  # unused

    for kk in range(0, BLOCK_K):
        k = k_block * BLOCK_K + kk
        if k < num_candidates:
            pair = text_idx64 * num_candidates + k
            if HAS_CANDIDATES:
                image_idx = tl.load(candidates_ptr + pair)
            else:
                image_idx = k
            image_row0 = tl.load(image_offsets_ptr + image_idx)
            n_r = tl.load(image_lengths_ptr + image_idx)

            row_sum = 0.0
            col_sum = 0.0
            total = 0.0
            nan_count = 0
            if SINGLE_TILE:
                # common case (e.g. W=32, R=36): one tile answers every aggregation
                acc = _similarity_tile(text_ptr, text_row0, n_w, 0, images_ptr, image_row0, n_r, 0, D,
                                       query_tile, QUERY_RESIDENT, BLOCK_W, BLOCK_R, BLOCK_D, DOT_IN_FP32)
                w_ok = offs_w0 < n_w
                r_ok = offs_r0 < n_r
                valid = w_ok[:, None] & r_ok[None, :]
                nan_count = _count_nan(acc, valid)
                if NEED_ROWMAX:
                    run_max = tl.full((BLOCK_W, ), float("-inf"), tl.float32)
                    run_arg = tl.full((BLOCK_W, ), _NO_INDEX, tl.int32)
                    run_max, run_arg = _update_row_max(acc, valid, offs_r0, run_max, run_arg)
                    row_sum, arg = _finish_rows(run_max, run_arg, w_ok, n_r, image_pad, ZERO_PADDING)
                    if WRITE_ARGMAX:
                        tl.store(argmax_ptr + pair * text_pad + offs_w0, arg, mask=offs_w0 < text_pad)
                if NEED_COLMAX:
                    if WRITE_REGION_ARGMAX:
                        # the row-max helpers on the transposed tile: same max, plus the first winning word
                        col_max = tl.full((BLOCK_R, ), float("-inf"), tl.float32)
                        col_arg = tl.full((BLOCK_R, ), _NO_INDEX, tl.int32)
                        col_max, col_arg = _update_row_max(tl.trans(acc), tl.trans(valid), offs_w0, col_max, col_arg)
                        col_sum, region_arg = _finish_rows(col_max, col_arg, r_ok, n_w, text_pad, ZERO_PADDING)
                        tl.store(region_argmax_ptr + pair * image_pad + offs_r0, region_arg, mask=offs_r0 < image_pad)
                    else:
                        col_max = tl.max(tl.where(valid, acc, float("-inf")), axis=0)
                        col_sum = _finish_cols(col_max, r_ok, n_w, text_pad, ZERO_PADDING)
                if NEED_SUM:
                    total = tl.sum(tl.where(valid, acc, 0.0))
            else:
                if ROW_PASS:
                    # word blocks outer (up to text_pad so padded words get argmax -1), region blocks inner
                    for w0 in range(0, text_pad, BLOCK_W):
                        offs_w = w0 + offs_w0
                        w_ok = offs_w < n_w
                        run_max = tl.full((BLOCK_W, ), float("-inf"), tl.float32)
                        run_arg = tl.full((BLOCK_W, ), _NO_INDEX, tl.int32)
                        r_end = tl.where(w0 < n_w, n_r, 0)  # blocks of padded words: nothing to compute
                        for r0 in range(0, r_end, BLOCK_R):
                            acc = _similarity_tile(text_ptr, text_row0, n_w, w0, images_ptr, image_row0, n_r, r0,
                                                   D, query_tile, False, BLOCK_W, BLOCK_R, BLOCK_D, DOT_IN_FP32)
                            offs_r = r0 + offs_r0
                            valid = w_ok[:, None] & (offs_r < n_r)[None, :]
                            nan_count += _count_nan(acc, valid)
                            if NEED_ROWMAX:
                                run_max, run_arg = _update_row_max(acc, valid, offs_r, run_max, run_arg)
                            if NEED_SUM:
                                total += tl.sum(tl.where(valid, acc, 0.0))
                        if NEED_ROWMAX:
                            block_sum, arg = _finish_rows(run_max, run_arg, w_ok, n_r, image_pad, ZERO_PADDING)
                            row_sum += block_sum
                            if WRITE_ARGMAX:
                                tl.store(argmax_ptr + pair * text_pad + offs_w, arg, mask=offs_w < text_pad)
                if NEED_COLMAX:
                    # region blocks outer, word blocks inner: running column max over words
                    for r0 in range(0, n_r, BLOCK_R):
                        offs_r = r0 + offs_r0
                        r_ok = offs_r < n_r
                        col_max = tl.full((BLOCK_R, ), float("-inf"), tl.float32)
                        col_arg = tl.full((BLOCK_R, ), _NO_INDEX, tl.int32)
                        for w0 in range(0, n_w, BLOCK_W):
                            acc = _similarity_tile(text_ptr, text_row0, n_w, w0, images_ptr, image_row0, n_r, r0,
                                                   D, query_tile, False, BLOCK_W, BLOCK_R, BLOCK_D, DOT_IN_FP32)
                            valid = ((w0 + offs_w0) < n_w)[:, None] & r_ok[None, :]
                            if not ROW_PASS:
                                nan_count += _count_nan(acc, valid)
                            if WRITE_REGION_ARGMAX:
                                col_max, col_arg = _update_row_max(tl.trans(acc), tl.trans(valid), w0 + offs_w0,
                                                                   col_max, col_arg)
                            else:
                                col_max = tl.maximum(col_max, tl.max(tl.where(valid, acc, float("-inf")), axis=0))
                        if WRITE_REGION_ARGMAX:
                            block_sum, region_arg = _finish_rows(col_max, col_arg, r_ok, n_w, text_pad, ZERO_PADDING)
                            col_sum += block_sum
                            tl.store(region_argmax_ptr + pair * image_pad + offs_r, region_arg, mask=r_ok)
                        else:
                            col_sum += _finish_cols(col_max, r_ok, n_w, text_pad, ZERO_PADDING)

            if AGGREGATION == 0:
                score = row_sum
            elif AGGREGATION == 1:
                score = tl.where(n_w > 0, row_sum / tl.maximum(n_w, 1).to(tl.float32), 0.0)
            elif AGGREGATION == 2:
                score = col_sum
            elif AGGREGATION == 3:
                score = row_sum + col_sum
            elif AGGREGATION == 4:
                score = total
            else:
                if ZERO_PADDING:
                    # TERAN divides by the padded sizes
                    cells = text_pad.to(tl.float32) * image_pad.to(tl.float32)
                else:
                    cells = n_w.to(tl.float32) * n_r.to(tl.float32)
                score = tl.where(cells > 0, total / tl.maximum(cells, 1.0), 0.0)
            # max reductions may drop NaN: a NaN anywhere among the valid s_wr poisons the pair
            score = tl.where(nan_count > 0, float("nan"), score)
            tl.store(out_ptr + pair, score)


# --------------------------------------------------------------------------- launch heuristics


class LaunchConfig(NamedTuple):
    BLOCK_W: int
    BLOCK_R: int
    BLOCK_D: int
    BLOCK_K: int
    GROUP_SIZE: int
    num_warps: int
    num_stages: int
    single_tile: bool
    query_resident: bool
    grid: tuple


def _pow2_block(n: int, cap: int) -> int:
    return min(next_power_of_2(max(int(n), 16)), cap)


def alignment_launch_config(*, num_texts: int, num_candidates: int, dim: int, text_pad: int, image_pad: int,
                            element_size: int, all_pairs: bool, num_sms: int = 132,
                            override: dict | None = None) -> LaunchConfig:
    """Every launch decision of ``_alignment_kernel`` lives here.

    ``override`` (tests, tuning) may set BLOCK_W, BLOCK_R, BLOCK_D, BLOCK_K, GROUP_SIZE,
    num_warps, num_stages; the derived flags and the grid follow from them.
    """
    override = dict(override or {})
    # tl.dot wants power-of-two blocks >= 16; longer captions / images loop over blocks
    block_w = override.pop("BLOCK_W", _pow2_block(text_pad, 64))
    block_r = override.pop("BLOCK_R", _pow2_block(image_pad, 64 if element_size >= 4 else 128))
    num_stages = override.pop("num_stages", 2 if element_size >= 4 else 3)
    if element_size >= 4:
        # exact fp32 dots run on FMA units with operands in registers: keep the D chunk small
        default_d = _pow2_block(dim, 32)
    else:
        default_d = _pow2_block(dim, 128)
        if text_pad <= block_w and image_pad <= block_r and dim <= 256:
            default_d = _pow2_block(dim, 256)  # whole caption stays in registers across candidates
        # pipelined operand buffers must fit shared memory on every target (A100: 163 KiB)
        while default_d > 32 and num_stages * (block_w + block_r) * default_d * element_size > 128 * 1024:
            default_d //= 2
    block_d = override.pop("BLOCK_D", default_d)
    single_tile = text_pad <= block_w and image_pad <= block_r
    query_resident = single_tile and dim <= block_d

    # enough programs to fill the GPU several times over, otherwise amortise per-program setup
    pairs = num_texts * num_candidates
    target_programs = 8 * num_sms
    block_k = 1
    while block_k < 16 and pairs // (block_k * 2) >= target_programs:
        block_k *= 2
    block_k = min(block_k, next_power_of_2(max(num_candidates, 1)))
    block_k = override.pop("BLOCK_K", block_k)
    group_size = override.pop("GROUP_SIZE", 8 if all_pairs else 1)

    tile = block_w * block_r
    # fp32 "ieee" dots hold both operands in registers: more warps share a large tile
    num_warps = override.pop("num_warps", 4 if tile < (4096 if element_size >= 4 else 8192) else 8)
    if override:
        raise KeyError(f"unknown launch override(s): {sorted(override)}")
    grid = (num_texts * cdiv(num_candidates, block_k), )
    return LaunchConfig(block_w, block_r, block_d, block_k, group_size, num_warps, num_stages, single_tile,
                        query_resident, grid)


# Explicit (triton 3.9 warns when unset, 3.10 flips the default).  Nothing here depends on it:
# the exact fp32 dot emits fma itself and the epilogue has no multiply-add to contract.
_FP_FUSION = True

# The CPU interpreter (TRITON_INTERPRET=1 when this module was imported) stores bf16 as uint16 and
# its tl.dot multiplies those bit patterns: bf16 operands are widened to fp32 (exact) there.
_INTERPRETED = not isinstance(_alignment_kernel, triton.runtime.jit.JITFunction)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: any plausible value (only the grid shape changes)


# --------------------------------------------------------------------------- launcher


def forward_kernel(text_pad: int, image_pad: int, config: dict | None = None) -> str:
    """The kernel ``launch_alignment`` runs: "packed" (whole captions and images in one tile) or "pair".
    ``config["kernel"]`` forces one (packed only where it fits); explicit per-pair block sizes select "pair"."""
    config = config or {}
    kernel = config.get("kernel")
    if kernel is None:
        pair_keys = {"BLOCK_W", "BLOCK_R", "BLOCK_D", "BLOCK_K"}  # (the packed kernel's keys need kernel="packed")
        kernel = "pair" if pair_keys & set(config) else "packed"
    return "packed" if kernel == "packed" and packed_fits(text_pad, image_pad) else "pair"


def forward_writes_every_output(text_pad: int, image_pad: int, config: dict | None = None) -> bool:
    """Whether ``launch_alignment`` stores every entry of ``out``, ``argmax`` and ``region_argmax`` (the packed
    kernel: -1 at padded positions), so the caller may pass them uninitialised (no fill launches); the
    per-pair kernel leaves padded argmax entries to the caller's -1 fill."""
    return forward_kernel(text_pad, image_pad, config) == "packed"


def launch_alignment(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                     aggregation: int, zero_padding: bool, text_pad: int, image_pad: int, out, argmax=None,
                     region_argmax=None, *, config: dict | None = None) -> None:
    """Write alignment scores into ``out`` (and winning regions into ``argmax``).

    text [T_text, D], images [T_img, D]: contiguous, same dtype (fp32/fp16/bf16);
    text_offsets int64 [Nt], text_lengths int32 [Nt]; image_offsets int64 [Ni],
    image_lengths int32 [Ni]; candidates int64 [Nt, K] or None (all pairs, K = Ni);
    out float32 [Nt, K]; argmax int32 [Nt, K, text_pad] or None; region_argmax
    int32 [Nt, K, image_pad] or None (region -> first winning word, entries of
    padded regions left untouched: the caller pre-fills -1).  Inputs are
    validated by the op layer (aladin_fast/ops); see docs/kernel_contract.md.
    ``config`` overrides launch heuristics (see ``alignment_launch_config``).
    """
    num_texts = text_offsets.shape[0]
    num_candidates = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    if num_texts == 0 or num_candidates == 0:
        return
    dim = text.shape[1]
    kernel = forward_kernel(text_pad, image_pad, config)
    config = dict(config or {})
    config.pop("kernel", None)
    if kernel == "packed":
        _launch_packed(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                       aggregation, zero_padding, text_pad, image_pad, out, argmax, region_argmax, config)
        return
    cfg = alignment_launch_config(num_texts=num_texts, num_candidates=num_candidates, dim=dim,
                                  text_pad=text_pad, image_pad=image_pad, element_size=text.element_size(),
                                  all_pairs=candidates is None, num_sms=_num_sms(text.device), override=config)
    _alignment_kernel[cfg.grid](
        text, text_offsets, text_lengths,
        images, image_offsets, image_lengths,
        text_offsets if candidates is None else candidates,  # placeholder, never read without candidates
        out,
        text_lengths if argmax is None else argmax,  # placeholder, never written without argmax
        text_lengths if region_argmax is None else region_argmax,
        num_texts, num_candidates, dim, text_pad, image_pad,
        AGGREGATION=int(aggregation), ZERO_PADDING=bool(zero_padding), HAS_CANDIDATES=candidates is not None,
        WRITE_ARGMAX=argmax is not None, WRITE_REGION_ARGMAX=region_argmax is not None,
        SINGLE_TILE=cfg.single_tile, QUERY_RESIDENT=cfg.query_resident,
        BLOCK_W=cfg.BLOCK_W, BLOCK_R=cfg.BLOCK_R, BLOCK_D=cfg.BLOCK_D, BLOCK_K=cfg.BLOCK_K,
        GROUP_SIZE=cfg.GROUP_SIZE, DOT_IN_FP32=_INTERPRETED and text.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=_FP_FUSION,
    )


def _launch_packed(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
                   zero_padding, text_pad, image_pad, out, argmax, region_argmax, config):
    num_texts = text_offsets.shape[0]
    num_candidates = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    cfg = packed_launch_config(num_texts=num_texts, num_candidates=num_candidates, text_pad=text_pad,
                               image_pad=image_pad, element_size=text.element_size(), all_pairs=candidates is None,
                               override=config)
    _packed_alignment_kernel[cfg.grid](
        text, text_offsets, text_lengths, images, image_offsets, image_lengths,
        text_offsets if candidates is None else candidates, out,
        text_lengths if argmax is None else argmax,
        text_lengths if region_argmax is None else region_argmax,
        num_texts, num_candidates, text.shape[1], text_pad, image_pad,
        AGGREGATION=int(aggregation), ZERO_PADDING=bool(zero_padding), HAS_CANDIDATES=candidates is not None,
        WRITE_ARGMAX=argmax is not None, WRITE_REGION_ARGMAX=region_argmax is not None,
        IMGS=cfg.IMGS, CAPS=cfg.CAPS, IMGS_P2=next_power_of_2(cfg.IMGS),
        CAPS_P2=next_power_of_2(cfg.CAPS), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        GROUP_SIZE=cfg.GROUP_SIZE, DOT_IN_FP32=_INTERPRETED and text.dtype == torch.bfloat16,
        NAN_VIA_FLAG=_INTERPRETED, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=_FP_FUSION,
    )


# --------------------------------------------------------------------------- ahead-of-time specialisations


class _AotSpecFields(NamedTuple):
    name: str
    fn: object
    signature: dict
    constexprs: dict


class AotSpec(_AotSpecFields):
    """(name, kernel fn, signature, constexprs) plus ``options`` (num_warps, num_stages) and
    ``attrs`` (16-byte alignment / divisibility hints the runtime JIT would specialise on)."""

    def __new__(cls, name, fn, signature, constexprs, options, attrs):
        self = super().__new__(cls, name, fn, signature, constexprs)
        self.options = options
        self.attrs = attrs
        return self


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _alignment_aot_spec(name, dtype, *, num_texts, num_candidates, dim, text_pad, image_pad, aggregation,
                        zero_padding, all_pairs, write_argmax, write_region_argmax=False) -> AotSpec:
    cfg = alignment_launch_config(num_texts=num_texts, num_candidates=num_candidates, dim=dim, text_pad=text_pad,
                                  image_pad=image_pad, element_size=torch.empty((), dtype=dtype).element_size(),
                                  all_pairs=all_pairs)
    element = "*" + _TRITON_DTYPE[dtype]
    signature = {
        "text_ptr": element, "text_offsets_ptr": "*i64", "text_lengths_ptr": "*i32",
        "images_ptr": element, "image_offsets_ptr": "*i64", "image_lengths_ptr": "*i32",
        "candidates_ptr": "*i64", "out_ptr": "*fp32", "argmax_ptr": "*i32", "region_argmax_ptr": "*i32",
        "num_texts": "i32", "num_candidates": "i32", "D": "i32", "text_pad": "i32", "image_pad": "i32",
    }
    constexprs = dict(
        AGGREGATION=aggregation, ZERO_PADDING=zero_padding, HAS_CANDIDATES=not all_pairs, WRITE_ARGMAX=write_argmax,
        WRITE_REGION_ARGMAX=write_region_argmax,
        SINGLE_TILE=cfg.single_tile, QUERY_RESIDENT=cfg.query_resident, BLOCK_W=cfg.BLOCK_W, BLOCK_R=cfg.BLOCK_R,
        BLOCK_D=cfg.BLOCK_D, BLOCK_K=cfg.BLOCK_K, GROUP_SIZE=cfg.GROUP_SIZE, DOT_IN_FP32=False,
    )
    signature.update({key: "constexpr" for key in constexprs})
    arg_names = _alignment_kernel.arg_names
    aligned = [key for key, kind in signature.items() if kind.startswith("*")]
    if dim % 16 == 0:
        aligned.append("D")
    attrs = {(arg_names.index(key), ): [["tt.divisibility", 16]] for key in aligned}
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": _FP_FUSION}
    return AotSpec(name, _alignment_kernel, signature, constexprs, options, attrs)


def aot_specs() -> list:
    """Representative specialisations (TERAN-sized W=32, R=36, D=1024 unless named otherwise).

    Each item unpacks as ``(name, fn, signature, constexprs)`` for ``triton.compiler.ASTSource``
    and carries ``.options`` / ``.attrs`` for ``triton.compile`` / ``ASTSource(attrs=...)``.
    """
    teran = dict(dim=1024, text_pad=32, image_pad=36)
    all_pairs = dict(num_texts=5000, num_candidates=1000, all_pairs=True)
    rerank = dict(num_texts=1, num_candidates=1000, all_pairs=False)
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        tag = _TRITON_DTYPE[dtype]
        specs.append(_alignment_aot_spec(f"all_pairs_{tag}_MrSw", dtype, **teran, **all_pairs, aggregation=MRSW,
                                         zero_padding=False, write_argmax=False))
        specs.append(_alignment_aot_spec(f"rerank_{tag}_MrSw_argmax", dtype, **teran, **rerank, aggregation=MRSW,
                                         zero_padding=False, write_argmax=True))
    specs.append(_alignment_aot_spec("all_pairs_bf16_symm_zero", torch.bfloat16, **teran, **all_pairs,
                                     aggregation=SYMM, zero_padding=True, write_argmax=False))
    specs.append(_alignment_aot_spec("all_pairs_bf16_symm_region_argmax", torch.bfloat16, **teran, num_texts=128,
                                     num_candidates=128, all_pairs=True, aggregation=SYMM, zero_padding=False,
                                     write_argmax=True, write_region_argmax=True))
    specs.append(_alignment_aot_spec("all_pairs_fp16_mean", torch.float16, **teran, **all_pairs,
                                     aggregation=MEAN, zero_padding=False, write_argmax=False))
    specs.append(_alignment_aot_spec("rerank_bf16_D128_resident", torch.bfloat16, dim=128, text_pad=32, image_pad=36,
                                     **rerank, aggregation=MRSW, zero_padding=False, write_argmax=False))
    # largest single tile (64 x 128): the heuristic's shared-memory budget shrinks BLOCK_D
    specs.append(_alignment_aot_spec("rerank_fp16_W64_R128_D256_symm_argmax", torch.float16, dim=256, text_pad=64,
                                     image_pad=128, **rerank, aggregation=SYMM, zero_padding=False, write_argmax=True))
    # long captions / many regions: multi-block row and column passes
    specs.append(_alignment_aot_spec("rerank_bf16_W300_R200_symm_argmax", torch.bfloat16, dim=1024, text_pad=300,
                                     image_pad=200, **rerank, aggregation=SYMM, zero_padding=True, write_argmax=True))
    specs.append(_alignment_aot_spec("rerank_fp32_W300_R200_MwSr", torch.float32, dim=1024, text_pad=300,
                                     image_pad=200, **rerank, aggregation=MWSR, zero_padding=False, write_argmax=False))
    return specs
