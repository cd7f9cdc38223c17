"""Critic-free advantages from a group of completions per prompt, and their policy loss.

Completions of one prompt sit in consecutive rows: ``[B]`` rewards are ``B / G`` groups of
``G = num_generations``. PPO's advantages (GAE over a value model) are in ``ops/rewards.py``.

* GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = r_i - mean(group)``, scaled by the group's
  standard deviation (``scale_rewards: group``), the whole batch's (``batch``, Dr. GRPO's
  advice against the per-group one) or not at all (``none``).
* RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean of the other G - 1 rewards of its group``.

A group whose rewards are all equal gets advantage 0 everywhere, never a NaN (the scale's
``1e-4`` is TRL's). A completion no reward function scored (reward NaN) is left out of its
group's statistics and gets advantage 0.
"""

from __future__ import annotations

import torch

SCALE_EPSILON = 1e-4
SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def nan_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The (Bessel-corrected) standard deviation of the values that are not NaN; 0 where fewer
    than two are."""
    kept = ~torch.isnan(values)
    count = kept.sum() if dim is None else kept.sum(dim=dim, keepdim=True)
    mean = torch.nanmean(values) if dim is None else torch.nanmean(values, dim=dim, keepdim=True)
    squares = torch.where(kept, (values - mean) ** 2, torch.zeros_like(values))
    total = squares.sum() if dim is None else squares.sum(dim=dim, keepdim=True)
    std = torch.where(count > 1, (total / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(total))
    return std if dim is None or keepdim else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages ``[B]`` of rewards ``[B]`` in groups of ``group_size`` consecutive rows.

    A NaN reward (no reward function scored that completion) is left out of its group's mean
    and spread, and its advantage is 0."""
    grouped = rewards.view(-1, group_size)  # [B / G, G]
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).flatten()
    match scale:
        case "group":
            spread = nan_std(grouped, dim=1, keepdim=True).expand_as(grouped).flatten()
        case "batch":
            spread = nan_std(rewards)
        case "none":
            spread = None
        case _:
            raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale!r}")
    advantages = centred if spread is None else centred / (spread + SCALE_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0)


def decoupled_group_advantages(parts: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's advantages ``[B]`` with ``multi_objective_aggregation: normalize_then_sum`` (GDPO):
    each reward's scores ``parts [B, F]`` are normalised within their group, summed with
    ``weights [F]``, and the sums normalised over the batch. NaN (no score) as in
    ``group_advantages``."""
    grouped = parts.view(-1, group_size, parts.size(1))  # [B / G, G, F]
    scaled = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
        nan_std(grouped, dim=1, keepdim=True) + SCALE_EPSILON
    )
    summed = (scaled.reshape(parts.shape) * weights).nansum(dim=1)
    summed = torch.where(torch.isnan(parts).all(dim=1), torch.full_like(summed, float("nan")), summed)
    return normalized(summed)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages ``[B]``: each reward less the mean of its group's other rewards.

    A NaN reward is left out of the others' means and gets advantage 0, as does the only scored
    completion of a group (it has no others)."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 completions per prompt")
    grouped = rewards.view(-1, group_size)
    scored = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    others = (grouped.nansum(dim=1, keepdim=True) - grouped) / (scored - 1)  # NaN for 0 / 0
    return torch.nan_to_num((grouped - others).flatten(), nan=0.0, posinf=0.0, neginf=0.0)


def normalized(values: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` with mean 0 and standard deviation 1 over the batch's kept rows (``kept``:
    True to keep; default: those not NaN), the others 0 (RLOO's ``normalize_advantages``)."""
    kept = ~torch.isnan(values) if kept is None else kept
    masked = torch.where(kept, values, torch.full_like(values, float("nan")))
    scaled = (masked - torch.nanmean(masked)) / (nan_std(masked) + SCALE_EPSILON)
    return torch.nan_to_num(scaled, nan=0.0)


def group_reward_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's reward standard deviation ``[B / G]`` (NaN rewards left out; 0 for a
    group with fewer than two scored)."""
    return nan_std(rewards.view(-1, group_size), dim=1)


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
