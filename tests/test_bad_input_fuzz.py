"""Property-based "bad input" fuzz of the public ops and of the raw C++ bindings.

Every malformed input must raise TypeError / ValueError / IndexError / KeyError with a message naming the
argument, and every unusual-but-valid input (non-contiguous, expanded / overlapping views, other integer
dtypes, lists and numpy arrays, garbage in padding, permuted rows) must give the same bits as the same data
made plain. Never a crash, an abort, a hang, an out-of-bounds read or a silently wrong result.

* ``fuzz_public``: a valid random problem (all pairs / paired / rerank, padded or packed, empty sizes
  included, cpu and reference backends, every dtype, aggregation and padding, argmax and normalize on or off)
  with one mutation: an error (wrong rank / D / dtype, lengths out of range / wrong dtype / wrong shape /
  non-prefix masks, bad cu_seqlens and max_*_len, bad candidates, bad options, index tensors on the meta
  device) or equivalent forms, alone or stacked (transposed / strided / expanded / overlapping as_strided
  tokens, lengths / cu_seqlens / candidates as lists, numpy arrays of any dtype, strides or byte order, other
  integer dtypes, strided views, masks; garbage in padding; reversed rows): then scores, argmax and gradients
  must equal the plain form's. Or a NaN in one valid token: exactly the pairs using it turn NaN.
* ``fuzz_full_scores``: ``full_scores`` chunking and its argument checks.
* ``fuzz_raw``: ``aladin_fast._C.score`` / ``score_backward`` with random, partly corrupted metadata (offsets
  near +-2^63, lengths past the pad or the rows, candidates out of range, non-native byte order,
  non-contiguous arrays): refused iff invalid, and equal to the reference when valid.

The fuzzers run in one child interpreter, so a segfault or abort fails the test (with the example that was
running) instead of killing pytest. Default run: a derandomized sample (1000 / 100 / 500 examples, ~15 s on
2 cores); ``pytest -m slow`` runs 10x more (~3 min). The regression tests at the end each fail on the code
before the fix they pin.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aladin_fast
from aladin_fast import _C, reference
from aladin_fast._inputs import TokenBatch

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOWED = (TypeError, ValueError, IndexError, KeyError)  # what a malformed input may raise
MODES = ("all_pairs", "paired", "rerank")
AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")
PADDINGS = ("neg_inf", "zero")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SIDES = {"text": ("text_lengths", "text_cu_seqlens", "max_text_len"),
         "images": ("image_lengths", "image_cu_seqlens", "max_image_len")}
DEFAULT_EXAMPLES = {"fuzz_public": 1000, "fuzz_full_scores": 100, "fuzz_raw": 500}
SLOW_EXAMPLES = {"fuzz_public": 10000, "fuzz_full_scores": 1000, "fuzz_raw": 10000}


# --------------------------------------------------------------------------- running the fuzzers in a child process

FUZZERS = ("fuzz_public", "fuzz_full_scores", "fuzz_raw")
_RESULTS: dict = {}


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return "(none)"


def _fuzz_in_child(counts: dict, timeout: float) -> dict:
    """Run every fuzzer of ``counts`` (name -> examples) in one fresh interpreter (one torch import).

    Returns name -> None (passed) or the failure report. A crash, an abort or a hang fails every fuzzer with
    the input that was running (written to a trace file before each call)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(aladin_fast.__file__)))
    paths = [path for path in (os.environ.get("PYTHONPATH"), package_root, HERE) if path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "current")
        code = f"import test_bad_input_fuzz as m; m.fuzz_all({counts!r}, {trace!r})"
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                                  cwd=HERE, env=env)
        except subprocess.TimeoutExpired as err:
            report = f"child hung (> {timeout} s) while running: {_read(trace)}\n{err.stdout}\n{err.stderr}"
            return {name: report for name in counts}
        if proc.returncode != 0:
            how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            report = (f"child failed ({how}); last input started: {_read(trace)}\n--- stdout\n{proc.stdout[-6000:]}"
                      f"\n--- stderr\n{proc.stderr[-6000:]}")
            return {name: report for name in counts}
    results = {}
    for name in counts:
        if f"FUZZ DONE {name}\n" in proc.stdout:
            results[name] = None
        else:
            section = proc.stdout.split(f"FUZZ FAILED {name}\n", 1)
            results[name] = (section[1].split("FUZZ END", 1)[0] if len(section) == 2 else proc.stdout[-6000:]) + \
                proc.stderr[-3000:]
    return results


def fuzz_all(counts: dict, trace=None) -> None:
    """Child entry point: each fuzzer in turn; a failing one is reported and the others still run."""
    import traceback

    for name, examples in counts.items():
        try:
            globals()[name](examples, trace)
        except BaseException:  # noqa: BLE001 - reported to the parent
            print(f"FUZZ FAILED {name}\n{traceback.format_exc()}FUZZ END", flush=True)
        else:
            print(f"FUZZ DONE {name}", flush=True)


def _trace(path, text: str) -> None:
    """Write what is about to run (a crash then names it); flushed before the call."""
    if path is not None:
        with open(path, "w") as handle:
            handle.write(text)


def _settings(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        body = f" {value.tolist()}" if value.device.type != "meta" and value.numel() <= 24 and not \
            value.is_floating_point() else ""
        return (f"Tensor({list(value.shape)}, {value.dtype}, stride={value.stride()}, "
                f"{value.device.type}){body}")
    if isinstance(value, np.ndarray):
        return f"ndarray({value.shape}, {value.dtype}, strides={value.strides}){value.tolist() if value.size <= 24 else ''}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items() if not k.startswith("_")) + "}"
    if isinstance(value, (list, tuple)):
        return repr(value) if len(repr(value)) < 200 else f"{type(value).__name__}(len={len(value)})"
    return repr(value)


def _assert_same(got, expected, what: str) -> None:
    if expected is None:
        assert got is None, what
        return
    assert got is not None and got.shape == expected.shape and got.dtype == expected.dtype, \
        f"{what}: {None if got is None else (got.shape, got.dtype)} vs {(expected.shape, expected.dtype)}"
    if expected.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, expected), f"{what}: {got} vs {expected}"


# --------------------------------------------------------------------------- public ops: problems


class Raises:
    """The call raises one of ``types`` (all in ALLOWED) with a message matching ``pattern`` (naming the argument)."""

    def __init__(self, types, pattern):
        self.types, self.pattern = types, pattern
        assert all(issubclass(t, ALLOWED) for t in (types if isinstance(types, tuple) else (types,)))

    def __repr__(self):
        return f"Raises({self.types}, {self.pattern!r})"


class Same:
    """The mutated problem gives the canonical problem's result (through ``transform``), and its gradients."""

    def __init__(self, canonical, transform=None, nan_pairs=None):
        self.canonical, self.transform, self.nan_pairs = canonical, transform, nan_pairs

    def __repr__(self):
        return f"Same(transform={self.transform is not None}, nan_pairs={self.nan_pairs is not None})"


def _packed_rows(tokens, lengths):
    if tokens.shape[0] == 0:
        return tokens.new_zeros(0, tokens.shape[-1])
    return torch.cat([tokens[i, : int(lengths[i])] for i in range(tokens.shape[0])])


def _cu(lengths):
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0))


