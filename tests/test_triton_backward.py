"""Triton backward kernels and the forward's region -> word argmax, vs a float64 loop oracle, in the interpreter
(the per-pair argmax kernels, the winner GEMM, the "gemm" strategy's weight matrix and its torch.mm products).

Same process arrangement as tests/test_triton_interpreter.py: in-process under
``TRITON_INTERPRET=1``, otherwise one child pytest runs this file interpreted.

The oracle follows docs/kernel_contract.md pair by pair in float64: the first
index wins ties, a winning zero pad carries no gradient. Inputs are dyadic
(k/4), so the argmax must match exactly and the gradients up to fp32 rounding
of the 1/n_w and 1/cells scales.
"""
from __future__ import annotations

import os

import pytest
import torch
from test_triton_interpreter import AGGREGATIONS, make_case
from triton_modes import load_kernels, run_suite_in_child, thin, triton_interpreted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_PROCESS = triton_interpreted()
kernels = load_kernels("_aladin_fast_kernels_interpreted", interpret=True) if IN_PROCESS else None
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton is compiled in this process: the suite runs in a "
                                "TRITON_INTERPRET=1 subprocess (test_backward_suite_in_subprocess)")
pytestmark = pytest.mark.interpreter

SMALL_BLOCKS = {"BLOCK_W": 16, "BLOCK_R": 16, "BLOCK_D": 16}


@pytest.mark.skipif(IN_PROCESS, reason="triton is interpreted in this process: the suite runs in-process")
def test_backward_suite_in_subprocess():
    run_suite_in_child(__file__, interpret=True)


# --------------------------------------------------------------------------- oracle


def _first_max_or_pad(s: torch.Tensor, n_other: int, pad_other: int, zero: bool):
    """Per row of s [n, n_other]: first index of the max, or -1 (empty) / n_other (zero pad wins)."""
    n = s.shape[0]
    if n_other == 0:
        return torch.full((n, ), n_other if (zero and n_other < pad_other) else -1, dtype=torch.int64)
    top = s.max(dim=1, keepdim=True).values
    index = torch.arange(n_other)
    first = torch.where(s == top, index, n_other).min(dim=1).values
    if zero and n_other < pad_other:
        first = torch.where(top[:, 0] < 0.0, torch.full_like(first, n_other), first)
    return first


def oracle_region_argmax(case, candidates, zero):
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    nt = t_off.shape[0]
    candidates = torch.arange(i_off.shape[0]).expand(nt, -1) if candidates is None else candidates
    out = torch.full((nt, candidates.shape[1], r_pad), -1, dtype=torch.int64)
    for i in range(nt):
        t = text[t_off[i]:t_off[i] + t_len[i]].double()
        for kk in range(candidates.shape[1]):
            j = int(candidates[i, kk])
            v = images[i_off[j]:i_off[j] + i_len[j]].double()
            out[i, kk, :v.shape[0]] = _first_max_or_pad(v @ t.T, t.shape[0], w_pad, zero)
    return out


def oracle_gradients(case, candidates, aggregation, zero, grad):
    """(d text, d images) float64 for upstream ``grad [Nt, K]`` (loops over pairs)."""
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    nt = t_off.shape[0]
    candidates = torch.arange(i_off.shape[0]).expand(nt, -1) if candidates is None else candidates
    text64, images64 = text.double(), images.double()
    d_text, d_images = torch.zeros_like(text64), torch.zeros_like(images64)
    for i in range(nt):
        t_rows = slice(int(t_off[i]), int(t_off[i] + t_len[i]))
        t = text64[t_rows]
        n_w = t.shape[0]
        for kk in range(candidates.shape[1]):
            j = int(candidates[i, kk])
            v_rows = slice(int(i_off[j]), int(i_off[j] + i_len[j]))
            v = images64[v_rows]
            n_r = v.shape[0]
            c = float(grad[i, kk])
            if c == 0.0 or n_w == 0 or n_r == 0:
                continue
            dt, dv = torch.zeros_like(t), torch.zeros_like(v)
            if aggregation in (0, 1, 3):
                scale = c / n_w if aggregation == 1 else c
                for w, r in enumerate(_first_max_or_pad(t @ v.T, n_r, r_pad, zero).tolist()):
                    if 0 <= r < n_r:
                        dt[w] += scale * v[r]
                        dv[r] += scale * t[w]
            if aggregation in (2, 3):
                for r, w in enumerate(_first_max_or_pad(v @ t.T, n_w, w_pad, zero).tolist()):
                    if 0 <= w < n_w:
                        dt[w] += c * v[r]
                        dv[r] += c * t[w]
            if aggregation in (4, 5):
                cells = (w_pad * r_pad if zero else n_w * n_r) if aggregation == 5 else 1
                dt += (c / cells) * v.sum(0)
                dv += (c / cells) * t.sum(0)
            d_text[t_rows] += dt
            d_images[v_rows] += dv
    return d_text, d_images


# --------------------------------------------------------------------------- kernel runs


def forward(case, candidates, aggregation, zero, config=None):
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    nt = t_off.shape[0]
    k = i_off.shape[0] if candidates is None else candidates.shape[1]
    out = torch.empty(nt, k, dtype=torch.float32)
    argmax = torch.full((nt, k, w_pad), -1, dtype=torch.int32)
    region_argmax = torch.full((nt, k, r_pad), -1, dtype=torch.int32)
    forward_config = None if config is None or config.get("kernel") else {**config, "BLOCK_K": 2}
    kernels.launch_alignment(text, t_off, t_len, images, i_off, i_len, candidates, aggregation, zero, w_pad, r_pad,
                             out, argmax, region_argmax, config=forward_config)
    return out, argmax, region_argmax


def backward(case, candidates, aggregation, zero, grad, argmax, region_argmax, strategy, config=None):
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    grad_text = torch.zeros(text.shape, dtype=torch.float32)
    grad_images = torch.zeros(images.shape, dtype=torch.float32)
    kernels.launch_alignment_backward(grad, text, t_off, t_len, images, i_off, i_len, candidates, argmax,
                                      region_argmax, aggregation, zero, w_pad, r_pad, grad_text, grad_images,
                                      strategy=strategy, config=config)
    return grad_text, grad_images


