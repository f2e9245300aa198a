"""The public ops called from several Python threads at once (serving workers, data-loader threads).

Each thread runs its own problem (shape, lengths, dtype, aggregation, padding, all pairs / paired / rerank,
padded / packed, forward and backward) many times; every result must be bitwise equal to the same call made
serially beforehand (the kernels are deterministic: docs/reliability.md). The op layer shares a few things
between calls (the cached full-length padded layouts of ``_inputs.py``, the memoised launch configurations of
kernels/, the C++ kernel's OpenMP teams) and reads process-wide state (``torch.compiler.is_compiling()``).

Every join has a timeout, so a deadlock fails instead of hanging. The Triton interpreter keeps its grid
index and its patched ``triton.language`` in process-wide state (not thread-safe, upstream), so the Triton
case runs one interpreted thread next to CPU / reference threads, in a child process with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import aladin_fast
from cases import make_tokens

pytest.importorskip("aladin_fast._C")

JOIN_TIMEOUT = 120.0  # seconds: far above a run here; only a deadlock gets near it


# ----------------------------------------------------------------------------- problems
# (dtype, aggregation, padding, mode, packed, full lengths): every dtype, aggregation, padding and mode once
SPECS = (
    (torch.float32, "MrSw", "neg_inf", "all", False, True),
    (torch.bfloat16, "MwSr", "zero", "rerank", False, False),
    (torch.float16, "symm", "neg_inf", "paired", False, True),
    (torch.float32, "mean", "zero", "all", True, False),
    (torch.bfloat16, "MrAVGw", "neg_inf", "rerank", True, False),
    (torch.float16, "sum", "zero", "paired", True, True),
)


def make_problem(index, backend="cpu", dim=None):
    """Problem ``index`` of SPECS, with its own shapes; the first ones large enough that the C++ kernel wakes
    an OpenMP team (forward and backward) on a 2-core machine."""
    dtype, aggregation, padding, mode, packed, full = SPECS[index % len(SPECS)]
    generator = torch.Generator().manual_seed(1000 + index)
    num_texts, num_images = 6 + index, 7 + index
    words, regions = 9 + 2 * index, 17 + 3 * index
    dim = dim or 96 + 16 * index
    if mode == "paired":
        num_images = num_texts
    text, text_lengths = make_tokens(generator, num_texts, words, dim, min_length=1)
    images, image_lengths = make_tokens(generator, num_images, regions, dim)
    if backend == "reference" and dtype != torch.float32:  # (the reference computes in fp32 anyway)
        dtype = torch.float32
    candidates = torch.randint(0, num_images, (num_texts, 4), generator=generator) if mode == "rerank" else None
    columns = {"all": num_images, "rerank": 4, "paired": 1}[mode]
    upstream = torch.randn(num_texts, columns, generator=generator)
    return dict(text=text.to(dtype), images=images.to(dtype), text_lengths=None if full else text_lengths,
                image_lengths=None if full else image_lengths, candidates=candidates, mode=mode, packed=packed,
                upstream=upstream[:, 0] if mode == "paired" else upstream, backend=backend,
                options=dict(aggregation=aggregation, padding=padding))


def _packed(tokens, lengths):
    lengths = torch.full((tokens.shape[0],), tokens.shape[1]) if lengths is None else lengths
    rows = torch.cat([tokens[i, :int(n)] for i, n in enumerate(lengths)])
    return rows, torch.nn.functional.pad(lengths.cumsum(0), (1, 0))


def run_problem(problem):
    """Forward (scores, argmax) and backward (d text, d images) of one problem, detached."""
    text = problem["text"].clone().requires_grad_()
    images = problem["images"].clone().requires_grad_()
    kwargs = dict(problem["options"], backend=problem["backend"], return_argmax=True)
    if problem["packed"]:
        text_rows, text_cu = _packed(text, problem["text_lengths"])
        image_rows, image_cu = _packed(images, problem["image_lengths"])
        args = (text_rows, image_rows)
        kwargs.update(text_cu_seqlens=text_cu, image_cu_seqlens=image_cu)
    else:
        args = (text, images)
        kwargs.update(text_lengths=problem["text_lengths"], image_lengths=problem["image_lengths"])
    if problem["mode"] == "all":
        scores, argmax = aladin_fast.alignment_scores(*args, **kwargs)
    elif problem["mode"] == "paired":
        scores, argmax = aladin_fast.paired_scores(*args, **kwargs)
    else:
        scores, argmax = aladin_fast.rerank_scores(*args, problem["candidates"], **kwargs)
    (scores * problem["upstream"]).sum().backward()
    return [value.detach().clone() for value in (scores, argmax, text.grad, images.grad)]


def bitwise_equal(got, want) -> bool:
    def bits(x):
        return x.view(torch.uint8) if x.is_floating_point() else x
    return all(g.shape == w.shape and g.dtype == w.dtype and torch.equal(bits(g), bits(w)) for g, w in zip(got, want))


def run_threads(targets):
    """Start one thread per callable (released together by a barrier), join each with a timeout; return the
    exceptions raised (a thread still alive after the timeout is reported as a deadlock)."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(index, target):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            target()
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            errors.append((index, err))

    threads = [threading.Thread(target=wrap, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for index, thread in enumerate(threads):
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            errors.append((index, TimeoutError(f"thread {index} still running after {JOIN_TIMEOUT} s (deadlock?)")))
    return errors


def repeat_and_compare(problem, want, repeats, mismatches, label):
    def target():
        for repeat in range(repeats):
            got = run_problem(problem)
            if not bitwise_equal(got, want):
                mismatches.append(f"{label}: repeat {repeat} differs from the serial run")
                return
    return target


# ----------------------------------------------------------------------------- concurrent calls == serial calls
def test_concurrent_cpu_and_reference_calls_match_serial_bitwise():
    """Six CPU-kernel problems (every dtype, aggregation, padding and mode; padded and packed) and two reference
    ones, each in its own thread, each repeated: every forward and backward bit equals the serial run."""
    problems = [make_problem(i) for i in range(len(SPECS))]
    problems += [make_problem(i, backend="reference", dim=24) for i in (0, 3)]
    wants = [run_problem(p) for p in problems]
    for problem, want in zip(problems, wants):  # (the serial runs are deterministic themselves)
        assert bitwise_equal(run_problem(problem), want)
    mismatches = []
    errors = run_threads([repeat_and_compare(p, w, 30, mismatches, f"{p['backend']} problem {i}")
                          for i, (p, w) in enumerate(zip(problems, wants))])
    assert not errors, errors
    assert not mismatches, mismatches


def test_concurrent_calls_sharing_the_cached_padded_layout():
    """Full-length padded batches of one shape share one cached (offsets, lengths) pair; many threads scoring
    such batches at once (and no-grad calls next to autograd ones) keep their own results."""
    generator = torch.Generator().manual_seed(5)
    text, _ = make_tokens(generator, 5, 8, 64)
    images, _ = make_tokens(generator, 6, 12, 64)
    variants = []
    for index, aggregation in enumerate(("MrSw", "MwSr", "symm", "mean")):
        scale = 1.0 + index
        variants.append((text.float() * scale, images.float(), aggregation))
    wants = []
    for t, v, aggregation in variants:
        with torch.no_grad():
            plain = aladin_fast.alignment_scores(t, v, aggregation=aggregation, backend="cpu")
        tg, vg = t.clone().requires_grad_(), v.clone().requires_grad_()
        scores = aladin_fast.alignment_scores(tg, vg, aggregation=aggregation, backend="cpu")
        scores.sum().backward()
        wants.append((plain, scores.detach(), tg.grad, vg.grad))
    mismatches = []

    def worker(index):
        t, v, aggregation = variants[index]
        plain_want, scores_want, text_grad_want, image_grad_want = wants[index]

        def target():
            for repeat in range(40):
                with torch.no_grad():
                    plain = aladin_fast.alignment_scores(t, v, aggregation=aggregation, backend="cpu")
                tg, vg = t.clone().requires_grad_(), v.clone().requires_grad_()
                scores = aladin_fast.alignment_scores(tg, vg, aggregation=aggregation, backend="cpu")
                scores.sum().backward()
                if not bitwise_equal([plain, scores.detach(), tg.grad, vg.grad],
                                     [plain_want, scores_want, text_grad_want, image_grad_want]):
                    mismatches.append(f"variant {index}, repeat {repeat}")
                    return
        return target

    errors = run_threads([worker(i) for i in range(len(variants))])
    assert not errors, errors
    assert not mismatches, mismatches


# ----------------------------------------------------------------------------- another thread compiling
def test_eager_calls_keep_their_checks_while_another_thread_compiles():
    """torch.compile holds ``torch.compiler.is_compiling()``'s process-wide flag True for a whole compile
    session (torch >= 2.13), on every thread. The op layer asked it whether *this* call is traced, so an eager
    call on another thread meanwhile skipped its value checks: out-of-range lengths and negative candidate ids
    were scored (silently wrong numbers with backend="reference"), an int64 length of 2^32 + 1 wrapped to 1.
    Forced interleaving: thread A compiles with a backend that waits (inside the session) until thread B has
    made its eager calls."""
    generator = torch.Generator().manual_seed(9)
    text, _ = make_tokens(generator, 2, 3, 8)
    images, _ = make_tokens(generator, 3, 5, 8)
    text, images = text.float(), images.float()
    valid = make_problem(1)
    want = run_problem(valid)
    inside, done = threading.Event(), threading.Event()
    observed = {}

    def waiting_backend(graph_module, example_inputs):
        inside.set()
        assert done.wait(JOIN_TIMEOUT), "the eager thread never finished"
        return graph_module.forward

    def compiling():
        compiled = torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0, backend=waiting_backend, fullgraph=True)
        compiled(torch.randn(4))

    def eager():
        try:
            assert inside.wait(JOIN_TIMEOUT), "the compiling thread never reached its backend"
            observed["flag"] = torch.compiler.is_compiling()
            for backend in ("reference", "cpu"):
                with pytest.raises(ValueError, match="text_lengths"):
                    aladin_fast.alignment_scores(text, images, text_lengths=torch.tensor([7, -1]), backend=backend)
                with pytest.raises(ValueError, match="text_lengths"):  # 2^32 + 1 would wrap to 1 in int32
                    aladin_fast.alignment_scores(text, images, text_lengths=torch.tensor([2**32 + 1, 1]),
                                                 backend=backend)
            with pytest.raises(IndexError, match="candidates"):  # -1 would index the last image
                aladin_fast.rerank_scores(text, images, torch.tensor([[0, -1], [1, 2]]), backend="reference")
            with pytest.raises(ValueError, match="prefix mask"):
                aladin_fast.alignment_scores(text, images, image_lengths=torch.tensor(
                    [[True, False, True, False, False]] * 3), backend="reference")
            assert bitwise_equal(run_problem(valid), want)
        finally:
            done.set()

    torch._dynamo.reset()  # (a compiled frame cached by an earlier run would never reach the backend)
    errors = run_threads([compiling, eager])
    assert not errors, f"{errors} (is_compiling() seen by the eager thread: {observed.get('flag')})"


# ----------------------------------------------------------------------------- Triton (interpreter, child process)
def triton_child(repeats: int = 3) -> None:
    """Run in a TRITON_INTERPRET=1 child: one Triton thread (the interpreter is not thread-safe itself) next to
    CPU and reference threads, every result bitwise equal to its serial run."""
    problems = [make_problem(0, backend="triton", dim=16), make_problem(1, dim=32),
                make_problem(4, backend="reference", dim=16)]
    problems[0].update(text=problems[0]["text"][:3, :5], images=problems[0]["images"][:4, :6],
                       upstream=problems[0]["upstream"][:3, :4])
    wants = [run_problem(p) for p in problems]
    mismatches = []
    errors = run_threads([repeat_and_compare(p, w, repeats, mismatches, f"{p['backend']} problem {i}")
                          for i, (p, w) in enumerate(zip(problems, wants))])
    assert not errors, errors
    assert not mismatches, mismatches
    print("triton child ok")


def test_triton_interpreted_thread_next_to_cpu_threads():
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import test_op_threads as t; t.triton_child()"
    result = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "triton child ok" in result.stdout, (result.stdout + result.stderr)[-6000:]
