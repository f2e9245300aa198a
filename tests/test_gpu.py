"""The Triton backend on a real CUDA GPU: forward, backward (every backward strategy), determinism,
torch.compile, opcheck and peak memory, against the float64 reference on the CPU.

Skipped without CUDA (this project's CI has none); run on a GPU machine with
``pytest tests/test_gpu.py`` (benchmarks/gpu/run_gpu.sh does, and records the
result). Tolerances scale with the dtype: fp32 inputs use exact FMA dots, so
errors are fp32 accumulation only; fp16 / bf16 inputs are rounded before the
reference sees them, so only the accumulation order differs.
"""
from __future__ import annotations

import pytest
import torch

import aladin_fast
from cases import AGGREGATIONS, PADDINGS, fp32_tolerance, make_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("all_pairs", "rerank", "paired")
# (Nt, Ni, W, R, D): awkward lengths (1, 37), non-powers of two, a multi-block caption (W=70)
SHAPES = [(5, 7, 12, 36, 100), (3, 4, 1, 37, 64), (4, 6, 70, 9, 33)]


def _call(mode, text, images, t_len, v_len, aggregation, padding, backend, candidates):
    if mode == "all_pairs":
        return aladin_fast.alignment_scores(text, images, t_len, v_len, aggregation, padding, backend=backend)
    if mode == "rerank":
        return aladin_fast.rerank_scores(text, images, candidates, t_len, v_len, aggregation, padding,
                                         backend=backend)
    n = min(text.shape[0], images.shape[0])
    return aladin_fast.paired_scores(text[:n], images[:n], t_len[:n], v_len[:n], aggregation, padding,
                                     backend=backend)


def _case(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    nt, ni, w, r, d = shape
    text, t_len = make_tokens(gen, nt, w, d, min_length=0)
    images, v_len = make_tokens(gen, ni, r, d, min_length=0)
    candidates = torch.randint(0, ni, (nt, 5), generator=gen)
    candidates[0, :2] = ni - 1  # repeated candidates
    return text, images, t_len, v_len, candidates


def _tolerance(shape, dtype):
    _, _, w, r, d = shape
    return fp32_tolerance(d, w, r) * (1 if dtype == torch.float32 else 4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dtype, mode):
    text, images, t_len, v_len, candidates = _case(sum(shape), shape)
    text, images = text.to(dtype), images.to(dtype)  # the reference sees the rounded inputs
    for aggregation in AGGREGATIONS:
        for padding in PADDINGS:
            want = _call(mode, text.double(), images.double(), t_len, v_len, aggregation, padding, "reference",
                         candidates)
            got = _call(mode, text.cuda(), images.cuda(), t_len.cuda(), v_len.cuda(), aggregation, padding, "triton",
                        candidates.cuda())
            assert got.dtype == torch.float32 and got.device.type == "cuda"
            torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=_tolerance(shape, dtype),
                                       msg=lambda m: f"{aggregation} {padding}: {m}")


