"""Streamed all-pairs scoring for whole galleries: ``full_scores``.

Evaluation of a teacher on COCO 5K scores 25,000 captions against 5,000 images.
``full_scores`` walks the caption side in chunks, calls the fused
``alignment_scores`` kernel on each chunk against the whole image batch (or
image chunks), and either fills the ``[Nt, Ni]`` score matrix or keeps only a
running top-k per caption, so the workspace beyond the output is bounded by
one ``[chunk, image_chunk]`` block.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .._inputs import _as_tensor
from .alignment import alignment_scores

OP_KWARGS = ("aggregation", "padding", "normalize", "backend")  # what **op_kwargs passes to alignment_scores


def _progress(total: int, enabled: bool, description: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but keep scoring usable without it
        return None
    return tqdm(total=total, desc=description, unit="caption")


def _rows(tensor: torch.Tensor, lengths: Optional[torch.Tensor], start: int, stop: int):
    return tensor[start:stop], None if lengths is None else lengths[start:stop]


def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_lengths(name: str, lengths, count: int):
    """Lengths (or a mask) with one row per item, as a tensor: each chunk takes its rows, so extra rows would
    be ignored silently and missing ones reported with a chunk's size."""
    if lengths is None:
        return None
    lengths = _as_tensor(name, lengths)
    if lengths.ndim == 0 or lengths.shape[0] != count:
        raise ValueError(f"{name} must have one entry (or mask row) per item: shape [{count}] or [{count}, L], "
                         f"got {list(lengths.shape)}")
    return lengths


