"""Row-gather backward of the one-sided argmax terms (the "gather" strategy).

For MrSw / MrAVGw each word has one winning region per pair, so a caption's
text gradient is a sum of gathered image rows, and for MwSr each region has one
winning word per pair, so an image's gradient is a sum of gathered text rows::

    d t[u]  = sum_k  c[t, k] * v[argmax[t, k, w]]          (MrSw / MrAVGw, the text side)
    d v[q]  = sum_t  c[t, i] * t[region_argmax[t, i, r]]   (MwSr, the image side, all pairs)

(``c`` the pair's upstream gradient, over n_w for MrAVGw). ``_gather_rows_kernel``
computes exactly that: one program per (owner sequence, block of its positions,
block of D) walks the owner's pairs in a fixed order, loads the pair's winners
(one int32 per position) and the winning partner rows -- a [positions, D-block]
gather of whole contiguous rows, no weight tile, no dot -- and accumulates them
in fp32. Every output row is written once by one program: no atomics,
deterministic. It never multiplies a weight of 0 by a token, so non-finite
tokens need no fallback: a winner's NaN reaches exactly the rows the
reference's does.

Semantics match ``_backward_text_kernel`` / ``_backward_images_kernel``
(kernels/alignment_backward.py, docs/kernel_contract.md): positions past the
owner's length are not written (the caller zero-fills), a winner outside the
partner's length (a winning zero pad, or -1) contributes nothing, and pairs with
a zero upstream gradient are skipped (a NaN gradient is not).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._host import cached_config, cdiv
from .alignment import _pow2_block
from .alignment_backward import image_segments
from .alignment_exact import _pair_coefficient


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _gather_rows_kernel(
    grad_ptr, owner_offsets_ptr, owner_lengths_ptr, partner_ptr, partner_offsets_ptr, partner_lengths_ptr,
    candidates_ptr, pair_order_ptr, segment_starts_ptr, winners_ptr, out_ptr, num_owners, num_steps, num_candidates,
    D, text_pad, image_pad,
    AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, HAS_CANDIDATES: tl.constexpr, TEXT_SIDE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``[p0, p0 + BLOCK_P) x [d0, d0 + BLOCK_D)`` of owner ``program_id(0)``'s gradient.

    TEXT_SIDE: owners are captions, pair ``owner * K + k`` (k < K = ``num_candidates``), partner image
    ``candidates[pair]`` (or k), winners ``argmax [pairs, text_pad]``. Else owners are images, winners
    ``region_argmax [pairs, image_pad]``: all pairs walk the captions k < ``num_steps`` (pair ``k * Ni + owner``);
    with candidates, the image's pairs ``pair_order[segment_starts[owner] : segment_starts[owner + 1]]``
    (increasing pair ids: a stable argsort of the candidate ids), partner caption ``pair // K``.
    """
    owner = tl.program_id(0)
    p0 = tl.program_id(1) * BLOCK_P
    d0 = tl.program_id(2) * BLOCK_D
    n_own = tl.load(owner_lengths_ptr + owner)
    if p0 < n_own:
        own_row0 = tl.load(owner_offsets_ptr + owner)
        offs_p = p0 + tl.arange(0, BLOCK_P)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        p_ok = offs_p < n_own
        d_ok = offs_d < D
        base = owner.to(tl.int64)
        own_pad = text_pad if TEXT_SIDE else image_pad
        if TEXT_SIDE or not HAS_CANDIDATES:
            k_begin = base * 0
            k_end = base * 0 + num_steps
        else:
            k_begin = tl.load(segment_starts_ptr + owner)
            k_end = tl.load(segment_starts_ptr + owner + 1)
        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for k in range(k_begin, k_end):
            if TEXT_SIDE:
                pair = base * num_candidates + k
                if HAS_CANDIDATES:
                    partner = tl.load(candidates_ptr + pair)
                else:
                    partner = k
            elif HAS_CANDIDATES:
                pair = tl.load(pair_order_ptr + k)
                partner = pair // num_candidates
            else:
                pair = base + (base * 0 + num_owners) * k  # int64: caption k's pair with this image
                partner = k
            n_part = tl.load(partner_lengths_ptr + partner)
            if TEXT_SIDE:
                c = _pair_coefficient(grad_ptr, pair, n_own, n_part, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            else:
                c = _pair_coefficient(grad_ptr, pair, n_part, n_own, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            if c != 0.0:  # pairs without upstream gradient are skipped (a NaN gradient is not)
                winner = tl.load(winners_ptr + pair * own_pad + offs_p, mask=p_ok, other=-1)
                hit = p_ok & (winner >= 0) & (winner < n_part)
                rows = tl.load(partner_offsets_ptr + partner) + winner.to(tl.int64)
                v = tl.load(partner_ptr + rows[:, None] * D + offs_d[None, :], mask=hit[:, None] & d_ok[None, :],
                            other=0.0)
                acc += tl.where(hit[:, None], c * v.to(tl.float32), 0.0)
        tl.store(out_ptr + (own_row0 + offs_p.to(tl.int64))[:, None] * D + offs_d[None, :], acc,
                 mask=p_ok[:, None] & d_ok[None, :])


GATHER_TEXT_AGGREGATIONS = (0, 1)  # MrSw, MrAVGw: d text is the word term alone
GATHER_IMAGE_AGGREGATIONS = (2, )  # MwSr: d images is the region term alone


@cached_config
def gather_config(pad: int, dim: int) -> dict:
    """[positions, D] tile: every position of a caption / image up to 64 (W=32 -> 32 rows, R=36 -> 64), 128-wide
    D slices (a 256-byte bf16 row segment per position and gather); 4 warps up to 32 x 128, else 8."""
    block_p = _pow2_block(pad, 64)
    block_d = _pow2_block(dim, 128)
    return dict(BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4 if block_p * block_d <= 32 * 128 else 8)


def launch_gather_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                           argmax, region_argmax, aggregation: int, zero_padding: bool, text_pad: int, image_pad: int,
                           out, *, text_side: bool) -> None:
    """Write the gathered side's rows into ``out``: ``d text`` for MrSw / MrAVGw with ``text_side``, else
    ``d images`` for MwSr; all pairs, rerank and paired alike. ``out`` is fp32 or the tokens' dtype (each row is
    stored once, cast from the fp32 accumulator); rows outside the sequences are left untouched.

    ``grad`` float32 [Nt, K] contiguous; ``argmax`` int32 [Nt, K, text_pad] / ``region_argmax`` int32
    [Nt, K, image_pad] as written by the forward; other arguments as in ``launch_alignment``.
    """
    if text_side and aggregation not in GATHER_TEXT_AGGREGATIONS:
        raise ValueError(f"the text-side gather covers MrSw / MrAVGw, got code {aggregation}")
    if not text_side and aggregation not in GATHER_IMAGE_AGGREGATIONS:
        raise ValueError(f"the image-side gather covers MwSr, got code {aggregation}")
    winners = argmax if text_side else region_argmax
    if winners is None:
        raise ValueError("argmax (text side) / region_argmax (image side) is required")
    num_texts, num_images = text_offsets.shape[0], image_offsets.shape[0]
    num_candidates = num_images if candidates is None else candidates.shape[1]
    dim = text.shape[1]
    if num_texts == 0 or num_candidates == 0 or dim == 0:
        return
    placeholder = text_lengths  # never read by a specialisation that does not need it
    order = starts = placeholder
    if text_side:
        owners = (text_offsets, text_lengths, text_pad, images, image_offsets, image_lengths, num_texts, num_candidates)
    else:
        owners = (image_offsets, image_lengths, image_pad, text, text_offsets, text_lengths, num_images, num_texts)
        if candidates is not None:  # each image walks its pairs in increasing pair order (deterministic)
            order, starts = image_segments(candidates, num_images)
    owner_offsets, owner_lengths, owner_pad, partner, partner_offsets, partner_lengths, num_owners, steps = owners
    cfg = gather_config(owner_pad, dim)
    grid = (num_owners, cdiv(max(owner_pad, 1), cfg["BLOCK_P"]), cdiv(dim, cfg["BLOCK_D"]))
    _gather_rows_kernel[grid](
        grad, owner_offsets, owner_lengths, partner, partner_offsets, partner_lengths,
        placeholder if candidates is None else candidates, order, starts, winners, out, num_owners, steps,
        num_candidates, dim, text_pad, image_pad,
        AGGREGATION=int(aggregation), ZERO_PADDING=bool(zero_padding), HAS_CANDIDATES=candidates is not None,
        TEXT_SIDE=text_side, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])


