"""Numerics of every backend against an independent float64 oracle written here.

The oracle builds each pair's [n_w, n_r] similarity matrix in float64 from the tokens *as the op
sees them* (low-precision inputs converted exactly) and pools it by the definitions of
docs/kernel_contract.md ("Semantics"). Checked:

* accumulation: fp32 / fp16 / bf16 tokens with large D (4096, 8191 odd) stay within a few
  fp32 epsilons of the sum of |products| on every CPU code path (avx2 dot / words, scalar) and the
  reference, so nothing accumulates in a low precision;
* ``normalize=True``: unit vectors at any scale (norms beyond the fp32 range's square root, tiny and
  subnormal rows), zero rows stay zero ("Normalisation" in the contract);
* subnormals: the C++ kernel honours them whatever FTZ / DAZ mode the caller set
  (``torch.set_flush_denormal``), on any thread count ("Subnormals");
* finite inputs whose fp32 similarities overflow ("Finite inputs beyond the fp32 range");
* ties between equal similarities, signed zeros and the zero-padding value: first index wins;
* gradients of fp16 / bf16 tokens: their dtype and accuracy against float64 gradients.

Triton joins the tiny cases when this process runs it in the interpreter
(``TRITON_INTERPRET=1 pytest tests/test_numerics.py``).
"""
import math

import numpy as np
import pytest
import torch

import aladin_fast
from aladin_fast.ops.backends import triton_interpreter_enabled

_C = pytest.importorskip("aladin_fast._C")

AGGS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")
EPS32 = 2.0 ** -24
# (backend, ISA, layout): every CPU code path that runs here, and the reference
CPU_PATHS = [("cpu", isa, layout) for isa in ("avx2", "avx512") if isa in _C.available_isas()
             for layout in ("dot", "words")] + [("cpu", "scalar", "words"), ("reference", None, None)]
TINY_PATHS = CPU_PATHS + ([("triton", None, None)] if triton_interpreter_enabled() else [])


def _ids(paths):
    return ["-".join(p for p in path if p) for path in paths]


