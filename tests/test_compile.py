"""torch.compile(fullgraph=True) over the public ops: no graph breaks, same forward and backward as eager.

The fused op is opaque to the compiler (``torch.library.custom_op`` with a fake
implementation and a registered backward op); the op layer skips its
value-dependent checks while tracing (``_inputs.tracing()``) and the op
implementation re-checks them on the real values (the Triton path skips that for
layouts the op layer built: tests/test_triton_backward.py). Packed ``cu_seqlens``
inputs have a data-dependent padded length (the longest sequence): given as
Python ints (``max_text_len`` / ``max_image_len``) they compile without graph
breaks too; without them the host read of ``cu_seqlens`` breaks the graph.
"""
import pytest
import torch

import aladin_fast

pytest.importorskip("aladin_fast._C")


class ThreeOps(torch.nn.Module):
    """A projection followed by the three public ops with different aggregations and paddings."""

    def __init__(self, dim):
        super().__init__()
        self.project = torch.nn.Linear(dim, dim)

    def forward(self, text, images, text_lengths, image_lengths, candidates, text_mask):
        text = self.project(text)
        teacher = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation="symm")
        paired = aladin_fast.paired_scores(text, images[: text.shape[0]], text_mask, image_lengths[: text.shape[0]],
                                           aggregation="MrSw", padding="zero")
        reranked = aladin_fast.rerank_scores(text, images, candidates, text_lengths, image_lengths,
                                             aggregation="MrAVGw", normalize=True)
        averaged = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation="mean")
        loss = teacher.logsumexp(dim=1).sum() - paired.sum() + (reranked * reranked).sum() + averaged.sum()
        return loss, teacher


def _inputs(generator):
    text = torch.randn(3, 5, 16, generator=generator)
    images = torch.randn(4, 6, 16, generator=generator, requires_grad=True)
    text_lengths = torch.tensor([5, 2, 0])
    image_lengths = torch.tensor([6, 1, 4, 0])
    candidates = torch.tensor([[0, 1], [3, 3], [2, 0]])
    text_mask = torch.arange(5)[None, :] < text_lengths[:, None]
    return text, images, text_lengths, image_lengths, candidates, text_mask


def _run(module, inputs):
    module.zero_grad()
    images = inputs[1]
    images.grad = None
    loss, teacher = module(*inputs)
    loss.backward()
    return loss.detach(), teacher.detach(), images.grad.clone(), module.project.weight.grad.clone()