def upstream(case, candidates, seed):
    nt = case[1].shape[0]
    k = case[4].shape[0] if candidates is None else candidates.shape[1]
    grad = torch.randint(-4, 5, (nt, k), generator=torch.Generator().manual_seed(seed)).float() / 2
    grad[0, 0] = 0.0  # a pair without upstream gradient
    return grad


def check_case(case, candidates, zero, *, config=None, aggregations=AGGREGATIONS.values(),
               strategies=("segmented", "atomic")):
    expected_region = oracle_region_argmax(case, candidates, zero)
    valid_text = ~torch.isnan(case[0]).any(1)
    valid_images = ~torch.isnan(case[3]).any(1)
    for aggregation in aggregations:
        _, argmax, region_argmax = forward(case, candidates, aggregation, zero, config)
        assert torch.equal(region_argmax.long(), expected_region), f"region argmax differs (aggregation {aggregation})"
        grad = upstream(case, candidates, aggregation)
        want_text, want_images = oracle_gradients(case, candidates, aggregation, zero, grad)
        for strategy in strategies:
            got_text, got_images = backward(case, candidates, aggregation, zero, grad, argmax, region_argmax, strategy,
                                            config)
            # rows outside every sequence (NaN filler) must stay exactly zero
            assert bool((got_text[~valid_text] == 0).all()) and bool((got_images[~valid_images] == 0).all())
            for got, want, name in ((got_text, want_text, "text"), (got_images, want_images, "images")):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"d {name}, aggregation {aggregation}, {strategy}: {m}")


# --------------------------------------------------------------------------- tests


@in_process
@pytest.mark.parametrize("zero", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("dtype", thin([torch.float32, torch.bfloat16, torch.float16]), ids=str)
def test_all_pairs_single_tile(dtype, zero):
    case = make_case(31, 3, 4, 7, 37, 20, dtype, packed=dtype == torch.float16)
    check_case(case, None, zero)


@in_process
@pytest.mark.parametrize("zero", thin([True, False]), ids=["zero", "neg_inf"])
def test_rerank_repeated_candidates_and_paired(zero):
    case = make_case(37, 3, 4, 7, 20, 24, torch.float32, packed=True)
    check_case(case, torch.tensor([[3, 3, 0, 1], [0, 0, 2, 2], [2, 1, 3, 3]]), zero)
    paired = make_case(41, 4, 4, 9, 5, 16, torch.bfloat16)
    check_case(paired, torch.arange(4)[:, None], zero)


@in_process
@pytest.mark.parametrize("mode", thin(["rerank", "all_pairs"]))
@pytest.mark.parametrize("zero", thin([True, False]), ids=["zero", "neg_inf"])
def test_multi_block(mode, zero):
    """W_pad = R_pad = 40 with 16-wide blocks: word/region block loops, D tails, empty sequences."""
    case = make_case(43, 3, 3, 40, 40, 20, torch.float32, text_lengths=[40, 0, 23], image_lengths=[40, 17, 0])
    candidates = None if mode == "all_pairs" else torch.tensor([[1, 2], [2, 1], [0, 1]])
    check_case(case, candidates, zero, config=SMALL_BLOCKS)


@in_process
def test_segmented_is_bitwise_deterministic_and_matches_atomic():
    case = make_case(47, 4, 3, 7, 9, 32, torch.float32, dyadic=False)
    grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    _, argmax, region_argmax = forward(case, None, 3, False)
    first = backward(case, None, 3, False, grad, argmax, region_argmax, "segmented")
    again = backward(case, None, 3, False, grad, argmax, region_argmax, "segmented")
    atomic = backward(case, None, 3, False, grad, argmax, region_argmax, "atomic")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    torch.testing.assert_close(atomic, first, rtol=1e-6, atol=1e-6)


@in_process
def test_bad_arguments():
    case = make_case(53, 2, 2, 5, 5, 16, torch.float32)
    grad = torch.ones(2, 2)
    _, argmax, region_argmax = forward(case, None, 3, False)
    with pytest.raises(ValueError, match="strategy"):
        backward(case, None, 0, False, grad, argmax, region_argmax, "sorted")
    with pytest.raises(ValueError, match="region_argmax"):
        backward(case, None, 2, False, grad, argmax, None, "segmented")
    with pytest.raises(ValueError, match="argmax"):
        backward(case, None, 0, False, grad, None, region_argmax, "segmented")


@in_process
def test_packed_all_pairs_backward():
    """The packed-tile backward (one output tile per program, weights built from the argmax), both paddings."""
    case = make_case(61, 3, 4, 7, 9, 20, torch.float32, packed=True)
    for zero in (False, True):
        check_case(case, None, zero, config={"kernel": "packed"}, strategies=("segmented", ))


def winner_gemm(case, aggregation, grad, argmax, region_argmax, config=None):
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    grad_text = torch.zeros(text.shape, dtype=torch.float32)
    grad_images = torch.zeros(images.shape, dtype=torch.float32)
    kernels.launch_winner_gemm_backward(grad, text, t_off, t_len, images, i_off, i_len, argmax, region_argmax,
                                        aggregation, w_pad, r_pad, grad_text, grad_images, config=config)
    return grad_text, grad_images


@in_process
@pytest.mark.parametrize("zero", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("dtype", thin([torch.float32, torch.bfloat16, torch.float16]), ids=str)
def test_winner_gemm_all_pairs(dtype, zero):
    """The all-pairs tile-GEMM backward vs the loop oracle: awkward lengths (37 words, empty sequences, a
    partial caption block), packed and padded layouts, every argmax aggregation, both paddings."""
    cases = [make_case(71, 5, 5, 37, 20, 24, dtype, packed=dtype == torch.float16),
             make_case(73, 3, 3, 9, 40, 20, dtype, text_lengths=[9, 0, 4], image_lengths=[40, 17, 0])]
    for case in cases:
        for aggregation in (0, 1, 2, 3):
            _, argmax, region_argmax = forward(case, None, aggregation, zero)
            grad = upstream(case, None, aggregation)
            want_text, want_images = oracle_gradients(case, None, aggregation, zero, grad)
            # default tiles, then 4 images per reduction step (a partial last step) and 4-caption steps
            for config in (None, {"IMGS": 4, "TEXT_CAPS": 1, "IMAGE_CAPS": 4}):
                got_text, got_images = winner_gemm(case, aggregation, grad, argmax, region_argmax, config)
                for got, want, name in ((got_text, want_text, "text"), (got_images, want_images, "images")):
                    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"d {name}, aggregation {aggregation}, {config}: {m}")
            again = winner_gemm(case, aggregation, grad, argmax, region_argmax, config)
            assert torch.equal(again[0], got_text) and torch.equal(again[1], got_images)


@in_process
def test_winner_gemm_bad_arguments():
    case = make_case(79, 2, 2, 5, 5, 16, torch.float32)
    _, argmax, region_argmax = forward(case, None, 3, False)
    grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="MrSw / MrAVGw / MwSr / symm"):
        winner_gemm(case, 4, grad, argmax, region_argmax)
    with pytest.raises(ValueError, match="region_argmax"):
        winner_gemm(case, 2, grad, argmax, None)
    text, t_off, t_len, images, i_off, i_len, _, _ = case
    with pytest.raises(ValueError, match="padded lengths"):
        kernels.launch_winner_gemm_backward(grad, text, t_off, t_len, images, i_off, i_len, argmax, region_argmax,
                                            0, 129, 5, torch.zeros(text.shape), torch.zeros(images.shape))


