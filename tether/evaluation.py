"""Sampling and scoring a policy outside training, on the path training takes.

``sample_and_score`` samples one completion per prompt with the trainers' own decoding loop and
scores it with the trainers' own reward path (``RolloutMaker``): reward models on the sampled
tokens, reward functions on the decoded text, each reward kept apart; with a ``reference``,
each completion's KL to it. The demo evaluates every stage with it, so the figures of its
report are the numbers the trainers optimise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tether.data import Prompts
from tether.logging import console
from tether.trainers.common import resolve_device


@dataclass
class Scored:
    """One completion per prompt and its figures; ``scores[name]`` per reward (NaN: None)."""

    prompts: list
    completions: list[str]
    scores: dict[str, list[float]] = field(default_factory=dict)
    kl: list[float] | None = None  # sum over the completion of log pi - log pi_ref (k1), per completion
    lengths: list[int] = field(default_factory=list)  # completion tokens, stop token included

    def mean(self, name: str) -> float:
        values = [v for v in self.scores[name] if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def sample_and_score(
    policy: nn.Module,
    tokenizer,
    prompts: list,
    rewards: dict[str, object],
    *,
    reference: nn.Module | None = None,
    max_completion_length: int,
    temperature: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 128,
) -> Scored:
    """Sample a completion for each of ``prompts`` (text, chat messages or token ids) from
    ``policy`` and score it by every reward of ``rewards`` (name: a reward model, a callable or
    a ``module:function`` / model path, as ``reward_funcs`` takes them). ``reference``: also the
    KL of each completion to that model. The same ``seed`` samples the same completions."""
    from tether.config import GRPOConfig
    from tether.data import load_prompts
    from tether.models.loading import ensure_pad_token
    from tether.rollout.generate import sampling_config, sampling_temperature
    from tether.scoring.sources import resolve_reward
    from tether.trainers.parallel import Parallel
    from tether.trainers.ppo_rollout import RolloutMaker, resolve_stop_token_ids, texts_of

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    config = GRPOConfig(
        device=str(device), max_completion_length=max_completion_length, temperature=temperature,
        local_rollout_forward_batch_size=batch_size, per_device_eval_batch_size=batch_size, report_to=[],
        num_generations=1, per_device_train_batch_size=1,
    )
    say = lambda message: console.print(f"[yellow]{message}")  # noqa: E731
    ensure_pad_token(tokenizer, warn=say)
    data: Prompts = load_prompts(list(prompts), tokenizer)
    sources = [resolve_reward(spec, config, tokenizer, data.values, None, say) for spec in rewards.values()]
    for source, name in zip(sources, rewards):
        source.name = name
        if source.model is not None:
            source.forward = source.model.to(device)
    stop_ids = resolve_stop_token_ids(None, None, tokenizer, policy)
    policy.eval().to(device)
    if reference is not None:
        reference.eval().to(device)
    maker = RolloutMaker(
        config, tokenizer, Parallel.create(config), device, policy=policy, policy_forward=policy, critic=None,
        reference=reference, use_reference=reference is not None, unscored_allowed=True, rewards=sources,
        sampling=sampling_config(max_completion_length, temperature, stop_ids, tokenizer.pad_token_id),
        temperature=sampling_temperature(temperature), stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        rollout = maker.rollout(data, {})
    texts = texts_of(rollout)
    rows = maker.sample_rows(data, rollout.scores, **texts)
    kl = None
    if reference is not None:
        log_ratio = (rollout.logprobs - rollout.ref_logprobs).masked_fill(~rollout.response_mask, 0.0)
        kl = log_ratio.sum(1).tolist()
    parts = rollout.reward_parts.T.tolist()
    return Scored(
        prompts=list(data.values), completions=[row["response"] for row in rows],
        scores={name: part for name, part in zip(rewards, parts)}, kl=kl, lengths=rollout.lengths.tolist(),
    )
