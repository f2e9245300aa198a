"""Gradients of the kernel backends (argmax-based backward) vs autograd through the float64 reference."""
import pytest
import torch

import aladin_fast
from aladin_fast.ops.alignment_op import score_tokens, score_tokens_backward
from cases import AGGREGATIONS, PADDINGS, make_tokens


def _leaf(tensor, dtype):
    return tensor.to(dtype).detach().requires_grad_(True)


def _grads(fn, text, images, upstream):
    scores = fn(text, images)
    (scores * upstream).sum().backward()
    return scores.detach(), text.grad, images.grad


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mode", ["all_pairs", "rerank", "paired"])
def test_cpu_gradients_match_reference(generator, padding, aggregation, mode):
    text0, text_lengths = make_tokens(generator, 4, 7, 24, min_length=0)
    images0, image_lengths = make_tokens(generator, 5, 9, 24, min_length=0)
    images0 = images0.clamp(-2, 2)  # garbage padding stays finite either way; only valid rows get gradients
    text0 = text0.clamp(-2, 2)
    if mode == "all_pairs":
        call = lambda t, v, backend: aladin_fast.alignment_scores(  # noqa: E731
            t, v, text_lengths, image_lengths, aggregation, padding, backend=backend)
        upstream = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    elif mode == "rerank":
        candidates = torch.randint(0, 5, (4, 6), generator=generator)
        candidates[1, :2] = 3  # repeated candidates accumulate
        call = lambda t, v, backend: aladin_fast.rerank_scores(  # noqa: E731
            t, v, candidates, text_lengths, image_lengths, aggregation, padding, backend=backend)
        upstream = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    else:
        images0, image_lengths = images0[:4], image_lengths[:4]
        call = lambda t, v, backend: aladin_fast.paired_scores(  # noqa: E731
            t, v, text_lengths, image_lengths, aggregation, padding, backend=backend)
        upstream = torch.randn(4, generator=generator, dtype=torch.float64)
    _, ref_text, ref_images = _grads(lambda t, v: call(t, v, "reference"), _leaf(text0, torch.float64),
                                     _leaf(images0, torch.float64), upstream)
    _, got_text, got_images = _grads(lambda t, v: call(t, v, "cpu"), _leaf(text0, torch.float32),
                                     _leaf(images0, torch.float32), upstream.float())
    assert got_text.dtype == torch.float32 and got_text.shape == text0.shape
    torch.testing.assert_close(got_text.double(), ref_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_images.double(), ref_images, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["MrSw", "symm", "mean"])
