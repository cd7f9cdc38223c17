"""DPO (Rafailov et al. 2023) and its relatives on preference pairs, on tether's pair machinery.

The loss of one micro-batch, as ``terms`` and ``loss_share`` read (the step around it, the
checkpoints and the run are ``PairTrainer``'s and ``loop.run_steps``'s, as for reward models):

    pairs: prompt + chosen, prompt + rejected                                data/sequences.py
      -> 2P rows: each prompt left-padded, each completion right-padded after it (a pair with
         no prompt is read after the tokenizer's BOS token, or, with none, after its first token)
      -> the completion tokens' log-probabilities under the policy, read where generation
         would have produced them, the output layer on those tokens alone, in chunks (no
         [rows, length, vocab] logits), summed per row                       models/forward.py
      -> the same under the reference (a frozen copy, the policy with its LoRA adapter
         switched off, or numbers computed once before training and kept with the pairs)
      -> each loss_type's loss per pair, weighted by loss_weights         ops/preference.py
      -> summed and divided by the pairs of the whole optimizer batch; ``sft``: the chosen
         tokens' NLL divided by the chosen tokens of the whole batch (TRL divides by the
         micro-batch's, so its update changes with the split)

Metrics under TRL's names: ``loss``, ``rewards/chosen`` / ``rewards/rejected`` (beta x the
log-ratio to the reference), ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, plus ``lr``, ``epoch``; ``eval/`` the same on held-out pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceOf
from pathlib import Path

import torch
from torch import nn

from tether.config import DPOConfig
from tether.data.prompts import left_pad
from tether.data.sequences import PreferencePair, Sequence, right_pad
from tether.logging import Reporters, console
from tether.models.forward import Actor, policy_logprobs
from tether.models.loading import (
    disable_dropout,
    enable_gradient_checkpointing,
    freeze,
)
from tether.models.lora import policy_and_reference, with_lora
from tether.ops.preference import PAIR_LOSSES, logratios, pair_loss
from tether.trainers.common import (
    compile_trained,
    autocast,
    make_optimizer,
    make_scheduler,
    mix_into,
)
from tether.trainers.pairs import PairTrainer, say_warning
from tether.trainers.ppo import refuse_shared_models
from tether.trainers.trl_calls import load_causal_model, takes_trl_names


def _scored(sequence: Sequence, start_id: int | None) -> tuple[list[int], list[int]]:
    """``(context, scored tokens)`` of one side: the prompt and the completion. Without a
    prompt the context is ``start_id`` (the tokenizer's BOS), or, lacking one, the completion's
    first token, which nothing can then predict."""
    if sequence.prompt_ids:
        return sequence.prompt_ids, sequence.completion_ids
    if start_id is not None:
        return [start_id], sequence.completion_ids
    return sequence.completion_ids[:1], sequence.completion_ids[1:]


def scored_tokens(pairs: SequenceOf[PreferencePair], start_id: int | None) -> tuple[int, int]:
    """How many chosen and rejected tokens ``pairs`` score."""
    return (sum(len(_scored(p.chosen, start_id)[1]) for p in pairs),
            sum(len(_scored(p.rejected, start_id)[1]) for p in pairs))


def completion_logps(model, pairs: SequenceOf[PreferencePair], pad_token_id: int, device, chunk_size: int,
                     start_id: int | None = None):
    """``(log-probabilities [2P], token counts [2P])`` of the completions of ``pairs``, chosen
    rows first: each summed over its completion tokens, fp32 (``_scored`` says what a pair
    without a prompt is read after)."""
    rows = [_scored(p.chosen, start_id) for p in pairs] + [_scored(p.rejected, start_id) for p in pairs]
    counts = torch.tensor([len(tokens) for _, tokens in rows], device=device)
    if not counts.any():
        return torch.zeros(len(rows), device=device), counts
    queries, query_mask = left_pad([context for context, _ in rows], pad_token_id)
    responses, response_mask = right_pad([tokens for _, tokens in rows], pad_token_id)
    response_mask = response_mask.to(device)
    logprobs, _ = policy_logprobs(model, queries.to(device), query_mask.to(device), responses.to(device), response_mask,
                                  1.0, chunk_size)
    return torch.where(response_mask, logprobs.float(), 0.0).sum(dim=1), counts


class DPOTrainer(PairTrainer):
    """DPO and its relatives (``config.loss_type``) on a causal LM and its frozen reference.

    ``train_dataset`` / ``eval_dataset``: ``datasets.Dataset`` tables or lists of dicts with
    ``chosen`` and ``rejected`` (text, chat messages or token ids) and an optional ``prompt``
    (without one, what both sides share), or pairs made by ``encode_pairs``. ``ref_model``:
    the reference; ``None``: a frozen copy of ``model`` as it starts, or, under LoRA, ``model``
    with its adapter switched off (no copy). Without ``eval_dataset``, ``eval_fraction`` of the
    pairs is held out.
    """

    command = "dpo"
    title = "DPO"
    accuracy = "rewards/accuracies"

    config_class = DPOConfig
    load_trl_model = staticmethod(load_causal_model)

    @takes_trl_names("model", "ref_model")
    def __init__(self, config: DPOConfig, tokenizer, model: nn.Module, train_dataset,
                 ref_model: nn.Module | None = None, eval_dataset=None):
        self.start_id = tokenizer.bos_token_id  # the context of a completion with no prompt
        self._begin(config, tokenizer, train_dataset, eval_dataset)
        self._say_promptless()
        refuse_shared_models(model=model, ref_model=ref_model)
        for name, candidate in (("model", model), ("ref_model", ref_model)):
            if candidate is not None:
                self.check_model(candidate, name)
        lora = config.lora_settings()
        if config.precompute_ref_log_probs:  # the starting model scores the pairs itself: no copy
            self.model, self.ref_model = with_lora(model, lora, "CAUSAL_LM"), ref_model
        else:
            self.model, self.ref_model = policy_and_reference(model, ref_model, lora)
        self.model.to(self.device)
        if self.ref_model is not None:
            freeze(self.ref_model).to(self.device)  # eval mode: no dropout in the reference
        self.dropout = disable_dropout(self.model)  # undone after train(), and in saved configs
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, config.gradient_checkpointing_kwargs)
        compile_trained(config, self.parallel.engine, self.model, frozen=(self.ref_model,))
        # ``_trained`` is what the policy's passes run through: the pass itself, or the engine's
        # wrapper around it (DDP must see the forward to average gradients).
        self._trained, self.optimizer = self.parallel.prepare_trained(
            self.parallel.pass_module(Actor, self.model), make_optimizer(self.model.parameters(), config)
        )
        self._reference = (
            self.parallel.prepare_frozen(self.ref_model, config.per_device_eval_batch_size)
            if self.ref_model is not None else None
        )
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, config)
        self.weights = dict(zip(config.loss_types, config.loss_weights or [1.0] * len(config.loss_types)))
        if config.precompute_ref_log_probs:
            self._precompute_reference()
        self.output_dir = Path(config.output_dir)
        self.reporters = Reporters(config.report_to, self.output_dir, dataclasses.asdict(config))

    def _autocast(self):
        return autocast(self.device, self.config.bf16, self.config.fp16)

    def _say_promptless(self) -> None:
        count = sum(not p.chosen.prompt_ids for p in [*self.train_pairs, *self.eval_pairs])
        if not count:
            return
        if self.start_id is not None:
            console.print(f"note: {count} pairs have no prompt tokens; their completions are read after the "
                          "tokenizer's BOS token")
        else:
            say_warning(f"{count} pairs have no prompt tokens and the tokenizer has no BOS token: the first token "
                        "of each completion is their context and is not trained on; give a prompt column")

    def _logps(self, model, pairs: SequenceOf[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(model, pairs, self.pad_token_id, self.device, self.config.logprob_chunk_size,
                                self.start_id)

    # --- the reference ----------------------------------------------------------------------
    @torch.no_grad()
    def _precompute_reference(self) -> None:
        """Every pair's reference log-probabilities, once, kept with the pair; the reference
        model is dropped afterwards. Processes split the pairs and share the numbers."""
        size = self.config.precompute_ref_batch_size or self.config.per_device_eval_batch_size
        self.model.eval()
        for split in ("train_pairs", "eval_pairs"):
            pairs = getattr(self, split)
            mine, counted = self.parallel.my_share(pairs)
            values = []
            with console.status(f"scoring the {len(pairs)} {split.split('_')[0]} pairs with the reference"):
                for start in range(0, len(mine), size):
                    chunk = mine[start : start + size]
                    logps = self._reference_pass(chunk).tolist()
                    values += list(zip(logps[: len(chunk)], logps[len(chunk) :]))
            values = self.parallel.gather_shares([v for v, keep in zip(values, counted) if keep])
            setattr(self, split, [dataclasses.replace(p, reference_logps=v) for p, v in zip(pairs, values)])
        self.ref_model = self._reference = None

    def _reference_pass(self, pairs: SequenceOf[PreferencePair]) -> torch.Tensor:
        """The reference's completion log-probabilities ``[2P]`` (chosen, then rejected)."""
        with torch.no_grad(), self._autocast():
            if self._reference is not None:
                return self._logps(self._reference, pairs)[0]
            if self.config.precompute_ref_log_probs:  # before training: the model as it starts
                return self._logps(self._trained, pairs)[0]
            with self.model.disable_adapter():
                return self._logps(self._trained, pairs)[0]

    def reference_logps(self, pairs: SequenceOf[PreferencePair]) -> torch.Tensor:
        if pairs[0].reference_logps is not None:
            stored = [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs]
            return torch.tensor(stored, dtype=torch.float32, device=self.device)
        return self._reference_pass(pairs)

    # --- the loss ---------------------------------------------------------------------------
    def terms(self, pairs: SequenceOf[PreferencePair]) -> dict[str, torch.Tensor]:
        config, count = self.config, len(pairs)
        reference = self.reference_logps(pairs)
        with self._autocast():
            logps, tokens = self._logps(self._trained, pairs)
        x = logratios(logps[:count], logps[count:], reference[:count], reference[count:], tokens[:count],
                      tokens[count:], config.f_divergence_type, config.f_alpha_divergence_coef)
        losses = torch.zeros_like(x.chosen)
        for kind, weight in self.weights.items():
            if kind in PAIR_LOSSES:
                losses = losses + weight * pair_loss(kind, x, config.beta, config.label_smoothing, config.discopop_tau)
        chosen_rewards, rejected_rewards = config.beta * x.chosen.detach(), config.beta * x.rejected.detach()
        return {
            "pair_loss": losses,
            "chosen_nll": -logps[:count],
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": logps[:count].detach(),
            "logps/rejected": logps[count:].detach(),
            "chosen_tokens": tokens[:count].float(),
        }

    def loss_share(self, terms: dict[str, torch.Tensor], batch: SequenceOf[PreferencePair]) -> torch.Tensor:
        """The pair losses over the batch's pairs, plus ``sft``'s NLL over its chosen tokens."""
        loss = terms["pair_loss"].sum() / len(batch)
        if "sft" in self.weights:
            chosen_tokens = max(scored_tokens(batch, self.start_id)[0], 1)
            loss = loss + self.weights["sft"] * terms["chosen_nll"].sum() / chosen_tokens
        return loss

    def summarize(self, totals: dict[str, float], count: int) -> dict[str, float]:
        loss = totals.pop("pair_loss") / count
        nll, tokens = totals.pop("chosen_nll"), totals.pop("chosen_tokens")
        if "sft" in self.weights:
            loss += self.weights["sft"] * nll / max(tokens, 1)
        return {"loss": loss, **super().summarize(totals, count)}

    # --- the step, checkpoints --------------------------------------------------------------
    def step(self) -> dict[str, float]:
        metrics = super().step()
        config = self.config
        if config.sync_ref_model and self.step_count % config.ref_model_sync_steps == 0:
            mix_into(self.ref_model, self.model, config.ref_model_mixup_alpha)
        return metrics

    def status(self, metrics: dict[str, float]) -> str:
        status = f"loss {metrics['loss']:.4f}  margin {metrics['rewards/margins']:+.3f}"
        return status + f"  eval acc {self.eval_history[-1][1]:.2f}" if self.eval_history else status

    def checkpointed_models(self) -> dict[str, nn.Module]:
        models = {"model": self.model}
        if self.config.sync_ref_model:  # the reference changes too
            models["reference"] = self.ref_model
        return models

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The trained model and the tokenizer, atomically; ``from_pretrained`` loads it (a
        LoRA model: its adapter, or merged with ``save_merged``)."""
        target = Path(output_dir or self.config.output_dir)
        with self.dropout.original_configs():
            return self.parallel.save_model(self.model, self._trained, self.tokenizer, target, self.config.save_merged)
