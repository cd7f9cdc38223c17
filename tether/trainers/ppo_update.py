"""The update half of a PPO step: the loss of one micro-batch and the update's metrics.

``PPOTrainer.optimise`` (in ``ppo.py``) runs the loop — epochs x minibatches x micro-batches,
one optimizer step per minibatch — and the forward passes; ``value_loss`` and ``policy_loss``
turn a micro-batch's new values, logprobs and entropy into its two losses (the maths is in
``ops/losses.py``), and ``UpdateTotals`` adds up what the update reports.
"""

from __future__ import annotations

import torch

from tether.config import PPOConfig
from tether.ops import clipped_policy_loss, clipped_value_loss, masked_sum
from tether.rollout.batch import Rollout
from tether.trainers.parallel import Parallel


class UpdateTotals:
    """Token-weighted sums over one update's micro-batches, turned into TRL-named metrics."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # 0-d tensors on the training device: no sync per add
        self.tokens: torch.Tensor | float = 0.0
        self.steps = 0
        self.skipped_steps = 0

    def add(self, mask: torch.Tensor, **per_token: torch.Tensor) -> None:
        self.tokens = self.tokens + mask.sum()
        with torch.no_grad():
            for name, value in per_token.items():
                self.sums[name] = self.sums.get(name, 0.0) + masked_sum(value.float(), mask)

    def metrics(self, parallel: Parallel) -> dict[str, float]:
        """Token-weighted means over every process's micro-batches (one all-reduce)."""
        sums, tokens = self.sums, self.tokens
        if parallel.distributed:
            names = sorted(sums)  # every process added the same names
            totals = torch.stack([torch.as_tensor(tokens, dtype=torch.float32, device=parallel.device)]
                                 + [sums[name].float() for name in names])
            totals = parallel.sum_over_processes(totals)
            tokens, sums = totals[0], dict(zip(names, totals[1:]))
        tokens = max(float(tokens), 1.0)
        mean = {name: float(total) / tokens for name, total in sums.items()}
        return {
            "policy/approxkl_avg": mean.get("approxkl", 0.0),
            "policy/clipfrac_avg": mean.get("pg_clipped", 0.0),
            "loss/policy_avg": mean.get("pg_loss", 0.0),
            "loss/value_avg": mean.get("vf_loss", 0.0),
            "val/clipfrac_avg": mean.get("vf_clipped", 0.0),
            "policy/entropy_avg": mean.get("entropy", 0.0),
            "val/ratio": mean.get("ratio", 1.0),
            # token-level variance over the update (TRL: variance of micro-batch means, which
            # depends on the micro-batch split)
            "val/ratio_var": max(mean.get("ratio_sq", 1.0) - mean.get("ratio", 1.0) ** 2, 0.0),
            "train/optimizer_steps": self.steps,
            "train/skipped_steps": self.skipped_steps,
        }


def value_loss(micro: Rollout, values: torch.Tensor, config: PPOConfig) -> tuple[torch.Tensor, dict]:
    """``vf_coef`` x the clipped value loss of one micro-batch, summed over its kept tokens (the
    caller divides by the minibatch's token count), and its per-token numbers for ``totals``.
    ``values`` ``[B, T]`` are the current value model's on ``micro``."""
    vf_loss, vf_clipped = clipped_value_loss(values, micro.values, micro.returns, config.cliprange_value)
    loss = config.vf_coef * masked_sum(vf_loss, micro.response_mask.float())
    return loss, {"vf_loss": vf_loss.detach(), "vf_clipped": vf_clipped.float()}


def policy_loss(
    micro: Rollout, logprobs: torch.Tensor, entropy: torch.Tensor, config: PPOConfig
) -> tuple[torch.Tensor, dict]:
    """The clipped policy loss of one micro-batch less ``entropy_coef`` x entropy, summed over
    its kept tokens, and its per-token numbers for ``totals``. ``logprobs`` and ``entropy``
    ``[B, T]`` are the current policy's on ``micro``."""
    mask = micro.response_mask.float()
    pg_loss, pg_clipped, ratio = clipped_policy_loss(logprobs, micro.logprobs, micro.advantages, config.cliprange)
    loss = masked_sum(pg_loss, mask)
    if config.entropy_coef:
        loss = loss - config.entropy_coef * masked_sum(entropy, mask)
    with torch.no_grad():
        numbers = {
            "pg_loss": pg_loss,
            "pg_clipped": pg_clipped.float(),
            "approxkl": 0.5 * (logprobs - micro.logprobs) ** 2,
            "entropy": entropy,
            "ratio": ratio,
            "ratio_sq": ratio**2,
        }
    return loss, numbers
