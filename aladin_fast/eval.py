"""Image-text retrieval evaluation: ranks, recalls and the COCO 1K / 5K protocols.

The protocol of VSE++ / SCAN / TERAN / ALADIN on a score matrix
``scores [N_images, N_captions]`` (higher = more similar), where caption ``j``
describes image ``j // captions_per_image`` (5 consecutive captions per image):

* image-to-text (i2t): each image is a query over all captions; its rank is the
  best (smallest) rank of any of its own captions.
* text-to-image (t2i): each caption is a query over all images; its rank is the
  rank of its image.
* R@K = percentage of queries whose rank is <= K (K = 1, 5, 10); ``medr`` and
  ``meanr`` are the median and mean of the 1-based ranks; ``rsum`` is the sum of
  the six recalls.
* COCO 1K = the mean of every metric over 5 folds of 1,000 images (and their
  5,000 captions); COCO 5K = all 5,000 images at once.

Ties are broken pessimistically: a competitor whose score equals the ground
truth's counts as ranked above it, so a constant score matrix gives the worst
rank, never a lucky one. Other captions of the same image are not competitors
in i2t (only the best of them matters). This rule is deterministic and does not
depend on sort stability, unlike ``argsort``-based implementations, which agree
with it whenever there are no ties.

Ranking is chunked over rows and columns on torch (no Python loop per query),
so the 5,000 x 25,000 matrix is ranked without sorting it.
"""
from __future__ import annotations

import math
import numbers
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._inputs import check_positive_int, torch_compatible

__all__ = [
    "METRIC_NAMES",
    "retrieval_ranks",
    "metrics_from_ranks",
    "chance_recalls",
    "retrieval_metrics",
    "folds_metrics",
    "coco_1k",
    "coco_5k",
    "evaluate_scorer",
    "alignment_score_fn",
]

ScoreMatrix = Union[torch.Tensor, np.ndarray]

RECALL_LEVELS = (1, 5, 10)
METRIC_NAMES = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)
CHUNK_ELEMENTS = 1 << 24  # comparisons per chunk (16 MB of bool temporaries, 64 MB for their int32 counts)
NAN_POLICIES = ("raise", "worst")


def _as_score_tensor(scores: ScoreMatrix, captions_per_image: int, nan: str) -> Tuple[torch.Tensor, bool]:
    """Validate ``scores``: ``(floating CPU-or-device torch tensor, whether it holds NaN)``.

    Never a copy of a floating matrix: NaN is counted in row chunks (``torch.isnan(scores).sum()`` made a bool
    and an int64 temporary of the whole matrix, 2.25x a float32 matrix) and, for ``nan="worst"``, replaced
    chunk by chunk where the ranks are counted (:func:`_without_nan`), not in a full copy."""
    check_positive_int("captions_per_image", captions_per_image)
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(torch_compatible(scores))
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor or numpy.ndarray, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be 2-D [N_images, N_captions], got shape {tuple(scores.shape)}"
        )
    num_images, num_captions = scores.shape
    if num_images == 0:
        raise ValueError("scores has no images (shape[0] == 0)")
    if num_captions != captions_per_image * num_images:
        raise ValueError(
            f"scores has {num_captions} captions (columns) for {num_images} images (rows); expected "
            f"captions_per_image * N_images = {captions_per_image} * {num_images} = "
            f"{captions_per_image * num_images}"
        )
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)  # exact for integers up to 2**53
    nan_count = 0
    step = _rows_per_chunk(scores.shape[1])
    for start in range(0, num_images, step):
        nan_count += int(torch.count_nonzero(torch.isnan(scores[start:start + step])))
    if nan_count and nan == "raise":
        raise ValueError(
            f"scores contains {nan_count} NaN value(s); pass nan='worst' to rank NaN below every number"
        )
    return scores, bool(nan_count)


