"""CPU backend, through the public API and autograd: forward scores, argmax and both gradients are
bitwise identical when the same call is repeated and whatever ``torch.set_num_threads`` says.

(The raw kernels are checked the same way in test_cpu_kernel_raw.py::test_deterministic_across_threads
and test_autograd.py::test_cpu_backward_deterministic_across_threads; docs/reliability.md lists them all.)
"""
import pytest
import torch

import aladin_fast
from cases import AGGREGATIONS, make_tokens

THREAD_COUNTS = (1, 2, 3)


def _run(text, images, text_lengths, image_lengths, candidates, aggregation, padding, upstream):
    t, v = text.clone().requires_grad_(), images.clone().requires_grad_()
    if candidates is None:
        scores, argmax = aladin_fast.alignment_scores(t, v, text_lengths, image_lengths, aggregation, padding,
                                                      backend="cpu", return_argmax=True)
    else:
        scores, argmax = aladin_fast.rerank_scores(t, v, candidates, text_lengths, image_lengths, aggregation,
                                                   padding, backend="cpu", return_argmax=True)
    (scores * upstream).sum().backward()
    return [x.detach().contiguous().view(torch.uint8) if x.is_floating_point() else x
            for x in (scores, argmax, t.grad, v.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["all_pairs", "rerank"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cpu_forward_backward_bitwise_identical_across_runs_and_threads(dtype, mode, aggregation):
    generator = torch.Generator().manual_seed(17)
    text, text_lengths = make_tokens(generator, 9, 20, 200, min_length=1)
    images, image_lengths = make_tokens(generator, 11, 36, 200)
    text, images = text.to(dtype), images.to(dtype)
    candidates = torch.randint(0, 11, (9, 6), generator=generator) if mode == "rerank" else None
    shape = (9, 11) if candidates is None else (9, 6)
    upstream = torch.randn(shape, generator=generator)
    padding = "zero" if aggregation in ("MwSr", "mean") else "neg_inf"
    previous = torch.get_num_threads()
    runs = {}
    try:
        for threads in THREAD_COUNTS:
            torch.set_num_threads(threads)
            runs[threads] = _run(text, images, text_lengths, image_lengths, candidates, aggregation, padding, upstream)
        runs["again"] = _run(text, images, text_lengths, image_lengths, candidates, aggregation, padding, upstream)
    finally:
        torch.set_num_threads(previous)
    first = runs[THREAD_COUNTS[0]]
    for key, run in runs.items():
        for name, got, want in zip(("scores", "argmax", "grad text", "grad images"), run, first):
            assert torch.equal(got, want), f"{name} differs with {key} thread(s)"
