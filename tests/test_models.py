"""Teacher and student: shapes, normalisation, padding invariance, the fused op as the score, errors."""
from __future__ import annotations

import pytest
import torch

import aladin_fast
from aladin_fast.models import Student, Teacher

VOCAB, FEATURES, DIM = 40, 24, 16


def make_batch(seed=0, images=3, regions=7, captions=4, words=6):
    generator = torch.Generator().manual_seed(seed)
    region_features = torch.randn(images, regions, FEATURES, generator=generator)
    image_lengths = torch.tensor([regions, 3, 1][:images])
    ids = torch.randint(4, VOCAB, (captions, words), generator=generator)
    caption_lengths = torch.tensor([words, 2, 1, 4][:captions])
    ids[torch.arange(words)[None, :] >= caption_lengths[:, None]] = 0
    return region_features, image_lengths, ids, caption_lengths


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return Teacher(VOCAB, FEATURES, DIM, layers=1, heads=2, dropout=0.0).eval()


def test_teacher_tokens_and_scores(teacher):
    regions, image_lengths, ids, caption_lengths = make_batch()
    out = teacher(regions, image_lengths, ids, caption_lengths)
    assert out.scores.shape == (4, 3) and out.scores.dtype == torch.float32
    assert out.image_tokens.shape == (3, 7, DIM) and out.caption_tokens.shape == (4, 6, DIM)
    valid = torch.arange(7)[None, :] < image_lengths[:, None]
    torch.testing.assert_close(out.image_tokens.norm(dim=-1)[valid], torch.ones(int(valid.sum())))
    assert out.image_tokens[~valid].abs().max() == 0  # zero padding
    # the score is the fused op's MrSw on the tokens (and agrees with the plain-PyTorch reference)
    expected = aladin_fast.reference.alignment_scores(
        out.caption_tokens.double(), out.image_tokens.double(), caption_lengths, image_lengths, aggregation="MrSw")
    torch.testing.assert_close(out.scores.double(), expected, atol=1e-5, rtol=1e-5)
    # hand check of one entry: sum over valid words of the max over valid regions
    similarity = out.caption_tokens[1, :2] @ out.image_tokens[1, :3].T
    assert out.scores[1, 1].item() == pytest.approx(similarity.max(dim=1).values.sum().item(), abs=1e-5)


def test_teacher_padding_invariance(teacher):
    regions, image_lengths, ids, caption_lengths = make_batch()
    base = teacher(regions, image_lengths, ids, caption_lengths).scores
    garbage_regions = regions.clone()
    garbage_regions[torch.arange(7)[None, :] >= image_lengths[:, None]] = 1e3  # padding content never matters
    wider_ids = torch.cat([ids, torch.full((4, 3), 5)], dim=1)  # extra (non-pad id) padding columns
    other = teacher(garbage_regions, image_lengths, wider_ids, caption_lengths).scores
    torch.testing.assert_close(base, other, atol=1e-5, rtol=1e-5)
    # a row scores the same alone as in a batch
    alone = teacher(regions[1:2], image_lengths[1:2], ids[2:3], caption_lengths[2:3]).scores
    torch.testing.assert_close(alone[0, 0], base[2, 1], atol=1e-5, rtol=1e-5)


def test_teacher_gradients_reach_every_parameter():
    torch.manual_seed(1)
    teacher = Teacher(VOCAB, FEATURES, DIM, layers=1, heads=2)
    regions, image_lengths, ids, caption_lengths = make_batch()
    teacher(regions, image_lengths, ids, caption_lengths).scores.sum().backward()
    for name, parameter in teacher.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert teacher.caption_encoder.embedding.weight.grad[0].abs().max() == 0  # the pad row never learns