def _without_nan(block: torch.Tensor, has_nan: bool) -> torch.Tensor:
    """NaN -> -inf: worst score; the pessimistic tie rule then ranks a NaN ground truth below every
    competitor, including other NaNs. Applied to each chunk (and gathered ground truth) as it is ranked."""
    if not has_nan:
        return block
    return torch.nan_to_num(block, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def _count_at_least(block: torch.Tensor, threshold: torch.Tensor, dim: int) -> torch.Tensor:
    """Number of entries of ``block`` >= ``threshold`` (broadcast) along ``dim``, int64."""
    # uint8 view + int32 accumulation is ~2x faster than a bool sum on CPU
    return (block >= threshold).view(torch.uint8).sum(dim, dtype=torch.int32).to(torch.int64)


def retrieval_ranks(
    scores: ScoreMatrix, captions_per_image: int = 5, *, nan: str = "raise"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the ground truth for every query, both directions.

    Args:
        scores: ``[N_images, N_captions]`` torch tensor or numpy array (any float
            dtype; integers are converted to float64); caption ``j`` belongs to
            image ``j // captions_per_image``.
        captions_per_image: captions per image (5 for COCO and Flickr30k).
        nan: ``"raise"`` (default) rejects NaN scores; ``"worst"`` treats NaN as
            ``-inf``, the lowest score.

    Returns:
        ``(i2t_ranks [N_images], t2i_ranks [N_captions])``, int64 on the device
        of ``scores``. ``i2t_ranks[i] = 1 + #{captions of other images scoring
        >= the best caption of image i}``; ``t2i_ranks[j] = 1 + #{other images
        scoring >= image j // captions_per_image}`` (pessimistic ties).
    """
    scores, has_nan = _as_score_tensor(scores, captions_per_image, nan)
    return _ranks(scores, captions_per_image, has_nan)


def _ranks(scores: torch.Tensor, captions_per_image: int, has_nan: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`retrieval_ranks` of a validated matrix (NaN, if ``has_nan``, ranked as -inf chunk by chunk)."""
    num_images, num_captions = scores.shape
    k = captions_per_image
    device = scores.device
    caption_owner = torch.arange(num_captions, device=device) // k

    # t2i: the ground-truth score of caption j is scores[j // k, j]
    truth = _without_nan(scores[caption_owner, torch.arange(num_captions, device=device)], has_nan)  # [N_captions]
    t2i = torch.empty(num_captions, dtype=torch.int64, device=device)
    step = _rows_per_chunk(num_images)
    for start in range(0, num_captions, step):
        stop = min(start + step, num_captions)
        # counts the ground truth itself too (x >= x), which is the "1 +" of a 1-based rank
        t2i[start:stop] = _count_at_least(_without_nan(scores[:, start:stop], has_nan), truth[None, start:stop], dim=0)
    # an image whose own score is -inf (from NaN) still counts itself: -inf >= -inf

    # i2t: best own caption, then count captions of other images scoring at least as high
    own_columns = torch.arange(num_images, device=device)[:, None] * k + torch.arange(k, device=device)
    own = _without_nan(scores.gather(1, own_columns), has_nan)  # [N_images, k]: image i's own captions (no copy of scores)
    best = own.max(dim=1).values  # [N_images]
    own_at_least = _count_at_least(own, best[:, None], dim=1)  # >= 1: the best caption itself
    i2t = torch.empty(num_images, dtype=torch.int64, device=device)
    step = _rows_per_chunk(num_captions)
    for start in range(0, num_images, step):
        stop = min(start + step, num_images)
        all_at_least = _count_at_least(_without_nan(scores[start:stop], has_nan), best[start:stop, None], dim=1)
        i2t[start:stop] = all_at_least - own_at_least[start:stop] + 1
    return i2t, t2i


def _direction_metrics(ranks: torch.Tensor, prefix: str) -> Dict[str, float]:
    ranks64 = ranks.detach().to("cpu", torch.float64)
    metrics = {
        f"{prefix}_r{level}": 100.0 * float((ranks64 <= level).double().mean()) for level in RECALL_LEVELS
    }
    # SCAN's convention: floor(median of 0-based ranks) + 1 == floor(median of 1-based ranks)
    metrics[f"{prefix}_medr"] = float(math.floor(float(np.median(ranks64.numpy()))))
    metrics[f"{prefix}_meanr"] = float(ranks64.mean())
    return metrics


def metrics_from_ranks(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor) -> Dict[str, float]:
    """Recalls (percent), median and mean rank from 1-based ranks.

    Args:
        i2t_ranks: ``[N_images]`` 1-based ranks (int tensor or array).
        t2i_ranks: ``[N_captions]`` 1-based ranks.

    Returns:
        dict with the keys of :data:`METRIC_NAMES` (floats). ``medr`` is the
        floor of the median (SCAN convention), ``meanr`` the plain mean.
    """
    ranks = {}
    for name, value in (("i2t_ranks", i2t_ranks), ("t2i_ranks", t2i_ranks)):
        value = torch.as_tensor(value)
        if value.dim() != 1 or value.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(value.shape)}")
        if value.is_floating_point():
            bad = ~(value.isfinite() & (value == value.floor()))  # NaN, inf, fractions
            if bool(bad.any()):
                raise ValueError(f"{name} must hold whole ranks, got {value[bad][0].item()}")
        if bool((value < 1).any()):
            raise ValueError(f"{name} must be 1-based (all >= 1), got minimum {int(value.min())}")
        ranks[name] = value
    metrics = {**_direction_metrics(ranks["i2t_ranks"], "i2t"), **_direction_metrics(ranks["t2i_ranks"], "t2i")}
    metrics["rsum"] = sum(metrics[f"{d}_r{level}"] for d in ("i2t", "t2i") for level in RECALL_LEVELS)
    return {name: metrics[name] for name in METRIC_NAMES}


