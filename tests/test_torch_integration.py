"""The ops and ``AlignmentScore`` as PyTorch citizens: torch.export (dynamic shapes, decompositions),
torch.compile with dynamic dims and dtype switches, opcheck on unusual inputs, module copies / pickling /
dtype casts, autocast, deterministic mode, TorchScript / meta tensors (refused clearly).

Values are checked against the float64 reference (``backend="reference"`` on float64 copies).
"""
import copy
import io
import pickle
import warnings

import pytest
import torch

import aladin_fast
from aladin_fast.nn import AlignmentScore
from aladin_fast.ops.alignment_op import score_tokens

pytest.importorskip("aladin_fast._C")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

Dim = torch.export.Dim


def _tolerance(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}[dtype]


def _close(actual, expected, dtype):
    tol = _tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * 10, rtol=tol)


def _reference(text, images, text_lengths=None, image_lengths=None, candidates=None, **options):
    text, images = text.detach().double(), images.detach().double()
    if candidates is not None:
        return aladin_fast.rerank_scores(text, images, candidates, text_lengths, image_lengths, backend="reference",
                                         **options)
    return aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, backend="reference", **options)


def _batch(generator, count, words, images_count, regions, dim=8, dtype=torch.float32):
    text = torch.randn(count, words, dim, generator=generator).to(dtype)
    images = torch.randn(images_count, regions, dim, generator=generator).to(dtype)
    text_lengths = torch.randint(0, words + 1, (count,), generator=generator)
    image_lengths = torch.randint(0, regions + 1, (images_count,), generator=generator)
    return text, images, text_lengths, image_lengths