def oracle_weights(case, aggregation, grad, argmax, region_argmax):
    """The all-pairs weight matrix ``G [T_text, T_img]`` in float64 (kernels/alignment_weights.py), pair by pair."""
    text, t_off, t_len, images, i_off, i_len, _, _ = case
    weights = torch.zeros(text.shape[0], images.shape[0], dtype=torch.float64)
    for t in range(t_off.shape[0]):
        n_w, row0 = int(t_len[t]), int(t_off[t])
        for i in range(i_off.shape[0]):
            n_r, col0 = int(i_len[i]), int(i_off[i])
            c = float(grad[t, i]) / (max(n_w, 1) if aggregation == 1 else 1)
            if aggregation in (0, 1, 3):
                for w, r in enumerate(argmax[t, i, :n_w].tolist()):
                    if 0 <= r < n_r:
                        weights[row0 + w, col0 + r] += c
            if aggregation in (2, 3):
                for r, w in enumerate(region_argmax[t, i, :n_r].tolist()):
                    if 0 <= w < n_w:
                        weights[row0 + w, col0 + r] += c
    return weights


def weights_in_chunks(case, aggregation, grad, argmax, region_argmax, dtype, rows_per_chunk):
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    text_sequence = kernels.token_sequence_ids(t_off, t_len, text.shape[0], w_pad)
    image_sequence = kernels.token_sequence_ids(i_off, i_len, images.shape[0], r_pad)
    out = torch.full((text.shape[0], images.shape[0]), 123.0, dtype=dtype)  # every element must be written
    for start in range(0, text.shape[0], rows_per_chunk):
        kernels.launch_alignment_weights(grad, argmax, region_argmax, text_sequence, t_off, t_len, image_sequence,
                                         i_off, aggregation, w_pad, r_pad, start, out[start:start + rows_per_chunk])
    return out


@in_process
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alignment_weights_kernel(dtype, packed):
    """The "gemm" backward's weight-matrix rows vs the float64 oracle: lengths 1, 37 and 0 (all masked),
    packed with gaps, winners that are -1, a zero pad or beyond the partner, chunks of 7 rows (boundaries
    mid-caption, a partial last chunk) and one chunk of every row; every argmax aggregation."""
    case = make_case(89, 4, 5, 37, 37, 8, torch.float32, packed=packed, text_lengths=[1, 37, 0, 5],
                     image_lengths=[37, 0, 1, 20, 36])
    gen = torch.Generator().manual_seed(97)
    argmax = torch.randint(-1, 39, (4, 5, 37), generator=gen, dtype=torch.int32)
    region_argmax = torch.randint(-1, 39, (4, 5, 37), generator=gen, dtype=torch.int32)
    grad = torch.randint(-4, 5, (4, 5), generator=gen).float() / 2
    for aggregation in (0, 1, 2, 3):
        want = oracle_weights(case, aggregation, grad, argmax, region_argmax)
        assert int((want != 0).sum()) > 20
        for rows_per_chunk in (7, case[0].shape[0]):
            got = weights_in_chunks(case, aggregation, grad, argmax, region_argmax, dtype, rows_per_chunk)
            # dyadic coefficients are exact; 1 / n_words (MrAVGw) rounds to the workspace dtype
            rtol = 2**-8 + 1e-6 if dtype == torch.bfloat16 else 1e-6  # half a bf16 ulp
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0,
                                       msg=lambda m: f"aggregation {aggregation}, {rows_per_chunk} rows: {m}")


class _CountingKernels:
    """The interpreted kernels, counting the weight-matrix chunks and their largest size in bytes."""

    def __init__(self):
        self.chunks, self.largest = 0, 0

    def __getattr__(self, name):
        return getattr(kernels, name)

    def launch_alignment_weights(self, *args):
        self.chunks += 1
        self.largest = max(self.largest, args[-1].numel() * args[-1].element_size())
        kernels.launch_alignment_weights(*args)