@st.composite
def base_problems(draw):
    mode = draw(st.sampled_from(MODES))
    nt = draw(st.integers(0, 3))
    ni = nt if mode == "paired" else draw(st.integers(0, 3))
    dim = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = dict(mode=mode, aggregation=draw(st.sampled_from(AGGREGATIONS)), padding=draw(st.sampled_from(PADDINGS)),
             normalize=draw(st.booleans()), backend=draw(st.sampled_from(["cpu", "reference"])),
             return_argmax=draw(st.booleans()), candidates=None, _len={}, _pad={}, _packed={}, _leaves=None)
    for side, count in (("text", nt), ("images", ni)):
        lengths_name, cu_name, max_name = SIDES[side]
        pad = draw(st.integers(0, 4))
        tokens = torch.randn(count, pad, dim, generator=generator, dtype=torch.float64).to(dtype)
        lengths = torch.randint(0, pad + 1, (count,), generator=generator)
        packed = draw(st.booleans())
        p[cu_name] = p[max_name] = p[lengths_name] = None
        if packed:
            longest = int(lengths.max()) if count else 0
            p[side], p[cu_name] = _packed_rows(tokens, lengths), _cu(lengths)
            p[max_name] = draw(st.sampled_from([None, longest, longest + 1]))
            pad = longest if p[max_name] is None else p[max_name]
        elif draw(st.booleans()):
            p[side], p[lengths_name] = tokens, lengths
        else:
            p[side], lengths = tokens, torch.full((count,), pad, dtype=torch.int64)
        p["_len"][side], p["_pad"][side], p["_packed"][side] = lengths, pad, packed
    if mode == "rerank":
        k = draw(st.integers(0, 3)) if ni else 0
        p["candidates"] = torch.randint(0, max(ni, 1), (nt, k), generator=generator)
    return p


def _copy(p, **changes):
    q = dict(p)
    q.update(changes)
    return q


def _call(p):
    kwargs = {name: p[name] for name in ("aggregation", "padding", "normalize", "backend", "return_argmax",
                                         "text_cu_seqlens", "image_cu_seqlens", "max_text_len", "max_image_len")}
    args = (p["text"], p["images"])
    if p["mode"] == "rerank":
        args += (p["candidates"],)
    args += (p["text_lengths"], p["image_lengths"])
    op = {"all_pairs": aladin_fast.alignment_scores, "paired": aladin_fast.paired_scores,
          "rerank": aladin_fast.rerank_scores}[p["mode"]]
    out = op(*args, **kwargs)
    return out if p["return_argmax"] else (out, None)


def _pair_images(p):
    """Image id of every pair, ``[Nt, K]`` (paired: ``[Nt, 1]``)."""
    nt, ni = p["_len"]["text"].shape[0], p["_len"]["images"].shape[0]
    if p["mode"] == "rerank":
        cand = p["candidates"]
        return cand.long() if isinstance(cand, torch.Tensor) else torch.tensor(np.asarray(cand, dtype=np.int64))
    if p["mode"] == "paired":
        return torch.arange(nt)[:, None]
    return torch.arange(ni).expand(nt, ni)


def _check_output(p, scores, argmax):
    """Shape / dtype / argmax-range invariants of a successful call."""
    pairs = _pair_images(p)
    expected_shape = (pairs.shape[0],) if p["mode"] == "paired" else tuple(pairs.shape)
    token_dtype = p["text"].dtype
    assert tuple(scores.shape) == expected_shape, (scores.shape, expected_shape)
    assert scores.dtype == (torch.float64 if token_dtype == torch.float64 else torch.float32)
    if argmax is None:
        return
    text_pad, image_pad = p["_pad"]["text"], p["_pad"]["images"]
    assert argmax.dtype == torch.int32 and tuple(argmax.shape) == expected_shape + (text_pad,)
    if argmax.numel():
        assert int(argmax.min()) >= -1 and int(argmax.max()) < max(image_pad, 1), argmax
        flat = argmax.reshape(pairs.shape[0], -1, text_pad)
        padded = torch.arange(text_pad)[None, None, :] >= p["_len"]["text"][:, None, None]
        assert bool((flat[padded.expand_as(flat)] == -1).all()), "argmax of padded words must be -1"


# --------------------------------------------------------------------------- public ops: mutations
#
# Each takes (draw, p, side) and returns (mutated problem, expectation) or None when it does not apply.


def _name(side):
    return re.escape(side)


def m_rank(draw, p, side):
    tokens = p[side]
    if p["_packed"][side]:
        choices = [tokens[None], tokens.flatten(), tokens.sum()]
        pattern = rf"{_name(side)} with {SIDES[side][1]} must be packed"
    else:
        choices = [tokens.flatten(0, 1), tokens[None], tokens.flatten(), tokens.sum()]
        pattern = rf"{_name(side)} must be padded"
    return _copy(p, **{side: draw(st.sampled_from(choices))}), Raises(ValueError, pattern)


def m_dim(draw, p, side):
    tokens = p[side]
    extra = draw(st.integers(1, 3))
    wider = torch.cat([tokens, tokens.new_zeros(tokens.shape[:-1] + (extra,))], dim=-1)
    return _copy(p, **{side: wider}), Raises(ValueError, r"same feature dim D")


def m_dtype(draw, p, side):
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]))
    return _copy(p, **{side: p[side].to(dtype)}), Raises(TypeError, rf"{_name(side)} must have dtype")


def m_mixed_dtype(draw, p, side):
    dtype = draw(st.sampled_from([d for d in DTYPES if d != p[side].dtype]))
    return _copy(p, **{side: p[side].to(dtype)}), Raises(TypeError, r"same dtype")


def m_not_tensor(draw, p, side):
    value = draw(st.sampled_from(["list", "numpy", "none"]))
    tokens = p[side].float()
    new = {"list": tokens.tolist(), "numpy": tokens.numpy(), "none": None}[value]
    return _copy(p, **{side: new}), Raises(TypeError, rf"{_name(side)} must be a torch.Tensor")


def m_bad_lengths(draw, p, side):
    if p["_packed"][side]:
        return None
    name = SIDES[side][0]
    count, pad = p["_len"][side].shape[0], p["_pad"][side]
    lengths = p["_len"][side].clone()
    kind = draw(st.sampled_from(["negative", "too_long", "float", "bool_1d", "count", "2d", "unsigned", "string",
                                 "mask_not_prefix", "mask_shape", "meta", "with_cu"]))
    if kind in ("negative", "too_long", "unsigned", "mask_not_prefix") and count == 0:
        return None
    if kind == "negative":
        lengths[draw(st.integers(0, count - 1))] = -draw(st.integers(1, 2**40))
        return _copy(p, **{name: lengths}), Raises(ValueError, rf"{name} must lie in \[0, {pad}\]")
    if kind == "too_long":
        lengths[draw(st.integers(0, count - 1))] = pad + draw(st.sampled_from([1, 2, 2**31, 2**40]))
        return _copy(p, **{name: lengths}), Raises(ValueError, rf"{name} must lie in \[0, {pad}\]")
    if kind == "unsigned":
        dtype = draw(st.sampled_from([torch.uint16, torch.uint32, torch.uint64]))
        lengths[draw(st.integers(0, count - 1))] = pad + 1
        return _copy(p, **{name: lengths.to(dtype)}), Raises(ValueError, rf"{name} must lie in \[0, {pad}\]")
    if kind == "float":
        return _copy(p, **{name: lengths.to(draw(st.sampled_from([torch.float32, torch.float64])))}), \
            Raises(TypeError, rf"{name} must have an integer dtype")
    if kind == "bool_1d":
        return _copy(p, **{name: lengths > 0}), Raises(ValueError, rf"{name} given as a mask must have shape")
    if kind == "count":
        wrong = draw(st.sampled_from([c for c in (count - 1, count + 1, count + 5) if c >= 0]))
        return _copy(p, **{name: torch.zeros(wrong, dtype=torch.int64)}), Raises(ValueError, rf"{name} must have shape")
    if kind == "2d":
        return _copy(p, **{name: lengths[:, None]}), Raises(ValueError, rf"{name} must have shape")
    if kind == "string":
        return _copy(p, **{name: "1234"[:max(count, 1)]}), Raises(TypeError, rf"{name} must be an integer tensor")
    if kind == "mask_not_prefix":
        if pad < 2:
            return None
        mask = torch.arange(pad)[None, :] < lengths[:, None]
        row = draw(st.integers(0, count - 1))
        mask[row] = False
        mask[row, draw(st.integers(1, pad - 1))] = True
        return _copy(p, **{name: mask}), Raises(ValueError, rf"{name} mask must be a prefix mask")
    if kind == "mask_shape":
        mask = torch.arange(pad + 1)[None, :] < lengths[:, None]
        return _copy(p, **{name: mask}), Raises(ValueError, rf"{name} given as a mask must have shape")
    if kind == "meta":
        return _copy(p, **{name: lengths.to("meta")}), Raises((ValueError, TypeError), rf"{name}")
    # with_cu: both representations
    cu_name = SIDES[side][1]
    return _copy(p, **{name: lengths, cu_name: _cu(lengths)}), Raises(ValueError, rf"either {name} or {cu_name}")


