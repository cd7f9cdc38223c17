"""GRPO and RLOO: critic-free RL on PPO's engine, with a group of completions per prompt.

One round, as ``step()`` reads:

    prompts -> each repeated num_generations times -> generate and score  ppo_rollout.py
            -> gather every process's rows (each group stays whole)
            -> advantages from each group's rewards            ops/advantages.py
               GRPO: reward - group mean, scaled (scale_rewards)
               RLOO: reward - KL - the mean of the group's others
            -> num_iterations x mini_batches optimizer steps      rl_update.py
               on the clipped surrogate, aggregated by loss_type  ops/advantages.py
            -> metrics (TRL's names)

Everything else is PPO's: the decoding loop (top-k / top-p / min-p / repetition penalty added),
the output layer on kept tokens, packing, reward functions and models (``reward_funcs``, summed
with ``reward_weights``), the step loop with checkpoints and exact resume (``loop.py``),
Accelerate processes and LoRA. What a trainer of this file adds is its ``advantages`` and its
micro-batch ``backward``. Left out: vLLM, tool calling, the entropy-masking and off-policy
variants of TRL's ``loss_type`` list beyond grpo / dr_grpo / dapo / bnpo.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from tether.config import CriticFreeConfig, GRPOConfig, RLOOConfig
from tether.data import PromptSampler, prompt_text
from tether.errors import ConfigError, RewardError
from tether.logging import Reporters, console, sample_table
from tether.models.forward import Actor, policy_logprobs
from tether.models.loading import (
    disable_dropout,
    enable_gradient_checkpointing,
    ensure_pad_token,
)
from tether.models.lora import policy_and_reference
from tether.ops import kl_estimate, masked_sum
from tether.ops.advantages import (
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    decoupled_group_advantages,
    group_reward_spread,
    leave_one_out_advantages,
    nan_std,
    normalized,
)
from tether.rollout.batch import Rollout
from tether.rollout.generate import sampling_config, sampling_temperature
from tether.scoring.functions import (
    FunctionLog,
    MetricFunction,
    TrainerState,
    import_reward_function,
)
from tether.scoring.sources import RewardSource, resolve_reward
from tether.trainers.common import (
    compile_trained,
    Cadence,
    autocast,
    clock,
    make_optimizer,
    make_scheduler,
    mix_into,
    seed_everything,
    training_device,
)
from tether.trainers.loop import run_steps
from tether.trainers.parallel import Parallel, gather_rollout, launched_processes
from tether.trainers.ppo import refuse_shared_models
from tether.trainers.ppo_rollout import RolloutMaker, resolve_stop_token_ids, texts_of
from tether.trainers.rl_setup import check_and_place, load_prompt_sets, refuse_column_clashes
from tether.trainers.rl_update import Minibatch, train_on_rollout
from tether.trainers.trl_calls import TRLAttributes, load_causal_model, takes_trl_names


class CriticFreeTrainer(TRLAttributes):
    """What GRPO and RLOO share; a subclass gives ``advantages`` and ``backward``."""

    command = "grpo"
    latest_metrics = ("train/optimizer_steps",)  # so far (TRL's global step)
    summed_metrics = ("train/skipped_steps",)  # in the round
    _TOTALS = ("loss", "tokens", "entropy", "low_clipped", "high_clipped", "clip_units", "grad_norm", "optimizer_steps",
               "skipped_steps")

    load_trl_model = staticmethod(load_causal_model)
    streams = True  # prompts may come as a streaming dataset

    @takes_trl_names("policy", "ref_policy", model="policy")
    def __init__(
        self,
        config: CriticFreeConfig,
        tokenizer,
        policy: nn.Module,
        reward_funcs,
        train_dataset,
        ref_policy: nn.Module | None = None,
        eval_dataset=None,
        reward_processing_classes=None,
    ):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        say = lambda message: console.print(f"[yellow]{message}")  # noqa: E731
        ensure_pad_token(tokenizer, warn=say)
        seed_everything(config.seed)  # the same on every process: models and data are built alike

        self.train_set, self.eval_set = load_prompt_sets(config, tokenizer, train_dataset, eval_dataset)
        self.plan = config.group_plan(len(self.train_set), launched_processes())
        self.parallel = Parallel.create(config, config.gradient_accumulation_steps)
        warn = lambda message: console.print(f"[yellow]warning: {message}")  # noqa: E731
        self.device = training_device(config, self.parallel, warn=warn)
        self.sampler = PromptSampler(len(self.train_set), self.plan.prompts, config.order_seed, config.shuffle_dataset)
        if self.sampler.repeats:
            say(f"note: the dataset has {len(self.train_set)} prompts, fewer than a round's {self.plan.prompts}: "
                "every round holds each prompt at least once and draws some again")

        self.pad_token_id = tokenizer.pad_token_id
        self.stop_token_ids = resolve_stop_token_ids(config.stop_token_id, None, tokenizer, policy)
        self.sampling = sampling_config(
            config.max_completion_length, config.temperature, self.stop_token_ids, self.pad_token_id,
            top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, repetition_penalty=config.repetition_penalty,
        )
        self.temperature = sampling_temperature(config.temperature)
        self.rewards = self._resolve_rewards(reward_funcs, reward_processing_classes, say)
        weights = config.reward_weights or [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ConfigError(f"config field reward_weights has {len(weights)} weights for {len(self.rewards)} rewards")
        self.reward_weights = [float(w) for w in weights]
        metric = config.metric_function
        self.metric_fn = MetricFunction(import_reward_function(metric)) if metric else None
        functions = [source.function for source in self.rewards]
        refuse_column_clashes(self.train_set.columns, [*functions, self.metric_fn])
        refuse_shared_models(policy=policy, ref_policy=ref_policy,
                             **{f"reward {source.name}": source.model for source in self.rewards})

        # beta 0: no reference at all (nothing loaded, no reference pass)
        lora = config.lora_settings()
        if config.beta:
            self.policy, self.ref_policy = policy_and_reference(policy, ref_policy, lora)
        else:
            self.policy, self.ref_policy = policy_and_reference(policy, None, lora)[0], None
        longest = max(map(len, [*self.train_set.ids, *(self.eval_set.ids if self.eval_set else [])]))
        check_and_place(
            self._models(), tokenizer, self.device, longest=longest + config.max_completion_length,
            needs=f"the longest prompt + max_completion_length={config.max_completion_length} needs",
            fix="lower max_completion_length or max_prompt_length",
            own_tokenizers={f"reward model {s.name}": s.tokenizer for s in self.rewards if s.tokenizer is not None},
            warn=warn,
        )
        self.dropout = disable_dropout(*self._models().values())  # undone after train(), and in saved configs
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy, config.gradient_checkpointing_kwargs)
        compile_trained(
            config, self.parallel.engine, self.policy, frozen=(self.ref_policy, *(source.model for source in self.rewards))
        )

        self._policy, self.optimizer = self.parallel.prepare_trained(
            self.parallel.pass_module(Actor, self.policy), make_optimizer(self.policy.parameters(), config)
        )
        frozen_rows = config.local_rollout_forward_batch_size
        self._ref = self.parallel.prepare_frozen(self.ref_policy, frozen_rows) if self.ref_policy is not None else None
        for source in self.rewards:
            if source.model is not None:
                source.forward = self.parallel.prepare_frozen(source.model, frozen_rows)
        self.rollout_maker = RolloutMaker(
            config, tokenizer, self.parallel, self.device, policy=self.policy, policy_forward=self._policy, critic=None,
            reference=self._ref, use_reference=bool(config.beta), unscored_allowed=True, rewards=self.rewards,
            reward_weights=self.reward_weights, sampling=self.sampling, temperature=self.temperature,
            stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id,
        )
        self.function_log = FunctionLog()  # what reward functions log in the current round
        self.progress = TrainerState(max_steps=self.plan.optimizer_steps)
        self.rollout_maker.context = {"trainer_state": self.progress, "log_metric": self._log_metric,
                                      "log_extra": self._log_extra}
        if self.parallel.distributed:  # different samples on every process
            seed_everything(config.seed + 100003 * self.parallel.rank)
        self.total_steps = self.plan.num_rounds
        self.scheduler = make_scheduler(self.optimizer, self.plan.optimizer_steps, config)
        self.step_count = 0  # rounds done
        self.optimizer_steps = 0
        self.step_rate = self.scheduler.get_last_lr()[0]  # the rate of the last optimizer step, logged by its round
        self.nonfinite_in_a_row = 0
        self._said_unscored = False
        self.output_dir = Path(config.output_dir)
        self.reporters = Reporters(config.report_to, self.output_dir, dataclasses.asdict(config))

    # --- set-up helpers ---------------------------------------------------------------------
    def _resolve_rewards(self, reward_funcs, processing_classes, say) -> list[RewardSource]:
        specs = reward_funcs if reward_funcs is not None else self.config.reward_funcs
        if specs is None:
            raise ConfigError("no reward: give reward_funcs (functions, module:function names or reward models)")
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        tokenizers = processing_classes if isinstance(processing_classes, (list, tuple)) else [processing_classes]
        tokenizers = list(tokenizers) + [None] * (len(specs) - len(tokenizers))
        sources = [
            resolve_reward(spec, self.config, self.tokenizer, self.train_set.values, tokenizer, say)
            for spec, tokenizer in zip(specs, tokenizers)
        ]
        if not sources:
            raise ConfigError("reward_funcs is empty; give at least one reward")
        return sources

    @property
    def model(self) -> nn.Module:
        """TRL's name for the policy."""
        return self.policy

    def _models(self) -> dict[str, nn.Module]:
        models = {"policy": self.policy}
        if self.ref_policy is not None:
            models["reference policy"] = self.ref_policy
        for source in self.rewards:
            if source.model is not None:
                models[f"reward model {source.name}"] = source.model
        return models

    def _autocast(self):
        return autocast(self.device, self.config.bf16, self.config.fp16)

    # --- one round ----------------------------------------------------------------------------
    def next_prompt_indices(self) -> list[int]:
        """This process's prompts of the next round, each repeated ``num_generations`` times
        (one group in consecutive rows); every process draws the same global batch."""
        self.batch = self.sampler.next_batch()
        local = self.plan.local_prompts
        mine = self.batch[self.parallel.rank * local : (self.parallel.rank + 1) * local]
        return [index for index in mine for _ in range(self.config.num_generations)]

    def _round_rows(self) -> list[int]:
        """The prompt of each row of the round's global batch."""
        return [index for index in self.batch for _ in range(self.config.num_generations)]

    def step(self) -> dict[str, float]:
        """One round: sample and score groups, advantages, the optimizer steps. Its metrics."""
        timing: dict[str, float] = {}
        start = clock(self.device)
        rollout = self.collect(timing)
        self.round_log = self._gathered_log()  # before an evaluation calls the functions again
        metrics = self.learn(rollout, timing)
        metrics.update(self._logged_metrics(metrics))
        self.step_count += 1
        metrics["step"] = self.step_count
        metrics["epoch"] = self.step_count * self.plan.prompts / len(self.train_set)
        timing["timing/total"] = clock(self.device) - start
        metrics.update(timing)
        if self.metric_fn is not None:
            metrics.update(self._extra_metrics(rollout, metrics))
        self.last_rollout = rollout
        return metrics

    def collect(self, timing: dict[str, float]) -> Rollout:
        """The next round's completions, scored, every process's rows (each group whole)."""
        self.progress.global_step = self.optimizer_steps
        self.progress.epoch = self.step_count * self.plan.prompts / len(self.train_set)
        self.function_log = FunctionLog()
        rows = self.next_prompt_indices()
        return gather_rollout(self.rollout_maker.rollout(self.train_set.take(rows), timing), self.parallel,
                              self.pad_token_id)

    def learn(self, rollout: Rollout, timing: dict[str, float] | None = None) -> dict[str, float]:
        """Advantages of a gathered rollout and the round's optimizer steps; their metrics."""
        config, timing = self.config, timing if timing is not None else {}
        advantage_start = clock(self.device)
        metrics = self.reward_metrics(rollout)
        metrics.update(self.advantages(rollout))
        if config.mask_truncated_completions:  # left out of the loss; counted in the advantages above
            rollout.response_mask = rollout.response_mask & rollout.terminated.unsqueeze(1)
        update_start = clock(self.device)
        timing["timing/advantages"] = update_start - advantage_start
        self.policy.train()
        totals = dict.fromkeys(self._TOTALS, 0.0)  # the same names on every process, steps or none
        if config.beta and isinstance(self, GRPOTrainer):
            totals["kl"] = 0.0
        plan = self.plan  # the last round stops at max_steps
        steps = min(plan.steps_per_round, plan.optimizer_steps - self.step_count * plan.steps_per_round)
        train_on_rollout(
            rollout, self.parallel, self.device, epochs=config.num_iterations, num_mini_batches=plan.mini_batches,
            micro_batch_size=plan.micro_batch_size, models=(self._policy,),
            backward=lambda micro, minibatch: self.backward(micro, minibatch, totals), step=lambda: self._step(totals),
            steps=steps,
        )
        metrics.update(self._update_metrics(totals))
        timing["timing/update"] = clock(self.device) - update_start
        return metrics

    def advantages(self, rollout: Rollout) -> dict[str, float]:
        """Set ``rollout.advantages`` ``[B]``; return the metrics of their making."""
        raise NotImplementedError

    def backward(self, micro: Rollout, minibatch: Minibatch, totals: dict) -> None:
        """One micro-batch's share of its optimizer step's loss, backward; numbers into ``totals``."""
        raise NotImplementedError

    def _new_logprobs(self, micro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            return policy_logprobs(
                self._policy, micro.queries, micro.query_mask, micro.responses, micro.response_mask, self.temperature,
                self.config.logprob_chunk_size, with_entropy=True,
                entropy_grad=getattr(self.config, "entropy_coef", 0) != 0,
            )

    def _add(self, totals: dict, **sums: torch.Tensor) -> None:
        with torch.no_grad():
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float()

    def _step(self, totals: dict) -> None:
        taken, norm = self.parallel.optimizer_step(self.optimizer, self.policy.parameters(), self.config.max_grad_norm)
        self._add(totals, grad_norm=torch.tensor(norm or 0.0), optimizer_steps=torch.ones(()))
        if taken:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self._add(totals, skipped_steps=torch.ones(()))
        self.step_rate = self.scheduler.get_last_lr()[0]  # the rate this step used, which the round logs
        self.scheduler.step()
        self.optimizer_steps += 1
        config = self.config
        if config.sync_ref_model and self.optimizer_steps % config.ref_model_sync_steps == 0:
            mix_into(self.ref_policy, self.policy, config.ref_model_mixup_alpha)

    def _update_metrics(self, totals: dict) -> dict[str, float]:
        """Token-weighted means of the per-token numbers, over every process (one all-reduce)."""
        names = sorted(totals)
        values = torch.stack([torch.as_tensor(totals[n], dtype=torch.float32, device=self.device) for n in names])
        values = dict(zip(names, self.parallel.sum_over_processes(values).tolist()))
        processes = self.parallel.world_size
        steps = max(values["optimizer_steps"] / processes, 1.0)
        tokens, clip_units = max(values["tokens"], 1.0), max(values["clip_units"], 1.0)
        metrics = {
            "loss": values["loss"] / steps,
            "grad_norm": values["grad_norm"] / processes / steps,
            "learning_rate": self.step_rate,
            "entropy": values["entropy"] / tokens,
            "clip_ratio/low_mean": values["low_clipped"] / clip_units,
            "clip_ratio/high_mean": values["high_clipped"] / clip_units,
            "train/optimizer_steps": self.optimizer_steps,
            "train/skipped_steps": int(values["skipped_steps"] / processes),
        }
        metrics["clip_ratio/region_mean"] = metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"]
        if "kl" in values:
            metrics["kl"] = values["kl"] / tokens
        return metrics

    def reward_metrics(self, rollout: Rollout) -> dict[str, float]:
        """TRL's reward and completion metrics of one round's global batch (a completion no
        reward function scored is left out of the reward figures)."""
        scores, parts = rollout.scores, rollout.reward_parts
        unscored = int(torch.isnan(scores).sum())
        if unscored and not self._said_unscored:
            console.print(f"[yellow]note: no reward function scored {unscored} completion(s) (all returned None); "
                          "they are left out of their group's baseline and get advantage 0")
            self._said_unscored = True
        spread = group_reward_spread(scores, self.config.num_generations)
        metrics = {
            "reward": torch.nanmean(scores).item(),
            "reward_std": nan_std(scores).item(),
            "frac_reward_zero_std": (spread < 1e-8).float().mean().item(),
        }
        for index, source in enumerate(self.rewards):
            column = parts[:, index]
            metrics[f"rewards/{source.name}/mean"] = torch.nanmean(column).item()
            metrics[f"rewards/{source.name}/std"] = nan_std(column).item()
        lengths, ended = rollout.lengths.float(), rollout.terminated
        metrics.update({
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": (~ended).float().mean().item(),
            "completions/mean_terminated_length": lengths[ended].mean().item() if ended.any() else 0.0,
        })
        return metrics

    def _extra_metrics(self, rollout: Rollout, metrics: dict) -> dict[str, float]:
        texts = texts_of(rollout)
        extra = self.metric_fn(*self.rollout_maker.function_inputs(self.train_set.take(self._round_rows()), **texts))
        clash = sorted(set(extra) & set(metrics))
        if clash:
            raise RewardError(
                f"metric function {self.metric_fn.name} returned {', '.join(clash)}, which tether logs itself; "
                "give its metrics other names (e.g. custom/...)"
            )
        return extra

    # --- what reward functions log -------------------------------------------------------------
    def _log_metric(self, name: str, value: float) -> None:
        self.function_log.log_metric(name, value)

    def _log_extra(self, column: str, values: list) -> None:
        self.function_log.log_extra(column, values)

    def _gathered_log(self) -> FunctionLog:
        """The round's logs of every process, in process order (as the gathered rollout's rows)."""
        logs = self.parallel.gather_objects(self.function_log) if self.parallel.distributed else [self.function_log]
        merged = FunctionLog()
        for log in logs:
            for name, values in log.metrics.items():
                merged.metrics[name].extend(values)
            for column, values in log.extras.items():
                merged.extras[column].extend(values)
        return merged

    def _logged_metrics(self, metrics: dict) -> dict[str, float]:
        logged = {name: sum(values) / len(values) for name, values in self.round_log.metrics.items() if values}
        clash = sorted(set(logged) & set(metrics))
        if clash:
            raise RewardError(f"a reward function logged {', '.join(clash)} with log_metric, which tether logs itself; "
                              "give it another name")
        return logged

    # --- evaluation and samples ----------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """``eval/*`` of ``num_generations_eval`` completions for each eval prompt, sampled from a
        generator of its own (so evaluating changes nothing that is trained)."""
        if not self.eval_set:
            return {}
        repeats = self.config.num_generations_eval or self.config.num_generations
        prompts = self.eval_set.take([i for i in range(len(self.eval_set)) for _ in range(repeats)])
        seed = (self.config.seed * 1_000_003 + self.step_count) * 1_009 + self.parallel.rank
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            metrics, rows = self.rollout_maker.evaluate(prompts)
        self._samples = rows
        return {"eval/reward": metrics["eval/scores"], "eval/completions/mean_length": metrics["eval/response_length"]}

    def _show_completions(self) -> None:
        """``log_completions``: a table of the round's prompts, completions and rewards, also
        appended to ``samples.jsonl``."""
        rollout = self.last_rollout
        texts = texts_of(rollout)
        samples = self.rollout_maker.sample_rows(self.train_set.take(self._round_rows()), rollout.scores, **texts)
        for column, values in self.round_log.extras.items():  # log_extra's columns, where one per row
            if len(values) == len(samples):
                for row, value in zip(samples, values):
                    row[column] = value
        shown = samples[: self.config.num_completions_to_print]  # None: every completion
        if not self.parallel.is_main:
            return
        console.print(sample_table(
            f"completions at step {self.step_count}", [prompt_text(row["prompt"], self.tokenizer) for row in shown],
            [row["response"] for row in shown], [row["score"] for row in shown],
        ))
        with open(self.output_dir / "samples.jsonl", "a") as handle:
            for row in shown:
                handle.write(json.dumps({"step": self.step_count, **row}, default=str) + "\n")

    # --- the step loop (loop.py) ------------------------------------------------------------------
    @property
    def cadence(self) -> Cadence:
        per_epoch = max(1, len(self.train_set) // self.plan.prompts)
        return Cadence(self.config, self.total_steps, per_epoch, unit=self.plan.steps_per_round)

    def advance(self) -> tuple[dict[str, float], bool]:
        metrics = self.step()
        last = self.step_count == self.total_steps
        evaluated = self.eval_set is not None and self.cadence.evaluates(self.step_count, default=last)
        if evaluated:
            metrics.update(self.evaluate())
        if self.config.log_completions and self.cadence.logs(self.step_count, evaluated):
            self._show_completions()
        return metrics, evaluated

    def status(self, metrics: dict[str, float]) -> str:
        return f"reward {metrics['reward']:+.3f}  loss {metrics['loss']:.4f}"

    def checkpointed_models(self) -> dict[str, nn.Module]:
        models = {"model": self.policy}
        if self.config.sync_ref_model:  # the reference changes too
            models["reference"] = self.ref_policy
        return models

    def state_dict(self) -> dict:
        return {"step": self.step_count, "optimizer_steps": self.optimizer_steps, "sampler": self.sampler.state_dict(),
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.step_count, self.optimizer_steps = int(state["step"]), int(state["optimizer_steps"])
            self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
            sampler = state["sampler"]
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"the checkpoint's trainer state has no valid {error}; it is not a {self.command} checkpoint"
            ) from None
        self.sampler.load_state_dict(sampler)

    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict[str, float]]:
        """Every remaining round (``tether.trainers.loop.run_steps``); their metrics."""
        return run_steps(self, self.command.upper(), resume_from_checkpoint)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The policy alone (and the tokenizer), loadable with ``from_pretrained``."""
        target = Path(output_dir or self.config.output_dir)
        with self.dropout.original_configs():
            return self.parallel.save_model(self.policy, self._policy, self.tokenizer, target, self.config.save_merged)


class GRPOTrainer(CriticFreeTrainer):
    """GRPO (Shao et al. 2024): each completion's advantage is its reward less its group's mean,
    scaled by ``scale_rewards``; the clipped surrogate per token (or per sequence,
    ``importance_sampling_level``), ``beta x`` the k3 KL per token, aggregated by ``loss_type``."""

    command = "grpo"
    config: GRPOConfig
    config_class = GRPOConfig

    def advantages(self, rollout: Rollout) -> dict[str, float]:
        config = self.config
        if config.multi_objective_aggregation == "normalize_then_sum":
            weights = torch.tensor(self.reward_weights, device=rollout.scores.device)
            rollout.advantages = decoupled_group_advantages(rollout.reward_parts, weights, config.num_generations)
        else:
            rollout.advantages = group_advantages(rollout.scores, config.num_generations, config.scale_rewards)
        return {}

    def backward(self, micro: Rollout, minibatch: Minibatch, totals: dict) -> None:
        config, parallel = self.config, self.parallel
        logprobs, entropy = self._new_logprobs(micro)
        mask = micro.response_mask
        log_ratio = logprobs - micro.logprobs  # [b, T]
        if config.importance_sampling_level == "sequence":  # GSPO: one ratio per completion
            log_ratio = masked_sum(log_ratio, mask, dim=1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        per_token, low, high = clipped_surrogate(
            log_ratio, micro.advantages.unsqueeze(1), config.epsilon, epsilon_high, config.delta
        )
        per_token = per_token.expand_as(logprobs)
        numbers = {}
        if config.beta:
            kl = kl_estimate(logprobs, micro.ref_logprobs, "k3")
            weighted = kl * torch.exp(log_ratio) if config.use_bias_correction_kl else kl
            per_token = per_token + config.beta * weighted
            numbers["kl"] = masked_sum(kl, mask)
        if config.entropy_coef:
            per_token = per_token - config.entropy_coef * entropy
        loss = aggregate_loss(
            per_token, mask, config.loss_type, step_sequences=minibatch.sequences, step_tokens=minibatch.tokens,
            local_tokens=minibatch.local_tokens, processes=parallel.world_size,
            max_completion_length=config.max_completion_length,
        )
        parallel.backward(loss * parallel.loss_scale)
        units = mask if low.size(1) > 1 else mask.any(1, keepdim=True)  # tokens, or sequences
        self._add(
            totals, loss=loss, tokens=mask.sum(),
            entropy=masked_sum(entropy, mask), low_clipped=masked_sum(low.expand_as(units).float(), units),
            high_clipped=masked_sum(high.expand_as(units).float(), units), clip_units=units.sum(), **numbers,
        )


class RLOOTrainer(CriticFreeTrainer):
    """RLOO (Ahmadian et al. 2024): the KL to the reference is taken from the reward
    (``beta x`` its k1 sum over the completion), each completion's baseline is the mean reward of
    its group's others; the clipped surrogate on the completion's summed log-ratio, averaged
    over the step's completions."""

    command = "rloo"
    config: RLOOConfig
    config_class = RLOOConfig

    def advantages(self, rollout: Rollout) -> dict[str, float]:
        config = self.config
        rewards = rollout.scores
        if config.reward_clip_range is not None:
            rewards = rewards.clamp(min=config.reward_clip_range[0], max=config.reward_clip_range[1])
        metrics = {}
        if config.beta:
            kl = masked_sum(kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k1"), rollout.response_mask, dim=1)
            rewards = rewards - config.beta * kl
            metrics["kl"] = (kl.sum() / rollout.response_mask.sum().clamp(min=1)).item()  # per token
        advantages = leave_one_out_advantages(rewards, config.num_generations)
        scored = ~torch.isnan(rewards)
        rollout.advantages = normalized(advantages, scored) if config.normalize_advantages else advantages
        return metrics

    def backward(self, micro: Rollout, minibatch: Minibatch, totals: dict) -> None:
        config, parallel = self.config, self.parallel
        logprobs, entropy = self._new_logprobs(micro)
        mask = micro.response_mask
        log_ratio = masked_sum(logprobs - micro.logprobs, mask, dim=1, keepdim=True)  # [b, 1]
        epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        advantages = micro.advantages.unsqueeze(1)
        per_sequence, low, high = clipped_surrogate(log_ratio, advantages, config.epsilon, epsilon_high)
        loss = per_sequence.sum() / minibatch.sequences
        parallel.backward(loss * parallel.loss_scale)
        counted = mask.any(1, keepdim=True)
        self._add(
            totals, loss=loss, tokens=mask.sum(),
            entropy=masked_sum(entropy, mask), low_clipped=masked_sum(low.float(), counted),
            high_clipped=masked_sum(high.float(), counted), clip_units=counted.sum(),
        )

    def _update_metrics(self, totals: dict) -> dict[str, float]:
        metrics = super()._update_metrics(totals)
        metrics.pop("kl", None)  # RLOO's KL is the reward's, logged with the advantages
        return metrics
