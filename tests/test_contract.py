"""The documented contract, claim by claim, as executable checks.

Sources: README.md ("The op"), docs/kernel_contract.md ("Semantics", "argmax") and the docstrings of
aladin_fast.nn, aladin_fast.losses and aladin_fast.models. Names and signatures are checked by
tests/test_docs_consistency.py; claims already pinned elsewhere are not repeated here (NaN / inf classes:
tests/test_nonfinite.py; backends vs the float64 reference: tests/test_alignment.py; loss formulas vs float64
oracles: tests/test_loss_properties.py; model padding / batch invariance: tests/test_model_properties.py).

The core is one hand-computed table (exact dyadic values, so fp16 / bf16 hold them exactly) that exercises
every rule of the README at once: maxes over valid tokens, ties (first index), the padding value 0 winning in
zero mode, ``MrAVGw = MrSw / n_w``, ``mean`` over ``n_w * n_r`` (neg_inf) or ``W_pad * R_pad`` (zero), empty
captions / images scoring 0, and argmax ``-1`` / first padded region. It runs on "cpu" and "reference" here and
on "triton" in a ``TRITON_INTERPRET=1`` child process (the project's convention, tests/triton_modes.py).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import aladin_fast
from aladin_fast import losses
from aladin_fast.ops.backends import triton_interpreter_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = triton_interpreter_enabled()  # as tests/test_alignment.py: triton runs here only in a child
KERNELS = ["cpu", "reference"] + (["triton"] if INTERPRETED else [])
AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")

# ------------------------------------------------------------------------------------------ the hand table
# D = 2. Caption A: W_pad = 3, n_w = 2, words (1, 0), (0, 1). Caption B: n_w = 1, word (-1, -1).
# Image X: R_pad = 4, n_r = 2, regions (.5, -.25), (-.25, .5). Image Y: n_r = 0 (empty).
#   s(A, X) = [[.5, -.25], [-.25, .5]]     s(B, X) = [[-.25, -.25]] (a tie, every valid value negative)
# Padded positions hold large garbage: they must never be read as tokens.
TEXT = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]],
                     [[-1.0, -1.0], [5.0, 5.0], [-9.0, 3.0]]])
IMAGES = torch.tensor([[[0.5, -0.25], [-0.25, 0.5], [8.0, 8.0], [8.0, -8.0]],
                       [[6.0, 6.0], [6.0, 6.0], [6.0, 6.0], [6.0, 6.0]]])
TEXT_LENGTHS, IMAGE_LENGTHS = torch.tensor([2, 1]), torch.tensor([2, 0])
W_PAD, R_PAD = 3, 4
EXPECTED = {  # (padding, aggregation) -> [[A-X, A-Y], [B-X, B-Y]]
    ("neg_inf", "MrSw"): [[1.0, 0.0], [-0.25, 0.0]],
    ("neg_inf", "MrAVGw"): [[0.5, 0.0], [-0.25, 0.0]],
    ("neg_inf", "MwSr"): [[1.0, 0.0], [-0.5, 0.0]],
    ("neg_inf", "symm"): [[2.0, 0.0], [-0.75, 0.0]],
    ("neg_inf", "sum"): [[0.5, 0.0], [-0.5, 0.0]],
    ("neg_inf", "mean"): [[0.5 / 4, 0.0], [-0.5 / 2, 0.0]],  # sum / (n_w * n_r), 0 when either is 0
    # zero mode: the padding value 0 beats B's negative maxes (rows: n_r < R_pad; columns: n_w < W_pad)
    ("zero", "MrSw"): [[1.0, 0.0], [0.0, 0.0]],
    ("zero", "MrAVGw"): [[0.5, 0.0], [0.0, 0.0]],  # MrSw / n_w = 1 / 2, not 1 / W_pad
    ("zero", "MwSr"): [[1.0, 0.0], [0.0, 0.0]],
    ("zero", "symm"): [[2.0, 0.0], [0.0, 0.0]],
    ("zero", "sum"): [[0.5, 0.0], [-0.5, 0.0]],  # sums still run over valid tokens only
    ("zero", "mean"): [[0.5 / 12, 0.0], [-0.5 / 12, 0.0]],  # divided by W_pad * R_pad = 12
}
EXPECTED_ARGMAX = {  # [caption][image][word]
    # first index wins B's tie; -1 for padded words and for the empty image
    "neg_inf": [[[0, 1, -1], [-1, -1, -1]], [[0, -1, -1], [-1, -1, -1]]],
    # zero mode: padding wins B's row -> n_r = 2, the first padded region; empty image Y -> 0 (= n_r)
    "zero": [[[0, 1, -1], [0, 0, -1]], [[2, -1, -1], [0, -1, -1]]],
}
MODES = ("all_pairs", "rerank", "paired", "packed")


def _score(mode: str, backend: str, dtype, aggregation: str, padding: str):
    """Scores [2, 2] and argmax [2, 2, W_PAD] of the table through one public entry point."""
    text, images = TEXT.to(dtype), IMAGES.to(dtype)
    options = dict(aggregation=aggregation, padding=padding, backend=backend, return_argmax=True)
    if mode == "all_pairs":
        return aladin_fast.alignment_scores(text, images, TEXT_LENGTHS, IMAGE_LENGTHS, **options)
    if mode == "rerank":  # candidates reversed and repeated: each caption's own ids
        candidates = torch.tensor([[1, 0, 1], [1, 1, 0]])
        scores, argmax = aladin_fast.rerank_scores(text, images, candidates, TEXT_LENGTHS, IMAGE_LENGTHS, **options)
        order = torch.tensor([[1, 0], [2, 0]])  # back to image order (0, 1) per caption
        return scores.gather(1, order), argmax.gather(1, order[..., None].expand(-1, -1, W_PAD))
    if mode == "paired":  # (A, X), (B, Y) then (A, Y), (B, X)
        first = aladin_fast.paired_scores(text, images, TEXT_LENGTHS, IMAGE_LENGTHS, **options)
        second = aladin_fast.paired_scores(text, images.flip(0), TEXT_LENGTHS, IMAGE_LENGTHS.flip(0), **options)
        scores = torch.stack([torch.stack([first[0][0], second[0][0]]), torch.stack([second[0][1], first[0][1]])])
        argmax = torch.stack([torch.stack([first[1][0], second[1][0]]), torch.stack([second[1][1], first[1][1]])])
        return scores, argmax
    # packed: only the valid rows; max_text_len / max_image_len give the padded sizes of the table
    packed_text = torch.cat([text[i, :n] for i, n in enumerate(TEXT_LENGTHS.tolist())])
    packed_images = torch.cat([images[j, :n] for j, n in enumerate(IMAGE_LENGTHS.tolist())])
    cumulative = lambda lengths: torch.nn.functional.pad(lengths.cumsum(0), (1, 0))  # noqa: E731
    return aladin_fast.alignment_scores(
        packed_text, packed_images, text_cu_seqlens=cumulative(TEXT_LENGTHS),
        image_cu_seqlens=cumulative(IMAGE_LENGTHS), max_text_len=W_PAD, max_image_len=R_PAD, **options)


def _check_table(mode: str, backend: str, dtype) -> None:
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for padding in ("neg_inf", "zero"):
        for aggregation in AGGREGATIONS:
            scores, argmax = _score(mode, backend, dtype, aggregation, padding)
            expected = torch.tensor(EXPECTED[padding, aggregation], dtype=torch.float64)
            where = f"{mode} {backend} {dtype} {padding} {aggregation}"
            assert scores.dtype == wide, where  # float32 scores; float64 throughout for float64
            assert argmax.dtype == torch.int32 and argmax.shape == (2, 2, W_PAD), where
            assert not scores.isnan().any(), where  # empty rows score 0, never NaN
            torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=0, msg=lambda m: f"{where}: {m}")
            # argmax is computed for every aggregation when requested, the same winners
            assert argmax.tolist() == EXPECTED_ARGMAX[padding], where


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "triton"])
def test_readme_rules_hand_computed(backend, dtype, mode):
    _check_table(mode, backend, dtype)


# --------------------------------------------------------------------------- triton (interpreter, child)
@pytest.mark.skipif(not INTERPRETED, reason="triton runs on CPU only under TRITON_INTERPRET=1 (child process)")
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "all_pairs"), (torch.float32, "packed"),
                                        (torch.bfloat16, "rerank")], ids=str)
def test_triton_readme_rules_hand_computed(dtype, mode):
    _check_table(mode, "triton", dtype)


@pytest.mark.skipif(not INTERPRETED, reason="triton runs on CPU only under TRITON_INTERPRET=1 (child process)")
def test_triton_nan_expanded_inputs_and_float64():
    """A NaN in a valid token makes exactly the pairs that use it NaN (a NaN in padding or in a token whose
    partner is empty changes nothing); stride-0 (expanded) inputs work; float64 is a TypeError naming the
    backends that take it (README: float64 with "reference" or "cpu")."""
    text, images = TEXT.clone(), IMAGES.clone()
    text[0, 0, 1] = float("nan")  # valid word of caption A: poisons (A, X); (A, Y) has an empty partner
    text[1, 2, 0] = float("nan")  # padding of caption B: never read
    scores = aladin_fast.alignment_scores(text, images, TEXT_LENGTHS, IMAGE_LENGTHS, backend="triton")
    assert scores.isnan().tolist() == [[True, False], [False, False]]
    assert scores[1, 0].item() == -0.25 and scores[0, 1].item() == 0.0
    expanded = IMAGES[:1].expand(3, R_PAD, 2)
    got = aladin_fast.alignment_scores(TEXT, expanded, TEXT_LENGTHS, torch.tensor([2, 2, 2]), backend="triton")
    assert got.tolist() == [[1.0] * 3, [-0.25] * 3]
    with pytest.raises(TypeError, match=r"float64.*backend='cpu'.*backend='reference'"):
        aladin_fast.alignment_scores(TEXT.double(), IMAGES.double(), backend="triton")


@pytest.mark.skipif(not INTERPRETED, reason="triton runs on CPU only under TRITON_INTERPRET=1 (child process)")
def test_triton_export_with_dynamic_batch_sizes():
    """torch.export of a triton-backend call with dynamic caption / image counts: the op layer's batch counts were
    int()s, which specialised them to the example sizes (Constraints violated). Triton's pair limits need a max."""
    from torch.export import Dim, export

    class Score(torch.nn.Module):
        def forward(self, text, images, text_lengths, image_lengths):
            return aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend="triton")

    generator = torch.Generator().manual_seed(0)
    captions, images = Dim("captions", min=2, max=4096), Dim("images", min=2, max=4096)
    example = (torch.randn(3, 4, 8, generator=generator), torch.randn(5, 6, 8, generator=generator),
               torch.tensor([4, 2, 1]), torch.tensor([6, 1, 3, 2, 6]))
    program = export(Score(), example, dynamic_shapes=({0: captions}, {0: images}, {0: captions}, {0: images}))
    text, regions = torch.randn(4, 4, 8, generator=generator), torch.randn(7, 6, 8, generator=generator)
    text_lengths, image_lengths = torch.tensor([4, 2, 0, 3]), torch.tensor([6, 1, 3, 2, 6, 5, 0])
    got = program.module()(text, regions, text_lengths, image_lengths)
    expected = aladin_fast.alignment_scores(text.double(), regions.double(), text_lengths, image_lengths,
                                            backend="reference")
    assert got.shape == (4, 7)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(INTERPRETED, reason="triton is interpreted in this process: the triton tests run in-process")
