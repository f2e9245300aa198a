"""Property-based tests: random shapes, lengths, aggregations, paddings, dtypes and modes vs the float64 reference.

Default run: a derandomized sample (reproducible in CI). ``pytest -m slow`` runs
the 1,000+-example profile; failing examples are kept in tests/.hypothesis-db
(committed) so a found bug is replayed first on every later run.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

import aladin_fast
from aladin_fast import _C, reference
from cases import AGGREGATIONS, PADDINGS, fp32_tolerance

DATABASE = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis-db"))
COMMON = dict(deadline=None, database=DATABASE, suppress_health_check=[HealthCheck.too_slow])
DEFAULT = settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=1200, **COMMON)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def problems(draw):
    nt = draw(st.integers(0, 5))
    ni = draw(st.integers(0, 6))
    words = draw(st.integers(0, 40))
    regions = draw(st.integers(0, 40))
    dim = draw(st.sampled_from([1, 2, 3, 8, 17, 64, 130]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(nt, words, dim, generator=generator, dtype=torch.float64), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(ni, regions, dim, generator=generator, dtype=torch.float64), dim=-1)
    text_lengths = torch.tensor(draw(st.lists(st.integers(0, words), min_size=nt, max_size=nt)), dtype=torch.long)
    image_lengths = torch.tensor(draw(st.lists(st.integers(0, regions), min_size=ni, max_size=ni)), dtype=torch.long)
    mode = draw(st.sampled_from(["all_pairs", "rerank", "paired"]))
    candidates = None
    if mode == "rerank":
        k = draw(st.integers(0, 8))
        candidates = torch.randint(0, max(ni, 1), (nt, k if ni else 0), generator=generator)
    if mode == "paired":
        images, image_lengths = images[:nt], image_lengths[:nt]
        if images.shape[0] < nt:
            mode = "all_pairs"
    return dict(
        text=text, images=images, text_lengths=text_lengths, image_lengths=image_lengths, mode=mode,
        candidates=candidates, aggregation=draw(st.sampled_from(AGGREGATIONS)), padding=draw(st.sampled_from(PADDINGS)),
        dtype=draw(st.sampled_from(sorted(DTYPES))), packed=draw(st.booleans()),
    )


def _call(module, problem, text, images, **extra):
    kwargs = dict(aggregation=problem["aggregation"], padding=problem["padding"], **extra)
    if problem["packed"]:
        t_len, v_len = problem["text_lengths"], problem["image_lengths"]
        kwargs.update(text_cu_seqlens=torch.nn.functional.pad(t_len.cumsum(0), (1, 0)),
                      image_cu_seqlens=torch.nn.functional.pad(v_len.cumsum(0), (1, 0)))
        text = torch.cat([text[i, : t_len[i]] for i in range(text.shape[0])]) if text.shape[0] else text.new_zeros(0, text.shape[-1])
        images = torch.cat([images[j, : v_len[j]] for j in range(images.shape[0])]) if images.shape[0] else images.new_zeros(0, images.shape[-1])
    else:
        kwargs.update(text_lengths=problem["text_lengths"], image_lengths=problem["image_lengths"])
    if problem["mode"] == "all_pairs":
        return module.alignment_scores(text, images, **kwargs)
    if problem["mode"] == "paired":
        return module.paired_scores(text, images, **kwargs)
    return module.rerank_scores(text, images, problem["candidates"], **kwargs)


def _check(problem, backend):
    dtype = DTYPES[problem["dtype"]]
    text, images = problem["text"].to(dtype), problem["images"].to(dtype)
    expected = _call(reference, problem, text.double(), images.double())
    got = _call(aladin_fast, problem, text, images, backend=backend)
    assert got.shape == expected.shape and got.dtype == torch.float32
    words, regions, dim = text.shape[1], images.shape[1], text.shape[2]
    torch.testing.assert_close(got.double(), expected, atol=fp32_tolerance(dim, words, regions), rtol=0)


@DEFAULT
@given(problem=problems())
def test_cpu_kernel_matches_reference(problem):
    _check(problem, "cpu")


@pytest.mark.slow
@THOROUGH
@given(problem=problems())
def test_cpu_kernel_matches_reference_thorough(problem):
    _check(problem, "cpu")


# --------------------------------------------------------------------------- exact on a grid: forward, argmax, backward
#
# Token values are multiples of 1/8 in [-2, 2] and the upstream gradient multiples of 1/4: every product and every
# fp32 sum of them is exact, in any order. So the kernel's fp32 accumulation and the float64 oracle compute the same
# similarities, ties included (they are frequent on the grid): the winners -- first index on ties -- must be the very
# same, and scores and gradients equal to the last rounding of a division (mean, MrAVGw) or of the output dtype.

CPU_ISAS = [isa for isa in ("avx512", "avx2", "scalar") if isa in _C.available_isas()]


@st.composite
def grid_problems(draw):
    problem = draw(problems())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def grid(shape, scale, limit):
        return torch.randint(-limit, limit + 1, shape, generator=generator).double() / scale

    problem["text"] = grid(problem["text"].shape, 8, 16)
    problem["images"] = grid(problem["images"].shape, 8, 16)
    problem["grid_seed"] = draw(st.integers(0, 2**31 - 1))
    problem["isa"] = draw(st.sampled_from(CPU_ISAS))
    problem["layout"] = draw(st.sampled_from(["auto", "words", "dot"]))
    problem["dtype"] = draw(st.sampled_from(sorted(DTYPES)))
    return problem


def _largest(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def _grid_check(problem, backend="cpu", env=None, bf16_ulps=0.5):
    """``backend`` vs the float64 reference on grid values, with ``env`` (default: the drawn ISA / CPU layout)
    set around the backend's forward and backward; bf16 gradients within ``bf16_ulps`` of their largest value
    (0.5: rounded to nearest once)."""
    dtype = DTYPES[problem["dtype"]]
    text0, images0 = problem["text"], problem["images"]
    argmax_kind = problem["aggregation"] in ("MrSw", "MrAVGw", "symm")

    def run(module, text, images, **extra):
        text, images = text.detach().requires_grad_(), images.detach().requires_grad_()
        if argmax_kind:
            scores, argmax = _call(module, problem, text, images, return_argmax=True, **extra)
        else:
            scores, argmax = _call(module, problem, text, images, **extra), None
        upstream = torch.randint(-8, 9, scores.shape, generator=torch.Generator().manual_seed(problem["grid_seed"]))
        grads = torch.autograd.grad((scores * (upstream.to(scores.dtype) / 4)).sum(), (text, images),
                                    allow_unused=True) if scores.numel() else (None, None)
        return scores, argmax, grads, (text, images)

    expected, expected_argmax, (ref_text, ref_images), _ = run(reference, text0, images0)
    if env is None:
        env = {"ALADIN_FAST_ISA": problem["isa"], "ALADIN_FAST_CPU_LAYOUT": problem["layout"]}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        got, got_argmax, (got_text, got_images), _ = run(aladin_fast, text0.to(dtype), images0.to(dtype),
                                                         backend=backend)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    expected = expected.detach()
    torch.testing.assert_close(got.detach().double(), expected, atol=1e-6 * max(_largest(expected), 1.0), rtol=0)
    if argmax_kind:
        assert torch.equal(got_argmax.long(), expected_argmax.long()), "winners (first index on ties) differ"
    output_eps = {torch.float32: 1e-6, torch.bfloat16: bf16_ulps * 2.0 ** -7, torch.float16: 2.0 ** -11}[dtype]
    for name, got_grad, ref_grad in (("text", got_text, ref_text), ("images", got_images, ref_images)):
        if ref_grad is None:
            assert got_grad is None or not got_grad.any(), f"d {name}: gradient where the oracle has none"
            continue
        assert got_grad is not None and got_grad.dtype == dtype and got_grad.shape == ref_grad.shape, name
        # padding rows (garbage values on the grid) get exactly zero in both
        tolerance = output_eps * _largest(ref_grad) + 1e-6
        torch.testing.assert_close(got_grad.double(), ref_grad, atol=tolerance, rtol=0, msg=lambda m: f"d {name}: {m}")


@DEFAULT
@given(problem=grid_problems())
def test_cpu_kernel_exact_on_a_grid_forward_argmax_backward(problem):
    _grid_check(problem)


@pytest.mark.slow
@THOROUGH
@given(problem=grid_problems())
def test_cpu_kernel_exact_on_a_grid_thorough(problem):
    _grid_check(problem)
