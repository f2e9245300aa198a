"""Training losses for image-text matching: contrastive, distillation and SelfAlign.

Every function takes an in-batch score matrix ``scores [N, N]`` in the op's
orientation: row ``i`` is caption ``i``, column ``j`` is image ``j``, and the
diagonal holds the matching pairs. When several captions of one image share a
batch, ``positive_mask [N, N]`` (bool, True where caption i describes image j)
keeps those pairs out of the negatives; the diagonal is always positive.

* :func:`hinge_loss` — VSE++ triplet loss with the hardest negative (or all
  negatives), margin 0.2, both directions, summed (TERAN / ALADIN).
* :func:`infonce_loss` — symmetric InfoNCE (CLIP) with a temperature.
* :func:`listnet_loss` — ALADIN's ListNet distillation: cross-entropy between
  softmax of the (detached) teacher scores and softmax of ``temperature`` x the
  student scores, over images for each caption and over captions for each image.
* :func:`sinkhorn`, :func:`swapped_prediction_loss`,
  :func:`concept_alignment_loss` / :class:`ConceptAlignmentLoss` — SelfAlign's
  concept level: word tokens and the regions they align with are assigned to
  learnable prototypes by Sinkhorn-Knopp (SwAV), each predicting the other's code.
* :func:`context_alignment_loss` — SelfAlign's context level: contrastive over
  the top-k hardest negatives with temperature 0.7.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "hinge_loss",
    "infonce_loss",
    "listnet_loss",
    "sinkhorn",
    "swapped_prediction_loss",
    "aligned_token_pairs",
    "concept_alignment_loss",
    "context_alignment_loss",
    "ConceptAlignmentLoss",
]

REDUCTIONS = ("sum", "mean")


def _check_square(name: str, scores, positive_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate a square score matrix and return it with the bool mask of non-negatives (diagonal included)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name} must be square [N, N] (caption i matches image i), got {list(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {scores.dtype}")
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty [0, 0]: a batch needs at least one caption-image pair")
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    if positive_mask is None:
        return scores, eye
    if not isinstance(positive_mask, torch.Tensor) or positive_mask.shape != scores.shape:
        raise ValueError(
            f"positive_mask must be a bool tensor of shape {list(scores.shape)}, got "
            f"{list(positive_mask.shape) if isinstance(positive_mask, torch.Tensor) else type(positive_mask).__name__}"
        )
    return scores, positive_mask.to(device=scores.device, dtype=torch.bool) | eye


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 for softmax-type math; float32 and float64 unchanged."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _connected_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 (float64 if any input is) scalar 0 in the autograd graph of ``tensors``: zero gradients, and
    never NaN whatever the tensors hold (a sum over no elements)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return sum((t.flatten()[:0].sum().to(dtype) for t in tensors), tensors[0].new_zeros((), dtype=dtype))


def _check_positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def hinge_loss(
    scores: torch.Tensor,
    margin: float = 0.2,
    hardest_negative: bool = True,
    reduction: str = "sum",
    positive_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """VSE++ hinge (triplet) loss, both directions.

    For caption i (row) and image j (column) with positive score ``d_i = S[i, i]``::

        caption -> image:  [margin + S[i, j] - S[i, i]]_+   over negatives j of row i
        image -> caption:  [margin + S[i, j] - S[j, j]]_+   over negatives i of column j

    Args:
        scores: ``[N, N]`` float scores (diagonal = matching pairs).
        margin: hinge margin (0.2).
        hardest_negative: keep only the largest violation per query (VSE++
            "max violation"); False sums over all negatives.
        reduction: ``"sum"`` over queries (TERAN / ALADIN) or ``"mean"``.
        positive_mask: ``[N, N]`` bool, pairs that are not negatives.

    Returns:
        scalar tensor, the sum of both directions (0 for N = 1); float32 for
        float16 / bfloat16 scores, computed in float32.
    """
    scores, positives = _check_square("scores", scores, positive_mask)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(margin, (int, float)) or margin < 0:
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    # float32 math: in float16 a query's summed violations overflow (inf) long before the loss itself would
    scores = _upcast(scores)
    diagonal = scores.diagonal()
    cost_image = (margin + scores - diagonal[:, None]).clamp(min=0).masked_fill(positives, 0.0)
    cost_caption = (margin + scores - diagonal[None, :]).clamp(min=0).masked_fill(positives, 0.0)
    if hardest_negative:
        per_caption, per_image = cost_image.max(dim=1).values, cost_caption.max(dim=0).values
    else:
        per_caption, per_image = cost_image.sum(dim=1), cost_caption.sum(dim=0)
    reduce = torch.sum if reduction == "sum" else torch.mean
    return reduce(per_caption) + reduce(per_image)


def infonce_loss(scores: torch.Tensor, temperature: float = 0.05,
                 positive_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean over both directions of cross-entropy with the diagonal as target.

    ``scores [N, N]`` (cosines); ``logits = scores / temperature``; other
    positives (``positive_mask``) are removed from the candidates. Returns
    ``(CE_rows + CE_columns) / 2`` averaged over queries.
    """
    scores, positives = _check_square("scores", scores, positive_mask)
    temperature = _check_positive("temperature", temperature)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    logits = (_upcast(scores) / temperature).masked_fill(positives & ~eye, float("-inf"))
    target = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-query ``-sum softmax(target_logits) * log_softmax(logits)`` along ``dim``; 0 where a target is 0.

    A query whose target logits are all ``-inf`` (every candidate ruled out) has no target: it counts 0, and
    gives no gradient (softmax is 0 / 0 = NaN there, and 0 * NaN made the backward NaN). A NaN (or +inf)
    target logit makes its query's term NaN, so a broken teacher shows in the loss, not only in the gradient.
    """
    target = torch.softmax(target_logits, dim=dim)
    target = target.masked_fill(torch.isneginf(target_logits).all(dim=dim, keepdim=True), 0.0)
    log_probabilities = torch.log_softmax(logits, dim=dim)
    # 0 * (-inf) must count as 0: masked candidates have zero target mass
    terms = torch.where(target != 0, target * log_probabilities, torch.zeros_like(log_probabilities))
    return -terms.sum(dim=dim)


def listnet_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    temperature: float = 6.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """ALADIN's ListNet distillation loss, both directions.

    ``P_T = softmax(teacher_scores / teacher_temperature)`` (teacher detached)
    and ``log P_S = log_softmax(temperature * student_scores)``, taken over
    images for each caption (rows) and over captions for each image (columns);
    the loss is ``CE(P_T, P_S)`` of rows plus that of columns.

    Args:
        student_scores: ``[Nc, Ni]`` student scores (cosines in [-1, 1]).
        teacher_scores: ``[Nc, Ni]`` teacher scores (MrSw sums); never receives gradients.
            ``-inf`` entries are allowed (candidates the teacher rules out); a query
            whose candidates are all ruled out counts 0, without gradient (it still
            counts in the ``"mean"``'s number of queries). A NaN or ``+inf`` entry
            makes the loss NaN.
        temperature: multiplies the student scores (6).
        teacher_temperature: divides the teacher scores (1 = plain softmax).
        reduction: ``"mean"`` over queries of each direction, or ``"sum"``.

    Returns:
        scalar tensor, float32 (float16 / bfloat16 inputs are upcast), or
        float64 when either input is float64. Computed with log-softmax (no
        overflow for large scores); equals the teacher's entropy when ``P_S == P_T``.
    """
    if not isinstance(student_scores, torch.Tensor) or not isinstance(teacher_scores, torch.Tensor):
        raise TypeError("student_scores and teacher_scores must be torch.Tensors")
    if student_scores.ndim != 2 or student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student_scores and teacher_scores must be 2-D of one shape [Nc, Ni], got "
            f"{list(student_scores.shape)} and {list(teacher_scores.shape)}"
        )
    if student_scores.numel() == 0:
        raise ValueError(f"student_scores is empty {list(student_scores.shape)}: ListNet needs at least one caption "
                         "and one image")
    temperature = _check_positive("temperature", temperature)
    teacher_temperature = _check_positive("teacher_temperature", teacher_temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    teacher = _upcast(teacher_scores.detach()) / teacher_temperature
    student = _upcast(student_scores) * temperature
    reduce = torch.sum if reduction == "sum" else torch.mean
    return reduce(_soft_cross_entropy(teacher, student, dim=1)) + reduce(_soft_cross_entropy(teacher, student, dim=0))


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignment of N items to K prototypes (SwAV), equipartitioned.

    ``Q = exp(logits / epsilon)``, then ``iterations`` rounds of: normalise each
    prototype's column to total mass 1/K, normalise each item's row to 1/N.
    Returns ``codes [N, K]`` float32 with rows summing to 1 (no gradient).
    The normalisations run on ``log Q`` (log-sum-exp), so small ``epsilon``
    neither overflows nor underflows a whole item or prototype to 0.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D tensor [N, K], got "
                         f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    epsilon = _check_positive("epsilon", epsilon)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    count, prototypes = logits.shape
    if count == 0:
        return logits.new_zeros(logits.shape, dtype=torch.float32)
    # in the log domain: exp(logits / epsilon) underflows float32 for an item or a prototype whose logits lie
    # ~100 epsilon below the others', which then got codes 0 (or ~1e-14 via a clamped sum) instead of its share.
    # Constant factors (the global sum, 1/K, 1/N) cancel in the next normalisation and the final x N.

    def normaliser(log_q: torch.Tensor, dim: int) -> torch.Tensor:
        total = torch.logsumexp(log_q, dim=dim, keepdim=True)
        return torch.where(torch.isneginf(total), torch.zeros_like(total), total)  # an all -inf line stays 0

    log_q = logits.float() / epsilon
    for _ in range(iterations):
        log_q = log_q - normaliser(log_q, 0)  # each prototype's column
        log_q = log_q - normaliser(log_q, 1)  # each item's row
    q = torch.exp(log_q)
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-30)  # rows sum to 1 to float32 rounding


def swapped_prediction_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, epsilon: float = 0.05,
                            iterations: int = 3, temperature: float = 0.1) -> torch.Tensor:
    """SwAV swapped prediction between two views' prototype logits ``[N, K]``.

    ``q_a = sinkhorn(logits_a)``, ``q_b = sinkhorn(logits_b)`` (targets, no
    gradient); loss = ``mean_n [CE(q_b, softmax(logits_a / T)) + CE(q_a, softmax(logits_b / T))] / 2``.
    """
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f"logits_a and logits_b must be 2-D of one shape [N, K], got "
                         f"{list(logits_a.shape)} and {list(logits_b.shape)}")
    temperature = _check_positive("temperature", temperature)
    if logits_a.shape[0] == 0:
        return logits_a.sum() * 0.0
    codes_a, codes_b = sinkhorn(logits_a, epsilon, iterations), sinkhorn(logits_b, epsilon, iterations)
    codes_a, codes_b = codes_a.to(_upcast(logits_a).dtype), codes_b.to(_upcast(logits_b).dtype)
    loss_a = -(codes_b * torch.log_softmax(_upcast(logits_a) / temperature, dim=1)).sum(dim=1)
    loss_b = -(codes_a * torch.log_softmax(_upcast(logits_b) / temperature, dim=1)).sum(dim=1)
    return 0.5 * (loss_a.mean() + loss_b.mean())


def aligned_token_pairs(word_tokens: torch.Tensor, word_lengths: torch.Tensor, region_tokens: torch.Tensor,
                        region_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each valid word of caption b with its best-matching region of image b (the MrSw argmax).

    Args:
        word_tokens: ``[B, W, D]``; word_lengths: ``[B]`` int.
        region_tokens: ``[B, R, D]``; region_lengths: ``[B]`` int.

    Returns:
        ``(words [P, D], regions [P, D])`` with P = valid words whose image has
        at least one region; differentiable gathers (the argmax itself is not).
    """
    if word_tokens.ndim != 3 or region_tokens.ndim != 3 or word_tokens.shape[0] != region_tokens.shape[0] \
            or word_tokens.shape[2] != region_tokens.shape[2]:
        raise ValueError(f"word_tokens [B, W, D] and region_tokens [B, R, D] must share B and D, got "
                         f"{list(word_tokens.shape)} and {list(region_tokens.shape)}")
    word_lengths = torch.as_tensor(word_lengths, device=word_tokens.device).long()
    region_lengths = torch.as_tensor(region_lengths, device=word_tokens.device).long()
    with torch.no_grad():
        similarity = word_tokens.detach().float() @ region_tokens.detach().float().transpose(1, 2)  # [B, W, R]
        region_valid = torch.arange(region_tokens.shape[1], device=word_tokens.device)[None, :] < region_lengths[:, None]
        best = similarity.masked_fill(~region_valid[:, None, :], float("-inf")).argmax(dim=2)  # [B, W]
        word_valid = torch.arange(word_tokens.shape[1], device=word_tokens.device)[None, :] < word_lengths[:, None]
        word_valid &= (region_lengths > 0)[:, None]
        batch_index, word_index = word_valid.nonzero(as_tuple=True)
    return word_tokens[batch_index, word_index], region_tokens[batch_index, best[batch_index, word_index]]


def concept_alignment_loss(
    word_tokens: torch.Tensor,
    word_lengths: torch.Tensor,
    region_tokens: torch.Tensor,
    region_lengths: torch.Tensor,
    prototypes: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    temperature: float = 0.1,
) -> torch.Tensor:
    """SelfAlign concept-level loss on matching caption/image pairs (row b with row b).

    Every valid word is paired with its best region (:func:`aligned_token_pairs`);
    both are scored against the L2-normalised ``prototypes [K, D]`` and each
    predicts the Sinkhorn code of the other (:func:`swapped_prediction_loss`).
    Returns a scalar (exactly 0 when no word has a region, whatever the padding
    positions hold; the tokens and prototypes still get zero gradients).
    """
    if prototypes.ndim != 2 or prototypes.shape[1] != word_tokens.shape[-1]:
        raise ValueError(f"prototypes must be [K, {word_tokens.shape[-1]}], got {list(prototypes.shape)}")
    words, regions = aligned_token_pairs(word_tokens, word_lengths, region_tokens, region_lengths)
    centres = F.normalize(prototypes.float(), dim=1)
    words, regions = F.normalize(words.float(), dim=1), F.normalize(regions.float(), dim=1)
    if words.shape[0] == 0:
        # an empty sum: exactly 0 and still in the graph of every input. ``x.sum() * 0.0`` was NaN when a padding
        # position held NaN / inf (0 * inf), though padding is never read
        return _connected_zero(word_tokens, region_tokens, prototypes).float()
    return swapped_prediction_loss(words @ centres.T, regions @ centres.T, epsilon, iterations, temperature)


class ConceptAlignmentLoss(nn.Module):
    """:func:`concept_alignment_loss` with learnable prototypes ``[num_prototypes, dim]`` (default 1024)."""

    def __init__(self, dim: int, num_prototypes: int = 1024, epsilon: float = 0.05, iterations: int = 3,
                 temperature: float = 0.1):
        super().__init__()
        if not isinstance(num_prototypes, int) or num_prototypes < 1:
            raise ValueError(f"num_prototypes must be a positive int, got {num_prototypes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.epsilon, self.iterations, self.temperature = _check_positive("epsilon", epsilon), iterations, temperature
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, dim), dim=1))

    def forward(self, word_tokens, word_lengths, region_tokens, region_lengths) -> torch.Tensor:
        return concept_alignment_loss(word_tokens, word_lengths, region_tokens, region_lengths, self.prototypes,
                                      self.epsilon, self.iterations, self.temperature)


