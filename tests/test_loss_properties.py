"""Property-based tests of aladin_fast.losses against independent float64 oracles written from the docstrings.

Every public loss is recomputed with explicit Python loops over queries in float64 (autograd for the
gradients) on random inputs: batch sizes 1..9 (non-square for ListNet), integer-valued matrices (ties),
magnitudes up to 1e4, every accepted dtype (tolerances scaled by its epsilon), masks up to all-masked
rows, and the documented input validation.

Ties: no docstring fixes which of several tied hardest negatives (hinge) or tied top-k negatives (context)
gets the gradient, so at ties the gradient is only required to be a valid subgradient -- both losses are
convex in the scores -- and is compared entry for entry with the oracle on tie-free inputs.

Default run: a derandomized sample; ``pytest -m slow`` runs the bigger random profile.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

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

DATABASE = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis-db"))
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
DEFAULT = settings(max_examples=100, derandomize=True, **COMMON)
THOROUGH = settings(max_examples=1500, database=DATABASE, **COMMON)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = {name: torch.finfo(dtype).eps for name, dtype in DTYPES.items()}
INF = float("inf")


# --------------------------------------------------------------------------- inputs
@st.composite
def matrices(draw, square=True, low_precision=True, max_size=9):
    """A score matrix (rounded to its dtype), its dtype name, and an optional positive mask density."""
    rows = draw(st.integers(1, max_size))
    cols = rows if square else draw(st.integers(1, max_size))
    kind = draw(st.sampled_from(["normal", "integer", "huge", "small"]))
    names = sorted(DTYPES) if low_precision else ["float32", "float64"]
    dtype = draw(st.sampled_from(names))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "integer":  # ties everywhere, exact in every dtype
        values = torch.randint(-3, 4, (rows, cols), generator=generator).double()
    elif kind == "huge":  # |x| <= 1e4: representable in float16
        values = (torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1) * 1e4
    elif kind == "small":
        values = torch.randn(rows, cols, generator=generator, dtype=torch.float64) * 1e-3
    else:
        values = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    values = values.to(DTYPES[dtype])
    density = draw(st.sampled_from([None, 0.0, 0.3, 0.7, 1.0]))
    mask = None if density is None else torch.rand(rows, cols, generator=generator) < density
    return dict(scores=values, dtype=dtype, kind=kind, mask=mask, seed=draw(st.integers(0, 2**31 - 1)))


def _positives(n, mask):
    """Oracle's positive sets: mask | diagonal, as nested Python lists."""
    return [[i == j or (mask is not None and bool(mask[i, j])) for j in range(n)] for i in range(n)]