def m_bad_cu(draw, p, side):
    lengths_name, name, max_name = SIDES[side]
    if not p["_packed"][side]:
        if draw(st.booleans()):
            return _copy(p, **{name: _cu(p["_len"][side]), lengths_name: None}), Raises(ValueError, r"must be packed")
        return _copy(p, **{max_name: p["_pad"][side]}), Raises(ValueError, rf"{max_name} applies to packed")
    cu = p[name].clone()
    count, total = cu.shape[0] - 1, int(cu[-1])
    longest = int(p["_len"][side].max()) if count else 0
    kind = draw(st.sampled_from(["first", "last", "decreasing", "float", "bool", "2d", "empty", "meta", "unsigned",
                                 "max_short", "max_negative", "max_type"]))
    if kind == "first":
        cu[0] = draw(st.sampled_from([-1, 1, 2**40, -2**62]))
        return _copy(p, **{name: cu}), Raises(ValueError, rf"{name} must start at 0")
    if kind == "last":
        cu[-1] = total + draw(st.sampled_from([1, 3, 2**40])) * draw(st.sampled_from([1, -1]))
        return _copy(p, **{name: cu}), Raises(ValueError, rf"{name} must start at 0 and end at")
    if kind == "decreasing":
        if count < 2:
            return None
        cu[1] = total + 1
        return _copy(p, **{name: cu}), Raises(ValueError, rf"{name} must be non-decreasing")
    if kind == "float":
        return _copy(p, **{name: cu.double()}), Raises(TypeError, rf"{name} must have an integer dtype")
    if kind == "bool":
        return _copy(p, **{name: cu > 0}), Raises(TypeError, rf"{name} must have an integer dtype")
    if kind == "2d":
        return _copy(p, **{name: cu[None]}), Raises(ValueError, rf"{name} must be 1-D")
    if kind == "empty":
        return _copy(p, **{name: cu[:0]}), Raises(ValueError, rf"{name} must be 1-D")
    if kind == "meta":
        return _copy(p, **{name: cu.to("meta")}), Raises((ValueError, TypeError), rf"{name}")
    if kind == "unsigned":
        cu[-1] = total + 1
        dtype = draw(st.sampled_from([torch.uint16, torch.uint32, torch.uint64]))
        return _copy(p, **{name: cu.to(dtype)}), Raises(ValueError, rf"{name} must start at 0 and end at")
    if kind == "max_short":
        if longest == 0:
            return None
        return _copy(p, **{max_name: longest - 1}), Raises(ValueError, rf"{max_name} = {longest - 1} is shorter")
    if kind == "max_negative":
        return _copy(p, **{max_name: -draw(st.integers(1, 2**40))}), Raises(ValueError, rf"{max_name} must be >= 0")
    bad = draw(st.sampled_from([float(longest), True, torch.tensor(longest), str(longest), [longest]]))
    return _copy(p, **{max_name: bad}), Raises(TypeError, rf"{max_name} must be a Python int")


def m_bad_candidates(draw, p, side):
    if p["mode"] != "rerank":
        return None
    cand = p["candidates"].clone()
    nt, k = cand.shape
    ni = p["_len"]["images"].shape[0]
    kind = draw(st.sampled_from(["negative", "too_large", "float", "bool", "1d", "3d", "rows", "none", "string",
                                 "meta", "unsigned"]))
    if kind in ("negative", "too_large", "unsigned") and cand.numel() == 0:
        if nt == 0:
            return None
        cand = torch.zeros(nt, 1, dtype=torch.int64)  # K = 1: one id, made invalid below
    if kind in ("negative", "too_large", "unsigned"):
        i, j = draw(st.integers(0, cand.shape[0] - 1)), draw(st.integers(0, cand.shape[1] - 1))
        if kind == "negative":
            cand[i, j] = -draw(st.sampled_from([1, 2, 2**31, 2**62]))
        else:
            cand[i, j] = ni + draw(st.sampled_from([0, 1, 2**31, 2**62]))
        if kind == "unsigned":
            cand[i, j] = ni + 1
            cand = cand.to(draw(st.sampled_from([torch.uint8, torch.uint16, torch.uint32, torch.uint64])))
        return _copy(p, candidates=cand), Raises(IndexError, r"candidates must be image ids")
    if kind == "float":
        return _copy(p, candidates=cand.float()), Raises(TypeError, r"candidates must have an integer dtype")
    if kind == "bool":
        return _copy(p, candidates=cand > 0), Raises(TypeError, r"candidates must have an integer dtype")
    if kind == "1d":
        return _copy(p, candidates=cand.flatten()), Raises(ValueError, r"candidates must have shape")
    if kind == "3d":
        return _copy(p, candidates=cand[..., None]), Raises(ValueError, r"candidates must have shape")
    if kind == "rows":
        return _copy(p, candidates=torch.zeros(nt + 1, k, dtype=torch.int64)), Raises(ValueError, r"candidates must have shape")
    if kind == "none":
        return _copy(p, candidates=None), Raises(ValueError, r"candidates must be")
    if kind == "string":
        return _copy(p, candidates="0"), Raises(TypeError, r"candidates must be an integer tensor")
    return _copy(p, candidates=cand.to("meta")), Raises((ValueError, TypeError), r"candidates")


def m_bad_option(draw, p, side):
    option = draw(st.sampled_from(["aggregation", "padding", "backend"]))
    value = draw(st.sampled_from(["max", "", "MRSW", None, 1, ["MrSw"], "cuda", "neg-inf"]))
    return _copy(p, **{option: value}), Raises(ValueError, rf"{option} must be one of")


def m_paired_count(draw, p, side):
    if p["mode"] != "paired":
        return None
    _, cu_name, _ = SIDES[side]
    if p["_packed"][side]:
        cu = p[cu_name]
        return _copy(p, **{cu_name: torch.cat([cu, cu[-1:]])}), Raises(ValueError, r"as many texts as images")
    tokens = p[side]
    lengths_name = SIDES[side][0]
    bigger = torch.cat([tokens, tokens.new_zeros((1,) + tokens.shape[1:])])
    lengths = p[lengths_name]
    lengths = None if lengths is None else torch.cat([lengths, lengths.new_zeros(1)])
    return _copy(p, **{side: bigger, lengths_name: lengths}), Raises(ValueError, r"as many texts as images")


# ---- equivalent forms


def _token_view(draw, p, side):
    """A view function with the same values in another memory layout (or shared memory)."""
    tokens = p[side]
    kind = draw(st.sampled_from(["transposed", "strided", "expand", "as_strided", "offset"]))
    if kind == "transposed":  # the same values, laid out as the transpose of a contiguous tensor
        return kind, (lambda leaf: leaf.t().contiguous().t() if leaf.ndim == 2 else
                      leaf.permute(2, 1, 0).contiguous().permute(2, 1, 0)), None
    if kind == "strided":
        return kind, (lambda leaf: torch.repeat_interleave(leaf, 2, dim=-1)[..., ::2]), None
    if kind == "offset":
        return kind, (lambda leaf: torch.cat([leaf.new_zeros((1,) + leaf.shape[1:]), leaf])[1:]), None
    if kind == "expand":
        if tokens.numel() == 0:
            return None
        axis = draw(st.integers(0, tokens.ndim - 2))
        shape = tokens.shape

        def expand(leaf):
            index = [slice(None)] * leaf.ndim
            index[axis] = slice(0, 1)
            return leaf[tuple(index)].expand(shape)
        return kind, expand, None
    # as_strided: overlapping rows (sequence n, token l -> row n + l) or stride-0 features
    shape = tokens.shape
    if tokens.ndim == 3:
        n, length, d = shape
        if draw(st.booleans()):
            rows = n + length
            return kind, (lambda leaf: leaf.as_strided(shape, (d, d, 1))), (rows, d)
        return kind, (lambda leaf: leaf.as_strided(shape, (length, 1, 0))), (max(n * length, 1), 1)
    total, d = shape
    return kind, (lambda leaf: leaf.as_strided(shape, (1, 0))), (max(total, 1), 1)


