"""Reward-model training: a Bradley-Terry loss on chosen / rejected pairs (ppo-details 34-36).

The loss of one micro-batch (the step around it is ``PairTrainer``'s, ``pairs.py``):

    pairs (prompt + chosen, prompt + rejected; each ends in EOS)        data/sequences.py
        -> chosen and rejected rows right-padded together, [2P, L]
        -> score at each row's last real token with get_reward           scoring/reward.py
        -> -log sigmoid(r_chosen - r_rejected), summed over the micro-batch and divided by the
           pairs in the optimizer batch (so splitting it does not change the update)

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

Deliberately left out: margins or labeller-confidence weights in the loss.
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
from tether.data.prompts import load_table
from tether.data.sequences import PreferencePair, Sequence, encode_sequences, right_pad
from tether.errors import ConfigError, DataError
from tether.logging import Reporters, console
from tether.models.loading import (
    check_scalar_model,
    disable_dropout,
    enable_gradient_checkpointing,
    load_scalar_backbone,
    scalar_head,
)
from tether.ops.losses import bradley_terry_losses
from tether.models.forward import Critic
from tether.models.lora import with_lora
from tether.scoring.reward import get_reward
from tether.trainers.common import (
    compile_trained,
    autocast,
    make_optimizer,
    make_scheduler,
    seed_everything,
)
from tether.trainers.pairs import PairTrainer
from tether.trainers.trl_calls import takes_trl_names


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


def pair_terms(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair BT loss, win (a tie is a loss) and margin ``[P]``."""
    return {
        "loss": bradley_terry_losses(chosen_scores, rejected_scores),
        "accuracy": (chosen_scores > rejected_scores).float(),
        "margin": (chosen_scores - rejected_scores).detach(),
    }


# --- the trainer ----------------------------------------------------------------------------

class RewardTrainer(PairTrainer):
    """Bradley-Terry training of a one-label sequence-classification model.

    ``train_dataset`` / ``eval_dataset`` are ``datasets.Dataset`` tables with ``chosen`` and
    ``rejected`` columns (and an optional shared ``prompt``), or pairs already made by
    ``encode_pairs``. Without ``eval_dataset``, ``eval_fraction`` of the training pairs is held
    out (one permutation under ``config.seed``).
    """

    command = "rm"
    title = "RM"

    config_class = RewardConfig

    @staticmethod
    def load_trl_model(path: str, config: RewardConfig) -> nn.Module:
        """A TRL call's ``model`` name or path, loaded as ``tether rm`` loads it (a new head drawn
        under ``config.seed``)."""
        seed_everything(config.seed)
        return load_reward_backbone(path, **config.model_options(own_revision=path == config.model_name_or_path))

    @takes_trl_names()
    def __init__(self, config: RewardConfig, tokenizer, model: nn.Module, train_dataset, eval_dataset=None):
        self._begin(config, tokenizer, train_dataset, eval_dataset)
        self.reference_sequences = self._reference_sequences()

        check_scalar_model(model, "reward model")
        longest = max([self.longest_sequence(), *map(len, self.reference_sequences or [])])
        self.check_model(model, "reward model", longest)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_token_id
        model = with_lora(model, config.lora_settings(), "SEQ_CLS")  # the scalar head trains in full
        self.dropout = disable_dropout(model)  # undone after train(), and in saved configs
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model, config.gradient_checkpointing_kwargs)
        compile_trained(config, self.parallel.engine, model)
        # ``_scorer`` is what forward passes run through: backbone + head as one module, wrapped
        # by the engine in several processes (DDP must see the forward to average gradients).
        self._scorer, self.optimizer = self.parallel.prepare_trained(
            Critic(self.model), make_optimizer(self.model.parameters(), config)
        )
        self._trained = self._scorer
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, config)
        self.normalization: dict[str, float] = {}
        self.output_dir = Path(config.output_dir)
        self.reporters = Reporters(config.report_to, self.output_dir, dataclasses.asdict(config))

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

    # --- the loss -----------------------------------------------------------------------
    def terms(self, pairs: SequenceOf[PreferencePair]) -> dict[str, torch.Tensor]:
        return pair_terms(*self.score_pairs(pairs))

    def loss_share(self, terms: dict[str, torch.Tensor], batch: SequenceOf[PreferencePair]) -> torch.Tensor:
        """The BT losses summed here and divided by the pairs of the whole batch: summed over
        the micro-batches, the gradient is that of the batch's mean however it is split."""
        return terms["loss"].sum() / len(batch)

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

    # --- checkpoints and the loop ------------------------------------------------------
    def checkpointed_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "normalization": self.normalization}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.normalization = {name: float(value) for name, value in state["normalization"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ConfigError(
                f"the checkpoint's trainer state has no valid {error}; it is not a reward-model checkpoint"
            ) from None
        super().load_state_dict(state)
        if self.normalization:  # config.json is not part of the weights restore() loads
            self.model.config.reward_bias = self.normalization["reward_bias"]

    def advance(self) -> tuple[dict[str, float], bool]:
        """One step and its evaluation (``PairTrainer.advance``); after the last, with
        ``normalize_rewards``, the normalisation (``reward_bias`` and the reference scores'
        statistics join the last line)."""
        metrics, evaluated = super().advance()
        if self.step_count == self.total_steps and self.reference_sequences is not None:
            metrics.update(self.normalize(self.reference_sequences))
        return metrics, evaluated

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the model (``reward_bias`` in its config.json) and the tokenizer, atomically;
        ``AutoModelForSequenceClassification.from_pretrained`` loads it."""
        target = Path(output_dir or self.config.output_dir)
        with self.dropout.original_configs():
            return self.parallel.save_model(self.model, self._scorer, self.tokenizer, target, self.config.save_merged)