@in_process
def test_gemm_strategy_through_autograd(monkeypatch):
    """``ALADIN_FAST_TRITON_BACKWARD=gemm`` through autograd (torch.mm on CPU tensors) vs float64 autograd of the
    reference: padded fp32 and packed bf16, every aggregation (sum / mean fall back), a workspace cap of 4 rows
    (several chunks, boundaries mid-caption); a cap below one row falls back to the segmented kernels."""
    import aladin_fast
    from aladin_fast.ops import alignment_op

    counting = _CountingKernels()
    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: counting)
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "gemm")
    gen = torch.Generator().manual_seed(101)
    text0 = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    images0 = torch.randn(4, 6, 16, generator=gen, dtype=torch.float64)
    t_len, v_len = torch.tensor([5, 0, 2]), torch.tensor([6, 1, 0, 4])
    packed_text = torch.cat([text0[i, :int(n)] for i, n in enumerate(t_len)])
    packed_images = torch.cat([images0[i, :int(n)] for i, n in enumerate(v_len)])
    cu_text = torch.nn.functional.pad(t_len.cumsum(0), (1, 0))
    cu_images = torch.nn.functional.pad(v_len.cumsum(0), (1, 0))
    upstream = torch.randint(-4, 5, (3, 4), generator=gen).double() / 2  # exact in bf16
    layouts = {"padded": (text0, images0, dict(text_lengths=t_len, image_lengths=v_len)),
               "packed": (packed_text, packed_images, dict(text_cu_seqlens=cu_text, image_cu_seqlens=cu_images))}
    for layout, dtype, cap_rows in (("padded", torch.float32, 4), ("packed", torch.bfloat16, 3)):
        text0_, images0_, lengths = layouts[layout]
        row_bytes = images0_.reshape(-1, 16).shape[0] * (2 if dtype == torch.bfloat16 else 4)
        monkeypatch.setenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", str(cap_rows * row_bytes / 2**20))
        text_rows = text0_.reshape(-1, 16).shape[0]
        counting.largest = 0
        for aggregation in ("MrSw", "MrAVGw", "MwSr", "symm", "mean"):
            for padding in ("neg_inf", "zero"):
                grads = []
                counting.chunks = 0
                for backend, compute in (("reference", torch.float64), ("triton", dtype)):
                    text = text0_.to(dtype).to(compute).detach().requires_grad_()
                    images = images0_.to(dtype).to(compute).detach().requires_grad_()
                    scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, padding=padding,
                                                          backend=backend, **lengths)
                    (scores * upstream.to(scores.dtype)).sum().backward()
                    grads.append((text.grad.double(), images.grad.double()))
                assert counting.chunks == (0 if aggregation == "mean" else -(-text_rows // cap_rows))
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                for got, want in zip(grads[1], grads[0]):
                    torch.testing.assert_close(got, want, rtol=tol, atol=tol,
                                               msg=lambda m: f"{layout} {aggregation} {padding}: {m}")
        assert counting.largest <= cap_rows * row_bytes
    monkeypatch.setenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", str(row_bytes / 2 / 2**20))  # half a row
    counting.chunks = 0
    text = packed_text.bfloat16().requires_grad_()
    aladin_fast.alignment_scores(text, packed_images.bfloat16(), text_cu_seqlens=cu_text,
                                 image_cu_seqlens=cu_images, backend="triton").sum().backward()
    assert counting.chunks == 0 and torch.isfinite(text.grad).all()


def test_backward_workspace_cap(monkeypatch):
    from aladin_fast.ops.alignment_op import backward_workspace_bytes

    monkeypatch.delenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", raising=False)
    assert backward_workspace_bytes() == 8 * 2**20
    monkeypatch.setenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", "0.5")
    assert backward_workspace_bytes() == 2**19
    for bad in ("0", "-4", "eight", "nan", "inf", ""):
        monkeypatch.setenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match="ALADIN_FAST_BACKWARD_WORKSPACE_MB must be a positive number"):
            backward_workspace_bytes()


@in_process
@pytest.mark.parametrize("strategy", thin(["auto", "dense", "gemm", "segmented"], keep=2))
def test_op_gradients_through_autograd(strategy, monkeypatch):
    """``alignment_scores(..., backend="triton")`` backward (the op layer's strategy choice) vs float64 autograd
    of the reference: padded and packed all pairs, a NaN token (dense falls back to the argmax kernels)."""
    import aladin_fast
    from aladin_fast.ops import alignment_op

    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: kernels)
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    gen = torch.Generator().manual_seed(83)
    text0 = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    images0 = torch.randn(4, 6, 16, generator=gen, dtype=torch.float64)
    t_len, v_len = torch.tensor([5, 0, 2]), torch.tensor([6, 1, 0, 4])
    upstream = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    for aggregation in ("MrSw", "MrAVGw", "MwSr", "symm", "mean"):
        for padding in ("neg_inf", "zero"):
            grads = []
            for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
                text = text0.to(dtype).detach().clone().requires_grad_()
                images = images0.to(dtype).detach().clone().requires_grad_()
                scores = aladin_fast.alignment_scores(text, images, t_len, v_len, aggregation, padding,
                                                      backend=backend)
                (scores * upstream.to(dtype)).sum().backward()
                grads.append((text.grad.double(), images.grad.double()))
            for got, want in zip(grads[1], grads[0]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{aggregation}: {m}")
    resolved = alignment_op.triton_backward_strategy(alignment_op.MRSW)  # what the poisoned MrSw call runs
    poisoned = images0.float().clone()
    poisoned[3, 1, 0] = float("nan")  # a valid token: a dense weight tile would spread 0 * NaN to every caption
    results = []
    for chosen in (strategy, "segmented"):
        monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", chosen)
        text = text0.float().requires_grad_()
        images = poisoned.clone().requires_grad_()
        aladin_fast.alignment_scores(text, images, t_len, v_len, backend="triton").sum().backward()
        results.append((text.grad, images.grad))
    assert torch.isfinite(results[0][0][0, :2]).any()  # not every text row poisoned
    for got, want in zip(*results):
        if resolved == "gather":
            # row gathers follow the contract (d t_w += c v_argmax(w)); the segmented kernels' one-hot tile dots
            # also spread 0 x NaN from non-winning rows: the gather's NaNs are a subset, equal elsewhere (the
            # text is finite, so d images comes from the winner GEMM: another summation order than segmented)
            assert not (torch.isnan(got) & ~torch.isnan(want)).any()
            both = torch.isfinite(got) & torch.isfinite(want)
            torch.testing.assert_close(got[both], want[both], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_backward_strategy_choice(monkeypatch):
    from aladin_fast.ops.alignment_op import AUTO_BACKWARD, MRAVGW, MRSW, MWSR, SYMM, triton_backward_strategy

    monkeypatch.delenv("ALADIN_FAST_TRITON_BACKWARD", raising=False)
    assert triton_backward_strategy() == "auto"
    assert [triton_backward_strategy(code) for code in (MRSW, MRAVGW, MWSR, SYMM)] == [
        AUTO_BACKWARD[code] for code in (MRSW, MRAVGW, MWSR, SYMM)]
    assert triton_backward_strategy(4) == "segmented"  # sum / mean: no argmax, the closed form
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "fastest")
    with pytest.raises(ValueError, match="ALADIN_FAST_TRITON_BACKWARD"):
        triton_backward_strategy()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    for chosen, deterministic, cublas in (("dense", "dense", None), ("segmented", "segmented", None),
                                          ("atomic", "segmented", None), ("gemm", "segmented", None),
                                          ("gemm", "gemm", ":4096:8"), ("auto", "auto", None)):
        monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", chosen)
        if cublas:  # torch.mm is deterministic (and allowed) only with this cuBLAS workspace setting
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", cublas)
        torch.use_deterministic_algorithms(True)
        try:
            assert triton_backward_strategy() == deterministic
        finally:
            torch.use_deterministic_algorithms(False)


@in_process
def test_padded_token_sequence_cached_only_for_shared_layout(monkeypatch):
    """The "gemm" backward's token -> sequence map: a full-length padded batch (the op layer's shared
    ``padded_layout`` tensors) reuses one cached map, equal to the kernel's; any other offsets / lengths
    (a caller's own tensors, lengths shorter than the pad, a packed total) run the kernel."""
    from aladin_fast._inputs import padded_layout
    from aladin_fast.ops import alignment_op

    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: kernels)
    offsets, lengths = padded_layout(5, 7, torch.device("cpu"))
    want = kernels.token_sequence_ids(offsets, lengths, 35, 7)
    got = alignment_op._token_sequence(offsets, lengths, 35, 7)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert alignment_op._token_sequence(offsets, lengths, 35, 7) is got  # one cached map
    short = torch.tensor([7, 0, 3, 7, 1], dtype=torch.int32)
    packed = torch.tensor([0, 7, 7, 12, 19])
    for args in ((offsets, short, 35, 7), (offsets.clone(), lengths.clone(), 35, 7), (packed, short, 20, 7),
                 (offsets, lengths, 36, 7)):
        result = alignment_op._token_sequence(*args)
        assert result is not got and torch.equal(result, kernels.token_sequence_ids(*args)), args
    assert (alignment_op._token_sequence(offsets, short, 35, 7)[7:14] == -1).all()  # an empty caption's rows


