"""Reward-model training: a Bradley-Terry loss on chosen / rejected pairs (ppo-details 34-36).

One optimizer step, as ``step()`` reads:

    pairs (prompt + chosen, prompt + rejected; each ends in EOS)        data/sequences.py
        -> chosen and rejected rows right-padded together, [2P, L]
        -> score at each row's last real token with get_reward           scoring/reward.py
        -> -log sigmoid(r_chosen - r_rejected), summed over the micro-batch and divided by the
           pairs in the optimizer batch (so splitting it does not change the update)
        -> optimizer step, linear schedule

The score is read exactly where PPO's ``get_reward`` reads it (context_length 0 and an explicit
mask, so a tokenizer whose pad id is the EOS id still reads at the EOS). After training the
reward can be normalised: the mean raw score of a reference set is stored as
``config.reward_bias``, which ``get_reward`` subtracts (detail 36; no gain).

A checkpoint (``checkpoint.py``) is written every ``save_steps`` steps, at the end and on
SIGTERM / SIGINT; ``train(resume_from_checkpoint=True)`` continues from the newest one and gives
the same weights and metrics as a run that was never stopped (``tests/test_resume_supervised.py``).

Several processes (``accelerate launch`` / ``torchrun``): every process draws the same global
batch of pairs and trains on every ``processes``-th pair of it; the loss stays the mean over
the global batch.

Deliberately left out: LoRA, margins or labeller-confidence weights in
the loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence as SequenceOf
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from tether.config import RewardConfig
from tether.data.prompts import PromptSampler, load_table
from tether.data.sequences import PreferencePair, Sequence, encode_pairs, encode_sequences, right_pad
from tether.errors import ConfigError, DataError
from tether.logging import Reporters, console
from tether.models.loading import (
    check_positions,
    check_scalar_model,
    check_vocabulary,
    disable_dropout,
    enable_gradient_checkpointing,
    ensure_pad_token,
    load_scalar_backbone,
    scalar_head,
)
from tether.ops.losses import bradley_terry_loss
from tether.models.forward import Critic
from tether.models.lora import model_to_save, with_lora
from tether.scoring.reward import get_reward
from tether.trainers.common import (
    Cadence,
    autocast,
    make_optimizer,
    make_scheduler,
    seed_everything,
    seeded_split,
    training_device,
)
from tether.trainers.loop import run_steps
from tether.trainers.parallel import Parallel, launched_processes


# --- the model ------------------------------------------------------------------------------

def load_reward_backbone(path: str, **options) -> PreTrainedModel:
    """A one-label ``AutoModelForSequenceClassification`` from a causal-LM or reward checkpoint.

    From a causal LM (the SFT model, detail 35) Hugging Face builds the backbone and a new
    ``score`` head; that head, and one whose shape did not match (a classifier with several
    labels), is re-drawn as detail 18 says. A checkpoint that already has a one-label head
    keeps it. The caller seeds the random generator first for a reproducible head.
    """
    return load_scalar_backbone(
        path, "reward model", init_reward_head, "std 1/sqrt(d+1)", say=lambda message: console.print(message),
        **options,
    )


def init_reward_head(model: nn.Module) -> None:
    """Draw the head's output layer from N(0, 1/sqrt(d + 1)) with bias 0 (ppo-details 18).

    The std keeps the initial reward near unit scale: Stiennon et al. and lm-human-preferences
    (the appendix's variance without the square root is a typo).
    """
    head = scalar_head(model)
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    output = layers[-1]  # a plain Linear, or the last layer of a dense -> out_proj classifier
    nn.init.normal_(output.weight, mean=0.0, std=1.0 / math.sqrt(output.in_features + 1))
    if output.bias is not None:
        nn.init.zeros_(output.bias)


def pair_statistics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair sums for the logged metrics: BT loss, wins (a tie is a loss) and margin."""
    return {
        "loss": -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores).sum(),
        "accuracy": (chosen_scores > rejected_scores).float().sum(),
        "margin": (chosen_scores - rejected_scores).sum(),
    }


# --- the trainer ----------------------------------------------------------------------------

