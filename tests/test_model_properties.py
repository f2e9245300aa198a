"""Property-based tests of the models (Teacher, Student, their encoders) and :class:`aladin_fast.nn.AlignmentScore`.

What a user relies on, checked on random small models and batches:

* padding invariance: valid outputs (tokens, embeddings, scores) do not depend on the content of padded
  positions (random, huge, +-inf, NaN) nor on how much padding there is; padded token rows are exactly zero;
* batch invariance: an item's outputs do not depend on the other items of its batch, its position or the
  batch size (eval mode, grad on or off: the transformer's fast path runs under no_grad);
* lengths edge cases (0, 1, full, an empty batch, a zero-width batch) give finite outputs;
* Teacher.forward / score / full_scores agree with the float64 reference and with each other (any blocks);
  Student embeddings are unit vectors and their scores cosines; Student.full_scores equals the forward;
* a checkpoint round trip (save_checkpoint / load_models) gives bitwise-identical outputs;
* bad inputs raise errors that name the argument;
* AlignmentScore equals the functional ops (every aggregation / padding / mode) and its gradients too.

Default run: a derandomized sample; ``pytest -m slow`` runs more examples. The deterministic regression tests
at the end replay the bugs these properties found.
"""
from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aladin_fast
from aladin_fast import reference
from aladin_fast.models import Student, Teacher
from aladin_fast.nn import AlignmentScore
from aladin_fast.training.checkpoint import load_models, model_state, save_checkpoint
from cases import AGGREGATIONS, PADDINGS

VOCAB, FEATURES, PAD_ID = 30, 12, 0
ATOL = 2e-5  # float32: attention / matmul blocking may differ with the batch size or the padded width
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEFAULT = settings(max_examples=60, derandomize=True, **_COMMON)
FEW = settings(max_examples=20, derandomize=True, **_COMMON)
THOROUGH = settings(max_examples=1000, **_COMMON)

GARBAGE = ("random", "huge", "-huge", "inf", "-inf", "nan")
# (layers, heads, embed_dim): an odd width too (sinusoidal positions with dim // 2 cosine columns)
TEACHER_SHAPES = st.sampled_from([(0, 1, 8), (0, 2, 16), (1, 1, 5), (1, 2, 8), (1, 4, 16), (2, 1, 5), (2, 2, 8),
                                  (2, 4, 16)])
STUDENT_HEADS = st.sampled_from([
    ("first", False, None), ("mean", False, None), ("max", False, None),
    ("mean", True, None), ("max", True, None), ("max", True, 6),
])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- models and data
@functools.lru_cache(maxsize=None)
def teacher_model(layers, heads, dim, aggregation="MrSw", padding="neg_inf"):
    """A small eval-mode teacher (cached: tests must not change its mode or weights)."""
    torch.manual_seed(1000 + 100 * layers + 10 * heads + dim)
    teacher = Teacher(VOCAB, FEATURES, dim, layers=layers, heads=heads, dropout=0.0, aggregation=aggregation,
                      padding=padding, pad_id=PAD_ID)
    _perturb(teacher)
    return teacher.eval()


@functools.lru_cache(maxsize=None)
def student_model(head, layers, backbone="shared", token_dim=8, heads=2):
    pooling, project, hidden = head
    torch.manual_seed(2000 + 10 * layers + token_dim)
    extra = dict(vocab_size=VOCAB, feature_dim=FEATURES, backbone_layers=1) if backbone == "separate" else {}
    student = Student(embed_dim=6, token_dim=token_dim, layers=layers, heads=heads, dropout=0.0, backbone=backbone,
                      pooling=pooling, project_tokens=project, projection_hidden=hidden, **extra)
    _perturb(student)
    return student.eval()


