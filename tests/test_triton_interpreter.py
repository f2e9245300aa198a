"""Triton alignment kernel vs an independent float64 oracle, run in the Triton CPU interpreter.

Triton fixes compiled-vs-interpreted twice, from ``TRITON_INTERPRET``: for its own
``triton.language`` helpers (``tl.max``, ``tl.sum``...) when triton is first
imported, and for every ``@triton.jit`` when it decorates.  One process cannot
hold both modes (the interpreter cannot call compiled helpers; the compiler
cannot inline interpreted ones), and switching a whole pytest process to the
interpreter would break GPU tests collected after this module.  So:

* process started with ``TRITON_INTERPRET=1`` (e.g. ``TRITON_INTERPRET=1 pytest``):
  the tests below run in-process;
* otherwise they are skipped here and ``test_interpreter_suite_in_subprocess``
  runs this file in a child pytest with ``TRITON_INTERPRET=1`` set before triton is
  imported.  tests/test_triton_aot.py does the mirror image, so both files pass in
  either order in one pytest process.

Inputs are mostly small dyadic rationals (k/4, |k| <= 4): exact in fp32, fp16
and bf16, with exact products and fp32 partial sums, so max-based scores and
argmax must match the float64 oracle exactly, and ties are frequent (first
index must win).  A continuous-random test checks tolerances scaled by dtype.
"""
from __future__ import annotations

import os

import pytest
import torch
from triton_modes import load_kernels, run_suite_in_child, thin, triton_interpreted  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


IN_PROCESS = triton_interpreted()
kernels = load_kernels("_aladin_fast_kernels_interpreted", interpret=True) if IN_PROCESS else None
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton is compiled in this process: the suite runs in a "
                                "TRITON_INTERPRET=1 subprocess (test_interpreter_suite_in_subprocess)")
pytestmark = pytest.mark.interpreter


@pytest.mark.skipif(IN_PROCESS, reason="triton is interpreted in this process: the suite runs in-process")
def test_interpreter_suite_in_subprocess():
    run_suite_in_child(__file__, interpret=True)


AGGREGATIONS = {"MrSw": 0, "MrAVGw": 1, "MwSr": 2, "symm": 3, "sum": 4, "mean": 5}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# continuous inputs: tolerance = TOL[dtype] * sqrt(D) * (cells summed + 1); inputs are rounded to the
# dtype before the oracle sees them, so only the fp32 accumulation differs (tensor-core order on GPU)
TOL = {torch.float32: 2e-6, torch.float16: 4e-6, torch.bfloat16: 4e-6}


# --------------------------------------------------------------------------- oracle (from the contract)


def _first_max(values: torch.Tensor, dim: int):
    """Max along ``dim`` and the smallest index attaining it (float64, non-empty)."""
    top = values.max(dim=dim, keepdim=True).values
    index = torch.arange(values.shape[dim]).reshape([-1 if d == dim else 1 for d in range(values.dim())])
    first = torch.where(values == top, index, values.shape[dim]).min(dim=dim).values
    return top.squeeze(dim), first


def oracle_pair(t: torch.Tensor, v: torch.Tensor, zero: bool, w_pad: int, r_pad: int):
    """Scores of one pair for every aggregation code, and its argmax [w_pad].

    t [n_w, D], v [n_r, D] float64, valid rows only.
    """
    n_w, n_r = t.shape[0], v.shape[0]
    s = t @ v.T
    argmax = torch.full((w_pad, ), -1, dtype=torch.int64)
    # row maxes m_w (an empty max contributes 0; zero mode: the padding value 0 competes)
    if n_r > 0 and n_w > 0:
        m, arg = _first_max(s, 1)
    else:
        m, arg = torch.zeros(n_w, dtype=torch.float64), torch.full((n_w, ), -1)
    if zero and n_r < r_pad:
        pad_wins = (0.0 > m) if n_r > 0 else torch.ones(n_w, dtype=torch.bool)
        m = torch.where(pad_wins, torch.zeros_like(m), m)
        arg = torch.where(pad_wins, torch.full_like(arg, n_r), arg)
    argmax[:n_w] = arg
    # column maxes c_r
    if n_w > 0 and n_r > 0:
        c = _first_max(s, 0)[0]
        if zero and n_w < w_pad:
            c = c.clamp(min=0.0)
    else:
        c = torch.zeros(n_r, dtype=torch.float64)
    row_sum, col_sum, total = m.sum().item(), c.sum().item(), s.sum().item()
    cells = w_pad * r_pad if zero else n_w * n_r
    scores = {
        0: row_sum,
        1: row_sum / n_w if n_w else 0.0,
        2: col_sum,
        3: row_sum + col_sum,
        4: total,
        5: total / cells if cells else 0.0,
    }
    if torch.isnan(s).any():
        scores = dict.fromkeys(scores, float("nan"))
    return scores, argmax


