"""PPO for Hugging Face causal language models, driven by a reward model or a reward function.

One update, as ``step()`` reads:

    prompts -> generate (split the response off by hand)          ppo_rollout.py, rollout/generate.py
            -> logprobs, reference logprobs, values on query_response, score on the
               postprocessed query_response                       ppo_rollout.py, models/forward.py, scoring/
            -> rewards: -kl_coef * KL per token, score on the terminating token
            -> advantages: GAE, whitening                          ops/rewards.py, ops/stats.py
            -> num_ppo_epochs x num_mini_batches optimizer steps   ppo_update.py, ops/losses.py
            -> metrics

The trainer's files:

    ppo.py          PPOTrainer: set-up, step(), advantages, the update loop (epochs x
                    minibatches x micro-batches, one optimizer step per minibatch), train(),
                    checkpoints, saving
    ppo_rollout.py  RolloutMaker: sample, score, rollout, evaluate, decode (the trainer's
                    methods of those names hand over to it); resolve_stop_token_ids
    ppo_update.py   value_loss and policy_loss (one micro-batch's losses from the new values,
                    logprobs and entropy) and UpdateTotals (the update's token-weighted metrics)

Several processes (``accelerate launch`` / ``torchrun``): every process rolls out its shard of
one global batch, then the rollouts are gathered so that advantages, whitening and metrics
are computed over the global batch, and every minibatch is drawn from the global batch by
one permutation shared by all processes; each process trains on its equal part of it. The
update is therefore the same whatever the (per-device batch, accumulation, processes) split
(``tests/test_parallel.py``). LoRA through PEFT (``peft_config``; ``models/lora.py``).

Where tether departs from TRL, the line says so and names the detail in
``shared/spec/ppo-details.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from tether.config import PPOConfig, config_values, save_config
from tether.data import Prompts, PromptSampler, prompt_text
from tether.checkpoint import (
    Interrupted,
    StopSignals,
    check_progress,
    check_resumed_config,
    prepare_output_dir,
    resumed_logs,
    say_extension,
    unlogged_steps,
)
from tether.errors import ConfigError, DataError, RewardError
from tether.logging import LoggedRows, MetricsFile, Reporters, console, progress_bar, sample_table
from tether.models.forward import Actor, Critic, critic_values, policy_logprobs
from tether.models.loading import (
    check_scalar_model,
    disable_dropout,
    enable_gradient_checkpointing,
    ensure_pad_token,
    is_causal_lm,
    load_scalar_backbone,
    value_model_from_policy,
    zero_head,
)
from tether.models.lora import apply_lora, is_peft_model, merged_copy, policy_and_reference
from tether.ops import AdaptiveKLController, gae, kl_estimate, masked_whiten, shape_rewards
from tether.rollout.batch import Rollout
from tether.rollout.generate import sampling_config, sampling_temperature
from tether.scoring.functions import MetricFunction, import_reward_function
from tether.scoring.sources import resolve_reward
from tether.trainers.common import (
    compile_trained,
    Cadence,
    autocast,
    clock,
    make_optimizer,
    make_scheduler,
    seed_everything,
    stop_if_nonfinite,
    training_device,
)
from tether.trainers.parallel import Parallel, gather_rollout, launched_processes
from tether.trainers.ppo_rollout import RolloutMaker, resolve_stop_token_ids, texts_of
from tether.trainers.ppo_update import UpdateTotals, policy_loss, value_loss
from tether.trainers.rl_setup import check_and_place, load_prompt_sets, refuse_column_clashes
from tether.trainers.rl_update import train_on_rollout
from tether.trainers.trl_calls import TRLAttributes, load_causal_model, takes_trl_names


def refuse_shared_models(**models: nn.Module | None) -> None:
    """One object given in two roles would be trained (or frozen) as both: the value model
    trained as the reward would move the reward; the policy as its own reference, the KL."""
    given = [(name, model) for name, model in models.items() if model is not None]
    for index, (name, model) in enumerate(given):
        for other, other_model in given[index + 1 :]:
            if model is other_model:
                raise ConfigError(
                    f"{other} is the {name} itself, so training would change both; pass a separate copy "
                    f"(copy.deepcopy) as {other}, or leave {other} out for tether's default"
                )


def load_value_model(path: str, config: PPOConfig) -> nn.Module:
    """A value model from any checkpoint (``value_model_path``, or a TRL call's ``value_model``):
    a causal LM gets a fresh scalar head, zeros, as TRL's value models do."""
    options = config.model_options(own_revision=False)
    options.pop("quantization_config", None)  # only the policy is quantized
    return load_scalar_backbone(path, "value model", zero_head, "zeros",
                                say=lambda message: console.print(f"note: {message}"), **options)


class PPOTrainer(TRLAttributes):
    """PPO with a policy, a frozen reference, a value model and a reward model or function.

    ``reward`` is an ``AutoModelForSequenceClassification`` with one label, a callable
    ``fn(prompts: list[str], responses: list[str]) -> list[float]`` (decoded text, stop token
    removed), or a string naming either (a model path or ``module:function``).
    """

    config_class = PPOConfig
    load_trl_model = staticmethod(load_causal_model)
    trl_scalar_models = ("value_model",)  # may be a path too (a TRL call gives a model)
    load_trl_value_model = staticmethod(load_value_model)
    streams = True  # prompts may come as a streaming dataset

    @takes_trl_names("policy", "ref_policy", model="policy", ref_model="ref_policy", reward_model="reward")
    def __init__(
        self,
        config: PPOConfig,
        tokenizer,
        policy: nn.Module,
        reward: nn.Module | Callable | str,
        train_dataset,
        ref_policy: nn.Module | None = None,
        value_model: nn.Module | None = None,
        eval_dataset=None,
        reward_tokenizer=None,
    ):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer, warn=lambda message: console.print(f"[yellow]{message}"))
        seed_everything(config.seed)  # the same on every process: models and data are built alike

        self.train_set, self.eval_set = load_prompt_sets(config, tokenizer, train_dataset, eval_dataset)
        self.prompts = self.train_set.ids  # token ids of every prompt
        self.eval_prompts = self.eval_set.ids if self.eval_set is not None else None
        self.plan = config.batch_plan(len(self.prompts), launched_processes())
        # One optimizer step per minibatch, in micro-batches: Accelerate divides each loss by
        # its accumulation count (DeepSpeed steps after that many), and the loss undoes it.
        micro_batches = math.ceil(self.plan.local_mini_batch_size / self.plan.micro_batch_size)
        self.parallel = Parallel.create(config, micro_batches)
        if self.parallel.engine == "fsdp":
            self.parallel.refuse(
                "PPO trains its policy and value model with one optimizer, which Accelerate's FSDP neither prepares "
                "(FSDP2) nor checkpoints (FSDP1); shard PPO with DeepSpeed ZeRO-3: accelerate launch --config_file "
                "examples/accelerate/zero3.yaml"
            )
        self.device = training_device(
            config, self.parallel, warn=lambda message: console.print(f"[yellow]warning: {message}")
        )
        # Global batches, shuffled alike on every process under the global seed; each process
        # rolls out its own slice (ppo-details 11).
        self.sampler = PromptSampler(len(self.prompts), self.plan.batch_size, config.order_seed)
        if self.sampler.repeats:
            console.print(
                f"[yellow]note: the dataset has {len(self.prompts)} prompts, fewer than one rollout batch of "
                f"{self.plan.batch_size}: every batch holds each prompt at least once and draws some again"
            )
        self.stop_token_ids = resolve_stop_token_ids(config.stop_token_id, config.stop_token, tokenizer, policy)
        self.pad_token_id = tokenizer.pad_token_id
        self.sampling = sampling_config(config.response_length, config.temperature, self.stop_token_ids, self.pad_token_id)
        self.temperature = sampling_temperature(config.temperature)  # the value generation samples with

        say = lambda message: console.print(f"[yellow]{message}")  # noqa: E731
        self.reward = resolve_reward(reward, config, tokenizer, self.train_set.values, reward_tokenizer, say)
        self.reward_model, self.reward_fn, self.reward_tokenizer = self.reward.model, self.reward.function, self.reward.tokenizer
        self.metric_fn = MetricFunction(import_reward_function(config.metric_function)) if config.metric_function else None
        refuse_column_clashes(self.train_set.columns, (self.reward_fn, self.metric_fn))
        refuse_shared_models(policy=policy, ref_policy=ref_policy, reward=self.reward_model, value_model=value_model)
        if value_model is None:
            if self.reward_model is not None and self.reward_tokenizer is None:
                value_model = copy.deepcopy(self.reward_model)
            else:
                if self.reward_model is not None:  # a copy of it would read the policy's ids with its vocabulary
                    console.print(
                        "[yellow]note: the reward model has a tokenizer of its own, so the value model starts from "
                        "the policy's backbone with a fresh scalar head, not from the reward model"
                    )
                value_model = value_model_from_policy(merged_copy(policy) if is_peft_model(policy) else policy)
        if is_causal_lm(value_model):  # as TRL does: the same backbone with a one-label head
            console.print("note: value_model is a causal LM: the value model is its backbone with a fresh scalar head (zeros)")
            value_model = value_model_from_policy(value_model)
        check_scalar_model(value_model, "value model")
        self.policy, self.ref_policy = policy_and_reference(policy, ref_policy, config.lora_settings())
        self.value_model = value_model
        if config.value_model_peft:
            self.value_model = apply_lora(value_model, config.lora_settings(), "SEQ_CLS")
        else:
            self.value_model.requires_grad_(True)
        check_and_place(
            self._models(), tokenizer, self.device,
            longest=max(map(len, [*self.prompts, *(self.eval_prompts or [])])) + config.response_length,
            needs=f"the longest prompt + response_length={config.response_length} needs",
            fix="lower response_length or max_prompt_length",
            own_tokenizers={"reward model": self.reward_tokenizer} if self.reward_tokenizer is not None else {},
            warn=lambda message: console.print(f"[yellow]warning: {message}"),
        )
        self.dropout = disable_dropout(*self._models().values())  # undone after train(), and in saved configs
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy, config.gradient_checkpointing_kwargs)
            enable_gradient_checkpointing(self.value_model, config.gradient_checkpointing_kwargs)
        compile_trained(
            config, self.parallel.engine, self.policy, self.value_model, frozen=(self.ref_policy, self.reward_model)
        )

        optimizer = make_optimizer([*self.policy.parameters(), *self.value_model.parameters()], config)
        # What forward passes run through: the models themselves in one process, the engine's
        # wrappers (DDP, DeepSpeed, FSDP) in several. Saving and tests use the bare models.
        self._policy, self._critic, self.optimizer = self.parallel.prepare_trained(
            self.parallel.pass_module(Actor, self.policy), Critic(self.value_model), optimizer
        )
        frozen_rows = config.local_rollout_forward_batch_size
        self._ref = self.parallel.prepare_frozen(self.ref_policy, frozen_rows) if self.ref_policy is not None else None
        if self.reward_model is not None:
            self.reward.forward = self.parallel.prepare_frozen(self.reward_model, frozen_rows)
        self.rollout_maker = RolloutMaker(
            config, tokenizer, self.parallel, self.device,
            policy=self.policy, policy_forward=self._policy, critic=self._critic, reference=self._ref,
            rewards=[self.reward], sampling=self.sampling,
            temperature=self.temperature, stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id,
        )
        if self.parallel.distributed:  # different samples on every process (ppo-details 11)
            seed_everything(config.seed + 100003 * self.parallel.rank)
        self.scheduler = make_scheduler(self.optimizer, self.plan.num_total_batches, config)  # stepped per update
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.update = 0
        self.nonfinite_in_a_row = 0
        self.history: list[dict[str, float]] = []
        self.timing: dict[str, float] = {}
        self.output_dir = Path(config.output_dir)
        self.reporters = Reporters(config.report_to, self.output_dir, dataclasses.asdict(config))

    # --- set-up helpers -------------------------------------------------------------------
    def _models(self) -> dict[str, nn.Module]:
        models = {"policy": self.policy, "value model": self.value_model}
        if self.ref_policy is not None:
            models["reference policy"] = self.ref_policy
        if self.reward_model is not None:
            models["reward model"] = self.reward_model
        return models

    def _autocast(self):
        return autocast(self.device, self.config.bf16, self.config.fp16)

    @property
    def kl_coef(self) -> float:
        return self.kl_controller.value if self.config.adaptive_kl else self.config.kl_coef

    # --- rollout (ppo_rollout.py) ----------------------------------------------------------
    def sample(self, prompt_ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Left-pad the prompts, sample responses, and find where each response ends."""
        return self.rollout_maker.sample(prompt_ids)

    def score(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[B]`` of sampled responses, after the missing-stop penalty."""
        return self.rollout_maker.score(samples)

    def rollout(self, prompts: Prompts | Sequence[list[int]]) -> Rollout:
        """Sample responses to ``prompts`` (``Prompts``, or token ids alone) and score them (no
        advantages yet); the time it takes goes into ``timing``."""
        return self.rollout_maker.rollout(prompts, self.timing)

    def evaluate(self, max_prompts: int = 64) -> tuple[dict[str, float], list[dict]]:
        """Sample and score responses to the first ``max_prompts`` eval prompts.

        Returns ``eval/*`` metrics and the sample rows (prompt, response, score). Sampling draws
        from a generator of its own, seeded by (seed, update, process), so evaluating changes
        nothing that is trained and a resumed run evaluates as a straight one.
        """
        seed = (self.config.seed * 1_000_003 + self.update) * 1_009 + self.parallel.rank
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.rollout_maker.evaluate(self.eval_set.take(range(min(max_prompts, len(self.eval_set)))))

    def decode(self, queries, query_mask, responses, lengths, terminated) -> tuple[list[str], list[str]]:
        """Prompt and response texts; the response without its stop token."""
        return self.rollout_maker.decode(queries, query_mask, responses, lengths, terminated)

    def _reference_logprobs(self, *chunk) -> torch.Tensor:
        return self.rollout_maker.reference_logprobs(*chunk)

    def next_prompt_indices(self) -> list[int]:
        """This process's slice of the next global batch, which every process draws alike
        (one seeded shuffle, then sharding: ppo-details 11)."""
        self.batch = self.sampler.next_batch()  # the global batch: the gathered rollout's rows, in order
        local = self.plan.local_batch_size
        return self.batch[self.parallel.rank * local : (self.parallel.rank + 1) * local]

    def gather(self, rollout: Rollout) -> Rollout:
        """Every process's rollout as one global batch (itself in one process)."""
        return gather_rollout(rollout, self.parallel, self.pad_token_id)

    # --- advantages -----------------------------------------------------------------------
    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout) -> dict[str, float]:
        """Shape rewards with the KL penalty, then GAE and whitening; returns the objective metrics."""
        config = self.config
        mask = rollout.response_mask.float()
        kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator) * mask  # [B, T], 0 past the end
        rewards, non_score_reward = shape_rewards(rollout.scores, kl, mask, rollout.lengths, self.kl_coef)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)  # after the returns: they use raw advantages
        rollout.advantages, rollout.returns = advantages, returns

        kl_per_sequence = kl.sum(1)
        non_score = non_score_reward.sum(1).mean()
        return {
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean().item(),
            "objective/non_score_reward": non_score.item(),
            "objective/rlhf_reward": (rollout.scores.mean() + non_score).item(),
            "objective/scores": rollout.scores.mean().item(),
            "objective/kl_coef": self.kl_coef,
            "val/num_eos_tokens": int(rollout.terminated.sum()),
            "val/response_length": rollout.lengths.float().mean().item(),
        }

    # --- update ---------------------------------------------------------------------------
    def optimise(self, rollout: Rollout) -> dict[str, float]:
        """``num_ppo_epochs x num_mini_batches`` optimizer steps on one rollout batch.

        Each minibatch is one optimizer step (fix 4; TRL stepped once per accumulation cycle,
        #5645), and its loss is normalised by the minibatch's kept-token count, so splitting it
        into micro-batches does not change the update.
        """
        config, parallel = self.config, self.parallel
        self.policy.train()
        self.value_model.train()
        totals = UpdateTotals()
        train_on_rollout(
            rollout, parallel, self.device, epochs=config.num_ppo_epochs, num_mini_batches=config.num_mini_batches,
            micro_batch_size=self.plan.micro_batch_size, models=(self._policy, self._critic),
            backward=lambda micro, minibatch: self._micro_batch_backward(micro, minibatch.tokens, totals),
            step=lambda: self._optimizer_step(totals),
        )
        return totals.metrics(parallel)

    def _micro_batch_backward(self, micro: Rollout, minibatch_tokens: int, totals: UpdateTotals) -> None:
        """The value model's forward and backward pass, then the policy's: the value model's
        activations are gone before the policy's (and its output layer's) are made, which
        lowers peak memory. Both losses add up to one sum per model, so the gradients are those
        of their total. DeepSpeed's one engine for both models counts backward passes: there
        the two losses go back together, after both forward passes."""
        config, parallel = self.config, self.parallel
        chunk = (micro.queries, micro.query_mask, micro.responses, micro.response_mask)
        with self._autocast():
            values = critic_values(self._critic, *chunk)
        value_part, value_numbers = value_loss(micro, values, config)
        if parallel.engine == "deepspeed":
            pending = value_part
        else:
            parallel.backward(self._per_minibatch_token(value_part, minibatch_tokens))
            pending = None
        with self._autocast():
            logprobs, entropy = policy_logprobs(
                self._policy, *chunk, self.temperature, config.logprob_chunk_size,
                with_entropy=True, entropy_grad=config.entropy_coef != 0,
            )
        policy_part, policy_numbers = policy_loss(micro, logprobs, entropy, config)
        loss = policy_part if pending is None else pending + policy_part
        parallel.backward(self._per_minibatch_token(loss, minibatch_tokens))
        totals.add(micro.response_mask.float(), **value_numbers, **policy_numbers)

    def _per_minibatch_token(self, loss: torch.Tensor, minibatch_tokens: int) -> torch.Tensor:
        # Processes average their gradients and Accelerate divides by the accumulation steps:
        # ``loss_scale`` undoes both, leaving the sum over the minibatch / its tokens.
        if self.parallel.loss_scale != 1:
            loss = loss * self.parallel.loss_scale
        return loss / minibatch_tokens

    def _optimizer_step(self, totals: UpdateTotals) -> None:
        params = [*self.policy.parameters(), *self.value_model.parameters()]
        if self.parallel.optimizer_step(self.optimizer, params, self.config.max_grad_norm).taken:
            totals.steps += 1
            self.nonfinite_in_a_row = 0
            return
        totals.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        stop_if_nonfinite(self.nonfinite_in_a_row, self.config.max_nonfinite_steps, f"in update {self.update + 1}",
                          said_elsewhere=not self.parallel.is_main)

    # --- the loop -------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One PPO update: rollout, advantages, optimisation. Returns its metrics."""
        self.timing: dict[str, float] = {}
        start = clock(self.device)
        rollout = self.gather(self.rollout(self.train_set.take(self.next_prompt_indices())))
        advantage_start = clock(self.device)
        metrics = self.compute_advantages(rollout)
        update_start = clock(self.device)
        self.timing["timing/advantages"] = update_start - advantage_start
        metrics.update(self.optimise(rollout))
        self.timing["timing/update"] = clock(self.device) - update_start
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.config.adaptive_kl:
            self.kl_controller.update(metrics["objective/kl"], self.plan.batch_size)
        self.update += 1
        metrics["episode"] = self.update * self.plan.batch_size
        metrics["update"] = self.update
        self.timing["timing/total"] = clock(self.device) - start
        metrics.update(self.timing)
        if self.metric_fn is not None:
            extra = self._extra_metrics(rollout)
            clash = sorted(set(extra) & set(metrics))
            if clash:
                raise RewardError(
                    f"metric function {self.metric_fn.name} returned {', '.join(clash)}, which tether logs itself; "
                    "give its metrics other names (e.g. custom/...)"
                )
            metrics.update(extra)
        self.last_rollout = rollout
        return metrics

    def _extra_metrics(self, rollout: Rollout) -> dict[str, float]:
        """``metric_function`` on the update's (global) rollout, called as reward functions are."""
        texts = texts_of(rollout)
        return self.metric_fn(*self.rollout_maker.function_inputs(self.train_set.take(self.batch), **texts))

    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict[str, float]]:
        """Run every update of the plan; returns the per-update metrics (also in metrics.jsonl).

        ``resume_from_checkpoint`` (default: the config's) continues from the newest checkpoint
        in ``output_dir`` (True) or from a given one, exactly as if never stopped. Checkpoints are
        written every ``save_steps`` updates, at the end, and on SIGTERM / SIGINT (then the run
        stops with ``Interrupted``). Every ``sample_every`` updates a table of prompts,
        responses and scores is printed and appended to ``samples.jsonl``: from the eval prompts
        when there are any (their ``eval/*`` metrics join that update's line), else from the
        current rollout.
        """
        config, main = self.config, self.parallel.is_main
        resume = config.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        # Only the main process checks, clears and writes the output folder; every process
        # stops with its message when it is refused.
        checkpoint = self.parallel.share(
            lambda: prepare_output_dir(self.output_dir, resume, config.overwrite_output_dir)
        )
        # the KL coefficient now; optimizer and skipped steps in each update
        rows = LoggedRows(latest=("objective/kl_coef",), summed=("train/optimizer_steps", "train/skipped_steps"))
        if checkpoint is not None:  # refuses a changed config before anything is written
            rows.pending = self.parallel.together(lambda: self._resume(checkpoint))
            console.print(f"resuming from {checkpoint} (update {self.update} of {self.plan.num_total_batches})")
            self.reporters.resume_after(self.update)
        if main:
            save_config(config, self.output_dir / "config.yaml")
        self.parallel.barrier()  # every process has read the logs before the main one truncates them
        if checkpoint is not None and main:
            resumed_logs(self.output_dir, checkpoint, keep=lambda update: update <= self.update, key="update")
        metrics_file = MetricsFile(self.output_dir)
        total = self.plan.num_total_batches
        cadence = Cadence(config, total, per_epoch=max(1, len(self.prompts) // self.plan.batch_size))
        self.dropout.apply()
        try:
            with StopSignals() as stop, progress_bar("PPO", enabled=main and not config.disable_tqdm) as progress:
                task = progress.add_task("ppo", total=total, completed=self.update, status="")
                while self.update < total:
                    metrics = self.step()
                    table = self.plan.sample_every and self.update % self.plan.sample_every == 0
                    # evaluation: with the sample tables, unless eval_strategy gives it a cadence of its own
                    evaluate = self.eval_set is not None and cadence.evaluates(self.update, default=bool(table))
                    if table or evaluate:
                        metrics.update(self._show_samples(progress, evaluate))
                    self.history.append(metrics)
                    if main:
                        rows.log(metrics, self.update, cadence.logs(self.update, evaluated=evaluate), metrics_file,
                                 self.reporters)
                    status = f"score {metrics['objective/scores']:+.3f}  kl {metrics['objective/kl']:.3f}"
                    progress.update(task, advance=1, status=status)
                    if self.parallel.any_process(stop.requested is not None):  # all stop at the same update
                        saved = self.save_checkpoint(rows.pending) if cadence.saves_on_signal else None
                        raise Interrupted(stop.requested or signal.SIGTERM, saved,
                                          said_elsewhere=not self.parallel.is_main)
                    if cadence.saves(self.update):
                        self.save_checkpoint(rows.pending)
        finally:
            self.reporters.close()
            self.dropout.restore()  # the caller's models as they came
        return self.history

    # --- checkpoints ----------------------------------------------------------------------
    def _trained_models(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, "value_model": self.value_model}

    def save_checkpoint(self, unlogged: list[dict] | None = None) -> Path:
        """``checkpoint-<update>``: models, optimizer, schedule, KL controller, data position,
        RNG states (every process's) and the metrics so far, ``unlogged`` those of the updates
        after the last logged row (see ``Parallel.write_checkpoint``). The models are the bare
        ones: a LoRA model's checkpoint holds its adapter."""
        state = {
            "unlogged": unlogged or [],
            "update": self.update,
            "sampler": self.sampler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "history": self.history,
            "config": config_values(self.config),
            "command": "ppo",
        }
        with self.dropout.original_configs():
            return self.parallel.write_checkpoint(
                self.output_dir, self.update, self._trained_models(), self.tokenizer, self.optimizer, self.scheduler,
                state, self.config.save_total_limit,
            )

    def _resume(self, checkpoint: Path) -> list[dict]:
        """Restore ``checkpoint``; returns the metrics of its updates after the last logged row."""
        say = lambda message: console.print(f"[yellow]{message}")  # noqa: E731
        changes = check_resumed_config(checkpoint, self.config, say, "ppo")
        state = self.parallel.restore_checkpoint(checkpoint, self._trained_models(), self.optimizer, self.scheduler)
        try:
            kl = state["kl_controller"]
            kl = {name: float(kl[name]) for name in ("value", "target", "horizon")}
            nonfinite, history, sampler = int(state["nonfinite_in_a_row"]), list(state["history"]), state["sampler"]
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"checkpoint {checkpoint}: its trainer state has no valid {error}; it is not a PPO checkpoint") from None
        self.update = check_progress(checkpoint, state.get("update"), self.plan.num_total_batches)
        try:
            self.sampler.load_state_dict(sampler)
        except DataError as error:
            raise ConfigError(f"checkpoint {checkpoint}: {error}") from None
        self.kl_controller.load_state_dict(kl)
        self.nonfinite_in_a_row, self.history = nonfinite, history
        say_extension(changes, self.scheduler, self.plan.num_total_batches, say)
        return unlogged_steps(checkpoint, state.get("unlogged", []))

    def _show_samples(self, progress, evaluate: bool, rows: int = 4) -> dict[str, float]:
        """A table of samples: from an evaluation of the eval prompts (whose ``eval/*``
        metrics are returned) when ``evaluate``, else from the update's rollout."""
        if evaluate:
            metrics, samples = self.evaluate()
        else:
            rollout, metrics = self.last_rollout, {}
            texts = texts_of(rollout)
            samples = self.rollout_maker.sample_rows(self.train_set.take(self.batch), rollout.scores, **texts)
        shown = samples[:rows]
        if not self.parallel.is_main:
            return metrics
        progress.console.print(
            sample_table(
                f"samples at update {self.update}",
                [prompt_text(row["prompt"], self.tokenizer) for row in shown],
                [row["response"] for row in shown],
                [row["score"] for row in shown],
            )
        )
        with open(self.output_dir / "samples.jsonl", "a") as handle:
            for row in shown:
                handle.write(json.dumps({"update": self.update, **row}) + "\n")
        return metrics

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the policy alone (and the tokenizer), loadable with ``from_pretrained``.

        The policy keeps the generation config it came with; tether's sampling settings never
        replace it (fix 7).
        """
        target = Path(output_dir or self.config.output_dir)
        with self.dropout.original_configs():
            return self.parallel.save_model(self.policy, self._policy, self.tokenizer, target, self.config.save_merged)