@pytest.fixture
def path_env(monkeypatch):
    def use(path):
        backend, isa, layout = path
        for name, value in (("ALADIN_FAST_ISA", isa), ("ALADIN_FAST_CPU_LAYOUT", layout)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        return backend
    return use


def oracle(text, text_lengths, images, image_lengths, aggregation, zero):
    """float64 scores [Nt, Ni] pooled from the exact similarities (rounded once to fp32 unless the tokens are
    float64), sum of |products| per pair (scaled like the score) and argmax [Nt, Ni, W]."""
    T, I = text.double(), images.double()
    nt, w_pad, _ = T.shape
    ni, r_pad, _ = I.shape
    out, size = np.zeros((nt, ni)), np.zeros((nt, ni))
    am = np.full((nt, ni, w_pad), -1)
    for i in range(nt):
        nw = int(text_lengths[i])
        t = T[i, :nw]
        for j in range(ni):
            nr = int(image_lengths[j])
            v = I[j, :nr]
            s = (t[:, None, :] * v[None, :, :]).sum(-1).numpy()  # elementwise: IEEE for every product
            if text.dtype != torch.float64:
                s = _fp32(s)  # s_wr is an fp32 value (beyond its range: +-inf, tied like any equal values)
            a = (t.abs() @ v.abs().T).numpy()
            with np.errstate(invalid="ignore", over="ignore"):
                rows = np.concatenate([s, np.zeros((nw, 1))], 1) if zero and nr < r_pad else s
                m = rows.max(1) if rows.shape[1] else np.zeros(nw)
                if rows.shape[1]:
                    am[i, j, :nw] = rows.argmax(1)  # first occurrence
                cols = np.concatenate([s, np.zeros((1, nr))], 0) if zero and nw < w_pad else s
                c = cols.max(0) if cols.shape[0] else np.zeros(nr)
                mrsw, mwsr, total = m.sum(), c.sum(), s.sum()
            cells = (w_pad * r_pad) if zero else nw * nr
            value = {"MrSw": mrsw, "MrAVGw": mrsw / nw if nw else 0.0, "MwSr": mwsr, "symm": mrsw + mwsr,
                     "sum": total, "mean": total / cells if cells else 0.0}[aggregation]
            out[i, j] = math.nan if np.isnan(s).any() else value
            scale = {"MrAVGw": 1.0 / max(nw, 1), "mean": 1.0 / max(cells, 1), "symm": 2.0}.get(aggregation, 1.0)
            size[i, j] = a.sum() * scale
    return out, size, am


def _fp32(values):
    with np.errstate(over="ignore"):
        return values.astype(np.float32).astype(np.float64)


def _every_mode(text, images, text_lengths, image_lengths, backend):
    """(aggregation, padding, scores as float64 numpy, argmax, oracle scores, oracle argmax) for every mode."""
    for aggregation in AGGS:
        for padding in ("neg_inf", "zero"):
            got, argmax = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend=backend,
                                                       aggregation=aggregation, padding=padding, return_argmax=True)
            want, _, want_argmax = oracle(text, text_lengths, images, image_lengths, aggregation, padding == "zero")
            yield aggregation, padding, got.double().numpy(), argmax, want, want_argmax


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("path", CPU_PATHS, ids=_ids(CPU_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [4096, 8191])
def test_large_dim_accumulates_in_fp32(path, dtype, dim, path_env):
    """Random normal tokens: |score - oracle| <= 2 eps32 * sum|products| (observed <= 0.45). A low-precision
    intermediate anywhere (an fp16 / bf16 s_wr or partial sum) would miss it by orders of magnitude."""
    backend = path_env(path)
    g = torch.Generator().manual_seed(dim)
    text = torch.randn(2, 5, dim, generator=g).to(dtype)
    images = torch.randn(3, 4, dim, generator=g).to(dtype)
    tl, il = torch.tensor([5, 2]), torch.tensor([4, 1, 3])
    for aggregation in ("MrSw", "symm", "sum"):
        for padding in ("neg_inf", "zero"):
            got = aladin_fast.alignment_scores(text, images, tl, il, aggregation=aggregation, padding=padding,
                                               backend=backend)
            assert got.dtype == torch.float32
            ref, size, _ = oracle(text, tl, images, il, aggregation, padding == "zero")
            err = np.abs(got.double().numpy() - ref)
            assert (err <= 2 * EPS32 * size).all(), (aggregation, padding, (err / (EPS32 * size)).max())


# ----------------------------------------------------------------------------- normalize
NORMALIZE_CASES = [
    (torch.float32, [1e-30, 1e-40, 1e-13, 1.0, 1e20, 1e37]),
    (torch.bfloat16, [1e-38, 1e-30, 1.0, 1e30, 1e37]),
    (torch.float16, [6e-8, 1e-4, 1.0, 2e4]),
    (torch.float64, [1e-300, 1e-200, 1.0, 1e200, 1e300]),
]


@pytest.mark.parametrize("dtype,scales", NORMALIZE_CASES, ids=[str(dtype).split(".")[1] for dtype, _ in NORMALIZE_CASES])
def test_normalize_gives_unit_vectors_at_any_scale(dtype, scales):
    """Tokens of any finite nonzero scale normalise to unit vectors (their self-similarity is 1 and they
    match float64 normalisation of the same inputs); zero tokens stay zero (score 0)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(len(scales), 6, dtype=torch.float64, generator=g)
    base[:, 0] = 1.0  # the row's largest component never underflows to 0 in the dtype
    text = (base / base.abs().amax(-1, keepdim=True) * torch.tensor(scales, dtype=torch.float64)[:, None]).to(dtype)
    assert torch.isfinite(text).all() and (text != 0).any(-1).all()
    zero_row = torch.zeros(1, 6, dtype=dtype)
    tokens = torch.cat([text, zero_row])[:, None, :]  # [N, 1, D]
    exact = torch.nn.functional.normalize(tokens.double() / tokens.double().abs().amax(-1, keepdim=True).clamp(min=1e-300),
                                          dim=-1)
    want = (exact[:, 0] * exact[:, 0]).sum(-1)  # 1 for each token, 0 for the zero row
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for backend in ("reference", "cpu"):
        got = aladin_fast.paired_scores(tokens, tokens, normalize=True, backend=backend)
        assert torch.allclose(got.double(), want, rtol=0, atol=tol), (backend, got, want)
        # against float64 normalisation of the same inputs: each token with a float64 unit partner
        cross = aladin_fast.paired_scores(tokens, exact.to(dtype), normalize=True, backend=backend)
        assert torch.allclose(cross.double(), want, rtol=0, atol=tol), (backend, cross)


def test_normalize_ordinary_rows_keep_their_bits():
    """The rescaling is by powers of two: rows in the ordinary range normalise to F.normalize's bits."""
    from aladin_fast._inputs import TokenBatch, normalized

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = (torch.randn(300, 33, generator=g) * torch.logspace(-3, 3, 300)[:, None]).to(dtype)
        batch = TokenBatch(x, torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int32), 1)
        want = torch.nn.functional.normalize(x if dtype == torch.float64 else x.float(), dim=-1).to(dtype)
        assert torch.equal(normalized(batch).tokens, want), dtype


