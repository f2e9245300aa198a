"""Property tests of the retrieval protocol (aladin_fast.eval) and of streamed gallery scoring (full_scores).

Oracles are written from the protocol, one query at a time (COCO / Flickr30K, see aladin_fast/eval.py):

* i2t rank of image i = 1 + #{captions of *other* images scoring >= the best of image i's own captions};
* t2i rank of caption j = 1 + #{other images scoring >= image j // k};
* pessimistic ties (">="), NaN = -inf with ``nan="worst"``, a ValueError with ``nan="raise"``;
* R@K in percent, ``medr`` = floor of the median of the 1-based ranks, ``meanr`` the mean, ``rsum`` the six recalls.

Score matrices are integer-valued with few levels, so ties are the rule, not the exception. full_scores runs on
grid-valued tokens (multiples of 1/8): every fp32 sum is exact, so chunked and whole-gallery scores are equal and
top-k ties (lower image id first) are frequent.

Default run: derandomized samples (~10 s on 2 idle cores). ``pytest -m slow`` runs bigger random samples.
"""
from __future__ import annotations

import math
import os
import statistics

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

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
from cases import AGGREGATIONS, PADDINGS

DATABASE = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis-db"))
NO_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


def default(examples):
    return settings(max_examples=examples, derandomize=True, deadline=None, suppress_health_check=NO_HEALTH)


def thorough(examples):
    return settings(max_examples=examples, deadline=None, database=DATABASE, suppress_health_check=NO_HEALTH)


# --------------------------------------------------------------------------- oracles, straight from the protocol


