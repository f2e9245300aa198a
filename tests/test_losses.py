"""Losses: each against a hand-computed case and a plain loop implementation; gradients; edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aladin_fast.losses import (
    ConceptAlignmentLoss,
    aligned_token_pairs,
    concept_alignment_loss,
    context_alignment_loss,
    hinge_loss,
    infonce_loss,
    listnet_loss,
    sinkhorn,
    swapped_prediction_loss,
)


def loop_hinge(scores, margin, hardest, positive=None):
    """VSE++ hinge written with Python loops (the obviously-correct version)."""
    s = scores.tolist()
    n = len(s)
    positive = positive.tolist() if positive is not None else [[i == j for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # caption i against images j
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i and not positive[i][j]]
        total += (max(costs) if hardest else sum(costs)) if costs else 0.0
    for j in range(n):  # image j against captions i
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j and not positive[i][j]]
        total += (max(costs) if hardest else sum(costs)) if costs else 0.0
    return total


# ------------------------------------------------------------------- hinge
def test_hinge_hand_computed():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.75], [0.2, 0.65, 0.6]])
    # hardest: row 1 -> 0.2 + 0.75 - 0.8 = 0.15; row 2 -> 0.2 + 0.65 - 0.6 = 0.25;
    # column 1 (image 1, d = 0.8) -> caption 2: 0.2 + 0.65 - 0.8 = 0.05; column 2 (d = 0.6) -> caption 1: 0.35
    assert hinge_loss(scores).item() == pytest.approx(0.15 + 0.25 + 0.05 + 0.35, abs=1e-6)
    # all negatives add the smaller violations: row 2 also has 0.2 + 0.2 - 0.6 = -0.2 -> 0; column 2 caption 0: -0.3 -> 0
    assert hinge_loss(scores, hardest_negative=False).item() == pytest.approx(0.8, abs=1e-6)
    assert hinge_loss(scores, reduction="mean").item() == pytest.approx(0.8 / 3, abs=1e-6)


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_hinge_matches_loop(hardest, n):
    generator = torch.Generator().manual_seed(n)
    scores = torch.randn(n, n, generator=generator, dtype=torch.float64)
    positive = torch.rand(n, n, generator=generator) < 0.2
    for mask in (None, positive):
        expected = loop_hinge(scores, 0.2, hardest, None if mask is None else mask | torch.eye(n, dtype=torch.bool))
        got = hinge_loss(scores, 0.2, hardest, positive_mask=mask)
        assert got.item() == pytest.approx(expected, abs=1e-12)


def test_hinge_edge_cases_and_gradients():
    one = torch.tensor([[0.3]], requires_grad=True)
    loss = hinge_loss(one)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()
    tied = torch.full((4, 4), 0.5, requires_grad=True)  # every negative violates by exactly the margin
    loss = hinge_loss(tied)
    loss.backward()
    assert loss.item() == pytest.approx(2 * 4 * 0.2)
    assert torch.isfinite(tied.grad).all()
    # duplicates of one image are not negatives of each other
    same = torch.tensor([[0.5, 0.9], [0.9, 0.5]])
    assert hinge_loss(same, positive_mask=torch.ones(2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="scores must be square"):
        hinge_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="positive_mask"):
        hinge_loss(torch.zeros(2, 2), positive_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        hinge_loss(torch.zeros(2, 2), reduction="max")


# ------------------------------------------------------------------ InfoNCE
def test_infonce_matches_loop_and_gradcheck():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    t = 0.1
    expected = 0.0
    for matrix in (scores, scores.T):
        for i in range(5):
            row = [math.exp(v / t) for v in matrix[i].tolist()]
            expected += -math.log(row[i] / sum(row)) / 10
    assert infonce_loss(scores, t).item() == pytest.approx(expected, rel=1e-5)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: infonce_loss(s, 0.5), (scores,))


# ------------------------------------------------------------------ ListNet
def test_listnet_hand_computed():
    student = torch.tensor([[0.5, 0.1], [0.0, 0.3]])
    teacher = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    tau = 6.0
    total = 0.0
    for s_rows, t_rows in ((student.tolist(), teacher.tolist()), (student.T.tolist(), teacher.T.tolist())):
        for s_row, t_row in zip(s_rows, t_rows):
            p = [math.exp(v) / sum(math.exp(w) for w in t_row) for v in t_row]
            log_q = [tau * v - math.log(sum(math.exp(tau * w) for w in s_row)) for v in s_row]
            total += -sum(a * b for a, b in zip(p, log_q)) / 2  # mean over the 2 queries of each direction
    assert listnet_loss(student, teacher, tau).item() == pytest.approx(total, rel=1e-5)


def test_listnet_properties():
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 6, generator=generator) * 5
    # student distribution equal to the teacher's: loss = teacher entropy (rows + columns), the minimum
    matched = listnet_loss(teacher / 6.0, teacher, 6.0)
    entropy = sum(-(torch.softmax(teacher, d) * torch.log_softmax(teacher, d)).sum(d).mean() for d in (1, 0))
    assert matched.item() == pytest.approx(entropy.item(), rel=1e-5)
    student = torch.randn(6, 6, generator=generator, requires_grad=True)
    teacher_param = teacher.clone().requires_grad_(True)
    loss = listnet_loss(student, teacher_param)
    loss.backward()
    assert loss.item() > matched.item()
    assert teacher_param.grad is None  # teacher scores are detached
    assert torch.isfinite(student.grad).all()
    # huge scores and -inf teacher entries stay finite
    big = listnet_loss(torch.full((3, 3), 1e4), torch.tensor([[1e4, -float("inf"), 0.0]] * 3))
    assert torch.isfinite(big)
    one = listnet_loss(torch.tensor([[0.7]]), torch.tensor([[3.0]]))
    assert one.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        listnet_loss(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="one shape"):
        listnet_loss(student, teacher[:3])


# ------------------------------------------------------------------ SelfAlign
def swav_sinkhorn(logits, epsilon, iterations):
    """SwAV's distributed_sinkhorn for one process, in NumPy float64."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / epsilon).T  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