def _perturb(model):
    """Move every parameter off its initial value (LayerNorm 1 / 0, zero biases) so no structure hides a bug."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embedding" not in name:  # keep the pad row of the word embedding at zero
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _valid(lengths, width):
    return torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]


def _regions(seed, lengths, width):
    generator = torch.Generator().manual_seed(seed)
    regions = torch.randn(len(lengths), width, FEATURES, generator=generator)
    return regions.masked_fill(~_valid(lengths, width)[..., None], 0.0), torch.tensor(lengths, dtype=torch.int64)


def _captions(seed, lengths, width):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    return ids.masked_fill(~_valid(lengths, width), PAD_ID), torch.tensor(lengths, dtype=torch.int64)


def _tokens(seed, lengths, width, dim):
    generator = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(len(lengths), width, dim, generator=generator), dim=-1)
    return tokens.masked_fill(~_valid(lengths, width)[..., None], 0.0), torch.tensor(lengths, dtype=torch.int64)


def _widen_with_garbage(features, lengths, extra, kind, seed):
    """``features [B, L, ...]`` padded by ``extra`` positions, every padded position filled with ``kind``."""
    features = torch.cat([features, features.new_zeros(features.shape[0], extra, *features.shape[2:])], dim=1)
    pad = ~_valid(lengths, features.shape[1])
    if features.dtype.is_floating_point:
        generator = torch.Generator().manual_seed(seed)
        values = {"random": 1e3 * torch.randn(features.shape, generator=generator), "huge": torch.full_like(features, 3e38),
                  "-huge": torch.full_like(features, -1e30), "inf": torch.full_like(features, float("inf")),
                  "-inf": torch.full_like(features, float("-inf")), "nan": torch.full_like(features, float("nan"))}[kind]
        return torch.where(pad.reshape(*pad.shape, *[1] * (features.ndim - 2)), values, features)
    ids = torch.randint(0, VOCAB, features.shape, generator=torch.Generator().manual_seed(seed))  # any id, pad or not
    return torch.where(pad, ids, features)


@st.composite
def batches(draw, min_count=1, max_count=4, max_width=6):
    """``(seed, lengths, width)``: lengths in [0, width] (0, 1 and full widths are frequent)."""
    width = draw(st.integers(0, max_width))
    count = draw(st.integers(min_count, max_count))
    lengths = draw(st.lists(st.one_of(st.integers(0, width), st.sampled_from([0, min(1, width), width])),
                            min_size=count, max_size=count))
    return draw(st.integers(0, 2**31 - 1)), lengths, width


def _no_grad(flag):
    return torch.no_grad() if flag else torch.enable_grad()


def _assert_tokens(tokens, lengths):
    """Unit rows at valid positions, exact zero rows in the padding, all finite."""
    assert torch.isfinite(tokens).all(), "non-finite token"
    valid = _valid(lengths, tokens.shape[1])
    assert not tokens[~valid].any(), "padded rows must be zero"
    if valid.any():
        torch.testing.assert_close(tokens[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-5, rtol=0)


def _assert_unit(embeddings, lengths, project_tokens):
    """Unit rows; with ``project_tokens`` an empty row pools its (no) projections to zeros, which stay zero."""
    norms = embeddings.norm(dim=-1)
    expected = torch.where((lengths == 0) & project_tokens, torch.zeros_like(norms), torch.ones_like(norms))
    torch.testing.assert_close(norms, expected, atol=1e-5, rtol=0)


def _encode(teacher, modality, features, lengths):
    encode = teacher.encode_images if modality == "images" else teacher.encode_captions
    return encode(features, lengths)


def _make(modality, seed, lengths, width):
    return (_regions if modality == "images" else _captions)(seed, lengths, width)


# ---------------------------------------------------------------------------------------------------- teacher tokens
def _check_teacher_padding(shape, modality, batch, extra, garbage, no_grad):
    teacher = teacher_model(*shape)
    seed, lengths, width = batch
    features, lengths_t = _make(modality, seed, lengths, width)
    with _no_grad(no_grad):
        base, _ = _encode(teacher, modality, features, lengths_t)
        wide, wide_lengths = _encode(teacher, modality, _widen_with_garbage(features, lengths, extra, garbage, seed),
                                     lengths_t)
    _assert_tokens(base, lengths)
    _assert_tokens(wide, lengths)
    assert torch.equal(wide_lengths, lengths_t)
    torch.testing.assert_close(wide[:, :width], base, atol=ATOL, rtol=0)


@DEFAULT
@given(shape=TEACHER_SHAPES, modality=st.sampled_from(["images", "captions"]), batch=batches(),
       extra=st.integers(0, 3), garbage=st.sampled_from(GARBAGE), no_grad=st.booleans())
def test_teacher_tokens_ignore_padding_content_and_width(shape, modality, batch, extra, garbage, no_grad):
    _check_teacher_padding(shape, modality, batch, extra, garbage, no_grad)


@pytest.mark.slow
@THOROUGH
@given(shape=TEACHER_SHAPES, modality=st.sampled_from(["images", "captions"]), batch=batches(max_width=12),
       extra=st.integers(0, 6), garbage=st.sampled_from(GARBAGE), no_grad=st.booleans())
def test_teacher_tokens_ignore_padding_thorough(shape, modality, batch, extra, garbage, no_grad):
    _check_teacher_padding(shape, modality, batch, extra, garbage, no_grad)


def _check_teacher_batch(shape, modality, batch, order_seed, no_grad):
    teacher = teacher_model(*shape)
    seed, lengths, width = batch
    features, lengths_t = _make(modality, seed, lengths, width)
    with _no_grad(no_grad):
        full, _ = _encode(teacher, modality, features, lengths_t)
        for i, length in enumerate(lengths):  # alone, cut to its own length (no padding at all)
            alone, _ = _encode(teacher, modality, features[i:i + 1, :length], lengths_t[i:i + 1])
            torch.testing.assert_close(alone[0], full[i, :length], atol=ATOL, rtol=0)
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(order_seed))
        shuffled, shuffled_lengths = _encode(teacher, modality, features[order], lengths_t[order])
    torch.testing.assert_close(shuffled, full[order], atol=ATOL, rtol=0)
    assert torch.equal(shuffled_lengths, lengths_t[order])


@DEFAULT
@given(shape=TEACHER_SHAPES, modality=st.sampled_from(["images", "captions"]), batch=batches(min_count=2),
       order_seed=st.integers(0, 1000), no_grad=st.booleans())
def test_teacher_tokens_batch_invariant(shape, modality, batch, order_seed, no_grad):
    _check_teacher_batch(shape, modality, batch, order_seed, no_grad)


@pytest.mark.slow
@THOROUGH
@given(shape=TEACHER_SHAPES, modality=st.sampled_from(["images", "captions"]),
       batch=batches(min_count=2, max_count=9, max_width=12), order_seed=st.integers(0, 1000), no_grad=st.booleans())
def test_teacher_tokens_batch_invariant_thorough(shape, modality, batch, order_seed, no_grad):
    _check_teacher_batch(shape, modality, batch, order_seed, no_grad)


# ---------------------------------------------------------------------------------------------------- teacher scores
def _check_teacher_scores(shape, aggregation, padding, images, captions, blocks):
    teacher = teacher_model(*shape, aggregation=aggregation, padding=padding)
    regions, image_lengths = _regions(*images)
    ids, caption_lengths = _captions(*captions)
    out = teacher(regions, image_lengths, ids, caption_lengths)
    assert out.scores.shape == (len(captions[1]), len(images[1])) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    expected = reference.alignment_scores(out.caption_tokens.double(), out.image_tokens.double(), caption_lengths,
                                          image_lengths, aggregation=aggregation, padding=padding)
    torch.testing.assert_close(out.scores.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.score(out.caption_tokens, out.caption_lengths, out.image_tokens,
                                             out.image_lengths), out.scores, atol=0, rtol=0)
    full = teacher.full_scores(regions, image_lengths, ids, caption_lengths, image_block=blocks[0],
                               caption_block=blocks[1])
    assert full.shape == out.scores.T.shape and full.device.type == "cpu" and not teacher.training
    torch.testing.assert_close(full, out.scores.detach().T, atol=ATOL, rtol=1e-5)
    if padding == "neg_inf" and out.scores.numel():  # a pair scores the same alone and unpadded ("zero" counts padding)
        i, j = len(captions[1]) - 1, len(images[1]) - 1
        li, lj = int(caption_lengths[i]), int(image_lengths[j])
        alone = teacher(regions[j:j + 1, :lj], image_lengths[j:j + 1], ids[i:i + 1, :li], caption_lengths[i:i + 1])
        torch.testing.assert_close(alone.scores[0, 0], out.scores[i, j], atol=ATOL, rtol=1e-5)


@DEFAULT
@given(shape=TEACHER_SHAPES, aggregation=st.sampled_from(AGGREGATIONS), padding=st.sampled_from(PADDINGS),
       images=batches(min_count=0), captions=batches(min_count=0),
       blocks=st.tuples(st.integers(1, 5), st.integers(1, 5)))
def test_teacher_forward_score_and_full_scores_agree(shape, aggregation, padding, images, captions, blocks):
    _check_teacher_scores(shape, aggregation, padding, images, captions, blocks)


@pytest.mark.slow
@THOROUGH
@given(shape=TEACHER_SHAPES, aggregation=st.sampled_from(AGGREGATIONS), padding=st.sampled_from(PADDINGS),
       images=batches(min_count=0, max_count=8), captions=batches(min_count=0, max_count=8),
       blocks=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_teacher_scores_agree_thorough(shape, aggregation, padding, images, captions, blocks):
    _check_teacher_scores(shape, aggregation, padding, images, captions, blocks)


@FEW
@given(layers=st.sampled_from([0, 1, 2]), images=batches(min_count=1), captions=batches(min_count=1),
       garbage=st.sampled_from(GARBAGE))
def test_teacher_training_gradients_ignore_padding(layers, images, captions, garbage):
    """A training step on a batch with garbage padding gives the clean batch's (finite) gradients."""
    regions, image_lengths = _regions(*images)
    ids, caption_lengths = _captions(*captions)
    dirty = _widen_with_garbage(regions, images[1], 2, garbage, images[0])

    def gradients(features):
        torch.manual_seed(5)
        teacher = Teacher(VOCAB, FEATURES, 8, layers=layers, heads=2, dropout=0.0)
        teacher(features, image_lengths, ids, caption_lengths).scores.sum().backward()
        # (a zero-width batch skips the transformer: no gradient there, the same as a zero one)
        return {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in teacher.named_parameters()}

    clean, got = gradients(regions), gradients(dirty)
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, clean[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------- student
def _student_and_kwargs(head, layers, backbone):
    if backbone == "shared":
        return student_model(head, layers), {"teacher": teacher_model(1, 2, 8)}
    return student_model(head, layers, backbone="separate"), {}


def _check_student_heads(head, layers, modality, batch, extra, garbage, order_seed, no_grad):
    student = student_model(head, layers)
    embed = student.embed_image_tokens if modality == "images" else student.embed_caption_tokens
    seed, lengths, width = batch
    tokens, lengths_t = _tokens(seed, lengths, width, student.token_dim)
    with _no_grad(no_grad):
        base = embed(tokens, lengths_t)
        dirty = embed(_widen_with_garbage(tokens, lengths, extra, garbage, seed), lengths_t)
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(order_seed))
        shuffled = embed(tokens[order], lengths_t[order])
        alone = [embed(tokens[i:i + 1, :length], lengths_t[i:i + 1]) for i, length in enumerate(lengths)]
    assert base.shape == (len(lengths), student.embed_dim) and base.dtype == torch.float32
    assert torch.isfinite(base).all() and torch.isfinite(dirty).all()
    if len(lengths):
        _assert_unit(base, lengths_t, student.image_head.project_tokens)
        torch.testing.assert_close(torch.cat(alone), base, atol=ATOL, rtol=0)
    torch.testing.assert_close(dirty, base, atol=ATOL, rtol=0)
    torch.testing.assert_close(shuffled, base[order], atol=ATOL, rtol=0)