def test_triton_claims_in_interpreter_child():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
               "--rootdir", ROOT, "-k", "triton and not child"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"\b5 passed", output), output[-3000:]  # three table cases, NaN / expanded / float64, export


# ------------------------------------------------------------------------------------------ op claims
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_throughout(backend):
    """README: float64 with backend "reference" or "cpu", in float64 throughout (scores and gradients): a
    difference of 1e-12 survives, which any float32 step would round away."""
    text = torch.tensor([[[1.0 + 1e-12, 0.0], [0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0 + 2e-12]]], dtype=torch.float64, requires_grad=True)
    scores = aladin_fast.alignment_scores(text, images, backend=backend)
    assert scores.dtype == torch.float64
    assert scores.item() - 1.5 == pytest.approx(1e-12 + 1e-12, abs=1e-15)  # 1 + 1e-12  +  0.5 (1 + 2e-12)
    d_text, d_images = torch.autograd.grad(scores.sum(), (text, images))
    assert d_text.dtype == d_images.dtype == torch.float64
    assert d_text[0, 1, 1].item() - 1.0 == pytest.approx(2e-12, abs=1e-15)  # word 1's winner is region 1


def test_unavailable_backend_raises_runtime_error_and_auto_falls_back(monkeypatch):
    """README: "auto" picks ... reference ... when the extension is missing; an explicitly requested backend
    that cannot run raises RuntimeError with the reason, never a silent fallback."""
    from aladin_fast.ops import backends

    reason = "C++ extension aladin_fast._C is not built (simulated)"
    monkeypatch.setitem(backends._PROBED, "cpu", (None, reason))
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run: C\+\+ extension .*\(simulated\)"):
            aladin_fast.alignment_scores(TEXT.to(dtype), IMAGES.to(dtype), TEXT_LENGTHS, IMAGE_LENGTHS, backend="cpu")
    scores = aladin_fast.alignment_scores(TEXT, IMAGES, TEXT_LENGTHS, IMAGE_LENGTHS)  # auto -> reference
    assert scores.tolist() == EXPECTED["neg_inf", "MrSw"]
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert 'float64 inputs on `"triton"` raise `TypeError`' in readme  # not a RuntimeError: a dtype error


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stride_zero_inputs_work(backend):
    """README: non-contiguous inputs work, including expanded (stride-0) tokens, lengths and candidates."""
    images = IMAGES[:1].expand(3, R_PAD, 2)
    lengths = torch.tensor([2]).expand(3)
    got = aladin_fast.alignment_scores(TEXT, images, TEXT_LENGTHS, lengths, backend=backend)
    assert got.tolist() == [[1.0] * 3, [-0.25] * 3]
    candidates = torch.tensor([[0]]).expand(2, 4)
    got = aladin_fast.rerank_scores(TEXT, IMAGES, candidates, TEXT_LENGTHS, IMAGE_LENGTHS, backend=backend)
    assert got.tolist() == [[1.0] * 4, [-0.25] * 4]


