"""Gradients of the kernel backends (argmax-based backward) vs autograd through the float64 reference.

Also: ``torch.autograd.gradcheck`` in float64 on the reference and on the C++
kernel's float64 path (every aggregation and padding), the C++ backward
(``_C.score_backward``) against the PyTorch sparse backward on raw
kernel-layout inputs (every ISA, dtype, layout), the forward's region -> word
argmax, determinism across thread counts, bad input (double backward, integer
inputs, non-contiguous upstream gradients), opcheck and peak memory.
"""
import numpy as np
import pytest
import torch

import aladin_fast
from aladin_fast.ops import alignment_op
from aladin_fast.ops.alignment_op import score_tokens, score_tokens_backward
from cases import AGGREGATIONS, PADDINGS, make_tokens

_C = pytest.importorskip("aladin_fast._C")
ISAS = [isa for isa in ("avx512", "avx2", "scalar") if isa in _C.available_isas()]


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


# ----------------------------------------------------------------------------- float64: gradcheck
def _float64_calls(generator, aggregation, padding, backend):
    """Small float64 cases, ``{name: (fn(text, images), text, images)}``: captions of 4, 1 and 0 valid
    words, images of 3, 1, 0 and 2 valid regions; all pairs, rerank, paired and packed.

    Random normal features: max-based scores are piecewise linear and a tie (a kink that
    finite differences would straddle) has probability zero; the nearest gap is far above eps.
    """
    text = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    images = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    text_lengths, image_lengths = torch.tensor([4, 1, 0]), torch.tensor([3, 1, 0, 2])
    candidates = torch.tensor([[2, 0], [1, 1], [3, 0]])  # a repeat accumulates
    packed_text = torch.randn(5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    packed_images = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    options = dict(aggregation=aggregation, padding=padding, backend=backend)
    return {
        "all pairs": (lambda t, v: aladin_fast.alignment_scores(t, v, text_lengths, image_lengths, **options),
                      text, images),
        "rerank": (lambda t, v: aladin_fast.rerank_scores(t, v, candidates, text_lengths, image_lengths, **options),
                   text, images),
        "paired": (lambda t, v: aladin_fast.paired_scores(t, v[:3], text_lengths, image_lengths[:3], **options),
                   text, images),
        # lengths 4, 1, 0 / 3, 0, 2, 1; max_text_len 6 > 4 (padded size 6 for padding="zero")
        "packed": (lambda t, v: aladin_fast.alignment_scores(
            t, v, text_cu_seqlens=torch.tensor([0, 4, 5, 5]), image_cu_seqlens=torch.tensor([0, 3, 3, 5, 6]),
            max_text_len=6, **options), packed_text, packed_images),
    }


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(generator, backend, aggregation, padding):
    calls = _float64_calls(generator, aggregation, padding, backend)
    if backend == "reference":  # paired and packed inputs take the same reference code paths (and cost most)
        calls = {name: calls[name] for name in ("all pairs", "rerank")}
    for name, (call, text, images) in calls.items():
        assert call(text, images).dtype == torch.float64
        assert torch.autograd.gradcheck(call, (text, images)), name


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cpu_float64_gradients_match_reference(generator, aggregation, padding):
    """The C++ float64 backward equals autograd through the reference to rounding (1e-12)."""
    reference_calls = _float64_calls(generator, aggregation, padding, "reference")
    cpu_calls = _float64_calls(torch.Generator().manual_seed(1234), aggregation, padding, "cpu")
    for name, (call, text, images) in cpu_calls.items():
        upstream = torch.randn(call(text, images).shape, generator=generator, dtype=torch.float64)
        got = torch.autograd.grad(call(text, images), (text, images), upstream)
        expected = torch.autograd.grad(reference_calls[name][0](text, images), (text, images), upstream)
        for g, e in zip(got, expected):
            assert g.dtype == torch.float64
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cpu_float64_forward_matches_reference(generator, aggregation, padding):
    """Scores to 1e-12 relative and identical argmax; garbage (1e3) in the padding is never read."""
    text, text_lengths = make_tokens(generator, 5, 7, 33, min_length=0)  # float64, lengths 7 .. 0
    images, image_lengths = make_tokens(generator, 6, 9, 33, min_length=0)
    text, images = text * 3, images * 3  # scores of a few units: the relative bound is the binding one
    candidates = torch.randint(0, 6, (5, 4), generator=generator)
    cu_text = torch.nn.functional.pad(torch.cumsum(text_lengths, 0), (1, 0))
    cu_images = torch.nn.functional.pad(torch.cumsum(image_lengths, 0), (1, 0))
    packed_text = torch.cat([text[i, :n] for i, n in enumerate(text_lengths.tolist())])
    packed_images = torch.cat([images[j, :n] for j, n in enumerate(image_lengths.tolist())])
    options = dict(aggregation=aggregation, padding=padding, return_argmax=True)
    calls = {
        "all pairs": lambda b: aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend=b,
                                                            **options),
        "rerank": lambda b: aladin_fast.rerank_scores(text, images, candidates, text_lengths, image_lengths,
                                                      backend=b, **options),
        "paired": lambda b: aladin_fast.paired_scores(text, images[:5], text_lengths, image_lengths[:5], backend=b,
                                                      **options),
        "packed": lambda b: aladin_fast.alignment_scores(packed_text, packed_images, text_cu_seqlens=cu_text,
                                                         image_cu_seqlens=cu_images, backend=b, **options),
    }
    for name, call in calls.items():
        (got, got_argmax), (expected, expected_argmax) = call("cpu"), call("reference")
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13, msg=lambda m: f"{name}: {m}")
        assert torch.equal(got_argmax, expected_argmax), name