@DEFAULT
@given(head=STUDENT_HEADS, layers=st.sampled_from([0, 1, 2]), modality=st.sampled_from(["images", "captions"]),
       batch=batches(min_count=0), extra=st.integers(0, 3), garbage=st.sampled_from(GARBAGE),
       order_seed=st.integers(0, 1000), no_grad=st.booleans())
def test_student_heads_padding_and_batch_invariant(head, layers, modality, batch, extra, garbage, order_seed, no_grad):
    _check_student_heads(head, layers, modality, batch, extra, garbage, order_seed, no_grad)


@pytest.mark.slow
@THOROUGH
@given(head=STUDENT_HEADS, layers=st.sampled_from([0, 1, 2]), modality=st.sampled_from(["images", "captions"]),
       batch=batches(min_count=0, max_count=9, max_width=12), extra=st.integers(0, 6),
       garbage=st.sampled_from(GARBAGE), order_seed=st.integers(0, 1000), no_grad=st.booleans())
def test_student_heads_invariant_thorough(head, layers, modality, batch, extra, garbage, order_seed, no_grad):
    _check_student_heads(head, layers, modality, batch, extra, garbage, order_seed, no_grad)


def _check_student_end_to_end(head, layers, backbone, images, captions, block, extra, garbage):
    student, kwargs = _student_and_kwargs(head, layers, backbone)
    regions, image_lengths = _regions(*images)
    ids, caption_lengths = _captions(*captions)
    image_embeddings, caption_embeddings = student(regions, image_lengths, ids, caption_lengths, **kwargs)
    for embeddings, lengths in ((image_embeddings, image_lengths), (caption_embeddings, caption_lengths)):
        assert torch.isfinite(embeddings).all() and embeddings.dtype == torch.float32
        _assert_unit(embeddings, lengths, student.image_head.project_tokens)
    scores = Student.scores(caption_embeddings, image_embeddings)
    assert scores.shape == (len(captions[1]), len(images[1]))
    assert scores.numel() == 0 or scores.abs().max() <= 1 + 1e-5  # cosines
    full = student.full_scores(regions, image_lengths, ids, caption_lengths, block=block, **kwargs)
    assert full.shape == scores.T.shape and full.device.type == "cpu" and not student.training
    torch.testing.assert_close(full, scores.detach().T, atol=ATOL, rtol=0)
    # garbage in the padding of the inputs (regions: any values; captions: any ids) and wider padding
    dirty_images = student.encode_images(_widen_with_garbage(regions, images[1], extra, garbage, images[0]),
                                         image_lengths, **kwargs)
    dirty_captions = student.encode_captions(_widen_with_garbage(ids, captions[1], extra, garbage, captions[0]),
                                             caption_lengths, **kwargs)
    torch.testing.assert_close(dirty_images, image_embeddings, atol=ATOL, rtol=0)
    torch.testing.assert_close(dirty_captions, caption_embeddings, atol=ATOL, rtol=0)


