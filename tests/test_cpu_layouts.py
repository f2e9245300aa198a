"""Every forward layout of the C++ CPU kernel against the float64 reference.

The kernel has two micro-kernel layouts that fill the same score tile (csrc/aladin_kernel.h,
docs/kernel_contract.md "CPU layouts"): ``words`` (words in SIMD lanes) and ``dot`` (D in SIMD
lanes), and one shape-aware choice between them (``choose_layout`` in kernel_driver.cpp,
exposed as ``_C.layout_for``).  The other raw-kernel tests run whichever layout the dispatch
picks for their shapes; here each layout is forced, both with the ``layout=`` argument and with
the ``ALADIN_FAST_CPU_LAYOUT`` environment variable, on the awkward shapes of
test_cpu_kernel_raw (lengths 0 / 1 / 37, non-powers of two, D tails, all-masked rows, empty
batches, NaN / inf, ties) for every code path this CPU can run.

The DOT layout reads bf16 rows either through an fp32 scratch or directly (two widening ops per
2W values, ``bf16_direct`` in kernel_driver.cpp: captions of at most 12 words, D a multiple of
2W); ``ALADIN_FAST_BF16_DIRECT_WORDS`` (0 = never, large = always where D allows) forces each.
"""
import numpy as np
import pytest

import test_cpu_kernel_raw as raw

_C = raw._C
LAYOUTS = ["words", "dot"]
ISAS = raw.ISAS


@pytest.fixture(params=LAYOUTS)
def forced_layout(request, monkeypatch):
    """Forces one layout for every _C.score call of the test (the env var is read per call)."""
    monkeypatch.setenv("ALADIN_FAST_CPU_LAYOUT", request.param)
    return request.param


# a representative slice of raw.CASES x dtypes x padding: every shape, each dtype and padding
# mode at least once (the full cross product already runs on the default layout)
LAYOUT_CASES = [
    (case, dtype, zero, data)
    for n, case in enumerate(raw.CASES)
    for dtype, zero, data in (
        ("float32", n % 2 == 0, "exact"),
        (("bfloat16", "float16")[n % 2], n % 2 == 1, "random"),
    )
]


@pytest.mark.parametrize("case,dtype,zero,data", LAYOUT_CASES,
                         ids=lambda v: f"{v}" if not isinstance(v, tuple) else "W{}R{}D{}-{}".format(*v[:3], v[5]))
def test_layout_against_reference(forced_layout, case, dtype, zero, data):
    raw.test_against_reference(case, dtype, zero, data)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layout_d_chunks_and_tails(forced_layout, monkeypatch, dtype):
    """D chunks (accumulated across chunks in the tile), D tails shorter than a vector, word and
    region block tails (W=70, R=29, D=131 with 48 / 32-column chunks)."""
    monkeypatch.setenv("ALADIN_FAST_DC_F32", "48")
    monkeypatch.setenv("ALADIN_FAST_DC_LOWP", "32")
    rng = np.random.default_rng(3)
    kin, vals = raw.make_case(rng, W=70, R=29, D=131, nt=3, ni=4, mode="all", dtype=dtype, data="exact")
    for zero in (False, True):
        ref = raw.ref_for(kin, vals, zero)
        for isa in ISAS:
            for agg in (0, 2, 3, 5):
                out, am = raw.run_kernel(kin, agg, zero, isa)
                raw.check(kin, ref, out, am, agg, True, f"{forced_layout} {isa} agg={agg} zero={zero}", zero)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layout_nan_inf(forced_layout, dtype):
    raw.test_nan_poisons_only_its_pairs(dtype)


def test_layout_ties_and_empty(forced_layout):
    raw.test_ties_first_index_and_zero_padding()
    raw.test_empty_inputs()
    raw.test_large_pads()


@pytest.mark.parametrize("case", raw.THREAD_CASES[2:4], ids=lambda c: "x".join(map(str, c[:5])))
def test_layout_bitwise_identical_for_any_thread_count(forced_layout, case):
    raw.test_bitwise_identical_for_any_thread_count(case, "float32")


def _score(kin, agg, zero, isa, layout, region_argmax=False):
    nt = len(kin["toff"])
    k = kin["cand"].shape[1] if kin["cand"] is not None else len(kin["ioff"])
    out = np.full((nt, k), 12345.0, dtype=np.float32)
    am = np.full((nt, k, kin["wpad"]), -7, dtype=np.int32)
    ram = np.full((nt, k, kin["rpad"]), -7, dtype=np.int32) if region_argmax else None
    _C.score(kin["text"], kin["toff"], kin["tlen"], kin["images"], kin["ioff"], kin["ilen"], kin["cand"],
             kin["dtype"], agg, zero, kin["wpad"], kin["rpad"], out, am, isa=isa, region_argmax=ram,
             layout=layout)
    return out, am, ram


@pytest.mark.parametrize("shape", [(20, 36, 768), (32, 300, 128), (1, 37, 5), (37, 1, 100), (9, 50, 1)],
                         ids=lambda s: "W{}R{}D{}".format(*s))
