"""Critic-free advantages from a group of completions per prompt, and their policy loss.

Completions of one prompt sit in consecutive rows: ``[B]`` rewards are ``B / G`` groups of
``G = num_generations``. PPO's advantages (GAE over a value model) are in ``ops/rewards.py``.

* GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = r_i - mean(group)``, scaled by the group's
  standard deviation (``scale_rewards: group``), the whole batch's (``batch``, Dr. GRPO's
  advice against the per-group one) or not at all (``none``).
* RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean of the other G - 1 rewards of its group``.

A group whose rewards are all equal gets advantage 0 everywhere, never a NaN (the scale's
``1e-4`` is TRL's).
"""

from __future__ import annotations

import torch

SCALE_EPSILON = 1e-4
SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages ``[B]`` of rewards ``[B]`` in groups of ``group_size`` consecutive rows."""
    grouped = rewards.view(-1, group_size)  # [B / G, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    match scale:
        case "group":
            spread = grouped.std(dim=1, keepdim=True).expand_as(grouped).flatten() if group_size > 1 else None
        case "batch":
            spread = rewards.std() if rewards.numel() > 1 else None
        case "none":
            return centred
        case _:
            raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale!r}")
    return centred if spread is None else centred / (spread + SCALE_EPSILON)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages ``[B]``: each reward less the mean of its group's other rewards."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 completions per prompt")
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).flatten()


def normalized(values: torch.Tensor) -> torch.Tensor:
    """``values`` with mean 0 and standard deviation 1 over the batch (RLOO's
    ``normalize_advantages``)."""
    if values.numel() < 2:
        return values - values.mean()
    return (values - values.mean()) / (values.std() + SCALE_EPSILON)


def group_reward_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's reward standard deviation ``[B / G]`` (0 for a group of one)."""
    grouped = rewards.view(-1, group_size)
    return grouped.std(dim=1) if group_size > 1 else torch.zeros_like(grouped[:, 0])


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
    delta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with
    ``r = exp(log_ratio)`` (``[B, T]`` per token or ``[B, 1]`` per sequence) and ``A`` ``[B, 1]``;
    ``delta`` caps the unclipped ratio too (two-sided GRPO). Returns ``(loss, low_clipped,
    high_clipped)``: where the clip bound the ratio below (for ``A < 0``) or above (``A > 0``)."""
    ratio = torch.exp(log_ratio)
    bounded = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    loss = -torch.minimum(unclipped * advantages, bounded * advantages)
    return loss, (ratio < 1.0 - epsilon_low) & (advantages < 0), (ratio > 1.0 + epsilon_high) & (advantages > 0)


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *, step_sequences: int, step_tokens: int,
    local_tokens: int, processes: int, max_completion_length: int,
) -> torch.Tensor:
    """This micro-batch's part of an optimizer step's loss, from per-token losses ``[B, T]``
    (``mask``: kept tokens), so that the parts of every micro-batch and process add up to:

    * ``grpo``: the mean over the step's sequences of each sequence's token mean;
    * ``dapo``: the mean over the step's tokens (all processes');
    * ``bnpo``: the mean over this process's tokens of the step, averaged over processes (TRL:
      over the tokens of the local batch);
    * ``dr_grpo``: the sum over the step's tokens / (its sequences x ``max_completion_length``).
    """
    mask = mask.to(per_token.dtype)
    summed = (per_token * mask).sum(-1)  # [B]
    match loss_type:
        case "grpo":
            return (summed / mask.sum(-1).clamp(min=1.0)).sum() / step_sequences
        case "dapo":
            return summed.sum() / max(step_tokens, 1)
        case "bnpo":
            return summed.sum() / (max(local_tokens, 1) * processes)
        case "dr_grpo":
            return summed.sum() / (step_sequences * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