def m_token_layout(draw, p, side):
    chosen = _token_view(draw, p, side)
    if chosen is None:
        return None
    kind, view, base_shape = chosen
    tokens = p[side]
    if kind == "expand":
        base = tokens.detach().clone()
    elif base_shape is not None:
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        base = torch.randn(base_shape, generator=generator, dtype=torch.float64).to(tokens.dtype)
    else:
        base = tokens.detach().clone()
    leaf = base.clone().requires_grad_(draw(st.booleans()))
    leaf2 = base.clone().requires_grad_(leaf.requires_grad)
    mutated, canonical = view(leaf), view(leaf2).contiguous()
    assert torch.equal(mutated.detach(), canonical.detach())
    leaves = (leaf, leaf2) if leaf.requires_grad else None
    return (_copy(p, **{side: mutated}, _leaves=leaves, _view=kind),
            Same(_copy(p, **{side: canonical}, _leaves=leaves)))


def _numpy_form(draw, array: np.ndarray) -> np.ndarray:
    """The same integers as a numpy array of another dtype, byte order or memory layout."""
    dtype = np.dtype(draw(st.sampled_from([np.int64, np.int32, np.int16, np.uint8]))) if array.max(initial=0) < 128 \
        else np.dtype(np.int64)
    kind = draw(st.sampled_from(["plain", "byteswapped", "flipped", "strided"]))
    if kind == "byteswapped":
        return array.astype(dtype.newbyteorder())
    if kind == "flipped":  # negative strides
        return np.flip(np.flip(array, 0).astype(dtype), 0)
    if kind == "strided":
        return np.repeat(array.astype(dtype), 2, axis=0)[::2]
    return array.astype(dtype)


def m_lengths_form(draw, p, side):
    if p["_packed"][side]:
        return None
    name = SIDES[side][0]
    lengths = p["_len"][side]
    pad = p["_pad"][side]
    kind = draw(st.sampled_from(["list", "numpy", "dtype", "strided", "mask", "mask_strided", "expand",
                                 "explicit_full"]))
    if kind == "list":
        new = lengths.tolist()
    elif kind == "numpy":
        new = _numpy_form(draw, lengths.numpy())
    elif kind == "dtype":
        new = lengths.to(draw(st.sampled_from([torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16,
                                               torch.uint32, torch.uint64])))
    elif kind == "strided":  # a view with stride 3 (int32: the kernel's own dtype, so no conversion copies it)
        dtype = draw(st.sampled_from([torch.int32, torch.int32, torch.int64, torch.int16]))
        new = torch.repeat_interleave(lengths.to(dtype), 3)[::3]
    elif kind == "mask":
        new = torch.arange(pad)[None, :] < lengths[:, None]
    elif kind == "mask_strided":
        new = (torch.arange(pad)[:, None] < lengths[None, :]).t()
    elif kind == "expand":  # stride 0: every row the first row's length
        if lengths.numel() == 0:
            return None
        lengths = lengths[:1].expand(lengths.shape[0])
        new = lengths.to(torch.int32)
    else:  # explicit full lengths == no lengths
        if p[name] is not None:
            return None
        new = torch.full((lengths.shape[0],), pad, dtype=torch.int32)
    p = _copy(p, _len=dict(p["_len"], **{side: lengths.clone()}))
    canonical = _copy(p, **{name: None if kind == "explicit_full" else lengths.clone()})
    return _copy(p, **{name: new}), Same(canonical)


def m_cu_form(draw, p, side):
    if not p["_packed"][side]:
        return None
    _, name, max_name = SIDES[side]
    cu = p[name]
    kind = draw(st.sampled_from(["int32", "int16", "uint64", "list", "numpy", "strided", "max_numpy", "max_exact"]))
    if kind in ("int32", "int16", "uint64"):
        return _copy(p, **{name: cu.to(getattr(torch, kind))}), Same(p)
    if kind == "list":
        return _copy(p, **{name: cu.tolist()}), Same(p)
    if kind == "numpy":
        return _copy(p, **{name: _numpy_form(draw, cu.numpy())}), Same(p)
    if kind == "strided":
        return _copy(p, **{name: torch.repeat_interleave(cu, 2)[::2]}), Same(p)
    longest = int(p["_len"][side].max()) if p["_len"][side].numel() else 0
    if p[max_name] is not None and p[max_name] != longest:
        return None
    value = np.int64(longest) if kind == "max_numpy" else longest
    return _copy(p, **{max_name: value}), Same(_copy(p, **{max_name: None}))


def m_candidates_form(draw, p, side):
    if p["mode"] != "rerank":
        return None
    cand = p["candidates"]
    ni = p["_len"]["images"].shape[0]
    kind = draw(st.sampled_from(["list", "numpy", "int32", "int16", "uint8", "transposed", "expand", "strided"]))
    if kind == "list":
        new = cand.tolist() if cand.numel() else cand
    elif kind == "numpy":
        new = _numpy_form(draw, cand.numpy())
    elif kind in ("int32", "int16", "uint8"):
        if kind == "uint8" and ni > 255:
            return None
        new = cand.to(getattr(torch, kind))
    elif kind == "transposed":
        new = cand.t().contiguous().t()
    elif kind == "strided":
        new = torch.repeat_interleave(cand, 2, dim=1)[:, ::2]
    else:
        if cand.numel() == 0:
            return None
        cand = cand[:, :1].expand(cand.shape)
        new = cand
    return _copy(p, candidates=new), Same(_copy(p, candidates=cand.clone()))


def m_garbage_padding(draw, p, side):
    if p["_packed"][side]:
        return None
    tokens, lengths, pad = p[side], p["_len"][side], p["_pad"][side]
    padded = torch.arange(pad)[None, :, None] >= lengths[:, None, None]
    if not bool(padded.any()):
        return None
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), torch.finfo(tokens.dtype).max, -7.0]))
    garbage = tokens.masked_fill(padded, value)
    clean = tokens.masked_fill(padded, 0.0)
    name = SIDES[side][0]
    lengths_arg = p[name] if p[name] is not None else lengths
    return _copy(p, **{side: garbage, name: lengths_arg}), Same(_copy(p, **{side: clean, name: lengths_arg}))


def m_flip(draw, p, side):
    """Reversed rows: the scores' rows (text) or columns (images, all pairs) reverse; rerank remaps its ids."""
    if p["_packed"][side] or p["mode"] == "paired":
        return None
    name = SIDES[side][0]
    lengths = p[name]
    changes = {side: p[side].flip(0), name: None if lengths is None else lengths.flip(0),
               "_len": dict(p["_len"], **{side: p["_len"][side].flip(0)})}
    if side == "text":
        if p["candidates"] is not None:
            changes["candidates"] = p["candidates"].flip(0)
        return _copy(p, **changes), Same(p, transform=lambda out: out.flip(0))
    ni = p[side].shape[0]
    if p["mode"] == "rerank":
        changes["candidates"] = ni - 1 - p["candidates"]
        return _copy(p, **changes), Same(p)
    return _copy(p, **changes), Same(p, transform=lambda out: out.flip(1))