def test_kernel_contract_pads_of_packed_inputs_are_documented():
    """docs/kernel_contract.md: W_pad / R_pad of packed inputs are max_text_len / max_image_len when given (the
    packed table case above relies on it); the contract said "max length" only."""
    contract = open(os.path.join(ROOT, "docs", "kernel_contract.md")).read()
    assert "packed: `max_text_len`, default the longest caption" in contract
    assert "packed: `max_image_len`, default the longest image" in contract


# ------------------------------------------------------------------------------------------ nn / models
def test_alignment_score_module_dtypes():
    """nn.AlignmentScore: float32 scores, float64 for float64 inputs (on "cpu" / "reference")."""
    from aladin_fast.nn import AlignmentScore

    for backend in ("auto", "cpu", "reference"):
        module = AlignmentScore(backend=backend)
        assert module(TEXT.double(), IMAGES.double(), TEXT_LENGTHS, IMAGE_LENGTHS).dtype == torch.float64
        assert module(TEXT.bfloat16(), IMAGES.bfloat16(), TEXT_LENGTHS, IMAGE_LENGTHS).dtype == torch.float32
    assert "float64 for float64 inputs" in AlignmentScore.__doc__


@pytest.mark.parametrize("pooling,project", [("first", False), ("mean", False), ("max", False), ("mean", True),
                                             ("max", True)])
