"""Backward of the fused alignment scores: Triton kernels and launcher.

Every aggregation's gradient is one bilinear form per pair.  With ``c`` the
pair's upstream gradient (scaled by 1/n_w for MrAVGw and by 1/cells for mean)
and a pair weight tile ``M[w, r]`` built in registers from int32 indices saved
by the forward,

* MrSw / MrAVGw: ``M[w, r] = [argmax[w] == r]`` (word -> winning region),
* MwSr:          ``M[w, r] = [region_argmax[r] == w]`` (region -> winning word),
* symm:          the sum of both,
* sum / mean:    ``M[w, r] = 1`` on valid cells,

the gradients are ``d t_w += c * sum_r M[w, r] v_r`` and ``d v_r += c * sum_w
M[w, r] t_w``: two ``tl.dot`` per pair with the exact 0/1/2 weights in the
inputs' dtype (tensor cores for fp16/bf16), the scale ``c`` applied to the fp32
product.  Nothing of size pairs x W x R, or pairs x W x D, is ever stored.

Ownership, so no atomics on the text side and a choice on the image side:

* ``_backward_text_kernel``: one program per (caption, word block, D block)
  walks the caption's K candidates and writes its rows once;
* ``_backward_images_kernel`` ("segmented"): one program per (image, region
  block, D block) walks the pairs that use the image -- all captions in
  all-pairs mode, or a segment of pair ids sorted by image (stable argsort of
  the candidates) in rerank / paired mode -- in increasing pair order and
  writes its rows once: bitwise deterministic;
* ``_backward_images_atomic_kernel`` ("atomic"): one program per (caption,
  block of candidates, D block) adds its contribution into the image rows with
  fp32 ``atomic_add``: no sort, more parallelism when few pairs share an image,
  but the addition order (and so the last bits) varies between runs.

Sequences must not overlap in memory (the op layer guarantees it: padded rows
``i * L`` or packed ``cu_seqlens``); rows outside every sequence keep the
caller's zeros.  Semantics are those of the C++ backward (docs/kernel_contract.md),
non-finite values included: a one-hot dot multiplies zeros with every token, so
a program of the text / segmented image kernel whose fp32 accumulator ends NaN
or inf (argmax aggregations) stores its rows from the contract's sparse sum
instead (``_exact_text_rows`` / ``_exact_image_rows`` in kernels/alignment_exact.py:
one row at a time, no product with a weight of 0); the atomic kernel adds such a
pair's exact rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cached_config, cdiv, next_power_of_2
from .alignment import _INTERPRETED, _pow2_block
from .alignment_exact import _exact_image_rows, _exact_text_rows, _nonfinite, _pair_coefficient, _pair_image_row
from .alignment_packed import _packed_backward_kernel, packed_backward_config, packed_fits

STRATEGIES = ("segmented", "atomic")


@triton.jit
def _pair_weights(argmax_ptr, region_argmax_ptr, pair, offs_w, offs_r, n_w, n_r, text_pad, image_pad,
                  AGGREGATION: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    """M[w, r] of one pair tile (fp32, values 0, 1 or 2): which cells carry the pair's gradient."""
    w_ok = offs_w < n_w
    r_ok = offs_r < n_r
    valid = w_ok[:, None] & r_ok[None, :]
    if AGGREGATION >= 4:  # sum / mean: every valid cell
        weights = valid.to(tl.float32)
    else:
        weights = tl.zeros((BLOCK_W, BLOCK_R), dtype=tl.float32)
        if AGGREGATION != 2:  # word -> region term (a winning zero pad, index n_r, is not a valid cell)
            winner = tl.load(argmax_ptr + pair * text_pad + offs_w, mask=w_ok, other=-1)
            weights += ((winner[:, None] == offs_r[None, :]) & valid).to(tl.float32)
        if AGGREGATION == 2 or AGGREGATION == 3:  # region -> word term
            winner = tl.load(region_argmax_ptr + pair * image_pad + offs_r, mask=r_ok, other=-1)
            weights += ((winner[None, :] == offs_w[:, None]) & valid).to(tl.float32)
    return weights


