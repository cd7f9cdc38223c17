"""What reward-model training and DPO share: preference pairs, their batches, and the step.

One optimizer step, as ``PairTrainer.step()`` reads:

    the next global batch of pairs (one seeded order for every process)
        -> this process's every ``processes``-th pair, in micro-batches of
           ``per_device_train_batch_size`` pairs
        -> per-pair terms of each micro-batch (the trainer's ``terms``: scores, log-ratios, losses)
        -> its share of the batch's loss (``loss_share``: divided by the whole batch, never by
           the micro-batch, so splitting the batch does not change the update), backward
        -> one optimizer step and one schedule step
        -> metrics: the terms summed over the batch and every process (``summarize``), and the
           step's seconds (``timing/total``)

Evaluation runs the same ``terms`` over the held-out pairs. The pairs are encoded up front
(``data/sequences.py``), so a bad row fails before the first step; checkpoints, resume and
logging are ``loop.run_steps``'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence as SequenceOf

import torch

from tether.data.prompts import PromptSampler
from tether.data.sequences import PreferencePair, encode_pairs
from tether.errors import ConfigError, DataError
from tether.logging import console
from tether.models.loading import check_positions, check_token_ids, check_vocabulary, ensure_pad_token
from tether.trainers.common import (
    Cadence,
    clock,
    say_if_nothing_to_evaluate,
    seed_everything,
    seeded_split,
    training_device,
)
from tether.trainers.loop import run_steps
from tether.trainers.parallel import Parallel, launched_processes
from tether.trainers.trl_calls import TRLAttributes


class PairTrainer(TRLAttributes):
    """The pair machinery; a subclass sets up its models and gives ``terms``, ``loss_share``
    (and may change ``summarize``). ``title`` names the progress bar; ``accuracy`` is the
    metric kept in ``eval_history`` and shown in the status line."""

    command = "pairs"
    latest_metrics = ("skipped_steps",)  # optimizer steps skipped so far
    summed_metrics = ()
    title = "PAIRS"
    accuracy = "accuracy"

    # --- set-up -----------------------------------------------------------------------------
    def _begin(self, config, tokenizer, train_dataset, eval_dataset) -> None:
        """What every pair trainer does first: the config checked, the tokenizer given a pad
        token, the processes and device set up, the seed set, and every pair encoded."""
        config.validate()
        self.config, self.tokenizer = config, tokenizer
        ensure_pad_token(tokenizer, warn=lambda message: console.print(f"[yellow]{message}"))
        self.pad_token_id = tokenizer.pad_token_id
        self.parallel = Parallel.create(config, config.gradient_accumulation_steps)
        self.device = training_device(config, self.parallel, warn=say_warning)
        seed_everything(config.seed)
        self._set_pairs(train_dataset, eval_dataset)

    def check_model(self, model, what: str, longest: int | None = None) -> None:
        """``model`` takes every pair: its vocabulary, the pairs' ids, and positions for the
        longest sequence (``longest``, else the longest pair's)."""
        check_vocabulary(self.tokenizer, model, what)
        sides = lambda pairs: [p.chosen.ids + p.rejected.ids for p in pairs]  # noqa: E731
        check_token_ids(model, {"training pair": sides(self.train_pairs), "evaluation pair": sides(self.eval_pairs)},
                        what)
        extrapolated = check_positions(model, longest or self.longest_sequence(), what,
                                       f"the longest sequence (max_length={self.config.max_length}) needs",
                                       "lower max_length")
        if extrapolated:
            say_warning(extrapolated)

    def _set_pairs(self, train_dataset, eval_dataset) -> None:
        """Encode the pairs, hold some out, and plan the run's steps and batches."""
        config = self.config
        pairs = self._encode(train_dataset, "training")
        if eval_dataset is not None:
            self.train_pairs, self.eval_pairs = pairs, self._encode(eval_dataset, "evaluation")
        else:
            self.train_pairs, self.eval_pairs = split_pairs(pairs, config.eval_fraction, config.order_seed)
            if self.eval_pairs:
                console.print(
                    f"note: {len(self.eval_pairs)} of the {len(pairs)} training pairs are held out for evaluation "
                    f"(eval_fraction {config.eval_fraction}, no eval_dataset); eval_fraction 0 trains on all of them"
                )
        say_if_nothing_to_evaluate(config, len(self.eval_pairs), "pairs")
        self.batch_pairs = (config.per_device_train_batch_size * config.gradient_accumulation_steps
                            * launched_processes())
        # the sampler serves only full batches: one epoch is floor(N / batch) steps
        epochs_steps = int(config.num_train_epochs * (len(self.train_pairs) // self.batch_pairs))
        self.total_steps = config.max_steps if config.max_steps > 0 else epochs_steps
        if len(self.train_pairs) < self.batch_pairs:
            raise DataError(
                f"one optimizer batch takes {self.batch_pairs} pairs (per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes) but there are {len(self.train_pairs)} training pairs"
                f"{' after the held-out ones (eval_fraction)' if eval_dataset is None and self.eval_pairs else ''}; "
                "lower the batch sizes or add pairs"
            )
        if self.total_steps < 1:
            raise DataError(
                f"num_train_epochs={config.num_train_epochs} of {len(self.train_pairs)} training pairs in batches of "
                f"{self.batch_pairs} makes no whole step; raise num_train_epochs or set max_steps"
            )
        left_over = len(self.train_pairs) % self.batch_pairs
        if left_over:
            console.print(
                f"[yellow]note: an epoch is {len(self.train_pairs) // self.batch_pairs} whole batch(es) of "
                f"{self.batch_pairs} pairs; the {left_over} of {len(self.train_pairs)} training pairs left over are not "
                "trained on in that epoch (a new shuffle each epoch leaves out others)"
            )
        # One global seed for the order (detail 35's quirk: shuffling per rank before sharding
        # gave overlapping shards).
        self.sampler = PromptSampler(len(self.train_pairs), self.batch_pairs, config.order_seed)
        self.data_digest = pairs_digest(self.train_pairs)  # recorded in checkpoints: a resume on other rows is refused
        self.step_count = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, in all
        self.nonfinite_in_a_row = 0
        self.eval_history: list[tuple[int, float]] = []

    def _encode(self, data, what: str) -> list[PreferencePair]:
        if isinstance(data, (list, tuple)) and all(isinstance(p, PreferencePair) for p in data):
            pairs = list(data)  # encoded already (the command encodes before loading a model)
        else:
            if isinstance(data, (list, tuple)):
                import datasets

                odd = next((row for row, value in enumerate(data) if not isinstance(value, dict)), None)
                if odd is not None:
                    raise DataError(f"{what} row {odd} is a {type(data[odd]).__name__}; give each pair as a dict with "
                                    "chosen and rejected (and prompt)")
                data = datasets.Dataset.from_list(list(data))
            config = self.config
            pairs = encode_pairs(data, self.tokenizer, config.max_length, config.truncation_mode, f"{what} pairs",
                                 getattr(config, "max_prompt_length", None))
        if not pairs:
            raise DataError(f"the {what} dataset has no pairs left (see the warnings above: pairs too long or with "
                            "the same chosen and rejected are dropped); add pairs or raise max_length")
        return pairs

    def longest_sequence(self) -> int:
        sides = [s.ids for p in [*self.train_pairs, *self.eval_pairs] for s in (p.chosen, p.rejected)]
        return max(map(len, sides))

    # --- what a subclass gives ---------------------------------------------------------------
    def terms(self, pairs: SequenceOf[PreferencePair]) -> dict[str, torch.Tensor]:
        """Per-pair numbers of ``pairs`` ``{name: [P]}``; those the loss reads keep their graph."""
        raise NotImplementedError

    def loss_share(self, terms: dict[str, torch.Tensor], batch: SequenceOf[PreferencePair]) -> torch.Tensor:
        """This micro-batch's part of the loss of the whole optimizer ``batch`` (all processes)."""
        raise NotImplementedError

    def summarize(self, totals: dict[str, float], count: int) -> dict[str, float]:
        """Metrics from the terms summed over ``count`` pairs: their means."""
        return {name: value / count for name, value in totals.items()}

    # --- training ----------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer step on the next batch of pairs; returns its metrics."""
        config, parallel = self.config, self.parallel
        began = clock(self.device)
        self.model.train()
        batch = [self.train_pairs[i] for i in self.sampler.next_batch()]  # the global batch
        mine, weight = parallel.my_rows(batch)
        size = config.per_device_train_batch_size
        starts = range(0, len(mine), size)
        names, totals = None, None
        for start in starts:
            with parallel.no_sync(self._trained, skip=start != starts[-1]):
                terms = self.terms(mine[start : start + size])
                parallel.backward(self.loss_share(terms, batch) * weight * parallel.loss_scale)
            names = list(terms)
            sums = weight * torch.stack([value.detach().double().sum() for value in terms.values()]).cpu()
            totals = sums if totals is None else totals + sums
        totals = parallel.sum_over_processes(totals.to(self.device)).tolist()
        stepped, grad_norm = parallel.optimizer_step(self.optimizer, self.model.parameters(), config.max_grad_norm)
        self.skipped_steps += not stepped
        self.nonfinite_in_a_row = 0 if stepped else self.nonfinite_in_a_row + 1
        metrics = self.summarize(dict(zip(names, totals)), len(batch))
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.step_count += 1
        metrics["epoch"] = self.step_count / (len(self.train_pairs) // self.batch_pairs)  # whole batches only
        metrics["step"] = self.step_count
        metrics["skipped_steps"] = self.skipped_steps
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm  # before clipping, as HF Trainer logs it
        metrics["timing/total"] = clock(self.device) - began
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The training metrics over the held-out pairs, as ``eval/<name>``; empty without any."""
        if not self.eval_pairs:
            return {}
        self.model.eval()
        pairs, counted = self.parallel.my_share(self.eval_pairs)  # several processes split the pairs
        names, totals = None, None
        chunk = self.config.per_device_eval_batch_size
        for start in range(0, len(pairs), chunk):
            terms = self.terms(pairs[start : start + chunk])
            keep = torch.tensor(counted[start : start + chunk], device=self.device)
            names = list(terms)
            sums = torch.stack([value.detach()[keep.to(value.device)].double().sum() for value in terms.values()])
            totals = sums if totals is None else totals + sums
        totals = self.parallel.sum_over_processes(totals.to(self.device)).tolist()
        summary = self.summarize(dict(zip(names, totals)), len(self.eval_pairs))
        metrics = {f"eval/{name}": value for name, value in summary.items()}
        self.eval_history.append((self.step_count, metrics[f"eval/{self.accuracy}"]))
        return metrics

    def advance(self) -> tuple[dict[str, float], bool]:
        """One step; evaluation every ``eval_steps`` steps and at the end (``eval/*`` join that
        step's line)."""
        config = self.config
        metrics = self.step()
        last = self.step_count == self.total_steps
        every = bool(config.eval_steps and self.step_count % config.eval_steps == 0)
        if self.cadence.evaluates(self.step_count, last or every):
            metrics.update(self.evaluate())
        return metrics, f"eval/{self.accuracy}" in metrics

    @property
    def cadence(self) -> Cadence:
        return Cadence(self.config, self.total_steps, len(self.train_pairs) // self.batch_pairs)

    def status(self, metrics: dict[str, float]) -> str:
        status = f"loss {metrics['loss']:.3f}  acc {metrics[self.accuracy]:.2f}"
        return status + f"  eval acc {self.eval_history[-1][1]:.2f}" if self.eval_history else status

    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict[str, float]]:
        """Run every remaining step (``tether.trainers.loop.run_steps``); returns their metrics."""
        return run_steps(self, self.title, resume_from_checkpoint)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The counters a checkpoint needs besides weights, optimizer, schedule and RNG (JSON)."""
        return {
            "step": self.step_count,
            "sampler": self.sampler.state_dict(),
            "train_pairs": len(self.train_pairs),
            "data": self.data_digest,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "eval_history": [list(entry) for entry in self.eval_history],
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            pairs = int(state["train_pairs"])
            self.step_count = int(state["step"])
            self.skipped_steps = int(state["skipped_steps"])
            self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
            self.eval_history = [(int(step), float(accuracy)) for step, accuracy in state["eval_history"]]
            sampler = state["sampler"]
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"the checkpoint's trainer state has no valid {error}; it is not a {self.command} checkpoint"
            ) from None
        if pairs != len(self.train_pairs) or state.get("data", self.data_digest) != self.data_digest:
            changed = "other" if pairs == len(self.train_pairs) else f"{len(self.train_pairs)}"
            raise ConfigError(
                f"the checkpoint was trained on {pairs} pairs, this run has {changed} pairs; "
                "resume with the same data, eval_fraction and seed"
            )
        self.sampler.load_state_dict(sampler)



def pairs_digest(pairs: list[PreferencePair]) -> str:
    """A digest of the pairs' tokens."""
    digest = hashlib.sha256()
    for pair in pairs:
        sides = [pair.chosen.prompt_ids, pair.chosen.completion_ids, pair.rejected.completion_ids]
        digest.update(json.dumps(sides).encode())
    return digest.hexdigest()[:16]


def say_warning(message: str) -> None:
    console.print(f"[yellow]warning: {message}")


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
