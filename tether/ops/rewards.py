"""Reward shaping, advantages and returns. Per-token tensors are ``[B, T]`` over response tokens."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) for tokens sampled from the policy.

    k1 = log p - log q is unbiased but can be negative per token; k3 = (r - 1) - log r with
    r = q / p is unbiased and never negative; k2 = (log r)^2 / 2 is biased but low-variance.
    Source: Schulman, "Approximating KL divergence" (2020).
    """
    log_ratio = ref_logprobs - logprobs  # log(q / p)  [B, T]
    match estimator:
        case "k1":
            return -log_ratio
        case "k2":
            return 0.5 * log_ratio**2
        case "k3":
            return torch.expm1(log_ratio) - log_ratio
        case _:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` on every kept token, plus the score on the last one.

    The score is credited to the terminating token (index ``lengths - 1``): the stop token,
    or the last token of a response cut by the length limit. TRL and the N+ code credit the
    slot after it (ppo-details 22); tether does not train on positions after the episode.
    Returns ``(rewards, non_score_reward)``, both ``[B, T]`` and zero where ``mask`` is False.
    """
    non_score_reward = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))  # [B, T]
    last = (lengths - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
    credited = (scores * (lengths > 0)).unsqueeze(1).to(non_score_reward.dtype)
    rewards = non_score_reward.scatter_add(1, last, credited)
    return rewards, non_score_reward


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    ``values[:, t]`` is the critic's estimate before token ``t`` is emitted. The state after
    the last kept token is terminal (value 0), so nothing is bootstrapped past the end, and
    masked positions get advantage and return 0. Returns ``(advantages, returns)``, ``[B, T]``.
    """
    keep = mask.bool()
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    values = torch.where(keep, values, torch.zeros_like(values))
    width = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


class AdaptiveKLController:
    """Proportional controller that moves ``kl_coef`` towards a target KL per sequence.

    ``coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)``
    (Ziegler et al. 2019, as in lm-human-preferences).
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
