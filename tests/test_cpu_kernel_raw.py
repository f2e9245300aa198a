"""Raw tests of the C++ CPU kernel `aladin_fast._C.score` against an independent
float64 reference written straight from docs/kernel_contract.md.

Every aggregation x padding mode x dtype x code path (avx512 when the CPU has it,
avx2, scalar) is compared on shapes with W, R in {1, 7, 36, 37, 50} and
D in {1, 3, 64, 100, 768}, lengths 0 / partial / full, Nt != Ni, candidates with
repeats, padded and packed (gapped) layouts.  Two data kinds:

* "exact": values are multiples of 1/4 in [-2, 2], so every product and every fp32
  partial sum is exact: scores and argmax (including ties -> first index) must
  match the float64 reference exactly;
* "random": continuous data (rounded to the input dtype first), compared with a
  tolerance relative to the sum of |products|; argmax is checked by value.
"""
import math

import numpy as np
import pytest
import torch

_C = pytest.importorskip("aladin_fast._C")

AGGS = range(6)  # MrSw, MrAVGw, MwSr, symm, sum, mean
ISAS = [isa for isa in ("avx512", "avx2", "scalar") if isa in _C.available_isas()]


# ----------------------------------------------------------------------------- helpers
def to_kernel_dtype(x32, dtype):
    """fp32 numpy -> (array handed to the kernel, fp32 values it represents)."""
    t = torch.from_numpy(np.ascontiguousarray(x32, dtype=np.float32))
    if dtype == "float32":
        return t.numpy().copy(), t.numpy().copy()
    if dtype == "float16":
        h = t.to(torch.float16)
        return h.numpy().copy(), h.float().numpy()
    b = t.to(torch.bfloat16)
    return b.view(torch.int16).numpy().view(np.uint16).copy(), b.float().numpy()


def reference(text, toff, tlen, images, ioff, ilen, cand, zero, wpad, rpad):
    """float64 reference: returns scores [6, Nt, K] (all aggregations), argmax [Nt, K, W_pad],
    the per-pair score matrices (for value checks) and per-pair sum of |products|."""
    T = torch.from_numpy(text).double()
    I = torch.from_numpy(images).double()
    nt = len(toff)
    k = cand.shape[1] if cand is not None else len(ioff)
    out = np.zeros((6, nt, k))
    am = np.full((nt, k, wpad), -1, dtype=np.int64)
    mats, scale = {}, np.zeros((nt, k))
    for i in range(nt):
        t = T[toff[i] : toff[i] + tlen[i]]
        nw = int(tlen[i])
        for kk in range(k):
            j = int(cand[i, kk]) if cand is not None else kk
            v = I[ioff[j] : ioff[j] + ilen[j]]
            nr = int(ilen[j])
            s = (t @ v.T).numpy()  # [nw, nr] float64
            mats[i, kk] = s
            scale[i, kk] = float((t.abs() @ v.abs().T).sum()) if nw and nr else 0.0
            pad_r = zero and nr < rpad
            pad_w = zero and nw < wpad
            rows = np.concatenate([s, np.zeros((nw, 1))], axis=1) if pad_r else s
            if rows.shape[1] > 0:
                m = rows.max(axis=1)
                am[i, kk, :nw] = rows.argmax(axis=1)  # numpy: first occurrence
            else:
                m = np.zeros(nw)
            cols = np.concatenate([s, np.zeros((1, nr))], axis=0) if pad_w else s
            c = cols.max(axis=0) if cols.shape[0] > 0 else np.zeros(nr)
            with np.errstate(invalid="ignore"):  # +inf + -inf in the NaN test
                mrsw, mwsr, tot = m.sum(), c.sum(), s.sum()
            if zero:
                mean = tot / (wpad * rpad) if wpad * rpad else 0.0
            else:
                mean = tot / (nw * nr) if nw * nr else 0.0
            vals = [mrsw, mrsw / nw if nw else 0.0, mwsr, mrsw + mwsr, tot, mean]
            if np.isnan(s).any():
                vals = [math.nan] * 6
            out[:, i, kk] = vals
    return out, am, mats, scale