def best_first(values: torch.Tensor, topk: int) -> torch.Tensor:
    """Column order of the best ``topk`` per row of ``values [N, M]``: descending, stable (the earlier column
    first on ties), NaN last (after -inf): a NaN score is the worst match, as the evaluation's nan="worst"
    ranks it. Used for every top-k of scores (``full_scores``, the retriever)."""
    nan = values.isnan()
    order = torch.sort(values.masked_fill(nan, float("-inf")), dim=1, descending=True, stable=True).indices
    if bool(nan.any()):  # then NaN after every number, -inf included, keeping that order otherwise
        order = order.gather(1, torch.sort(nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    return order[:, :topk]


def merge_best(values: torch.Tensor, ids: torch.Tensor, block: torch.Tensor, block_ids: torch.Tensor, topk: int,
               *, blocks_in_id_order: bool = True):
    """A running top-k: the best ``topk`` per row of ``(values, ids) [N, k']`` and a new ``(block, block_ids)
    [N, M]`` (``block_ids`` broadcastable), by :func:`best_first`. The running best comes first, so on ties it
    wins over the block: with blocks in increasing id order, the lower id first. Blocks in any id order
    (``blocks_in_id_order=False``) are merged in id order first, for the same tie rule."""
    merged_values = torch.cat([values, block], dim=1)
    merged_ids = torch.cat([ids, block_ids.expand_as(block)], dim=1)
    if not blocks_in_id_order:
        by_id = torch.argsort(merged_ids, dim=1, stable=True)
        merged_values, merged_ids = merged_values.gather(1, by_id), merged_ids.gather(1, by_id)
    order = best_first(merged_values, topk)
    return merged_values.gather(1, order), merged_ids.gather(1, order)


def full_scores(
    text: torch.Tensor,
    images: torch.Tensor,
    text_lengths: Optional[torch.Tensor] = None,
    image_lengths: Optional[torch.Tensor] = None,
    *,
    chunk: int = 1024,
    image_chunk: Optional[int] = None,
    topk: Optional[int] = None,
    progress: bool = False,
    out: Optional[torch.Tensor] = None,
    **op_kwargs,
):
    """All-pairs alignment scores of a whole gallery, streamed in chunks.

    Args:
        text: padded caption tokens ``[Nt, W, D]`` (may live on CPU while the
            op runs on ``images.device``: each chunk is moved there).
        images: padded region tokens ``[Ni, R, D]``.
        text_lengths / image_lengths: valid tokens per row (optional).
        chunk: captions per kernel call (bounds the workspace).
        image_chunk: images per kernel call (None: all images at once).
        topk: if given, return ``(values [Nt, topk], indices [Nt, topk] int64)``
            of the best images per caption instead of the full matrix: higher score first,
            the lower image id first on ties, NaN scores last (after -inf), as the
            evaluation's ``nan="worst"`` ranks them.
        progress: show a tqdm progress bar.
        out: optional preallocated ``[Nt, Ni]`` output of the scores' dtype (e.g. a memory-mapped
            tensor); the full matrix only (not with ``topk``).
        **op_kwargs: ``aggregation``, ``padding``, ``normalize``, ``backend`` as in
            :func:`aladin_fast.alignment_scores`.

    Returns:
        ``[Nt, Ni]`` scores, or the top-k pair when ``topk`` is set: float32, float64 for float64 inputs
        (as :func:`aladin_fast.alignment_scores`; they were rounded to float32 here before).
    """
    if not isinstance(text, torch.Tensor) or not isinstance(images, torch.Tensor):
        raise TypeError("text and images must be torch.Tensors (padded [N, L, D])")
    if text.ndim != 3 or images.ndim != 3:
        raise ValueError(
            f"full_scores takes padded inputs: text [Nt, W, D] and images [Ni, R, D], got {list(text.shape)} "
            f"and {list(images.shape)}"
        )
    unknown = sorted(set(op_kwargs) - set(OP_KWARGS))
    if unknown:
        raise TypeError(f"full_scores got unexpected keyword arguments {unknown} (it passes {list(OP_KWARGS)} "
                        "to alignment_scores and returns scores only)")
    _check_int("chunk", chunk)
    _check_int("image_chunk", image_chunk, allow_none=True)
    _check_int("topk", topk, allow_none=True)
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    num_texts, num_images = text.shape[0], images.shape[0]
    text_lengths = _check_lengths("text_lengths", text_lengths, num_texts)
    image_lengths = _check_lengths("image_lengths", image_lengths, num_images)
    image_chunk = max(num_images, 1) if image_chunk is None else int(image_chunk)  # an empty gallery: no blocks
    if image_chunk < 1:
        raise ValueError(f"image_chunk must be >= 1, got {image_chunk}")
    device = images.device
    # the op's score dtype: float64 tokens score in float64 ("float64 throughout"), everything else in float32
    score_dtype = torch.float64 if text.dtype == images.dtype == torch.float64 else torch.float32
    if topk is not None:
        if not 1 <= topk <= max(num_images, 1) or num_images == 0:
            raise ValueError(f"topk must be in [1, {num_images}] (the number of images), got {topk}")
        if out is not None:
            raise ValueError("out is the full [Nt, Ni] matrix; with topk the result is (values, indices): "
                             "pass one of them")
        best_values = torch.empty(num_texts, topk, dtype=score_dtype)
        best_indices = torch.empty(num_texts, topk, dtype=torch.int64)
    else:
        if out is None:
            out = torch.empty(num_texts, num_images, dtype=score_dtype, device=device)
        elif tuple(out.shape) != (num_texts, num_images) or out.dtype != score_dtype:
            raise ValueError(f"out must be {str(score_dtype).replace('torch.', '')} [{num_texts}, {num_images}], "
                             f"got {out.dtype} {list(out.shape)}")
    bar = _progress(num_texts, progress, "full_scores")
    for start in range(0, num_texts, chunk):
        stop = min(num_texts, start + chunk)
        text_rows, text_len = _rows(text, text_lengths, start, stop)
        text_rows = text_rows.to(device)
        text_len = None if text_len is None else text_len.to(device)
        if topk is None:
            for image_start in range(0, num_images, image_chunk):
                image_stop = min(num_images, image_start + image_chunk)
                image_rows, image_len = _rows(images, image_lengths, image_start, image_stop)
                block = alignment_scores(text_rows, image_rows, text_len, image_len, **op_kwargs)
                out[start:stop, image_start:image_stop] = block.to(out.device)
        else:
            # start empty: (-inf, image 0) placeholders would win every tie with a real -inf score
            values = torch.empty(stop - start, 0, dtype=score_dtype)
            indices = torch.empty(stop - start, 0, dtype=torch.int64)
            for image_start in range(0, num_images, image_chunk):
                image_stop = min(num_images, image_start + image_chunk)
                image_rows, image_len = _rows(images, image_lengths, image_start, image_stop)
                block = alignment_scores(text_rows, image_rows, text_len, image_len, **op_kwargs).to(score_dtype).cpu()
                values, indices = merge_best(values, indices, block, torch.arange(image_start, image_stop), topk)
            best_values[start:stop], best_indices[start:stop] = values, indices
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return (best_values, best_indices) if topk is not None else out