def oracle(case, candidates, zero):
    """{aggregation code: float64 scores [Nt, K]} and argmax [Nt, K, W_pad] (loops over pairs)."""
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    nt = t_off.shape[0]
    if candidates is None:
        candidates = torch.arange(i_off.shape[0]).expand(nt, -1)
    k = candidates.shape[1]
    scores = {code: torch.zeros(nt, k, dtype=torch.float64) for code in AGGREGATIONS.values()}
    argmax = torch.zeros(nt, k, w_pad, dtype=torch.int64)
    text64, images64 = text.double(), images.double()
    for i in range(nt):
        t = text64[t_off[i]:t_off[i] + t_len[i]]
        for kk in range(k):
            j = int(candidates[i, kk])
            v = images64[i_off[j]:i_off[j] + i_len[j]]
            pair_scores, argmax[i, kk] = oracle_pair(t, v, zero, w_pad, r_pad)
            for code, value in pair_scores.items():
                scores[code][i, kk] = value
    return scores, argmax


# --------------------------------------------------------------------------- inputs


def _tokens(gen, count, pad, dim, dtype, *, dyadic, packed, lengths=None):
    """Tokens as the op layer hands them over: [T, D] + int64 offsets + int32 lengths.

    Unused rows (padding, gaps between packed sequences) hold NaN: a kernel reading
    beyond a length would poison its scores.
    """
    if lengths is None:
        lengths = torch.randint(0, pad + 1, (count, ), generator=gen)
        lengths[0] = pad
        if count > 2:
            lengths[1] = 0
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if packed:  # packed with random gaps: offsets are not multiples of anything
        gaps = torch.randint(0, 3, (count, ), generator=gen)
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), (lengths + gaps)[:-1]]), 0) + gaps[0]
        rows = int(offsets[-1] + lengths[-1]) + 1
    else:
        offsets = torch.arange(count, dtype=torch.int64) * pad
        rows = count * pad
    if dyadic:
        values = torch.randint(-4, 5, (max(rows, 1), dim), generator=gen).double() / 4
    else:
        values = torch.randn(max(rows, 1), dim, generator=gen, dtype=torch.float64) / dim ** 0.5
    tokens = torch.full((max(rows, 1), dim), float("nan"), dtype=torch.float64)
    for off, n in zip(offsets.tolist(), lengths.tolist()):
        tokens[off:off + n] = values[off:off + n]
    return tokens.to(dtype).contiguous(), offsets, lengths.to(torch.int32)


def make_case(seed, nt, ni, w_pad, r_pad, dim, dtype, *, dyadic=True, packed=False, text_lengths=None,
              image_lengths=None):
    gen = torch.Generator().manual_seed(seed)
    text, t_off, t_len = _tokens(gen, nt, w_pad, dim, dtype, dyadic=dyadic, packed=packed, lengths=text_lengths)
    images, i_off, i_len = _tokens(gen, ni, r_pad, dim, dtype, dyadic=dyadic, packed=packed, lengths=image_lengths)
    return text, t_off, t_len, images, i_off, i_len, w_pad, r_pad


def run_kernel(case, candidates, aggregation, zero, *, config=None, with_argmax=True):
    text, t_off, t_len, images, i_off, i_len, w_pad, r_pad = case
    nt = t_off.shape[0]
    k = i_off.shape[0] if candidates is None else candidates.shape[1]
    out = torch.full((nt, k), -12345.0, dtype=torch.float32)
    argmax = torch.full((nt, k, w_pad), -777, dtype=torch.int32) if with_argmax else None
    kernels.launch_alignment(text, t_off, t_len, images, i_off, i_len, candidates, aggregation, zero, w_pad, r_pad,
                             out, argmax, config=config)
    return out, argmax