class RewardTrainer:
    """Bradley-Terry training of a one-label sequence-classification model.

    ``train_dataset`` / ``eval_dataset`` are ``datasets.Dataset`` tables with ``chosen`` and
    ``rejected`` columns (and an optional shared ``prompt``), or pairs already made by
    ``encode_pairs``. Without ``eval_dataset``, ``eval_fraction`` of the training pairs is held
    out (one permutation under ``config.seed``).
    """

    command = "rm"

    def __init__(self, config: RewardConfig, tokenizer, model: nn.Module, train_dataset, eval_dataset=None):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer, warn=lambda message: console.print(f"[yellow]{message}"))
        self.pad_token_id = tokenizer.pad_token_id
        self.parallel = Parallel.create(config, config.gradient_accumulation_steps)
        self.device = training_device(
            config, self.parallel, warn=lambda message: console.print(f"[yellow]warning: {message}")
        )
        seed_everything(config.seed)

        pairs = self._encode(train_dataset)
        if eval_dataset is not None:
            self.train_pairs, self.eval_pairs = pairs, self._encode(eval_dataset)
        else:
            self.train_pairs, self.eval_pairs = split_pairs(pairs, config.eval_fraction, config.order_seed)
        processes = launched_processes()
        self.batch_pairs = config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
        # the sampler serves only full batches: one epoch is floor(N / batch) steps
        epochs_steps = int(config.num_train_epochs * (len(self.train_pairs) // self.batch_pairs))
        self.total_steps = config.max_steps if config.max_steps > 0 else epochs_steps
        if len(self.train_pairs) < self.batch_pairs or self.total_steps < 1:
            raise DataError(
                f"one optimizer batch takes {self.batch_pairs} pairs (per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes) but there are {len(self.train_pairs)} training pairs for "
                f"{config.num_train_epochs} epochs; lower the batch sizes, raise num_train_epochs, or add pairs"
            )
        # One global seed for the order (detail 35's quirk: shuffling per rank before sharding
        # gave overlapping shards).
        self.sampler = PromptSampler(len(self.train_pairs), self.batch_pairs, config.order_seed)
        self.reference_sequences = self._reference_sequences()

        check_scalar_model(model, "reward model")
        check_vocabulary(tokenizer, model, "reward model")
        sides = [s.ids for p in [*self.train_pairs, *self.eval_pairs] for s in (p.chosen, p.rejected)]
        longest = max(map(len, [*sides, *(self.reference_sequences or [])]))
        extrapolated = check_positions(model, longest, "reward model",
                                       f"the longest sequence (max_length={config.max_length}) needs", "lower max_length")
        if extrapolated:
            console.print(f"[yellow]warning: {extrapolated}")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_token_id
        model = with_lora(model, config.lora_settings(), "SEQ_CLS")  # the scalar head trains in full
        self.dropout = disable_dropout(model)  # undone after train(), and in saved configs
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model, config.gradient_checkpointing_kwargs)
        # ``_scorer`` is what forward passes run through: backbone + head as one module, wrapped
        # by the engine in several processes (DDP must see the forward to average gradients).
        self._scorer, self.optimizer = self.parallel.prepare_trained(
            Critic(self.model), make_optimizer(self.model.parameters(), config)
        )
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, config)
        self.step_count = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.nonfinite_in_a_row = 0
        self.eval_history: list[tuple[int, float]] = []
        self.normalization: dict[str, float] = {}
        self.output_dir = Path(config.output_dir)
        self.reporters = Reporters(config.report_to, self.output_dir, dataclasses.asdict(config))

    def _encode(self, data) -> list[PreferencePair]:
        if isinstance(data, (list, tuple)) and all(isinstance(p, PreferencePair) for p in data):
            return list(data)
        return encode_pairs(data, self.tokenizer, self.config.max_length, self.config.truncation_mode)

    def _reference_sequences(self) -> list[list[int]] | None:
        """The normalisation set, encoded up front so a bad file fails before training."""
        config = self.config
        if not config.normalize_rewards:
            if config.normalization_dataset is not None:
                console.print("[yellow]warning: normalization_dataset is set but normalize_rewards is false: it is not used")
            return None
        if config.normalization_dataset is None:
            return [pair.chosen.ids for pair in self.train_pairs]
        try:
            table = load_table(config.normalization_dataset, config.dataset_train_split)
            sequences = encode_sequences(
                table, self.tokenizer, config.max_length, config.truncation_mode, "normalization_dataset rows"
            )
        except DataError as error:
            raise DataError(f"normalization_dataset {config.normalization_dataset}: {error}") from None
        return [s.ids for s in sequences]

    def _autocast(self):
        return autocast(self.device, self.config.bf16, self.config.fp16)

    # --- scoring --------------------------------------------------------------------------
    def score_sequences(self, sequences: SequenceOf[list[int]]) -> torch.Tensor:
        """Scores ``[N]`` of unpadded id lists, right-padded into one batch and read by get_reward.

        context_length 0 searches the whole row for its end; the explicit mask (not the pad
        id) says where that is, so with pad == EOS the score is still read at the EOS.
        """
        ids, mask = right_pad(list(sequences), self.pad_token_id)  # [N, L]
        with self._autocast():
            _, scores, _ = get_reward(self._scorer, ids.to(self.device), self.pad_token_id, 0, mask.to(self.device))
        return scores.float()

    def score_pairs(self, pairs: SequenceOf[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen_scores [P], rejected_scores [P])``: chosen and rejected stacked into one
        ``[2P, L]`` batch (detail 34)."""
        scores = self.score_sequences([p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs])
        return scores[: len(pairs)], scores[len(pairs) :]

    # --- training -------------------------------------------------------------------------
    def micro_batch_loss(self, pairs: SequenceOf[PreferencePair], batch_pairs: int) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the optimizer batch's mean BT loss, and its metric sums.

        The mean over the micro-batch is scaled by ``len(pairs) / batch_pairs``: summed over the
        micro-batches, the gradient is that of the mean over the whole batch however it is split.
        """
        chosen_scores, rejected_scores = self.score_pairs(pairs)
        loss = bradley_terry_loss(chosen_scores, rejected_scores) * (len(pairs) / batch_pairs)
        with torch.no_grad():
            sums = pair_statistics(chosen_scores, rejected_scores)
        return loss, sums

    def step(self) -> dict[str, float]:
        """One optimizer step on the next batch of pairs; returns its metrics."""
        config, parallel = self.config, self.parallel
        self.model.train()
        batch = [self.train_pairs[i] for i in self.sampler.next_batch()]  # the global batch
        mine, weight = parallel.my_rows(batch)
        starts = range(0, len(mine), config.per_device_train_batch_size)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, accuracy, margin summed over pairs
        for start in starts:
            with parallel.no_sync(self._scorer, skip=start != starts[-1]):
                loss, sums = self.micro_batch_loss(mine[start : start + config.per_device_train_batch_size], len(batch))
                parallel.backward(loss * weight * parallel.loss_scale)
            totals += weight * torch.tensor([float(sums[name]) for name in ("loss", "accuracy", "margin")],
                                            dtype=torch.float64)
        totals = dict(zip(("loss", "accuracy", "margin"), parallel.sum_over_processes(totals.to(self.device)).tolist()))
        stepped = parallel.optimizer_step(self.optimizer, self.model.parameters(), config.max_grad_norm)
        if not stepped:
            console.print("[red]non-finite gradient: optimizer step skipped")
        self.skipped_steps += not stepped
        self.nonfinite_in_a_row = 0 if stepped else self.nonfinite_in_a_row + 1
        metrics = {name: value / len(batch) for name, value in totals.items()}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step_count += 1
        metrics["epoch"] = self.step_count * self.batch_pairs / len(self.train_pairs)
        metrics["step"] = self.step_count
        metrics["skipped_steps"] = self.skipped_steps
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``eval/loss``, ``eval/accuracy`` (share of pairs with r_chosen > r_rejected; a tie is
        wrong) and ``eval/margin`` over the held-out pairs; empty when there are none."""
        if not self.eval_pairs:
            return {}
        self.model.eval()
        pairs, counted = self.parallel.my_share(self.eval_pairs)  # several processes split the pairs
        names = ("loss", "accuracy", "margin")
        totals = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        chunk = self.config.per_device_eval_batch_size
        for start in range(0, len(pairs), chunk):
            chosen, rejected = self.score_pairs(pairs[start : start + chunk])
            keep = torch.tensor(counted[start : start + chunk], device=chosen.device)
            statistics = pair_statistics(chosen[keep], rejected[keep])
            totals += torch.stack([statistics[name].double() for name in names])
        totals = self.parallel.sum_over_processes(totals).tolist()
        metrics = {f"eval/{name}": value / len(self.eval_pairs) for name, value in zip(names, totals)}
        self.eval_history.append((self.step_count, metrics["eval/accuracy"]))
        return metrics

    @torch.no_grad()
    def normalize(self, reference_sequences: SequenceOf[list[int] | Sequence]) -> dict[str, float]:
        """Store the mean raw score of ``reference_sequences`` as ``config.reward_bias`` (detail 36).

        ``get_reward`` subtracts the bias, so afterwards the reference set scores mean 0. There
        is no gain: the std is logged, not fixed. Returns ``reward_bias`` and the raw scores'
        ``normalization/{mean,std,min,max}``.
        """
        sequences = [s.ids if isinstance(s, Sequence) else list(s) for s in reference_sequences]
        if not sequences:
            raise DataError("the normalisation set is empty; give it at least one prompt/completion row")
        self.model.eval()
        previous = getattr(self.model.config, "reward_bias", None)
        self.model.config.reward_bias = 0.0  # raw scores
        try:
            chunk = 2 * self.config.per_device_train_batch_size
            raw = torch.cat([self.score_sequences(sequences[i : i + chunk]) for i in range(0, len(sequences), chunk)])
        except BaseException:
            self.model.config.reward_bias = previous
            raise
        raw = raw.double()
        bias = raw.mean().item()
        self.model.config.reward_bias = bias
        self.normalization = {
            "reward_bias": bias,
            "normalization/mean": bias,
            "normalization/std": raw.std().item() if raw.numel() > 1 else 0.0,
            "normalization/min": raw.min().item(),
            "normalization/max": raw.max().item(),
        }
        return self.normalization

    # --- checkpoints ----------------------------------------------------------------------
    def checkpointed_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def state_dict(self) -> dict:
        """The counters a checkpoint needs besides weights, optimizer, schedule and RNG (JSON)."""
        return {
            "step": self.step_count,
            "sampler": self.sampler.state_dict(),
            "train_pairs": len(self.train_pairs),
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "eval_history": [list(entry) for entry in self.eval_history],
            "normalization": self.normalization,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            pairs = int(state["train_pairs"])
            self.step_count = int(state["step"])
            self.skipped_steps = int(state["skipped_steps"])
            self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
            self.eval_history = [(int(step), float(accuracy)) for step, accuracy in state["eval_history"]]
            self.normalization = {name: float(value) for name, value in state["normalization"].items()}
            sampler = state["sampler"]
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"the checkpoint's trainer state has no valid {error}; it is not a reward-model checkpoint"
            ) from None
        if pairs != len(self.train_pairs):
            raise ConfigError(
                f"the checkpoint was trained on {pairs} pairs, this run has {len(self.train_pairs)}; "
                "resume with the same data, eval_fraction and seed"
            )
        self.sampler.load_state_dict(sampler)
        if self.normalization:  # config.json is not part of the weights restore() loads
            self.model.config.reward_bias = self.normalization["reward_bias"]

    # --- the loop -------------------------------------------------------------------------
    def advance(self) -> tuple[dict[str, float], bool]:
        """One step; evaluation every ``eval_steps`` steps and at the end (``eval/*`` join that
        step's line), then, with ``normalize_rewards``, the normalisation (``reward_bias`` and
        the reference scores' statistics join the last line)."""
        config = self.config
        metrics = self.step()
        last = self.step_count == self.total_steps
        if self.cadence.evaluates(self.step_count, last or bool(config.eval_steps and self.step_count % config.eval_steps == 0)):
            metrics.update(self.evaluate())
        if last and self.reference_sequences is not None:
            metrics.update(self.normalize(self.reference_sequences))
        return metrics, "eval/accuracy" in metrics

    @property
    def cadence(self) -> Cadence:
        return Cadence(self.config, self.total_steps, len(self.train_pairs) // self.batch_pairs)

    def status(self, metrics: dict[str, float]) -> str:
        status = f"loss {metrics['loss']:.3f}  acc {metrics['accuracy']:.2f}"
        return status + f"  eval acc {self.eval_history[-1][1]:.2f}" if self.eval_history else status

    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict[str, float]]:
        """Run every remaining step (``tether.trainers.loop.run_steps``); returns their metrics."""
        return run_steps(self, "RM", resume_from_checkpoint)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the model (``reward_bias`` in its config.json) and the tokenizer, atomically;
        ``AutoModelForSequenceClassification.from_pretrained`` loads it."""
        target = Path(output_dir or self.config.output_dir)
        model = model_to_save(self.model, self.config.save_merged)
        with self.dropout.original_configs():
            return self.parallel.save_model(model, self._scorer, self.tokenizer, target)


def split_pairs(
    pairs: list[PreferencePair], eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, held_out)``: ``eval_fraction`` of the pairs (at least one when > 0) drawn by a
    permutation under ``seed``; both keep the dataset's order."""
    if eval_fraction <= 0:
        return pairs, []
    held = max(1, round(eval_fraction * len(pairs)))
    if held >= len(pairs):
        raise DataError(
            f"eval_fraction={eval_fraction} of {len(pairs)} pairs leaves none to train on; "
            "lower eval_fraction or add pairs"
        )
    train_rows, held_rows = seeded_split(len(pairs), held, seed)
    return [pairs[i] for i in train_rows], [pairs[i] for i in held_rows]