def _leaf64(tensor):
    """A float64 copy of ``tensor`` to differentiate the oracle by (never the case's own tensor)."""
    return tensor.detach().to(torch.float64, copy=True).requires_grad_(True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grad(loss, tensor):
    (grad,) = torch.autograd.grad(loss, tensor)
    return grad


def _assert_close(got, expected, atol, what=""):
    got, expected = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert got.shape == expected.shape, what
    torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def _directions(generator, shape, count=6):
    """Random perturbations: dense / sparse, tiny to large."""
    out = []
    for k in range(count):
        d = torch.randn(shape, generator=generator, dtype=torch.float64) * [1e-3, 0.1, 1.0, 10.0][k % 4]
        if k % 2:
            d = d * (torch.rand(shape, generator=generator) < 0.3)
        out.append(d)
    return out


# --------------------------------------------------------------------------- hinge (VSE++)
def oracle_hinge(s, margin, hardest, reduction, positive):
    """VSE++ hinge from the docstring, one query at a time over its negatives (float64, differentiable)."""
    n = s.shape[0]
    zero = s.sum() * 0.0  # in the graph even with no negative
    total = zero
    for q in range(n):
        for direction in range(2):
            if direction == 0:  # caption q vs images j: [m + S[q, j] - S[q, q]]_+
                negatives = [j for j in range(n) if not positive[q][j]]
                row = s[q, negatives]
            else:  # image q vs captions i: [m + S[i, q] - S[q, q]]_+
                negatives = [i for i in range(n) if not positive[i][q]]
                row = s[negatives, q]
            if not negatives:
                continue
            costs = torch.relu(margin + row - s[q, q])
            total = total + (costs[int(costs.detach().argmax())] if hardest else costs.sum())
    return total if reduction == "sum" else total / n


def _hinge_generic(s, margin, hardest, positive, gap=1e-6):
    """True when no hinge sits at its kink and no query's hardest negative is tied (oracle gradient unique)."""
    n = s.shape[0]
    v = s.tolist()
    for queries in ([[(i, j) for j in range(n)] for i in range(n)], [[(i, j) for i in range(n)] for j in range(n)]):
        for q, pairs in enumerate(queries):
            costs = sorted((margin + v[i][j] - v[q][q] for i, j in pairs if not positive[i][j]), reverse=True)
            if any(abs(c) < gap for c in costs):
                return False
            if hardest and len(costs) > 1 and costs[0] > 0 and costs[0] - costs[1] < gap:
                return False
    return True


def _check_hinge(case, margin, hardest, reduction):
    scores, mask, dtype = case["scores"], case["mask"], case["dtype"]
    n = scores.shape[0]
    positive = _positives(n, mask)
    x = scores.clone().requires_grad_(True)
    got = hinge_loss(x, margin, hardest, reduction, positive_mask=mask)
    native_grad = _grad(got, x)
    grad = native_grad.double()
    s64 = _leaf64(scores)
    expected = oracle_hinge(s64, margin, hardest, reduction, positive)
    magnitude = float(scores.double().abs().max()) + margin
    # each cost rounds twice (float32 for halves); per query one max (or up to n costs) summed, 2n queries
    precision = EPS["float64" if dtype == "float64" else "float32"]
    terms = 2 * n * (1 if hardest else max(n - 1, 1))
    slack = 4 * precision * magnitude * terms + 4 * precision * abs(float(expected.detach()))
    assert got.dtype == (torch.float64 if dtype == "float64" else torch.float32), "computed in float32 from halves"
    assert torch.isfinite(got) and native_grad.dtype == x.dtype and torch.isfinite(grad).all()
    _assert_close(got.double(), expected.detach(), slack, "hinge value")

    scale = 1.0 if reduction == "sum" else n
    exact = reduction == "sum" or dtype in ("float32", "float64")  # gradient entries are exact integers (x n)
    if exact:  # 1) the gradient is that of a selection of affine pieces which attains the loss (any tie-breaking)
        g = grad * scale
        assert torch.allclose(g, g.round(), atol=1e-3, rtol=0), "hinge gradient entries must be integers (x n for mean)"
        g = g.round()
        off = ~torch.eye(n, dtype=torch.bool)
        negative = off & ~torch.tensor(positive)
        assert (g[off] >= 0).all() and (g[off & ~negative] == 0).all(), "gradient on a non-negative pair"
        assert (g.diagonal() <= 0).all() and float(g.sum()) == 0.0
        if hardest:  # at most one piece per query
            assert float(g[off].sum()) <= 2 * n
        pieces = margin * float(g[off].sum()) + float((g * scores.double()).sum())
        _assert_close(pieces / scale, expected.detach(), slack, "hinge: the gradient's pieces do not attain the loss")
    # 2) subgradient inequality of the convex loss: L(S + d) >= L(S) + <g, d>
    generator = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        base = float(oracle_hinge(scores.double(), margin, hardest, reduction, positive))
        for d in _directions(generator, scores.shape):
            moved = float(oracle_hinge(scores.double() + d, margin, hardest, reduction, positive))
            linear = float((grad * d).sum())
            assert moved >= base + linear - slack - 8 * EPS[dtype] * float(d.abs().sum()) * (1 if exact else n), \
                "not a subgradient"
    # 3) on tie-free inputs the gradient is unique: compare with the oracle's autograd
    if dtype in ("float32", "float64") and _hinge_generic(scores.double(), margin, hardest, positive,
                                                          gap=1e-9 if dtype == "float64" else 1e-4 * magnitude):
        _assert_close(grad, _grad(expected, s64), 4 * n * EPS[dtype], "hinge gradient")  # 1 / n rounded (mean)


@DEFAULT
@given(case=matrices(), margin=st.sampled_from([0.0, 0.2, 1.0, 2.5]), hardest=st.booleans(),
       reduction=st.sampled_from(["sum", "mean"]))
def test_hinge_matches_oracle(case, margin, hardest, reduction):
    _check_hinge(case, margin, hardest, reduction)


@pytest.mark.slow
@THOROUGH
@given(case=matrices(), margin=st.sampled_from([0.0, 0.2, 1.0, 2.5]), hardest=st.booleans(),
       reduction=st.sampled_from(["sum", "mean"]))
def test_hinge_matches_oracle_thorough(case, margin, hardest, reduction):
    _check_hinge(case, margin, hardest, reduction)


def test_hinge_regression_float16_summed_violations_overflowed():
    """Found by test_hinge_matches_oracle_thorough: float16 scores were used as they are, so one caption's summed
    violations (4 x 20000.2) overflowed to inf although the loss, 24000.48 with reduction="mean", fits float16."""
    scores = torch.zeros(5, 5)
    scores[0, 1:] = 1e4
    scores[0, 0] = -1e4
    scores[1:, 1:].fill_diagonal_(1e4)
    expected = oracle_hinge(scores.double(), 0.2, False, "mean", _positives(5, None)).item()
    assert expected == pytest.approx(24000.48)
    half = scores.half().requires_grad_(True)
    loss = hinge_loss(half, hardest_negative=False, reduction="mean")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(_grad(loss, half)).all()
    # one violation (8e4) beyond float16's range, the mean (6e4) within it
    half = torch.tensor([[-4e4, 4e4], [0.0, 4e4]], dtype=torch.float16)
    assert hinge_loss(half, reduction="mean").item() == pytest.approx((8e4 + 0.2 + 4e4 + 0.2 + 0.2) / 2, rel=1e-6)


def test_hinge_ties_and_all_masked_rows():
    # two tied hardest negatives in row 0: the value counts one of them once
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    loss = hinge_loss(scores, 0.2)
    assert loss.item() == pytest.approx(0.2 + 0.2 + 0.2)  # caption 0 (once); images 1 and 2 pick caption 0
    grad = _grad(loss, scores)
    assert grad[0, 1:].sum().item() == pytest.approx(1 + 2) and grad[0, 0].item() == -1.0
    # every pair positive: no negatives at all, zero loss and zero gradient
    for hardest in (True, False):
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(int(hardest))).requires_grad_(True)
        loss = hinge_loss(x, positive_mask=torch.ones(4, 4, dtype=torch.bool), hardest_negative=hardest)
        assert loss.item() == 0.0 and not _grad(loss, x).any()