def run_kernel(kin, agg, zero, isa, with_argmax=True, num_threads=0):
    nt = len(kin["toff"])
    k = kin["cand"].shape[1] if kin["cand"] is not None else len(kin["ioff"])
    out = np.full((nt, k), 12345.0, dtype=np.float32)
    am = np.full((nt, k, kin["wpad"]), -7, dtype=np.int32) if with_argmax else None
    _C.score(
        kin["text"], kin["toff"], kin["tlen"], kin["images"], kin["ioff"], kin["ilen"], kin["cand"],
        kin["dtype"], agg, zero, kin["wpad"], kin["rpad"], out, am, isa=isa, num_threads=num_threads,
    )
    return out, am


def make_case(rng, *, W, R, D, nt, ni, mode, dtype, data, packed=False, k=None):
    """Random inputs in the kernel's normalised form."""
    def values(n):
        if data == "exact":
            return rng.integers(-8, 9, size=(n, D)).astype(np.float32) / 4.0
        return rng.standard_normal((n, D)).astype(np.float32)

    def lengths(n, pad):
        ln = rng.integers(0, pad + 1, size=n)
        if n >= 3:  # force 0 / partial / full
            ln[0], ln[1], ln[2] = pad, 0, max(1, pad // 2)
        return ln.astype(np.int32)

    tlen, ilen = lengths(nt, W), lengths(ni, R)
    if packed:  # packed rows with gaps between items; pads = max length
        def layout(ln):
            offs, pos = [], 3
            for n in ln:
                offs.append(pos)
                pos += int(n) + int(rng.integers(0, 3))
            return np.array(offs, dtype=np.int64), pos + 2
        toff, t_rows = layout(tlen)
        ioff, i_rows = layout(ilen)
        wpad, rpad = int(tlen.max()), int(ilen.max())
    else:
        toff, t_rows = np.arange(nt, dtype=np.int64) * W, nt * W
        ioff, i_rows = np.arange(ni, dtype=np.int64) * R, ni * R
        wpad, rpad = W, R
    text_k, text_v = to_kernel_dtype(values(t_rows), dtype)
    img_k, img_v = to_kernel_dtype(values(i_rows), dtype)
    if mode == "all":
        cand = None
    elif mode == "paired":
        assert nt == ni
        cand = np.arange(nt, dtype=np.int64)[:, None].copy()
    else:
        cand = rng.integers(0, ni, size=(nt, k or 5)).astype(np.int64)
        cand[0, -1] = cand[0, 0]  # repeats
    kin = dict(text=text_k, toff=toff, tlen=tlen, images=img_k, ioff=ioff, ilen=ilen, cand=cand,
               dtype=dtype, wpad=wpad, rpad=rpad)
    vals = dict(text=text_v, images=img_v)
    return kin, vals


def ref_for(kin, vals, zero):
    return reference(vals["text"], kin["toff"], kin["tlen"], vals["images"], kin["ioff"], kin["ilen"],
                     kin["cand"], zero, kin["wpad"], kin["rpad"])


def check(kin, ref, out, am, agg, exact, label, zero):
    ref_out, ref_am, mats, scale = ref
    r = ref_out[agg]
    nan_ref = np.isnan(r)
    assert np.array_equal(np.isnan(out), nan_ref), f"{label}: NaN pattern differs"
    o = out.astype(np.float64)
    if exact:
        # scores exact up to the final fp32 rounding of the (double) aggregation
        tol = 1e-6 * np.abs(r) + 1e-30
    else:
        tol = 1e-5 * scale + 1e-6 * np.abs(r) + 1e-6
    with np.errstate(invalid="ignore"):
        err = np.where(nan_ref | (o == r), 0.0, np.abs(o - np.where(nan_ref, 0.0, r)))  # o == r: equal infinities
        ok = err <= np.where(nan_ref, 1.0, tol)
    assert ok.all(), (
        f"{label}: max err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    )
    if am is None:
        return
    nt, k, wpad = am.shape
    for i in range(nt):
        nw = int(kin["tlen"][i])
        for kk in range(k):
            j = int(kin["cand"][i, kk]) if kin["cand"] is not None else kk
            nr = int(kin["ilen"][j])
            if nan_ref[i, kk]:
                assert ((am[i, kk] >= -1) & (am[i, kk] < max(kin["rpad"], 1))).all(), f"{label}: NaN-pair argmax range"
                continue
            assert (am[i, kk, nw:] == -1).all(), f"{label}: padded words must be -1"
            if exact:
                assert np.array_equal(am[i, kk, :nw], ref_am[i, kk, :nw]), (
                    f"{label}: argmax pair ({i},{kk}) {am[i, kk, :nw]} != {ref_am[i, kk, :nw]}"
                )
            else:
                s = mats[i, kk]
                pad_r = zero and nr < kin["rpad"]
                for w in range(nw):
                    a = int(am[i, kk, w])
                    if nr == 0:
                        assert a == (0 if pad_r else -1), f"{label}: empty-image argmax"
                        continue
                    best = max(s[w].max(), 0.0) if pad_r else s[w].max()
                    got = 0.0 if a == nr else s[w, a]
                    assert 0 <= a <= (nr if pad_r else nr - 1), f"{label}: argmax out of range"
                    assert got == best or abs(got - best) <= 1e-5 * scale[i, kk] + 1e-6, f"{label}: argmax value"


CASES = [
    # (W, R, D, nt, ni, mode, packed)
    (1, 1, 1, 3, 4, "all", False),
    (7, 37, 3, 4, 3, "rerank", False),
    (36, 7, 64, 3, 5, "all", False),
    (37, 36, 100, 3, 4, "rerank", True),
    (50, 50, 768, 3, 3, "paired", False),
    (36, 50, 768, 2, 3, "all", True),
    (7, 1, 64, 3, 2, "all", False),
]


@pytest.mark.parametrize("data", ["exact", "random"])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}R{c[1]}D{c[2]}-{c[5]}{'-packed' if c[6] else ''}")
def test_against_reference(case, dtype, zero, data):
    W, R, D, nt, ni, mode, packed = case
    rng = np.random.default_rng(hash((case, dtype, zero, data)) % (2**32))
    kin, vals = make_case(rng, W=W, R=R, D=D, nt=nt, ni=ni, mode=mode, dtype=dtype, data=data, packed=packed)
    ref = ref_for(kin, vals, zero)
    for isa in ISAS:
        for agg in AGGS:
            out, am = run_kernel(kin, agg, zero, isa)
            check(kin, ref, out, am, agg, data == "exact", f"{isa} agg={agg} zero={zero} {dtype} {data}", zero)
        # without argmax (row pass skipped for MwSr / sum / mean) the scores are unchanged
        for agg in (2, 4, 5):
            out2, _ = run_kernel(kin, agg, zero, isa, with_argmax=False)
            out1, _ = run_kernel(kin, agg, zero, isa)
            np.testing.assert_array_equal(out1, out2)


@pytest.mark.parametrize("word_chunk", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_blocking_variants(monkeypatch, word_chunk, dtype):
    """Exercise every micro-kernel shape and D-chunk boundaries (tuning knobs read per call)."""
    monkeypatch.setenv("ALADIN_FAST_WORD_CHUNK", str(word_chunk))
    monkeypatch.setenv("ALADIN_FAST_DC_F32", "48")
    monkeypatch.setenv("ALADIN_FAST_DC_LOWP", "32")
    monkeypatch.setenv("ALADIN_FAST_PREFETCH", "16")
    rng = np.random.default_rng(word_chunk)
    kin, vals = make_case(rng, W=70, R=29, D=131, nt=3, ni=4, mode="all", dtype=dtype, data="exact")
    for zero in (False, True):
        ref = ref_for(kin, vals, zero)
        for isa in ISAS:
            for agg in (0, 2, 4):
                out, am = run_kernel(kin, agg, zero, isa)
                check(kin, ref, out, am, agg, True, f"{isa} agg={agg} zero={zero} wc={word_chunk}", zero)


def test_large_pads():
    rng = np.random.default_rng(7)
    kin, vals = make_case(rng, W=300, R=130, D=33, nt=2, ni=2, mode="all", dtype="float32", data="exact")
    ref = ref_for(kin, vals, True)
    for isa in ISAS:
        for agg in (0, 3, 5):
            out, am = run_kernel(kin, agg, True, isa)
            check(kin, ref, out, am, agg, True, f"{isa} agg={agg} zero=True large", True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_rows_auto_chunking(dtype):
    """R * D large enough that converted fp16/bf16 rows are processed in D chunks by default."""
    rng = np.random.default_rng(8)
    kin, vals = make_case(rng, W=20, R=100, D=1100, nt=2, ni=2, mode="all", dtype=dtype, data="exact")
    for zero in (False, True):
        ref = ref_for(kin, vals, zero)
        for isa in ISAS:
            for agg in (0, 2, 4):
                out, am = run_kernel(kin, agg, zero, isa)
                check(kin, ref, out, am, agg, True, f"{isa} agg={agg} zero={zero} long", zero)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nan_poisons_only_its_pairs(dtype):
    rng = np.random.default_rng(11)
    W, R, D, nt, ni = 9, 10, 40, 4, 5
    x_t = rng.standard_normal((nt * W, D)).astype(np.float32)
    x_i = rng.standard_normal((ni * R, D)).astype(np.float32)
    tlen = np.array([9, 5, 9, 3], dtype=np.int32)
    ilen = np.array([10, 4, 10, 10, 6], dtype=np.int32)
    x_t[1 * W + 2, 7] = np.nan       # caption 1, valid word 2
    x_t[3 * W + 5, 0] = np.nan       # caption 3, padded word (length 3): must not poison
    x_i[2 * R + 9, 3] = np.nan       # image 2, valid region 9
    x_i[1 * R + 6, 1] = np.nan       # image 1, padded region (length 4): must not poison
    x_i[4 * R + 7:5 * R, :] = np.inf  # image 4, padded regions full of inf: must not matter
    x_i[3 * R + 0, 5] = np.inf        # image 3, valid region: s = +-inf for valid words, but 0 * inf = NaN
                                      # in the zero-filled SIMD lanes of padded words, which must be masked
    text_k, text_v = to_kernel_dtype(x_t, dtype)
    img_k, img_v = to_kernel_dtype(x_i, dtype)
    kin = dict(text=text_k, toff=np.arange(nt, dtype=np.int64) * W, tlen=tlen, images=img_k,
               ioff=np.arange(ni, dtype=np.int64) * R, ilen=ilen, cand=None, dtype=dtype, wpad=W, rpad=R)
    expected_nan = np.zeros((nt, ni), dtype=bool)
    expected_nan[1, :] = True
    expected_nan[:, 2] = True
    for zero in (False, True):
        ref = reference(text_v, kin["toff"], tlen, img_v, kin["ioff"], ilen, None, zero, W, R)
        for isa in ISAS:
            for agg in AGGS:
                out, am = run_kernel(kin, agg, zero, isa)
                if agg <= 3:
                    assert np.array_equal(np.isnan(out), expected_nan), f"{isa} agg={agg}"
                else:  # sum / mean of +inf and -inf scores (image 3) is NaN by arithmetic
                    assert np.isnan(out)[expected_nan].all(), f"{isa} agg={agg}"
                check(kin, ref, out, am, agg, False, f"{isa} agg={agg} zero={zero} nan", zero)


def test_ties_first_index_and_zero_padding():
    D = 8
    v = np.zeros((4, D), dtype=np.float32)
    v[0, 0] = -1.0
    v[1, 0] = 2.0
    v[2, 0] = 2.0                   # ties region 1
    v[3, 0] = 1.0
    t = np.zeros((3, D), dtype=np.float32)
    t[0, 0] = 1.0                   # scores [-1, 2, 2, 1] -> region 1 (first of the tie)
    t[1, 0] = -1.0                  # scores [1, -2, -2, -1] -> region 0
    t[2, 1] = 1.0                   # scores [0, 0, 0, 0] -> region 0
    img1 = -np.abs(v[:3]) - 1.0     # image 1 (3 regions): every score negative
    kin = dict(text=t, toff=np.array([0], dtype=np.int64), tlen=np.array([3], dtype=np.int32),
               images=np.concatenate([v, img1]), ioff=np.array([0, 4], dtype=np.int64),
               ilen=np.array([4, 3], dtype=np.int32), cand=None, dtype="float32", wpad=5, rpad=5)
    for isa in ISAS:
        out, am = run_kernel(kin, 0, False, isa)
        assert am[0, 0].tolist() == [1, 0, 0, -1, -1], isa
        # image 1 scores: word 0 [-2,-3,-3], word 1 [2,3,3] (tie), word 2 [-1,-1,-1] (tie)
        assert am[0, 1].tolist() == [0, 1, 0, -1, -1], isa
        assert out[0, 0] == 2 + 1 + 0 and out[0, 1] == -2 + 3 - 1
        out, am = run_kernel(kin, 0, True, isa)
        # image 0: n_r = 4 < R_pad = 5, word 2's valid 0 ties the padding value -> first (valid) index
        assert am[0, 0].tolist() == [1, 0, 0, -1, -1], isa
        # image 1: padding value 0 strictly beats the negative scores of words 0 and 2 -> index n_r = 3
        assert am[0, 1, 0] == 3 and am[0, 1, 2] == 3, isa
        assert out[0, 0] == 3 and out[0, 1] == 0 + 3 + 0


def test_deterministic_across_threads():
    rng = np.random.default_rng(5)
    kin, _ = make_case(rng, W=32, R=36, D=256, nt=5, ni=7, mode="all", dtype="float32", data="random")
    for isa in ISAS:
        a, am_a = run_kernel(kin, 0, False, isa, num_threads=1)
        b, am_b = run_kernel(kin, 0, False, isa, num_threads=2)
        c, am_c = run_kernel(kin, 0, False, isa, num_threads=3)
        assert a.tobytes() == b.tobytes() == c.tobytes()
        assert np.array_equal(am_a, am_b) and np.array_equal(am_a, am_c)


# (W, R, D, nt, ni, mode, k).  The forward driver picks fewer threads than asked for small jobs
# (~2M FMA-equivalents per thread, work ~ pairs * (W * R * (D + 8) + 1500)): the first two cases
# stay on 1 thread, the others are large enough for 3 threads, so 1 vs 2 vs 3 vs the default
# compares real splits there (ragged lengths, candidates with repeats, packed rows).
THREAD_CASES = [
    (32, 36, 64, 1, 50, "rerank", 10),      # the tiny serving rerank: one thread whatever is asked
    (5, 6, 16, 3, 4, "all", None),
    (32, 36, 128, 3, 60, "rerank", 40),     # ~19M FMA-eq
    (1, 1, 1, 40, 600, "all", None),        # 24000 near-empty pairs: per-pair cost only, ~36M
    (37, 36, 100, 9, 11, "all", None),      # 99 pairs, ~13M
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: "x".join(map(str, c[:5])) + c[5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bitwise_identical_for_any_thread_count(case, dtype):
    W, R, D, nt, ni, mode, k = case
    rng = np.random.default_rng(11)
    kin, _ = make_case(rng, W=W, R=R, D=D, nt=nt, ni=ni, mode=mode, dtype=dtype, data="random", k=k)
    for isa in ISAS:
        for agg, zero in ((0, False), (3, True), (5, False)):
            runs = [run_kernel(kin, agg, zero, isa, num_threads=n) for n in (1, 2, 3, 0)]
            first_out, first_am = runs[0]
            for n, (out, am) in zip((2, 3, 0), runs[1:]):
                assert out.tobytes() == first_out.tobytes(), (isa, agg, zero, n)
                assert np.array_equal(am, first_am), (isa, agg, zero, n)


def test_empty_inputs():
    D = 4
    kin = dict(text=np.zeros((0, D), np.float32), toff=np.zeros(0, np.int64), tlen=np.zeros(0, np.int32),
               images=np.ones((2, D), np.float32), ioff=np.array([0], np.int64), ilen=np.array([2], np.int32),
               cand=None, dtype="float32", wpad=3, rpad=2)
    out, am = run_kernel(kin, 0, False, ISAS[0])
    assert out.shape == (0, 1)
    # D = 0: every dot product is an empty sum (= 0)
    kin = dict(text=np.zeros((2, 0), np.float32), toff=np.array([0], np.int64), tlen=np.array([2], np.int32),
               images=np.zeros((3, 0), np.float32), ioff=np.array([0], np.int64), ilen=np.array([3], np.int32),
               cand=None, dtype="float32", wpad=2, rpad=3)
    for isa in ISAS:
        out, am = run_kernel(kin, 4, False, isa)
        assert out[0, 0] == 0.0 and am[0, 0].tolist() == [0, 0]


def test_isa_selection(monkeypatch):
    avail = _C.available_isas()
    assert avail[-1] == "scalar" and _C.best_isa() == avail[0]
    info = _C.build_info()
    assert info["openmp"] and "scalar" in info["compiled_isas"] and info["best_isa"] == avail[0]
    rng = np.random.default_rng(3)
    kin, _ = make_case(rng, W=5, R=6, D=16, nt=2, ni=2, mode="all", dtype="float32", data="exact")
    with pytest.raises(ValueError, match="^isa must be"):
        run_kernel(kin, 0, False, "sse9")
    missing = [isa for isa in ("avx512", "avx2") if isa not in avail]
    for isa in missing:
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            run_kernel(kin, 0, False, isa)
    # the environment variable overrides "auto" (but not an explicit isa)
    monkeypatch.setenv("ALADIN_FAST_ISA", "bogus")
    with pytest.raises(ValueError, match="^ALADIN_FAST_ISA must be .* got 'bogus' \\(unset it"):  # names the variable
        run_kernel(kin, 0, False, "auto")
    for isa in missing:
        monkeypatch.setenv("ALADIN_FAST_ISA", isa)
        with pytest.raises(RuntimeError, match=f"^ALADIN_FAST_ISA = '{isa}' is not supported by this CPU"):
            run_kernel(kin, 0, False, "auto")
    monkeypatch.setenv("ALADIN_FAST_ISA", "bogus")
    run_kernel(kin, 0, False, "scalar")
    monkeypatch.setenv("ALADIN_FAST_ISA", "scalar")
    a, _ = run_kernel(kin, 0, False, "auto")
    b, _ = run_kernel(kin, 0, False, "scalar")
    assert a.tobytes() == b.tobytes()


def test_validation_errors():
    rng = np.random.default_rng(4)
    kin, _ = make_case(rng, W=5, R=6, D=16, nt=2, ni=3, mode="rerank", dtype="float32", data="exact", k=2)
    out = np.zeros((2, 2), np.float32)
    args = lambda **kw: {**dict(text=kin["text"], text_offsets=kin["toff"], text_lengths=kin["tlen"],
                                images=kin["images"], image_offsets=kin["ioff"], image_lengths=kin["ilen"],
                                candidates=kin["cand"], dtype="float32", aggregation=0, zero_padding=False,
                                text_pad=5, image_pad=6, out=out, argmax=None), **kw}
    _C.score(**args())
    bad = [
        dict(out=np.zeros((2, 3), np.float32)),
        dict(out=np.zeros((2, 2), np.float64)),
        dict(out=np.zeros((2, 4), np.float32)[:, ::2]),
        dict(text=kin["text"].astype(np.float64)),
        dict(dtype="float16"),
        dict(dtype="int8"),
        dict(aggregation=6),
        dict(text_lengths=kin["tlen"].astype(np.int64)),
        dict(candidates=np.array([[0, 3], [1, 2]], np.int64)),
        dict(candidates=np.array([[0, -1], [1, 2]], np.int64)),
        dict(argmax=np.zeros((2, 2, 4), np.int32)),
        dict(text_pad=2),
        dict(images=kin["images"][:, :8].copy()),
        dict(image_offsets=kin["ioff"] + 100),
        dict(out=[[0.0, 0.0], [0.0, 0.0]]),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            _C.score(**args(**kw))