def chance_recalls(num_images: int, captions_per_image: int = 5) -> Dict[str, float]:
    """Expected recalls (percent) of a uniformly random ranking, and their sum ``rsum``.

    t2i: one right image among ``N``, so ``K / N``. i2t: ``c`` right captions among ``M = N c``; a query
    hits when any of them is in the top K: ``1 - C(M - c, K) / C(M, K)``. (``K / N`` for i2t, the usual
    shortcut, is off for small test sets: 62.5 % instead of 50.7 % at N = 8, K = 5.)
    """
    check_positive_int("num_images", num_images)
    check_positive_int("captions_per_image", captions_per_image)
    total = num_images * captions_per_image
    recalls = {f"i2t_r{level}": 100.0 * (1.0 - math.comb(total - captions_per_image, level) / math.comb(total, level)
                                         if level <= total else 1.0) for level in RECALL_LEVELS}
    recalls.update({f"t2i_r{level}": 100.0 * min(1.0, level / num_images) for level in RECALL_LEVELS})
    recalls["rsum"] = sum(recalls.values())
    return recalls


def retrieval_metrics(scores: ScoreMatrix, captions_per_image: int = 5, *, nan: str = "raise") -> Dict[str, float]:
    """Standard retrieval metrics of one score matrix (the COCO 5K / Flickr30k protocol).

    Args:
        scores: ``[N_images, N_captions]`` (torch or numpy; image i vs caption j,
            caption j belongs to image ``j // captions_per_image``).
        captions_per_image: captions per image, 5 by default.
        nan: ``"raise"`` or ``"worst"`` (NaN ranks below every number).

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", ...,
        "rsum"}``: recalls in percent, 1-based ranks, ``rsum`` = sum of the six
        recalls. Ties count against the ground truth (see the module docstring).
    """
    return metrics_from_ranks(*retrieval_ranks(scores, captions_per_image, nan=nan))


def folds_metrics(
    scores: ScoreMatrix, fold_size: int, captions_per_image: int = 5, *, nan: str = "raise"
) -> Dict[str, float]:
    """Mean of every metric over consecutive folds of ``fold_size`` images.

    Fold ``f`` is the block ``scores[f*n:(f+1)*n, f*n*k:(f+1)*n*k]`` with
    ``n = fold_size`` and ``k = captions_per_image``; images and captions of
    other folds are not competitors. ``rsum`` is the mean of the per-fold rsums
    (equal to the sum of the mean recalls).

    Raises:
        ValueError: if ``fold_size`` does not divide ``N_images``.
    """
    scores, has_nan = _as_score_tensor(scores, captions_per_image, nan)
    num_images = scores.shape[0]
    if isinstance(fold_size, bool) or not isinstance(fold_size, numbers.Integral) or fold_size < 1 \
            or num_images % fold_size:
        raise ValueError(
            f"fold_size must be a positive int dividing N_images={num_images}, got {fold_size!r}"
        )
    fold_size = int(fold_size)
    k = captions_per_image
    per_fold = []
    for start in range(0, num_images, fold_size):
        block = scores[start:start + fold_size, start * k:(start + fold_size) * k]
        per_fold.append(metrics_from_ranks(*_ranks(block, k, has_nan)))  # validated once, above
    return {name: float(np.mean([fold[name] for fold in per_fold])) for name in METRIC_NAMES}


