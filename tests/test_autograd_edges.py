"""Autograd edge cases a PyTorch user hits, against the float64 reference gradients.

retain_graph twice, aliased / expanded / sliced / transposed inputs, gradients on one side only,
no_grad / inference_mode, autocast with mixed dtypes, torch.func transforms and forward-mode AD
(refused clearly by the kernel backends: they used to raise deep internal errors or, for forward-mode
AD, silently drop the tangent), hooks, upstream NaN / zeros, and the module compiled with a dynamic batch.
"""
import pytest
import torch

import aladin_fast
from aladin_fast.nn import AlignmentScore

pytest.importorskip("aladin_fast._C")

AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")
TEXT_LENGTHS, IMAGE_LENGTHS = torch.tensor([4, 2, 1]), torch.tensor([3, 1])


def _reference_grads(text, images, upstream, aggregation, build=lambda t, i: (t, i), **options):
    """d(sum(scores * upstream)) / d(text, images) on the float64 reference (``build`` maps the leaves to the
    op's inputs, e.g. an expand)."""
    text = text.detach().double().requires_grad_()
    images = images.detach().double().requires_grad_()
    scores = aladin_fast.alignment_scores(*build(text, images), aggregation=aggregation, backend="reference",
                                          **options)
    return torch.autograd.grad((scores * upstream.double()).sum(), (text, images))


def _close(actual, expected, dtype):
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(actual.double(), expected, atol=tolerance, rtol=tolerance, equal_nan=True)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retain_graph_second_backward_equal(generator, aggregation, dtype):
    text = torch.randn(3, 4, 5, generator=generator, dtype=dtype, requires_grad=True)
    images = torch.randn(2, 3, 5, generator=generator, dtype=dtype, requires_grad=True)
    scores = aladin_fast.alignment_scores(text, images, TEXT_LENGTHS, IMAGE_LENGTHS, aggregation=aggregation,
                                          backend="cpu")
    first = torch.autograd.grad(scores.sum(), (text, images), retain_graph=True)
    second = torch.autograd.grad(scores.sum(), (text, images))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