@in_process
def test_gather_strategy_through_autograd(monkeypatch):
    """``ALADIN_FAST_TRITON_BACKWARD=gather`` (row gathers for the one-sided argmax terms) through autograd vs
    float64 autograd of the reference: all pairs / rerank (repeated candidates) / paired, padded with lengths
    1, 0 and full, and packed; fp32 and bf16; both paddings. The gather kernel must run for MrSw / MrAVGw
    (text side) and MwSr (image side), every mode. Non-finite tokens give the C++ backward's gradients."""
    import aladin_fast
    from aladin_fast.ops import alignment_op

    launched = []

    class Counting:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def launch_gather_backward(self, *args, text_side):
            launched.append(text_side)
            kernels.launch_gather_backward(*args, text_side=text_side)

    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: Counting())
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "gather")
    gen = torch.Generator().manual_seed(5)
    text0 = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    images0 = torch.randn(4, 7, 24, generator=gen, dtype=torch.float64)
    t_len, v_len = torch.tensor([5, 0, 1]), torch.tensor([7, 1, 0, 4])
    candidates = torch.tensor([[3, 3, 0], [1, 2, 0], [0, 3, 1]])
    upstream = {"all_pairs": torch.randint(-4, 5, (3, 4), generator=gen).double() / 2,
                "rerank": torch.randint(-4, 5, (3, 3), generator=gen).double() / 2,
                "paired": torch.randint(-4, 5, (3,), generator=gen).double() / 2}

    def call(mode, text, images, aggregation, padding, backend):
        if mode == "all_pairs":
            return aladin_fast.alignment_scores(text, images, t_len, v_len, aggregation, padding, backend=backend)
        if mode == "rerank":
            return aladin_fast.rerank_scores(text, images, candidates, t_len, v_len, aggregation, padding,
                                             backend=backend)
        return aladin_fast.paired_scores(text, images[:3], t_len, v_len[:3], aggregation, padding, backend=backend)

    for mode in ("all_pairs", "rerank", "paired"):
        for dtype in (torch.float32, torch.bfloat16):
            for aggregation in ("MrSw", "MrAVGw", "MwSr", "symm"):
                for padding in ("neg_inf", "zero"):
                    grads = []
                    launched.clear()
                    for backend, compute in (("reference", torch.float64), ("triton", dtype)):
                        text = text0.to(dtype).to(compute).requires_grad_()
                        images = images0.to(dtype).to(compute).requires_grad_()
                        scores = call(mode, text, images, aggregation, padding, backend)
                        (scores * upstream[mode].to(scores.dtype)).sum().backward()
                        grads.append((text.grad.double(), images.grad.double()))
                    want_side = {"MrSw": [True], "MrAVGw": [True], "MwSr": [False]}
                    assert launched == want_side.get(aggregation, []), (mode, aggregation)
                    tol = 1e-5 if dtype == torch.float32 else 1e-2
                    for got, want, name in zip(grads[1], grads[0], ("text", "images")):
                        torch.testing.assert_close(got, want, rtol=tol, atol=tol,
                                                   msg=lambda m: f"{mode} {dtype} {aggregation} {padding} d {name}: {m}")
    # packed inputs, MrSw and MwSr
    packed_text = torch.cat([text0[i, :int(n)] for i, n in enumerate(t_len)]).float()
    packed_images = torch.cat([images0[i, :int(n)] for i, n in enumerate(v_len)]).float()
    cu_text = torch.nn.functional.pad(t_len.cumsum(0), (1, 0))
    cu_images = torch.nn.functional.pad(v_len.cumsum(0), (1, 0))
    for aggregation in ("MrSw", "MwSr"):
        grads = []
        for backend, compute in (("reference", torch.float64), ("triton", torch.float32)):
            text = packed_text.to(compute).detach().clone().requires_grad_()
            images = packed_images.to(compute).detach().clone().requires_grad_()
            scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, text_cu_seqlens=cu_text,
                                                  image_cu_seqlens=cu_images, backend=backend)
            (scores * upstream["all_pairs"].to(compute)).sum().backward()
            grads.append((text.grad.double(), images.grad.double()))
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"packed {aggregation}: {m}")
    # non-finite tokens: exactly the C++ backward's gradients (docs/kernel_contract.md: d t_w += c v_argmax(w), no
    # weight of 0 meets a token). The segmented kernels' one-hot tile dots differ here: for MwSr, pair (0, 1) has
    # a finite score, and 0 x inf in their image-side dot writes NaN into image 1 (all pairs and rerank alike).
    for mode in ("all_pairs", "rerank", "paired"):
        for aggregation in ("MrSw", "MwSr"):
            poisoned_text, poisoned_images = text0.float().clone(), images0.float().clone()
            poisoned_images[3, 1, 0] = float("nan")
            poisoned_text[0, 2, 3] = float("inf")
            results = []
            for backend in ("triton", "cpu"):
                text = poisoned_text.clone().requires_grad_()
                images = poisoned_images.clone().requires_grad_()
                scores = call(mode, text, images, aggregation, "neg_inf", backend)
                (scores.nan_to_num(0, 0, 0) * upstream[mode].float()).sum().backward()
                results.append((text.grad, images.grad))
            for got, want in zip(*results):
                assert torch.equal(torch.isnan(got), torch.isnan(want)), (mode, aggregation)
                assert torch.equal(torch.isinf(got), torch.isinf(want)), (mode, aggregation)
                torch.testing.assert_close(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-5)