class _Rerank(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.score = AlignmentScore(aggregation="MwSr", normalize=True)

    def forward(self, text, images, text_lengths, image_lengths, candidates):
        return self.score(text, images, text_lengths, image_lengths, candidates=candidates)


# --------------------------------------------------------------------------- torch.export


def test_regression_export_dynamic_batch_sizes(generator):
    """Regression: the op layer read the batch sizes with ``int()`` (``TokenBatch.count``), which specialised a
    dynamic ``torch.export.Dim`` on the batch dims to its example value ("You marked N as dynamic but your code
    specialized it to be a constant (5)"). Now the exported program serves other batch sizes and lengths, equal to
    the float64 reference, before and after ``run_decompositions()``."""
    batch, images_count = Dim("batch", min=2, max=64), Dim("images", min=2, max=64)
    words, regions = Dim("words", min=2, max=64), Dim("regions", min=2, max=64)
    module = AlignmentScore(aggregation="symm", padding="zero")
    example = _batch(generator, 3, 4, 5, 6)
    program = torch.export.export(module, example, dynamic_shapes=(
        {0: batch, 1: words}, {0: images_count, 1: regions}, {0: batch}, {0: images_count}))
    decomposed = program.run_decompositions()
    for shape in ((3, 4, 5, 6), (2, 7, 4, 3), (6, 2, 9, 5)):
        inputs = _batch(generator, *shape)
        expected = _reference(*inputs, aggregation="symm", padding="zero")
        _close(program.module()(*inputs), expected, torch.float32)
        _close(decomposed.module()(*inputs), expected, torch.float32)

    # rerank: the candidate count K dynamic too
    count, k = Dim("count", min=2, max=64), Dim("k", min=2, max=16)
    candidates = torch.tensor([[0, 4], [2, 2], [1, 3]])
    program = torch.export.export(_Rerank(), (*example, candidates), dynamic_shapes=(
        {0: count, 1: words}, {0: images_count, 1: regions}, {0: count}, {0: images_count}, {0: count, 1: k}))
    inputs = _batch(generator, 4, 3, 7, 5)
    candidates = torch.randint(0, 7, (4, 3), generator=generator)
    _close(program.module()(*inputs, candidates),
           _reference(*inputs, candidates, aggregation="MwSr", normalize=True), torch.float32)
    with pytest.raises(ValueError, match="out of range"):  # the kernel still checks the ids of an exported call
        program.module()(*inputs, candidates + 7)


# --------------------------------------------------------------------------- torch.compile


def test_compile_dynamic_dims_one_graph_and_gradients(generator):
    """mark_dynamic on the batch, word and region dims: one graph for every shape, scores and gradients equal to
    the float64 reference (``max-autotune-no-cudagraphs`` on the CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = AlignmentScore(aggregation="MwSr", padding="zero")
    compiled = torch.compile(module, mode="max-autotune-no-cudagraphs", fullgraph=True)
    for shape in ((3, 4, 5, 6), (2, 7, 4, 3), (4, 5, 3, 2)):
        text, images, text_lengths, image_lengths = _batch(generator, *shape)
        text.requires_grad_(True)
        images.requires_grad_(True)
        for tensor, dim in ((text, 0), (text, 1), (images, 0), (images, 1), (text_lengths, 0), (image_lengths, 0)):
            torch._dynamo.mark_dynamic(tensor, dim)
        scores = compiled(text, images, text_lengths, image_lengths)
        grads = torch.autograd.grad(scores.square().sum(), (text, images))
        text64, images64 = (tokens.detach().double().requires_grad_(True) for tokens in (text, images))
        expected = aladin_fast.alignment_scores(text64, images64, text_lengths, image_lengths, aggregation="MwSr",
                                                padding="zero", backend="reference")
        expected_grads = torch.autograd.grad(expected.square().sum(), (text64, images64))
        _close(scores, expected, torch.float32)
        for actual, oracle in zip(grads, expected_grads):
            _close(actual, oracle, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_dtype_switch_recompiles_correctly(generator):
    """float32 -> bfloat16 -> float32 through one compiled module: each dtype gets its own correct code."""
    torch._dynamo.reset()
    compiled = torch.compile(AlignmentScore(aggregation="MrSw", padding="zero"), fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        text, images = torch.randn(3, 4, 8, generator=generator).to(dtype), torch.randn(5, 6, 8, generator=generator)
        images = images.to(dtype)
        scores = compiled(text, images)
        assert scores.dtype == torch.float32
        _close(scores, _reference(text, images, aggregation="MrSw", padding="zero"), torch.float32)


# --------------------------------------------------------------------------- opcheck


def test_opcheck_unusual_inputs(generator):
    """bf16 / fp16 tokens, non-contiguous tokens, zero-size batches and zero candidates: schema, fake tensor,
    autograd registration and AOT dispatch checks."""
    checks = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    t_off, t_len = torch.tensor([0, 5]), torch.tensor([5, 4], dtype=torch.int32)
    v_off, v_len = torch.tensor([0, 4, 8]), torch.tensor([4, 0, 3], dtype=torch.int32)
    empty_off, empty_len = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.int32)
    text = torch.randn(8, 10, generator=generator).t().requires_grad_(True)  # [10, 8] non-contiguous
    images = torch.randn(12, 16, generator=generator)[:, ::2].requires_grad_(True)  # [12, 8] non-contiguous
    cases = [(text, t_off, t_len, images, v_off, v_len, None, 3, False, 5, 4, "cpu", True, True)]
    for dtype in (torch.bfloat16, torch.float16):
        low_text, low_images = (tokens.detach().to(dtype).requires_grad_(True) for tokens in (text, images))
        cases.append((low_text, t_off, t_len, low_images, v_off, v_len, torch.tensor([[2, 0], [1, 1]]), 1, True,
                      5, 4, "cpu", True, False))
    cases.append((torch.randn(0, 8, requires_grad=True), empty_off, empty_len, images, v_off, v_len, None, 2,
                  False, 0, 4, "cpu", False, True))
    cases.append((text, t_off, t_len, images, v_off, v_len, torch.zeros(2, 0, dtype=torch.long), 0, False, 5, 4,
                  "cpu", True, False))
    for args in cases:
        torch.library.opcheck(score_tokens, args, test_utils=checks)


# --------------------------------------------------------------------------- the module


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.project = torch.nn.Linear(8, 8)
        self.score = AlignmentScore(aggregation="symm", padding="zero", normalize=True, backend="cpu")

    def forward(self, text, images, text_lengths=None, image_lengths=None):
        return self.score(self.project(text), self.project(images), text_lengths, image_lengths)


def test_module_copies_pickles_and_dtype_casts(generator):
    model = _Model()
    text, images, text_lengths, image_lengths = _batch(generator, 3, 4, 5, 6)
    expected = model(text, images, text_lengths, image_lengths)
    with torch.no_grad():
        projected = (model.project(text), model.project(images))
    _close(expected, _reference(*projected, text_lengths, image_lengths, aggregation="symm", padding="zero",
                                normalize=True), torch.float32)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    rebuilt = _Model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    copies.append(rebuilt)
    for other in copies:
        assert repr(other.score) == ("AlignmentScore(aggregation='symm', padding='zero', normalize=True, "
                                     "backend='cpu')")
        assert torch.equal(other(text, images, text_lengths, image_lengths), expected)
    assert list(model.score.state_dict()) == []
    low = copy.deepcopy(model).bfloat16()
    scores = low(text.bfloat16(), images.bfloat16(), text_lengths, image_lengths)
    assert scores.dtype == torch.float32
    with torch.no_grad():
        projected = (low.project(text.bfloat16()), low.project(images.bfloat16()))
    _close(scores, _reference(*projected, text_lengths, image_lengths, aggregation="symm", padding="zero",
                              normalize=True), torch.bfloat16)


def test_autocast_bf16_model_scores_and_gradients(generator):
    """Under CPU autocast the projection emits bf16 tokens: the op scores them in float32 and the gradients
    reach the float32 parameters in float32, close to the float64 reference of the bf16 tokens."""
    model = _Model()
    text, images, text_lengths, image_lengths = _batch(generator, 3, 4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text_tokens, image_tokens = model.project(text), model.project(images)
        assert text_tokens.dtype == torch.bfloat16
        scores = model.score(text_tokens, image_tokens, text_lengths, image_lengths)
    assert scores.dtype == torch.float32
    _close(scores, _reference(text_tokens, image_tokens, text_lengths, image_lengths, aggregation="symm",
                              padding="zero", normalize=True), torch.bfloat16)
    scores.sum().backward()
    assert model.project.weight.grad.dtype == torch.float32 and torch.isfinite(model.project.weight.grad).all()


def test_deterministic_mode_bitwise_repeatable(generator):
    text, images, text_lengths, image_lengths = _batch(generator, 3, 4, 5, 6)
    text.requires_grad_(True)
    images.requires_grad_(True)
    candidates = torch.tensor([[0, 0, 4], [2, 2, 2], [1, 3, 1]])  # repeated ids: accumulated image rows
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            scores = aladin_fast.rerank_scores(text, images, candidates, text_lengths, image_lengths,
                                               aggregation="symm", backend="cpu")
            runs.append((scores,) + torch.autograd.grad(scores.square().sum(), (text, images)))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    _close(runs[0][0], _reference(text, images, text_lengths, image_lengths, candidates, aggregation="symm"),
           torch.float32)


# --------------------------------------------------------------------------- refused clearly


def test_regression_jit_trace_refused_not_silently_wrong(generator):
    """Regression: torch.jit.trace of a module calling the ops returned a trace whose scores were the zero-filled
    output buffers (the kernel writes through numpy views the tracer does not record): silently wrong."""
    text, images = torch.randn(3, 4, 8, generator=generator), torch.randn(5, 6, 8, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the old behaviour
        with pytest.raises(RuntimeError, match="torch.jit.trace cannot record aladin_fast"):
            torch.jit.trace(_Model(), (text, images))


def test_regression_jit_script_refused_clearly():
    """Regression: torch.jit.script failed inside TorchScript's frontend ("keyword-arg expansion is not
    supported") on the module's source; now a clear error names the module and the alternatives."""
    with pytest.raises(RuntimeError, match="AlignmentScore cannot be compiled by torch.jit.script"):
        torch.jit.script(_Model())


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_regression_meta_tokens_refused_clearly(backend):
    """Regression: meta-device tokens failed deep inside ("aten::equal: attempted to run this operator with Meta
    tensors", "Tensor.item() cannot be called on meta tensors", "Cannot copy out of meta tensor")."""
    text, images = torch.empty(3, 4, 8, device="meta"), torch.empty(5, 6, 8, device="meta")
    lengths = torch.tensor([4, 1, 3], device="meta")
    calls = [lambda: aladin_fast.alignment_scores(text, images, backend=backend),
             lambda: aladin_fast.alignment_scores(text, images, lengths, backend=backend),
             lambda: aladin_fast.rerank_scores(text, images, torch.zeros(3, 2, dtype=torch.long, device="meta"),
                                               backend=backend),
             lambda: AlignmentScore(backend=backend)(text, images[:3], paired=True)]
    for call in calls:
        with pytest.raises(NotImplementedError, match="do not run on meta tensors"):
            call()