@pytest.mark.parametrize("strategy", ["auto", "gather", "dense", "gemm", "segmented", "atomic"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference(dtype, mode, strategy, monkeypatch):
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    shape = (5, 7, 12, 36, 100)
    text0, images0, t_len, v_len, candidates = _case(3, shape)
    text0, images0 = text0.clamp(-2, 2).to(dtype).double(), images0.clamp(-2, 2).to(dtype).double()
    for aggregation in AGGREGATIONS:
        for padding in PADDINGS:
            grads = []
            for backend, device, compute in (("reference", "cpu", torch.float64), ("triton", "cuda", dtype)):
                text = text0.to(device, compute).detach().clone().requires_grad_()
                images = images0.to(device, compute).detach().clone().requires_grad_()
                scores = _call(mode, text, images, t_len.to(device), v_len.to(device), aggregation, padding, backend,
                               candidates.to(device))
                upstream = torch.linspace(-1, 1, scores.numel(), dtype=torch.float64).view(scores.shape)
                (scores * upstream.to(device, scores.dtype)).sum().backward()
                grads.append((text.grad.cpu().double(), images.grad.cpu().double()))
            atol = 1e-5 if dtype == torch.float32 else 2e-2
            for got, want, name in zip(grads[1], grads[0], ("text", "images")):
                torch.testing.assert_close(got, want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=atol,
                                           msg=lambda m: f"d {name} {aggregation} {padding}: {m}")


@pytest.mark.parametrize("aggregation", ["symm", "MrSw", "MwSr"])
@pytest.mark.parametrize("strategy", ["auto", "gather", "dense", "gemm", "segmented"])
def test_forward_and_backward_bitwise_deterministic(monkeypatch, strategy, aggregation):
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(64, 32, 256, generator=gen).bfloat16().cuda()
    images = torch.randn(64, 36, 256, generator=gen).bfloat16().cuda()
    runs = []
    for _ in range(3):
        t, v = text.clone().requires_grad_(), images.clone().requires_grad_()
        scores = aladin_fast.alignment_scores(t, v, aggregation=aggregation, backend="triton")
        scores.logsumexp(1).sum().backward()
        runs.append((scores.detach(), t.grad, v.grad))
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["auto", "gather", "dense", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_padded_backward_and_forward_finite_check(dtype, strategy, monkeypatch):
    """Full-length padded batches (no lengths: the cached token maps and the finiteness check the forward
    starts, read by the backward) vs the float64 reference; then a non-finite token -- valid or padding of
    nothing, in text and in images -- must give the segmented kernels' gradients bit for bit (the GEMM
    strategies fall back), for a forward run before and after the poisoning."""
    from aladin_fast.ops import alignment_op

    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    monkeypatch.setenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", "0.05")  # several chunks
    gen = torch.Generator().manual_seed(11)
    text0 = torch.randn(6, 7, 48, generator=gen).clamp(-2, 2).to(dtype).double()
    images0 = torch.randn(5, 9, 48, generator=gen).clamp(-2, 2).to(dtype).double()
    # exact in bf16: the bf16 "gemm" workspace rounds each pair's coefficient to bf16 (as torch's own autograd
    # of the plain bf16 formulation does); a randn upstream cost up to 0.03 in d text for symm (GPU run 4)
    upstream = torch.randint(-4, 5, (6, 5), generator=gen).double() / 2
    for aggregation in ("MrSw", "MrAVGw", "MwSr", "symm"):
        grads = []
        for backend, device, compute in (("reference", "cpu", torch.float64), ("triton", "cuda", dtype)):
            text = text0.to(device, compute).detach().clone().requires_grad_()
            images = images0.to(device, compute).detach().clone().requires_grad_()
            scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend)
            (scores * upstream.to(device, scores.dtype)).sum().backward()
            grads.append((text.grad.cpu().double(), images.grad.cpu().double()))
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)
        for got, want, name in zip(grads[1], grads[0], ("text", "images")):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"d {name} {aggregation}: {m}")
    checks = []
    real_start = alignment_op.start_finite_check
    monkeypatch.setattr(alignment_op, "start_finite_check", lambda *a: checks.append(real_start(*a)) or checks[-1])
    for side, index in (("text", (2, 3, 5)), ("images", (4, 8, 0))):
        for value in (float("inf"), float("nan")):
            results = []
            for chosen in (strategy, "segmented"):
                monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", chosen)
                text = text0.to("cuda", dtype).detach().clone().requires_grad_()
                images = images0.to("cuda", dtype).detach().clone().requires_grad_()
                with torch.no_grad():
                    (text if side == "text" else images)[index] = value
                scores = aladin_fast.alignment_scores(text, images, aggregation="symm", backend="triton")
                (scores.nan_to_num(0, 0, 0) * upstream.cuda()).sum().backward()
                results.append((text.grad, images.grad))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # the GEMM strategies' forwards started a check (on the GPU, ahead of the kernel); it said "not finite"
    assert [bool(check) for check in checks if check is not None] == (
        [False] * 4 if strategy in ("auto", "gemm", "gather") else [])