def coco_1k(scores: ScoreMatrix, captions_per_image: int = 5, *, nan: str = "raise") -> Dict[str, float]:
    """COCO 1K: metrics averaged over folds of 1,000 images (5 folds of the 5K test set).

    ``scores`` is ``[N_images, 5 * N_images]`` with ``N_images`` a multiple of 1000.
    """
    return folds_metrics(scores, 1000, captions_per_image, nan=nan)


def coco_5k(scores: ScoreMatrix, captions_per_image: int = 5, *, nan: str = "raise") -> Dict[str, float]:
    """COCO 5K: metrics on the whole matrix (all images compete). Same as :func:`retrieval_metrics`."""
    return retrieval_metrics(scores, captions_per_image, nan=nan)


def _length(collection, name: str) -> int:
    """Number of items of ``collection``; a tuple's arrays must agree on it."""
    if isinstance(collection, tuple) and collection:
        lengths = [len(part) for part in collection]
        if len(set(lengths)) != 1:
            raise ValueError(f"{name} is a tuple of arrays with different first dimensions {lengths}")
        return lengths[0]
    return len(collection)


def _rows(collection, start: int, stop: int):
    """``collection[start:stop]``; a tuple of arrays is sliced element-wise."""
    if isinstance(collection, tuple) and collection:
        return tuple(part[start:stop] for part in collection)
    return collection[start:stop]


