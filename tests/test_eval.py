"""Retrieval metrics: hand-computed ranks, the tie rule, folds, a brute-force oracle, bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import aladin_fast
from aladin_fast import eval as retrieval_eval
from aladin_fast.eval import (
    METRIC_NAMES,
    alignment_score_fn,
    coco_1k,
    coco_5k,
    evaluate_scorer,
    folds_metrics,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)

# 2 images x 10 captions; captions 0-4 belong to image 0, captions 5-9 to image 1.
HAND_SCORES = [
    [0.90, 0.10, 0.20, 0.30, 0.40, 0.95, 0.50, 0.05, 0.00, 0.60],
    [0.20, 0.30, 0.65, 0.10, 0.00, 0.70, 0.60, 0.50, 0.40, 0.30],
]


def brute_force_ranks(scores: np.ndarray, k: int):
    """Pessimistic-tie ranks, one query at a time, straight from the definition."""
    n_images, n_captions = scores.shape
    i2t = []
    for i in range(n_images):
        own = [j for j in range(n_captions) if j // k == i]
        best = max(scores[i, j] for j in own)
        i2t.append(1 + sum(1 for j in range(n_captions) if j // k != i and scores[i, j] >= best))
    t2i = []
    for j in range(n_captions):
        truth = scores[j // k, j]
        t2i.append(1 + sum(1 for i in range(n_images) if i != j // k and scores[i, j] >= truth))
    return np.array(i2t), np.array(t2i)


def argsort_ranks(scores: np.ndarray, k: int):
    """The SCAN / VSE++ implementation (argsort); agrees with ours when there are no ties."""
    n_images, n_captions = scores.shape
    i2t = np.zeros(n_images)
    for i in range(n_images):
        order = np.argsort(scores[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in range(k * i, k * i + k))
    t2i = np.zeros(n_captions)
    for j in range(n_captions):
        order = np.argsort(scores[:, j])[::-1]
        t2i[j] = np.where(order == j // k)[0][0]
    return i2t + 1, t2i + 1


def scan_metrics(i2t: np.ndarray, t2i: np.ndarray):
    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for level in (1, 5, 10):
            out[f"{prefix}_r{level}"] = 100.0 * np.mean(ranks <= level)
        out[f"{prefix}_medr"] = math.floor(np.median(ranks - 1)) + 1
        out[f"{prefix}_meanr"] = ranks.mean()
    out["rsum"] = sum(out[f"{p}_r{level}"] for p in ("i2t", "t2i") for level in (1, 5, 10))
    return out


def assert_metrics_close(actual, expected, tol=1e-9):
    assert set(actual) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert actual[name] == pytest.approx(expected[name], abs=tol), name


def test_hand_made_ranks_and_metrics():
    i2t, t2i = retrieval_ranks(torch.tensor(HAND_SCORES))
    # image 0: best own caption 0.90, one other caption (0.95) above it; image 1: best 0.70, none above
    assert i2t.tolist() == [2, 1]
    assert t2i.tolist() == [1, 2, 2, 1, 1, 2, 1, 1, 1, 2]
    metrics = retrieval_metrics(torch.tensor(HAND_SCORES))
    expected = {
        "i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 1.0, "i2t_meanr": 1.5,
        "t2i_r1": 60.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 1.0, "t2i_meanr": 1.4,
        "rsum": 510.0,
    }
    assert_metrics_close(metrics, expected)
    assert list(metrics) == list(METRIC_NAMES)


def test_planted_ranks_cover_all_recall_levels():
    # 12 images, 1 caption each: caption j's image is planted at rank planted[j]; image i's caption likewise
    planted = [1, 1, 2, 3, 5, 6, 7, 10, 11, 12, 4, 9]
    n = len(planted)
    scores = np.zeros((n, n))
    for j, rank in enumerate(planted):
        others = [i for i in range(n) if i != j]
        order = others[: rank - 1] + [j] + others[rank - 1:]  # images in decreasing score
        for position, i in enumerate(order):
            scores[i, j] = n - position
    i2t, t2i = retrieval_ranks(scores, captions_per_image=1)
    assert t2i.tolist() == planted
    metrics = retrieval_metrics(scores, captions_per_image=1)
    assert metrics["t2i_r1"] == pytest.approx(100 * 2 / 12)
    assert metrics["t2i_r5"] == pytest.approx(100 * 6 / 12)
    assert metrics["t2i_r10"] == pytest.approx(100 * 10 / 12)
    assert metrics["t2i_medr"] == 5.0  # sorted ranks 1 1 2 3 4 [5 6] 7 9 10 11 12: median 5.5, floored (SCAN)
    assert metrics["t2i_meanr"] == pytest.approx(np.mean(planted))
    np.testing.assert_array_equal(i2t.numpy(), brute_force_ranks(scores, 1)[0])


def test_ties_count_against_the_ground_truth():
    n, k = 3, 5
    i2t, t2i = retrieval_ranks(torch.zeros(n, n * k), k)
    assert i2t.tolist() == [n * k - k + 1] * n  # every caption of another image ties -> ranked above
    assert t2i.tolist() == [n] * (n * k)
    scores = torch.zeros(2, 10)
    scores[0, 0] = scores[0, 7] = 1.0  # image 0: best own caption tied with caption 7 of image 1
    scores[1, 0] = 1.0  # caption 0: image 1 ties with its image 0
    i2t, t2i = retrieval_ranks(scores)
    assert i2t[0] == 2 and t2i[0] == 2
    # all-zero scores: i2t ranks 6 (R@10 only), t2i ranks 2 (R@5 and R@10)
    assert retrieval_metrics(torch.zeros(2, 10))["rsum"] == pytest.approx(0 + 0 + 100 + 0 + 100 + 100)


def test_own_captions_do_not_compete_with_each_other():
    scores = torch.zeros(2, 10)
    scores[0, :5] = 1.0  # all five own captions tie at the top
    scores[1, 5:] = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.2])
    i2t, _ = retrieval_ranks(scores)
    assert i2t.tolist() == [1, 1]


def test_nan_policy():
    scores = torch.tensor(HAND_SCORES)
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(scores)
    i2t, t2i = retrieval_ranks(scores, nan="worst")
    assert t2i[0] == 2  # NaN ground truth ranks below the competitor
    # image 0's best own caption is now 0.40; captions 5 (0.95), 6 (0.50) and 9 (0.60) rank above it
    assert i2t[0] == 4
    expected_i2t, _ = brute_force_ranks(np.nan_to_num(scores.numpy(), nan=-np.inf), 5)
    assert i2t.tolist() == expected_i2t.tolist()
    competitor = torch.tensor(HAND_SCORES)
    competitor[1, 0] = float("nan")  # a NaN competitor never outranks a number
    assert retrieval_ranks(competitor, nan="worst")[1][0] == 1
    with pytest.raises(ValueError, match="nan must be"):
        retrieval_metrics(torch.tensor(HAND_SCORES), nan="ignore")


@pytest.mark.parametrize("k", [1, 5])
def test_random_matrix_matches_brute_force(k):
    rng = np.random.default_rng(0)
    n = 23
    ties = rng.integers(0, 6, size=(n, n * k)).astype(np.float32)  # few values: many ties
    i2t, t2i = retrieval_ranks(ties, k)
    expected_i2t, expected_t2i = brute_force_ranks(ties, k)
    np.testing.assert_array_equal(i2t.numpy(), expected_i2t)
    np.testing.assert_array_equal(t2i.numpy(), expected_t2i)
    continuous = rng.standard_normal((n, n * k))
    continuous[np.arange(n)[:, None], np.arange(n)[:, None] * k + np.arange(k)] += 1.5  # some signal
    i2t, t2i = retrieval_ranks(continuous, k)
    scan_i2t, scan_t2i = argsort_ranks(continuous, k)
    np.testing.assert_array_equal(i2t.numpy(), scan_i2t)
    np.testing.assert_array_equal(t2i.numpy(), scan_t2i)
    assert_metrics_close(retrieval_metrics(continuous, k), scan_metrics(scan_i2t, scan_t2i))


def test_chunking_does_not_change_ranks(monkeypatch):
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.integers(0, 4, size=(17, 85)).astype(np.float32))
    full = retrieval_ranks(scores)
    monkeypatch.setattr(retrieval_eval, "CHUNK_ELEMENTS", 7)  # chunks smaller than a row
    chunked = retrieval_ranks(scores)
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_dtypes_and_numpy_input(dtype):
    scores = torch.tensor(HAND_SCORES)
    if dtype == torch.int32:
        scores = (scores * 100).round()
    expected = retrieval_metrics(scores.numpy())
    assert retrieval_metrics(scores.to(dtype)) == expected


def test_folds_average_each_fold_and_ignore_cross_fold_scores():
    rng = np.random.default_rng(2)
    n, fold, k = 12, 4, 5
    scores = rng.standard_normal((n, n * k))
    per_fold = [
        retrieval_metrics(scores[f * fold:(f + 1) * fold, f * fold * k:(f + 1) * fold * k], k) for f in range(3)
    ]
    expected = {name: np.mean([m[name] for m in per_fold]) for name in METRIC_NAMES}
    assert_metrics_close(folds_metrics(scores, fold, k), expected)
    poisoned = scores.copy()
    for f in range(3):  # huge scores outside the diagonal blocks change the full ranking only
        rows = slice(f * fold, (f + 1) * fold)
        poisoned[rows, :] += 100.0
        poisoned[rows, f * fold * k:(f + 1) * fold * k] -= 100.0
    assert_metrics_close(folds_metrics(poisoned, fold, k), expected)
    assert retrieval_metrics(poisoned, k)["rsum"] < retrieval_metrics(scores, k)["rsum"]
    assert folds_metrics(scores, n, k) == retrieval_metrics(scores, k)


def test_coco_1k_and_5k():
    generator = torch.Generator().manual_seed(3)
    n = 2000
    scores = torch.randn(n, 5 * n, generator=generator)
    owner = torch.arange(5 * n) // 5
    scores[owner, torch.arange(5 * n)] += 3.0
    one_k, five_k = coco_1k(scores), coco_5k(scores)
    assert one_k == folds_metrics(scores, 1000)
    assert five_k == retrieval_metrics(scores)
    assert one_k["t2i_r1"] > five_k["t2i_r1"]  # fewer competitors per fold
    with pytest.raises(ValueError, match="fold_size"):
        coco_1k(scores[:1500, :7500])


def test_metrics_from_ranks_validation():
    assert metrics_from_ranks(torch.tensor([1, 2]), torch.tensor([1] * 10))["i2t_r1"] == 50.0
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks(torch.tensor([0, 1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="i2t_ranks"):
        metrics_from_ranks(torch.tensor([]), torch.tensor([1]))


@pytest.mark.parametrize(
    "scores, kwargs, error, match",
    [
        (torch.zeros(10), {}, ValueError, "2-D"),
        (torch.zeros(2, 5, 2), {}, ValueError, "2-D"),
        (torch.zeros(2, 9), {}, ValueError, r"9 captions .* 2 images"),
        (torch.zeros(0, 0), {}, ValueError, "no images"),
        (torch.zeros(2, 10), {"captions_per_image": 0}, ValueError, "captions_per_image"),
        ([[0.0] * 5], {}, TypeError, "scores must be"),
    ],
)
def test_bad_inputs(scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(scores, **kwargs)


def test_evaluate_scorer_blocks_match_the_full_matrix():
    generator = torch.Generator().manual_seed(4)
    n, k = 6, 5
    full = torch.randn(n, n * k, generator=generator)
    calls = []

    def score_fn(image_rows, caption_rows):
        calls.append((len(image_rows), len(caption_rows)))
        return full[image_rows][:, caption_rows].numpy()  # numpy blocks are accepted

    result = evaluate_scorer(score_fn, torch.arange(n), torch.arange(n * k), image_block=4, caption_block=7, fold_size=3)
    assert torch.equal(result["scores"], full)
    assert result["all"] == retrieval_metrics(full)
    assert result["folds"] == folds_metrics(full, 3)
    assert calls == [(4, 7)] * 4 + [(4, 2)] + [(2, 7)] * 4 + [(2, 2)]
    latency = result["latency"]
    assert latency["blocks"] == 10 and latency["score_seconds"] >= 0
    assert latency["t2i_ms_per_query"] == pytest.approx(1e3 * latency["score_seconds"] / (n * k))
    assert evaluate_scorer(score_fn, torch.arange(n), torch.arange(n * k), fold_size=None)["folds"] is None


def test_evaluate_scorer_errors():
    with pytest.raises(ValueError, match="returned shape"):
        evaluate_scorer(lambda i, c: torch.zeros(len(c), len(i)), list(range(2)), list(range(10)))
    with pytest.raises(ValueError, match="captions has 9 items"):
        evaluate_scorer(lambda i, c: None, list(range(2)), list(range(9)))
    with pytest.raises(ValueError, match=r"images is a tuple of arrays with different first dimensions \[2, 3\]"):
        evaluate_scorer(lambda i, c: None, (torch.zeros(2), torch.zeros(3)), list(range(10)))
    with pytest.raises(ValueError, match="image_block"):
        evaluate_scorer(lambda i, c: None, list(range(2)), list(range(10)), image_block=0)


def test_alignment_score_fn_with_tuple_inputs():
    generator = torch.Generator().manual_seed(5)
    n, words, regions, dim = 4, 6, 7, 16
    text = torch.nn.functional.normalize(torch.randn(5 * n, words, dim, generator=generator), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(n, regions, dim, generator=generator), dim=-1)
    text_lengths = torch.randint(1, words + 1, (5 * n,), generator=generator)
    image_lengths = torch.randint(1, regions + 1, (n,), generator=generator)
    result = evaluate_scorer(
        alignment_score_fn(backend="reference"), (images, image_lengths), (text, text_lengths),
        image_block=3, caption_block=8, warmup=True,
    )
    direct = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend="reference").T
    torch.testing.assert_close(result["scores"], direct)