# --------------------------------------------------------------------------- InfoNCE
def _logsumexp(values):
    """log sum exp of a 1-D tensor, shifted by its (constant) maximum."""
    top = float(values.detach().max())
    return top + torch.log(torch.exp(values - top).sum())


def oracle_infonce(s, temperature, positive):
    n = s.shape[0]
    total = s.sum() * 0.0
    for q in range(n):
        # caption q over images: the match and every negative; image q over captions likewise
        row = s[q, [j for j in range(n) if j == q or not positive[q][j]]] / temperature
        column = s[[i for i in range(n) if i == q or not positive[i][q]], q] / temperature
        total = total + (_logsumexp(row) - s[q, q] / temperature) / n + (_logsumexp(column) - s[q, q] / temperature) / n
    return total / 2


def _softmax_tolerance(dtype, logits_magnitude, loss):
    """fp32 math (after the upcast) on logits of this size, plus the output rounding."""
    eps = max(EPS[dtype], EPS["float32"]) if dtype != "float64" else EPS["float64"]
    return 16 * EPS["float32" if dtype != "float64" else "float64"] * (logits_magnitude + 1) + 4 * eps * abs(loss)


def _check_infonce(case, temperature):
    scores, mask, dtype = case["scores"], case["mask"], case["dtype"]
    n = scores.shape[0]
    x = scores.clone().requires_grad_(True)
    got = infonce_loss(x, temperature, positive_mask=mask)
    assert got.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert torch.isfinite(got)
    grad = _grad(got, x)
    assert grad.dtype == x.dtype and torch.isfinite(grad).all()
    s64 = _leaf64(scores)
    expected = oracle_infonce(s64, temperature, _positives(n, mask))
    logits = float(scores.double().abs().max()) / temperature
    _assert_close(got, expected.detach(), _softmax_tolerance(dtype, logits, float(expected.detach())), "infonce value")
    ref = _grad(expected, s64)
    # gradient entries are (softmax - onehot) / (n T) in [-1/(nT), 1/(nT)]; softmax weights carry the logits' error
    tol = (16 * EPS["float32" if dtype != "float64" else "float64"] * (logits + 1) + 2 * EPS[dtype]) / (n * temperature)
    _assert_close(grad, ref, tol, "infonce gradient")


@DEFAULT
@given(case=matrices(), temperature=st.sampled_from([0.05, 0.1, 0.7, 1.0, 3.0]))
def test_infonce_matches_oracle(case, temperature):
    _check_infonce(case, temperature)


@pytest.mark.slow
@THOROUGH
@given(case=matrices(), temperature=st.sampled_from([0.05, 0.1, 0.7, 1.0, 3.0]))
def test_infonce_matches_oracle_thorough(case, temperature):
    _check_infonce(case, temperature)


# --------------------------------------------------------------------------- ListNet
def _soft_ce_oracle(teacher_row, student_row, temperature, teacher_temperature):
    """-sum_j P_T[j] log P_S[j]; P_T = softmax(t / tt) (0 where t = -inf; no target when every t is -inf)."""
    t = [float(v) / teacher_temperature for v in teacher_row]
    top = max(t)
    if top == -INF:  # the teacher rules out every candidate: nothing to distil
        return student_row.sum() * 0.0
    weights = [math.exp(v - top) if v != -INF else 0.0 for v in t]
    total = sum(weights)
    keep = [j for j, w in enumerate(weights) if w > 0]
    log_probabilities = temperature * student_row[keep] - _logsumexp(temperature * student_row)
    return -(torch.tensor([weights[j] / total for j in keep], dtype=torch.float64) * log_probabilities).sum()


def oracle_listnet(student, teacher, temperature, teacher_temperature, reduction):
    rows, cols = student.shape
    per_caption = [_soft_ce_oracle(teacher[i].tolist(), student[i], temperature, teacher_temperature)
                   for i in range(rows)]
    per_image = [_soft_ce_oracle(teacher[:, j].tolist(), student[:, j], temperature, teacher_temperature)
                 for j in range(cols)]
    zero = student.sum() * 0.0
    if reduction == "sum":
        return sum(per_caption, zero) + sum(per_image, zero)
    return sum(per_caption, zero) / rows + sum(per_image, zero) / cols


@st.composite
def listnet_cases(draw):
    student = draw(matrices(square=False))
    teacher = draw(matrices(square=False))
    rows, cols = student["scores"].shape
    generator = torch.Generator().manual_seed(teacher["seed"])
    t, dtype = teacher["scores"], teacher["scores"].dtype
    if t.shape != (rows, cols):  # same shape, teacher's own kind / dtype / scale
        t = torch.randn(rows, cols, generator=generator, dtype=torch.float64) * float(t.double().abs().max() + 1)
        t = (t.round().clamp(-3, 3) if teacher["kind"] == "integer" else t.clamp(-6e4, 6e4)).to(dtype)
    ruled_out = draw(st.sampled_from([0.0, 0.0, 0.3, 0.8, 1.0]))  # -inf: candidates the teacher rules out
    if ruled_out:
        t = t.masked_fill(torch.rand(rows, cols, generator=generator) < ruled_out, -INF)
    return dict(student=student["scores"], student_dtype=student["dtype"], teacher=t, teacher_dtype=teacher["dtype"],
                temperature=draw(st.sampled_from([0.5, 1.0, 6.0, 10.0])),
                teacher_temperature=draw(st.sampled_from([0.1, 1.0, 3.0])),
                reduction=draw(st.sampled_from(["mean", "sum"])))