LAYOUTS = {  # leaf shape, leaf -> text [3, 4, 5]
    "expand_batch": ((1, 4, 5), lambda x: x.expand(3, 4, 5)),
    "expand_dim": ((3, 4, 1), lambda x: x.expand(3, 4, 5)),
    "strided_slice": ((3, 8, 10), lambda x: x[:, ::2, 1::2]),
    "transposed": ((5, 4, 3), lambda x: x.transpose(0, 2)),
    "channels_last_like": ((3, 5, 4), lambda x: x.transpose(1, 2)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_non_contiguous_inputs_accumulate_into_base(generator, layout, aggregation):
    shape, view = LAYOUTS[layout]
    base = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    images = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    scores = aladin_fast.alignment_scores(view(base), images, TEXT_LENGTHS, IMAGE_LENGTHS, aggregation=aggregation,
                                          backend="cpu")
    upstream = torch.randn(scores.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((scores * upstream).sum(), (base, images))
    expected = _reference_grads(base, images, upstream, aggregation, lambda b, i: (view(b), i),
                                text_lengths=TEXT_LENGTHS, image_lengths=IMAGE_LENGTHS)
    for actual, oracle in zip(grads, expected):
        _close(actual, oracle, torch.float64)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aliased_text_and_images(generator, aggregation):
    """The same tensor on both sides, and two overlapping views of one base: both terms reach the base."""
    base = torch.randn(5, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    cases = {"same": (lambda b: (b, b), {}),
             "views": (lambda b: (b[:3], b[2:]), dict(text_lengths=torch.tensor([4, 3, 2]),
                                                      image_lengths=torch.tensor([1, 4, 4])))}
    for build, lengths in cases.values():
        scores = aladin_fast.alignment_scores(*build(base), aggregation=aggregation, backend="cpu", **lengths)
        grad, = torch.autograd.grad(scores.sum(), base)
        oracle_base = base.detach().clone().requires_grad_()
        oracle_scores = aladin_fast.alignment_scores(*build(oracle_base), aggregation=aggregation,
                                                     backend="reference", **lengths)
        oracle, = torch.autograd.grad(oracle_scores.sum(), oracle_base)
        _close(grad, oracle, torch.float64)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_one_side_requires_grad_and_allow_unused(generator, aggregation):
    text = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    images = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    unused = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    upstream = torch.ones(3, 2, dtype=torch.float64)
    oracle_text, oracle_images = _reference_grads(text, images, upstream, aggregation, text_lengths=TEXT_LENGTHS,
                                                  image_lengths=IMAGE_LENGTHS)
    for side, oracle in ((0, oracle_text), (1, oracle_images)):
        inputs = [text.clone(), images.clone()]
        inputs[side].requires_grad_()
        scores = aladin_fast.alignment_scores(*inputs, TEXT_LENGTHS, IMAGE_LENGTHS, aggregation=aggregation,
                                              backend="cpu")
        grad, none = torch.autograd.grad(scores.sum(), (inputs[side], unused), allow_unused=True)
        assert none is None
        _close(grad, oracle, torch.float64)


def test_no_grad_and_inference_mode_build_no_graph(generator):
    text = torch.randn(3, 4, 5, generator=generator, requires_grad=True)
    images = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    with torch.no_grad():
        scores = aladin_fast.alignment_scores(text, images, aggregation="symm", backend="cpu")
    assert scores.grad_fn is None and not scores.requires_grad
    with torch.inference_mode():
        inferred = aladin_fast.alignment_scores(text, images, aggregation="symm", backend="cpu")
        frozen_text = torch.randn(3, 4, 5, generator=generator)
    assert inferred.is_inference() and torch.equal(inferred, scores)
    # an inference-mode tensor used later on the side that needs no gradient: a normal graph
    scores = aladin_fast.alignment_scores(frozen_text.clone(), images, aggregation="symm", backend="cpu")
    grad, = torch.autograd.grad(scores.sum(), images)
    _close(grad, _reference_grads(frozen_text, images, torch.ones(3, 2), "symm")[1], torch.float32)


def test_autocast_mixed_dtypes_refused_clearly(generator):
    text = torch.randn(3, 4, 5, generator=generator, requires_grad=True)
    images = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    project = torch.nn.Linear(5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="same dtype"):
            aladin_fast.alignment_scores(project(text), images, backend="cpu")
        scores = aladin_fast.alignment_scores(text, images, backend="cpu")  # float32 in: float32 scores
    assert scores.dtype == torch.float32
    grad, = torch.autograd.grad(scores.sum(), text)
    _close(grad, _reference_grads(text, images, torch.ones(3, 2), "MrSw")[0], torch.float32)


TRANSFORMS = {
    "grad": lambda f, x: torch.func.grad(lambda t: f(t).sum())(x),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
    "vmap": lambda f, x: torch.func.vmap(f)(x[None].expand(2, -1, -1, -1)),
}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_function_transforms_refused_clearly_by_kernel_backend(generator, transform):
    text = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    images = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)

    def scores(backend):
        return lambda t: aladin_fast.alignment_scores(t, images, aggregation="symm", backend=backend)

    if transform == "vmap":  # no backend batches over vmap (the reference failed deep inside): call on a batch
        for backend in ("cpu", "reference"):
            with pytest.raises(NotImplementedError, match=r"do not support torch.func.vmap \(any backend\)"):
                TRANSFORMS[transform](scores(backend), text)
        return
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        TRANSFORMS[transform](scores("cpu"), text)
    if transform == "grad":  # the advertised way out works and matches the explicit reference gradient
        _close(TRANSFORMS[transform](scores("reference"), text),
               _reference_grads(text, images, torch.ones(3, 2), "symm")[0], torch.float64)


def test_forward_mode_ad_refused_not_silently_zero(generator):
    text = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    images = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    tangent = torch.randn(text.shape, generator=generator, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(text, tangent)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            aladin_fast.alignment_scores(dual, images, backend="cpu")
        scores = aladin_fast.alignment_scores(dual, images, backend="reference")
        assert torch.autograd.forward_ad.unpack_dual(scores).tangent is not None


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_hooks_scores_used_twice_and_special_upstream(generator, aggregation):
    text = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    images = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    seen = []
    text.register_hook(lambda grad: seen.append(grad.clone()))
    lengths = dict(text_lengths=TEXT_LENGTHS, image_lengths=IMAGE_LENGTHS)
    scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu", **lengths)
    loss = (scores * scores).sum() + scores.logsumexp(dim=1).sum()  # the scores used twice
    grads = torch.autograd.grad(loss, (text, images))
    assert len(seen) == 1 and torch.equal(seen[0], grads[0])
    upstream = (2 * scores + torch.softmax(scores, dim=1)).detach()  # d loss / d scores
    for actual, oracle in zip(grads, _reference_grads(text, images, upstream, aggregation, **lengths)):
        _close(actual, oracle, torch.float64)
    for special in (float("nan"), 0.0):  # NaN / zero upstream entries, a transposed (non-contiguous) upstream
        upstream = torch.randn(2, 3, generator=generator, dtype=torch.float64).t()
        upstream[1, 0] = special
        scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend="cpu", **lengths)
        grads = torch.autograd.grad(scores, (text, images), upstream)
        for actual, oracle in zip(grads, _reference_grads(text, images, upstream, aggregation, **lengths)):
            _close(actual, oracle, torch.float64)


def test_compiled_module_dynamic_batch(generator):
    torch._dynamo.reset()
    module = AlignmentScore(aggregation="symm", backend="cpu")
    compiled = torch.compile(module, fullgraph=True)
    for count in (3, 5):
        text = torch.randn(count, 4, 5, generator=generator, requires_grad=True)
        images = torch.randn(count, 3, 5, generator=generator, requires_grad=True)
        text_lengths = torch.randint(0, 5, (count,), generator=generator)
        image_lengths = torch.randint(0, 4, (count,), generator=generator)
        for tensor in (text, images, text_lengths, image_lengths):
            torch._dynamo.mark_dynamic(tensor, 0)
        for paired in (False, True):
            scores = compiled(text, images, text_lengths, image_lengths, paired=paired)
            grads = torch.autograd.grad(scores.square().sum(), (text, images))
            eager = module(text, images, text_lengths, image_lengths, paired=paired)
            eager_grads = torch.autograd.grad(eager.square().sum(), (text, images))
            torch.testing.assert_close(scores, eager)
            for actual, expected in zip(grads, eager_grads):
                torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_regression_index_tensors_made_under_inference_mode(backend):
    """int32 lengths / candidates created under torch.inference_mode (a data pipeline's) were refused on "cpu" at
    the forward ("Inference tensors cannot be saved for backward"); the reference took them. Both work now, with
    the float64 reference's gradients."""
    generator = torch.Generator().manual_seed(5)
    text = torch.randn(3, 4, 8, generator=generator, dtype=torch.float64)
    images = torch.randn(5, 6, 8, generator=generator, dtype=torch.float64)
    with torch.inference_mode():
        text_lengths = torch.tensor([4, 1, 3], dtype=torch.int32)
        image_lengths = torch.tensor([6, 2, 5, 1, 3], dtype=torch.int32)
        candidates = torch.tensor([[0, 4], [2, 2], [1, 3]], dtype=torch.int32)
    for tokens in (text, images):
        tokens.requires_grad_(True)
    oracle = aladin_fast.rerank_scores(text, images, candidates.clone(), text_lengths.clone(), image_lengths.clone(),
                                       backend="reference")
    expected = torch.autograd.grad(oracle.sum(), (text, images))
    kernel_text = text.detach().float().requires_grad_(True)
    kernel_images = images.detach().float().requires_grad_(True)
    for inputs in ((text, images), (kernel_text, kernel_images)):
        scores = aladin_fast.rerank_scores(*inputs, candidates, text_lengths, image_lengths, backend=backend)
        grads = torch.autograd.grad(scores.sum(), inputs)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_vmap_over_lengths_or_candidates_refused_clearly(generator):
    text, images = torch.randn(3, 4, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    lengths = torch.tensor([[4, 1, 0], [2, 3, 4]])
    candidates = torch.tensor([[[0], [1], [1]], [[1], [0], [0]]])
    for backend in ("cpu", "reference"):
        with pytest.raises(NotImplementedError, match="torch.func.vmap"):
            torch.func.vmap(lambda n: aladin_fast.alignment_scores(text, images, n, backend=backend))(lengths)
        with pytest.raises(NotImplementedError, match="torch.func.vmap"):
            torch.func.vmap(lambda c: aladin_fast.rerank_scores(text, images, c, backend=backend))(candidates)
