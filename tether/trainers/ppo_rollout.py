"""The rollout half of an RL update (PPO, GRPO, RLOO): sample responses to prompts, then score them.

    prompts -> left-pad -> generate (split the response off by hand)   rollout/generate.py
            -> where each response ends (stop token or length limit)   ops/
            -> score: reward model on the postprocessed query_response,
               or a reward function on the decoded texts;
               then the missing-stop penalty                            scoring/reward.py
            -> old logprobs, reference logprobs, values (each if used)  models/forward.py
            -> Rollout                                                  rollout/batch.py

``RolloutMaker`` holds the models and sampling settings this needs; ``PPOTrainer`` builds one
and hands its ``sample`` / ``score`` / ``rollout`` / ``evaluate`` / ``decode`` through, and so do
the critic-free trainers (``grpo.py``: no critic, and no reference when ``beta`` is 0).
Advantages and losses stay with each trainer; the update loop is ``rl_update.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tether.config import CriticFreeConfig, PPOConfig
from tether.data import Prompts, is_chat, left_pad
from tether.data.sequences import right_pad
from tether.errors import ConfigError
from tether.models.forward import critic_values, policy_logprobs
from tether.ops import ended_on_stop, lengths_to_mask, response_lengths
from tether.rollout.batch import Rollout
from tether.rollout.generate import generate_responses
from tether.scoring.functions import combine
from tether.scoring.sources import RewardSource
from tether.scoring.reward import apply_missing_stop_penalty, get_reward, reward_model_sequences
from tether.trainers.common import autocast, clock
from tether.trainers.parallel import Parallel


def resolve_stop_token_ids(
    stop_token_id: int | list[int] | None, stop_token: str | None, tokenizer, policy
) -> list[int]:
    """The ids that end a response: ``stop_token_id``, EOS for ``stop_token: eos``, else the
    model's own EOS ids (ppo-details fix 3: any of several ids terminates)."""
    if stop_token_id is not None:
        ids = stop_token_id if isinstance(stop_token_id, list) else [stop_token_id]
    elif stop_token == "eos":
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    else:
        own = policy.generation_config.eos_token_id
        own = own if isinstance(own, list) else [own]
        ids = [i for i in [*own, tokenizer.eos_token_id] if i is not None]
    ids = list(dict.fromkeys(int(i) for i in ids))
    if not ids:
        raise ConfigError("no stop token: the tokenizer has no EOS; set stop_token_id")
    vocab = len(tokenizer)
    for token_id in ids:
        if not 0 <= token_id < vocab:
            raise ConfigError(f"stop_token_id {token_id} is outside the tokenizer's vocabulary of {vocab}")
    return ids


_CHUNK_KEYS = ("queries", "query_mask", "responses", "response_mask")


