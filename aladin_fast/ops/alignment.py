"""The fused alignment op: validation, backend dispatch and the public functions.

``alignment_scores`` (all pairs), ``paired_scores`` (row i with row i) and
``rerank_scores`` (each text against its own candidate ids) share one code
path: inputs become :class:`~aladin_fast._inputs.TokenBatch` pairs plus an
optional candidate matrix, and one backend kernel scores them without ever
materialising the [pairs, W, R] similarity tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._inputs import (
    AGGREGATION_CODES,
    AGGREGATIONS,
    PADDINGS,
    REFERENCE_DTYPES,
    check_candidates,
    check_choice,
    check_flag,
    check_pair,
    normalized,
    token_batch,
)
from .._inputs import tracing
from .alignment_op import score_tokens, score_tokens_eager
from .backends import resolve_backend
from .limits import check_index_limits

__all__ = ["alignment_scores", "paired_scores", "rerank_scores"]


def _choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend. float64 runs on "reference" (what "auto" picks) and on "cpu" (the C++
    kernel's scalar double path: gradcheck), never on "triton"."""
    if dtype == torch.float64 and backend == "triton":
        raise TypeError("backend='triton' takes float32, float16 or bfloat16 inputs, got float64; "
                        "use backend='cpu' (CPU tensors) or backend='reference'")
    if dtype == torch.float64 and backend == "cpu":
        # resolve_backend's dtype gate covers the fast kernels; only the availability check applies here
        return resolve_backend("cpu", device, torch.float32)
    return resolve_backend(backend, device, dtype)


