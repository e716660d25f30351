"""The sampled ranking losses of GRU4Rec (ICLR 2016 and CIKM 2018).

Every loss takes a score matrix ``scores`` of shape ``(B, B + S)``: row ``i`` scores the
mini-batch's targets (column ``i`` is row ``i``'s own target, the other ``B - 1`` targets
are its in-batch negatives) followed by ``S`` shared extra negatives. Softmaxes are taken
once, over these sampled columns, never over the catalogue. Every log has an epsilon or is
computed in log-space, so no loss can reach ``log(0)``; a row without any negative (a
one-row batch with ``n_sample=0``) contributes zero loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

EPSILON = 1e-24
LossFunction = Callable[[torch.Tensor], torch.Tensor]


def _target_scores(scores: torch.Tensor) -> torch.Tensor:
    return scores.diagonal().unsqueeze(1)


def _negative_mask(scores: torch.Tensor) -> torch.Tensor:
    """1 for negatives, 0 for each row's own target."""
    mask = torch.ones_like(scores)
    mask.diagonal().zero_()
    return mask


def _softmax_over_negatives(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of each row over its negatives only (the target gets weight 0).

    The shift is the largest *negative* score, so a target far above every negative
    cannot underflow all weights to zero; a row without negatives gets all-zero weights.
    """
    largest = scores.masked_fill(mask == 0, float("-inf")).max(dim=1, keepdim=True).values
    shifted = scores - torch.nan_to_num(largest.detach(), neginf=0.0)
    weights = torch.exp(shifted.clamp(max=0.0)) * mask
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=EPSILON)


def cross_entropy(scores: torch.Tensor) -> torch.Tensor:
    """-log softmax(target) over the sampled columns (logQ is applied to ``scores`` before)."""
    return -torch.log_softmax(scores, dim=1).diagonal().mean()


def bpr(scores: torch.Tensor) -> torch.Tensor:
    """BPR (2016): mean over negatives of -log sigmoid(target - negative)."""
    mask = _negative_mask(scores)
    pairwise = -F.logsigmoid(_target_scores(scores) - scores) * mask
    return (pairwise.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def top1(scores: torch.Tensor) -> torch.Tensor:
    """TOP1 (2016): mean over negatives of sigmoid(negative - target) + sigmoid(negative^2)."""
    mask = _negative_mask(scores)
    pairwise = (torch.sigmoid(scores - _target_scores(scores)) + torch.sigmoid(scores**2)) * mask
    return (pairwise.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def top1_max(scores: torch.Tensor) -> torch.Tensor:
    """TOP1-max (2018): TOP1 terms weighted by the softmax of the negatives' scores."""
    mask = _negative_mask(scores)
    weights = _softmax_over_negatives(scores, mask)
    pairwise = torch.sigmoid(scores - _target_scores(scores)) + torch.sigmoid(scores**2)
    return (weights * pairwise).sum(dim=1).mean()


def bpr_max(scores: torch.Tensor, bpreg: float) -> torch.Tensor:
    """BPR-max (2018): -log sum_j s_j sigmoid(target - negative_j) + bpreg * sum_j s_j r_j^2."""
    mask = _negative_mask(scores)
    weights = _softmax_over_negatives(scores, mask)
    ranking = torch.sigmoid(_target_scores(scores) - scores)
    has_negatives = mask.sum(dim=1) > 0
    loss = -torch.log((weights * ranking).sum(dim=1) + EPSILON) * has_negatives
    regulariser = bpreg * (weights * scores**2).sum(dim=1)
    return (loss + regulariser).mean()


def make_loss(name: str, bpreg: float = 1.0) -> LossFunction:
    """The loss function for a config's ``loss`` name."""
    table: dict[str, LossFunction] = {
        "cross-entropy": cross_entropy,
        "bpr": bpr,
        "top1": top1,
        "top1-max": top1_max,
        "bpr-max": lambda scores: bpr_max(scores, bpreg),
    }
    return table[name]


def cross_entropy_item_major(scores_by_item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy` and its gradient, for scores laid out item x batch.

    The training step keeps sampled items along dim 0 (where its gathers and scatters are
    fast); the softmax's gradient is known in closed form (softmax minus the target's
    one-hot, over the batch size), which spares the transposes and autograd's overhead.
    """
    log_probabilities = torch.log_softmax(scores_by_item, dim=0)
    batch = scores_by_item.shape[1]
    loss = -log_probabilities.diagonal().mean()
    gradient = log_probabilities.exp_()
    gradient.diagonal().sub_(1.0)
    return loss, gradient.div_(batch)