@pytest.mark.parametrize("shape", [(1, 4), (6, 3), (16, 32)])
def test_sinkhorn_matches_swav(shape):
    generator = torch.Generator().manual_seed(shape[0])
    logits = torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=1) * 0.8
    codes = sinkhorn(logits, 0.05, 3)
    np.testing.assert_allclose(codes.numpy(), swav_sinkhorn(logits.numpy(), 0.05, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(shape[0]))
    assert not codes.requires_grad


def test_sinkhorn_hand_computed_and_stable():
    # two items, two prototypes, item 0 prefers prototype 0: one round gives a 2x2 doubly-stochastic matrix
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    a = math.exp(1.0)
    q = np.array([[a, 1.0], [1.0, 1.0]])
    q = q / q.sum(axis=0, keepdims=True) / 2
    q = q / q.sum(axis=1, keepdims=True) / 2
    np.testing.assert_allclose(sinkhorn(logits, epsilon=1.0, iterations=1).numpy(), q * 2, rtol=1e-6)
    # epsilon = 0.05 with logits of 100 would overflow exp without the max shift
    assert torch.isfinite(sinkhorn(torch.tensor([[100.0, -100.0], [0.0, 1.0]]), 0.05, 3)).all()
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(logits, epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(logits, iterations=0)


def test_swapped_prediction_matches_direct_formula():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(5, 4, generator=generator, requires_grad=True)
    b = torch.randn(5, 4, generator=generator, requires_grad=True)
    loss = swapped_prediction_loss(a, b, 0.05, 3, 0.1)
    qa = torch.tensor(swav_sinkhorn(a.detach().numpy(), 0.05, 3), dtype=torch.float32)
    qb = torch.tensor(swav_sinkhorn(b.detach().numpy(), 0.05, 3), dtype=torch.float32)
    expected = 0.5 * (-(qb * torch.log_softmax(a / 0.1, 1)).sum(1).mean() - (qa * torch.log_softmax(b / 0.1, 1)).sum(1).mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_aligned_token_pairs_hand_case():
    words = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # third word is padding
    regions = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [5.0, 5.0]]])  # third region is padding
    w, r = aligned_token_pairs(words, torch.tensor([2]), regions, torch.tensor([2]))
    torch.testing.assert_close(w, words[0, :2])
    torch.testing.assert_close(r, regions[0, [1, 0]])  # word 0 -> region 1, word 1 -> region 0
    w, r = aligned_token_pairs(words, torch.tensor([2]), regions, torch.tensor([0]))  # empty image: no pair
    assert w.shape == (0, 2) and r.shape == (0, 2)


