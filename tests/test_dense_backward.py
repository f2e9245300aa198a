"""The dense all-pairs backward (aladin_fast/ops/dense_backward.py) vs autograd through the float64 reference.

The dense backward is the Triton backend's default for all pairs; here it runs
on CPU tensors behind the C++ forward's argmax (the C++ backward is swapped for
it), so every layout the op accepts goes through it: padded and packed inputs,
empty and all-masked sequences, both paddings, several chunks of captions.
"""
import pytest
import torch

import aladin_fast
from aladin_fast.ops import alignment_op, dense_backward
from cases import PADDINGS, make_tokens

pytest.importorskip("aladin_fast._C")
DENSE = ("MrSw", "MrAVGw", "MwSr", "symm")
CODES = {"MrSw": 0, "MrAVGw": 1, "MwSr": 2, "symm": 3, "sum": 4, "mean": 5}
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


@pytest.fixture
def dense_calls(monkeypatch):
    """Route the CPU backend's backward through dense_backward; count the calls that took it."""
    calls = []
    original = alignment_op.cpu_backward

    def dense_or_cpu(grad, text, t_off, t_len, images, i_off, i_len, candidates, argmax, region_argmax,
                     aggregation, zero_padding, text_pad, image_pad):
        if dense_backward.dense_backward_supported(candidates, aggregation):
            grads = dense_backward.dense_backward(grad, text, t_off, t_len, images, i_off, i_len, argmax,
                                                  region_argmax, aggregation, zero_padding, text_pad, image_pad)
            if grads is not None:
                calls.append(aggregation)
                return grads
        return original(grad, text, t_off, t_len, images, i_off, i_len, candidates, argmax, region_argmax,
                        aggregation, zero_padding, text_pad, image_pad)

    monkeypatch.setattr(alignment_op, "cpu_backward", dense_or_cpu)
    return calls


def _gradients(text0, images0, upstream, dtype, backend, **kwargs):
    text = text0.to(dtype).detach().requires_grad_()
    images = images0.to(dtype).detach().requires_grad_()
    scores = aladin_fast.alignment_scores(text, images, backend=backend, **kwargs)
    (scores * upstream.to(scores.dtype)).sum().backward()
    return text.grad.double(), images.grad.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", DENSE)
@pytest.mark.parametrize("shape", [(4, 5, 7, 9, 24), (3, 2, 1, 37, 16), (1, 1, 1, 1, 8), (5, 3, 37, 2, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dense_matches_reference(generator, dense_calls, monkeypatch, shape, aggregation, padding, dtype):
    nt, ni, w, r, d = shape
    monkeypatch.setattr(dense_backward, "DENSE_CHUNK_BYTES", 16 * w * ni * r)  # chunks of 2 (fp64) to 8 captions
    text0, text_lengths = make_tokens(generator, nt, w, d, min_length=0)
    images0, image_lengths = make_tokens(generator, ni, r, d, min_length=0)
    text0 = text0.to(dtype).double()  # exactly representable in every tested dtype: the argmax is the same
    images0 = images0.to(dtype).double()
    upstream = torch.randn(nt, ni, generator=generator, dtype=torch.float64)
    kwargs = dict(text_lengths=text_lengths, image_lengths=image_lengths, aggregation=aggregation, padding=padding)
    want = _gradients(text0, images0, upstream, torch.float64, "reference", **kwargs)
    got = _gradients(text0, images0, upstream, dtype, "cpu", **kwargs)
    assert dense_calls == [CODES[aggregation]]
    rtol, atol = TOLERANCE[dtype]
    for g, ref, name in zip(got, want, ("text", "images")):
        torch.testing.assert_close(g, ref, rtol=rtol, atol=atol, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("aggregation", DENSE)
def test_dense_packed_inputs(generator, dense_calls, aggregation):
    cu_t = torch.tensor([0, 3, 3, 8, 9])  # lengths 3, 0, 5, 1
    cu_v = torch.tensor([0, 4, 6, 6])  # lengths 4, 2, 0
    text0 = torch.randn(9, 16, generator=generator, dtype=torch.float64)
    images0 = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    upstream = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    kwargs = dict(aggregation=aggregation, text_cu_seqlens=cu_t, image_cu_seqlens=cu_v)
    want = _gradients(text0, images0, upstream, torch.float64, "reference", **kwargs)
    got = _gradients(text0, images0, upstream, torch.float32, "cpu", **kwargs)
    assert dense_calls == [CODES[aggregation]]
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


def test_dense_applies_only_where_exact():
    assert dense_backward.dense_backward_supported(None, 0)
    assert not dense_backward.dense_backward_supported(torch.zeros(2, 3, dtype=torch.int64), 0)
    for code in (4, 5):  # sum / mean: closed forms, no argmax
        assert not dense_backward.dense_backward_supported(None, code)
    text, images = torch.randn(2, 8), torch.randn(4, 8)
    args = (torch.zeros(1, dtype=torch.int64), torch.full((1, ), 2, dtype=torch.int32), images,
            torch.zeros(2, dtype=torch.int64), torch.full((2, ), 2, dtype=torch.int32),
            torch.zeros(1, 2, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 0, False, 2, 2)
    assert dense_backward.dense_backward(torch.ones(1, 2), text, *args) is not None
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = text.clone()
        poisoned[1, 7] = bad
        assert dense_backward.dense_backward(torch.ones(1, 2), poisoned, *args) is None
    with pytest.raises(ValueError, match="aggregation"):
        dense_backward.dense_backward(torch.ones(1, 2), text, *args[:-4], 4, False, 2, 2)


def test_nonfinite_tokens_fall_back_to_the_argmax_backward(generator, dense_calls):
    text0, text_lengths = make_tokens(generator, 3, 6, 8, min_length=1)
    images0, image_lengths = make_tokens(generator, 4, 5, 8, min_length=1)
    images0[3, 4] = float("inf") if image_lengths[3] < 5 else images0[3, 4]  # inf in padding (if any)
    images0[0, 0, 0] = float("nan")
    upstream = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    got_text, got_images = _gradients(text0, images0, upstream, torch.float32, "cpu", text_lengths=text_lengths,
                                      image_lengths=image_lengths)
    assert dense_calls == []  # the C++ argmax backward ran
    assert torch.isfinite(got_images[1:]).all()


def test_empty_batches(dense_calls):
    for nt, ni in ((0, 3), (2, 0)):
        text = torch.randn(nt, 4, 8, requires_grad=True)
        images = torch.randn(ni, 5, 8, requires_grad=True)
        aladin_fast.alignment_scores(text, images, backend="cpu").sum().backward()
        assert text.grad.shape == text.shape and not text.grad.any()
        assert images.grad.shape == images.shape and not images.grad.any()


def test_triton_backward_strategy_default_and_errors(monkeypatch):
    monkeypatch.delenv("ALADIN_FAST_TRITON_BACKWARD", raising=False)
    assert alignment_op.triton_backward_strategy() == "dense"
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "fastest")
    with pytest.raises(ValueError, match="ALADIN_FAST_TRITON_BACKWARD"):
        alignment_op.triton_backward_strategy()
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "dense")
    torch.use_deterministic_algorithms(True)
    try:
        assert alignment_op.triton_backward_strategy() == "segmented"
    finally:
        torch.use_deterministic_algorithms(False)