def _check_listnet(case):
    student, teacher = case["student"], case["teacher"]
    tau, teacher_tau, reduction = case["temperature"], case["teacher_temperature"], case["reduction"]
    x = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    got = listnet_loss(x, t, tau, teacher_tau, reduction)
    wide = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    assert got.dtype == wide
    assert torch.isfinite(got), "ListNet of finite students is finite"
    grad, teacher_grad = torch.autograd.grad(got, (x, t), allow_unused=True)
    assert teacher_grad is None, "teacher scores are detached"
    assert grad.dtype == x.dtype and torch.isfinite(grad).all(), "non-finite student gradient"
    s64 = _leaf64(student)
    expected = oracle_listnet(s64, teacher.double(), tau, teacher_tau, reduction)
    rows, cols = student.shape
    queries = rows + cols if reduction == "sum" else 2
    finite_teacher = teacher.double()[torch.isfinite(teacher.double())]
    student_logits = tau * float(student.double().abs().max())
    teacher_logits = float(finite_teacher.abs().max()) / teacher_tau if finite_teacher.numel() else 0.0
    both64 = student.dtype == teacher.dtype == torch.float64  # each side is computed in float32 unless float64
    precision = EPS["float64"] if both64 else EPS["float32"]
    # P_T is relatively off by ~eps |teacher logits|, and multiplies log P_S (<= 2 |student logits| + log N)
    value_tol = 16 * precision * (teacher_logits + 1) * (2 * student_logits + math.log(max(rows, cols)) + 1) * queries
    _assert_close(got, expected.detach(), value_tol + 4 * precision * abs(float(expected.detach())), "listnet value")
    ref = _grad(expected, s64)
    scale = tau * (1 if reduction == "sum" else 1 / min(rows, cols))  # each entry: tau (q - p) in two queries
    tol = 2 * scale * 16 * precision * (student_logits + teacher_logits + 1) \
        + 2 * EPS[case["student_dtype"]] * float(ref.abs().max())
    _assert_close(grad, ref, tol, "listnet gradient")


@DEFAULT
@given(case=listnet_cases())
def test_listnet_matches_oracle(case):
    _check_listnet(case)


@pytest.mark.slow
@THOROUGH
@given(case=listnet_cases())
def test_listnet_matches_oracle_thorough(case):
    _check_listnet(case)


