"""NaN and +-inf tokens (docs/kernel_contract.md, "Non-finite inputs").

* NaN: a NaN in a valid token makes exactly the scores of the pairs that use it
  (pairs with at least one valid s_wr involving that token) NaN; every other
  score is finite and equal to the float64 oracle.  A NaN in padding, or in a
  token whose partner has no valid tokens, changes nothing.
* +-inf: scores equal the float64 oracle, infinities and NaN included
  (inf * 0 and inf - inf give NaN s_wr, which poison the pair like a NaN input).

The oracle computes s_wr by broadcast multiply-and-sum in float64 (IEEE for
every element; a BLAS matmul may skip zero operands and turn inf * 0 into 0)
and pools them with :func:`aladin_fast.reference.aggregate`.  Backends: cpu and
reference; triton too when this process runs Triton in the interpreter
(``TRITON_INTERPRET=1 pytest tests/test_nonfinite.py``).
"""
import pytest
import torch

import aladin_fast
from aladin_fast import reference
from aladin_fast.ops.backends import triton_interpreter_enabled
from cases import AGGREGATIONS, PADDINGS

BACKENDS = ["cpu", "reference"] + (["triton"] if triton_interpreter_enabled() else [])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("all_pairs", "rerank")
NAN, INF = float("nan"), float("inf")


def _dyadic(generator, *shape):
    """Values k/4, |k| <= 4: exact in fp32/fp16/bf16, products and fp32 partial sums exact."""
    return torch.randint(-4, 5, shape, generator=generator).double() / 4


def _oracle(text, images, text_lengths, image_lengths, candidates, aggregation, padding):
    """float64 scores from elementwise products (no BLAS), pooled by the reference."""
    text, images = text.double(), images.double()
    if candidates is None:
        sim = (text[:, None, :, None, :] * images[None, :, None, :, :]).sum(-1)  # [Nt, Ni, W, R]
        region_lengths = image_lengths[None, :]
    else:
        sim = (text[:, None, :, None, :] * images[candidates][:, :, None, :, :]).sum(-1)  # [Nt, K, W, R]
        region_lengths = image_lengths[candidates]
    scores, _ = reference.aggregate(sim, text_lengths[:, None], region_lengths, aggregation, padding == "zero")
    return scores


def _call(backend, text, images, text_lengths, image_lengths, candidates, aggregation, padding, dtype):
    if backend == "reference":
        dtype = torch.float64  # the reference is the float64 spec
    text, images = text.to(dtype), images.to(dtype)
    if candidates is None:
        return aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation, padding,
                                            backend=backend)
    return aladin_fast.rerank_scores(text, images, candidates, text_lengths, image_lengths, aggregation, padding,
                                     backend=backend)


def _nan_problem():
    generator = torch.Generator().manual_seed(11)
    text = _dyadic(generator, 4, 5, 16)
    images = _dyadic(generator, 5, 6, 16)
    text_lengths = torch.tensor([4, 5, 5, 3])
    image_lengths = torch.tensor([6, 5, 6, 0, 2])
    text[1, 2, 3] = NAN       # caption 1, valid word 2
    images[2, 4, 0] = NAN     # image 2, valid region 4
    text[0, 4, :] = NAN       # padding of caption 0 (length 4): never read
    images[1, 5, 7] = NAN     # padding of image 1 (length 5): never read
    text[3, 4, 1] = NAN       # padding of caption 3 (length 3)
    images[3, 0, 2] = NAN     # image 3 has no valid region: no pair uses it
    candidates = torch.tensor([[2, 0, 3, 2], [4, 3, 1, 1], [0, 1, 2, 4], [3, 3, 0, 2]])
    return text, images, text_lengths, image_lengths, candidates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_nan_poisons_exactly_the_pairs_that_use_it(backend, mode, padding, aggregation):
    text, images, text_lengths, image_lengths, candidates = _nan_problem()
    if mode == "all_pairs":
        candidates = None
        image_ids = torch.arange(images.shape[0]).expand(text.shape[0], -1)
    else:
        image_ids = candidates
    got = _call(backend, text, images, text_lengths, image_lengths, candidates, aggregation, padding, torch.float32)
    # a pair uses caption 1's word 2 iff its image has a valid region; image 2's region 4 iff the caption has a word
    uses_nan = ((torch.arange(4)[:, None] == 1) & (image_lengths[image_ids] > 0)) | (image_ids == 2)
    assert torch.equal(torch.isnan(got), uses_nan), f"NaN where {torch.isnan(got)}, expected {uses_nan}"
    assert torch.isfinite(got[~uses_nan]).all()
    expected = _oracle(text, images, text_lengths, image_lengths, candidates, aggregation, padding)
    assert torch.equal(torch.isnan(expected), uses_nan)  # the oracle agrees on the rule
    torch.testing.assert_close(got[~uses_nan].double(), expected[~uses_nan], atol=1e-6, rtol=0)