def oracle_ranks(scores, k):
    """(i2t, t2i) 1-based ranks, one query at a time; ``scores`` a list of lists of floats (NaN already -inf)."""
    n_images = len(scores)
    n_captions = n_images * k
    i2t = []
    for i in range(n_images):
        best = max(scores[i][j] for j in range(i * k, i * k + k))
        i2t.append(1 + sum(1 for j in range(n_captions) if j // k != i and scores[i][j] >= best))
    t2i = []
    for j in range(n_captions):
        truth = scores[j // k][j]
        t2i.append(1 + sum(1 for i in range(n_images) if i != j // k and scores[i][j] >= truth))
    return i2t, t2i


def oracle_metrics(i2t, t2i):
    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for level in (1, 5, 10):
            out[f"{prefix}_r{level}"] = 100.0 * sum(1 for r in ranks if r <= level) / len(ranks)
        out[f"{prefix}_medr"] = float(math.floor(statistics.median(ranks)))
        out[f"{prefix}_meanr"] = statistics.fmean(ranks)
    out["rsum"] = sum(out[f"{p}_r{level}"] for p in ("i2t", "t2i") for level in (1, 5, 10))
    return out


def searchsorted_ranks(scores: np.ndarray, k: int):
    """Vectorised oracle for big matrices (a different formulation: counts by binary search in sorted rows /
    columns). Agrees with :func:`oracle_ranks`, checked on the small cases."""
    n_images, n_captions = scores.shape
    owner = np.arange(n_captions) // k
    own = scores[owner, np.arange(n_captions)]
    i2t = np.empty(n_images, dtype=np.int64)
    for i in range(n_images):
        others = np.sort(np.concatenate([scores[i, : i * k], scores[i, (i + 1) * k:]]))
        best = scores[i, i * k:(i + 1) * k].max()
        i2t[i] = 1 + len(others) - np.searchsorted(others, best, side="left")
    columns = np.sort(scores, axis=0)  # [N_images, N_captions], ascending per column
    at_least = np.array([n_images - np.searchsorted(columns[:, j], own[j], side="left") for j in range(n_captions)])
    return i2t, at_least  # the ground truth counts itself: the "1 +"


def assert_metrics_equal(actual, expected, tol=1e-9):
    assert list(actual) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert actual[name] == pytest.approx(expected[name], abs=tol), (name, actual[name], expected[name])


# --------------------------------------------------------------------------- score matrices

SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@st.composite
def score_problems(draw, max_images=7, allow_nonfinite=True):
    n = draw(st.integers(1, max_images))
    k = draw(st.integers(1, 5))
    levels = draw(st.integers(1, 5))  # 1 level: a constant matrix
    values = draw(st.lists(st.integers(-levels + 1, levels - 1) if levels > 1 else st.just(0),
                           min_size=n * n * k, max_size=n * n * k))
    matrix = np.array(values, dtype=np.float64).reshape(n, n * k)
    if allow_nonfinite and draw(st.booleans()):
        for special in draw(st.lists(st.sampled_from(sorted(SPECIALS)), min_size=1, max_size=6)):
            matrix[draw(st.integers(0, n - 1)), draw(st.integers(0, n * k - 1))] = SPECIALS[special]
    has_nan = bool(np.isnan(matrix).any())
    has_inf = bool(np.isinf(matrix).any())
    kinds = ["float64", "float32", "float16", "bfloat16", "numpy64", "numpy32", "transposed", "flipped"]
    if not has_nan and not has_inf:
        kinds += ["int64", "int32", "numpy_int"]
    return dict(matrix=matrix, k=k, kind=draw(st.sampled_from(kinds)),
                chunk=draw(st.one_of(st.none(), st.integers(1, n * n * k + 2))))


def as_input(matrix: np.ndarray, kind: str):
    """The same matrix as the library's callers may hand it over (all exact for the small integers used)."""
    if kind.startswith("numpy"):
        return matrix.astype({"numpy64": np.float64, "numpy32": np.float32, "numpy_int": np.int64}[kind])
    if kind == "transposed":  # a non-contiguous view: the op's [Nt, Ni] output transposed
        return torch.from_numpy(np.ascontiguousarray(matrix.T)).float().T
    if kind == "flipped":  # a negative-stride numpy view of the same matrix
        return np.flip(np.ascontiguousarray(matrix[::-1, ::-1]))
    dtype = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}[kind]
    return torch.from_numpy(matrix).to(dtype)


def worst(matrix: np.ndarray):
    return np.nan_to_num(matrix, nan=-np.inf, posinf=np.inf, neginf=-np.inf).tolist()


class chunked:
    """Force ``CHUNK_ELEMENTS`` (hypothesis and function-scoped fixtures do not mix, so no ``monkeypatch``)."""

    def __init__(self, elements):
        self.elements = elements

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        if self.elements is not None:
            self.patch.setattr(retrieval_eval, "CHUNK_ELEMENTS", self.elements)

    def __exit__(self, *exc):
        self.patch.undo()


def _check_ranks_and_metrics(problem):
    matrix, k = problem["matrix"], problem["k"]
    scores = as_input(matrix, problem["kind"])
    expected_i2t, expected_t2i = oracle_ranks(worst(matrix), k)
    with chunked(problem["chunk"]):
        if np.isnan(matrix).any():
            with pytest.raises(ValueError, match="NaN"):
                retrieval_ranks(scores, k)
            with pytest.raises(ValueError, match="NaN"):
                retrieval_metrics(scores, k)
        else:  # nan="raise" (the default) ranks NaN-free matrices like "worst"
            i2t, t2i = retrieval_ranks(scores, k)
            assert i2t.tolist() == expected_i2t and t2i.tolist() == expected_t2i
        i2t, t2i = retrieval_ranks(scores, k, nan="worst")
        assert i2t.dtype == torch.int64 and t2i.dtype == torch.int64
        assert i2t.shape == (len(expected_i2t),) and t2i.shape == (len(expected_t2i),)
        assert i2t.tolist() == expected_i2t
        assert t2i.tolist() == expected_t2i
        expected = oracle_metrics(expected_i2t, expected_t2i)
        assert_metrics_equal(retrieval_metrics(scores, k, nan="worst"), expected)
        assert_metrics_equal(coco_5k(scores, k, nan="worst"), expected)
        if not np.isnan(matrix).any():
            assert_metrics_equal(retrieval_metrics(scores, k), expected)


@default(120)
@given(problem=score_problems())
def test_ranks_and_metrics_match_the_protocol(problem):
    _check_ranks_and_metrics(problem)


@pytest.mark.slow
@thorough(3000)
@given(problem=score_problems(max_images=12))
def test_ranks_and_metrics_match_the_protocol_thorough(problem):
    _check_ranks_and_metrics(problem)


@default(60)
@given(problem=score_problems(max_images=9))
def test_searchsorted_oracle_agrees_with_the_loop_oracle(problem):
    matrix = np.array(worst(problem["matrix"]))
    i2t, t2i = searchsorted_ranks(matrix, problem["k"])
    assert (i2t.tolist(), t2i.tolist()) == oracle_ranks(matrix.tolist(), problem["k"])


@default(100)
@given(i2t=st.lists(st.integers(1, 40), min_size=1, max_size=25), t2i=st.lists(st.integers(1, 40), min_size=1, max_size=60),
       kind=st.sampled_from(["torch", "numpy", "list", "int32"]))
def test_metrics_from_ranks_matches_the_definitions(i2t, t2i, kind):
    convert = {"torch": torch.tensor, "list": list, "numpy": np.array,
               "int32": lambda r: torch.tensor(r, dtype=torch.int32)}[kind]
    assert_metrics_equal(metrics_from_ranks(convert(i2t), convert(t2i)), oracle_metrics(i2t, t2i))


# --------------------------------------------------------------------------- folds, COCO 1K


@st.composite
def fold_problems(draw):
    folds = draw(st.integers(1, 4))
    fold_size = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    n = folds * fold_size
    levels = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    matrix = rng.integers(-levels + 1, levels, size=(n, n * k)).astype(np.float64)
    nan = draw(st.sampled_from(["raise", "worst"]))
    if nan == "worst" and draw(st.booleans()):
        matrix[rng.random(matrix.shape) < 0.15] = np.nan
    # outside the diagonal blocks: anything at all (never a NaN under "raise", which rejects the whole matrix)
    poison = draw(st.sampled_from(["none", "inf", "-inf", "huge", "nan"] if nan == "worst" else ["none", "inf", "huge"]))
    poisoned = matrix.copy()
    if poison != "none":
        off = np.ones_like(matrix, dtype=bool)
        for f in range(folds):
            off[f * fold_size:(f + 1) * fold_size, f * fold_size * k:(f + 1) * fold_size * k] = False
        poisoned[off] = {"inf": np.inf, "-inf": -np.inf, "huge": 1e300, "nan": np.nan}[poison]
    return dict(matrix=matrix, poisoned=poisoned, fold_size=fold_size, k=k, nan=nan, folds=folds,
                chunk=draw(st.one_of(st.none(), st.integers(1, 50))))


def _fold_oracle(matrix, fold_size, k):
    per_fold = []
    for start in range(0, matrix.shape[0], fold_size):
        block = matrix[start:start + fold_size, start * k:(start + fold_size) * k]
        per_fold.append(oracle_metrics(*oracle_ranks(worst(block), k)))
    return {name: statistics.fmean(fold[name] for fold in per_fold) for name in METRIC_NAMES}


def _check_folds(problem):
    fold_size, k, nan = problem["fold_size"], problem["k"], problem["nan"]
    expected = _fold_oracle(problem["matrix"], fold_size, k)
    with chunked(problem["chunk"]):
        for matrix in (problem["matrix"], problem["poisoned"]):
            assert_metrics_equal(folds_metrics(matrix, fold_size, k, nan=nan), expected)
            assert_metrics_equal(folds_metrics(torch.from_numpy(matrix).float(), fold_size, k, nan=nan), expected)
    n = problem["matrix"].shape[0]
    assert_metrics_equal(folds_metrics(problem["matrix"], n, k, nan=nan),
                         retrieval_metrics(problem["matrix"], k, nan=nan))
    for bad in (0, -fold_size, n + 1, float(fold_size)):
        with pytest.raises(ValueError, match="fold_size"):
            folds_metrics(problem["matrix"], bad, k, nan=nan)


@default(60)
@given(problem=fold_problems())
def test_folds_average_the_diagonal_blocks(problem):
    _check_folds(problem)


@pytest.mark.slow
@thorough(1500)
@given(problem=fold_problems())
def test_folds_average_the_diagonal_blocks_thorough(problem):
    _check_folds(problem)


@pytest.mark.parametrize("k", [1, 5])
def test_coco_1k_and_5k_against_the_oracle(k):
    # 2 folds of 1,000 images with 3 score levels (ties everywhere) and a planted signal
    rng = np.random.default_rng(7 + k)
    n = 2000
    scores = rng.integers(0, 3, size=(n, n * k)).astype(np.float32)
    owner = np.arange(n * k) // k
    scores[owner, np.arange(n * k)] += rng.integers(0, 2, size=n * k)
    per_fold = []
    for f in range(2):
        block = scores[f * 1000:(f + 1) * 1000, f * 1000 * k:(f + 1) * 1000 * k]
        per_fold.append(oracle_metrics(*(r.tolist() for r in searchsorted_ranks(block, k))))
    expected_1k = {name: statistics.fmean(fold[name] for fold in per_fold) for name in METRIC_NAMES}
    assert_metrics_equal(coco_1k(scores, k), expected_1k)
    if k > 1:
        return  # coco_5k on small matrices: test_ranks_and_metrics_match_the_protocol
    expected_5k = oracle_metrics(*(r.tolist() for r in searchsorted_ranks(scores, k)))
    assert_metrics_equal(coco_5k(torch.from_numpy(scores), k), expected_5k)


# --------------------------------------------------------------------------- evaluate_scorer


@st.composite
def scorer_problems(draw):
    problem = draw(score_problems(max_images=8, allow_nonfinite=False))
    n = problem["matrix"].shape[0]
    k = problem["k"]
    if draw(st.booleans()):
        problem["matrix"][draw(st.integers(0, n - 1)), draw(st.integers(0, n * k - 1))] = np.nan
    problem["image_block"] = draw(st.integers(1, n + 2))
    problem["caption_block"] = draw(st.integers(1, n * k + 3))
    problem["fold_size"] = draw(st.one_of(st.none(), st.integers(1, n + 1)))
    problem["warmup"] = draw(st.booleans())
    problem["tuple"] = draw(st.booleans())
    problem["numpy_blocks"] = draw(st.booleans())
    return problem


@default(60)
@given(problem=scorer_problems())
def test_evaluate_scorer_matches_the_protocol(problem):
    matrix, k = problem["matrix"], problem["k"]
    n, n_captions = matrix.shape
    full = torch.from_numpy(matrix).float()  # small integers and NaN: exact in the float32 result
    calls = []

    def score_fn(image_rows, caption_rows):
        if problem["tuple"]:
            (image_ids, image_twice), (caption_ids, caption_twice) = image_rows, caption_rows
            assert torch.equal(image_twice, 2 * image_ids) and torch.equal(caption_twice, 2 * caption_ids)
        else:
            image_ids, caption_ids = image_rows, caption_rows
        calls.append((image_ids.tolist(), caption_ids.tolist()))
        block = full[image_ids][:, caption_ids]
        return block.numpy() if problem["numpy_blocks"] else block.double()

    images, captions = torch.arange(n), torch.arange(n_captions)
    if problem["tuple"]:
        images, captions = (images, 2 * images), (captions, 2 * captions)
    has_nan = bool(np.isnan(matrix).any())
    kwargs = dict(captions_per_image=k, image_block=problem["image_block"], caption_block=problem["caption_block"],
                  fold_size=problem["fold_size"], warmup=problem["warmup"])
    if has_nan:
        with pytest.raises(ValueError, match="NaN"):
            evaluate_scorer(score_fn, images, captions, **kwargs)
        calls.clear()
    result = evaluate_scorer(score_fn, images, captions, nan="worst", **kwargs)
    assert result["scores"].dtype == torch.float32 and result["scores"].shape == (n, n_captions)
    torch.testing.assert_close(result["scores"], full, rtol=0, atol=0, equal_nan=True)
    assert_metrics_equal(result["all"], oracle_metrics(*oracle_ranks(worst(matrix), k)))
    fold_size = problem["fold_size"]
    if fold_size is not None and fold_size < n and n % fold_size == 0:
        assert_metrics_equal(result["folds"], _fold_oracle(matrix, fold_size, k))
    elif fold_size is None or n % fold_size:
        assert result["folds"] is None
    # the blocks tile the matrix: every (image, caption) pair scored exactly once, warm-up aside
    timed = calls[1:] if problem["warmup"] else calls
    if problem["warmup"]:
        assert calls[0] == (list(range(min(problem["image_block"], n))),
                            list(range(min(problem["caption_block"], n_captions))))
    pairs = [(i, j) for image_ids, caption_ids in timed for i in image_ids for j in caption_ids]
    assert sorted(pairs) == [(i, j) for i in range(n) for j in range(n_captions)]
    assert result["latency"]["blocks"] == len(timed)
    assert len(timed) == math.ceil(n / problem["image_block"]) * math.ceil(n_captions / problem["caption_block"])


# --------------------------------------------------------------------------- full_scores and alignment_score_fn


@st.composite
def gallery_problems(draw, max_texts=9, max_images=8):
    nt = draw(st.integers(0, max_texts))
    ni = draw(st.integers(0, max_images))
    words, regions, dim = draw(st.integers(0, 5)), draw(st.integers(0, 5)), draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # few distinct tokens: duplicate rows and equal scores are frequent
    limit = draw(st.sampled_from([1, 2, 16]))

    def grid(shape):
        return torch.randint(-limit, limit + 1, shape, generator=generator).float() / 8

    text, images = grid((nt, words, dim)), grid((ni, regions, dim))
    extreme = draw(st.sampled_from([False, False, False, True]))
    if extreme:  # overflowing products: +-inf scores, and NaN where they meet (inf - inf)
        text, images = text * 2.0**80, images * 2.0**80
    text_lengths = torch.tensor(draw(st.lists(st.integers(0, words), min_size=nt, max_size=nt)), dtype=torch.long)
    image_lengths = torch.tensor(draw(st.lists(st.integers(0, regions), min_size=ni, max_size=ni)), dtype=torch.long)
    return dict(
        text=text, images=images, text_lengths=text_lengths, image_lengths=image_lengths, extreme=extreme,
        aggregation=draw(st.sampled_from(AGGREGATIONS)), padding=draw(st.sampled_from(PADDINGS)),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        chunk=draw(st.integers(1, nt + 2)), image_chunk=draw(st.one_of(st.none(), st.integers(1, ni + 2))),
        topk=draw(st.integers(1, ni)) if ni and draw(st.booleans()) else None,
        use_out=draw(st.booleans()), lengths=draw(st.booleans()),
    )


def brute_force_topk(whole: torch.Tensor, topk: int):
    """Best ``topk`` images per caption, higher score first, lower image id first on ties, NaN last."""
    values, indices = [], []
    for row in whole.tolist():
        order = sorted(range(len(row)), key=lambda i: (math.isnan(row[i]), -row[i] if row[i] == row[i] else 0, i))
        order = order[:topk]
        indices.append(order)
        values.append([row[i] for i in order])
    return torch.tensor(values, dtype=torch.float32).reshape(-1, topk), torch.tensor(indices).reshape(-1, topk)


def _check_full_scores(problem):
    text, images = problem["text"].to(problem["dtype"]), problem["images"].to(problem["dtype"])
    if problem["extreme"] and problem["dtype"] == torch.float16:
        text, images = problem["text"], problem["images"]  # 2**80 overflows float16 itself
    lengths = (problem["text_lengths"], problem["image_lengths"]) if problem["lengths"] else (None, None)
    op_kwargs = dict(aggregation=problem["aggregation"], padding=problem["padding"], backend="cpu")
    whole = aladin_fast.alignment_scores(text, images, *lengths, **op_kwargs)
    nt, ni = text.shape[0], images.shape[0]
    kwargs = dict(chunk=problem["chunk"], image_chunk=problem["image_chunk"], **op_kwargs)
    topk = problem["topk"]
    if topk is None:
        out = torch.full((nt, ni), 123.0) if problem["use_out"] else None
        streamed = aladin_fast.full_scores(text, images, *lengths, out=out, **kwargs)
        assert out is None or streamed is out
        assert streamed.dtype == torch.float32 and streamed.shape == (nt, ni)
        # each pair is computed identically whatever the chunking
        torch.testing.assert_close(streamed, whole, rtol=0, atol=0, equal_nan=True)
        return
    values, indices = aladin_fast.full_scores(text, images, *lengths, topk=topk, **kwargs)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (nt, topk)
    for row in indices.tolist():
        assert len(set(row)) == topk and all(0 <= i < ni for i in row), row  # distinct real image ids
    torch.testing.assert_close(values, whole.gather(1, indices), rtol=0, atol=0, equal_nan=True)
    # the documented order: descending, lower image id first on ties, NaN last (after -inf)
    expected_values, expected_indices = brute_force_topk(whole, topk)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0, equal_nan=True)
    if not whole.isnan().any():  # the same as sorting the whole matrix, stable
        assert torch.equal(indices, torch.sort(whole, dim=1, descending=True, stable=True).indices[:, :topk])


@default(400)
@given(problem=gallery_problems())
def test_full_scores_matches_one_call_and_brute_force_topk(problem):
    _check_full_scores(problem)


@pytest.mark.slow
@thorough(2500)
@given(problem=gallery_problems(max_texts=20, max_images=20))
def test_full_scores_matches_one_call_and_brute_force_topk_thorough(problem):
    _check_full_scores(problem)


def test_full_scores_topk_with_minus_inf_scores_returns_the_real_images():
    # regression: the running top-k started from (-inf, image 0) placeholders, which won every tie with a real
    # -inf score (stable sort, placeholders first): indices [0, 0, 0] instead of [0, 1, 2]
    text = torch.full((1, 1, 1), 2.0**80)
    images = torch.full((3, 1, 1), -(2.0**80))  # every product overflows to -inf
    whole = aladin_fast.alignment_scores(text, images, backend="cpu")
    assert torch.equal(whole, torch.full((1, 3), float("-inf")))
    for image_chunk in (None, 1, 2):
        values, indices = aladin_fast.full_scores(text, images, topk=3, image_chunk=image_chunk, backend="cpu")
        assert indices.tolist() == [[0, 1, 2]] and torch.equal(values, whole)
    images = torch.tensor([[[1.0]], [[-(2.0**80)]], [[-(2.0**80)]], [[0.5]]])
    values, indices = aladin_fast.full_scores(text, images, topk=3, image_chunk=1, backend="cpu")
    assert indices.tolist() == [[0, 3, 1]]
    assert values.tolist() == [[2.0**80, 2.0**79, float("-inf")]]


def test_full_scores_empty_gallery_matches_alignment_scores():
    # regression: image_chunk defaulted to N_images = 0 and was then rejected ("image_chunk must be >= 1, got 0")
    # although alignment_scores (and so the streamed matrix) handles an empty gallery: [Nt, 0]
    text, images = torch.ones(3, 2, 4), torch.ones(0, 5, 4)
    whole = aladin_fast.alignment_scores(text, images, backend="cpu")
    streamed = aladin_fast.full_scores(text, images, chunk=2, backend="cpu")
    assert streamed.shape == whole.shape == (3, 0)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 0\]"):
        aladin_fast.full_scores(text, images, topk=1, backend="cpu")
    with pytest.raises(ValueError, match=r"image_chunk must be >= 1, got 0"):
        aladin_fast.full_scores(text, torch.ones(2, 5, 4), image_chunk=0, backend="cpu")


def test_negative_stride_and_big_endian_numpy_scores():
    # regression: torch.from_numpy rejects negative strides and non-native byte order, so a documented input
    # (a numpy array) such as np.flip(scores) -- a relabelling with the very same metrics -- raised ValueError
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 3, size=(4, 12)).astype(np.float32)
    expected = oracle_ranks(np.flip(scores).tolist(), 3)
    i2t, t2i = retrieval_ranks(np.flip(scores), 3)
    assert (i2t.tolist(), t2i.tolist()) == expected
    assert retrieval_metrics(np.flip(scores), 3) == retrieval_metrics(scores, 3)  # flipping relabels both sides
    assert retrieval_metrics(scores.astype(">f4"), 3) == retrieval_metrics(scores, 3)
    assert folds_metrics(np.flip(scores), 2, 3) == folds_metrics(np.ascontiguousarray(np.flip(scores)), 2, 3)
    # a single image, flipped: np.ascontiguousarray keeps its negative stride, torch.from_numpy refused it
    single = np.array([[1.0], [2.0]])[::-2]  # [1, 1], strides (-16, 8)
    assert single.strides[0] < 0
    assert retrieval_metrics(single, 1) == retrieval_metrics(np.array([[2.0]]), 1)


@default(40)
@given(problem=gallery_problems(max_texts=0, max_images=6), k=st.integers(1, 3), blocks=st.tuples(st.integers(1, 4), st.integers(1, 9)))
def test_alignment_score_fn_in_evaluate_scorer(problem, k, blocks):
    ni = problem["images"].shape[0]
    if ni == 0 or problem["extreme"]:
        return
    generator = torch.Generator().manual_seed(ni * 31 + k)
    words, dim = 4, problem["images"].shape[2]
    text = torch.randint(-16, 17, (ni * k, words, dim), generator=generator).float() / 8
    text_lengths = torch.randint(0, words + 1, (ni * k,), generator=generator)
    op_kwargs = dict(aggregation=problem["aggregation"], padding=problem["padding"], backend="cpu")
    result = evaluate_scorer(alignment_score_fn(**op_kwargs), (problem["images"], problem["image_lengths"]),
                             (text, text_lengths), captions_per_image=k, image_block=blocks[0], caption_block=blocks[1])
    direct = aladin_fast.alignment_scores(text, problem["images"], text_lengths, problem["image_lengths"], **op_kwargs).T
    assert torch.equal(result["scores"], direct)  # exact on the grid, whatever the blocks
    assert_metrics_equal(result["all"], oracle_metrics(*oracle_ranks(direct.double().tolist(), k)))


def test_full_scores_topk_ranks_nan_last():
    """A NaN score (an image with a NaN token) is the worst match, after -inf, as nan="worst" ranks it: it must
    not top every caption's list."""
    text = torch.tensor([[[1.0]], [[2.0**80]]])
    images = torch.tensor([[[float("nan")]], [[1.0]], [[-(2.0**80)]], [[float("nan")]], [[0.5]]])
    whole = aladin_fast.alignment_scores(text, images, backend="cpu")
    for image_chunk in (1, 2, 5):
        values, indices = aladin_fast.full_scores(text, images, topk=5, image_chunk=image_chunk, backend="cpu")
        assert indices.tolist() == [[1, 4, 2, 0, 3], [1, 4, 2, 0, 3]]
        torch.testing.assert_close(values, whole.gather(1, indices), rtol=0, atol=0, equal_nan=True)
        _, top1 = aladin_fast.full_scores(text, images, topk=1, image_chunk=image_chunk, backend="cpu")
        assert top1.tolist() == [[1], [1]]


def test_full_scores_refuses_out_with_topk():
    text, images = torch.ones(2, 1, 3), torch.ones(3, 1, 3)
    with pytest.raises(ValueError, match="with topk the result is"):
        aladin_fast.full_scores(text, images, topk=1, out=torch.empty(2, 3), backend="cpu")


@pytest.mark.parametrize("fold_size", [0, -5, 2.5, True])
def test_evaluate_scorer_checks_fold_size_before_scoring(fold_size):
    calls = []

    def score_fn(image_rows, caption_rows):
        calls.append(1)
        return torch.zeros(len(image_rows), len(caption_rows))

    with pytest.raises(ValueError, match="fold_size must be a positive int or None"):
        evaluate_scorer(score_fn, torch.zeros(4), torch.zeros(20), fold_size=fold_size)
    assert not calls


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5])
def test_metrics_from_ranks_refuses_non_whole_ranks(bad):
    with pytest.raises(ValueError, match="t2i_ranks must hold whole ranks"):
        metrics_from_ranks(torch.tensor([1, 2]), torch.tensor([1.0, bad]))


