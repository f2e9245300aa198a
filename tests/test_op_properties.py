"""Metamorphic properties of the op on the C++ kernel: rerank / paired / packed / permuted calls must agree with
the all-pairs call exactly -- scores, winners and gradients -- on grid-valued tokens (exact fp32 sums, frequent
ties), for random shapes, lengths, aggregations and paddings.

An independent check of the bookkeeping each mode adds (candidate gathers and duplicates, the diagonal, packed
offsets, image order) that needs no oracle: the all-pairs call is itself checked against the float64 reference
(tests/test_fuzz.py).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aladin_fast
from cases import AGGREGATIONS, PADDINGS
from test_fuzz import COMMON

DEFAULT = settings(max_examples=120, derandomize=True, deadline=None,
                   suppress_health_check=COMMON["suppress_health_check"])
THOROUGH = settings(max_examples=1000, **COMMON)
ARGMAX_AGGREGATIONS = ("MrSw", "MrAVGw", "symm")


@st.composite
def batches(draw):
    nt, ni = draw(st.integers(0, 5)), draw(st.integers(0, 6))
    words, regions = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    dim = draw(st.sampled_from([1, 2, 5, 16, 33]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def grid(*shape):
        return torch.randint(-8, 9, shape, generator=generator).float() / 4

    text, images = grid(nt, words, dim), grid(ni, regions, dim)
    text_lengths = torch.randint(0, words + 1, (nt,), generator=generator)
    image_lengths = torch.randint(0, regions + 1, (ni,), generator=generator)
    k = draw(st.integers(0, 7))
    candidates = torch.randint(0, max(ni, 1), (nt, k if ni else 0), generator=generator)
    return dict(text=text, images=images, text_lengths=text_lengths, image_lengths=image_lengths,
                candidates=candidates, upstream_seed=draw(st.integers(0, 2**31 - 1)),
                aggregation=draw(st.sampled_from(AGGREGATIONS)), padding=draw(st.sampled_from(PADDINGS)),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                permutation_seed=draw(st.integers(0, 2**31 - 1)))


def _run(fn, text, images, upstream_shape, seed, argmax_kind):
    """(scores, argmax, d text, d images) of ``fn(text, images)`` for a grid upstream gradient."""
    text, images = text.detach().requires_grad_(), images.detach().requires_grad_()
    out = fn(text, images, argmax_kind)
    scores, argmax = out if argmax_kind else (out, None)
    upstream = torch.randint(-4, 5, upstream_shape, generator=torch.Generator().manual_seed(seed)).float() / 4
    return _grads(scores, upstream, text, images) + (scores.detach(), argmax, upstream)


def _grads(scores, upstream, text, images):
    if not scores.numel():
        return torch.zeros_like(text), torch.zeros_like(images)
    d_text, d_images = torch.autograd.grad((scores * upstream).sum(), (text, images), allow_unused=True)
    return (torch.zeros_like(text) if d_text is None else d_text,
            torch.zeros_like(images) if d_images is None else d_images)


def _all_pairs(case, text, images, upstream):
    """All-pairs scores, argmax and gradients for a given [Nt, Ni] upstream."""
    text, images = text.detach().requires_grad_(), images.detach().requires_grad_()
    kwargs = dict(aggregation=case["aggregation"], padding=case["padding"], backend="cpu")
    if case["aggregation"] in ARGMAX_AGGREGATIONS:
        scores, argmax = aladin_fast.alignment_scores(text, images, case["text_lengths"], case["image_lengths"],
                                                      return_argmax=True, **kwargs)
    else:
        scores, argmax = aladin_fast.alignment_scores(text, images, case["text_lengths"], case["image_lengths"],
                                                      **kwargs), None
    return (scores.detach(), argmax) + _grads(scores, upstream, text, images)


def _close(got, expected, dtype, what):
    eps = 1e-6 if dtype == torch.float32 else 2.0 ** -8
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got.double(), expected.double(), atol=eps * max(scale, 1.0), rtol=0,
                               msg=lambda m: f"{what}: {m}")


def _check(case):
    dtype, agg = case["dtype"], case["aggregation"]
    text, images = case["text"].to(dtype), case["images"].to(dtype)
    nt, ni = text.shape[0], images.shape[0]
    argmax_kind = agg in ARGMAX_AGGREGATIONS
    kwargs = dict(aggregation=agg, padding=case["padding"], backend="cpu")
    t_len, v_len, candidates = case["text_lengths"], case["image_lengths"], case["candidates"]
    seed = case["upstream_seed"]

    # rerank == the candidates' columns of all pairs; its upstream lands on those columns (duplicates add up)
    d_text, d_images, scores, argmax, upstream = _run(
        lambda t, v, a: aladin_fast.rerank_scores(t, v, candidates, t_len, v_len, return_argmax=a, **kwargs),
        text, images, tuple(candidates.shape), seed, argmax_kind)
    dense_upstream = torch.zeros(nt, ni).scatter_add_(1, candidates, upstream) if ni else torch.zeros(nt, 0)
    all_scores, all_argmax, all_d_text, all_d_images = _all_pairs(case, text, images, dense_upstream)
    assert torch.equal(scores, all_scores.gather(1, candidates)) if ni else scores.shape == (nt, 0)
    if argmax_kind and ni:
        index = candidates[..., None].expand(-1, -1, all_argmax.shape[-1])
        assert torch.equal(argmax, all_argmax.gather(1, index))
    _close(d_text, all_d_text, dtype, "rerank d text")
    _close(d_images, all_d_images, dtype, "rerank d images")

    # paired == the diagonal
    m = min(nt, ni)
    pairs = dict(case, text_lengths=t_len[:m], image_lengths=v_len[:m])
    d_text, d_images, scores, argmax, upstream = _run(
        lambda t, v, a: aladin_fast.paired_scores(t, v, t_len[:m], v_len[:m], return_argmax=a, **kwargs),
        text[:m], images[:m], (m,), seed, argmax_kind)
    diag_scores, diag_argmax, diag_d_text, diag_d_images = _all_pairs(pairs, text[:m], images[:m],
                                                                      torch.diag(upstream))
    assert torch.equal(scores, torch.diagonal(diag_scores))
    if argmax_kind:
        assert torch.equal(argmax, diag_argmax[torch.arange(m), torch.arange(m)])
    _close(d_text, diag_d_text, dtype, "paired d text")
    _close(d_images, diag_d_images, dtype, "paired d images")

    # packed == padded (only valid rows exist; padded rows of the padded call get no gradient)
    def pack(tokens, lengths):
        rows = [tokens[i, : lengths[i]] for i in range(tokens.shape[0])]
        packed = torch.cat(rows) if rows else tokens.new_zeros(0, tokens.shape[-1])
        return packed, torch.nn.functional.pad(lengths.cumsum(0), (1, 0))

    (pt, t_cu), (pv, v_cu) = pack(text, t_len), pack(images, v_len)
    max_len = dict(max_text_len=text.shape[1], max_image_len=images.shape[1])
    d_pt, d_pv, scores, argmax, upstream = _run(
        lambda t, v, a: aladin_fast.alignment_scores(t, v, text_cu_seqlens=t_cu, image_cu_seqlens=v_cu,
                                                     return_argmax=a, **max_len, **kwargs),
        pt, pv, (nt, ni), seed, argmax_kind)
    all_scores, all_argmax, all_d_text, all_d_images = _all_pairs(case, text, images, upstream)
    assert torch.equal(scores, all_scores)
    if argmax_kind:
        assert torch.equal(argmax, all_argmax)
    _close(d_pt, pack(all_d_text, t_len)[0], dtype, "packed d text")
    _close(d_pv, pack(all_d_images, v_len)[0], dtype, "packed d images")
    for name, grad, lengths in (("text", all_d_text, t_len), ("images", all_d_images, v_len)):
        padding_rows = torch.arange(grad.shape[1])[None, :] >= lengths[:, None]
        assert not grad[padding_rows].any(), f"padded {name} rows got a gradient"

    # permuting the images permutes the columns, winners and image gradients
    order = torch.randperm(ni, generator=torch.Generator().manual_seed(case["permutation_seed"]))
    permuted = dict(case, image_lengths=v_len[order])
    p_scores, p_argmax, p_d_text, p_d_images = _all_pairs(permuted, text, images[order], upstream[:, order])
    assert torch.equal(p_scores, all_scores[:, order])
    if argmax_kind:
        assert torch.equal(p_argmax, all_argmax[:, order])
    _close(p_d_text, all_d_text, dtype, "permuted d text")
    _close(p_d_images, all_d_images[order], dtype, "permuted d images")


@DEFAULT
@given(case=batches())
def test_modes_agree_with_all_pairs(case):
    _check(case)


@pytest.mark.slow
@THOROUGH
@given(case=batches())
def test_modes_agree_with_all_pairs_thorough(case):
    _check(case)