def test_finiteness_check_never_syncs_inside_cuda_graph_capture(monkeypatch):
    """The GEMM backwards' finiteness check: a started :class:`FiniteCheck` answers without the tokens; inside a
    CUDA-graph capture (where ``.item()`` would raise) the answer is False, so the argmax kernels run; otherwise
    one reduction of the tokens (NaN and inf both count)."""
    from aladin_fast.ops import alignment_op

    class CapturedTokens:  # stands for CUDA tensors during a capture: any use but ``is_cuda`` would fail
        is_cuda = True

    class Started:
        def __bool__(self):
            return True

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert alignment_op._tokens_finite(CapturedTokens(), CapturedTokens()) is False
    assert alignment_op._tokens_finite(CapturedTokens(), CapturedTokens(), Started()) is True
    tokens = torch.ones(3, 4)
    assert alignment_op._tokens_finite(tokens, tokens) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = tokens.clone()
        poisoned[2, 1] = bad
        assert alignment_op._tokens_finite(tokens, poisoned) is False


@in_process
def test_gather_full_padded_writes_every_row_in_token_dtype(monkeypatch):
    """Full-length padded batches (no lengths): "gather" returns gradients in the tokens' dtype from
    uninitialised buffers -- filled with NaN here, so a row no kernel wrote would show -- equal to float64
    autograd of the reference; with lengths the buffers are zero-filled (rows past a length stay 0)."""
    import aladin_fast
    from aladin_fast.ops import alignment_op

    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: kernels)
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "gather")
    real = alignment_op._new_gradient
    calls = []

    def poisoned(tokens, every_row_written):
        calls.append((tokens.dtype, every_row_written))
        out = real(tokens, every_row_written)
        return out.fill_(float("nan")) if every_row_written else out

    monkeypatch.setattr(alignment_op, "_new_gradient", poisoned)
    gen = torch.Generator().manual_seed(17)
    text0 = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    images0 = torch.randn(4, 7, 24, generator=gen, dtype=torch.float64)
    upstream = torch.randint(-4, 5, (3, 4), generator=gen).double() / 2
    for dtype in (torch.float32, torch.bfloat16):
        for aggregation in ("MrSw", "MrAVGw", "MwSr"):
            for lengths in ({}, dict(text_lengths=torch.tensor([5, 2, 1]), image_lengths=torch.tensor([7, 1, 3, 4]))):
                calls.clear()
                grads = []
                for backend, compute in (("reference", torch.float64), ("triton", dtype)):
                    text = text0.to(dtype).to(compute).requires_grad_()
                    images = images0.to(dtype).to(compute).requires_grad_()
                    scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend,
                                                          **lengths)
                    (scores * upstream.to(scores.dtype)).sum().backward()
                    grads.append((text.grad.double(), images.grad.double()))
                assert calls == [(dtype, not lengths)] * 2, (dtype, aggregation, lengths)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                for got, want in zip(grads[1], grads[0]):
                    torch.testing.assert_close(got, want, rtol=tol, atol=tol,
                                               msg=lambda m: f"{dtype} {aggregation} {bool(lengths)}: {m}")