@DEFAULT
@given(head=STUDENT_HEADS, layers=st.sampled_from([0, 1]), backbone=st.sampled_from(["shared", "separate"]),
       images=batches(min_count=0), captions=batches(min_count=0), block=st.integers(1, 5), extra=st.integers(0, 3),
       garbage=st.sampled_from(GARBAGE))
def test_student_embeddings_scores_and_full_scores(head, layers, backbone, images, captions, block, extra, garbage):
    _check_student_end_to_end(head, layers, backbone, images, captions, block, extra, garbage)


@pytest.mark.slow
@THOROUGH
@given(head=STUDENT_HEADS, layers=st.sampled_from([0, 1, 2]), backbone=st.sampled_from(["shared", "separate"]),
       images=batches(min_count=0, max_count=8, max_width=10), captions=batches(min_count=0, max_count=8, max_width=10),
       block=st.integers(1, 9), extra=st.integers(0, 5), garbage=st.sampled_from(GARBAGE))
def test_student_end_to_end_thorough(head, layers, backbone, images, captions, block, extra, garbage):
    _check_student_end_to_end(head, layers, backbone, images, captions, block, extra, garbage)


# ------------------------------------------------------------------------------------------------------- checkpoint
@settings(FEW, max_examples=12)
@given(shape=TEACHER_SHAPES, aggregation=st.sampled_from(AGGREGATIONS), padding=st.sampled_from(PADDINGS),
       head=STUDENT_HEADS, student_layers=st.sampled_from([0, 1]), images=batches(), captions=batches())