@DEFAULT
@given(case=matrices(square=False), tau=st.sampled_from([0.5, 6.0]), teacher_tau=st.sampled_from([0.1, 1.0, 3.0]))
def test_listnet_minimum_is_teacher_entropy(case, tau, teacher_tau):
    """Docstring: equals the teacher's entropy when P_S == P_T (and that is the minimum)."""
    teacher = case["scores"].double()
    student = teacher / teacher_tau / tau
    loss = listnet_loss(student, teacher, tau, teacher_tau)
    entropy = 0.0
    for matrix in (teacher, teacher.T):
        for row in matrix / teacher_tau:
            p = torch.softmax(row, 0)
            entropy += -float(sum(pi * math.log(pi) for pi in p.tolist() if pi > 0)) / matrix.shape[0]
    assert loss.item() == pytest.approx(entropy, rel=1e-9, abs=1e-9 * (1 + float(teacher.abs().max()) / teacher_tau))
    noise = torch.randn(student.shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    other = listnet_loss(student + noise, teacher, tau, teacher_tau)
    assert other.item() >= loss.item() - 1e-9 * (1 + float(teacher.abs().max()) / teacher_tau)


def test_listnet_regression_teacher_rules_out_a_whole_query():
    """Found by test_listnet_matches_oracle: a query whose teacher scores are all -inf -- every candidate ruled
    out -- added 0 to the loss but NaN to the student's gradient (softmax 0 / 0 = NaN target, times 0 upstream)."""
    student = torch.tensor([[1.5391]], dtype=torch.bfloat16, requires_grad=True)  # the shrunk example
    loss = listnet_loss(student, torch.tensor([[-INF]], dtype=torch.bfloat16), 0.5, 0.1)
    assert loss.item() == 0.0
    assert _grad(loss, student).item() == 0.0
    # one caption, two images: image 1's only caption is ruled out
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, -INF]])
    loss = listnet_loss(student, teacher)
    grad = _grad(loss, student)
    expected = oracle_listnet(_leaf64(student), teacher.double(), 6.0, 1.0, "mean")
    assert loss.item() == pytest.approx(expected.item())
    assert torch.isfinite(grad).all(), grad
    torch.testing.assert_close(grad.double(), torch.tensor([[-3.0, 3.0]], dtype=torch.float64))
    # a caption whose teacher row is all -inf, square batch: rows direction
    student = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    teacher = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    teacher[1] = -INF
    grad = _grad(listnet_loss(student, teacher), student)
    s64 = _leaf64(student)
    torch.testing.assert_close(grad.double(), _grad(oracle_listnet(s64, teacher.double(), 6.0, 1.0, "mean"), s64),
                               atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- Sinkhorn / SwAV
def oracle_sinkhorn(logits, epsilon, iterations):
    """Sinkhorn-Knopp from the docstring in float64, in the log domain: Q = exp(logits / eps) up to scale; each
    round normalises every prototype's column to 1/K then every item's row to 1/N; returns N Q."""
    count, prototypes = logits.shape
    log_q = logits.double() / epsilon
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(prototypes)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(count)
    return torch.exp(log_q) * count


@st.composite
def prototype_logits(draw, max_items=9, max_prototypes=9):
    count = draw(st.integers(1, max_items))
    prototypes = draw(st.integers(1, max_prototypes))
    kind = draw(st.sampled_from(["cosine", "integer", "spread", "huge"]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "cosine":  # what the concept loss feeds it
        values = torch.rand(count, prototypes, generator=generator, dtype=torch.float64) * 2 - 1
    elif kind == "integer":
        values = torch.randint(-3, 4, (count, prototypes), generator=generator).double()
    elif kind == "spread":  # whole items / prototypes far apart
        values = torch.randn(count, prototypes, generator=generator, dtype=torch.float64) \
            + torch.randn(count, 1, generator=generator, dtype=torch.float64) * 10 \
            + torch.randn(1, prototypes, generator=generator, dtype=torch.float64) * 10
    else:
        values = (torch.rand(count, prototypes, generator=generator, dtype=torch.float64) * 2 - 1) * 1e4
    epsilon = draw(st.sampled_from([0.01, 0.05, 0.5, 1.0]))
    return dict(logits=values.to(DTYPES[dtype]), dtype=dtype, kind=kind, epsilon=epsilon,
                iterations=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**31 - 1)))


def _sinkhorn_tolerance(logits, epsilon):
    # codes are exp of float32 exponents of size |logits| / eps: their rounding is relative to that size
    return 1e-5 + 64 * EPS["float32"] * float(logits.double().abs().max()) / epsilon


def _check_sinkhorn(case):
    logits, epsilon, iterations = case["logits"], case["epsilon"], case["iterations"]
    codes = sinkhorn(logits, epsilon, iterations)
    assert codes.dtype == torch.float32 and codes.shape == logits.shape and not codes.requires_grad
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1).double(), torch.ones(logits.shape[0], dtype=torch.float64),
                               atol=1e-5, rtol=0, msg=lambda m: f"rows must sum to 1: {m}")
    if float(logits.double().abs().max()) / epsilon > 2e3:  # float32 exponents that big carry > 1e-2 error
        return
    tol = _sinkhorn_tolerance(logits, epsilon)
    _assert_close(codes, oracle_sinkhorn(logits.double(), epsilon, iterations), tol, "sinkhorn codes")
    # a constant added to a prototype's column cancels in the first column normalisation
    generator = torch.Generator().manual_seed(case["seed"])
    shift = (torch.randn(1, logits.shape[1], generator=generator, dtype=torch.float64) * 20).round()
    shifted = (logits.double() + shift).to(logits.dtype)
    if torch.equal(shifted.double() - shift, logits.double()):  # shift exact in this dtype
        _assert_close(sinkhorn(shifted, epsilon, iterations), codes, _sinkhorn_tolerance(shifted, epsilon) + tol,
                      "sinkhorn: column shift")


@DEFAULT
@given(case=prototype_logits())
def test_sinkhorn_matches_oracle(case):
    _check_sinkhorn(case)


@pytest.mark.slow
@THOROUGH
@given(case=prototype_logits())
def test_sinkhorn_matches_oracle_thorough(case):
    _check_sinkhorn(case)