def test_cpu_float64_nan_stays_in_its_pairs(generator):
    text = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    images = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64)
    text[1, 2, 3] = float("nan")
    for aggregation in AGGREGATIONS:
        got = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu")
        expected = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="reference")
        assert got[1].isnan().all() and not got[[0, 2]].isnan().any(), aggregation
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13, equal_nan=True)


def test_float64_is_refused_by_triton():
    text = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton' takes float32, float16 or bfloat16 inputs, got float64"):
        aladin_fast.alignment_scores(text, text, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck_forward_and_backward(generator, dtype):
    text = torch.randn(10, 8, generator=generator, dtype=dtype, requires_grad=True)
    images = torch.randn(12, 8, generator=generator, dtype=dtype, requires_grad=True)
    t_off, t_len = torch.tensor([0, 5]), torch.tensor([5, 4], dtype=torch.int32)
    v_off, v_len = torch.tensor([0, 4, 8]), torch.tensor([4, 4, 3], dtype=torch.int32)
    for candidates in (None, torch.tensor([[2, 0], [1, 1]])):
        for aggregation, want_region in ((0, False), (3, True), (2, True)):
            args = (text, t_off, t_len, images, v_off, v_len, candidates, aggregation, False, 5, 4, "cpu",
                    aggregation != 2, want_region)
            torch.library.opcheck(score_tokens, args,
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    scores, argmax, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, None, 3, True, 5, 4,
                                                 "cpu", True, True)
    assert region_argmax.shape == (2, 3, 4)
    backward_args = (torch.ones_like(scores), text.detach(), t_off, t_len, images.detach(), v_off, v_len, None,
                     argmax, region_argmax, 3, True, 5, 4, "cpu")
    torch.library.opcheck(score_tokens_backward, backward_args, test_utils=("test_schema", "test_faketensor"))
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_float64_kernel_validation_errors():
    """The bindings' float64 path wants float64 features, scores and gradients throughout."""
    text, images = np.zeros((4, 8)), np.zeros((6, 8))
    inputs = dict(text=text, text_offsets=np.array([0, 2]), text_lengths=np.array([2, 2], np.int32), images=images,
                  image_offsets=np.array([0, 3]), image_lengths=np.array([3, 3], np.int32), candidates=None,
                  dtype="float64", aggregation=3, zero_padding=False, text_pad=2, image_pad=3)
    forward = dict(inputs, out=np.zeros((2, 2)), argmax=None, region_argmax=np.zeros((2, 2, 3), np.int32))
    backward = dict(inputs, grad=np.ones((2, 2)), argmax=np.zeros((2, 2, 2), np.int32),
                    region_argmax=np.zeros((2, 2, 3), np.int32), grad_text=np.zeros((4, 8)),
                    grad_images=np.zeros((6, 8)))
    _C.score(**forward)
    _C.score_backward(**backward)
    for call, base, kwargs, message in (
        (_C.score, forward, dict(text=text.astype(np.float32)), "text must have dtype float64"),
        (_C.score, forward, dict(out=np.zeros((2, 2), np.float32)), "out must have dtype float64"),
        (_C.score, forward, dict(dtype="float128"), "dtype must be"),
        (_C.score_backward, backward, dict(grad=np.ones((2, 2), np.float32)), "grad must have dtype float64"),
        (_C.score_backward, backward, dict(grad_images=np.zeros((6, 8), np.float32)), "grad_images must have dtype"),
        (_C.score_backward, backward, dict(images=images.astype(np.float32)), "images must have dtype float64"),
    ):
        with pytest.raises(ValueError, match=message):
            call(**{**base, **kwargs})


MEMORY_SCRIPT = """
import resource, torch, aladin_fast
torch.manual_seed(0)
text = torch.randn(128, 32, 1024, requires_grad=True)
images = torch.randn(128, 36, 1024, requires_grad=True)
aladin_fast.alignment_scores(text[:2], images[:2], backend="cpu").sum().backward()  # load everything once
text.grad = images.grad = None
page = resource.getpagesize()
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
# ru_maxrss survives exec (a child of a big pytest process starts with the parent's peak):
# reset this process's peak-RSS counter instead and read VmHWM
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
rss_before = int(open("/proc/self/statm").read().split()[1]) * page
scores = aladin_fast.alignment_scores(text, images, backend="cpu", aggregation="{aggregation}")
scores.sum().backward()
peak = status_kib("VmHWM")
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


# ----------------------------------------------------------------------------- raw C++ backward
def _kernel_case(generator, *, nt, ni, width, regions, dim, dtype, packed, mode, k=5, exact=False):
    """Kernel-layout inputs: (text, t_off, t_len, images, v_off, v_len, candidates, text_pad, image_pad)."""
    def values(rows):
        if exact:  # multiples of 1/4: exact products and sums, so ties are real ties
            return torch.randint(-4, 5, (rows, dim), generator=generator).float() / 4
        return torch.randn(rows, dim, generator=generator)

    def lengths(count, pad):
        out = torch.randint(0, pad + 1, (count,), generator=generator)
        if count >= 3:
            out[0], out[1], out[2] = pad, 0, max(1, pad // 2)
        return out.to(torch.int32)

    t_len, v_len = lengths(nt, width), lengths(ni, regions)

    def layout(lens, pad):
        if not packed:
            return torch.arange(len(lens), dtype=torch.int64) * pad, len(lens) * pad
        gaps = torch.randint(0, 3, (len(lens),), generator=generator)
        starts = torch.cumsum(lens.long() + gaps, 0) - lens.long() - gaps + 2
        return starts, int((starts + lens.long() + gaps).max()) + 1 if len(lens) else 0

    t_off, t_rows = layout(t_len, width)
    v_off, v_rows = layout(v_len, regions)
    text, images = values(t_rows).to(dtype), values(v_rows).to(dtype)
    if mode == "all":
        candidates = None
    elif mode == "paired":
        candidates = torch.arange(nt)[:, None].contiguous()
    else:
        candidates = torch.randint(0, ni, (nt, k), generator=generator)
        candidates[0, -1] = candidates[0, 0]  # repeats accumulate
    return text, t_off, t_len, images, v_off, v_len, candidates, width, regions


@pytest.mark.parametrize("aggregation", range(6), ids=AGGREGATIONS)
@pytest.mark.parametrize("zero_padding", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cpu_backward_matches_sparse_backward(monkeypatch, aggregation, zero_padding, dtype):
    """C++ backward == PyTorch sparse backward from the same argmax, every ISA, layout and mode."""
    generator = torch.Generator().manual_seed(aggregation * 10 + zero_padding)
    for packed, mode, dim in ((False, "all", 67), (True, "rerank", 40), (False, "paired", 17), (True, "all", 8)):
        nt, ni = (4, 4) if mode == "paired" else (4, 5)
        case = _kernel_case(generator, nt=nt, ni=ni, width=7, regions=9, dim=dim, dtype=dtype, packed=packed,
                            mode=mode)
        text, t_off, t_len, images, v_off, v_len, candidates, text_pad, image_pad = case
        scores, argmax, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, candidates,
                                                     aggregation, zero_padding, text_pad, image_pad, "cpu", True, True)
        grad = torch.randn(scores.shape, generator=generator)
        grad[0, 0] = 0.0  # skipped pair
        expected = alignment_op.sparse_backward(grad, text, t_off, t_len, images, v_off, v_len, candidates, argmax,
                                                region_argmax, aggregation, zero_padding, text_pad, image_pad, "cpu")
        for isa in ISAS:
            monkeypatch.setenv("ALADIN_FAST_ISA", isa)
            got = alignment_op.cpu_backward(grad, text, t_off, t_len, images, v_off, v_len, candidates, argmax,
                                            region_argmax, aggregation, zero_padding, text_pad, image_pad)
            for g, e, name in zip(got, expected, ("text", "images")):
                assert g.dtype == torch.float32 and g.shape == e.shape
                torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{isa} {mode} d{name}: {m}")


def _region_argmax_reference(text, t_off, t_len, images, v_off, v_len, candidates, zero_padding, text_pad, image_pad):
    """Region -> word argmax from docs/kernel_contract.md in float64 (first index wins)."""
    nt, ni = len(t_off), len(v_off)
    k = ni if candidates is None else candidates.shape[1]
    out = torch.full((nt, k, image_pad), -1, dtype=torch.int32)
    for i in range(nt):
        nw = int(t_len[i])
        t = text[t_off[i]:t_off[i] + nw].double()
        for kk in range(k):
            j = kk if candidates is None else int(candidates[i, kk])
            nr = int(v_len[j])
            v = images[v_off[j]:v_off[j] + nr].double()
            pad_w = zero_padding and nw < text_pad
            for r in range(nr):
                column = (t @ v[r]).tolist()
                if pad_w:
                    column.append(0.0)  # padded word: a zero vector scores 0, index n_w
                out[i, kk, r] = int(np.argmax(column)) if column else -1  # numpy: first maximal index
    return out


@pytest.mark.parametrize("zero_padding", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["float32", "bfloat16", "float64"])
def test_forward_region_argmax_exact_with_ties(monkeypatch, zero_padding, dtype):
    generator = torch.Generator().manual_seed(7 + zero_padding)
    for packed, mode, width, dim in ((False, "all", 37, 12), (True, "rerank", 9, 5), (False, "paired", 20, 3)):
        nt, ni = (4, 4) if mode == "paired" else (4, 5)
        case = _kernel_case(generator, nt=nt, ni=ni, width=width, regions=11, dim=dim, dtype=dtype, packed=packed,
                            mode=mode, exact=True)
        text, t_off, t_len, images, v_off, v_len, candidates, text_pad, image_pad = case
        expected = _region_argmax_reference(text.float(), t_off, t_len, images.float(), v_off, v_len, candidates,
                                            zero_padding, text_pad, image_pad)
        for isa in ISAS:
            monkeypatch.setenv("ALADIN_FAST_ISA", isa)
            for aggregation in range(6):
                _, _, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, candidates, aggregation,
                                                   zero_padding, text_pad, image_pad, "cpu", False, True)
                assert torch.equal(region_argmax, expected), f"{isa} {mode} aggregation={aggregation}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cpu_backward_deterministic_across_threads(dtype):
    generator = torch.Generator().manual_seed(3)
    for mode in ("all", "rerank"):
        # D = 256: enough work that small-job thread capping still leaves >= 5 threads
        case = _kernel_case(generator, nt=7, ni=9, width=12, regions=10, dim=256, dtype=dtype, packed=False,
                            mode=mode, k=8)
        text, t_off, t_len, images, v_off, v_len, candidates, text_pad, image_pad = case
        scores, argmax, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, candidates, 3, False,
                                                     text_pad, image_pad, "cpu", True, True)
        grad = torch.randn(scores.shape, generator=generator, dtype=scores.dtype)
        results = []
        for threads in (1, 2, 3, 5):
            grad_text, grad_images = torch.full_like(text, 7.0), torch.full_like(images, 7.0)  # overwritten
            _C.score_backward(grad.numpy(), text.numpy(), t_off.numpy(), t_len.numpy(), images.numpy(),
                              v_off.numpy(), v_len.numpy(), None if candidates is None else candidates.numpy(),
                              str(dtype)[6:], 3, False, text_pad, image_pad, argmax.numpy(), region_argmax.numpy(),
                              grad_text.numpy(), grad_images.numpy(), num_threads=threads)
            results.append((grad_text.numpy().tobytes(), grad_images.numpy().tobytes()))
        assert all(r == results[0] for r in results), mode


def test_cpu_backward_overlapping_rows_accumulate():
    """Two captions sharing rows (allowed by the kernel contract): contributions add up."""
    generator = torch.Generator().manual_seed(4)
    text, images = torch.randn(6, 16, generator=generator), torch.randn(8, 16, generator=generator)
    t_off, t_len = torch.tensor([0, 2, 2]), torch.tensor([4, 4, 3], dtype=torch.int32)
    v_off, v_len = torch.tensor([0, 3]), torch.tensor([5, 5], dtype=torch.int32)
    for aggregation in range(6):
        scores, argmax, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, None, aggregation,
                                                     False, 4, 5, "cpu", True, True)
        grad = torch.randn(scores.shape, generator=generator)
        got = alignment_op.cpu_backward(grad, text, t_off, t_len, images, v_off, v_len, None, argmax, region_argmax,
                                        aggregation, False, 4, 5)
        expected = alignment_op.sparse_backward(grad, text, t_off, t_len, images, v_off, v_len, None, argmax,
                                                region_argmax, aggregation, False, 4, 5, "cpu")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_backward_validation_errors():
    text, images = np.zeros((4, 8), np.float32), np.zeros((6, 8), np.float32)
    base = dict(grad=np.ones((2, 2), np.float32), text=text, text_offsets=np.array([0, 2]),
                text_lengths=np.array([2, 2], np.int32), images=images, image_offsets=np.array([0, 3]),
                image_lengths=np.array([3, 3], np.int32), candidates=None, dtype="float32", aggregation=3,
                zero_padding=False, text_pad=2, image_pad=3, argmax=np.zeros((2, 2, 2), np.int32),
                region_argmax=np.zeros((2, 2, 3), np.int32), grad_text=np.zeros((4, 8), np.float32),
                grad_images=np.zeros((6, 8), np.float32))
    _C.score_backward(**base)
    bad = [
        dict(grad=np.ones((2, 3), np.float32)),
        dict(grad=np.ones((2, 2), np.float64)),
        dict(argmax=None),
        dict(region_argmax=None),
        dict(region_argmax=np.zeros((2, 2, 2), np.int32)),
        dict(grad_text=np.zeros((4, 7), np.float32)),
        dict(grad_images=np.zeros((6, 8), np.float64)),
        dict(grad_images=np.zeros((6, 16), np.float32)[:, ::2]),
        dict(candidates=np.array([[0, 2], [1, 1]], np.int64)),
        dict(text_lengths=np.array([3, 2], np.int32)),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            _C.score_backward(**{**base, **kwargs})


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("aggregation", ["MrSw", "MwSr", "mean"])
def test_double_backward_raises_not_implemented(generator, aggregation, dtype):
    text = torch.randn(2, 3, 8, generator=generator, dtype=dtype, requires_grad=True)
    images = torch.randn(3, 4, 8, generator=generator, dtype=dtype, requires_grad=True)
    packed = torch.randn(5, 8, generator=generator, dtype=dtype, requires_grad=True)
    cases = (
        (text, lambda: aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu")),
        (packed, lambda: aladin_fast.paired_scores(packed, images[:2], aggregation=aggregation, backend="cpu",
                                                   text_cu_seqlens=torch.tensor([0, 2, 5]))),
    )
    for leaf, scores in cases:
        grad_leaf, = torch.autograd.grad(scores().sum(), leaf, create_graph=True)  # first order works
        with pytest.raises(NotImplementedError, match="double backward"):
            grad_leaf.pow(2).sum().backward()
    if dtype == torch.float64:  # gradgradcheck reports it the same way
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.gradgradcheck(
                lambda t: aladin_fast.alignment_scores(t, images.detach(), aggregation=aggregation, backend="cpu"),
                (text,))


def test_gradients_through_integer_inputs_are_refused(generator):
    text = torch.randn(2, 3, 8, generator=generator, requires_grad=True)
    images = torch.randn(3, 4, 8, generator=generator)
    lengths = torch.tensor([3, 1])
    scores = aladin_fast.alignment_scores(text, images, lengths, backend="cpu")
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(scores.sum(), [lengths])
    with pytest.raises(RuntimeError, match="floating point"):
        torch.tensor([3, 1]).requires_grad_(True)
    float_lengths = torch.tensor([3.0, 1.0], requires_grad=True)  # lengths are indices, never differentiable
    with pytest.raises(TypeError, match="text_lengths must have an integer dtype"):
        aladin_fast.alignment_scores(text, images, float_lengths, backend="cpu")
    candidates = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    with pytest.raises(TypeError, match="candidates must have an integer dtype"):
        aladin_fast.rerank_scores(text, images, candidates, backend="cpu")
    # packed inputs: cu_seqlens are indices too
    packed = torch.randn(4, 8, generator=generator, requires_grad=True)
    cu_seqlens = torch.tensor([0, 3, 4])
    scores = aladin_fast.alignment_scores(packed, images, backend="cpu", text_cu_seqlens=cu_seqlens)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(scores.sum(), [cu_seqlens])
    with pytest.raises(TypeError, match="text_cu_seqlens must have an integer dtype"):
        aladin_fast.alignment_scores(packed, images, backend="cpu",
                                     text_cu_seqlens=torch.tensor([0.0, 3.0, 4.0], requires_grad=True))
    # integer features cannot carry gradients and are refused with the accepted dtypes named
    with pytest.raises(TypeError, match=r"text must have dtype in \(float32, float16, bfloat16, float64\)"):
        aladin_fast.alignment_scores(text.detach().long(), images, backend="cpu")


@pytest.mark.parametrize("aggregation", ["MrSw", "symm", "mean"])
def test_non_contiguous_upstream_gradients(generator, aggregation):
    text0 = torch.randn(3, 5, 16, generator=generator)
    images0 = torch.randn(4, 6, 16, generator=generator)
    upstream = torch.randn(4, 3, generator=generator)

    def grads(backend, dtype, make_loss):
        text, images = _leaf(text0, dtype), _leaf(images0, dtype)
        make_loss(aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend)).backward()
        return text.grad.double(), images.grad.double()

    losses = {
        "transposed": lambda scores: (scores.t() * upstream.to(scores.dtype)).sum(),  # grad = upstream.t()
        "expanded": lambda scores: scores.sum(),  # grad is a stride-0 expand of a scalar
    }
    for name, loss in losses.items():
        expected = grads("reference", torch.float64, loss)
        got = grads("cpu", torch.float32, loss)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # an explicitly strided grad_outputs tensor
    text, images = _leaf(text0, torch.float32), _leaf(images0, torch.float32)
    scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu")
    strided = torch.randn(3, 8, generator=generator)[:, ::2]
    assert not strided.is_contiguous()
    got = torch.autograd.grad(scores, (text, images), grad_outputs=strided)
    expected = torch.autograd.grad(
        aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu"), (text, images),
        grad_outputs=strided.contiguous())
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("aggregation", ["MrAVGw", "MwSr", "sum"])
def test_non_contiguous_upstream_gradients_rerank_paired_packed(generator, aggregation, dtype):
    """Strided grad_outputs give exactly the gradients of their contiguous copy, for every call form."""
    text = torch.randn(3, 5, 16, generator=generator, dtype=dtype, requires_grad=True)
    images = torch.randn(4, 6, 16, generator=generator, dtype=dtype, requires_grad=True)
    packed = torch.randn(9, 16, generator=generator, dtype=dtype, requires_grad=True)
    candidates = torch.tensor([[1, 3], [0, 0], [2, 1]])
    options = dict(aggregation=aggregation, backend="cpu")
    cases = {
        "rerank": (lambda: aladin_fast.rerank_scores(text, images, candidates, **options), (text, images)),
        "paired": (lambda: aladin_fast.paired_scores(text, images[:3], **options), (text, images)),
        "packed": (lambda: aladin_fast.alignment_scores(packed, images, text_cu_seqlens=torch.tensor([0, 5, 5, 9]),
                                                        **options), (packed, images)),
    }
    for name, (call, leaves) in cases.items():
        shape = call().shape
        strided = torch.randn(*shape[:-1], 3 * shape[-1], generator=generator, dtype=dtype)[..., ::3]
        assert not strided.is_contiguous()
        got = torch.autograd.grad(call(), leaves, grad_outputs=strided)
        expected = torch.autograd.grad(call(), leaves, grad_outputs=strided.contiguous())
        for g, e in zip(got, expected):
            assert g.dtype == dtype and torch.equal(g, e), name


def test_missing_argmax_is_recomputed_in_backward(generator):
    """score_tokens called without the argmax still differentiates (the backward reruns the forward)."""
    text = torch.randn(9, 8, generator=generator, requires_grad=True)
    images = torch.randn(12, 8, generator=generator, requires_grad=True)
    t_off, t_len = torch.tensor([0, 5]), torch.tensor([5, 4], dtype=torch.int32)
    v_off, v_len = torch.tensor([0, 4, 8]), torch.tensor([4, 4, 3], dtype=torch.int32)
    for aggregation in (0, 2, 3):
        results = []
        for wanted in (False, True):
            text.grad = images.grad = None
            scores, _, _ = score_tokens(text, t_off, t_len, images, v_off, v_len, None, aggregation, False, 5, 4,
                                        "cpu", wanted, wanted)
            scores.sum().backward()
            results.append((text.grad.clone(), images.grad.clone()))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


TRITON_GRADIENT_SCRIPT = """
import torch, aladin_fast
g = torch.Generator().manual_seed(0)
for aggregation, padding in (("MrSw", "zero"), ("MwSr", "neg_inf"), ("symm", "zero"), ("mean", "neg_inf")):
    for mode in ("all", "rerank", "paired"):
        t = torch.randn(3, 5, 16, generator=g).double()
        v = torch.randn(3, 6, 16, generator=g).double()
        tl, vl = torch.tensor([5, 2, 0]), torch.tensor([6, 1, 4])
        cand = torch.tensor([[0, 1], [2, 2], [1, 0]])
        grads = []
        for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
            tt, vv = t.to(dtype).detach().requires_grad_(), v.to(dtype).detach().requires_grad_()
            if mode == "all":
                s = aladin_fast.alignment_scores(tt, vv, tl, vl, aggregation, padding, backend=backend)
            elif mode == "rerank":
                s = aladin_fast.rerank_scores(tt, vv, cand, tl, vl, aggregation, padding, backend=backend)
            else:
                s = aladin_fast.paired_scores(tt, vv, tl, vl, aggregation, padding, backend=backend)
            (s * torch.arange(s.numel()).view(s.shape).to(dtype)).sum().backward()
            grads.append((tt.grad.double(), vv.grad.double()))
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
print("triton gradients ok")
"""


def test_triton_backend_gradients_on_interpreter():
    """The Triton backend's backward (PyTorch sparse path) vs the float64 reference, in a TRITON_INTERPRET=1 child."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_GRADIENT_SCRIPT], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "triton gradients ok" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["float32", "bfloat16", "float64"])
def test_cpu_backward_bits_do_not_depend_on_the_gather_window_or_block(dtype, monkeypatch):
    """The backward gathers each gradient row's terms over a window of pairs and adds them with the row held in
    registers (axpy_many): the same fma sequence as adding them one by one, so every window / block size gives
    the same bits (and the float64 path the same order)."""
    generator = torch.Generator().manual_seed(11)
    for mode in ("all", "rerank"):
        case = _kernel_case(generator, nt=6, ni=9, width=12, regions=10, dim=75, dtype=dtype, packed=mode == "all",
                            mode=mode, k=13)
        text, t_off, t_len, images, v_off, v_len, candidates, text_pad, image_pad = case
        for aggregation in range(6):
            scores, argmax, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, candidates,
                                                         aggregation, aggregation == 1, text_pad, image_pad, "cpu",
                                                         True, True)
            grad = torch.randn(scores.shape, generator=generator, dtype=scores.dtype)
            grad[torch.rand(scores.shape, generator=generator) < 0.3] = 0  # skipped pairs
            results = set()
            for window, block in ((1, 1), (2, 16), (3, 5), (8, 0), (64, 2), (0, 0)):
                monkeypatch.setenv("ALADIN_FAST_BWD_WINDOW", str(window))
                monkeypatch.setenv("ALADIN_FAST_BWD_BLOCK", str(block))
                grad_text, grad_images = torch.full_like(text, 7.0), torch.full_like(images, 7.0)  # overwritten
                as_float = torch.float32 if dtype == torch.bfloat16 else dtype
                grad_text, grad_images = grad_text.to(as_float), grad_images.to(as_float)
                kind = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}[dtype]
                raw = (lambda x: x.view(torch.int16).numpy()) if dtype == torch.bfloat16 else (lambda x: x.numpy())
                _C.score_backward(grad.numpy(), raw(text), t_off.numpy(), t_len.numpy(), raw(images),
                                  v_off.numpy(), v_len.numpy(), None if candidates is None else candidates.numpy(),
                                  kind, aggregation, aggregation == 1, text_pad, image_pad, argmax.numpy(),
                                  region_argmax.numpy(), grad_text.numpy(), grad_images.numpy())
                results.add((grad_text.numpy().tobytes(), grad_images.numpy().tobytes()))
            assert len(results) == 1, (mode, aggregation)