def test_normalize_gradient_of_huge_and_tiny_rows():
    """The gradient through normalisation is that of x / |x| at any scale (the power-of-two scale is a
    constant): (g - y <y, g>) / |x|, computed in float64 by hand."""
    g = torch.Generator().manual_seed(5)
    for scale in (1e25, 1e-25, 1.0):
        text = (torch.randn(1, 3, 8, generator=g, dtype=torch.float64) * scale).float().requires_grad_()
        images = torch.randn(1, 2, 8, generator=g)
        score = aladin_fast.paired_scores(text, images, normalize=True, aggregation="sum", backend="cpu")
        score.sum().backward()
        x = text.detach().double()[0]
        y = x / x.norm(dim=-1, keepdim=True)
        v = torch.nn.functional.normalize(images.double()[0], dim=-1)
        up = v.sum(0).expand_as(y)
        want = (up - y * (y * up).sum(-1, keepdim=True)) / x.norm(dim=-1, keepdim=True)
        assert torch.allclose(text.grad.double()[0], want, rtol=1e-4, atol=1e-6 * want.abs().max().item()), scale


# ----------------------------------------------------------------------------- subnormals
def _subnormal_case():
    """Grid values k * 2**-70 (normal fp32) whose products k k' 2**-140 are fp32 subnormals: every product and
    partial sum is exact in fp32 (subnormals kept), so scores must equal the float64 oracle bit for bit."""
    g = torch.Generator().manual_seed(11)
    text = torch.randint(-3, 4, (8, 6, 16), generator=g).double() * 2.0 ** -70
    images = torch.randint(-3, 4, (300, 5, 16), generator=g).double() * 2.0 ** -70
    return text.float(), images.float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", [isa for isa in ("avx512", "avx2", "scalar") if isa in _C.available_isas()])
def test_cpu_kernel_keeps_subnormals_under_flush_denormal(threads, isa, monkeypatch):
    text, images = _subnormal_case()
    lengths_t, lengths_i = torch.full((8,), 6), torch.full((300,), 5)
    monkeypatch.setenv("ALADIN_FAST_ISA", isa)
    old_threads = torch.get_num_threads()
    for aggregation in ("sum", "MrSw"):
        want, _, _ = oracle(text, lengths_t, images, lengths_i, aggregation, False)
        assert (want != 0).any() and (np.abs(want[want != 0]) < 2.0 ** -126).all()  # subnormal results
        torch.set_num_threads(threads)
        try:
            if not torch.set_flush_denormal(True):
                pytest.skip("no FTZ / DAZ on this CPU")
            got = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu")
            grad_text = text.clone().requires_grad_()
            aladin_fast.alignment_scores(grad_text, images, aggregation=aggregation, backend="cpu").sum().backward()
        finally:
            torch.set_flush_denormal(False)  # before reading the (subnormal) results with torch ops
            torch.set_num_threads(old_threads)
        assert np.array_equal(got.double().numpy(), _fp32(want)), (aggregation, (got.numpy() != 0).sum())
        plain = text.clone().requires_grad_()
        aladin_fast.alignment_scores(plain, images, aggregation=aggregation, backend="cpu").sum().backward()
        assert torch.equal(grad_text.grad, plain.grad), aggregation