def evaluate_scorer(
    score_fn: Callable[[object, object], ScoreMatrix],
    images,
    captions,
    *,
    captions_per_image: int = 5,
    image_block: int = 1000,
    caption_block: int = 5000,
    fold_size: Optional[int] = 1000,
    warmup: bool = False,
    nan: str = "raise",
) -> Dict[str, object]:
    """Score every image against every caption in blocks, then rank and time it.

    Args:
        score_fn: ``score_fn(image_rows, caption_rows) -> [n_i, n_c]`` block of
            scores (torch tensor on any device, or numpy), where ``image_rows``
            is ``images[a:b]`` and ``caption_rows`` is ``captions[c:d]``. When
            ``images`` / ``captions`` is a tuple of arrays, e.g.
            ``(features [N, R, D], lengths [N])``, each array is sliced, so the
            scorer receives ``(features[a:b], lengths[a:b])``.
        images: ``N_images`` items: anything sliceable with a length (tensor,
            array, list), or a tuple of arrays sharing their first dimension.
        captions: ``N_captions = captions_per_image * N_images`` items, same rules.
        captions_per_image: captions per image (consecutive).
        image_block / caption_block: block sizes; one call scores
            ``image_block x caption_block`` pairs (bounding the scorer's memory).
        fold_size: also report fold-averaged metrics (COCO 1K with 1000) when
            it is smaller than ``N_images`` and divides it; None to skip.
        warmup: score the first block once, untimed, before timing (JIT,
            autotuning, lazy allocation).
        nan: NaN policy, see :func:`retrieval_metrics`.

    Returns:
        ``{"all": metrics on the whole matrix, "folds": fold-averaged metrics or
        None, "latency": {...}, "scores": [N_images, N_captions] float32 CPU}``.
        The blocks are stored, and ranked, in float32: float64 scores closer than
        float32 resolution become ties (ranked pessimistically).
        ``latency`` holds ``score_seconds`` (total scoring wall time, device
        synchronised), ``rank_seconds``, ``blocks``, ``block_ms_median`` /
        ``block_ms_max``, and the amortised per-query costs of batched
        evaluation: ``t2i_ms_per_query`` (one caption against all images =
        ``score_seconds / N_captions``) and ``i2t_ms_per_query`` (one image
        against all captions). These are throughput figures, not single-query
        serving latency.
    """
    image_block, caption_block = check_positive_int("image_block", image_block), check_positive_int(
        "caption_block", caption_block)
    if fold_size is not None and (not isinstance(fold_size, numbers.Integral) or isinstance(fold_size, bool)
                                  or fold_size < 1):
        raise ValueError(f"fold_size must be a positive int or None, got {fold_size!r}")  # before any scoring
    fold_size = None if fold_size is None else int(fold_size)
    num_images, num_captions = _length(images, "images"), _length(captions, "captions")
    if num_images == 0 or num_captions != captions_per_image * num_images:
        raise ValueError(
            f"captions has {num_captions} items for {num_images} images; expected "
            f"captions_per_image * N_images = {captions_per_image * num_images} (and N_images > 0)"
        )
    scores = torch.empty(num_images, num_captions, dtype=torch.float32)

    def score_block(i0: int, i1: int, c0: int, c1: int) -> torch.Tensor:
        block = score_fn(_rows(images, i0, i1), _rows(captions, c0, c1))
        block = torch.as_tensor(block)
        if tuple(block.shape) != (i1 - i0, c1 - c0):
            raise ValueError(
                f"score_fn returned shape {tuple(block.shape)} for images [{i0}:{i1}] x captions "
                f"[{c0}:{c1}]; expected ({i1 - i0}, {c1 - c0}) (rows = images, columns = captions)"
            )
        if block.is_cuda:
            torch.cuda.synchronize(block.device)
        return block

    if warmup:
        score_block(0, min(image_block, num_images), 0, min(caption_block, num_captions))
    block_seconds = []
    with torch.no_grad():
        for i0 in range(0, num_images, image_block):
            i1 = min(i0 + image_block, num_images)
            for c0 in range(0, num_captions, caption_block):
                c1 = min(c0 + caption_block, num_captions)
                start = time.perf_counter()
                block = score_block(i0, i1, c0, c1)
                block_seconds.append(time.perf_counter() - start)
                scores[i0:i1, c0:c1] = block.detach().to("cpu", torch.float32)
    score_seconds = sum(block_seconds)

    start = time.perf_counter()
    all_metrics = retrieval_metrics(scores, captions_per_image, nan=nan)
    folds = None
    if fold_size is not None and fold_size < num_images and num_images % fold_size == 0:
        folds = folds_metrics(scores, fold_size, captions_per_image, nan=nan)
    rank_seconds = time.perf_counter() - start
    latency = {
        "score_seconds": score_seconds,
        "rank_seconds": rank_seconds,
        "blocks": len(block_seconds),
        "block_ms_median": 1e3 * statistics.median(block_seconds),
        "block_ms_max": 1e3 * max(block_seconds),
        "t2i_ms_per_query": 1e3 * score_seconds / num_captions,
        "i2t_ms_per_query": 1e3 * score_seconds / num_images,
    }
    return {"all": all_metrics, "folds": folds, "latency": latency, "scores": scores}


def alignment_score_fn(**op_kwargs) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]:
    """A scorer for :func:`evaluate_scorer` built on the fused ``alignment_scores`` op.

    Use with ``images = (region_features [N, R, D], image_lengths [N])`` and
    ``captions = (word_features [5N, W, D], text_lengths [5N])``; ``op_kwargs``
    go to :func:`aladin_fast.alignment_scores` (``aggregation``, ``backend``,
    ``normalize``, ...). Returns blocks ``[n_images, n_captions]`` (the op's
    ``[Nt, Ni]`` output transposed).
    """
    from .ops import alignment_scores  # imported lazily: eval works without the compiled backends

    def score(image_rows, caption_rows):
        region_features, image_lengths = image_rows
        word_features, text_lengths = caption_rows
        return alignment_scores(word_features, region_features, text_lengths, image_lengths, **op_kwargs).T

    return score
