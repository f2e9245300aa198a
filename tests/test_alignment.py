"""Every backend vs the float64 reference through the public API.

The oracle is :mod:`aladin_fast.reference` run in float64 on the same (rounded)
inputs; it is itself checked against brute-force loops in test_reference.py.
Low-precision tolerance: at most 2x the error of plain PyTorch doing the same
computation in that dtype, plus an fp32 accumulation floor.
"""
import pytest
import torch

import aladin_fast
from aladin_fast import reference
from aladin_fast.ops.backends import triton_interpreter_enabled
from cases import AGGREGATIONS, LOW_PRECISION, PADDINGS, fp32_tolerance, make_tokens

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (Nt, Ni, W, R, D): lengths 1, 7, 36, 37, 50; D 1, 3, 64, 100, 768, 1024; Nt != Ni; batch of 1
SHAPES = [
    (3, 5, 7, 36, 64),
    (4, 3, 37, 50, 100),
    (1, 1, 1, 1, 1),
    (2, 6, 1, 37, 3),
    (5, 2, 50, 7, 768),
    (2, 3, 36, 36, 1024),
    (1, 4, 32, 1, 100),
]

BACKENDS = ["cpu"] + (["triton"] if triton_interpreter_enabled() else [])


def _plain_torch_scores(text, images, text_lengths, image_lengths, aggregation, padding, candidates=None):
    """Plain PyTorch in the inputs' dtype: similarities computed and rounded in that dtype."""
    if candidates is None:
        sim = torch.einsum("awd,brd->abwr", text, images)
        word_lengths, region_lengths = text_lengths[:, None], image_lengths[None, :]
    else:
        sim = torch.einsum("awd,akrd->akwr", text, images[candidates])
        word_lengths, region_lengths = text_lengths[:, None], image_lengths[candidates]
    scores, _ = reference.aggregate(sim.double(), word_lengths, region_lengths, aggregation, padding == "zero")
    return scores


def _tolerance(text, images, text_lengths, image_lengths, aggregation, padding, expected, candidates=None):
    _, w, d = text.shape
    r = images.shape[1]
    base = fp32_tolerance(d, w, r)
    if text.dtype in LOW_PRECISION:
        low = _plain_torch_scores(text, images, text_lengths, image_lengths, aggregation, padding, candidates)
        base += 2.0 * (low - expected).abs().max().item() if expected.numel() else 0.0
    return base