def m_nan_token(draw, p, side):
    """A NaN in one valid token: exactly the pairs that use it (partner with a valid token) turn NaN."""
    lengths = p["_len"][side]
    valid_rows = [i for i in range(lengths.shape[0]) if int(lengths[i]) > 0]
    if not valid_rows:
        return None
    row = draw(st.sampled_from(valid_rows))
    position = draw(st.integers(0, int(lengths[row]) - 1))
    feature = draw(st.integers(0, p[side].shape[-1] - 1))
    tokens = p[side].clone()
    if p["_packed"][side]:
        tokens[int(p[SIDES[side][1]][row]) + position, feature] = float("nan")
    else:
        tokens[row, position, feature] = float("nan")
    pairs = _pair_images(p)
    text_len, image_len = p["_len"]["text"], p["_len"]["images"]
    if side == "text":
        nan = (torch.arange(pairs.shape[0])[:, None] == row) & (image_len[pairs] > 0)
    else:
        nan = (pairs == row) & (text_len[:, None] > 0)
    return _copy(p, **{side: tokens}), Same(p, nan_pairs=nan)


def m_requires_grad(draw, p, side):
    if p[side].dtype not in DTYPES:
        return None
    leaf = p[side].detach().clone().requires_grad_()
    return _copy(p, **{side: leaf}), Same(p)


ERROR_MUTATIONS = [m_rank, m_dim, m_dtype, m_mixed_dtype, m_not_tensor, m_bad_lengths, m_bad_cu, m_bad_candidates,
                   m_bad_option, m_paired_count]
EQUIVALENT_MUTATIONS = [m_token_layout, m_lengths_form, m_cu_form, m_candidates_form, m_garbage_padding, m_flip,
                        m_nan_token, m_requires_grad]


def m_stacked(draw, p, side):
    """Several equivalent forms at once (token layouts, lengths / cu_seqlens / candidates forms, both sides):
    they touch different arguments, so their plain forms combine into one canonical problem."""
    mutated, canonical = dict(p), dict(p)
    lengths = {"mutated": dict(p["_len"]), "canonical": dict(p["_len"])}
    steps = [(fn, s) for s in ("text", "images") for fn in (m_token_layout, m_lengths_form, m_cu_form)]
    steps.append((m_candidates_form, "text"))
    applied = 0
    for fn, s in steps:
        if not draw(st.booleans()):
            continue
        result = fn(draw, p, s)
        if result is None:
            continue
        applied += 1
        for target, changed, key in ((mutated, result[0], "mutated"), (canonical, result[1].canonical, "canonical")):
            for name, value in changed.items():
                if name == "_len":
                    lengths[key][s] = value[s]
                elif value is not p.get(name):
                    target[name] = value
    if not applied:
        return None
    mutated["_len"], canonical["_len"] = lengths["mutated"], lengths["canonical"]
    return mutated, Same(canonical)


EQUIVALENT_MUTATIONS += [m_stacked] * 4


@st.composite
def mutated_problems(draw):
    p = draw(base_problems())
    for _ in range(8):
        mutation = draw(st.sampled_from(ERROR_MUTATIONS + EQUIVALENT_MUTATIONS))
        side = draw(st.sampled_from(["text", "images"]))
        result = mutation(draw, p, side)
        if result is not None:
            return mutation.__name__, side, p, result[0], result[1]
    return "none", "text", p, p, Same(p)


def _gradients(p, scores):
    if p.get("_leaves") is None or scores.numel() == 0 or not scores.requires_grad:
        return None
    weights = torch.linspace(-1.0, 1.0, scores.numel(), dtype=torch.float64).reshape(scores.shape)
    (grad,) = torch.autograd.grad((scores.double().nan_to_num(0.0) * weights).sum(), (p["_leaves"][0],),
                                  allow_unused=True)
    return grad


def check_public_case(name, side, base, mutated, expectation):
    if isinstance(expectation, Raises):
        try:
            _call(mutated)
        except expectation.types as err:
            assert re.search(expectation.pattern, str(err)), \
                f"{name}/{side}: {type(err).__name__} {err!s} does not match {expectation.pattern!r}"
            return
        except Exception as err:  # noqa: BLE001 - any other type is the failure reported
            raise AssertionError(f"{name}/{side}: expected {expectation}, got {type(err).__name__}: {err}") from err
        raise AssertionError(f"{name}/{side}: expected {expectation}, but the call succeeded")
    canonical = expectation.canonical
    if canonical.get("_leaves") is not None:  # gradients of the mutated view vs the plain copy
        leaf, leaf2 = canonical["_leaves"]
        canonical = _copy(canonical, _leaves=(leaf2, leaf))
    expected_scores, expected_argmax = _call(canonical)
    _check_output(canonical, expected_scores, expected_argmax)
    try:
        scores, argmax = _call(mutated)
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{name}/{side}: a valid input was refused: {type(err).__name__}: {err}") from err
    _check_output(mutated, scores, argmax)
    if expectation.transform is not None:
        expected_scores = expectation.transform(expected_scores)
        expected_argmax = None if expected_argmax is None else expectation.transform(expected_argmax)
    if expectation.nan_pairs is not None:
        nan = expectation.nan_pairs.reshape(scores.shape)
        assert bool(scores.detach()[nan].isnan().all()), f"{name}/{side}: pairs using the NaN token must be NaN"
        expected_scores = torch.where(nan, scores.detach(), expected_scores.detach())
        if argmax is not None:
            keep = ~nan.reshape(nan.shape + (1,)).expand_as(argmax)
            argmax, expected_argmax = argmax[keep], expected_argmax[keep]
    _assert_same(scores.detach(), expected_scores.detach(), f"{name}/{side} scores")
    _assert_same(argmax, expected_argmax, f"{name}/{side} argmax")
    got_grad, expected_grad = _gradients(mutated, scores), _gradients(canonical, expected_scores)
    if got_grad is not None or expected_grad is not None:
        _assert_same(got_grad, expected_grad, f"{name}/{side} gradient")


def fuzz_public(examples, trace=None):
    @_settings(examples)
    @given(case=mutated_problems())
    def run(case):
        name, side, base, mutated, expectation = case
        _trace(trace, f"{name} on {side}: {_describe(mutated)} expecting {expectation}")
        check_public_case(name, side, base, mutated, expectation)

    run()


# --------------------------------------------------------------------------- full_scores


@st.composite
def full_scores_cases(draw):
    nt, ni, dim = draw(st.integers(0, 5)), draw(st.integers(0, 4)), draw(st.integers(1, 4))
    words, regions = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    text = torch.randn(nt, words, dim, generator=generator, dtype=torch.float64).to(dtype)
    images = torch.randn(ni, regions, dim, generator=generator, dtype=torch.float64).to(dtype)
    lengths = {"text": torch.randint(0, words + 1, (nt,), generator=generator),
               "images": torch.randint(0, regions + 1, (ni,), generator=generator)}
    kwargs = dict(aggregation=draw(st.sampled_from(AGGREGATIONS)), padding=draw(st.sampled_from(PADDINGS)),
                  normalize=draw(st.booleans()), backend=draw(st.sampled_from(["cpu", "reference"])))
    kind = draw(st.sampled_from(["valid", "valid_list", "valid_numpy", "long_lengths", "short_lengths",
                                 "return_argmax", "out_list", "topk_bool", "topk_float", "chunk_float",
                                 "image_chunk_float", "chunk_zero"]))
    return dict(text=text, images=images, lengths=lengths, kwargs=kwargs, chunk=draw(st.integers(1, 4)),
                image_chunk=draw(st.sampled_from([None, 1, 2, 5])),
                topk=draw(st.sampled_from([None] + list(range(1, ni + 1)))), kind=kind,
                side=draw(st.sampled_from(["text", "images"])))