def test_checkpoint_round_trip_is_bitwise(shape, aggregation, padding, head, student_layers, images, captions):
    teacher = teacher_model(*shape, aggregation=aggregation, padding=padding)
    torch.manual_seed(3)
    pooling, project, hidden = head
    student = Student.for_teacher(teacher, embed_dim=6, layers=student_layers, heads=shape[1], dropout=0.0,
                                  pooling=pooling, project_tokens=project, projection_hidden=hidden)
    _perturb(student)
    student.eval()
    regions, image_lengths = _regions(*images)
    ids, caption_lengths = _captions(*captions)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        save_checkpoint(path, {"teacher": model_state(teacher), "student": model_state(student), "vocabulary": None})
        loaded_teacher, loaded_student, vocabulary = load_models(path)
    assert vocabulary is None and not loaded_teacher.training and not loaded_student.training
    assert loaded_teacher.hparams == teacher.hparams and loaded_student.hparams == student.hparams
    for (name, a), (other, b) in zip(teacher.state_dict().items(), loaded_teacher.state_dict().items()):
        assert name == other and torch.equal(a, b), name
    batch = (regions, image_lengths, ids, caption_lengths)
    with torch.no_grad():
        for got, want in zip(loaded_teacher(*batch), teacher(*batch)):
            assert torch.equal(got, want)
        for got, want in zip(loaded_student(*batch, teacher=loaded_teacher), student(*batch, teacher=teacher)):
            assert torch.equal(got, want)
    assert torch.equal(loaded_teacher.full_scores(regions, image_lengths, ids, caption_lengths),
                       teacher.full_scores(regions, image_lengths, ids, caption_lengths))


# ------------------------------------------------------------------------------------------------- input validation
def _validation_cases():
    teacher = teacher_model(1, 2, 8)
    student = student_model(("first", False, None), 1)
    separate = student_model(("mean", False, None), 1, backbone="separate")
    regions, image_lengths = _regions(0, [3, 1], 3)
    ids, caption_lengths = _captions(0, [2, 1], 2)
    tokens, token_lengths = _tokens(0, [3, 1], 3, 8)
    return [
        (lambda: teacher.encode_images(regions.numpy(), image_lengths), TypeError, "regions must be a torch.Tensor"),
        (lambda: teacher.encode_images(regions[0], image_lengths), ValueError, r"regions must have shape \[B, R, 12\]"),
        (lambda: teacher.encode_images(regions.long(), image_lengths), TypeError, "regions must be floating"),
        (lambda: teacher.encode_images(regions, image_lengths.float()), TypeError, "image_lengths must be an integer"),
        (lambda: teacher.encode_images(regions, image_lengths.bool()), TypeError, "image_lengths must be an integer"),
        (lambda: teacher.encode_images(regions, image_lengths[None]), ValueError, "image_lengths must have shape"),
        (lambda: teacher.encode_images(regions, torch.tensor([3, -1])), ValueError, "image_lengths must be in"),
        (lambda: teacher.encode_captions(ids.tolist(), caption_lengths), TypeError, "captions must be a torch.Tensor"),
        (lambda: teacher.encode_captions(ids[None], caption_lengths), ValueError, r"captions must have shape \[B, L\]"),
        (lambda: teacher.encode_captions(ids.bool(), caption_lengths), TypeError, "captions must hold integer"),
        (lambda: teacher.encode_captions(ids - 1, caption_lengths), ValueError, "captions ids must be in"),
        (lambda: teacher.encode_captions(ids, torch.tensor([3, 1])), ValueError, "caption_lengths must be in"),
        (lambda: teacher.encode_captions(ids, torch.tensor([2])), ValueError, "caption_lengths must have shape"),
        (lambda: teacher.score(tokens, token_lengths, tokens[..., :4], None), ValueError, "image_tokens must have shape"),
        (lambda: teacher.score(tokens.long(), token_lengths, tokens, None), TypeError, "caption_tokens must be floating"),
        (lambda: teacher.score(tokens, token_lengths.double(), tokens, None), TypeError,
         "caption_tokens_lengths must be an integer"),
        (lambda: teacher.full_scores(regions, image_lengths, ids, caption_lengths, image_block=0), ValueError,
         "image_block must be a positive int"),
        (lambda: teacher.full_scores(regions, image_lengths, ids, caption_lengths, caption_block=1.5), ValueError,
         "caption_block must be a positive int"),
        (lambda: teacher.full_scores(regions, image_lengths[:1], ids, caption_lengths), ValueError,
         "image_lengths must have shape"),
        (lambda: student.embed_image_tokens(tokens[..., :4], token_lengths), ValueError, "image_tokens must have shape"),
        (lambda: student.embed_caption_tokens(tokens, token_lengths + 1), ValueError, "caption_tokens_lengths must be in"),
        (lambda: student.encode_images(regions, image_lengths), ValueError, "teacher is required"),
        (lambda: student.encode_images(regions, image_lengths, teacher=teacher_model(1, 2, 16)), ValueError,
         "teacher must be a Teacher with embed_dim == token_dim=8"),
        (lambda: separate.encode_images(regions[..., :5], image_lengths), ValueError, "regions must have shape"),
        (lambda: separate.encode_captions(ids + VOCAB, caption_lengths), ValueError, "captions ids must be in"),
        (lambda: Student.scores(torch.zeros(2, 6), torch.zeros(3, 5)), ValueError, "must share D"),
        (lambda: Student.scores(torch.zeros(6), torch.zeros(3, 6)), ValueError, "caption_embeddings"),
        (lambda: separate.full_scores(regions, image_lengths, ids, caption_lengths, block=0), ValueError,
         "block must be a positive int"),
    ]