def _inf_problem():
    """Scores per (caption, image), MrSw in neg_inf mode (other aggregations follow the same s_wr):

    caption 0 (word 1 = +inf in component 0): +inf, NaN (inf * 0 with image 1), +inf, +inf
    caption 1 (finite):                         finite, finite, finite, +inf (image 3's +inf region)
    caption 2 (word 3 = -inf in component 0):   -inf, NaN, -inf (0 in zero mode: image 2 is padded), NaN (-inf + inf)
    caption 3 (word 1 = +inf - inf inside one dot product): NaN everywhere
    """
    generator = torch.Generator().manual_seed(5)
    text = _dyadic(generator, 4, 5, 8)
    images = _dyadic(generator, 4, 6, 8)
    images[:, :, [0, 5, 6]] = images[:, :, [0, 5, 6]].abs() + 0.25  # components 0, 5, 6 of every region > 0 ...
    images[1, 2, 0] = 0.0                                          # ... except one exact zero
    text[:, :, 7] = 0.5       # every word meets image 3's +inf component with a positive weight
    text_lengths = torch.tensor([5, 4, 5, 2])
    image_lengths = torch.tensor([6, 4, 5, 3])
    text[0, 1, 0] = INF
    text[2, 3, 0] = -INF
    text[3, 1, 5], text[3, 1, 6] = INF, -INF
    images[3, 2, 7] = INF
    text[1, 4, 2] = INF       # padding of caption 1 (length 4): never read
    text[3, 3, 0] = -INF      # padding of caption 3 (length 2)
    images[3, 4, 1] = -INF    # padding of image 3 (length 3): never read
    images[1, 5, 0] = INF     # padding of image 1 (length 4)
    candidates = torch.tensor([[1, 0, 3, 2], [2, 2, 0, 3], [0, 1, 3, 2], [3, 2, 1, 0]])
    return text, images, text_lengths, image_lengths, candidates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_infinities_match_float64_oracle(backend, dtype, mode, padding, aggregation):
    text, images, text_lengths, image_lengths, candidates = _inf_problem()
    if mode == "all_pairs":
        candidates = None
    got = _call(backend, text, images, text_lengths, image_lengths, candidates, aggregation, padding, dtype)
    expected = _oracle(text, images, text_lengths, image_lengths, candidates, aggregation, padding)
    # same class (finite / +inf / -inf / NaN) for every pair, finite values equal (dyadic inputs: exact sums)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0, equal_nan=True)


def test_inf_problem_covers_every_nonfinite_outcome():
    """The inf case above must really produce +inf, -inf, NaN and finite scores (guards the test itself)."""
    text, images, text_lengths, image_lengths, _ = _inf_problem()
    for padding in PADDINGS:
        seen = torch.cat([
            _oracle(text, images, text_lengths, image_lengths, None, aggregation, padding).flatten()
            for aggregation in AGGREGATIONS
        ])
        assert torch.isnan(seen).any() and torch.isfinite(seen).any()
        assert (seen == INF).any() and (seen == -INF).any()
    mrsw = _oracle(text, images, text_lengths, image_lengths, None, "MrSw", "neg_inf")
    classes = torch.where(torch.isnan(mrsw), 3, torch.where(mrsw == INF, 1, torch.where(mrsw == -INF, 2, 0)))
    assert classes.tolist() == [[1, 3, 1, 1], [0, 0, 0, 1], [2, 3, 2, 3], [3, 3, 3, 3]]  # the docstring's table