def test_pooling_head_empty_sequence_embedding(pooling, project):
    """PoolingHead / Student: unit embeddings, finite for an empty sequence; with project_tokens an empty
    sequence has nothing to pool and embeds to the zero vector (the docstring said unit norm for every row)."""
    from aladin_fast.models import PoolingHead, Student

    torch.manual_seed(0)
    head = PoolingHead(8, 6, layers=1, heads=2, dropout=0.0, pooling=pooling, project_tokens=project)
    tokens = torch.randn(3, 4, 8)
    tokens[2] = float("nan")  # all padding: never read
    norms = head(tokens, torch.tensor([4, 1, 0])).norm(dim=-1)
    torch.testing.assert_close(norms[:2], torch.ones(2))
    assert norms[2].item() == (0.0 if project else pytest.approx(1.0))
    if project:
        assert "zero vector" in PoolingHead.__doc__
        assert "zero for an empty sequence with ``project_tokens``" in Student.embed_image_tokens.__doc__
        assert "zero for an empty sequence with ``project_tokens``" in Student.embed_caption_tokens.__doc__


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_concept_alignment_loss_is_zero_without_aligned_words(garbage):
    """Docstring: 0 when no word has a region. Padding is never read, so its values cannot matter: the old
    ``(tokens.sum() + ...) * 0.0`` gave NaN for a NaN / inf in padding (0 * inf)."""
    words = torch.randn(2, 3, 4)
    regions = torch.randn(2, 2, 4)
    prototypes = torch.randn(5, 4)
    regions[:, 1] = garbage  # every image empty below: all of this is padding
    for word_lengths, region_lengths, where in ((torch.tensor([3, 2]), torch.tensor([0, 0]), regions),
                                               (torch.tensor([0, 0]), torch.tensor([2, 2]), None)):
        w = words.clone()
        if where is None:  # no words at all: garbage in the (padded) word tokens instead
            w[0, 1] = garbage
            r = regions.nan_to_num(0.0, 0.0, 0.0)
        else:
            r = regions
        w, r, p = w.requires_grad_(), r.clone().requires_grad_(), prototypes.clone().requires_grad_()
        loss = losses.concept_alignment_loss(w, word_lengths, r, region_lengths, p)
        assert loss.dtype == torch.float32 and loss.item() == 0.0
        grads = torch.autograd.grad(loss, (w, r, p))  # still in the graph: zero gradients
        assert all(not g.any() for g in grads)


