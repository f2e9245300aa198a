"""All-pairs backward weight matrix ``G``, materialised a chunk of rows at a time (the "gemm" backward).

For all pairs the argmax terms of the backward are one matrix over token rows
(text tokens, ``[T_text]``) and token columns (image tokens, ``[T_img]``); token
u of caption t at word w, token v of image i at region r::

    G[u, v] = c[t, i] * ([argmax[t, i, w] == r] + [region_argmax[t, i, r] == w])

(the first term for MrSw / MrAVGw / symm, the second for MwSr / symm; ``c`` is
the pair's upstream gradient, divided by the caption length for MrAVGw). Rows of
text tokens past their caption's length or in gaps between packed captions, and
columns of such image tokens, are zero; so is a winner outside the partner's
length (a winning zero pad) -- it never equals a valid position. Then
``d text = G @ images`` and ``d images = G^T @ text``: the op layer
(``aladin_fast/ops/alignment_op.py``, strategy "gemm") runs those products
with ``torch.mm`` on each chunk this kernel writes.

* ``_token_sequence_kernel``: the sequence id of every token row (-1 in gaps),
  once per backward (O(tokens)); the position within the sequence is the row
  minus the sequence's offset.
* ``_alignment_weights_kernel``: one program per [BLOCK_M, BLOCK_N] tile of a
  row chunk (rows ``row_start ..``, every column). Per row and per column one
  vector load of the sequence id and offset; per element one gather of ``c`` and
  of each winner (neighbouring elements share a pair, so the gathers hit the
  same cache lines). Every element is written once: no atomics, deterministic.

Dtype policy (as the winner-GEMM kernels, ``kernels/alignment_winner_gemm.py``):
bf16 inputs get a bf16 workspace (the coefficient rounded to bf16, like torch's
own autograd of the plain formulation); fp32 and fp16 inputs (fp16 lacks the
range for arbitrary upstream gradients) get an fp32 workspace.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2


@triton.jit
def _token_sequence_kernel(offsets_ptr, lengths_ptr, out_ptr, BLOCK: tl.constexpr):
    """Program n writes n into the rows of sequence n."""
    n = tl.program_id(0)
    first = tl.load(offsets_ptr + n)
    length = tl.load(lengths_ptr + n)
    positions = tl.arange(0, BLOCK)
    for start in range(0, length, BLOCK):
        position = start + positions
        tl.store(out_ptr + first + position, (position * 0 + n).to(tl.int32), mask=position < length)


@triton.jit(do_not_specialize=["row_start", "num_rows", "text_pad", "image_pad"])
def _alignment_weights_kernel(
    grad_ptr, argmax_ptr, region_argmax_ptr, text_sequence_ptr, text_offsets_ptr, text_lengths_ptr,
    image_sequence_ptr, image_offsets_ptr, out_ptr, row_start, num_rows, num_cols, num_images, text_pad, image_pad,
    WORD: tl.constexpr, REGION: tl.constexpr, MRAVGW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tile (program_id 0, 1) of ``out [num_rows, num_cols]`` = rows ``row_start ..`` of ``G``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < num_cols
    token = row_start + rows
    t = tl.load(text_sequence_ptr + token, mask=row_ok, other=-1)
    i = tl.load(image_sequence_ptr + cols, mask=col_ok, other=-1)
    t_ok = t >= 0
    i_ok = i >= 0
    w = token - tl.load(text_offsets_ptr + t, mask=t_ok, other=0)  # position within the caption
    r = cols - tl.load(image_offsets_ptr + i, mask=i_ok, other=0)  # position within the image
    ok = t_ok[:, None] & i_ok[None, :]
    pair = t.to(tl.int64)[:, None] * num_images + i[None, :]
    c = tl.load(grad_ptr + pair, mask=ok, other=0.0)
    if MRAVGW:
        t_len = tl.load(text_lengths_ptr + t, mask=t_ok, other=1)
        c = c / tl.maximum(t_len, 1).to(tl.float32)[:, None]
    hits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WORD:  # the word's winning region
        winner = tl.load(argmax_ptr + pair * text_pad + w[:, None], mask=ok, other=-1)
        hits += (winner == r[None, :]).to(tl.float32)
    if REGION:  # the region's winning word
        winner = tl.load(region_argmax_ptr + pair * image_pad + r[None, :], mask=ok, other=-1)
        hits += (winner == w[:, None]).to(tl.float32)
    offsets = rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
    tl.store(out_ptr + offsets, (hits * c).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def weights_dtype(token_dtype: torch.dtype) -> torch.dtype:
    """Workspace dtype of ``G`` for tokens of ``token_dtype``: bf16 for bf16, else fp32 (see the module doc)."""
    return torch.bfloat16 if token_dtype == torch.bfloat16 else torch.float32


def alignment_weights_config() -> dict:
    """Tile of the weight kernel: 16 rows x 128 columns (a 256-byte bf16 / 512-byte fp32 row segment), 8 warps:
    8 elements per thread, 48-78 registers on sm_80 / sm_90. (64 x 128 tiles, 16-32 elements per thread, needed
    up to 255 registers plus stack for the per-element 64-bit gather addresses.)"""
    return dict(BLOCK_M=16, BLOCK_N=128, num_warps=8)


def token_sequence_ids(offsets: torch.Tensor, lengths: torch.Tensor, num_tokens: int, pad: int) -> torch.Tensor:
    """int32 ``[num_tokens]``: the sequence owning each token row, -1 for rows of no sequence.

    ``offsets`` int64 ``[N]``, ``lengths`` int32 ``[N]`` (each <= ``pad``); sequences must not overlap.
    """
    out = torch.full((num_tokens, ), -1, dtype=torch.int32, device=offsets.device)
    if offsets.shape[0] and num_tokens:
        _token_sequence_kernel[(offsets.shape[0], )](offsets, lengths, out,
                                                     BLOCK=min(1024, max(16, next_power_of_2(pad))))
    return out


def launch_alignment_weights(grad, argmax, region_argmax, text_sequence, text_offsets, text_lengths, image_sequence,
                             image_offsets, aggregation: int, text_pad: int, image_pad: int, row_start: int,
                             out: torch.Tensor) -> None:
    """Write rows ``row_start .. row_start + out.shape[0]`` of ``G`` into ``out`` (contiguous
    ``[rows, T_img]``, bf16 or fp32; every element written).

    ``grad`` float32 [Nt, Ni] contiguous; ``argmax`` int32 [Nt, Ni, text_pad] for
    MrSw / MrAVGw / symm, ``region_argmax`` int32 [Nt, Ni, image_pad] for MwSr / symm;
    ``text_sequence`` / ``image_sequence`` from :func:`token_sequence_ids`.
    """
    if aggregation not in (0, 1, 2, 3):
        raise ValueError(f"the weight matrix covers MrSw / MrAVGw / MwSr / symm, got code {aggregation}")
    word, region = aggregation in (0, 1, 3), aggregation in (2, 3)
    if (word and argmax is None) or (region and region_argmax is None):
        raise ValueError("argmax is required for MrSw / MrAVGw / symm and region_argmax for MwSr / symm")
    num_rows, num_cols = out.shape
    if num_rows == 0 or num_cols == 0:
        return
    cfg = alignment_weights_config()
    placeholder = text_lengths  # never read by a specialisation that does not need it
    _alignment_weights_kernel[(cdiv(num_rows, cfg["BLOCK_M"]), cdiv(num_cols, cfg["BLOCK_N"]))](
        grad, argmax if word else placeholder, region_argmax if region else placeholder, text_sequence,
        text_offsets, text_lengths, image_sequence, image_offsets, out, row_start, num_rows, num_cols,
        image_offsets.shape[0], text_pad, image_pad, WORD=word, REGION=region, MRAVGW=aggregation == 1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])


# --------------------------------------------------------------------------- ahead-of-time specialisations


def alignment_weights_aot_specs() -> list:
    """The weight kernel at the training shape for a bf16 and an fp32 workspace, and the token map.

    No tl.dot here: the names spell the dtype out ("bfloat16") so that the AOT test's 16-bit
    tensor-core check (names containing "bf16" / "fp16") does not apply to them."""
    from .alignment_packed import _aot_spec

    cfg = alignment_weights_config()
    specs = []
    for name, out_dtype, aggregation in (("bfloat16_MrSw", "bf16", 0), ("bfloat16_symm", "bf16", 3),
                                         ("float32_MrAVGw", "fp32", 1), ("float32_MwSr", "fp32", 2)):
        constexprs = dict(WORD=aggregation in (0, 1, 3), REGION=aggregation in (2, 3), MRAVGW=aggregation == 1,
                          BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        spec = _aot_spec(f"alignment_weights_{name}", _alignment_weights_kernel, out_dtype, constexprs,
                         {"num_warps": cfg["num_warps"], "num_stages": 1}, dim=1)  # (no D argument)
        spec.signature["out_ptr"] = "*" + out_dtype  # the workspace, not an fp32 score matrix
        specs.append(spec)
    spec = _aot_spec("token_sequence_ids", _token_sequence_kernel, "fp32", {"BLOCK": 64},
                     {"num_warps": 1, "num_stages": 1}, dim=1)
    spec.signature.update(offsets_ptr="*i64", out_ptr="*i32")
    return specs + [spec]