@pytest.mark.parametrize("strategy", ["auto", "segmented"])
@pytest.mark.parametrize("aggregation", ["MrSw", "MwSr", "symm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_tokens_decided_on_device(dtype, aggregation, strategy, monkeypatch):
    """All pairs: no finiteness check before the winner-GEMM images kernel ("auto" MrSw) -- programs whose
    accumulators end non-finite recompute their rows by the sparse sum, on tensor-core GEMMs too -- and the
    same recomputation in the segmented kernels (MwSr's text side, symm's fallback). Finite, NaN and inf
    text tokens (and a NaN image token) must give the C++ backward's gradients: the same NaN / inf pattern,
    equal values elsewhere."""
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    gen = torch.Generator().manual_seed(12)
    text0 = torch.randn(6, 7, 48, generator=gen).clamp(-2, 2).to(dtype).float()
    images0 = torch.randn(5, 9, 48, generator=gen).clamp(-2, 2).to(dtype).float()
    upstream = torch.randint(-4, 5, (6, 5), generator=gen).float() / 2
    for side, index, value in (("text", None, 0.0), ("text", (2, 3, 5), float("nan")),
                               ("text", (0, 6, 1), float("inf")), ("images", (4, 8, 0), float("nan"))):
        results = []
        for backend, device in (("triton", "cuda"), ("cpu", "cpu")):
            text, images = text0.clone(), images0.clone()
            if index is not None:
                (text if side == "text" else images)[index] = value
            text = text.to(device, dtype).requires_grad_()
            images = images.to(device, dtype).requires_grad_()
            scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend)
            (scores.nan_to_num(0, 0, 0) * upstream.to(device)).sum().backward()
            results.append((text.grad.cpu().float(), images.grad.cpu().float()))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for got, want in zip(*results):
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (side, value)
            assert torch.equal(torch.isinf(got), torch.isinf(want)), (side, value)
            torch.testing.assert_close(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=tol, atol=tol)


@pytest.mark.parametrize("aggregation", ["MrSw", "MrAVGw", "MwSr"])
def test_training_step_captures_in_a_cuda_graph(aggregation, monkeypatch):
    """The default ("auto") fwd + bwd has no host sync for MrSw / MrAVGw / MwSr, so a whole training step can
    be captured in a CUDA graph (a sync would raise during capture). Replays on new values copied into the
    static inputs -- including a NaN text token, whose programs must recompute their image rows exactly on
    the device -- give the eager step's gradients."""
    monkeypatch.delenv("ALADIN_FAST_TRITON_BACKWARD", raising=False)
    gen = torch.Generator().manual_seed(13)
    text = torch.zeros(6, 7, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    images = torch.zeros(5, 9, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        text.grad = images.grad = None
        scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="triton")
        scores.nan_to_num(0, 0, 0).float().logsumexp(1).sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    static_grads = (text.grad, images.grad)
    for trial in range(3):
        new_text = torch.randn(6, 7, 48, generator=gen).clamp(-2, 2)
        new_images = torch.randn(5, 9, 48, generator=gen).clamp(-2, 2)
        if trial == 2:
            new_text[2, 3, 5] = float("nan")
        with torch.no_grad():
            text.copy_(new_text)
            images.copy_(new_images)
        graph.replay()
        got = [grad.float().cpu() for grad in static_grads]
        step()  # eager, same inputs
        want = [grad.float().cpu() for grad in (text.grad, images.grad)]
        for g, w in zip(got, want):
            assert torch.equal(torch.isnan(g), torch.isnan(w)), (aggregation, trial)
            torch.testing.assert_close(g.nan_to_num(0), w.nan_to_num(0), rtol=0, atol=0)


def test_compiled_training_step_with_cuda_graphs():
    """torch.compile(mode="reduce-overhead") -- CUDA graphs around the compiled step -- of an MrSw step on a
    full-length padded batch: the op layer built the layout, so the op skips its range check (no sync) and the
    backward decides finiteness on the device; forward and gradients match eager over several calls."""
    gen = torch.Generator().manual_seed(14)
    project = torch.nn.Linear(48, 48).cuda()

    def step(text, images):
        scores = aladin_fast.alignment_scores(project(text), images, backend="triton")
        return scores.logsumexp(1).sum()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        text0 = torch.randn(6, 7, 48, generator=gen).cuda()
        images0 = torch.randn(5, 9, 48, generator=gen).cuda()
        results = []
        for fn in (step, compiled):
            project.zero_grad()
            images = images0.clone().requires_grad_()
            loss = fn(text0, images)
            loss.backward()
            results.append((loss.detach().clone(), images.grad.clone(), project.weight.grad.clone()))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_deterministic_algorithms_force_segmented(monkeypatch):
    from aladin_fast.ops.alignment_op import triton_backward_strategy

    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "atomic")
    assert triton_backward_strategy() == "atomic"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(True)
    try:
        assert triton_backward_strategy() == "segmented"
        monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", "gemm")  # torch.mm would raise without the setting
        assert triton_backward_strategy() == "segmented"
    finally:
        torch.use_deterministic_algorithms(False)


def test_nan_poisons_only_its_pairs():
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(3, 8, 64, generator=gen)
    images = torch.randn(4, 9, 64, generator=gen)
    text[1, 2, 5] = float("nan")
    images[3, 4, 0] = float("nan")
    for aggregation in AGGREGATIONS:
        scores = aladin_fast.alignment_scores(text.cuda(), images.cuda(), aggregation=aggregation, backend="triton")
        poisoned = torch.zeros(3, 4, dtype=torch.bool)
        poisoned[1, :] = True
        poisoned[:, 3] = True
        assert torch.equal(torch.isnan(scores.cpu()), poisoned), aggregation


def test_packed_inputs_and_compile_fullgraph():
    gen = torch.Generator().manual_seed(2)
    text = torch.randn(11, 32, generator=gen).cuda().requires_grad_()
    images = torch.randn(13, 32, generator=gen).cuda().requires_grad_()
    cu_t = torch.tensor([0, 4, 4, 11]).cuda()
    cu_v = torch.tensor([0, 6, 13]).cuda()

    def loss_fn(t, v):
        scores = aladin_fast.alignment_scores(t, v, aggregation="symm", backend="triton", text_cu_seqlens=cu_t,
                                              image_cu_seqlens=cu_v, max_text_len=7, max_image_len=7)
        return scores.logsumexp(1).sum()

    eager = loss_fn(text, images)
    eager_grads = torch.autograd.grad(eager, (text, images))
    compiled = torch.compile(loss_fn, fullgraph=True)(text, images)
    compiled_grads = torch.autograd.grad(compiled, (text, images))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
    want = aladin_fast.alignment_scores(text.detach().cpu().double(), images.detach().cpu().double(),
                                        aggregation="symm", backend="reference", text_cu_seqlens=cu_t.cpu(),
                                        image_cu_seqlens=cu_v.cpu())
    torch.testing.assert_close(want.logsumexp(1).sum().float(), eager.detach().cpu(), rtol=1e-5, atol=1e-4)


def test_opcheck_on_cuda():
    from aladin_fast.ops.alignment_op import score_tokens, score_tokens_backward

    gen = torch.Generator().manual_seed(3)
    text = torch.randn(10, 16, generator=gen).cuda().requires_grad_()
    images = torch.randn(12, 16, generator=gen).cuda().requires_grad_()
    t_off, t_len = torch.tensor([0, 5]).cuda(), torch.tensor([5, 4], dtype=torch.int32).cuda()
    v_off, v_len = torch.tensor([0, 4, 8]).cuda(), torch.tensor([4, 4, 3], dtype=torch.int32).cuda()
    for candidates in (None, torch.tensor([[2, 0], [1, 1]]).cuda()):
        for aggregation in (0, 2, 3):
            args = (text, t_off, t_len, images, v_off, v_len, candidates, aggregation, False, 5, 4, "triton",
                    True, aggregation in (2, 3))
            torch.library.opcheck(score_tokens, args,
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    scores, argmax, region_argmax = score_tokens(text, t_off, t_len, images, v_off, v_len, None, 3, True, 5, 4,
                                                 "triton", True, True)
    backward_args = (torch.ones_like(scores), text.detach(), t_off, t_len, images.detach(), v_off, v_len, None,
                     argmax, region_argmax, 3, True, 5, 4, "triton")
    torch.library.opcheck(score_tokens_backward, backward_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("strategy", ["dense", "gemm", "gather"])
@pytest.mark.parametrize("aggregation", ["MrSw", "symm"])
def test_peak_memory_far_below_pairs_words_regions(aggregation, strategy, monkeypatch):
    """Nt = Ni = 128, W = 32, R = 36, D = 1024 fwd + bwd: extra memory O(pairs * W), not [Nt, Ni, W, R].

    "gemm" with the default 8 MiB workspace, fp32: 10 chunks of 410 rows x 4608 image tokens x 4 B = 7.56 MB
    of weight rows, argmax 2.10 MB + region argmax 2.36 MB (symm), scores / upstream / token maps 0.17 MB:
    ~12.2 MB beyond the gradients (fp32 products go into the gradients in place), under the 18.9 MB bound."""
    monkeypatch.setenv("ALADIN_FAST_TRITON_BACKWARD", strategy)
    monkeypatch.delenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", raising=False)
    text = torch.randn(128, 32, 1024, device="cuda", requires_grad=True)
    images = torch.randn(128, 36, 1024, device="cuda", requires_grad=True)
    aladin_fast.alignment_scores(text[:2], images[:2], aggregation=aggregation, backend="triton").sum().backward()
    text.grad = images.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="triton").sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    full_similarity = 128 * 128 * 32 * 36 * 4  # 75.5 MB
    gradients = (128 * 32 + 128 * 36) * 1024 * 4  # the .grad tensors themselves (35.7 MB)
    print(f"peak extra {extra / 2**20:.1f} MiB (gradients {gradients / 2**20:.1f} MiB)")
    assert extra - gradients < full_similarity / 4, f"{extra / 2**20:.1f} MiB extra"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["all_pairs", "rerank"])
def test_per_pair_kernel_forward_and_backward(dtype, mode, monkeypatch):
    """The per-pair kernels (forced; the launchers pick packed tiles for these sizes) vs the reference."""
    monkeypatch.setenv("ALADIN_FAST_TRITON_KERNEL", "pair")
    shape = (4, 5, 9, 36, 48)
    text0, images0, t_len, v_len, candidates = _case(5, shape)
    text0, images0 = text0.clamp(-2, 2).to(dtype).double(), images0.clamp(-2, 2).to(dtype).double()
    for aggregation in AGGREGATIONS:
        for padding in PADDINGS:
            results = []
            for backend, device, compute in (("reference", "cpu", torch.float64), ("triton", "cuda", dtype)):
                text = text0.to(device, compute).detach().clone().requires_grad_()
                images = images0.to(device, compute).detach().clone().requires_grad_()
                scores = _call(mode, text, images, t_len.to(device), v_len.to(device), aggregation, padding, backend,
                               candidates.to(device))
                scores.float().sum().backward()
                results.append((scores.detach().cpu().double(), text.grad.cpu().double(), images.grad.cpu().double()))
            atol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=_tolerance(shape, dtype))
            for got, want in zip(results[1][1:], results[0][1:]):
                torch.testing.assert_close(got, want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=atol)