def check_full_scores_case(case):
    text, images, lengths, kwargs = case["text"], case["images"], case["lengths"], case["kwargs"]
    kind, side = case["kind"], case["side"]
    call = dict(text_lengths=lengths["text"], image_lengths=lengths["images"], chunk=case["chunk"],
                image_chunk=case["image_chunk"], topk=case["topk"], **kwargs)
    name = SIDES[side][0]
    expectation = None
    if kind == "valid_list":
        call[name] = lengths[side].tolist()
    elif kind == "valid_numpy":
        call[name] = lengths[side].numpy()
    elif kind == "long_lengths":
        call[name] = torch.cat([lengths[side], torch.zeros(2, dtype=lengths[side].dtype)])
        expectation = Raises(ValueError, rf"{name}")
    elif kind == "short_lengths":
        if lengths[side].numel() == 0:
            return
        call[name] = lengths[side][1:]
        expectation = Raises(ValueError, rf"{name}")
    elif kind == "return_argmax":
        call["return_argmax"] = True
        expectation = Raises((TypeError, ValueError), r"return_argmax")
    elif kind == "out_list":
        if case["topk"] is not None:
            return
        call["out"] = [[0.0] * images.shape[0]] * text.shape[0]
        expectation = Raises(TypeError, r"out")
    elif kind == "topk_bool":
        call["topk"] = True
        expectation = Raises(TypeError, r"topk")
    elif kind == "topk_float":
        call["topk"] = 1.0
        expectation = Raises(TypeError, r"topk")
    elif kind == "chunk_float":
        call["chunk"] = 1.5
        expectation = Raises(TypeError, r"chunk")
    elif kind == "image_chunk_float":
        call["image_chunk"] = 1.5
        expectation = Raises(TypeError, r"image_chunk")
    elif kind == "chunk_zero":
        call["chunk"] = 0
        expectation = Raises(ValueError, r"chunk must be >= 1")
    if expectation is not None:
        try:
            aladin_fast.full_scores(text, images, **call)
        except expectation.types as err:
            assert re.search(expectation.pattern, str(err)), f"{kind}: {type(err).__name__} {err}"
            return
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"{kind}: expected {expectation}, got {type(err).__name__}: {err}") from err
        raise AssertionError(f"{kind}: expected {expectation}, but full_scores succeeded")
    # in the op's dtype: float64 inputs score in float64 (full_scores rounded them to float32 before session 10)
    expected = aladin_fast.alignment_scores(text, images, lengths["text"], lengths["images"], **kwargs)
    if expected.dtype == torch.float64 and kwargs["backend"] == "reference":
        # the reference's batched float64 matmuls may round a last bit differently per block shape (the C++
        # kernel scores each pair alone): the streamed matrix of the same blocks is the exact oracle, close to
        # the one-call scores
        blocks = aladin_fast.full_scores(text, images, **{**call, "topk": None})
        torch.testing.assert_close(blocks, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        expected = blocks
    got = aladin_fast.full_scores(text, images, **call)
    if case["topk"] is None:
        _assert_same(got, expected, f"{kind}: full matrix")
        return
    values, indices = got
    order = aladin_fast.ops.streaming.best_first(expected, case["topk"])
    _assert_same(indices, order, f"{kind}: top-k ids")
    _assert_same(values, expected.gather(1, order), f"{kind}: top-k values")


def fuzz_full_scores(examples, trace=None):
    @_settings(examples)
    @given(case=full_scores_cases())
    def run(case):
        _trace(trace, _describe(case))
        check_full_scores_case(case)

    run()


# --------------------------------------------------------------------------- raw bindings

RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
HUGE_OFFSETS = [2**63 - 1, 2**63 - 2, 2**63 - 7, 2**62, -(2**63), -(2**62), -1]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


@st.composite
def raw_problems(draw):
    dtype = draw(st.sampled_from(sorted(RAW_DTYPES)))
    dim = draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sides = {}
    for side in ("text", "images"):
        rows, count, pad = draw(st.integers(0, 6)), draw(st.integers(0, 3)), draw(st.integers(0, 5))
        lengths, offsets = [], []
        for _ in range(count):
            length = draw(st.integers(0, min(pad, rows)))
            offset = draw(st.integers(0, rows - length)) if length or draw(st.booleans()) else \
                draw(st.sampled_from(HUGE_OFFSETS))
            lengths.append(length)
            offsets.append(offset)
        tokens = torch.randn(rows, dim, generator=generator, dtype=torch.float64).to(RAW_DTYPES[dtype])
        sides[side] = dict(tokens=tokens, offsets=offsets, lengths=lengths, pad=pad, rows=rows)
    nt, ni = len(sides["text"]["lengths"]), len(sides["images"]["lengths"])
    candidates = None
    if draw(st.booleans()):
        k = draw(st.integers(0, 3))
        candidates = [[draw(st.integers(0, ni - 1)) if ni else 0 for _ in range(k)] for _ in range(nt)]
    problem = dict(dtype=dtype, text=sides["text"], images=sides["images"], candidates=candidates,
                   aggregation=draw(st.integers(0, 5)), zero_padding=draw(st.booleans()),
                   argmax=draw(st.booleans()), region_argmax=draw(st.booleans()), corruption=None)
    corruption = draw(st.sampled_from([None, None, "offset", "offset", "length", "candidate", "byteorder",
                                       "noncontiguous"]))
    if corruption == "offset" and (nt or ni):
        side = draw(st.sampled_from([s for s in ("text", "images") if sides[s]["lengths"]]))
        i = draw(st.integers(0, len(sides[side]["lengths"]) - 1))
        rows = sides[side]["rows"]
        sides[side]["offsets"][i] = draw(st.sampled_from(HUGE_OFFSETS + [rows, rows - 1, -2]))
        if sides[side]["lengths"][i] == 0 and sides[side]["pad"] > 0:
            sides[side]["lengths"][i] = draw(st.integers(1, sides[side]["pad"]))
        problem["corruption"] = f"offset {side}[{i}]"
    elif corruption == "length" and (nt or ni):
        side = draw(st.sampled_from([s for s in ("text", "images") if sides[s]["lengths"]]))
        i = draw(st.integers(0, len(sides[side]["lengths"]) - 1))
        sides[side]["lengths"][i] = draw(st.sampled_from([-1, -(2**31), sides[side]["pad"] + 1, 2**31 - 1,
                                                          sides[side]["rows"] + 1]))
        problem["corruption"] = f"length {side}[{i}]"
    elif corruption == "candidate" and candidates and candidates[0]:
        candidates[0][draw(st.integers(0, len(candidates[0]) - 1))] = draw(st.sampled_from([-1, ni, 2**63 - 1, -(2**63)]))
        problem["corruption"] = "candidate"
    elif corruption in ("byteorder", "noncontiguous"):
        problem["corruption"] = corruption
        problem["target"] = draw(st.sampled_from(["text", "images", "text_offsets", "text_lengths", "image_offsets",
                                                  "image_lengths", "out"]))
    return problem


def _raw_valid(problem) -> bool:
    for side in ("text", "images"):
        s = problem[side]
        for offset, length in zip(s["offsets"], s["lengths"]):
            if length < 0 or length > s["pad"]:
                return False
            if length > 0 and (offset < 0 or offset + length > s["rows"]):
                return False
    cands = problem["candidates"]
    ni = len(problem["images"]["lengths"])
    if cands is not None and any(c < 0 or c >= ni for row in cands for c in row):
        return False
    if problem["corruption"] == "noncontiguous":
        return False
    return True


def _raw_arrays(problem):
    text, images = problem["text"], problem["images"]
    nt, ni = len(text["lengths"]), len(images["lengths"])
    cands = problem["candidates"]
    k = ni if cands is None else (len(cands[0]) if cands else 0)
    # the C++ side reads the lengths as int32: out-of-range test values wrap in numpy exactly as they would
    arrays = dict(
        text=_numpy(text["tokens"]), text_offsets=np.array(text["offsets"], dtype=np.int64).reshape(nt),
        text_lengths=np.array(text["lengths"], dtype=np.int64).astype(np.int32).reshape(nt),
        images=_numpy(images["tokens"]), image_offsets=np.array(images["offsets"], dtype=np.int64).reshape(ni),
        image_lengths=np.array(images["lengths"], dtype=np.int64).astype(np.int32).reshape(ni),
        candidates=None if cands is None else np.array(cands, dtype=np.int64).reshape(nt, k),
    )
    out_dtype = np.float64 if problem["dtype"] == "float64" else np.float32
    arrays["out"] = np.zeros((nt, k), dtype=out_dtype)
    arrays["argmax"] = np.full((nt, k, text["pad"]), -1, dtype=np.int32) if problem["argmax"] else None
    arrays["region_argmax"] = np.full((nt, k, images["pad"]), -1, dtype=np.int32) if problem["region_argmax"] else None
    if problem["corruption"] == "byteorder":
        target = problem["target"]
        arrays[target] = arrays[target].astype(arrays[target].dtype.newbyteorder())
    elif problem["corruption"] == "noncontiguous":
        target = problem["target"]
        arrays[target] = np.repeat(arrays[target], 2, axis=-1)[..., ::2] if arrays[target].ndim == 2 else \
            np.repeat(arrays[target], 2)[::2]
        if arrays[target].size <= 1:  # a 0- or 1-element view is contiguous: use a 2-element stride instead
            base = np.repeat(np.concatenate([arrays[target].reshape(-1), arrays[target].reshape(-1)]), 2)
            arrays[target] = base[::2][: arrays[target].size].reshape(arrays[target].shape)
            if arrays[target].flags.c_contiguous:
                problem["corruption"] = None
    return arrays


def _raw_score(problem, arrays):
    _C.score(arrays["text"], arrays["text_offsets"], arrays["text_lengths"], arrays["images"],
             arrays["image_offsets"], arrays["image_lengths"], arrays["candidates"], problem["dtype"],
             problem["aggregation"], problem["zero_padding"], problem["text"]["pad"], problem["images"]["pad"],
             arrays["out"], arrays["argmax"], "auto", 1, arrays["region_argmax"])
    return np.asarray(arrays["out"], dtype=np.float64)


def _raw_expected(problem):
    batches = []
    for side in ("text", "images"):
        s = problem[side]
        batches.append(TokenBatch(s["tokens"].double(), torch.tensor(s["offsets"], dtype=torch.int64).reshape(-1),
                                  torch.tensor(s["lengths"], dtype=torch.int32).reshape(-1), s["pad"]))
    cands = problem["candidates"]
    nt = batches[0].count
    k = len(cands[0]) if cands else 0
    candidates = None if cands is None else torch.tensor(cands, dtype=torch.int64).reshape(nt, k)
    scores, _ = reference.score_token_batches(batches[0], batches[1], candidates, AGGREGATIONS[problem["aggregation"]],
                                              problem["zero_padding"], False)
    return scores.numpy()


def check_raw_case(problem):
    arrays = _raw_arrays(problem)
    valid = _raw_valid(problem)
    try:
        got = _raw_score(problem, arrays)
    except ValueError as err:
        if valid and problem["corruption"] == "byteorder":
            assert "byte order" in str(err), err
            return
        assert not valid, f"valid raw input refused: {err}"
        return
    assert valid, f"invalid raw input ({problem['corruption']}) accepted: scores {got}"
    expected = _raw_expected(problem)
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True), (got, expected)
    for name, pad in (("argmax", problem["images"]["pad"]), ("region_argmax", problem["text"]["pad"])):
        if arrays[name] is not None and arrays[name].size:
            assert arrays[name].min() >= -1 and arrays[name].max() < max(pad, 1), (name, arrays[name])
    # the backward on the same metadata: runs and writes only the rows of valid tokens
    word, region = problem["aggregation"] in (0, 1, 3), problem["aggregation"] in (2, 3)
    nt, k = arrays["out"].shape
    text, images = problem["text"], problem["images"]
    argmax = arrays["argmax"] if arrays["argmax"] is not None else np.full((nt, k, text["pad"]), -1, np.int32)
    region_argmax = arrays["region_argmax"] if arrays["region_argmax"] is not None else \
        np.full((nt, k, images["pad"]), -1, np.int32)
    if word and arrays["argmax"] is None or region and arrays["region_argmax"] is None:
        return
    grad_dtype = arrays["out"].dtype
    grad_text = np.full((text["rows"], text["tokens"].shape[1]), 7.0, dtype=grad_dtype)
    grad_images = np.full((images["rows"], images["tokens"].shape[1]), 7.0, dtype=grad_dtype)
    _C.score_backward(np.ones((nt, k), dtype=grad_dtype), arrays["text"], arrays["text_offsets"],
                      arrays["text_lengths"], arrays["images"], arrays["image_offsets"], arrays["image_lengths"],
                      arrays["candidates"], problem["dtype"], problem["aggregation"], problem["zero_padding"],
                      text["pad"], images["pad"], argmax, region_argmax, grad_text, grad_images, "auto", 1)
    for grad, side in ((grad_text, text), (grad_images, images)):
        used = np.zeros(side["rows"], dtype=bool)
        for offset, length in zip(side["offsets"], side["lengths"]):
            if length > 0:
                used[offset: offset + length] = True
        assert not grad[~used].any(), "gradient rows outside every sequence must be 0"