def _inputs(generator, shape, dtype):
    nt, ni, w, r, d = shape
    text, text_lengths = make_tokens(generator, nt, w, d)
    images, image_lengths = make_tokens(generator, ni, r, d)
    return text.to(dtype), images.to(dtype), text_lengths, image_lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_all_pairs_matches_reference(generator, backend, dtype, padding, aggregation, shape):
    text, images, text_lengths, image_lengths = _inputs(generator, shape, dtype)
    expected = reference.alignment_scores(text.double(), images.double(), text_lengths, image_lengths, aggregation, padding)
    got = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation, padding, backend=backend)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    tolerance = _tolerance(text, images, text_lengths, image_lengths, aggregation, padding, expected)
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_rerank_and_paired_match_reference(generator, backend, dtype, padding, aggregation):
    text, images, text_lengths, image_lengths = _inputs(generator, (4, 9, 37, 36, 100), dtype)
    candidates = torch.randint(0, 9, (4, 13), generator=generator)
    candidates[0, :3] = 2  # repeated ids
    expected = reference.rerank_scores(
        text.double(), images.double(), candidates, text_lengths, image_lengths, aggregation, padding
    )
    got = aladin_fast.rerank_scores(text, images, candidates, text_lengths, image_lengths, aggregation, padding, backend=backend)
    tolerance = _tolerance(text, images, text_lengths, image_lengths, aggregation, padding, expected, candidates)
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)

    paired = aladin_fast.paired_scores(text, images[:4], text_lengths, image_lengths[:4], aggregation, padding, backend=backend)
    expected_paired = reference.paired_scores(
        text.double(), images[:4].double(), text_lengths, image_lengths[:4], aggregation, padding
    )
    torch.testing.assert_close(paired.double(), expected_paired, atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", ["all_pairs", "rerank", "paired"])
def test_argmax_wins_the_max(generator, backend, padding, mode):
    """The returned region attains the word's max (value check: immune to near-ties in rounding)."""
    text, images, text_lengths, image_lengths = _inputs(generator, (3, 3, 7, 37, 64), torch.float32)
    kwargs = dict(text_lengths=text_lengths, image_lengths=image_lengths, padding=padding, return_argmax=True)
    if mode == "all_pairs":
        _, got = aladin_fast.alignment_scores(text, images, backend=backend, **kwargs)
        _, expected = reference.alignment_scores(text.double(), images.double(), **kwargs)
        ids = torch.arange(3).expand(3, 3)
    elif mode == "rerank":
        ids = torch.tensor([[2, 0, 2], [1, 1, 0], [0, 2, 1]])
        _, got = aladin_fast.rerank_scores(text, images, ids, backend=backend, **kwargs)
        _, expected = reference.rerank_scores(text.double(), images.double(), ids, **kwargs)
    else:
        ids = torch.arange(3)[:, None]
        _, got = aladin_fast.paired_scores(text, images, backend=backend, **kwargs)
        _, expected = reference.paired_scores(text.double(), images.double(), **kwargs)
        got, expected = got[:, None], expected[:, None]
    assert got.dtype == torch.int32 and got.shape == expected.shape
    assert torch.equal(got < 0, expected < 0)  # padded words / empty maxes agree
    sim = torch.einsum("awd,akrd->akwr", text.double(), images.double()[ids])
    r_pad = images.shape[1]
    region_valid = torch.arange(r_pad)[None, None, :] < image_lengths[ids][..., None]
    sim = torch.where(region_valid[:, :, None, :], sim, 0.0 if padding == "zero" else float("-inf"))
    valid = got >= 0
    won = sim.gather(-1, got.clamp(min=0).long()[..., None])[..., 0]
    best = sim.gather(-1, expected.clamp(min=0).long()[..., None])[..., 0]
    torch.testing.assert_close(won[valid], best[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_first_index_wins(backend):
    # regions 1 and 3 are identical and best for the word; region 0 ties at 0 with zero padding
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    images = torch.tensor([[[0.0, -1.0], [0.5, 0.5], [0.2, 0.1], [0.5, 0.5], [0.0, 0.0]]])
    _, argmax = aladin_fast.alignment_scores(text, images, image_lengths=torch.tensor([4]), backend=backend, return_argmax=True)
    assert argmax.tolist() == [[[1, 1]]]
    # zero mode: word 0 valid scores [0, .5, .2, .5]; word 1 all valid <= .5; padding (0) never beats
    _, argmax = aladin_fast.alignment_scores(
        text, -images, image_lengths=torch.tensor([4]), padding="zero", backend=backend, return_argmax=True
    )
    # -images: word 0 scores [0, -.5, -.2, -.5] -> region 0 ties padding at 0, first index wins
    # word 1 scores [1, -.5, -.1, -.5] -> region 0
    assert argmax.tolist() == [[[0, 0]]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_nan_poisons_only_its_pairs(generator, backend, aggregation):
    text = torch.nn.functional.normalize(torch.randn(3, 5, 16, generator=generator), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(4, 6, 16, generator=generator), dim=-1)
    text_lengths, image_lengths = torch.full((3,), 5), torch.full((4,), 6)
    text[1, 2, 3] = float("nan")
    images[2, 4, 0] = float("nan")
    text[0, 4, :] = float("nan")  # in padding of caption 0 once its length is 4: never read
    text_lengths[0] = 4
    got = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation, backend=backend)
    nan = torch.zeros(3, 4, dtype=torch.bool)
    nan[1, :] = True
    nan[:, 2] = True
    assert torch.equal(torch.isnan(got), nan)
    expected = reference.alignment_scores(text.double(), images.double(), text_lengths, image_lengths, aggregation)
    torch.testing.assert_close(got[~nan].double(), expected[~nan], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_rows_score_zero_never_nan(backend, padding, aggregation):
    generator = torch.Generator().manual_seed(7)
    text, _ = make_tokens(generator, 3, 5, 8, min_length=5)
    images, _ = make_tokens(generator, 2, 4, 8, min_length=4)
    text_lengths = torch.tensor([0, 5, 2])
    image_lengths = torch.tensor([4, 0])
    got = aladin_fast.alignment_scores(text.float(), images.float(), text_lengths, image_lengths, aggregation, padding, backend=backend)
    expected = reference.alignment_scores(text, images, text_lengths, image_lengths, aggregation, padding)
    assert not torch.isnan(got).any()
    assert torch.all(got[0] == 0) and torch.all(got[:, 1] == 0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_batches_return_empty_results(backend):
    text = torch.randn(0, 5, 8)
    images = torch.randn(3, 4, 8)
    assert aladin_fast.alignment_scores(text, images, backend=backend).shape == (0, 3)
    assert aladin_fast.alignment_scores(images, text, backend=backend).shape == (3, 0)
    assert aladin_fast.paired_scores(text, text, backend=backend).shape == (0,)
    scores, argmax = aladin_fast.rerank_scores(
        images, images, torch.zeros(3, 0, dtype=torch.long), backend=backend, return_argmax=True
    )
    assert scores.shape == (3, 0) and argmax.shape == (3, 0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["MrSw", "MwSr", "mean"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_packed_equals_padded(generator, backend, aggregation, padding):
    text, images, text_lengths, image_lengths = _inputs(generator, (4, 5, 9, 11, 32), torch.float32)
    padded = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation, padding, backend=backend)
    packed_text = torch.cat([text[i, : text_lengths[i]] for i in range(4)])
    packed_images = torch.cat([images[j, : image_lengths[j]] for j in range(5)])
    text_cu = torch.nn.functional.pad(text_lengths.cumsum(0), (1, 0))
    image_cu = torch.nn.functional.pad(image_lengths.cumsum(0), (1, 0))
    packed = aladin_fast.alignment_scores(
        packed_text, packed_images, aggregation=aggregation, padding=padding, backend=backend,
        text_cu_seqlens=text_cu, image_cu_seqlens=image_cu,
    )
    # make_tokens keeps one full-length row, so the packed pad equals the padded length
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    expected = reference.alignment_scores(
        packed_text.double(), packed_images.double(), aggregation=aggregation, padding=padding,
        text_cu_seqlens=text_cu, image_cu_seqlens=image_cu,
    )
    torch.testing.assert_close(packed.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_normalize(generator, backend):
    text, images, text_lengths, image_lengths = _inputs(generator, (3, 4, 6, 5, 24), torch.float32)
    text_t = text.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    images_s = torch.stack([images * 3.0, torch.zeros_like(images)], dim=-1)[..., 0]  # stride 2; normalize undoes x3
    assert not text_t.is_contiguous() and not images_s.is_contiguous()
    got = aladin_fast.alignment_scores(text_t, images_s, text_lengths, image_lengths, normalize=True, backend=backend)
    expected = reference.alignment_scores(text.double(), images.double(), text_lengths, image_lengths)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_auto_backend_on_cpu_is_the_cpu_kernel():
    from aladin_fast.ops.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "reference"


def test_bitwise_deterministic_across_thread_counts(generator):
    text, images, text_lengths, image_lengths = _inputs(generator, (7, 33, 32, 36, 256), torch.float32)
    first = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    again = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend="cpu")
    assert torch.equal(first, again) and torch.equal(first, single)