@in_process
@pytest.mark.parametrize("aggregation", [0, 1], ids=["MrSw", "MrAVGw"])
def test_winner_images_kernel_exact_for_nonfinite_values(aggregation):
    """The "gather" step's image side (winner-GEMM images kernel, ``exact_images``) needs no finiteness check:
    a program whose accumulator ends NaN / inf recomputes its rows word by word. Against the C++ backward
    (the contract: d v_argmax(w) += c t_w, a zero upstream skips its pair, a NaN one does not) for finite
    tokens, a NaN / +inf / -inf valid text token, a NaN in a padding row (never read), a NaN upstream and an
    inf token whose pairs all have zero upstream. Finite inputs give the plain GEMM's bits; without
    ``exact_images`` the NaN token spreads (so the recomputation is what makes it exact)."""
    from aladin_fast.ops import alignment_op

    case = make_case(11, 3, 4, 5, 7, 24, torch.float32, text_lengths=[5, 1, 3], image_lengths=[7, 0, 3, 1])
    text0, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    grad0 = upstream(case, None, 3)
    _, argmax, _ = forward(case, None, aggregation, False)

    def images_side(text, grad, exact):
        out = torch.full(images.shape, 7.25)
        kernels.launch_winner_gemm_backward(grad, text, t_off, t_len, images, i_off, i_len, argmax, None,
                                            aggregation, w_pad, r_pad, None, out, sides=("images",),
                                            exact_images=exact)
        return out

    def contract(text, grad):
        _, d_images = alignment_op.cpu_backward(grad, text, t_off, t_len, images, i_off, i_len, None, argmax,
                                                torch.empty(0, dtype=torch.int32), aggregation, False, w_pad, r_pad)
        return d_images

    written = torch.zeros(images.shape[0], dtype=torch.bool)
    for start, length in zip(i_off.tolist(), i_len.tolist()):
        written[start:start + length] = True
    finite = images_side(text0, grad0, True)
    assert torch.equal(finite, images_side(text0, grad0, False))
    torch.testing.assert_close(finite[written], contract(text0, grad0)[written], rtol=1e-5, atol=1e-5)
    row = int(t_off[0]) + 2  # caption 0, word 2 (valid)
    cases = []
    for value in (float("nan"), float("inf"), -float("inf")):
        text = text0.clone()
        text[row, 5] = value
        cases.append((f"token {value}", text, grad0))
    padded = text0.clone()
    padded[int(t_off[1]) + 3, :] = float("nan")  # caption 1 has 1 word: row 3 is padding
    cases.append(("padding NaN", padded, grad0))
    nan_grad = grad0.clone()
    nan_grad[1, 2] = float("nan")
    cases.append(("NaN upstream", text0, nan_grad))
    zero_grad = grad0.clone()
    zero_grad[0] = 0.0  # every pair of caption 0: its inf token must not reach any image
    inf_text = text0.clone()
    inf_text[row, 5] = float("inf")
    cases.append(("inf token, zero upstream", inf_text, zero_grad))
    for name, text, grad in cases:
        got, want = images_side(text, grad, True)[written], contract(text, grad)[written]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        torch.testing.assert_close(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
        assert not (images_side(text, grad, True)[~written] != 7.25).any(), name  # rows outside: untouched
    nan_text = text0.clone()
    nan_text[row, 5] = float("nan")
    plain = images_side(nan_text, grad0, False)[written]
    assert torch.isnan(plain).sum() > torch.isnan(contract(nan_text, grad0)[written]).sum()


@in_process
@pytest.mark.parametrize("mode", ["all_pairs", "rerank"])
def test_forward_writes_every_output_where_it_says_so(mode):
    """``forward_writes_every_output`` lets the op layer pass uninitialised outputs (no fill launches): where it
    says so, outputs pre-filled with sentinels must come back equal to a run pre-filled like the op layer used to
    (scores 0, argmax -1): every score, every argmax and region-argmax entry, padded positions included (lengths
    0, 1, full; packed; all aggregations). The per-pair kernel must not claim it."""
    case = make_case(23, 3, 4, 5, 7, 24, torch.float32, packed=True, text_lengths=[5, 1, 0],
                     image_lengths=[7, 0, 3, 1])
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    candidates = torch.tensor([[3, 3, 0], [1, 2, 0], [0, 3, 1]]) if mode == "rerank" else None
    assert kernels.forward_writes_every_output(w_pad, r_pad)
    assert not kernels.forward_writes_every_output(w_pad, r_pad, {"kernel": "pair"})
    assert not kernels.forward_writes_every_output(w_pad, r_pad, {"BLOCK_W": 16})
    assert not kernels.forward_writes_every_output(200, r_pad)  # too long for one tile: the per-pair kernel
    k = 4 if candidates is None else 3
    for aggregation in AGGREGATIONS.values():
        results = []
        for score_fill, index_fill in ((0.0, -1), (float("nan"), 12345)):
            out = torch.full((3, k), score_fill)
            argmax = torch.full((3, k, w_pad), index_fill, dtype=torch.int32)
            region_argmax = torch.full((3, k, r_pad), index_fill, dtype=torch.int32)
            kernels.launch_alignment(text, t_off, t_len, images, i_off, i_len, candidates, aggregation, False,
                                     w_pad, r_pad, out, argmax, region_argmax)
            results.append((out, argmax, region_argmax))
        for got, want in zip(results[1], results[0]):
            assert torch.equal(got, want), (mode, aggregation)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_step_host_work(monkeypatch, dtype):
    """Host work of the default ("auto") training step on the Triton backend, counted by
    ``benchmarks/host_work.py`` with the kernels stubbed out: the step was host-bound on an H200
    (benchmarks/results/gpu-nvidia-h200/SUMMARY.md), so every device sync, fill and extra launch is a
    regression. Forward: one kernel into uninitialised outputs. Backward, MrSw / MrAVGw: the text-side gather
    and the winner-GEMM images kernel (exact for non-finite values by itself: no finiteness check); MwSr: the
    segmented text kernel and the image-side gather. Nothing else: no sync (``.item()``,
    ``torch.equal``, ``nonzero``), no fill, no zero-filled gradient of the argmax outputs."""
    import importlib.util

    from aladin_fast.ops import alignment_op
    from triton.runtime.interpreter import InterpretedFunction

    spec = importlib.util.spec_from_file_location("_host_work", os.path.join(ROOT, "benchmarks", "host_work.py"))
    host_work = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_work)
    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: kernels)
    monkeypatch.delenv("ALADIN_FAST_TRITON_BACKWARD", raising=False)
    monkeypatch.delenv("ALADIN_FAST_TRITON_KERNEL", raising=False)
    monkeypatch.setattr(InterpretedFunction, "__getitem__", host_work._stub)
    for aggregation in ("MrSw", "MrAVGw", "MwSr"):
        row = host_work.measure(aggregation, dtype, rounds=1, steps=1)
        forward, backward = row["forward"], row["backward"]
        assert forward["launches"] == {"_packed_alignment_kernel": 1}, aggregation
        if aggregation == "MwSr":
            assert backward["launches"] == {"_backward_text_kernel": 1, "_gather_rows_kernel": 1}
            assert backward["ops"] == {}
        else:
            assert backward["launches"] == {"_gather_rows_kernel": 1, "_winner_gemm_images_kernel": 1}, aggregation
            assert backward["ops"] == {}, aggregation
        assert forward["ops"] == {}, aggregation
        assert forward["syncs"] == backward["syncs"] == forward["fills"] == backward["fills"] == 0


