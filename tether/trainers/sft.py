"""Supervised fine-tuning (SFT) of a Hugging Face causal LM on prompt + completion data.

One optimizer step, as ``step()`` reads:

    rows -> right-padded micro-batches (input_ids, attention_mask, loss_mask)
         -> next-token NLL summed over the loss-masked labels of each micro-batch
         -> divided by the whole batch's loss-token count, backward, accumulate
         -> one optimizer step, one LR-schedule step

The loss mask comes from each row's lengths, never from comparing ids with the pad id, so a
tokenizer whose pad token is EOS still trains the completion's EOS and the model learns to
stop (ppo-details 1, 37, XV.18). ``completion_only_loss`` (the default) trains the completion
tokens only; ``False`` is the N+ convention of detail 37, every real token including the prompt.

A checkpoint (``checkpoint.py``) is written every ``save_steps`` steps, at the end and on
SIGTERM / SIGINT; ``train(resume_from_checkpoint=True)`` continues from the newest one and gives
the same weights and metrics as a run that was never stopped (``tests/test_resume_supervised.py``).

Several processes (``accelerate launch`` / ``torchrun``): every process draws the same global
batch of ``per_device_train_batch_size x gradient_accumulation_steps x processes`` rows and
trains on every ``processes``-th row of it; the loss is divided by the global token count.

Deliberately left out: packing, LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tether.config import SFTConfig
from tether.data.sequences import Sequence, encode_sequences, right_pad
from tether.errors import ConfigError, DataError
from tether.logging import Reporters, console
from tether.models.forward import NextTokenLoss, next_token_nll
from tether.models.loading import (
    check_positions,
    check_token_ids,
    check_vocabulary,
    disable_dropout,
    enable_gradient_checkpointing,
    ensure_pad_token,
)
from tether.models.lora import with_lora
from tether.trainers.common import (
    compile_trained,
    Cadence,
    autocast,
    make_optimizer,
    make_scheduler,
    say_if_nothing_to_evaluate,
    seed_everything,
    seeded_split,
    training_device,
)
from tether.trainers.loop import run_steps
from tether.trainers.parallel import Parallel, launched_processes
from tether.trainers.trl_calls import TRLAttributes, load_causal_model, takes_trl_names

# --------------------------------------------------------------------------- the maths


def sft_loss_mask(
    prompt_lengths: torch.Tensor, lengths: torch.Tensor, width: int, completion_only_loss: bool
) -> torch.Tensor:
    """Which labels count in the loss, ``[B, width - 1]`` bool (True = counted).

    ``prompt_lengths`` and ``lengths`` are ``[B]`` token counts of each right-padded row;
    label ``j`` is token ``j + 1`` (predicted from positions ``0..j``). A label counts when its
    token is real (before the row's length: padding never counts, the final EOS always does)
    and, for ``completion_only_loss``, when it belongs to the completion.
    """
    token_index = torch.arange(1, width, device=lengths.device).unsqueeze(0)  # [1, width - 1]
    keep = token_index < lengths.unsqueeze(1)
    if completion_only_loss:
        keep &= token_index >= prompt_lengths.unsqueeze(1)
    return keep


@dataclass
class SFTBatch:
    """Right-padded rows: ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` bool, and
    ``loss_mask`` ``[B, L - 1]`` bool over the labels ``input_ids[:, 1:]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> SFTBatch:
        return SFTBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask)))


def collate(sequences: list[Sequence], pad_token_id: int, completion_only_loss: bool) -> SFTBatch:
    """Right-pad ``sequences`` into one batch; masks come from their lengths."""
    input_ids, attention_mask = right_pad([s.ids for s in sequences], pad_token_id)  # [B, L]
    prompt_lengths = torch.tensor([len(s.prompt_ids) for s in sequences])  # [B]
    lengths = torch.tensor([len(s.ids) for s in sequences])  # [B]
    loss_mask = sft_loss_mask(prompt_lengths, lengths, input_ids.size(1), completion_only_loss)
    return SFTBatch(input_ids, attention_mask, loss_mask)


def summed_nll(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Next-token negative log-likelihood summed over the batch's loss-masked labels (scalar).

    Dividing by the token count of the whole optimizer batch (not of this micro-batch) makes
    the update the same however the batch is split into micro-batches. Only the counted
    positions reach the output layer: less memory, and padding cannot contribute anything, not
    even a NaN times zero.
    """
    return next_token_nll(model, batch.input_ids, batch.attention_mask, batch.loss_mask)


def split_held_out(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): ``fraction`` of the rows, chosen by a seeded permutation."""
    if fraction <= 0:
        return list(range(num_rows)), []
    return seeded_split(num_rows, min(max(1, round(num_rows * fraction)), num_rows - 1), seed)


# --------------------------------------------------------------------------- the trainer


class SFTTrainer(TRLAttributes):
    """Next-token training of ``model`` on prompt + completion rows (see ``encode_sequences``
    for the accepted columns: prompt/completion, messages, or text).

    ``train_dataset`` and ``eval_dataset`` are ``datasets.Dataset`` objects or lists of dicts.
    Without an ``eval_dataset``, ``config.eval_fraction`` of the rows is held out instead.
    Each optimizer step takes ``per_device_train_batch_size x gradient_accumulation_steps``
    rows of a seeded shuffle (the last batch of an epoch may be smaller).
    """

    command = "sft"
    latest_metrics = ("skipped_steps",)  # optimizer steps skipped so far
    summed_metrics = ()

    config_class = SFTConfig
    load_trl_model = staticmethod(load_causal_model)

    @takes_trl_names()
    def __init__(self, config: SFTConfig, tokenizer, model: nn.Module, train_dataset, eval_dataset=None):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer, warn=lambda message: console.print(f"[yellow]{message}"))
        self.pad_token_id = tokenizer.pad_token_id
        self.parallel = Parallel.create(config, config.gradient_accumulation_steps)
        warn = lambda message: console.print(f"[yellow]warning: {message}")  # noqa: E731
        self.device = training_device(config, self.parallel, warn=warn)
        seed_everything(config.seed)

        # Everything is encoded up front, so a bad row fails before the first step.
        sequences = self._encode(train_dataset, "training")
        if eval_dataset is not None:
            self.train_sequences, self.eval_sequences = sequences, self._encode(eval_dataset, "evaluation")
        else:
            train_rows, eval_rows = split_held_out(len(sequences), config.eval_fraction, config.order_seed)
            self.train_sequences = [sequences[i] for i in train_rows]
            self.eval_sequences = [sequences[i] for i in eval_rows]
        say_if_nothing_to_evaluate(config, len(self.eval_sequences), "rows")
        check_vocabulary(tokenizer, model, "model")
        check_token_ids(model, {"training row": [s.ids for s in self.train_sequences],
                                "evaluation row": [s.ids for s in self.eval_sequences]}, "model")
        longest = max(len(s.ids) for s in [*self.train_sequences, *self.eval_sequences])
        extrapolated = check_positions(model, longest, "model", f"the longest row (max_length={config.max_length}) needs",
                                       "lower max_length")
        if extrapolated:
            warn(extrapolated)

        model = with_lora(model, config.lora_settings(), "CAUSAL_LM")
        self.model = model
        self.dropout = disable_dropout(model)  # undone after train(), and in saved configs
        model.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model, config.gradient_checkpointing_kwargs)
        compile_trained(config, self.parallel.engine, model)
        self.batch_rows = config.per_device_train_batch_size * config.gradient_accumulation_steps * launched_processes()
        self.steps_per_epoch = math.ceil(len(self.train_sequences) / self.batch_rows)
        epochs_steps = max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))
        self.total_steps = config.max_steps if config.max_steps > 0 else epochs_steps
        # ``_model`` is what forward passes run through: the loss pass itself, or the engine's
        # wrapper around it (around the bare model under DeepSpeed and FSDP).
        self._model, self.optimizer = self.parallel.prepare_trained(
            self.parallel.pass_module(NextTokenLoss, model), make_optimizer(model.parameters(), config)
        )
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, config)  # stepped per optimizer step
        self.step_count = 0
        self._epoch_order: tuple[int, list[int]] | None = None
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.nonfinite_in_a_row = 0
        self.output_dir = Path(config.output_dir)
        self.reporters = Reporters(config.report_to, self.output_dir, dataclasses.asdict(config))

    # --- set-up helpers -------------------------------------------------------------------
    def _encode(self, dataset, what: str) -> list[Sequence]:
        if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(row, Sequence) for row in dataset):
            sequences = list(dataset)  # encoded already (``tether sft`` encodes before loading the model)
        else:
            if isinstance(dataset, (list, tuple)):
                import datasets

                dataset = datasets.Dataset.from_list(list(dataset))
            if len(dataset) == 0:
                raise DataError(f"the {what} dataset has no rows")
            config = self.config
            sequences = encode_sequences(dataset, self.tokenizer, config.max_length, config.truncation_mode, f"{what} rows")
        if not sequences:
            raise DataError(f"the {what} dataset has no rows left after truncation_mode drop; raise max_length")
        # A row whose only loss token has no token before it (a one-token text) teaches nothing;
        # keeping it would give batches with nothing to divide by.
        useful = [s for s in sequences if self._loss_tokens(s) > 0]
        if not useful:
            cut = " (truncation_mode keep_start cut every completion away: raise max_length or use keep_end)" if (
                self.config.truncation_mode == "keep_start" and self.config.max_length) else ""
            raise DataError(f"no row of the {what} dataset has a token to train on; give longer completions{cut}")
        if len(useful) < len(sequences):
            console.print(f"[yellow]{len(sequences) - len(useful)} {what} rows have no token to train on; skipped")
        return useful

    def _loss_tokens(self, sequence: Sequence) -> int:
        return int(collate([sequence], self.pad_token_id, self.config.completion_only_loss).loss_mask.sum())

    def _micro_batches(self, sequences: list[Sequence], size: int | None = None) -> list[SFTBatch]:
        size = size or self.config.per_device_train_batch_size
        return [
            collate(sequences[start : start + size], self.pad_token_id, self.config.completion_only_loss)
            for start in range(0, len(sequences), size)
        ]

    def _next_rows(self) -> list[int]:
        """Rows of the next step: epoch ``e`` is ``randperm`` under seed ``seed + e``."""
        epoch, position = divmod(self.step_count, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.order_seed + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.train_sequences), generator=generator).tolist())
        start = position * self.batch_rows
        return self._epoch_order[1][start : start + self.batch_rows]

    # --- one step -------------------------------------------------------------------------
    def step(self, rows: list[int]) -> dict[str, float]:
        """One optimizer step on the training rows ``rows``; returns its metrics."""
        parallel = self.parallel
        self.model.train()
        mine, weight = parallel.my_rows(rows)
        micro_batches = self._micro_batches([self.train_sequences[r] for r in mine])
        local_tokens = sum(int(b.loss_mask.sum()) for b in micro_batches) * weight
        num_tokens = int(parallel.sum_over_processes(torch.tensor(local_tokens, device=self.device)))
        total_nll = 0.0
        for index, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            with parallel.no_sync(self._model, skip=index < len(micro_batches) - 1):
                with autocast(self.device, self.config.bf16, self.config.fp16):
                    nll = summed_nll(self._model, batch) * weight
                parallel.backward(nll * parallel.loss_scale / num_tokens)
            total_nll += nll.item()
        total_nll = float(parallel.sum_over_processes(torch.tensor(total_nll, device=self.device)))
        stepped, grad_norm = parallel.optimizer_step(self.optimizer, self.model.parameters(), self.config.max_grad_norm)
        self.skipped_steps += not stepped
        self.nonfinite_in_a_row = 0 if stepped else self.nonfinite_in_a_row + 1
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.step_count += 1
        return {
            "loss": total_nll / num_tokens,
            "learning_rate": lr,
            "epoch": self.step_count / self.steps_per_epoch,
            "step": self.step_count,
            "tokens": num_tokens,
            "skipped_steps": self.skipped_steps,
        } | ({} if grad_norm is None else {"grad_norm": grad_norm})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity over the held-out rows (empty with none).
        Several processes split the rows and sum their totals: every one returns the same."""
        if not self.eval_sequences:
            return {}
        self.model.eval()
        sequences, counted = self.parallel.my_share(self.eval_sequences)
        size = self.config.per_device_eval_batch_size
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # nll, tokens
        for start, batch in zip(range(0, len(sequences), size), self._micro_batches(sequences, size)):
            uncounted = torch.tensor([not keep for keep in counted[start : start + size]])
            batch.loss_mask[uncounted] = False  # a filler row (see my_share) adds nothing
            batch = batch.to(self.device)
            with autocast(self.device, self.config.bf16, self.config.fp16):
                totals[0] += summed_nll(self._model, batch).double()
            totals[1] += batch.loss_mask.sum()
        total_nll, total_tokens = self.parallel.sum_over_processes(totals).tolist()
        loss = total_nll / total_tokens
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}  # exp overflows past ~709

    # --- checkpoints ----------------------------------------------------------------------
    def checkpointed_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def state_dict(self) -> dict:
        """The counters a checkpoint needs besides weights, optimizer, schedule and RNG (JSON).

        The rows of step ``k`` depend only on (seed, number of rows, ``k``): the step is the data
        position, and the other two are checked on resume.
        """
        return {
            "step": self.step_count,
            "seed": self.config.order_seed,
            "train_rows": len(self.train_sequences),
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            seed, rows = int(state["seed"]), int(state["train_rows"])
            self.step_count = int(state["step"])
            self.skipped_steps = int(state["skipped_steps"])
            self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"the checkpoint's trainer state has no valid {error}; it is not an SFT checkpoint"
            ) from None
        if (seed, rows) != (self.config.order_seed, len(self.train_sequences)):
            raise ConfigError(
                f"the checkpoint was trained on {rows} rows with seed {seed}, this run has "
                f"{len(self.train_sequences)} rows and seed {self.config.order_seed}; resume with the same data and seed"
            )
        self._epoch_order = None

    # --- the loop -------------------------------------------------------------------------
    def advance(self) -> tuple[dict[str, float], bool]:
        """One step; with a held-out set, ``eval/loss`` and ``eval/perplexity`` join the metrics
        every ``eval_steps`` steps and at the last step."""
        config = self.config
        metrics = self.step(self._next_rows())
        last = self.step_count == self.total_steps
        default = last or (config.eval_steps is not None and self.step_count % config.eval_steps == 0)
        evaluated = bool(self.eval_sequences) and self.cadence.evaluates(self.step_count, default)
        if evaluated:
            metrics.update(self.evaluate())
        return metrics, evaluated

    @property
    def cadence(self) -> Cadence:
        return Cadence(self.config, self.total_steps, self.steps_per_epoch)

    def status(self, metrics: dict[str, float]) -> str:
        status = f"loss {metrics['loss']:.4f}"
        return status + f"  eval {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else status

    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict[str, float]]:
        """Run every remaining step (``tether.trainers.loop.run_steps``); returns their metrics."""
        return run_steps(self, "SFT", resume_from_checkpoint)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the model and tokenizer, loadable with ``from_pretrained``; returns the folder.
        A LoRA model is saved merged into a plain model, or as its adapter alone when
        ``save_merged`` is false."""
        target = Path(output_dir or self.config.output_dir)
        with self.dropout.original_configs():
            return self.parallel.save_model(self.model, self._model, self.tokenizer, target, self.config.save_merged)