class RolloutMaker:
    """Samples responses with the policy and scores them with the reward, the reference and
    the critic, in chunks of ``local_rollout_forward_batch_size`` rows.

    ``policy`` is the bare policy (switched to eval mode for sampling); ``policy_forward``,
    ``critic``, ``reference`` and ``reward_model`` are what forward passes run through (the
    engine's wrappers in several processes). ``reference`` None: the policy is a LoRA model
    and the reference is the policy with its adapter disabled.
    """

    def __init__(
        self,
        config: PPOConfig | CriticFreeConfig,
        tokenizer,
        parallel: Parallel,
        device: torch.device,
        *,
        policy: nn.Module,
        policy_forward: nn.Module,
        critic: nn.Module | None,
        reference: nn.Module | None,
        use_reference: bool = True,
        unscored_allowed: bool = False,
        rewards: list[RewardSource],
        reward_weights: list[float] | None = None,
        sampling,
        temperature: float,
        stop_token_ids: list[int],
        pad_token_id: int,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.device = device
        self.policy = policy
        self.policy_forward = policy_forward
        self.critic = critic
        self.reference = reference
        self.use_reference = use_reference  # False: no KL to a reference (beta 0), no reference pass
        self.unscored_allowed = unscored_allowed  # a completion no reward function scored: NaN, not refused
        self.context: dict = {}  # more keyword arguments for reward functions (GRPO's trainer_state, ...)
        # torch_compile: decoding steps compiled too (``generate_responses``)
        self._compile_with = (config.torch_compile_backend, config.torch_compile_mode) if config.torch_compile else None
        self.rewards = rewards
        self.reward_weights = reward_weights or [1.0] * len(rewards)
        self.reward_parts: torch.Tensor | None = None  # [B, F]: each reward's scores of the last batch (NaN: None)
        self.sampling = sampling
        self.temperature = temperature
        self.stop_token_ids = stop_token_ids
        self.pad_token_id = pad_token_id

    def _autocast(self):
        return autocast(self.device, self.config.bf16, self.config.fp16)

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[list[int]], chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
        """Left-pad the prompts, sample responses (``chunk_rows`` at a time: default
        ``local_rollout_forward_batch_size``), and find where each response ends."""
        queries, query_mask = left_pad(list(prompt_ids), self.pad_token_id)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        self.policy.eval()
        with self._autocast(), self.parallel.gathered_for_generation(self.policy_forward):
            responses, logprobs, _ = generate_responses(
                self.policy, queries, query_mask, self.sampling, chunk_rows or self.config.local_rollout_forward_batch_size,
                cuda_graphs=self.config.cuda_graphs, compile_with=self._compile_with,
            )
        lengths = response_lengths(responses, self.stop_token_ids)  # [B]
        return {
            "queries": queries,
            "query_mask": query_mask,
            "responses": responses,
            "response_mask": lengths_to_mask(lengths, responses.size(1)),  # [B, T]
            "lengths": lengths,
            "terminated": ended_on_stop(responses, lengths, self.stop_token_ids),  # [B]
            "sampling_logprobs": logprobs,  # [B, T]
        }

    @torch.no_grad()
    def score(self, samples: dict[str, torch.Tensor], prompts: Prompts | None = None) -> torch.Tensor:
        """Scores ``[B]`` of sampled responses: every reward's (``reward_parts``), summed with
        ``reward_weights`` (a function's ``None`` left out), then the missing-stop penalty.
        ``prompts``: the rows' ``Prompts`` (their values as the dataset held them and their other
        columns), for reward functions and a reward model with its own tokenizer; without them
        the prompt ids are decoded."""
        parts = []
        for source in self.rewards:
            if source.function is not None:
                parts.append(source.function(*self.function_inputs(prompts, **texts_of(samples))).to(self.device))
            elif source.tokenizer is not None:
                parts.append(self._own_tokenizer_scores(source, samples, prompts))
            else:
                parts.append(self._model_scores(source, samples))
        self.reward_parts = torch.stack(parts, dim=1)  # [B, F]
        names = [source.name for source in self.rewards]
        scores = combine(parts, self.reward_weights, names, self.unscored_allowed)
        return apply_missing_stop_penalty(scores.float(), samples["terminated"], self.config.missing_eos_penalty)

    @torch.no_grad()
    def rollout(self, prompts: Prompts | Sequence[list[int]], timing: dict[str, float]) -> Rollout:
        """Sample responses to ``prompts`` (``Prompts``, or token ids alone) and score them (no
        advantages yet); the seconds spent generating and scoring go into ``timing``.

        In full precision the old logprobs are the ones the sampler computed (ppo-details 10:
        equal to a forward pass to fp32 rounding, one forward pass cheaper). Under bf16 a cached
        decode and a full forward disagree by more than that (pitfall P3), so the old logprobs
        come from a forward pass like the ones the update makes.
        """
        config = self.config
        start = clock(self.device)
        prompts = prompts if isinstance(prompts, Prompts) else _bare(prompts)
        samples = self.sample(prompts.ids)
        sampling_logprobs = samples.pop("sampling_logprobs")
        score_start = clock(self.device)
        timing["timing/generate"] = score_start - start

        scores = self.score(samples, prompts)
        recompute = config.bf16 or config.fp16
        logprobs, ref_logprobs, values = [], [], []
        for start_row in range(0, samples["queries"].size(0), config.local_rollout_forward_batch_size):
            rows = slice(start_row, start_row + config.local_rollout_forward_batch_size)
            chunk = [samples[k][rows] for k in _CHUNK_KEYS]
            with self._autocast():
                if recompute:
                    logprobs.append(
                        policy_logprobs(self.policy_forward, *chunk, self.temperature, config.logprob_chunk_size)[0]
                    )
                if self.use_reference:
                    ref_logprobs.append(self.reference_logprobs(*chunk))
                if self.critic is not None:
                    values.append(critic_values(self.critic, *chunk))
        timing["timing/score"] = clock(self.device) - score_start

        response_mask = samples["response_mask"]

        def kept(chunks):  # tail positions hold numbers nobody may read: make them exactly 0
            values = torch.cat(chunks).float()
            return torch.where(response_mask, values, torch.zeros_like(values))

        return Rollout(
            **samples,
            logprobs=kept(logprobs if recompute else [sampling_logprobs]),
            ref_logprobs=kept(ref_logprobs) if ref_logprobs else None,
            values=kept(values) if values else None,
            scores=scores,
            reward_parts=self.reward_parts.float(),
        )

    @torch.no_grad()
    def evaluate(self, prompts: Prompts | Sequence[list[int]]) -> tuple[dict[str, float], list[dict]]:
        """Sample and score responses to ``prompts``: ``eval/*`` metrics and the sample rows
        (prompt, response, score), in prompt order. Several processes split the prompts (each
        samples its share) and every process returns the same global figures and rows."""
        parallel = self.parallel
        prompts = prompts if isinstance(prompts, Prompts) else _bare(prompts)
        rows, counted = parallel.my_share(list(range(len(prompts))))
        mine = prompts.take(rows)
        samples = self.sample(mine.ids, self.config.per_device_eval_batch_size)
        scores = self.score(samples, mine)
        real = torch.tensor(counted, device=self.device)
        scored = real & ~torch.isnan(scores)  # a completion no reward function scored counts in no mean score
        sums = torch.stack([
            scores[scored].sum(), scored.float().sum(), samples["lengths"][real].float().sum(),
            samples["terminated"][real].float().sum(), real.float().sum(),
        ])
        score_sum, scored_count, length_sum, terminated, count = parallel.sum_over_processes(sums).tolist()
        metrics = {
            "eval/scores": score_sum / scored_count if scored_count else math.nan,
            "eval/response_length": length_sum / count,
            "eval/num_eos_tokens": int(terminated),
        }
        shown = self.sample_rows(mine, scores, **texts_of(samples))
        return metrics, parallel.gather_shares([row for row, keep in zip(shown, counted) if keep])

    def function_inputs(self, prompts: Prompts | None, queries, query_mask, responses, lengths, terminated):
        """What a reward or metric function is called with: ``(prompts, completions,
        completion_ids, columns)`` (see ``tether.scoring.functions``), the prompts as the dataset
        held them (decoded from the ids when only ids were given); ``columns`` holds the rows'
        other columns and the trainer's ``context`` (GRPO's ``trainer_state``, ...)."""
        prompt_texts, texts = self.decode(queries, query_mask, responses, lengths, terminated)
        values = prompts.values if prompts is not None and prompts.values is not None else prompt_texts
        completions = [[{"role": "assistant", "content": t}] if is_chat(p) else t for p, t in zip(values, texts)]
        completion_ids = [row[:n].tolist() for row, n in zip(responses, lengths.tolist())]
        columns = dict(prompts.columns) if prompts is not None else {}
        return list(values), completions, completion_ids, {**columns, **self.context}

    def sample_rows(self, prompts: Prompts | None, scores: torch.Tensor, **texts) -> list[dict]:
        """Rows of a sample table and ``samples.jsonl``: the prompt and response a reward
        function sees (the prompt as the dataset held it) and the score."""
        values, completions, _, _ = self.function_inputs(prompts, **texts)
        responses = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [{"prompt": p, "response": r, "score": s} for p, r, s in zip(values, responses, scores.tolist())]

    def reference_logprobs(self, *chunk) -> torch.Tensor:
        """Reference logprobs ``[B, T]`` of one chunk; a LoRA policy's are its own with the
        adapter disabled."""
        if self.reference is not None:
            return policy_logprobs(self.reference, *chunk, self.temperature, self.config.logprob_chunk_size)[0]
        with self.policy.disable_adapter():
            return policy_logprobs(self.policy_forward, *chunk, self.temperature, self.config.logprob_chunk_size)[0]

    def _model_scores(self, source: RewardSource, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """A reward model on the postprocessed query_response: cut after the stop token, the
        rest padded and masked out, score read at the terminating token (seed note 3); in chunks
        of ``local_rollout_forward_batch_size`` rows."""
        scores, chunk_rows = [], self.config.local_rollout_forward_batch_size
        for start in range(0, samples["queries"].size(0), chunk_rows):
            queries, query_mask, responses, response_mask = (
                samples[k][start : start + chunk_rows] for k in _CHUNK_KEYS
            )
            postprocessed = torch.where(response_mask, responses, torch.full_like(responses, self.pad_token_id))
            query_responses = torch.cat([queries, postprocessed], dim=1)
            attention_mask = torch.cat([query_mask, response_mask], dim=1)
            with self._autocast():
                _, chunk, _ = get_reward(source.forward, query_responses, self.pad_token_id, queries.size(1), attention_mask)
            scores.append(chunk.float())
        return torch.cat(scores)

    def _own_tokenizer_scores(
        self, source: RewardSource, samples: dict[str, torch.Tensor], prompts: Prompts | None
    ) -> torch.Tensor:
        """A reward model on prompt + response text re-encoded by its own tokenizer (see
        ``reward_model_sequences``), read at each row's last real token."""
        prompt_texts, responses = self.decode(**texts_of(samples))
        values = prompts.values if prompts is not None and prompts.values is not None else prompt_texts
        # text and chats as the dataset held them; a prompt of policy ids only as its text
        prompts = [v if isinstance(v, str) or is_chat(v) else t for v, t in zip(values, prompt_texts)]
        sequences = reward_model_sequences(source.tokenizer, prompts, responses, samples["terminated"].tolist())
        pad = source.tokenizer.pad_token_id
        scores, chunk_rows = [], self.config.local_rollout_forward_batch_size
        for start in range(0, len(sequences), chunk_rows):
            ids, mask = right_pad(sequences[start : start + chunk_rows], pad)
            with self._autocast():
                _, chunk, _ = get_reward(source.forward, ids.to(self.device), pad, 0, mask.to(self.device))
            scores.append(chunk.float())
        return torch.cat(scores)

    def decode(self, queries, query_mask, responses, lengths, terminated) -> tuple[list[str], list[str]]:
        """Prompt and response texts; the response without its stop token."""
        prompts = [row[mask].tolist() for row, mask in zip(queries, query_mask)]
        kept = (lengths - terminated.long()).tolist()
        texts = [row[:n].tolist() for row, n in zip(responses, kept)]
        return (
            self.tokenizer.batch_decode(prompts, skip_special_tokens=True),
            self.tokenizer.batch_decode(texts, skip_special_tokens=True),
        )


def texts_of(samples) -> dict[str, torch.Tensor]:
    """The tensors decoding needs, from a samples dict or a ``Rollout``."""
    names = ("queries", "query_mask", "responses", "lengths", "terminated")
    return {name: samples[name] if isinstance(samples, dict) else getattr(samples, name) for name in names}


def _bare(prompt_ids: Sequence[list[int]]) -> Prompts:
    """Prompts given as token ids alone: no values (decoded when needed), no other columns."""
    return Prompts([list(ids) for ids in prompt_ids], None, {})