def test_teacher_full_scores_blocks_and_options(teacher):
    regions, image_lengths, ids, caption_lengths = make_batch(images=3, captions=4)
    full = teacher.full_scores(regions, image_lengths, ids, caption_lengths, image_block=2, caption_block=3)
    assert full.shape == (3, 4) and full.device.type == "cpu"
    torch.testing.assert_close(full, teacher(regions, image_lengths, ids, caption_lengths).scores.T, atol=1e-5, rtol=1e-5)
    symm = Teacher(VOCAB, FEATURES, DIM, layers=0, heads=2, aggregation="symm", padding="zero", backend="reference")
    assert symm(regions, image_lengths, ids, caption_lengths).scores.shape == (4, 3)
    rebuilt = Teacher(**teacher.hparams)
    rebuilt.load_state_dict(teacher.state_dict())
    torch.testing.assert_close(rebuilt.eval().full_scores(regions, image_lengths, ids, caption_lengths), full)


def test_teacher_empty_rows_are_finite(teacher):
    regions, _, ids, _ = make_batch()
    out = teacher(regions, torch.tensor([0, 3, 1]), ids, torch.tensor([0, 2, 1, 4]))
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.image_tokens).all()
    assert out.scores[0].abs().max() == 0 and out.scores[:, 0].abs().max() == 0


def test_teacher_errors_name_the_argument(teacher):
    regions, image_lengths, ids, caption_lengths = make_batch()
    with pytest.raises(ValueError, match=r"regions must have shape \[B, R, 24\]"):
        teacher.encode_images(regions[..., :5], image_lengths)
    with pytest.raises(ValueError, match="image_lengths must be in"):
        teacher.encode_images(regions, torch.tensor([8, 1, 1]))
    with pytest.raises(ValueError, match="image_lengths must have shape"):
        teacher.encode_images(regions, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="captions ids must be in"):
        teacher.encode_captions(ids + VOCAB, caption_lengths)
    with pytest.raises(TypeError, match="captions must hold integer"):
        teacher.encode_captions(ids.float(), caption_lengths)
    with pytest.raises(ValueError, match="caption_tokens must have shape"):
        teacher.score(torch.zeros(2, 3, DIM + 1), None, torch.zeros(2, 3, DIM), None)
    with pytest.raises(ValueError, match="aggregation"):
        Teacher(VOCAB, aggregation="max")
    with pytest.raises(ValueError, match="heads"):
        Teacher(VOCAB, FEATURES, DIM, heads=3)


@pytest.mark.parametrize("backbone, pooling", [("shared", "first"), ("separate", "first"), ("separate", "mean"),
                                               ("shared", "max"), ("separate", "max")])
def test_student_embeddings(teacher, backbone, pooling):
    torch.manual_seed(2)
    if backbone == "shared":
        student = Student.for_teacher(teacher, embed_dim=12, heads=2, dropout=0.0, pooling=pooling).eval()
        kwargs = {"teacher": teacher}
    else:
        student = Student(12, DIM, heads=2, dropout=0.0, backbone="separate", vocab_size=VOCAB,
                          feature_dim=FEATURES, pooling=pooling).eval()
        kwargs = {}
    regions, image_lengths, ids, caption_lengths = make_batch()
    images, captions = student(regions, image_lengths, ids, caption_lengths, **kwargs)
    assert images.shape == (3, 12) and captions.shape == (4, 12)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(3))
    scores = Student.scores(captions, images)
    assert scores.shape == (4, 3) and scores.abs().max() <= 1 + 1e-5
    full = student.full_scores(regions, image_lengths, ids, caption_lengths, block=2, **kwargs)
    torch.testing.assert_close(full, scores.T, atol=1e-5, rtol=1e-5)
    # padding invariance: a caption alone embeds like in the batch
    alone = student.encode_captions(ids[1:2, :2], caption_lengths[1:2], **kwargs)
    torch.testing.assert_close(alone[0], captions[1], atol=1e-5, rtol=1e-5)
    # empty rows still embed to finite vectors (the learned first token; zeros pooled by mean / max)
    empty = student.encode_images(regions[:1], torch.tensor([0]), **kwargs)
    assert torch.isfinite(empty).all()
    if pooling != "first":  # the pooled embedding ignores padded regions
        tokens, lengths = student.image_tokens(regions, image_lengths, **kwargs)
        valid = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
        hidden = student.image_head.transformer(student.image_head.input_norm(tokens), lengths)
        pooled = hidden.sum(1) / lengths[:, None] if pooling == "mean" else hidden.masked_fill(~valid, -1e9).amax(1)
        expected = torch.nn.functional.normalize(student.image_head.output(pooled), dim=-1)
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    (images.sum() + captions.sum()).backward()
    assert all(p.grad is not None for n, p in student.named_parameters())
    rebuilt = Student(**student.hparams)
    rebuilt.load_state_dict(student.state_dict())


