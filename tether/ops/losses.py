"""Per-token PPO losses and the pairwise reward-model loss.

The PPO losses return per-token tensors; the trainer sums them over kept tokens and divides
by the minibatch's kept-token count, so a minibatch's loss does not depend on how it is
split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token.

    ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`` with ``r = exp(logprobs - old_logprobs)``.
    Returns ``(loss [B, T], clipped [B, T] bool, ratio [B, T])``; a clipped token passes no
    gradient to ``logprobs``.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped, ratio


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token: ``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)``.

    Returns ``(loss [B, T], clipped [B, T] bool)``.
    """
    # clamp(v, lo, hi) returns v itself inside the range, so an unclipped token is never counted
    # as clipped through rounding (old + clamp(v - old) need not equal v exactly)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def bradley_terry_losses(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(r_chosen - r_rejected)`` per pair; invariant to a shift of both scores."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The mean of ``bradley_terry_losses``."""
    return bradley_terry_losses(chosen_scores, rejected_scores).mean()