def check(case, candidates, aggregation, zero, *, config=None, exact=True, with_argmax=True, expected=None):
    """Run one launch and compare with the oracle; ``expected`` = oracle(case, candidates, zero) if precomputed."""
    out, argmax = run_kernel(case, candidates, aggregation, zero, config=config, with_argmax=with_argmax)
    all_scores, expected_argmax = expected or oracle(case, candidates, zero)
    expected = all_scores[aggregation]
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan), f"NaN pattern differs:\n{out}\n{expected}"
    if exact:  # dyadic inputs: exact up to the final division of MrAVGw / mean
        torch.testing.assert_close(out.double()[~nan], expected[~nan], rtol=1e-6, atol=1e-6)
    else:
        text, dim = case[0], case[0].shape[1]
        atol = TOL[text.dtype] * dim ** 0.5 * (case[6] * case[7] + 1)
        torch.testing.assert_close(out.double()[~nan], expected[~nan], rtol=1e-5, atol=atol)
    if with_argmax:
        ok = ~nan
        if exact:
            assert torch.equal(argmax.long()[ok], expected_argmax[ok]), f"argmax differs:\n{argmax}\n{expected_argmax}"
        # NaN pairs: unspecified, but in range [-1, R_pad)
        assert bool(((argmax >= -1) & (argmax < case[7])).all())
    return out, argmax


# --------------------------------------------------------------------------- tests

# (Nt, Ni, W_pad, R_pad, D): W, R in {1, 7, 37}, D in {1, 3, 64, 100}, Nt != Ni
SHAPES = [(3, 4, 7, 37, 3), (4, 3, 37, 7, 64), (2, 3, 1, 1, 1), (3, 2, 37, 37, 100)]
# 8 lengths: full, empty, partial -- forced 16-wide blocks (multi-block row and column passes)
SMALL_BLOCKS = {"BLOCK_W": 16, "BLOCK_R": 16, "BLOCK_D": 16, "BLOCK_K": 2}


# every shape in fp32 and in one 16-bit dtype (alternating): keeps the interpreter run short
SHAPE_DTYPES = [(shape, dtype) for index, shape in enumerate(SHAPES)
                for dtype in (torch.float32, (torch.float16, torch.bfloat16)[index % 2])]