def context_alignment_loss(scores: torch.Tensor, top_k: int = 512, temperature: float = 0.7,
                           positive_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SelfAlign context-level loss: contrastive over each query's top-k hardest negatives.

    For caption i (row): ``-log( e^{S[i,i]/T} / (e^{S[i,i]/T} + sum_{j in topk(neg_i)} e^{S[i,j]/T}) )``;
    the same for image j over column j. Negatives are the off-diagonal entries
    not in ``positive_mask``; with fewer than ``top_k`` negatives all are used.

    Args:
        scores: ``[N, N]`` scores (cosines); top_k: negatives kept per query
            (512); temperature: 0.7.

    Returns:
        scalar: mean over queries of each direction, summed over the two
        directions (``2 log(1 + k)`` when all scores tie and no pair is masked,
        with ``k = min(top_k, N - 1)``; exactly 0 for N = 1: no negative, whatever
        the one score holds, as :func:`hinge_loss`).
    """
    scores, positives = _check_square("scores", scores, positive_mask)
    temperature = _check_positive("temperature", temperature)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    count = scores.shape[0]
    negatives = _upcast(scores).masked_fill(positives, float("-inf"))
    keep = min(top_k, count - 1)
    total = _upcast(scores).new_zeros(())
    if keep == 0:  # N = 1: an empty sum, so a NaN / inf score gives 0 (``scores.sum() * 0.0`` was NaN)
        return total + _connected_zero(scores).to(total.dtype)
    diagonal = _upcast(scores).diagonal()
    for matrix in (negatives, negatives.T):  # rows: caption queries; columns: image queries
        hardest = matrix.topk(keep, dim=1).values  # -inf where a row has fewer negatives
        logits = torch.cat([diagonal[:, None], hardest], dim=1) / temperature
        total = total + (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    return total