def test_no_graph_breaks(generator):
    module = ThreeOps(16)
    explanation = torch._dynamo.explain(module)(*_inputs(generator))
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_fullgraph_forward_backward_match_eager(generator):
    torch.manual_seed(0)
    module = ThreeOps(16)
    inputs = _inputs(generator)
    eager = _run(module, inputs)
    compiled = torch.compile(module, fullgraph=True)
    got = _run(compiled, inputs)
    for name, g, e in zip(("loss", "scores", "d images", "d weight"), got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # same shapes, new values: no recompilation, and bad values are still refused by the op itself
    bad = list(inputs)
    bad[2] = torch.tensor([5, 9, 0])  # text_lengths beyond the padded length 5
    with pytest.raises(ValueError, match="text_lengths"):
        compiled(*bad)
    bad = list(inputs)
    bad[4] = torch.tensor([[0, 1], [7, 3], [2, 0]])  # candidate id 7 >= Ni = 4
    with pytest.raises(ValueError, match="candidates"):
        compiled(*bad)


# ----------------------------------------------------------------------------- packed inputs
class PackedOps(torch.nn.Module):
    """The three public ops on packed inputs, padded lengths given as Python ints (like flash-attn's max_seqlen)."""

    def __init__(self, dim, max_text_len, max_image_len):
        super().__init__()
        self.project = torch.nn.Linear(dim, dim)
        self.max_lengths = dict(max_text_len=max_text_len, max_image_len=max_image_len)

    def forward(self, text, images, text_cu_seqlens, image_cu_seqlens, candidates, paired_images, paired_cu_seqlens):
        text = self.project(text)
        packed = dict(text_cu_seqlens=text_cu_seqlens, image_cu_seqlens=image_cu_seqlens, **self.max_lengths)
        teacher = aladin_fast.alignment_scores(text, images, aggregation="symm", **packed)
        reranked = aladin_fast.rerank_scores(text, images, candidates, aggregation="mean", padding="zero",
                                             normalize=True, **packed)
        paired = aladin_fast.paired_scores(text, paired_images, aggregation="MwSr", padding="zero",
                                           text_cu_seqlens=text_cu_seqlens, image_cu_seqlens=paired_cu_seqlens,
                                           **self.max_lengths)
        loss = teacher.logsumexp(dim=1).sum() + (reranked * reranked).sum() - paired.sum()
        return loss, teacher


def _packed_inputs(generator):
    text = torch.randn(7, 16, generator=generator)  # captions of 5, 2 and 0 words
    images = torch.randn(11, 16, generator=generator, requires_grad=True)  # images of 6, 1, 4 and 0 regions
    text_cu_seqlens = torch.tensor([0, 5, 7, 7])
    image_cu_seqlens = torch.tensor([0, 6, 7, 11, 11])
    candidates = torch.tensor([[0, 1], [3, 3], [2, 0]])
    paired_images = images[:7]  # images of 6, 0 and 1 regions
    paired_cu_seqlens = torch.tensor([0, 6, 6, 7])
    return text, images, text_cu_seqlens, image_cu_seqlens, candidates, paired_images, paired_cu_seqlens


def test_packed_fullgraph_forward_backward_no_graph_breaks(generator):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    module = PackedOps(16, max_text_len=5, max_image_len=6)
    inputs = _packed_inputs(generator)
    eager = _run(module, inputs)
    counters.clear()
    got = _run(torch.compile(module, fullgraph=True), inputs)  # fullgraph: a graph break would raise
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for name, g, e in zip(("loss", "scores", "d images", "d weight"), got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # the max lengths equal the longest sequences here: the same as the eager default (read from cu_seqlens)
    text, images, text_cu, image_cu = inputs[:4]
    default = aladin_fast.alignment_scores(module.project(text), images, aggregation="symm", text_cu_seqlens=text_cu,
                                           image_cu_seqlens=image_cu)
    torch.testing.assert_close(got[1], default.detach(), atol=1e-5, rtol=1e-5)


def test_packed_compiled_still_refuses_bad_cu_seqlens(generator):
    module = torch.compile(PackedOps(16, max_text_len=5, max_image_len=6), fullgraph=True)
    inputs = list(_packed_inputs(generator))
    module(*inputs)
    inputs[2] = torch.tensor([0, 6, 7, 7])  # a caption of 6 words > max_text_len = 5
    with pytest.raises((RuntimeError, ValueError), match="max_text_len|text_lengths"):
        module(*inputs)


def test_max_lengths_eager_validation_and_zero_padding(generator):
    text, images = torch.randn(7, 16, generator=generator), torch.randn(11, 16, generator=generator)
    text_cu, image_cu = torch.tensor([0, 5, 7, 7]), torch.tensor([0, 6, 7, 11, 11])
    packed = dict(text_cu_seqlens=text_cu, image_cu_seqlens=image_cu)
    with pytest.raises(ValueError, match=r"max_text_len = 4 is shorter than the longest sequence of text_cu_seqlens \(5\)"):
        aladin_fast.alignment_scores(text, images, max_text_len=4, **packed)
    with pytest.raises(TypeError, match="max_image_len must be a Python int"):
        aladin_fast.alignment_scores(text, images, max_image_len=torch.tensor(6), **packed)
    with pytest.raises(ValueError, match="max_text_len applies to packed text"):
        aladin_fast.alignment_scores(text.view(7, 1, 16), images, max_text_len=1, image_cu_seqlens=image_cu)
    # a padded length beyond the longest sequence: padding="zero" sees that many zero tokens, as padded input would
    padded_text = torch.zeros(3, 8, 16)
    for i, (start, end) in enumerate(zip(text_cu[:-1].tolist(), text_cu[1:].tolist())):
        padded_text[i, :end - start] = text[start:end]
    for aggregation in ("MrSw", "MwSr", "mean"):
        got, argmax = aladin_fast.alignment_scores(text, images, aggregation=aggregation, padding="zero",
                                                   return_argmax=True, max_text_len=8, **packed)
        expected = aladin_fast.alignment_scores(padded_text, images, torch.tensor([5, 2, 0]), aggregation=aggregation,
                                                padding="zero", image_cu_seqlens=image_cu)
        assert argmax.shape == (3, 4, 8)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_compiled_refuses_int64_lengths_that_would_wrap_in_int32(generator):
    """The op implementation re-checks int32 lengths; an int64 2^32 + 3 must not reach it as a valid 3."""
    def score(text, images, text_lengths, image_lengths):
        return aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation="MrSw")

    text, images = torch.randn(2, 5, 8, generator=generator), torch.randn(3, 4, 8, generator=generator)
    image_lengths = torch.tensor([4, 1, 3])
    compiled = torch.compile(score, fullgraph=True)
    good = torch.tensor([5, 2])
    torch.testing.assert_close(compiled(text, images, good, image_lengths), score(text, images, good, image_lengths))
    beyond = r"must lie in \[0, the padded length\], got a value beyond int32"
    for bad in (torch.tensor([5, 2**32 + 3]), torch.tensor([-2**32 + 2, 1])):
        with pytest.raises(RuntimeError, match="text_lengths " + beyond):
            compiled(text, images, bad, image_lengths)
    with pytest.raises(RuntimeError, match="image_lengths " + beyond):
        compiled(text, images, good, torch.tensor([4, 2**32 + 1, 3]))


def test_compiling_the_op_raises_no_dynamo_warning(generator, monkeypatch):
    """The backend probes were functools.lru_cache functions: every graph warned that Dynamo ignores the cache."""
    import warnings

    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # warnings already given in this process
    torch._dynamo.reset()
    text, images = torch.randn(2, 3, 8, generator=generator), torch.randn(4, 5, 8, generator=generator)
    compiled = torch.compile(lambda t, i: aladin_fast.alignment_scores(t, i, aggregation="symm"), fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(text, images)
    dynamo = [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    assert not dynamo, dynamo
    torch.testing.assert_close(got, aladin_fast.alignment_scores(text, images, aggregation="symm"))