def test_concept_alignment_loss():
    generator = torch.Generator().manual_seed(3)
    words = torch.randn(3, 5, 8, generator=generator, requires_grad=True)
    regions = torch.randn(3, 6, 8, generator=generator, requires_grad=True)
    module = ConceptAlignmentLoss(8, num_prototypes=16)
    word_lengths, region_lengths = torch.tensor([5, 2, 1]), torch.tensor([6, 3, 1])
    loss = module(words, word_lengths, regions, region_lengths)
    # independent: explicit pairs, normalised prototypes, swapped prediction
    pw, pr = aligned_token_pairs(words, word_lengths, regions, region_lengths)
    centres = torch.nn.functional.normalize(module.prototypes, dim=1)
    za = torch.nn.functional.normalize(pw, dim=1) @ centres.T
    zb = torch.nn.functional.normalize(pr, dim=1) @ centres.T
    assert pw.shape[0] == 8
    assert loss.item() == pytest.approx(swapped_prediction_loss(za, zb, 0.05, 3, 0.1).item(), rel=1e-5)
    loss.backward()
    for tensor in (words.grad, regions.grad, module.prototypes.grad):
        assert tensor is not None and torch.isfinite(tensor).all()
    single = concept_alignment_loss(words[:1], torch.tensor([1]), regions[:1], torch.tensor([1]), module.prototypes)
    assert torch.isfinite(single)
    empty = concept_alignment_loss(words[:1], torch.tensor([0]), regions[:1], torch.tensor([1]), module.prototypes)
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="prototypes"):
        concept_alignment_loss(words, word_lengths, regions, region_lengths, torch.randn(4, 3))


def loop_context(scores, k, t, positive):
    n = scores.shape[0]
    total = 0.0
    for matrix, mask in ((scores, positive), (scores.T, positive.T)):
        for i in range(n):
            negatives = sorted((matrix[i, j].item() for j in range(n) if j != i and not mask[i, j]), reverse=True)[:k]
            logits = [matrix[i, i].item() / t] + [v / t for v in negatives]
            total += (math.log(sum(math.exp(v) for v in logits)) - logits[0]) / n
    return total


@pytest.mark.parametrize("k", [1, 3, 512])
def test_context_alignment_matches_loop(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    positive = torch.zeros(6, 6, dtype=torch.bool)
    positive[0, 1] = positive[1, 0] = True
    expected = loop_context(scores, k, 0.7, positive | torch.eye(6, dtype=torch.bool))
    assert context_alignment_loss(scores, k, 0.7, positive).item() == pytest.approx(expected, rel=1e-9)


def test_context_alignment_edge_cases():
    one = torch.tensor([[0.4]], requires_grad=True)
    loss = context_alignment_loss(one)
    loss.backward()
    assert loss.item() == 0.0
    tied = torch.zeros(4, 4, requires_grad=True)
    loss = context_alignment_loss(tied, top_k=2)
    loss.backward()
    assert loss.item() == pytest.approx(2 * math.log(3))
    assert torch.isfinite(tied.grad).all()
    with pytest.raises(ValueError, match="top_k"):
        context_alignment_loss(tied, top_k=0)