def test_layouts_agree_exactly_on_exact_data(shape):
    """On data whose products and partial sums are exact, both layouts give the same bits,
    the same word -> region argmax and the same region -> word argmax (first index wins)."""
    W, R, D = shape
    rng = np.random.default_rng(W * 1000 + R)
    kin, _ = raw.make_case(rng, W=W, R=R, D=D, nt=3, ni=4, mode="rerank", dtype="float32", data="exact", k=6)
    for isa in ISAS:
        for agg, zero in ((0, False), (3, True), (2, False), (5, True)):
            a = _score(kin, agg, zero, isa, "words", region_argmax=True)
            b = _score(kin, agg, zero, isa, "dot", region_argmax=True)
            assert a[0].tobytes() == b[0].tobytes(), (isa, agg, zero)
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]), (isa, agg, zero)


def test_layout_argument_env_and_errors(monkeypatch):
    rng = np.random.default_rng(1)
    kin, vals = raw.make_case(rng, W=20, R=36, D=96, nt=2, ni=3, mode="all", dtype="float32", data="exact")
    ref = raw.ref_for(kin, vals, False)
    monkeypatch.setenv("ALADIN_FAST_CPU_LAYOUT", "words")
    for layout in ("auto", "words", "dot", "DOT"):  # an explicit argument wins over the env var
        out, am, _ = _score(kin, 0, False, ISAS[0], layout)
        raw.check(kin, ref, out, am, 0, True, layout, False)
    monkeypatch.setenv("ALADIN_FAST_CPU_LAYOUT", "regions")
    with pytest.raises(ValueError, match="ALADIN_FAST_CPU_LAYOUT"):
        _score(kin, 0, False, ISAS[0], "auto")
    _score(kin, 0, False, ISAS[0], "dot")  # the env var is not consulted when the argument is explicit
    with pytest.raises(ValueError, match="layout must be"):
        _score(kin, 0, False, ISAS[0], "lanes")


def test_layout_for_dispatch(monkeypatch):
    """The one shape-aware choice: explicit requests pass through, 'auto' gives a real layout that
    depends on the caption's own length, the dtype and the ISA only."""
    monkeypatch.delenv("ALADIN_FAST_CPU_LAYOUT", raising=False)
    for isa in ISAS:
        for shape in ((20, 36, 768), (32, 36, 1024), (32, 300, 128), (8, 36, 768), (1, 1, 1), (0, 5, 7)):
            for dtype in ("float32", "bfloat16"):
                assert _C.layout_for(*shape, dtype=dtype, isa=isa) in LAYOUTS, (isa, shape, dtype)
                assert _C.layout_for(*shape, dtype=dtype, isa=isa, layout="words") == "words"
                assert _C.layout_for(*shape, dtype=dtype, isa=isa, layout="dot") == "dot"
    if "avx2" in ISAS:  # the measured rules (kernel_driver.cpp)
        assert _C.layout_for(32, 36, 1024, isa="avx2") == "dot"  # fp32: dot
        assert _C.layout_for(20, 36, 768, "bfloat16", isa="avx2") == "dot"  # 20 of 24 lanes
        assert _C.layout_for(32, 36, 1024, "bfloat16", isa="avx2") == "words"  # full lanes
    assert _C.layout_for(20, 36, 768, isa="scalar") == "words"
    monkeypatch.setenv("ALADIN_FAST_CPU_LAYOUT", "words")
    assert _C.layout_for(20, 36, 768) == "words"


@pytest.mark.parametrize("dtype, message", [("float64", "float64 kernel"), ("int8", "dtype must be"),
                                            ("half", "dtype must be"), ("", "dtype must be")])
def test_layout_for_refuses_dtypes_without_a_layout_choice(dtype, message):
    """Any name but float32 / float16 / bfloat16 was answered as float32 ('int8' got a layout; 'float64', which
    runs the scalar float64 kernel, was told 'dot')."""
    with pytest.raises(ValueError, match=message):
        _C.layout_for(20, 36, 768, dtype)


@pytest.mark.parametrize("shape", [(-1, 36, 768), (20, -1, 768), (20, 36, -1)])
def test_layout_for_refuses_negative_sizes(shape):
    with pytest.raises(ValueError, match=">= 0"):
        _C.layout_for(*shape)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pair_bits_independent_of_the_batch(dtype):
    """A pair's score has the same bits in any batch: captions of mixed lengths (some below,
    some at a multiple of the vector width), long images (R x D large enough for the words
    layout's converted rows to be D-chunked), all pairs vs one caption vs gathered candidates."""
    rng = np.random.default_rng(5)
    for D in (1100, 1024):  # 1024: the short captions read bf16 rows directly in the DOT layout
        kin, _ = raw.make_case(rng, W=24, R=120, D=D, nt=5, ni=4, mode="all", dtype=dtype, data="random")
        kin["tlen"][:] = [24, 16, 20, 7, 8]
        _check_pair_bits(kin)


