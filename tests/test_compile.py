"""torch.compile(fullgraph=True) over the public ops: no graph breaks, same forward and backward as eager.

The fused op is opaque to the compiler (``torch.library.custom_op`` with a fake
implementation and a registered backward op); the op layer skips its
value-dependent checks while tracing (``_inputs.tracing()``) and the op
implementation re-checks them on the real values. Padded inputs only: packed
``cu_seqlens`` inputs have a data-dependent padded length, so they still break
the graph.
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