def test_counts_refuse_bools_and_take_numpy_ints():
    """True is not a count (it was taken as 1); a numpy int is one, with the same result as the Python int."""
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    for call in (lambda v: retrieval_metrics(scores, v), lambda v: folds_metrics(scores, v, 2),
                 lambda v: evaluate_scorer(lambda i, c: scores[i[0]:i[-1] + 1, c[0]:c[-1] + 1], list(range(4)),
                                           list(range(8)), captions_per_image=2, image_block=v, fold_size=None)):
        with pytest.raises(ValueError, match="must be a positive int"):
            call(True)
    with pytest.raises(ValueError, match="must be a positive int"):
        evaluate_scorer(lambda i, c: scores, list(range(4)), list(range(8)), captions_per_image=2, fold_size=True)
    assert retrieval_metrics(scores, np.int64(2)) == retrieval_metrics(scores, 2)
    assert folds_metrics(scores, np.int32(2), 2) == folds_metrics(scores, 2, 2)
    slices = lambda i, c: scores[i[0]:i[-1] + 1, c[0]:c[-1] + 1]  # noqa: E731
    with_numpy = evaluate_scorer(slices, list(range(4)), list(range(8)), captions_per_image=2,
                                 image_block=np.int64(3), caption_block=np.int16(5), fold_size=np.int64(2))
    plain = evaluate_scorer(slices, list(range(4)), list(range(8)), captions_per_image=2, image_block=3,
                            caption_block=5, fold_size=2)
    assert with_numpy["all"] == plain["all"] and with_numpy["folds"] == plain["folds"] is not None
    torch.testing.assert_close(with_numpy["scores"], scores)