def _check_no_function_transforms(text: torch.Tensor, images: torch.Tensor, backend: str) -> None:
    """The kernel backends read the tokens' memory (C++ / Triton): a ``torch.func`` transform's wrapped tensors
    have none, and a forward-mode dual tensor's tangent would be dropped (a silent zero derivative)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    dual = torch.autograd.forward_ad._current_level >= 0 and any(
        torch.autograd.forward_ad.unpack_dual(tokens).tangent is not None for tokens in (text, images))
    transformed = torch._C._functorch.maybe_current_level() is not None and (wrapped(text) or wrapped(images))
    if dual or transformed:
        raise NotImplementedError(
            f"backend={backend!r} does not support torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, vmap) "
            "or forward-mode AD (torch.autograd.forward_ad); use backend='reference' for torch.func.grad / "
            "jacrev / jacfwd and forward-mode AD, and call the op on a batch instead of vmap")


def _vmapped(value) -> bool:
    """Whether ``value`` is batched by a ``torch.func.vmap`` at any of its functorch levels."""
    functorch = torch._C._functorch
    while isinstance(value, torch.Tensor) and functorch.is_functorch_wrapped_tensor(value):
        if functorch.is_batchedtensor(value):
            return True
        value = functorch.get_unwrapped(value)
    return False


def _score(
    text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, candidates, paired,
    aggregation, padding, normalize, backend, return_argmax, max_text_len=None, max_image_len=None,
):
    # maybe_current_level(): None unless a torch.func transform is active here (then the inputs may be wrapped)
    if not tracing() and torch._C._functorch.maybe_current_level() is not None and any(_vmapped(value) for value in (
            text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, candidates)):
        # every backend: the kernels read memory, the validation reads values on the host and the reference
        # writes its blocks in place (vmap failed deep inside with "inplace arithmetic ... not possible")
        raise NotImplementedError(
            "aladin_fast alignment ops do not support torch.func.vmap (any backend): call the op on the whole "
            "batch instead (one call scores every text against every image, or use paired_scores / rerank_scores)")
    if torch.jit.is_tracing():
        # the kernels write their outputs through numpy views the tracer does not see (a trace returned the
        # zero-filled buffers), and the padded sizes would be baked into the graph as constants
        raise RuntimeError(
            "torch.jit.trace cannot record aladin_fast alignment ops (the trace would return wrong scores); "
            "use torch.export.export (dynamic shapes: torch.export.Dim) or torch.compile instead")
    if all(isinstance(tokens, torch.Tensor) and tokens.device.type == "meta" for tokens in (text, images)):
        # (else an error from inside the validation or the reference: "aten::equal ... Meta tensors"; one side
        # on meta is refused by check_pair as mixed devices)
        raise NotImplementedError(
            "aladin_fast alignment ops do not run on meta tensors: the op layer reads the lengths, cu_seqlens and "
            "candidate ids; for output shapes without computing, trace real-device example inputs with "
            "torch.export.export or torch.compile (fake tensors)")
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("padding", padding, PADDINGS)
    normalize, return_argmax = check_flag("normalize", normalize), check_flag("return_argmax", return_argmax)
    text_batch = token_batch("text", text, text_lengths, text_cu_seqlens, allowed_dtypes=REFERENCE_DTYPES,
                             max_len=max_text_len)
    image_batch = token_batch("images", images, image_lengths, image_cu_seqlens, allowed_dtypes=REFERENCE_DTYPES,
                              max_len=max_image_len)
    check_pair(text_batch, image_batch)
    device = text_batch.tokens.device
    chosen = _choose_backend(backend, device, text_batch.tokens.dtype)
    if chosen != "reference" and not tracing():
        _check_no_function_transforms(text_batch.tokens, image_batch.tokens, chosen)
    text_count, image_count = text_batch.count, image_batch.count  # symbolic under torch.export (Dims)
    if paired:
        if text_count != image_count:
            raise ValueError(
                f"paired_scores needs as many texts as images, got {text_count} texts and {image_count} images"
            )
        candidates = torch.arange(text_count, device=device)[:, None]
    elif candidates is not None:
        candidates = check_candidates(candidates, text_count, image_count, device)
    num_candidates = image_count if candidates is None else candidates.shape[1]
    check_index_limits(text_batch, image_batch, num_candidates, chosen)
    if normalize:
        text_batch, image_batch = normalized(text_batch), normalized(image_batch)
    zero_padding = padding == "zero"

    if chosen == "reference":
        return reference.score_token_batches(text_batch, image_batch, candidates, aggregation, zero_padding, return_argmax)

    needs_grad = torch.is_grad_enabled() and (text_batch.tokens.requires_grad or image_batch.tokens.requires_grad)
    want_argmax = return_argmax or (needs_grad and aggregation in ("MrSw", "MrAVGw", "symm"))
    # both kernel backends emit the region -> word argmax for the MwSr-type backward in the same pass
    want_region_argmax = needs_grad and chosen in ("cpu", "triton") and aggregation in ("MwSr", "symm")
    args = (text_batch.tokens, text_batch.offsets, text_batch.lengths, image_batch.tokens, image_batch.offsets,
            image_batch.lengths, candidates, AGGREGATION_CODES[aggregation], zero_padding, text_batch.pad,
            image_batch.pad, chosen, want_argmax, want_region_argmax)
    if tracing():
        # torch.compile traces the registered op. Lengths / candidates built here (no lengths, no cu_seqlens;
        # all pairs or paired) are in range by construction: the op then skips its per-call range check (a
        # device sync); user-given ones are checked by the op on the real values
        built_here = (text_lengths is None and text_cu_seqlens is None and image_lengths is None
                      and image_cu_seqlens is None and (paired or candidates is None))
        scores, argmax, _ = score_tokens(*args, layout_checked=built_here)
    else:  # eager calls skip the dispatch (validated above)
        scores, argmax, _ = score_tokens_eager(*args)
    return scores, (argmax if return_argmax else None)


def alignment_scores(
    text: torch.Tensor,
    images: torch.Tensor,
    text_lengths: Optional[torch.Tensor] = None,
    image_lengths: Optional[torch.Tensor] = None,
    aggregation: str = "MrSw",
    padding: str = "neg_inf",
    normalize: bool = False,
    backend: str = "auto",
    return_argmax: bool = False,
    *,
    text_cu_seqlens: Optional[torch.Tensor] = None,
    image_cu_seqlens: Optional[torch.Tensor] = None,
    max_text_len: Optional[int] = None,
    max_image_len: Optional[int] = None,
):
    """Fine-grained alignment score of every caption with every image.

    Args:
        text: word features ``[Nt, W, D]`` (padded) or ``[sum W, D]`` with
            ``text_cu_seqlens [Nt + 1]`` (packed); float32, float16 or bfloat16
            (float64 with ``backend="reference"`` or ``"cpu"``: scores and
            gradients in float64, e.g. for ``torch.autograd.gradcheck``).
        images: region features ``[Ni, R, D]`` or packed with ``image_cu_seqlens``.
        text_lengths / image_lengths: valid tokens per row ``[N]`` (int), or a
            prefix bool mask ``[N, L]``; None means all valid.
        aggregation: ``"MrSw"`` (sum over words of the max over regions, the
            TERAN/ALADIN teacher score), ``"MrAVGw"`` (its mean over valid words),
            ``"MwSr"`` (sum over regions of the max over words), ``"symm"``
            (MrSw + MwSr), ``"sum"`` or ``"mean"`` of all valid similarities.
        padding: ``"neg_inf"`` (padded tokens never take part) or ``"zero"``
            (TERAN-compatible: padded tokens are zero vectors; see
            :mod:`aladin_fast.reference` for the exact rule).
        normalize: L2-normalise every token first (unit vectors at any finite scale, zero tokens stay
            zero; docs/kernel_contract.md, "Numerics").
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
        return_argmax: also return the winning region per word.
        max_text_len / max_image_len: packed inputs only: the padded length as a
            Python int (like flash-attn's ``max_seqlen``), at least the longest
            sequence; default the longest, read from ``*_cu_seqlens`` on the host.
            Pass them for ``torch.compile(fullgraph=True)``: the host read would
            break the graph. They set the argmax width and, with
            ``padding="zero"``, the padded sizes.

    Returns:
        scores ``[Nt, Ni]`` float32 (accumulated in float32; float64 for float64 inputs), and with
        ``return_argmax`` also ``argmax [Nt, Ni, W]`` int32 (first index wins
        ties; -1 for padded words, and for every word of an empty image with
        ``padding="neg_inf"``; with ``padding="zero"`` a padded region can win
        (the first padded index), so an empty image gives 0).
    """
    scores, argmax = _score(
        text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, None, False,
        aggregation, padding, normalize, backend, return_argmax, max_text_len, max_image_len,
    )
    return (scores, argmax) if return_argmax else scores


def paired_scores(
    text: torch.Tensor,
    images: torch.Tensor,
    text_lengths: Optional[torch.Tensor] = None,
    image_lengths: Optional[torch.Tensor] = None,
    aggregation: str = "MrSw",
    padding: str = "neg_inf",
    normalize: bool = False,
    backend: str = "auto",
    return_argmax: bool = False,
    *,
    text_cu_seqlens: Optional[torch.Tensor] = None,
    image_cu_seqlens: Optional[torch.Tensor] = None,
    max_text_len: Optional[int] = None,
    max_image_len: Optional[int] = None,
):
    """Score caption i with image i: returns ``[N]`` float32 (float64 for float64 inputs) (and ``argmax [N, W]``).

    Arguments as in :func:`alignment_scores`; both sides must have N rows.
    """
    scores, argmax = _score(
        text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, None, True,
        aggregation, padding, normalize, backend, return_argmax, max_text_len, max_image_len,
    )
    scores = scores[:, 0]
    return (scores, argmax[:, 0]) if return_argmax else scores


def rerank_scores(
    text: torch.Tensor,
    images: torch.Tensor,
    candidates: torch.Tensor,
    text_lengths: Optional[torch.Tensor] = None,
    image_lengths: Optional[torch.Tensor] = None,
    aggregation: str = "MrSw",
    padding: str = "neg_inf",
    normalize: bool = False,
    backend: str = "auto",
    return_argmax: bool = False,
    *,
    text_cu_seqlens: Optional[torch.Tensor] = None,
    image_cu_seqlens: Optional[torch.Tensor] = None,
    max_text_len: Optional[int] = None,
    max_image_len: Optional[int] = None,
):
    """Score each caption against its own candidate images (serving-time rerank).

    Args:
        candidates: int ``[Nt, K]`` ids into the first dim of ``images``
            (repeats allowed). Other arguments as in :func:`alignment_scores`.

    Returns:
        scores ``[Nt, K]`` float32 (float64 for float64 inputs) (and ``argmax [Nt, K, W]`` int32).
    """
    if candidates is None:
        raise ValueError("candidates must be an int tensor [Nt, K] of image ids, got None (use alignment_scores for all pairs)")
    scores, argmax = _score(
        text, images, text_lengths, image_lengths, text_cu_seqlens, image_cu_seqlens, candidates, False,
        aggregation, padding, normalize, backend, return_argmax, max_text_len, max_image_len,
    )
    return (scores, argmax) if return_argmax else scores