@pytest.mark.parametrize("case", range(28))
def test_bad_inputs_raise_errors_naming_the_argument(case):
    call, error, message = _validation_cases()[case]
    with pytest.raises(error, match=message):
        call()


def test_validation_case_count():
    assert len(_validation_cases()) == 28


# --------------------------------------------------------------------------------------------- nn.AlignmentScore
@st.composite
def alignment_problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    nt, ni = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    words, regions, dim = draw(st.integers(0, 6)), draw(st.integers(0, 6)), draw(st.sampled_from([1, 3, 8]))
    text = torch.randn(nt, words, dim, generator=generator)
    images = torch.randn(ni, regions, dim, generator=generator)
    text_lengths = torch.tensor(draw(st.lists(st.integers(0, words), min_size=nt, max_size=nt)), dtype=torch.int64)
    image_lengths = torch.tensor(draw(st.lists(st.integers(0, regions), min_size=ni, max_size=ni)), dtype=torch.int64)
    mode = draw(st.sampled_from(["all_pairs", "rerank", "paired"]))
    candidates = None
    if mode == "rerank":
        candidates = torch.randint(0, max(ni, 1), (nt, draw(st.integers(0, 4)) if ni else 0), generator=generator)
    if mode == "paired":
        count = min(nt, ni)
        text, text_lengths, images, image_lengths = text[:count], text_lengths[:count], images[:count], \
            image_lengths[:count]
    use_lengths = draw(st.booleans())
    return dict(text=text, images=images, text_lengths=text_lengths if use_lengths else None,
                image_lengths=image_lengths if use_lengths else None, mode=mode, candidates=candidates,
                aggregation=draw(st.sampled_from(AGGREGATIONS)), padding=draw(st.sampled_from(PADDINGS)),
                normalize=draw(st.booleans()), backend=draw(st.sampled_from(["auto", "cpu", "reference"])))


def _module_and_functional(problem):
    options = {k: problem[k] for k in ("aggregation", "padding", "normalize", "backend")}
    module = AlignmentScore(**options)
    assert all(f"{k}={v!r}" in repr(module) for k, v in options.items())

    def run(use_module):
        text = problem["text"].clone().requires_grad_()
        images = problem["images"].clone().requires_grad_()
        lengths = (problem["text_lengths"], problem["image_lengths"])
        if use_module:
            scores = module(text, images, *lengths, candidates=problem["candidates"], paired=problem["mode"] == "paired")
        elif problem["mode"] == "paired":
            scores = aladin_fast.paired_scores(text, images, *lengths, **options)
        elif problem["mode"] == "rerank":
            scores = aladin_fast.rerank_scores(text, images, problem["candidates"], *lengths, **options)
        else:
            scores = aladin_fast.alignment_scores(text, images, *lengths, **options)
        weights = torch.linspace(-1, 1, scores.numel()).reshape(scores.shape)
        (scores * weights).sum().backward()
        return scores.detach(), text.grad, images.grad

    return run(True), run(False)


@DEFAULT
@given(problem=alignment_problems())
def test_alignment_score_module_equals_functional(problem):
    (scores, text_grad, image_grad), (want, want_text_grad, want_image_grad) = _module_and_functional(problem)
    assert scores.dtype == torch.float32 and torch.equal(scores, want)
    for got, expected in ((text_grad, want_text_grad), (image_grad, want_image_grad)):
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.isfinite(got).all() and torch.equal(got, expected)


def test_alignment_score_gradients_flow_and_modes_are_exclusive():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(3, 4, 8, generator=generator, requires_grad=True)
    images = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    module = AlignmentScore(aggregation="symm", normalize=True)
    module(text, images, torch.tensor([4, 2, 1]), torch.tensor([5, 3])).sum().backward()
    assert text.grad.abs().sum() > 0 and images.grad.abs().sum() > 0
    assert text.grad[1, 2:].abs().max() == 0 and images.grad[1, 3:].abs().max() == 0  # padding gets nothing
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []
    with pytest.raises(ValueError, match="either candidates or paired"):
        module(text, images, candidates=torch.zeros(3, 1, dtype=torch.int64), paired=True)
    # options are checked where the module is built, not at its first forward
    with pytest.raises(ValueError, match="aggregation must be one of"):
        AlignmentScore(aggregation="max")
    with pytest.raises(ValueError, match="padding must be one of"):
        AlignmentScore(padding="ninf")
    with pytest.raises(ValueError, match="backend must be one of"):
        AlignmentScore(backend="cuda")
    with pytest.raises(TypeError, match="normalize must be True or False"):
        AlignmentScore(normalize="false")
    with pytest.raises(TypeError, match="paired must be True or False"):
        module(text, images, paired="no")