@in_process
@pytest.mark.parametrize("zero", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("shape,dtype", thin(SHAPE_DTYPES, 2), ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_all_pairs_every_aggregation(shape, dtype, zero):
    case = make_case(sum(shape), *shape, dtype, packed=shape[0] % 2 == 1)
    expected = oracle(case, None, zero)
    for aggregation in AGGREGATIONS.values():
        check(case, None, aggregation, zero, expected=expected)


@in_process
@pytest.mark.parametrize("zero", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("dtype", thin(DTYPES), ids=str)
def test_rerank_repeated_candidates(dtype, zero):
    case = make_case(7, 3, 4, 7, 37, 64, dtype, packed=True)
    candidates = torch.tensor([[3, 3, 0, 1, 2], [0, 0, 0, 2, 1], [2, 1, 3, 3, 0]])
    expected = oracle(case, candidates, zero)
    for aggregation in AGGREGATIONS.values():
        check(case, candidates, aggregation, zero, expected=expected)


@in_process
@pytest.mark.parametrize("zero", [False, True], ids=["neg_inf", "zero"])
@pytest.mark.parametrize("dtype", thin((torch.bfloat16, torch.float32, torch.float16)), ids=str)
def test_paired(dtype, zero):
    case = make_case(11, 4, 4, 37, 7, 100, dtype)
    candidates = torch.arange(4)[:, None]
    expected = oracle(case, candidates, zero)
    for aggregation in AGGREGATIONS.values():
        check(case, candidates, aggregation, zero, expected=expected)


@in_process
@pytest.mark.parametrize("mode", thin(["rerank", "all_pairs"]))
@pytest.mark.parametrize("zero", [False, True], ids=["neg_inf", "zero"])
def test_multi_block_paths(mode, zero):
    """W_pad = R_pad = 40 with 16-wide blocks: running max/argmax across region blocks,
    column max across word blocks, two-pass symm, padded word blocks, D tails."""
    case = make_case(5, 3, 3, 40, 40, 20, torch.bfloat16, text_lengths=[40, 0, 23], image_lengths=[40, 17, 0])
    candidates = None if mode == "all_pairs" else torch.tensor([[1, 2], [2, 1], [0, 0]])
    expected = oracle(case, candidates, zero)
    for aggregation in AGGREGATIONS.values():
        check(case, candidates, aggregation, zero, config=SMALL_BLOCKS, expected=expected)


@in_process
def test_multi_block_mixed_single_dimension():
    """Only regions exceed one block (BLOCK_W covers W_pad); fp32 'ieee' path, BLOCK_K tail."""
    case = make_case(9, 2, 3, 7, 37, 20, torch.float32, text_lengths=[7, 3], image_lengths=[37, 20, 16])
    for zero in (False, True):
        expected = oracle(case, None, zero)
        for aggregation in (0, 2, 3):
            check(case, None, aggregation, zero, config={"BLOCK_R": 16, "BLOCK_D": 16, "BLOCK_K": 2},
                  expected=expected)


@in_process
@pytest.mark.parametrize("dtype", thin((torch.bfloat16, torch.float32, torch.float16)), ids=str)
def test_continuous_inputs_tolerance(dtype):
    """Non-dyadic inputs: error against float64 of the rounded inputs within dtype-scaled tolerances."""
    case = make_case(3, 3, 2, 7, 37, 100, dtype, dyadic=False, packed=True)
    for zero in (False, True):
        expected = oracle(case, None, zero)
        for aggregation in AGGREGATIONS.values():
            check(case, None, aggregation, zero, exact=False, expected=expected)


@in_process
def test_without_argmax_and_query_resident_rerank():
    """argmax=None is accepted; D <= BLOCK_D keeps the caption in registers across candidates."""
    case = make_case(13, 2, 5, 7, 7, 16, torch.bfloat16)
    candidates = torch.tensor([[4, 1, 1, 0], [2, 3, 0, 4]])
    expected = oracle(case, candidates, True)
    for aggregation in AGGREGATIONS.values():
        check(case, candidates, aggregation, True, with_argmax=False, config={"BLOCK_K": 4}, expected=expected)


@in_process
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy inside the interpreter
@pytest.mark.parametrize("config,zero", [(None, False), (SMALL_BLOCKS, True)], ids=["single_tile", "multi_block"])
def test_nan_poisons_only_its_pairs(config, zero):
    case = list(make_case(17, 3, 4, 20, 20, 24, torch.float32, text_lengths=[20, 5, 9],
                          image_lengths=[20, 0, 6, 11]))
    text, images = case[0].clone(), case[3].clone()
    text[int(case[1][1]) + 2, 5] = float("nan")  # caption 1, word 2
    images[int(case[4][3]) + 10, 0] = float("nan")  # image 3, region 10
    case[0], case[3] = text, images
    # caption 1 vs images with regions, every caption vs image 3; image 1 (no regions) stays finite
    poisoned = torch.zeros(3, 4, dtype=torch.bool)
    poisoned[1, [0, 2, 3]] = True
    poisoned[:, 3] = True
    expected = oracle(case, None, zero)
    for aggregation in AGGREGATIONS.values():
        out, _ = check(case, None, aggregation, zero, config=config, expected=expected)
        assert torch.equal(torch.isnan(out), poisoned)


@in_process
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["single_tile", "multi_block"])
def test_ties_first_index_and_zero_padding_rules(config):
    """Duplicated regions: first index wins, also across region blocks; in zero mode a valid max
    equal to 0 beats the padding (strictly greater needed), a negative max loses to it."""
    dim, r_pad = 4, 40
    region = torch.tensor([1.0, 0.0, 0.0, 0.0])
    images = torch.zeros(2 * r_pad, dim)
    images[0:36] = -region  # image 0: 36 regions, all -e0; region 30 = +e0 ... region 33 = +e0 (tie)
    images[30] = region
    images[33] = region
    images[r_pad:r_pad + 20] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # image 1: orthogonal to e0 -> s = 0
    text = torch.stack([region, -region, torch.tensor([0.0, 0.0, 1.0, 0.0])])
    case = (text.contiguous(), torch.tensor([0, 1], dtype=torch.int64), torch.tensor([1, 2], dtype=torch.int32),
            images.contiguous(), torch.tensor([0, r_pad], dtype=torch.int64), torch.tensor([36, 20], dtype=torch.int32),
            3, r_pad)
    for zero in (False, True):
        out, argmax = check(case, None, 0, zero, config=config)
        # caption 0 word 0 (+e0) vs image 0: max 1 first at region 30
        assert argmax[0, 0, 0] == 30
        # caption 1 word 0 (-e0) vs image 0: ties at value 1 among 34 regions -> region 0
        assert argmax[1, 0, 0] == 0
        # caption 1 word 1 (e2) vs image 0: every s = 0 -> region 0 (0 does not strictly beat 0)
        assert argmax[1, 0, 1] == 0
        # padded words
        assert argmax[0, 0, 1] == -1 and argmax[0, 0, 2] == -1 and argmax[1, 1, 2] == -1
        # caption 1 word 0 (-e0) vs image 1: all s = 0 -> region 0 in both modes
        assert argmax[1, 1, 0] == 0
    # zero mode: caption 0 vs image 0 word 0 wins with 1 > 0; a negative-only row loses to padding
    neg_case = (torch.stack([-region]), torch.tensor([0]), torch.tensor([1], dtype=torch.int32),
                torch.stack([region, region, region]), torch.tensor([0]), torch.tensor([2], dtype=torch.int32), 1, 3)
    out, argmax = check(neg_case, None, 0, True, config=config)
    assert out[0, 0] == 0.0 and argmax[0, 0, 0] == 2  # first padded region
    out, argmax = check(neg_case, None, 0, False, config=config)
    assert out[0, 0] == -1.0 and argmax[0, 0, 0] == 0


@in_process
def test_empty_sets():
    """n_w = 0 or n_r = 0 everywhere, and zero mode with n_r = R_pad = 0 (argmax -1)."""
    case = make_case(21, 2, 2, 5, 6, 8, torch.float32, text_lengths=[0, 5], image_lengths=[0, 6])
    for zero in (False, True):
        expected = oracle(case, None, zero)
        for aggregation in AGGREGATIONS.values():
            check(case, None, aggregation, zero, expected=expected)
    empty_images = (torch.ones(3, 8), torch.tensor([0]), torch.tensor([3], dtype=torch.int32),
                    torch.zeros(1, 8), torch.tensor([0]), torch.tensor([0], dtype=torch.int32), 3, 0)
    for aggregation in AGGREGATIONS.values():
        out, argmax = check(empty_images, None, aggregation, True)
        assert out[0, 0] == 0.0 and bool((argmax == -1).all())


@in_process
def test_heuristics_shapes():
    """Launch heuristics: power-of-two blocks >= 16, capped; single tile for TERAN sizes."""
    cfg = kernels.alignment_launch_config(num_texts=5000, num_candidates=1000, dim=1024, text_pad=32, image_pad=36,
                                          element_size=2, all_pairs=True)
    assert (cfg.BLOCK_W, cfg.BLOCK_R, cfg.BLOCK_D) == (32, 64, 128) and cfg.single_tile
    assert cfg.grid == (5000 * triton_cdiv(1000, cfg.BLOCK_K), )
    cfg = kernels.alignment_launch_config(num_texts=1, num_candidates=3, dim=1, text_pad=1, image_pad=512,
                                          element_size=4, all_pairs=False)
    assert (cfg.BLOCK_W, cfg.BLOCK_D) == (16, 16) and cfg.BLOCK_R == 64 and not cfg.single_tile
    with pytest.raises(KeyError):
        kernels.alignment_launch_config(num_texts=1, num_candidates=1, dim=1, text_pad=1, image_pad=1,
                                        element_size=4, all_pairs=True, override={"BLOCK_X": 16})


def triton_cdiv(a, b):
    return -(-a // b)


@in_process
@pytest.mark.parametrize("zero", thin([True, False]), ids=["zero", "neg_inf"])
def test_per_pair_kernel_single_tile(zero):
    """The per-pair kernel on shapes the packed kernel would take (forced with kernel="pair")."""
    case = make_case(23, 3, 4, 7, 37, 20, torch.bfloat16, packed=True)
    candidates = torch.tensor([[3, 3, 0], [0, 2, 1], [2, 1, 3]])
    for cand in (None, candidates):
        expected = oracle(case, cand, zero)
        for aggregation in AGGREGATIONS.values():
            check(case, cand, aggregation, zero, config={"kernel": "pair"}, expected=expected)