def fuzz_raw(examples, trace=None):
    @_settings(examples)
    @given(problem=raw_problems())
    def run(problem):
        _trace(trace, _describe(problem) + " " + _describe(problem["text"]) + " " + _describe(problem["images"]))
        check_raw_case(problem)

    run()


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("fuzzer", FUZZERS)
def test_bad_input_fuzz(fuzzer):
    if "default" not in _RESULTS:  # one child runs all three (one interpreter start-up)
        _RESULTS["default"] = _fuzz_in_child({name: DEFAULT_EXAMPLES[name] for name in FUZZERS}, timeout=300)
    report = _RESULTS["default"][fuzzer]
    assert report is None, report


@pytest.mark.slow
@pytest.mark.parametrize("fuzzer", FUZZERS)
def test_bad_input_fuzz_thorough(fuzzer):
    report = _fuzz_in_child({fuzzer: SLOW_EXAMPLES[fuzzer]}, timeout=3600)[fuzzer]
    assert report is None, report


# --------------------------------------------------------------------------- regressions (each fails on the old code)


def _raw_inputs(text_offset=0, image_offset=0, dtype=np.float32):
    text, images = np.ones((3, 4), dtype), np.ones((5, 4), dtype)
    return dict(text=text, text_offsets=np.array([text_offset], np.int64), text_lengths=np.array([2], np.int32),
                images=images, image_offsets=np.array([image_offset], np.int64),
                image_lengths=np.array([3], np.int32), out=np.zeros((1, 1), np.float32),
                argmax=np.full((1, 1, 2), -1, np.int32), region_argmax=np.full((1, 1, 3), -1, np.int32))


def _raw_forward(a, C=_C):
    C.score(a["text"], a["text_offsets"], a["text_lengths"], a["images"], a["image_offsets"], a["image_lengths"],
             None, "float32", 0, False, 2, 3, a["out"], a["argmax"], "auto", 1, a["region_argmax"])


def _raw_backward(a, C=_C):
    C.score_backward(np.ones((1, 1), np.float32), a["text"], a["text_offsets"], a["text_lengths"], a["images"],
                      a["image_offsets"], a["image_lengths"], None, "float32", 3, False, 2, 3, a["argmax"],
                      a["region_argmax"], np.zeros(a["text"].shape, np.float32),
                      np.zeros(a["images"].shape, np.float32), "auto", 1)