# ----------------------------------------------------------------------------------------------- dtypes and defaults
@DEFAULT
@given(shape=TEACHER_SHAPES, head=STUDENT_HEADS, batch=batches(min_count=0),
       dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
def test_any_floating_dtype_is_accepted_and_only_its_values_matter(shape, head, batch, dtype):
    """Region features / tokens are "floating": any float dtype gives the float32 result of the same values."""
    teacher, student = teacher_model(*shape), student_model(head, 1)
    seed, lengths, width = batch
    regions, lengths_t = _regions(seed, lengths, width)
    regions = regions.to(dtype)
    got, _ = teacher.encode_images(regions, lengths_t)
    want, _ = teacher.encode_images(regions.float(), lengths_t)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    tokens, _ = _tokens(seed, lengths, width, student.token_dim)
    tokens = tokens.to(dtype)
    for embed in (student.embed_image_tokens, student.embed_caption_tokens):
        got, want = embed(tokens, lengths_t), embed(tokens.float(), lengths_t)
        assert got.dtype == torch.float32 and torch.equal(got, want)


@FEW
@given(shape=TEACHER_SHAPES, images=batches(min_count=0), captions=batches(min_count=0))
def test_lengths_none_means_every_position_is_valid(shape, images, captions):
    teacher = teacher_model(*shape)
    student = student_model(("mean", False, None), 1, token_dim=shape[2], heads=shape[1])
    regions, _ = _regions(images[0], [images[2]] * len(images[1]), images[2])
    ids, _ = _captions(captions[0], [captions[2]] * len(captions[1]), captions[2])
    image_lengths = torch.full((regions.shape[0],), regions.shape[1])
    caption_lengths = torch.full((ids.shape[0],), ids.shape[1])
    for a, b in zip(teacher(regions, None, ids, None), teacher(regions, image_lengths, ids, caption_lengths)):
        assert torch.equal(a, b)
    assert torch.equal(teacher.full_scores(regions, None, ids, None),
                       teacher.full_scores(regions, image_lengths, ids, caption_lengths))
    assert torch.equal(student.full_scores(regions, None, ids, None, teacher=teacher),
                       student.full_scores(regions, image_lengths, ids, caption_lengths, teacher=teacher))


# ------------------------------------------------------------------------------- regression tests (bugs found here)
def _nonfinite_padding_regions():
    regions, lengths = _regions(11, [4, 2, 0], 4)
    dirty = regions.clone()
    dirty[1, 2:] = float("nan")  # a NaN region in the padding of image 1
    dirty[2, 0] = 3e38  # a huge one (Linear -> inf -> LayerNorm NaN) in the padding of the empty image 2
    return regions, dirty, lengths


@pytest.mark.parametrize("layers", [0, 1])
def test_regression_nonfinite_region_padding_does_not_poison_tokens_or_gradients(layers):
    """Was: padded regions went through Linear + LayerNorm and the attention (0 weight * NaN value = NaN), so a
    NaN / huge value in the padding made the image's valid tokens NaN (layers >= 1), its padded rows NaN (any
    layers; the docs promise zero rows) and every weight gradient NaN."""
    regions, dirty, lengths = _nonfinite_padding_regions()
    teacher = teacher_model(layers, 2, 8)
    clean, _ = teacher.encode_images(regions, lengths)
    tokens, _ = teacher.encode_images(dirty, lengths)
    assert torch.isfinite(tokens).all() and not tokens[1, 2:].any() and not tokens[2].any()
    torch.testing.assert_close(tokens, clean, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    fresh = Teacher(VOCAB, FEATURES, 8, layers=layers, heads=2, dropout=0.0)
    ids, caption_lengths = _captions(0, [3, 1], 3)
    fresh(dirty, lengths, ids, caption_lengths).scores.sum().backward()
    for name, parameter in fresh.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("head", [("first", False, None), ("mean", False, None), ("max", True, None)])
@pytest.mark.parametrize("layers", [0, 1])
def test_regression_nonfinite_token_padding_does_not_poison_student_heads(head, layers):
    """Was: PoolingHead layer-normed the padded tokens too and the attention mixed them in with weight 0, so
    NaN / inf padding in ``embed_*_tokens`` gave NaN embeddings (first / mean) and NaN gradients (all)."""
    student = student_model(head, layers)
    tokens, lengths = _tokens(3, [3, 1, 0], 3, 8)
    dirty = tokens.clone()
    dirty[1, 1] = float("nan")
    dirty[1, 2] = float("inf")
    dirty[2, 0] = float("-inf")
    dirty.requires_grad_()
    got = student.embed_image_tokens(dirty, lengths)
    torch.testing.assert_close(got, student.embed_image_tokens(tokens, lengths), atol=1e-6, rtol=0)
    got.sum().backward()
    assert torch.isfinite(dirty.grad).all() and not dirty.grad[~_valid([3, 1, 0], 3)].any()


@pytest.mark.parametrize("layers", [1, 2])
def test_regression_empty_batch(layers):
    """Was: a batch of zero images / captions crashed in nn.MultiheadAttention (cannot reshape a tensor of 0
    elements) whenever an encoder or head had layers; the lengths checks and the op accept empty batches."""
    teacher = teacher_model(layers, 2, 8)
    out = teacher(torch.zeros(0, 5, FEATURES), torch.zeros(0, dtype=torch.int64),
                  torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert out.scores.shape == (0, 0) and out.image_tokens.shape == (0, 5, 8) and out.caption_tokens.shape == (0, 4, 8)
    student = student_model(("first", False, None), layers)
    assert student.embed_image_tokens(torch.zeros(0, 3, 8), torch.zeros(0, dtype=torch.int64)).shape == (0, 6)
    assert student.encode_captions(torch.zeros(0, 2, dtype=torch.int64), None, teacher=teacher).shape == (0, 6)


@pytest.mark.parametrize("project_tokens", [False, True])
def test_regression_zero_width_batch_max_pooling(project_tokens):
    """Was: max pooling of a batch whose longest item is empty (width 0: e.g. a cached-token batch cut to its
    longest caption) raised "amax(): Expected reduction dim 1 to have non-zero size" instead of pooling each
    empty row to zeros, as the docs promise (and as mean pooling and width >= 1 do)."""
    student = student_model(("max", project_tokens, None), 1)
    got = student.embed_caption_tokens(torch.zeros(2, 0, 8), torch.zeros(2, dtype=torch.int64))
    want = student.embed_caption_tokens(torch.zeros(2, 3, 8), torch.zeros(2, dtype=torch.int64))
    assert torch.isfinite(got).all() and torch.equal(got, want)
    teacher = teacher_model(1, 2, 8)
    embeddings = student.encode_captions(torch.zeros(2, 0, dtype=torch.int64), None, teacher=teacher)
    assert torch.equal(embeddings, want)


def test_regression_float64_and_bfloat16_inputs():
    """Was: "floating" region features / tokens other than float32 passed the checks, then failed deep inside
    (``mat1 and mat2 must have the same dtype``, ``mixed dtype (CPU)``): float64 features (numpy's default) or
    bf16 teacher tokens cached under autocast and read outside it."""
    teacher, student = teacher_model(1, 2, 8), student_model(("first", False, None), 1)
    regions, lengths = _regions(5, [3, 1], 3)
    torch.testing.assert_close(teacher.encode_images(regions.double(), lengths)[0],
                               teacher.encode_images(regions, lengths)[0], atol=0, rtol=0)
    tokens, lengths = _tokens(5, [3, 1], 3, 8)
    assert torch.equal(student.embed_image_tokens(tokens.bfloat16(), lengths),
                       student.embed_image_tokens(tokens.bfloat16().float(), lengths))
    assert torch.equal(student.embed_caption_tokens(tokens.double(), lengths),
                       student.embed_caption_tokens(tokens, lengths))


@pytest.mark.parametrize("backbone", ["shared", "separate"])
def test_regression_student_full_scores_checks_whole_inputs(backbone):
    """Was: Student.full_scores sliced the lengths per block without checking them, so lengths as a list (which
    Teacher.full_scores and every encode method take) failed with "'list' object has no attribute 'to'", and
    too few lengths were reported with the shape of the last block ("must have shape [1], got [0]")."""
    student, kwargs = _student_and_kwargs(("first", False, None), 1, backbone)
    regions, image_lengths = _regions(4, [3, 1, 2], 3)
    ids, caption_lengths = _captions(4, [2, 1], 2)
    want = student.full_scores(regions, image_lengths, ids, caption_lengths, block=2, **kwargs)
    got = student.full_scores(regions, image_lengths.tolist(), ids, caption_lengths.tolist(), block=2, **kwargs)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"image_lengths must have shape \[3\], got \[2\]"):
        student.full_scores(regions, image_lengths[:2], ids, caption_lengths, block=2, **kwargs)
    with pytest.raises(ValueError, match="caption_lengths must be in"):
        student.full_scores(regions, image_lengths, ids, caption_lengths + 1, block=2, **kwargs)
    with pytest.raises(TypeError, match="regions must be a torch.Tensor"):
        student.full_scores(regions.tolist(), image_lengths, ids, caption_lengths, **kwargs)


def test_student_scores_names_a_non_tensor_argument():
    from aladin_fast.models.student import Student

    with pytest.raises(TypeError, match="image_embeddings must be a torch.Tensor"):
        Student.scores(torch.zeros(2, 4), [[0.0] * 4])