@in_process
def test_compiled_op_skips_range_check_only_for_layouts_it_built(monkeypatch):
    """Under torch.compile the op re-checks lengths / candidates on the real values (a device sync per call on
    a GPU), except where the op layer built them itself (no lengths, all pairs or paired): those compiled steps
    have no sync. User-given lengths are still checked, and refused when out of range; results and gradients
    match eager."""
    import aladin_fast
    from aladin_fast.ops import alignment_op

    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: kernels)
    checks = []
    real = alignment_op._check_metadata
    monkeypatch.setattr(alignment_op, "_check_metadata", lambda *args: checks.append(args[0]) or real(*args))
    gen = torch.Generator().manual_seed(3)
    text0 = torch.randn(3, 5, 16, generator=gen)
    images0 = torch.randn(4, 6, 16, generator=gen)

    def step(text, images, text_lengths, paired):
        if paired:
            return aladin_fast.paired_scores(text, images[:3], text_lengths, backend="triton").sum()
        return aladin_fast.alignment_scores(text, images, text_lengths, backend="triton").logsumexp(1).sum()

    compiled = torch.compile(step, fullgraph=True)
    for lengths, paired in ((None, False), (None, True), (torch.tensor([5, 2, 1]), False)):
        results = []
        checks.clear()
        for fn in (step, compiled):
            text, images = text0.clone().requires_grad_(), images0.clone().requires_grad_()
            loss = fn(text, images, lengths, paired)
            loss.backward()
            results.append((loss.detach(), text.grad, images.grad))
        assert len(checks) == (0 if lengths is None else 1), (lengths, paired)
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="text_lengths"):
        compiled(text0, images0, torch.tensor([5, 9, 1]), False)


@in_process
@pytest.mark.parametrize("strategy", ["segmented", "gather", "dense", "atomic", "packed"])
def test_nonfinite_tokens_give_the_contract_gradients(monkeypatch, strategy):
    """NaN / inf tokens: every Triton backward gives the C++ backward's gradients (the contract:
    d t_w += c v_argmax(w), no weight of 0 ever meets a token) -- same NaN / inf pattern, equal values
    elsewhere -- in all pairs / rerank / paired, for MrSw / MrAVGw / MwSr / symm, both paddings. The segmented
    kernels' one-hot tile dots spread 0 x inf; their programs recompute exactly where an accumulator ended
    non-finite (an inf text token under MwSr and an inf image token under MrSw used to differ here)."""
    import aladin_fast
    from aladin_fast.ops import alignment_op

    monkeypatch.setattr(alignment_op, "triton_kernels", lambda: kernels)
    if strategy == "packed":  # the packed-tile kernels (all pairs; the other modes take the per-pair ones)
        monkeypatch.setenv("ALADIN_FAST_TRITON_KERNEL", "packed")
        strategy = "segmented"
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    gen = torch.Generator().manual_seed(29)
    text0 = torch.randn(3, 5, 24, generator=gen)
    images0 = torch.randn(4, 7, 24, generator=gen)
    t_len, v_len = torch.tensor([5, 0, 3]), torch.tensor([7, 1, 0, 4])
    candidates = torch.tensor([[3, 3, 0], [1, 2, 0], [0, 3, 1]])
    text0[0, 2, 3] = float("inf")
    text0[2, 1, 7] = -float("inf")
    images0[3, 1, 0] = float("nan")
    images0[0, 4, 9] = float("inf")
    text0[2, 4, 0] = float("nan")  # padding (caption 2 has 3 words): never read
    for mode in ("all_pairs", "rerank", "paired"):
        k = {"all_pairs": 4, "rerank": 3, "paired": 1}[mode]
        upstream = torch.randint(-4, 5, (3, k), generator=gen).float() / 2
        upstream[1, 0] = 0.0
        for aggregation in ("MrSw", "MrAVGw", "MwSr", "symm"):
            for padding in ("neg_inf", "zero"):
                results = []
                for backend in ("triton", "cpu"):
                    text, images = text0.clone().requires_grad_(), images0.clone().requires_grad_()
                    if mode == "all_pairs":
                        scores = aladin_fast.alignment_scores(text, images, t_len, v_len, aggregation, padding,
                                                              backend=backend)
                    elif mode == "rerank":
                        scores = aladin_fast.rerank_scores(text, images, candidates, t_len, v_len, aggregation,
                                                           padding, backend=backend)
                    else:
                        scores = aladin_fast.paired_scores(text, images[:3], t_len, v_len[:3], aggregation, padding,
                                                           backend=backend)[:, None]
                    (scores.nan_to_num(0, 0, 0) * upstream).sum().backward()
                    results.append((text.grad, images.grad))
                for got, want, name in zip(*results, ("text", "images")):
                    where = f"{mode} {aggregation} {padding} d {name}"
                    assert torch.equal(torch.isnan(got), torch.isnan(want)), where
                    assert torch.equal(torch.isinf(got), torch.isinf(want)), where
                    torch.testing.assert_close(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-5,
                                               atol=1e-5, msg=lambda m: f"{where}: {m}")