def test_raw_offsets_near_int64_max_are_refused_before_any_read():
    # regression: the bindings checked `offset + length > rows`, which wraps negative for offsets near 2^63
    # (built with -fwrapv): score read far outside the token arrays (garbage scores, or a segfault) and
    # score_backward wrote there. Run in a child: on the old code this reads / writes out of bounds
    # the extension alone (no torch import: a fast start-up), and the helpers above, in a fresh interpreter
    helpers = "\n\n".join(inspect.getsource(fn) for fn in (_raw_inputs, _raw_forward, _raw_backward))
    code = f"""
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("aladin_fast._C", {_C.__file__!r})
_C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_C)
{helpers}
for side in ("text", "image"):
    for offset in (2**63 - 1, 2**63 - 2, 2**63 - 3, 2**63 - 2**20):
        for run in (_raw_forward, _raw_backward):
            inputs = _raw_inputs(**{{side + "_offset": offset}})
            try:
                run(inputs)
            except ValueError as err:
                assert side + "_offsets[0] + length exceeds" in str(err), err
            else:
                raise SystemExit(f"{{run.__name__}} accepted {{side}}_offsets = [{{offset}}]: {{inputs['out']}}")
print("REFUSED")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert proc.returncode == 0 and "REFUSED" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-3000:])


@pytest.mark.parametrize("name", ["text", "images", "text_offsets", "text_lengths", "image_offsets",
                                  "image_lengths", "out", "argmax", "region_argmax"])
def test_raw_non_native_byte_order_is_refused(name):
    # regression: a byte-swapped numpy array (dtype '>f4' on x86) passed the dtype checks (kind and size only)
    # and was read -- or written -- as native values: garbage scores without an error
    native = _raw_inputs()
    _raw_forward(native)
    assert native["out"][0, 0] == 8.0  # 2 words x <1, 1> over D = 4
    inputs = _raw_inputs()
    inputs[name] = inputs[name].astype(inputs[name].dtype.newbyteorder())
    with pytest.raises(ValueError, match=rf"{name} must be in native byte order"):
        _raw_forward(inputs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("side", ["text", "images"])
def test_strided_int32_lengths_are_valid_input(backend, side):
    # regression: int32 lengths that are a strided view (lengths[::2]) reached the C++ kernel as they were:
    # backend="cpu" refused them with "image_lengths must be C-contiguous" while the reference accepted them
    text, images = torch.randn(3, 4, 8), torch.randn(2, 5, 8)
    count, pad = (3, 4) if side == "text" else (2, 5)
    lengths = torch.randint(0, pad + 1, (count,), generator=torch.Generator().manual_seed(0)).int()
    strided = torch.repeat_interleave(lengths, 2)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, lengths)
    name = "text_lengths" if side == "text" else "image_lengths"
    got = aladin_fast.alignment_scores(text, images, **{name: strided}, backend=backend)
    assert torch.equal(got, aladin_fast.alignment_scores(text, images, **{name: lengths}, backend=backend))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_index_dtypes(dtype):
    # regression: uint16 / uint32 / uint64 lengths raised NotImplementedError ("aminmax_cpu" not implemented)
    text, images = torch.randn(3, 4, 8), torch.randn(2, 5, 8)
    lengths = torch.tensor([4, 0, 2])
    expected = aladin_fast.alignment_scores(text, images, lengths, backend="cpu")
    assert torch.equal(aladin_fast.alignment_scores(text, images, lengths.to(dtype), backend="cpu"), expected)
    with pytest.raises(ValueError, match=r"text_lengths must lie in \[0, 4\]"):
        aladin_fast.alignment_scores(text, images, torch.tensor([4, 5, 0]).to(dtype), backend="cpu")
    if dtype == torch.uint64:  # 2^64 - 1: negative as int64, refused like any out-of-range value
        with pytest.raises(ValueError, match=r"text_lengths must lie in \[0, 4\]"):
            aladin_fast.alignment_scores(text, images, torch.tensor([2**64 - 1, 1, 1], dtype=dtype))
        with pytest.raises(IndexError, match=r"candidates must be image ids"):
            aladin_fast.rerank_scores(text, images, torch.tensor([[2**64 - 1], [0], [1]], dtype=dtype))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_index_tensors_on_the_meta_device_are_refused(backend):
    # regression: lengths / masks / cu_seqlens / candidates on the meta device raised NotImplementedError
    # ("Cannot copy out of meta tensor") instead of an error naming the argument
    text, images = torch.randn(3, 4, 8), torch.randn(2, 5, 8)
    meta = torch.device("meta")
    cases = [
        ("text_lengths", lambda: aladin_fast.alignment_scores(text, images, torch.tensor([1, 2, 3], device=meta),
                                                              backend=backend)),
        ("image_lengths", lambda: aladin_fast.alignment_scores(text, images, None,
                                                               torch.ones(2, 5, dtype=torch.bool, device=meta),
                                                               backend=backend)),
        ("text_cu_seqlens", lambda: aladin_fast.alignment_scores(text[0], images, backend=backend,
                                                                 text_cu_seqlens=torch.tensor([0, 4], device=meta))),
        ("candidates", lambda: aladin_fast.rerank_scores(text, images, torch.zeros(3, 1, dtype=torch.long,
                                                                                   device=meta), backend=backend)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"{name} is on the meta device"):
            call()


def test_lengths_as_lists():
    # regression: an empty list of lengths (an empty batch) became a float32 tensor and was refused; a bool
    # mask given as a list was refused as "must have an integer dtype, got torch.bool"
    text, images = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    assert aladin_fast.alignment_scores(text[:0], images, [], backend="cpu").shape == (0, 2)
    mask = [[True, True, False], [True, False, False]]
    assert torch.equal(aladin_fast.alignment_scores(text, images, mask, backend="cpu"),
                       aladin_fast.alignment_scores(text, images, [2, 1], backend="cpu"))


def test_full_scores_argument_checks():
    # regressions: full_scores sliced the lengths per chunk without checking them, so extra entries were ignored
    # silently and lists / numpy arrays failed with AttributeError; return_argmax=True, out=<list> gave
    # AttributeError; topk=True was taken as 1, float chunk sizes gave torch / range errors
    text, images = torch.randn(5, 3, 4), torch.randn(3, 2, 4)
    text_lengths, image_lengths = torch.tensor([3, 1, 0, 2, 3]), torch.tensor([2, 0, 1])
    expected = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths)
    for form in (list, np.asarray):
        got = aladin_fast.full_scores(text, images, form(text_lengths.tolist()), form(image_lengths.tolist()), chunk=2)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"text_lengths must have one entry .* per item: shape \[5\]"):
        aladin_fast.full_scores(text, images, torch.cat([text_lengths, text_lengths]), chunk=2)
    with pytest.raises(ValueError, match=r"image_lengths must have one entry .* per item: shape \[3\]"):
        aladin_fast.full_scores(text, images, None, image_lengths[:2])
    with pytest.raises(ValueError, match=r"text_lengths must have one entry"):
        aladin_fast.full_scores(text, images, torch.tensor(3))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['return_argmax'\]"):
        aladin_fast.full_scores(text, images, return_argmax=True)
    with pytest.raises(TypeError, match=r"out must be a torch.Tensor, got list"):
        aladin_fast.full_scores(text, images, out=[[0.0] * 3] * 5)
    for name, value in (("topk", True), ("topk", 1.0), ("chunk", 1.5), ("image_chunk", 1.5), ("chunk", "2")):
        with pytest.raises(TypeError, match=rf"{name} must be an int"):
            aladin_fast.full_scores(text, images, **{name: value})


def test_numpy_index_arrays_with_negative_strides_or_swapped_bytes():
    # regression: numpy lengths / cu_seqlens / candidates are accepted, but torch.as_tensor refuses negative
    # strides (np.flip) and non-native byte order: they were refused as "must be an integer tensor, got ndarray"
    text, images = torch.randn(3, 4, 8), torch.randn(2, 5, 8)
    lengths, candidates = np.array([4, 0, 2]), np.array([[1, 0], [0, 0], [1, 1]])
    packed, cu = torch.randn(7, 8), np.array([0, 3, 3, 7])
    forms = (lambda a: np.flip(np.flip(a, 0).copy(), 0), lambda a: a.astype(a.dtype.newbyteorder()),
             lambda a: np.flip(np.flip(a, 0).astype(">i4"), 0))
    for form in forms:
        assert torch.equal(aladin_fast.alignment_scores(text, images, form(lengths)),
                           aladin_fast.alignment_scores(text, images, lengths))
        assert torch.equal(aladin_fast.rerank_scores(text, images, form(candidates)),
                           aladin_fast.rerank_scores(text, images, candidates))
        assert torch.equal(aladin_fast.alignment_scores(packed, images, text_cu_seqlens=form(cu)),
                           aladin_fast.alignment_scores(packed, images, text_cu_seqlens=cu))
        assert torch.equal(aladin_fast.full_scores(text, images, form(lengths), chunk=2),
                           aladin_fast.alignment_scores(text, images, lengths))