def test_sinkhorn_regression_rows_far_below_the_global_maximum():
    """Found by test_sinkhorn_matches_oracle / test_swapped_prediction_matches_oracle: exp(logits / eps - global max)
    underflowed float32 for a whole item (or prototype) whose logits were ~5 below the best one's at eps = 0.05
    (~1 at eps = 0.01): that item's codes came back all 0, not summing to 1, or the prototype got no share."""
    codes = sinkhorn(torch.tensor([[0.0, 0.0], [-6.0, -6.0]]), 0.05, 3)
    torch.testing.assert_close(codes, torch.full((2, 2), 0.5))
    # the shrunk example: one item, two prototypes -- equipartition gives [0.5, 0.5] whatever the logits;
    # exp(-100) is a float32 denormal and the clamped column sum (1e-30) turned the second share into 2e-14
    codes = sinkhorn(torch.tensor([[1.0, 0.0]]), epsilon=0.01, iterations=1)
    torch.testing.assert_close(codes, torch.tensor([[0.5, 0.5]]))
    # the case that swapped_prediction_loss met: cosines with epsilon = 0.01 (the second prototype got no share)
    codes = sinkhorn(torch.tensor([[1.5156, 0.3066]]), epsilon=0.01, iterations=1)
    torch.testing.assert_close(codes, torch.tensor([[0.5, 0.5]]))
    # and a whole prototype far below the others still gets its equipartition share
    logits = torch.tensor([[1.0, 0.0, -8.0], [0.0, 1.0, -8.5], [0.5, 0.5, -7.0]])
    codes = sinkhorn(logits, 0.05, 3)
    torch.testing.assert_close(codes.double(), oracle_sinkhorn(logits, 0.05, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(3))
    # the case of test_losses.py::test_sinkhorn_hand_computed_and_stable: finite there, now also row-stochastic
    codes = sinkhorn(torch.tensor([[100.0, -100.0], [0.0, 1.0]]), 0.05, 3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(2))


def oracle_swapped(a, b, epsilon, iterations, temperature):
    codes_a = oracle_sinkhorn(a.detach(), epsilon, iterations)
    codes_b = oracle_sinkhorn(b.detach(), epsilon, iterations)
    n = a.shape[0]
    total = a.sum() * 0.0
    for i in range(n):  # item i: each view predicts the other's code
        la, lb = a[i] / temperature, b[i] / temperature
        total = total - (codes_b[i] * (la - _logsumexp(la))).sum() / n - (codes_a[i] * (lb - _logsumexp(lb))).sum() / n
    return total / 2


def _check_swapped(case, temperature):
    a = case["logits"]
    assume(float(a.double().abs().max()) / case["epsilon"] <= 2e3)
    generator = torch.Generator().manual_seed(case["seed"])
    b = (a.double() + torch.randn(a.shape, generator=generator, dtype=torch.float64) * float(a.double().std()
                                                                                           if a.numel() > 1 else 1.0))
    b = b.to(a.dtype)
    xa, xb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    got = swapped_prediction_loss(xa, xb, case["epsilon"], case["iterations"], temperature)
    assert torch.isfinite(got)
    ga, gb = torch.autograd.grad(got, (xa, xb))
    a64, b64 = _leaf64(a), _leaf64(b)
    expected = oracle_swapped(a64, b64, case["epsilon"], case["iterations"], temperature)
    ra, rb = torch.autograd.grad(expected, (a64, b64))
    magnitude = float(torch.cat([a.double().flatten(), b.double().flatten()]).abs().max())
    codes_tol = _sinkhorn_tolerance(torch.tensor([magnitude]), case["epsilon"])
    # loss: codes' error times |log-probabilities| (<= 2 magnitude / T + log K) plus fp32 log-softmax rounding
    tol = codes_tol * a.shape[1] * (2 * magnitude / temperature + math.log(a.shape[1]) + 1) \
        + 16 * EPS["float32"] * (magnitude / temperature + 1)
    _assert_close(got, expected.detach(), tol, "swapped prediction value")
    gtol = (codes_tol * a.shape[1] + 16 * EPS["float32"] * (magnitude / temperature + 1)) / (temperature * a.shape[0]) \
        + 2 * EPS[case["dtype"]] * float(max(ra.abs().max(), rb.abs().max()))
    _assert_close(ga, ra, gtol, "swapped prediction d logits_a")
    _assert_close(gb, rb, gtol, "swapped prediction d logits_b")


@DEFAULT
@given(case=prototype_logits(), temperature=st.sampled_from([0.1, 1.0]))
def test_swapped_prediction_matches_oracle(case, temperature):
    _check_swapped(case, temperature)


@pytest.mark.slow
@THOROUGH
@given(case=prototype_logits(), temperature=st.sampled_from([0.1, 1.0]))
def test_swapped_prediction_matches_oracle_thorough(case, temperature):
    _check_swapped(case, temperature)


# --------------------------------------------------------------------------- SelfAlign concept level
@st.composite
def token_batches(draw):
    batch = draw(st.integers(1, 4))
    words, regions, dim = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3, 8]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grid = draw(st.booleans())  # multiples of 1/8: float32 dot products exact, ties frequent (first index wins)

    def make(*shape):
        if grid:
            values = torch.randint(-8, 9, shape, generator=generator).double() / 8
            # no zero vector: normalize's gradient there is 1 / eps = 1e12 (degenerate, not compared)
            values[..., 0] += (values == 0).all(dim=-1) * 0.125
            return values
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    dtype = draw(st.sampled_from(["float32", "float64"]))
    return dict(
        words=make(batch, words, dim).to(DTYPES[dtype]), regions=make(batch, regions, dim).to(DTYPES[dtype]),
        word_lengths=torch.tensor(draw(st.lists(st.integers(0, words), min_size=batch, max_size=batch))),
        region_lengths=torch.tensor(draw(st.lists(st.integers(0, regions), min_size=batch, max_size=batch))),
        prototypes=make(draw(st.integers(1, 6)), dim).to(DTYPES[dtype]), grid=grid, dtype=dtype,
        epsilon=draw(st.sampled_from([0.05, 0.5])), temperature=draw(st.sampled_from([0.1, 1.0])),
    )


def oracle_pairs(words, word_lengths, regions, region_lengths):
    """(b, w, r): every valid word w of caption b with its most similar valid region r of image b (first on ties)."""
    out = []
    for b in range(words.shape[0]):
        if int(region_lengths[b]) == 0:
            continue
        for w in range(int(word_lengths[b])):
            sims = [float((words[b, w].double() * regions[b, r].double()).sum()) for r in range(int(region_lengths[b]))]
            out.append((b, w, max(range(len(sims)), key=lambda r: (sims[r], -r))))
    return out


def _normalize(v):
    return v / torch.clamp(torch.sqrt((v * v).sum()), min=1e-12)


def oracle_concept(words, word_lengths, regions, region_lengths, prototypes, epsilon, iterations, temperature):
    pairs = oracle_pairs(words.detach(), word_lengths, regions.detach(), region_lengths)
    if not pairs:
        return None
    centres = torch.stack([_normalize(prototypes[k]) for k in range(prototypes.shape[0])])
    za = torch.stack([_normalize(words[b, w]) for b, w, _ in pairs]) @ centres.T
    zb = torch.stack([_normalize(regions[b, r]) for b, _, r in pairs]) @ centres.T
    return oracle_swapped(za, zb, epsilon, iterations, temperature)