@triton.jit
def _weighted_sum(weights, tokens, TRANSPOSE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``weights @ tokens`` (or ``weights.T @ tokens``) in fp32; weights are exact in the tokens' dtype."""
    if DOT_IN_FP32:
        tokens = tokens.to(tl.float32)
        w = weights
    else:
        w = weights.to(tokens.dtype)
    if TRANSPOSE:
        w = tl.trans(w)
    return tl.dot(w, tokens, input_precision="ieee", out_dtype=tl.float32)


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _backward_text_kernel(
    grad_ptr, text_offsets_ptr, text_lengths_ptr, images_ptr, image_offsets_ptr, image_lengths_ptr,
    candidates_ptr, argmax_ptr, region_argmax_ptr, grad_text_ptr,
    num_candidates, D, text_pad, image_pad,
    AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    text_idx = tl.program_id(0)
    w0 = tl.program_id(1) * BLOCK_W
    d0 = tl.program_id(2) * BLOCK_D
    n_w = tl.load(text_lengths_ptr + text_idx)
    if w0 < n_w:
        text_row0 = tl.load(text_offsets_ptr + text_idx)
        offs_w = w0 + tl.arange(0, BLOCK_W)
        offs_r0 = tl.arange(0, BLOCK_R)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=tl.float32)
        for k in range(0, num_candidates):
            pair = text_idx.to(tl.int64) * num_candidates + k
            if HAS_CANDIDATES:
                image_idx = tl.load(candidates_ptr + pair)
            else:
                image_idx = k
            n_r = tl.load(image_lengths_ptr + image_idx)
            c = _pair_coefficient(grad_ptr, pair, n_w, n_r, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            if c != 0.0:  # pairs without upstream gradient are skipped (a NaN gradient is not)
                image_row0 = tl.load(image_offsets_ptr + image_idx)
                for r0 in range(0, n_r, BLOCK_R):
                    offs_r = r0 + offs_r0
                    weights = _pair_weights(argmax_ptr, region_argmax_ptr, pair, offs_w, offs_r, n_w, n_r, text_pad,
                                            image_pad, AGGREGATION, BLOCK_W, BLOCK_R)
                    v = tl.load(images_ptr + (image_row0 + offs_r)[:, None] * D + offs_d[None, :],
                                mask=(offs_r < n_r)[:, None] & d_ok[None, :], other=0.0)
                    acc += c * _weighted_sum(weights, v, False, DOT_IN_FP32)
        exact = False
        if AGGREGATION < 4:  # argmax terms: a one-hot dot spreads 0 x inf; recompute exactly where it met one
            exact = _nonfinite(acc)
        if exact:
            _exact_text_rows(grad_ptr, images_ptr, image_offsets_ptr, image_lengths_ptr, candidates_ptr, argmax_ptr,
                             region_argmax_ptr, grad_text_ptr, text_idx, text_row0, n_w, w0, offs_d, d_ok,
                             num_candidates, D, text_pad, image_pad, AGGREGATION, ZERO_PADDING, HAS_CANDIDATES,
                             BLOCK_W)
        else:
            tl.store(grad_text_ptr + (text_row0 + offs_w)[:, None] * D + offs_d[None, :], acc,
                     mask=(offs_w < n_w)[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _backward_images_kernel(
    grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, image_offsets_ptr, image_lengths_ptr,
    pair_order_ptr, segment_starts_ptr, argmax_ptr, region_argmax_ptr, grad_images_ptr,
    num_texts, num_candidates, D, text_pad, image_pad,
    AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    image_idx = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    d0 = tl.program_id(2) * BLOCK_D
    n_r = tl.load(image_lengths_ptr + image_idx)
    if r0 < n_r:
        image_row0 = tl.load(image_offsets_ptr + image_idx)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_w0 = tl.arange(0, BLOCK_W)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if HAS_CANDIDATES:  # pairs of this image, sorted by pair id
            seg_begin = tl.load(segment_starts_ptr + image_idx)
            seg_end = tl.load(segment_starts_ptr + image_idx + 1)
        else:  # all pairs: caption i meets image j in pair i * Ni + j (an int64 loop index)
            seg_begin = (image_idx * 0).to(tl.int64)
            seg_end = seg_begin + num_texts
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for s in range(seg_begin, seg_end):
            if HAS_CANDIDATES:
                pair = tl.load(pair_order_ptr + s)
                text_idx = pair // num_candidates
            else:
                text_idx = s
                pair = s * num_candidates + image_idx
            n_w = tl.load(text_lengths_ptr + text_idx)
            c = _pair_coefficient(grad_ptr, pair, n_w, n_r, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            if c != 0.0:
                text_row0 = tl.load(text_offsets_ptr + text_idx)
                for w0 in range(0, n_w, BLOCK_W):
                    offs_w = w0 + offs_w0
                    weights = _pair_weights(argmax_ptr, region_argmax_ptr, pair, offs_w, offs_r, n_w, n_r, text_pad,
                                            image_pad, AGGREGATION, BLOCK_W, BLOCK_R)
                    t = tl.load(text_ptr + (text_row0 + offs_w)[:, None] * D + offs_d[None, :],
                                mask=(offs_w < n_w)[:, None] & d_ok[None, :], other=0.0)
                    acc += c * _weighted_sum(weights, t, True, DOT_IN_FP32)
        exact = False
        if AGGREGATION < 4:  # argmax terms: a one-hot dot spreads 0 x inf; recompute exactly where it met one
            exact = _nonfinite(acc)
        if exact:
            _exact_image_rows(grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, pair_order_ptr, argmax_ptr,
                              region_argmax_ptr, grad_images_ptr, image_idx, image_row0, n_r, r0, offs_d, d_ok,
                              seg_begin, seg_end, num_candidates, D, text_pad, image_pad, AGGREGATION, ZERO_PADDING,
                              HAS_CANDIDATES, BLOCK_R)
        else:
            tl.store(grad_images_ptr + (image_row0 + offs_r)[:, None] * D + offs_d[None, :], acc,
                     mask=(offs_r < n_r)[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["text_pad", "image_pad"])
def _backward_images_atomic_kernel(
    grad_ptr, text_ptr, text_offsets_ptr, text_lengths_ptr, image_offsets_ptr, image_lengths_ptr,
    candidates_ptr, argmax_ptr, region_argmax_ptr, grad_images_ptr,
    num_candidates, D, text_pad, image_pad,
    AGGREGATION: tl.constexpr, ZERO_PADDING: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    num_k_blocks = tl.cdiv(num_candidates, BLOCK_K)
    text_idx = pid // num_k_blocks
    k_block = pid % num_k_blocks
    d0 = tl.program_id(1) * BLOCK_D
    n_w = tl.load(text_lengths_ptr + text_idx)
    text_row0 = tl.load(text_offsets_ptr + text_idx)
    offs_w0 = tl.arange(0, BLOCK_W)
    offs_r0 = tl.arange(0, BLOCK_R)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for kk in range(0, BLOCK_K):
        k = k_block * BLOCK_K + kk
        if k < num_candidates:
            pair = text_idx.to(tl.int64) * num_candidates + k
            if HAS_CANDIDATES:
                image_idx = tl.load(candidates_ptr + pair)
            else:
                image_idx = k
            n_r = tl.load(image_lengths_ptr + image_idx)
            c = _pair_coefficient(grad_ptr, pair, n_w, n_r, text_pad, image_pad, AGGREGATION, ZERO_PADDING)
            if c != 0.0:
                image_row0 = tl.load(image_offsets_ptr + image_idx)
                for r0 in range(0, n_r, BLOCK_R):
                    offs_r = r0 + offs_r0
                    part = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
                    for w0 in range(0, n_w, BLOCK_W):
                        offs_w = w0 + offs_w0
                        weights = _pair_weights(argmax_ptr, region_argmax_ptr, pair, offs_w, offs_r, n_w, n_r,
                                                text_pad, image_pad, AGGREGATION, BLOCK_W, BLOCK_R)
                        t = tl.load(text_ptr + (text_row0 + offs_w)[:, None] * D + offs_d[None, :],
                                    mask=(offs_w < n_w)[:, None] & d_ok[None, :], other=0.0)
                        part += _weighted_sum(weights, t, True, DOT_IN_FP32)
                    part = c * part
                    exact = False
                    if AGGREGATION < 4:  # argmax terms: a one-hot dot spreads 0 x inf; add exact rows instead
                        exact = _nonfinite(part)
                    if exact:
                        for r in range(r0, tl.minimum(r0 + BLOCK_R, n_r)):
                            tl.atomic_add(grad_images_ptr + (image_row0 + r) * D + offs_d,
                                          _pair_image_row(text_ptr, argmax_ptr, region_argmax_ptr, pair, c,
                                                          text_row0, n_w, r, offs_d, d_ok, D, text_pad, image_pad,
                                                          AGGREGATION), mask=d_ok)
                    else:
                        tl.atomic_add(grad_images_ptr + (image_row0 + offs_r)[:, None] * D + offs_d[None, :], part,
                                      mask=(offs_r < n_r)[:, None] & d_ok[None, :])


@cached_config
def backward_launch_blocks(*, text_pad: int, image_pad: int, dim: int, element_size: int,
                           override: dict | None = None) -> dict:
    """Tile sizes of the backward kernels (``override`` for tests / tuning)."""
    override = dict(override or {})
    blocks = {
        "BLOCK_W": override.pop("BLOCK_W", _pow2_block(text_pad, 64)),
        "BLOCK_R": override.pop("BLOCK_R", _pow2_block(image_pad, 64)),
        # fp32 "ieee" dots keep both operands in registers: a narrower D slice
        "BLOCK_D": override.pop("BLOCK_D", _pow2_block(dim, 32 if element_size >= 4 else 64)),
        "BLOCK_K": override.pop("BLOCK_K", 4),
        "num_warps": override.pop("num_warps", 4),
    }
    if override:
        raise KeyError(f"unknown launch override(s): {sorted(override)}")
    return blocks


def image_segments(candidates: torch.Tensor, image_count: int):
    """Pair ids grouped by image (stable: increasing pair id within an image) and segment starts ``[Ni + 1]``."""
    flat = candidates.reshape(-1)
    order = torch.argsort(flat, stable=True)
    starts = torch.zeros(image_count + 1, dtype=torch.int64, device=candidates.device)
    starts[1:] = torch.cumsum(torch.bincount(flat, minlength=image_count), 0)
    return order, starts


def launch_alignment_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                              candidates, argmax, region_argmax, aggregation: int, zero_padding: bool, text_pad: int,
                              image_pad: int, grad_text, grad_images, *, strategy: str = "segmented",
                              config: dict | None = None, sides=("text", "images")) -> None:
    """Write ``d text`` into ``grad_text`` and ``d images`` into ``grad_images`` (zero-filled by the caller; float32,
    or the tokens' dtype with the "segmented" strategy, whose kernels store each row once; "atomic" accumulates
    into float32).

    ``grad`` float32 [Nt, K] contiguous; ``argmax`` int32 [Nt, K, text_pad] (MrSw,
    MrAVGw, symm) and ``region_argmax`` int32 [Nt, K, image_pad] (MwSr, symm) as
    written by the forward kernel; other arguments as in ``launch_alignment``.
    ``strategy``: "segmented" (deterministic) or "atomic" for the image side. Only the ``sides`` named are
    written (per-pair kernels; the packed-tile kernels always write both).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    num_texts, num_images = text_offsets.shape[0], image_offsets.shape[0]
    num_candidates = num_images if candidates is None else candidates.shape[1]
    if num_texts == 0 or num_candidates == 0 or text.shape[1] == 0:
        return
    if aggregation in (0, 1, 3) and argmax is None:
        raise ValueError("argmax is required for MrSw / MrAVGw / symm")
    if aggregation in (2, 3) and region_argmax is None:
        raise ValueError("region_argmax is required for MwSr / symm")
    dim = text.shape[1]
    config = dict(config or {})
    kernel = config.pop("kernel", None)
    if kernel is None:
        # measured (H200, bf16 training shape 128 x 128, W=32, R=36, D=1024, GPU run 3): per-pair kernels with the
        # segmented image side 2.39 ms, packed tiles 4.15 ms at best (their weight tiles are rebuilt per D slice)
        kernel = "pair"
    if kernel == "packed" and candidates is None and packed_fits(text_pad, image_pad) and len(set(sides)) == 2:
        cfg = packed_backward_config(num_texts=num_texts, num_images=num_images, dim=dim, text_pad=text_pad,
                                     image_pad=image_pad, element_size=text.element_size(), override=config)
        placeholder = text_lengths
        for text_side, out, owners in ((True, grad_text, cdiv(num_texts, cfg["CAPS"])),
                                       (False, grad_images, cdiv(num_images, cfg["IMGS"]))):
            _packed_backward_kernel[(owners, cdiv(dim, cfg["BLOCK_D"]))](
                grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                placeholder if argmax is None else argmax, placeholder if region_argmax is None else region_argmax,
                out, num_texts, num_images, dim, text_pad, image_pad,
                AGGREGATION=int(aggregation), ZERO_PADDING=bool(zero_padding), TEXT_SIDE=text_side,
                IMGS=cfg["IMGS"], CAPS=cfg["CAPS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_D=cfg["BLOCK_D"], SPLIT=cfg["SPLIT"],
                DOT_IN_FP32=_INTERPRETED and text.dtype == torch.bfloat16,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return
    blocks = backward_launch_blocks(text_pad=text_pad, image_pad=image_pad, dim=dim,
                                    element_size=text.element_size(), override=config)
    placeholder = text_lengths  # never read by a specialisation that does not need it
    argmax = placeholder if argmax is None else argmax
    region_argmax = placeholder if region_argmax is None else region_argmax
    common = dict(AGGREGATION=int(aggregation), ZERO_PADDING=bool(zero_padding), HAS_CANDIDATES=candidates is not None,
                  BLOCK_W=blocks["BLOCK_W"], BLOCK_R=blocks["BLOCK_R"], BLOCK_D=blocks["BLOCK_D"],
                  DOT_IN_FP32=_INTERPRETED and text.dtype == torch.bfloat16, num_warps=blocks["num_warps"])
    d_blocks = cdiv(dim, blocks["BLOCK_D"])
    cand = placeholder if candidates is None else candidates
    if "text" in sides:
        _backward_text_kernel[(num_texts, cdiv(max(text_pad, 1), blocks["BLOCK_W"]), d_blocks)](
            grad, text_offsets, text_lengths, images, image_offsets, image_lengths, cand, argmax, region_argmax,
            grad_text, num_candidates, dim, text_pad, image_pad, **common)
    if "images" not in sides:
        return
    if strategy == "segmented":
        if candidates is None:
            order, starts = placeholder, placeholder
        else:
            order, starts = image_segments(candidates, num_images)
        grid = (num_images, cdiv(max(image_pad, 1), blocks["BLOCK_R"]), d_blocks)
        _backward_images_kernel[grid](
            grad, text, text_offsets, text_lengths, image_offsets, image_lengths, order, starts, argmax,
            region_argmax, grad_images, num_texts, num_candidates, dim, text_pad, image_pad, **common)
    else:
        block_k = min(blocks["BLOCK_K"], next_power_of_2(num_candidates))
        grid = (num_texts * cdiv(num_candidates, block_k), d_blocks)
        _backward_images_atomic_kernel[grid](
            grad, text, text_offsets, text_lengths, image_offsets, image_lengths, cand, argmax, region_argmax,
            grad_images, num_candidates, dim, text_pad, image_pad, BLOCK_K=block_k, **common)


# --------------------------------------------------------------------------- ahead-of-time specialisations


def _backward_aot_spec(name, kernel, dtype, *, aggregation, zero_padding, has_candidates, dim=1024, text_pad=32,
                       image_pad=36):
    from .alignment import _FP_FUSION, _TRITON_DTYPE, AotSpec

    element_size = torch.empty((), dtype=dtype).element_size()
    blocks = backward_launch_blocks(text_pad=text_pad, image_pad=image_pad, dim=dim, element_size=element_size)
    element = "*" + _TRITON_DTYPE[dtype]
    pointer_types = {
        "grad_ptr": "*fp32", "text_ptr": element, "images_ptr": element, "grad_text_ptr": "*fp32",
        "grad_images_ptr": "*fp32", "text_offsets_ptr": "*i64", "image_offsets_ptr": "*i64",
        "candidates_ptr": "*i64", "pair_order_ptr": "*i64", "segment_starts_ptr": "*i64",
    }
    constexprs = dict(AGGREGATION=aggregation, ZERO_PADDING=zero_padding, HAS_CANDIDATES=has_candidates,
                      BLOCK_W=blocks["BLOCK_W"], BLOCK_R=blocks["BLOCK_R"], BLOCK_D=blocks["BLOCK_D"],
                      DOT_IN_FP32=False)
    if "BLOCK_K" in kernel.arg_names:
        constexprs["BLOCK_K"] = blocks["BLOCK_K"]
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointer_types.get(arg, "*i32")  # lengths and argmax tensors are int32
        else:
            signature[arg] = "i32"
    aligned = [key for key, kind in signature.items() if kind.startswith("*")] + (["D"] if dim % 16 == 0 else [])
    attrs = {(kernel.arg_names.index(key), ): [["tt.divisibility", 16]] for key in aligned}
    options = {"num_warps": blocks["num_warps"], "num_stages": 2, "enable_fp_fusion": _FP_FUSION}
    return AotSpec(name, kernel, signature, constexprs, options, attrs)


def backward_aot_specs() -> list:
    """Backward specialisations at the training shape (W=32, R=36, D=1024), same format as ``aot_specs``."""
    return [
        _backward_aot_spec("bwd_text_bf16_MrSw_all_pairs", _backward_text_kernel, torch.bfloat16, aggregation=0,
                           zero_padding=False, has_candidates=False),
        _backward_aot_spec("bwd_text_fp32_symm_zero_rerank", _backward_text_kernel, torch.float32, aggregation=3,
                           zero_padding=True, has_candidates=True),
        _backward_aot_spec("bwd_images_segmented_bf16_MrSw_all_pairs", _backward_images_kernel, torch.bfloat16,
                           aggregation=0, zero_padding=False, has_candidates=False),
        _backward_aot_spec("bwd_images_segmented_fp16_symm_rerank", _backward_images_kernel, torch.float16,
                           aggregation=3, zero_padding=True, has_candidates=True),
        _backward_aot_spec("bwd_images_atomic_bf16_MrSw_all_pairs", _backward_images_atomic_kernel, torch.bfloat16,
                           aggregation=0, zero_padding=False, has_candidates=False),
        _backward_aot_spec("bwd_images_atomic_fp32_mean_rerank", _backward_images_atomic_kernel, torch.float32,
                           aggregation=5, zero_padding=False, has_candidates=True),
    ]
