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
from aladin_fast import reference
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