@pytest.mark.parametrize("value", [0.3, float("nan"), float("inf")])
def test_context_alignment_loss_single_pair_is_zero(value):
    """Docstring: 0 for N = 1 (no negative), as hinge_loss's; a non-finite score gave NaN (``sum * 0.0``)."""
    scores = torch.tensor([[value]], requires_grad=True)
    loss = losses.context_alignment_loss(scores)
    assert loss.item() == 0.0 and losses.hinge_loss(scores).item() == 0.0
    (grad,) = torch.autograd.grad(loss, scores)
    assert grad.tolist() == [[0.0]]


@pytest.mark.parametrize("n,top_k", [(5, 1), (5, 3), (5, 4), (5, 512), (2, 7)])
def test_context_alignment_loss_all_ties(n, top_k):
    """Docstring: 2 log(1 + k) when all scores tie, k = min(top_k, N - 1) (the negatives actually kept)."""
    loss = losses.context_alignment_loss(torch.full((n, n), 0.25, dtype=torch.float64), top_k=top_k)
    assert loss.item() == pytest.approx(2 * math.log(1 + min(top_k, n - 1)), rel=1e-12)
    assert "``k = min(top_k, N - 1)``" in losses.context_alignment_loss.__doc__


def test_listnet_dtype_as_documented():
    """listnet_loss returns float32 for float32 / float16 / bfloat16 inputs and float64 when either input is
    float64 (the docstring said float32 always)."""
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    assert losses.listnet_loss(student.half(), teacher.bfloat16()).dtype == torch.float32
    assert losses.listnet_loss(student, teacher.double()).dtype == torch.float64
    assert losses.listnet_loss(student.double(), teacher.double()).dtype == torch.float64
    assert "float64 when either input is float64" in losses.listnet_loss.__doc__