def test_packed_gradients(generator, aggregation):
    lengths_t, lengths_v = torch.tensor([3, 0, 5]), torch.tensor([4, 2])
    text0 = torch.randn(8, 16, generator=generator)
    images0 = torch.randn(6, 16, generator=generator)
    cu_t = torch.tensor([0, 3, 3, 8])
    cu_v = torch.tensor([0, 4, 6])
    results = []
    for backend, dtype in (("reference", torch.float64), ("cpu", torch.float32)):
        text, images = _leaf(text0, dtype), _leaf(images0, dtype)
        scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend,
                                              text_cu_seqlens=cu_t, image_cu_seqlens=cu_v)
        scores.sum().backward()
        results.append((text.grad.double(), images.grad.double()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-5)


def test_bf16_gradients_close_to_reference(generator):
    text0, text_lengths = make_tokens(generator, 3, 6, 32, min_length=6)
    images0, image_lengths = make_tokens(generator, 4, 5, 32, min_length=5)
    text0, images0 = text0.bfloat16().double(), images0.bfloat16().double()
    _, ref_text, ref_images = _grads(lambda t, v: aladin_fast.alignment_scores(t, v, backend="reference"),
                                     _leaf(text0, torch.float64), _leaf(images0, torch.float64), 1.0)
    _, got_text, got_images = _grads(lambda t, v: aladin_fast.alignment_scores(t, v, backend="cpu"),
                                     _leaf(text0, torch.bfloat16), _leaf(images0, torch.bfloat16), 1.0)
    assert got_text.dtype == torch.bfloat16
    torch.testing.assert_close(got_text.double(), ref_text, atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(got_images.double(), ref_images, atol=3e-2, rtol=1e-2)


def test_reference_gradcheck_float64(generator):
    text = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    images = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    for aggregation in AGGREGATIONS:
        assert torch.autograd.gradcheck(
            lambda t, v: aladin_fast.reference.alignment_scores(t, v, torch.tensor([3, 2]), None, aggregation), (text, images)
        )


def test_opcheck_forward_and_backward(generator):
    text = torch.randn(10, 8, generator=generator, requires_grad=True)
    images = torch.randn(12, 8, generator=generator, requires_grad=True)
    t_off, t_len = torch.tensor([0, 5]), torch.tensor([5, 4], dtype=torch.int32)
    v_off, v_len = torch.tensor([0, 4, 8]), torch.tensor([4, 4, 3], dtype=torch.int32)
    for candidates in (None, torch.tensor([[2, 0], [1, 1]])):
        args = (text, t_off, t_len, images, v_off, v_len, candidates, 0, False, 5, 4, "cpu", True)
        torch.library.opcheck(score_tokens, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    scores, argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, None, 3, True, 5, 4, "cpu", True)
    backward_args = (torch.ones_like(scores), text.detach(), t_off, t_len, images.detach(), v_off, v_len, None,
                     argmax, 3, True, 5, 4, "cpu")
    torch.library.opcheck(score_tokens_backward, backward_args, test_utils=("test_schema", "test_faketensor"))


MEMORY_SCRIPT = """
import resource, torch, aladin_fast
torch.manual_seed(0)
text = torch.randn(128, 32, 1024, requires_grad=True)
images = torch.randn(128, 36, 1024, requires_grad=True)
aladin_fast.alignment_scores(text[:2], images[:2], backend="cpu").sum().backward()  # load everything once
text.grad = images.grad = None
page = resource.getpagesize()
rss_before = int(open("/proc/self/statm").read().split()[1]) * page
scores = aladin_fast.alignment_scores(text, images, backend="cpu", aggregation="{aggregation}")
scores.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rss_after = int(open("/proc/self/statm").read().split()[1]) * page
print(rss_before, rss_after, peak)
print(max(0, peak - rss_before))
"""


@pytest.mark.parametrize("aggregation", ["MrSw", "symm"])
def test_forward_backward_peak_memory_far_below_pairs_words_regions(aggregation):
    """Nt = Ni = 128, W = 32, R = 36, D = 1024: the [Nt, Ni, W, R] fp32 tensor alone is 75 MB."""
    import os
    import subprocess
    import sys

    # large blocks straight from mmap, so freed memory leaves RSS and ru_maxrss is the true peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.replace("{aggregation}", aggregation)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.strip().splitlines()[-1])
    full_similarity = 128 * 128 * 32 * 36 * 4  # one [Nt, Ni, W, R] fp32 tensor: 75.5 MB
    gradients = (128 * 32 + 128 * 36) * 1024 * 4  # the returned .grad tensors themselves: 35.7 MB
    # beyond the gradients: argmax (2 MB), sparse index chunks, one [T, D] product at a time
    assert extra - gradients < full_similarity, f"forward+backward took {extra / 2**20:.1f} MiB extra: {result.stdout}"


def test_alignment_score_module_trains(generator):
    module = aladin_fast.nn.AlignmentScore(aggregation="MrAVGw", normalize=True)
    text = torch.randn(3, 4, 8, generator=generator, requires_grad=True)
    images = torch.randn(3, 5, 8, generator=generator, requires_grad=True)
    scores = module(text, images)
    expected = aladin_fast.reference.alignment_scores(text.double(), images.double(), aggregation="MrAVGw", normalize=True)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=0)
    module(text, images, paired=True).sum().backward()
    assert text.grad is not None and torch.isfinite(text.grad).all() and images.grad.abs().sum() > 0
    assert "MrAVGw" in repr(module)
