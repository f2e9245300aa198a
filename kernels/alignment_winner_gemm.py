"""All-pairs backward as two tiled GEMMs whose left tiles are built from the forward's winners.

For all pairs the argmax terms of the backward are one matrix ``G`` over token
positions, rows ``(t, w)`` (caption t, word w) and columns ``(i, r)`` (image i,
region r)::

    G[(t, w), (i, r)] = c[t, i] * ([argmax[t, i, w] == r] + [region_argmax[t, i, r] == w])

(the first term for MrSw / MrAVGw / symm, the second for MwSr / symm; ``c`` is
the pair's upstream gradient, divided by the caption length for MrAVGw; winners
outside the partner's length -- a winning zero pad -- and positions outside the
sequence's own length carry nothing). Then ``d text = G @ images`` and
``d images = G^T @ text``. ``G`` is never stored:

* ``_winner_gemm_text_kernel``: one program per (block of CAPS captions, D
  block); rows are the captions' words. It walks the images: per image one
  [CAPS * BLOCK_W, BLOCK_R] tile of ``G`` (the word winners are one vector load
  per row, compared with the region index) times the image's [BLOCK_R, BLOCK_D]
  rows, on tensor cores.
* ``_winner_gemm_images_kernel``: one program per (image, D block); rows are
  the image's regions. It walks blocks of CAPS captions with ``G^T`` tiles.

Each program owns its output rows and writes them once: no atomics, a fixed
summation order, bitwise deterministic. The pair coefficient is folded into the
tile in bf16 for bf16 inputs (rounding it like torch's own autograd of the plain
formulation does); fp32 and fp16 inputs (fp16 lacks the range for arbitrary
upstream gradients) use fp32 tiles and an IEEE fp32 dot.
Tokens must be finite (a zero of ``G`` times an inf is NaN): the op layer checks
and uses the argmax kernels otherwise ("dense"). The images kernel can instead
recompute, word by word, the rows of any program whose accumulator ended
non-finite (``EXACT``, the "gather" strategy's image side): exact for non-finite
values, no check before the launch. Sequences must not overlap in memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cached_config, cdiv, next_power_of_2
from .alignment import _INTERPRETED
from .alignment_exact import _exact_image_rows, _nonfinite

MAX_BLOCK = 128  # BLOCK_W and BLOCK_R (padded caption / image lengths) this layout handles


@triton.jit
def _winner_tile(grad_ptr, argmax_ptr, region_argmax_ptr, t, w, i, r, ok, t_len, i_len, num_images, text_pad,
                 image_pad, WORD: tl.constexpr, REGION: tl.constexpr, MRAVGW: tl.constexpr):
    """fp32 tile of ``G`` for broadcastable (caption t, word w) x (image i, region r) index tensors;
    ``ok``: the (caption, image) pair exists."""
    pair = t.to(tl.int64) * num_images + i
    c = tl.load(grad_ptr + pair, mask=ok, other=0.0)
    if MRAVGW:
        c = c / tl.maximum(t_len, 1).to(tl.float32)
    hits = (w < 0).to(tl.float32) * (r < 0).to(tl.float32)  # zeros of the broadcast shape
    if WORD:  # the word's winning region (one load per word and image), a zero pad or beyond the image: nothing
        winner = tl.load(argmax_ptr + pair * text_pad + w, mask=ok & (w < t_len), other=-1)
        hits += ((winner == r) & (winner < i_len)).to(tl.float32)
    if REGION:  # the region's winning word
        winner = tl.load(region_argmax_ptr + pair * image_pad + r, mask=ok & (r < i_len), other=-1)
        hits += ((winner == w) & (winner < t_len)).to(tl.float32)
    return hits * c


@triton.jit
def _tile_dot(weights, tokens, acc, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:  # fp32 inputs, and the interpreter (its dot multiplies bf16 bit patterns)
        return tl.dot(weights, tokens.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(weights.to(tokens.dtype), tokens, acc, out_dtype=tl.float32)


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _winner_gemm_text_kernel(
    grad_ptr, argmax_ptr, region_argmax_ptr, text_offsets_ptr, text_lengths_ptr, images_ptr, image_offsets_ptr,
    image_lengths_ptr, out_ptr, num_texts, num_images, D, text_pad, image_pad,
    WORD: tl.constexpr, REGION: tl.constexpr, MRAVGW: tl.constexpr, CAPS: tl.constexpr, IMGS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Rows: CAPS captions x BLOCK_W words; each step reduces over IMGS images x BLOCK_R regions."""
    m = tl.arange(0, CAPS * BLOCK_W)
    t = tl.program_id(0) * CAPS + m // BLOCK_W
    w = m % BLOCK_W
    t_ok = t < num_texts
    t_len = tl.load(text_lengths_ptr + t, mask=t_ok, other=0)
    j = tl.arange(0, IMGS)
    r = tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros((CAPS * BLOCK_W, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, num_images, IMGS):
        i = i0 + j
        i_ok = i < num_images
        i_len = tl.load(image_lengths_ptr + i, mask=i_ok, other=0)
        i_row0 = tl.load(image_offsets_ptr + i, mask=i_ok, other=0)
        weights = _winner_tile(grad_ptr, argmax_ptr, region_argmax_ptr, t[:, None, None], w[:, None, None],
                               i[None, :, None], r[None, None, :], t_ok[:, None, None] & i_ok[None, :, None],
                               t_len[:, None, None], i_len[None, :, None], num_images, text_pad, image_pad, WORD,
                               REGION, MRAVGW)
        weights = tl.reshape(weights, (CAPS * BLOCK_W, IMGS * BLOCK_R))
        v = tl.load(images_ptr + (i_row0[:, None] + r[None, :])[:, :, None] * D + offs_d[None, None, :],
                    mask=(r[None, :] < i_len[:, None])[:, :, None] & d_ok[None, None, :], other=0.0)
        acc = _tile_dot(weights, tl.reshape(v, (IMGS * BLOCK_R, BLOCK_D)), acc, DOT_IN_FP32)
    rows = tl.load(text_offsets_ptr + t, mask=t_ok, other=0) + w
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=(t_ok & (w < t_len))[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _winner_gemm_images_kernel(
    grad_ptr, argmax_ptr, region_argmax_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, image_offsets_ptr,
    image_lengths_ptr, out_ptr, num_texts, num_images, D, text_pad, image_pad,
    WORD: tl.constexpr, REGION: tl.constexpr, MRAVGW: tl.constexpr, CAPS: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr, EXACT: tl.constexpr = False,
):
    """Rows: one image's BLOCK_R regions; each step reduces over CAPS captions x BLOCK_W words.

    EXACT: a program whose accumulator ends non-finite recomputes its rows with ``_exact_image_rows``. A
    non-finite text value in this program's D columns (or a non-finite coefficient) makes every row of its
    column NaN or inf -- 0 x inf is NaN, and no later sum is finite again -- so finite accumulators are the
    GEMM's exact sums and only the affected programs pay. No finiteness check before the kernel, no sync."""
    # the op's aggregation code (MrSw 0, MrAVGw 1, MwSr 2, symm 3) for that recomputation
    AGGREGATION: tl.constexpr = MRAVGW + 2 * REGION + (WORD and REGION)
    i = tl.program_id(0)
    i_len = tl.load(image_lengths_ptr + i)
    r = tl.arange(0, BLOCK_R)
    k = tl.arange(0, CAPS * BLOCK_W)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, num_texts, CAPS):
        t = t0 + k // BLOCK_W
        w = k % BLOCK_W
        t_ok = t < num_texts
        t_len = tl.load(text_lengths_ptr + t, mask=t_ok, other=0)
        t_row0 = tl.load(text_offsets_ptr + t, mask=t_ok, other=0)
        weights = _winner_tile(grad_ptr, argmax_ptr, region_argmax_ptr, t[None, :], w[None, :], i, r[:, None],
                               t_ok[None, :], t_len[None, :], i_len, num_images, text_pad, image_pad, WORD, REGION,
                               MRAVGW)
        u = tl.load(text_ptr + (t_row0 + w)[:, None] * D + offs_d[None, :],
                    mask=(t_ok & (w < t_len))[:, None] & d_ok[None, :], other=0.0)
        acc = _tile_dot(weights, u, acc, DOT_IN_FP32)
    row0 = tl.load(image_offsets_ptr + i)
    exact = False
    if EXACT:
        exact = _nonfinite(acc)
    if exact:  # all pairs: image i's pairs are caption t's pair t * Ni + i, t = 0 .. Nt - 1
        first = (i * 0).to(tl.int64)
        _exact_image_rows(grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, grad_ptr, argmax_ptr,
                          region_argmax_ptr, out_ptr, i, row0, i_len, 0, offs_d, d_ok, first, first + num_texts,
                          num_images, D, text_pad, image_pad, AGGREGATION, False, False, BLOCK_R)
    else:
        tl.store(out_ptr + (row0 + r)[:, None] * D + offs_d[None, :], acc, mask=(r < i_len)[:, None] & d_ok[None, :])


def winner_gemm_fits(text_pad: int, image_pad: int) -> bool:
    """Whether one caption's words and one image's regions fit a tile (padded lengths <= MAX_BLOCK)."""
    return 0 < text_pad <= MAX_BLOCK and 0 < image_pad <= MAX_BLOCK


@cached_config
def winner_gemm_config(*, text_pad: int, image_pad: int, dim: int, element_size: int,
                       override: dict | None = None) -> dict:
    """Tile shapes. Text side: CAPS * BLOCK_W ~ 128 rows, IMGS images per reduction step; image side:
    one image's regions, CAPS * BLOCK_W ~ 64 reduction columns. ``override`` (tuning, tests) replaces
    any of TEXT_CAPS, IMGS, IMAGE_CAPS, BLOCK_D, IMAGE_BLOCK_D, num_stages."""
    block_w = max(16, next_power_of_2(text_pad))
    block_r = max(16, next_power_of_2(image_pad))
    pow2_dim = max(16, next_power_of_2(dim))
    # the image side rebuilds its weight tiles once per D block: wider D blocks there (64-row tiles)
    block_d = min(128 if element_size <= 2 else 64, pow2_dim)
    image_block_d = min(256 if element_size <= 2 and block_r <= 64 else block_d, pow2_dim)
    cfg = dict(BLOCK_W=block_w, BLOCK_R=block_r, BLOCK_D=block_d, IMAGE_BLOCK_D=image_block_d,
               TEXT_CAPS=max(1, 128 // block_w), IMGS=1, IMAGE_CAPS=max(1, 64 // block_w),
               num_stages=3 if element_size <= 2 else 2)
    override = dict(override or {})
    unknown = sorted(set(override) - set(cfg) - {"BLOCK_W", "BLOCK_R"})
    if unknown:
        raise KeyError(f"unknown winner GEMM override(s): {unknown}")
    cfg.update(override)
    return cfg


def launch_winner_gemm_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                argmax, region_argmax, aggregation: int, text_pad: int, image_pad: int, grad_text,
                                grad_images, *, config: dict | None = None, sides=("text", "images"),
                                exact_images: bool = False) -> None:
    """Write the all-pairs ``d text`` / ``d images`` rows of every sequence (fp32 buffers, or the tokens' dtype:
    each row is stored once from an fp32 accumulator; other rows untouched); only
    the ``sides`` named (another kernel may own the other side).

    ``grad`` float32 [Nt, Ni] contiguous; ``argmax`` int32 [Nt, Ni, text_pad] for
    MrSw / MrAVGw / symm, ``region_argmax`` int32 [Nt, Ni, image_pad] for MwSr / symm.
    ``exact_images``: the images kernel recomputes, word by word, the rows of any program whose GEMM met a
    NaN / inf (``EXACT``): ``d images`` is then exact for non-finite text and upstream gradients too, with no
    finiteness check before the launch (the text side still needs finite tokens).
    """
    if aggregation not in (0, 1, 2, 3):
        raise ValueError(f"the winner GEMM backward handles MrSw / MrAVGw / MwSr / symm, got code {aggregation}")
    if not winner_gemm_fits(text_pad, image_pad):
        raise ValueError(f"padded lengths must be in 1..{MAX_BLOCK}, got text {text_pad}, images {image_pad}")
    num_texts, num_images = text_offsets.shape[0], image_offsets.shape[0]
    dim = text.shape[1]
    if num_texts == 0 or num_images == 0 or dim == 0:
        return
    word, region = aggregation in (0, 1, 3), aggregation in (2, 3)
    if (word and argmax is None) or (region and region_argmax is None):
        raise ValueError("argmax is required for MrSw / MrAVGw / symm and region_argmax for MwSr / symm")
    cfg = winner_gemm_config(text_pad=text_pad, image_pad=image_pad, dim=dim, element_size=text.element_size(),
                             override=config)
    placeholder = text_lengths  # never read by a specialisation that does not need it
    argmax = argmax if word else placeholder
    region_argmax = region_argmax if region else placeholder
    common = dict(WORD=word, REGION=region, MRAVGW=aggregation == 1, BLOCK_W=cfg["BLOCK_W"], BLOCK_R=cfg["BLOCK_R"],
                  DOT_IN_FP32=text.dtype != torch.bfloat16 or _INTERPRETED,
                  num_stages=cfg["num_stages"])
    text_rows = cfg["TEXT_CAPS"] * cfg["BLOCK_W"]
    if "text" in sides:
        _winner_gemm_text_kernel[(cdiv(num_texts, cfg["TEXT_CAPS"]), cdiv(dim, cfg["BLOCK_D"]))](
            grad, argmax, region_argmax, text_offsets, text_lengths, images, image_offsets, image_lengths, grad_text,
            num_texts, num_images, dim, text_pad, image_pad, CAPS=cfg["TEXT_CAPS"], IMGS=cfg["IMGS"],
            BLOCK_D=cfg["BLOCK_D"], num_warps=_warps(text_rows, cfg["BLOCK_D"]), **common)
    if "images" in sides:
        _winner_gemm_images_kernel[(num_images, cdiv(dim, cfg["IMAGE_BLOCK_D"]))](
            grad, argmax, region_argmax, text, text_offsets, text_lengths, image_offsets, image_lengths, grad_images,
            num_texts, num_images, dim, text_pad, image_pad, CAPS=cfg["IMAGE_CAPS"], BLOCK_D=cfg["IMAGE_BLOCK_D"],
            EXACT=bool(exact_images), num_warps=_warps(cfg["BLOCK_R"], cfg["IMAGE_BLOCK_D"]), **common)


def _warps(rows: int, block_d: int) -> int:
    return 8 if rows * block_d >= 128 * 128 else 4


# --------------------------------------------------------------------------- ahead-of-time specialisations


def winner_gemm_aot_specs() -> list:
    """Both kernels at the training shape (W=32, R=36, D=1024): bf16 MrSw and symm, fp32 MwSr and MrSw (fp32
    MrSw: the image side of the default "gather" strategy for fp32 tokens)."""
    from .alignment import _TRITON_DTYPE
    from .alignment_packed import _aot_spec

    specs = []
    for name, dtype, aggregation in (("bf16_MrSw", torch.bfloat16, 0), ("bf16_symm", torch.bfloat16, 3),
                                     ("fp32_MwSr", torch.float32, 2), ("fp32_MrSw", torch.float32, 0)):
        size = torch.empty((), dtype=dtype).element_size()
        cfg = winner_gemm_config(text_pad=32, image_pad=36, dim=1024, element_size=size)
        for side, kernel, caps in (("text", _winner_gemm_text_kernel, cfg["TEXT_CAPS"]),
                                   ("images", _winner_gemm_images_kernel, cfg["IMAGE_CAPS"])):
            block_d = cfg["BLOCK_D"] if side == "text" else cfg["IMAGE_BLOCK_D"]
            rows = (caps * cfg["BLOCK_W"]) if side == "text" else cfg["BLOCK_R"]
            constexprs = dict(WORD=aggregation in (0, 1, 3), REGION=aggregation in (2, 3), MRAVGW=aggregation == 1,
                              CAPS=caps, BLOCK_W=cfg["BLOCK_W"], BLOCK_R=cfg["BLOCK_R"], BLOCK_D=block_d,
                              DOT_IN_FP32=dtype == torch.float32)
            if side == "text":
                constexprs["IMGS"] = cfg["IMGS"]
            else:
                constexprs["EXACT"] = False
            specs.append(_aot_spec(f"winner_gemm_{side}_{name}", kernel, _TRITON_DTYPE[dtype], constexprs,
                                   {"num_warps": _warps(rows, block_d), "num_stages": cfg["num_stages"]}))
            if side == "images" and name == "bf16_MrSw":
                # the "gather" strategy's image side: bf16 gradient rows, exact for non-finite values
                spec = _aot_spec(f"winner_gemm_{side}_{name}_bf16_out", kernel, _TRITON_DTYPE[dtype],
                                 dict(constexprs, EXACT=True),
                                 {"num_warps": _warps(rows, block_d), "num_stages": cfg["num_stages"]})
                spec.signature["out_ptr"] = "*bf16"
                specs.append(spec)
    return specs