def _check_concept(case):
    words, regions, prototypes = case["words"], case["regions"], case["prototypes"]
    wl, rl = case["word_lengths"], case["region_lengths"]
    pw, pr = aligned_token_pairs(words, wl, regions, rl)
    pairs = oracle_pairs(words, wl, regions, rl)
    assert pw.shape == (len(pairs), words.shape[2]) and pr.shape == pw.shape
    if case["grid"] or case["dtype"] == "float32":  # exact similarities: the very same winners
        for k, (b, w, r) in enumerate(pairs):
            assert torch.equal(pw[k], words[b, w]) and torch.equal(pr[k], regions[b, r]), (k, b, w, r)
    tensors = [t.clone().requires_grad_(True) for t in (words, regions, prototypes)]
    got = concept_alignment_loss(tensors[0], wl, tensors[1], rl, tensors[2], case["epsilon"], 3, case["temperature"])
    assert got.dtype == torch.float32 and torch.isfinite(got)
    grads = torch.autograd.grad(got, tensors)
    refs64 = [_leaf64(t) for t in (words, regions, prototypes)]
    expected = oracle_concept(refs64[0], wl, refs64[1], rl, refs64[2], case["epsilon"], 3, case["temperature"])
    if expected is None:
        assert got.item() == 0.0 and all(not g.any() for g in grads)
        return
    refs = torch.autograd.grad(expected, refs64, allow_unused=True)
    count = len(pairs)
    # logits are cosines: |z| <= 1; codes' float32 error ~ 1/eps, log-probabilities <= 2 / T + log K
    codes_tol = 1e-5 + 64 * EPS["float32"] / case["epsilon"]
    k = prototypes.shape[0]
    _assert_close(got, expected.detach(), codes_tol * k * (2 / case["temperature"] + math.log(k) + 1), "concept value")
    for name, g, r, t in zip(("words", "regions", "prototypes"), grads, refs, (words, regions, prototypes)):
        r = torch.zeros_like(t, dtype=torch.float64) if r is None else r
        norms = t.double().norm(dim=-1).clamp(min=1e-3)  # d normalize(x) / dx ~ 1 / |x|
        scale = (1 / norms.min()).item() * (codes_tol * k + 1e-5) / case["temperature"] * (1 if name != "prototypes"
                                                                                             else count)
        _assert_close(g, r, scale + 1e-6 * float(r.abs().max()), f"concept d {name}")


@DEFAULT
@given(case=token_batches())
def test_concept_alignment_matches_oracle(case):
    _check_concept(case)


@pytest.mark.slow
@THOROUGH
@given(case=token_batches())
def test_concept_alignment_matches_oracle_thorough(case):
    _check_concept(case)


# --------------------------------------------------------------------------- SelfAlign context level
def oracle_context(s, top_k, temperature, positive):
    n = s.shape[0]
    total = s.sum() * 0.0
    for q in range(n):
        for negatives in (s[q, [j for j in range(n) if not positive[q][j]]],  # caption q's images
                          s[[i for i in range(n) if not positive[i][q]], q]):  # image q's captions
            hardest = negatives[torch.argsort(negatives.detach(), descending=True, stable=True)[:top_k]]
            logits = torch.cat([s[q, q].reshape(1), hardest]) / temperature
            total = total + (_logsumexp(logits) - logits[0]) / n
    return total


def _context_generic(s, top_k, positive, gap=1e-9):
    """No tie across the top-k boundary of any query (the kept set, hence the gradient, is unique)."""
    n = s.shape[0]
    v = s.tolist()
    for direction in range(2):
        for q in range(n):
            cells = [(q, j) for j in range(n)] if direction == 0 else [(i, q) for i in range(n)]
            values = sorted((v[i][j] for i, j in cells if not positive[i][j]), reverse=True)
            if len(values) > top_k and values[top_k - 1] - values[top_k] <= gap:
                return False
    return True


def _check_context(case, top_k, temperature):
    scores, mask, dtype = case["scores"], case["mask"], case["dtype"]
    n = scores.shape[0]
    positive = _positives(n, mask)
    x = scores.clone().requires_grad_(True)
    got = context_alignment_loss(x, top_k, temperature, positive_mask=mask)
    assert got.dtype == (torch.float64 if dtype == "float64" else torch.float32) and torch.isfinite(got)
    grad = _grad(got, x)
    assert grad.dtype == x.dtype and torch.isfinite(grad).all()
    s64 = _leaf64(scores)
    expected = oracle_context(s64, top_k, temperature, positive)
    logits = float(scores.double().abs().max()) / temperature
    _assert_close(got, expected.detach(), _softmax_tolerance(dtype, logits, float(expected.detach())), "context value")
    precision = EPS["float64" if dtype == "float64" else "float32"]
    if _context_generic(scores.double(), top_k, positive, gap=0 if dtype == "float64" else 1e-4 * logits * temperature):
        tol = (16 * precision * (logits + 1) + 2 * EPS[dtype]) * 2 / (n * temperature)
        _assert_close(grad, _grad(expected, s64), tol, "context gradient")
    # any tie-breaking: a subgradient of the convex loss
    generator = torch.Generator().manual_seed(case["seed"])
    slack = _softmax_tolerance(dtype, logits, float(expected.detach())) * 2
    with torch.no_grad():
        base = float(oracle_context(scores.double(), top_k, temperature, positive))
        for d in _directions(generator, scores.shape, 4):
            moved = float(oracle_context(scores.double() + d, top_k, temperature, positive))
            linear = float((grad.double() * d).sum())
            assert moved >= base + linear - slack - 4 * max(EPS[dtype], precision) * float(d.abs().sum()) / temperature