# ----------------------------------------------------------------------------- fp32 overflow
@pytest.mark.parametrize("path", TINY_PATHS, ids=_ids(TINY_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflowing_similarities_are_infinite_and_first_wins(path, dtype, path_env):
    """Finite tokens, same-sign products: an s_wr beyond the fp32 range is +-inf (one rounding, any order); maxes,
    sums and argmax then follow IEEE on those values, the first of tied infinities winning."""
    backend = path_env(path)
    text = torch.tensor([[[1e20, 1e20], [1.0, 1.0], [-1e20, -1e20], [1e19, 1e19]]]).to(dtype)
    images = torch.tensor([[[1e20, 1e20], [2e20, 2e20], [-1e20, -1e20], [1e18, 1e18], [3e18, 1e18]]]).to(dtype)
    for tl, il in ((4, 5), (3, 4)):
        tl, il = torch.tensor([tl]), torch.tensor([il])
        for aggregation, padding, got, am, want, want_am in _every_mode(text, images, tl, il, backend):
            # class for class (+inf, -inf, NaN from +inf + -inf, finite), value for value
            np.testing.assert_allclose(got, _fp32(want), rtol=1e-6, err_msg=f"{aggregation} {padding}")
            np.testing.assert_array_equal(am.numpy(), want_am, err_msg=f"{aggregation} {padding}")


@pytest.mark.parametrize("path", TINY_PATHS, ids=_ids(TINY_PATHS))
def test_cancelling_overflow_is_not_finite(path, path_env):
    """<[1e20, 1e20], [1e20, -1e20]> is exactly 0, but its fp32 products overflow with opposite signs: the
    result is +inf or NaN depending on the summation order (documented as unspecified), never a finite value."""
    backend = path_env(path)
    text, images = torch.tensor([[[1e20, 1e20]]]), torch.tensor([[[1e20, -1e20]]])
    for aggregation in AGGS:
        got = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend)
        assert not torch.isfinite(got).any(), (aggregation, got)


@pytest.mark.parametrize("path", TINY_PATHS, ids=_ids(TINY_PATHS))
def test_pooled_sum_overflow(path, path_env):
    """Each s_wr = 2e38 is finite, their sum is not: sum / MrSw are +inf everywhere; MrAVGw / mean are finite
    (2e38, the float64 definition) in the C++ kernel, which pools in double, and may be +inf in the backends
    that pool in fp32 (documented)."""
    backend = path_env(path)
    text, images = torch.full((1, 3, 2), 1e19), torch.full((1, 3, 2), 1e19)
    for aggregation in AGGS:
        got = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend).item()
        want, _, _ = oracle(text, [3], images, [3], aggregation, False)
        if aggregation in ("MrAVGw", "mean"):
            assert got == _fp32(want)[0, 0] or (backend != "cpu" and got == math.inf), (aggregation, got)
        else:
            assert got == math.inf, (aggregation, got)


# ----------------------------------------------------------------------------- ties and signed zeros
@pytest.mark.parametrize("path", TINY_PATHS, ids=_ids(TINY_PATHS))
def test_ties_signed_zeros_and_padding_value(path, path_env):
    """Similarities +0, -0 and exact ties with the zero-padding value: scores equal the oracle bit for bit
    (sign of zero included) and argmax is the first index attaining the max, padding (index n_r) only when
    it is strictly greater."""
    backend = path_env(path)
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [[-0.0, -0.0], [0.0, 0.0], [1.0, -1.0]]])
    images = torch.tensor([[[0.0, 0.0], [-0.0, 0.0], [0.0, -1.0]], [[-1.0, 0.0], [0.0, -1.0], [-2.0, -2.0]]])
    for tl, il in (([3, 2], [3, 2]), ([3, 3], [3, 3]), ([1, 1], [1, 2]), ([2, 0], [0, 3])):
        tl, il = torch.tensor(tl), torch.tensor(il)
        for aggregation, padding, got, am, want, want_am in _every_mode(text, images, tl, il, backend):
            np.testing.assert_array_equal(got, _fp32(want), err_msg=f"{aggregation} {padding} {tl} {il}")
            np.testing.assert_array_equal(np.signbit(got), np.signbit(_fp32(want)), err_msg=f"{aggregation}")
            np.testing.assert_array_equal(am.numpy(), want_am, err_msg=f"{aggregation} {padding} {tl} {il}")


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("path", CPU_PATHS, ids=_ids(CPU_PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(path, dtype, path_env):
    """Gradients come back in the tokens' dtype, each element the float64 gradient rounded once (fp32
    accumulation, then one rounding to the dtype): within 1 ulp of the dtype, plus fp32 slack."""
    backend = path_env(path)
    g = torch.Generator().manual_seed(2)
    text0 = torch.randn(2, 5, 300, generator=g).to(dtype)
    images0 = torch.randn(3, 4, 300, generator=g).to(dtype)
    tl, il = torch.tensor([5, 3]), torch.tensor([4, 2, 0])
    upstream = torch.randn(2, 3, generator=g, dtype=torch.float64)
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for aggregation in AGGS:
        for padding in ("neg_inf", "zero"):
            t64, i64 = text0.double().requires_grad_(), images0.double().requires_grad_()
            (aladin_fast.alignment_scores(t64, i64, tl, il, aggregation=aggregation, padding=padding,
                                          backend="reference") * upstream).sum().backward()
            t, i = text0.clone().requires_grad_(), images0.clone().requires_grad_()
            (aladin_fast.alignment_scores(t, i, tl, il, aggregation=aggregation, padding=padding,
                                          backend=backend) * upstream.float()).sum().backward()
            for got, want in ((t.grad, t64.grad), (i.grad, i64.grad)):
                assert got.dtype == dtype
                err = (got.double() - want).abs()
                bound = ulp * want.abs() + 1e-6 * want.abs().max() + 1e-30
                assert (err <= bound).all(), (aggregation, padding, (err / bound).max().item())