def _check_pair_bits(kin):
    for isa in ISAS:
        whole, _ = raw.run_kernel(kin, 3, False, isa)
        for i in range(5):
            one = dict(kin, toff=kin["toff"][i:i + 1], tlen=kin["tlen"][i:i + 1])
            row, _ = raw.run_kernel(one, 3, False, isa)
            assert row.tobytes() == whole[i:i + 1].tobytes(), (isa, i)
            gathered = dict(one, cand=np.array([[3, 1]], np.int64))
            row_g, _ = raw.run_kernel(gathered, 3, False, isa)
            assert row_g.tobytes() == whole[i:i + 1, [3, 1]].tobytes(), (isa, i)


@pytest.mark.parametrize("direct_words", ["0", "1000"], ids=["scratch", "direct"])
@pytest.mark.parametrize("shape", [(1, 1, 16), (4, 36, 768), (7, 37, 64), (12, 5, 48), (13, 3, 32), (37, 9, 96),
                                   (5, 6, 40), (3, 4, 17)], ids=lambda s: "W{}R{}D{}".format(*s))
def test_dot_bf16_rows_scratch_and_direct(monkeypatch, direct_words, shape):
    """bf16 images in the DOT layout, through the scratch and read directly, against the float64
    reference: every aggregation, both paddings, masked lengths, region argmax; D = 40 / 17 (not a
    multiple of 2W) must take the scratch whatever is asked."""
    monkeypatch.setenv("ALADIN_FAST_BF16_DIRECT_WORDS", direct_words)
    W, R, D = shape
    rng = np.random.default_rng(W * 100 + R + D)
    for mode, k in (("all", None), ("rerank", 3)):
        kin, vals = raw.make_case(rng, W=W, R=R, D=D, nt=3, ni=4, mode=mode, dtype="bfloat16", data="random", k=k)
        for zero in (False, True):
            ref = raw.ref_for(kin, vals, zero)
            for isa in ISAS:
                for agg in range(6):
                    out, am, ram = _score(kin, agg, zero, isa, "dot", region_argmax=True)
                    raw.check(kin, ref, out, am, agg, False, f"{isa} agg={agg} zero={zero} {mode}", zero)


def test_dot_bf16_direct_nan_and_exact_agreement(monkeypatch):
    """NaN / inf handling is the scratch path's; on exact data both give the same bits."""
    monkeypatch.setenv("ALADIN_FAST_CPU_LAYOUT", "dot")
    monkeypatch.setenv("ALADIN_FAST_BF16_DIRECT_WORDS", "1000")
    raw.test_nan_poisons_only_its_pairs("bfloat16")
    rng = np.random.default_rng(8)
    kin, _ = raw.make_case(rng, W=6, R=37, D=64, nt=3, ni=5, mode="all", dtype="bfloat16", data="exact")
    for isa in ISAS:
        results = []
        for words in ("0", "1000"):
            monkeypatch.setenv("ALADIN_FAST_BF16_DIRECT_WORDS", words)
            results.append(_score(kin, 3, True, isa, "dot", region_argmax=True))
        assert results[0][0].tobytes() == results[1][0].tobytes(), isa
        assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][2], results[1][2]), isa


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_preconverted_images_same_bits(monkeypatch, layout, dtype):
    """fp16 / bf16 all pairs convert every image row to fp32 once, up front (``preconvert_images`` in
    kernel_driver.cpp), instead of once per pair: the same fp32 values reach the same micro-kernels, so
    scores and both argmaxes are bitwise those of the per-pair conversion (ALADIN_FAST_PRECONVERT=0),
    and of one caption alone (never pre-converted). Packed rows with gaps (NaN there must not matter),
    empty images and captions, against the float64 reference too."""
    rng = np.random.default_rng(21)
    kin, vals = raw.make_case(rng, W=13, R=37, D=48, nt=5, ni=6, mode="all", dtype=dtype, data="random",
                              packed=True)
    images = kin["images"].copy()
    used = np.zeros(images.shape[0], bool)
    for off, n in zip(kin["ioff"], kin["ilen"]):
        used[off:off + n] = True
    images[~used] = np.float16(np.nan).view(np.uint16) if dtype == "float16" else 0x7FC0  # NaN bits in the gaps
    kin["images"] = images
    ref = raw.ref_for(kin, vals, False)
    for isa in ISAS:
        runs = []
        for preconvert in ("1", "0"):
            monkeypatch.setenv("ALADIN_FAST_PRECONVERT", preconvert)
            runs.append(_score(kin, 3, False, isa, layout, region_argmax=True))
        out, am, ram = runs[0]
        assert out.tobytes() == runs[1][0].tobytes(), isa
        assert np.array_equal(am, runs[1][1]) and np.array_equal(ram, runs[1][2]), isa
        raw.check(kin, ref, out, am, 3, False, f"{isa} {layout} preconverted", False)
        monkeypatch.setenv("ALADIN_FAST_PRECONVERT", "1")
        for i in range(len(kin["toff"])):
            one = dict(kin, toff=kin["toff"][i:i + 1], tlen=kin["tlen"][i:i + 1])
            row, _, _ = _score(one, 3, False, isa, layout, region_argmax=True)
            assert row.tobytes() == out[i:i + 1].tobytes(), (isa, i)