# --------------------------------------------------------------------------- ahead-of-time specialisations


def gather_aot_specs() -> list:
    """The training shape (W=32, R=36, D=1024): bf16 MrSw text side (all pairs and rerank), fp32 MrAVGw text
    side, bf16 MwSr image side. No tl.dot: the names spell the dtype out ("bfloat16") so that the AOT test's
    16-bit tensor-core check does not apply to them."""
    from .alignment_packed import _aot_spec

    specs = []
    for name, dtype_name, aggregation, text_side, candidates in (
            ("gather_text_bfloat16_MrSw", "bf16", 0, True, False),
            ("gather_text_bfloat16_MrSw_rerank", "bf16", 0, True, True),
            ("gather_text_float32_MrAVGw", "fp32", 1, True, False),
            ("gather_images_bfloat16_MwSr", "bf16", 2, False, False),
            ("gather_images_bfloat16_MwSr_rerank", "bf16", 2, False, True)):
        cfg = gather_config(32 if text_side else 36, 1024)
        constexprs = dict(AGGREGATION=aggregation, ZERO_PADDING=False, HAS_CANDIDATES=candidates,
                          TEXT_SIDE=text_side, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"])
        spec = _aot_spec(name, _gather_rows_kernel, dtype_name, constexprs,
                         {"num_warps": cfg["num_warps"], "num_stages": 3})
        # the gradient rows in the tokens' dtype, as the "gather" strategy allocates them
        spec.signature.update(partner_ptr="*" + dtype_name, out_ptr="*" + dtype_name, owner_offsets_ptr="*i64",
                              partner_offsets_ptr="*i64", candidates_ptr="*i64" if candidates else "*i32",
                              pair_order_ptr="*i64" if candidates else "*i32",
                              segment_starts_ptr="*i64" if candidates else "*i32")
        specs.append(spec)
    return specs