@pytest.mark.parametrize("pooling, hidden", [("max", None), ("max", 10), ("mean", None)])
def test_student_heads_project_tokens_before_pooling(teacher, pooling, hidden):
    torch.manual_seed(3)
    student = Student.for_teacher(teacher, embed_dim=20, heads=2, dropout=0.0, pooling=pooling, project_tokens=True,
                                  projection_hidden=hidden).eval()
    regions, image_lengths, ids, caption_lengths = make_batch()
    images, captions = student(regions, image_lengths, ids, caption_lengths, teacher=teacher)
    assert images.shape == (3, 20) and captions.shape == (4, 20)
    torch.testing.assert_close(captions.norm(dim=1), torch.ones(4))
    # the projection of every valid token, then the pool (padding never projected nor pooled)
    tokens, lengths = student.image_tokens(regions, image_lengths, teacher=teacher)
    valid = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
    projected = student.image_head.output(student.image_head.transformer(student.image_head.input_norm(tokens), lengths))
    pooled = (projected * valid).sum(1) / lengths[:, None] if pooling == "mean" else \
        projected.masked_fill(~valid, -1e9).amax(1)
    torch.testing.assert_close(images, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-5)
    alone = student.encode_captions(ids[1:2, :2], caption_lengths[1:2], teacher=teacher)
    torch.testing.assert_close(alone[0], captions[1], atol=1e-5, rtol=1e-5)
    empty = student.encode_images(regions[:1], torch.tensor([0]), teacher=teacher)
    assert torch.isfinite(empty).all()
    tokens = tokens.detach().requires_grad_()
    embedded = student.embed_image_tokens(tokens, lengths)
    (embedded.sum() + captions.sum()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert tokens.grad[~valid[..., 0]].abs().max() == 0 and tokens.grad[valid[..., 0]].abs().max() > 0
    rebuilt = Student(**student.hparams)
    rebuilt.load_state_dict(student.state_dict())
    assert "project_tokens=True" in repr(student)
    with pytest.raises(ValueError, match="project_tokens"):
        Student(8, DIM, heads=2, pooling="first", project_tokens=True)
    with pytest.raises(ValueError, match="projection_hidden"):
        Student(8, DIM, heads=2, pooling="max", project_tokens=True, projection_hidden=0)


def test_student_errors(teacher):
    student = Student.for_teacher(teacher, embed_dim=8, heads=2)
    regions, image_lengths, _, _ = make_batch()
    with pytest.raises(ValueError, match="teacher is required"):
        student.encode_images(regions, image_lengths)
    with pytest.raises(ValueError, match="token_dim"):
        Student(8, DIM + 2, heads=2).encode_images(regions, image_lengths, teacher=teacher)
    with pytest.raises(ValueError, match="vocab_size is required"):
        Student(8, DIM, heads=2, backbone="separate")
    with pytest.raises(ValueError, match="backbone"):
        Student(8, DIM, heads=2, backbone="both")
    with pytest.raises(ValueError, match="pooling"):
        Student(8, DIM, heads=2, pooling="sum")
    with pytest.raises(ValueError, match="image_tokens must have shape"):
        student.embed_image_tokens(torch.zeros(2, 3, DIM + 1))