@DEFAULT
@given(case=matrices(), top_k=st.sampled_from([1, 2, 3, 512]), temperature=st.sampled_from([0.05, 0.7, 2.0]))
def test_context_alignment_matches_oracle(case, top_k, temperature):
    _check_context(case, top_k, temperature)


@pytest.mark.slow
@THOROUGH
@given(case=matrices(), top_k=st.sampled_from([1, 2, 3, 512]), temperature=st.sampled_from([0.05, 0.7, 2.0]))
def test_context_alignment_matches_oracle_thorough(case, top_k, temperature):
    _check_context(case, top_k, temperature)


# --------------------------------------------------------------------------- documented validation
@DEFAULT
@given(rows=st.integers(1, 5), cols=st.integers(1, 5))
def test_square_losses_reject_non_square(rows, cols):
    assume(rows != cols)
    scores = torch.zeros(rows, cols)
    for loss in (hinge_loss, infonce_loss, context_alignment_loss):
        with pytest.raises(ValueError, match="square"):
            loss(scores)
    with pytest.raises(ValueError, match="square"):
        hinge_loss(torch.zeros(rows))
    # ListNet takes [Nc, Ni] but both of one shape
    assert torch.isfinite(listnet_loss(scores, scores))
    with pytest.raises(ValueError, match="one shape"):
        listnet_loss(scores, scores.T if rows != cols else scores[:1])


def test_documented_validation():
    scores = torch.zeros(3, 3)
    for loss in (hinge_loss, infonce_loss, context_alignment_loss):
        with pytest.raises(TypeError):
            loss(scores.tolist())
        with pytest.raises(TypeError, match="floating"):
            loss(torch.zeros(3, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match="positive_mask"):
            loss(scores, positive_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="margin"):
        hinge_loss(scores, margin=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        hinge_loss(scores, reduction="none")
    for bad in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="temperature"):
            infonce_loss(scores, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            context_alignment_loss(scores, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            listnet_loss(scores, scores, temperature=bad)
        with pytest.raises(ValueError, match="teacher_temperature"):
            listnet_loss(scores, scores, teacher_temperature=bad)
        with pytest.raises(ValueError, match="epsilon"):
            sinkhorn(scores, epsilon=bad)
        with pytest.raises(ValueError, match="temperature"):
            swapped_prediction_loss(scores, scores, temperature=bad)
    with pytest.raises(TypeError):
        listnet_loss(scores.tolist(), scores)
    with pytest.raises(ValueError, match="one shape"):
        listnet_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        listnet_loss(scores, scores, reduction="max")
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="iterations"):
            sinkhorn(scores, iterations=bad)
        with pytest.raises(ValueError, match="top_k"):
            context_alignment_loss(scores, top_k=bad)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        swapped_prediction_loss(torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="prototypes"):
        concept_alignment_loss(torch.zeros(1, 2, 4), torch.tensor([2]), torch.zeros(1, 2, 4), torch.tensor([2]),
                               torch.zeros(3, 5))
    with pytest.raises(ValueError, match="word_tokens"):
        aligned_token_pairs(torch.zeros(1, 2, 4), torch.tensor([2]), torch.zeros(2, 2, 4), torch.tensor([2, 2]))
    for kwargs, match in ((dict(dim=0), "dim"), (dict(dim=4, num_prototypes=0), "num_prototypes"),
                          (dict(dim=4, epsilon=0.0), "epsilon")):
        with pytest.raises(ValueError, match=match):
            ConceptAlignmentLoss(**kwargs)


def test_listnet_nan_or_inf_teacher_shows_in_the_loss():
    """A NaN / +inf teacher score made only the student's gradient NaN while the loss stayed finite, so a
    finiteness check on the loss (the trainer's) let it through: the loss is NaN now."""
    from aladin_fast.losses import listnet_loss

    student = torch.zeros(2, 3, requires_grad=True)
    for bad in (float("nan"), float("inf")):
        teacher = torch.tensor([[1.0, bad, 0.0], [0.0, 1.0, 2.0]])
        assert listnet_loss(student, teacher).isnan()
    teacher = torch.tensor([[float("-inf")] * 3, [0.0, 1.0, 2.0]])  # a query with every candidate ruled out
    loss = listnet_loss(student, teacher)
    assert loss.isfinite()
    assert torch.autograd.grad(loss, student)[0].isfinite().all()


@pytest.mark.parametrize("name", ["hinge_loss", "infonce_loss", "context_alignment_loss", "listnet_loss"])
def test_losses_refuse_empty_batches(name):
    import aladin_fast.losses as losses

    args = (torch.zeros(0, 0), torch.zeros(0, 0)) if name == "listnet_loss" else (torch.zeros(0, 0),)
    with pytest.raises(ValueError, match="empty"):
        getattr(losses, name)(*args)
