"""Loading models and tokenizers, and the preparation every RLHF model needs."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from tether.errors import ConfigError, DataError


def load_pretrained(loader, path: str, what: str, **kwargs):
    """``loader.from_pretrained(path)``; a failure becomes a one-line ConfigError naming ``what``.
    A path that is plainly local (``./``, ``/``, ``~`` or under an existing folder) and missing is
    said so at once, instead of being tried as a Hub name."""
    local = os.path.expanduser(path)
    first = local.split(os.sep, 1)[0] if os.sep in local else ""
    if not os.path.exists(local) and (local.startswith((os.sep, ".")) or path.startswith("~") or os.path.isdir(first)):
        raise ConfigError(f"cannot load {what} from {path!r}: no such folder")
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load {what} from {path!r}: {reason}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, warn=warnings.warn, revision: str | None = None):
    """Tokenizer with left padding; a missing pad token becomes EOS (masks make that safe)."""
    options = {"revision": revision} if revision and revision != "main" else {}
    tokenizer = load_pretrained(
        AutoTokenizer, path, "tokenizer", padding_side="left", trust_remote_code=trust_remote_code, **options
    )
    tokenizer.padding_side = "left"
    ensure_pad_token(tokenizer, warn)
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_own_tokenizer(path: str, trust_remote_code: bool = False, warn=warnings.warn):
    """The tokenizer saved with a model at ``path`` (a reward model's own), or None when a local
    folder holds none; a Hub name's tokenizer when it has one."""
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            return None
        return load_tokenizer(path, trust_remote_code, warn)
    try:
        return load_tokenizer(path, trust_remote_code, warn)
    except ConfigError:
        return None


def ensure_pad_token(tokenizer, warn=warnings.warn) -> None:
    """Give a tokenizer without a pad token one, without growing the vocabulary."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
    tokenizer.pad_token = tokenizer.eos_token
    warn(f"the tokenizer has no pad token; using EOS ({tokenizer.eos_token!r}) for padding, which tether's masks make safe")


def load_causal_lm(path: str, what: str = "policy model", **options) -> PreTrainedModel:
    """``options``: ``from_pretrained`` arguments (``TrainingConfig.model_options``; fp32 by default);
    ``what`` names the model in an error."""
    return load_pretrained(AutoModelForCausalLM, path, what, **{"dtype": torch.float32, **options})


def load_scalar_model(path: str, what: str, **options) -> PreTrainedModel:
    """A trained ``AutoModelForSequenceClassification`` with one label (a reward model): a
    checkpoint without a trained one-label head (a causal LM, a classifier of other labels) is
    refused, since Hugging Face would give it a random head that scores nothing."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its report of new weights: said below, in one line
    try:
        model, info = load_pretrained(
            AutoModelForSequenceClassification, path, what, output_loading_info=True,
            **{"dtype": torch.float32, **options},
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    head = "score." if hasattr(model, "score") else "classifier."
    if any(key.startswith(head) for key in [*info["missing_keys"], *(k for k, *_ in info["mismatched_keys"])]):
        raise ConfigError(
            f"the {what} at {path!r} has no trained scalar head (it looks like a causal LM): train one with "
            "tether rm, or name a reward function (module:function)"
        )
    check_scalar_model(model, what, path)
    return model


def load_scalar_backbone(path: str, what: str, init_head, how: str, say=print, **options):
    """A one-label ``AutoModelForSequenceClassification`` from any checkpoint: a scalar model
    keeps its head; from a causal LM (or a classifier with other labels) Hugging Face builds the
    backbone with a new head, which ``init_head(model)`` draws (``how`` says how), said once."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the new head; we say it below
    try:
        model, info = load_pretrained(
            AutoModelForSequenceClassification, path, f"{what} backbone", num_labels=1,
            ignore_mismatched_sizes=True, output_loading_info=True, **{"dtype": torch.float32, **options},
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_scalar_model(model, what, path)
    head_prefix = "score." if hasattr(model, "score") else "classifier."
    new_keys = [*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])]
    if any(key.startswith(head_prefix) for key in new_keys):
        init_head(model)
        say(f"{path} has no one-label scalar head: the {what} starts from a fresh one ({how})")
    if model.config.pad_token_id is None:  # HF's own pooling needs it; a trainer sets the tokenizer's
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def zero_head(model: nn.Module) -> None:
    """A scalar head of zeros: every value starts at 0, as in lm-human-preferences."""
    for layer in scalar_head(model).modules():
        if isinstance(layer, nn.Linear):
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def is_scalar_model(model) -> bool:
    """A reward or value model: a Hugging Face sequence classifier (a config and a ``score`` or
    ``classifier`` head), as opposed to any other callable that returns scores."""
    return isinstance(model, nn.Module) and hasattr(model, "config") and (
        hasattr(model, "score") or hasattr(model, "classifier")
    )


def is_causal_lm(model) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "config") and type(model).__name__.endswith("ForCausalLM")


def check_scalar_model(model: nn.Module, what: str, path: str = "") -> None:
    labels = getattr(model.config, "num_labels", 1)
    where = f" at {path!r}" if path else ""
    if labels != 1:
        raise ConfigError(f"the {what}{where} has {labels} labels; a reward or value model needs exactly one (num_labels=1)")
    if not hasattr(model, "score") and not hasattr(model, "classifier"):
        raise ConfigError(f"the {what}{where} has no scalar head ('score' or 'classifier' layer)")


def value_model_from_policy(policy: PreTrainedModel) -> PreTrainedModel:
    """A value model sharing the policy's starting weights, with a zero-initialised scalar head.

    Used when the reward is a function and no value model is given; a zero head starts every
    value at 0, as in lm-human-preferences.
    """
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    value_model = AutoModelForSequenceClassification.from_config(config)
    backbone = getattr(policy, policy.base_model_prefix)
    getattr(value_model, value_model.base_model_prefix).load_state_dict(backbone.state_dict())
    zero_head(value_model)
    return value_model.to(dtype=next(policy.parameters()).dtype)


def scalar_head(model: nn.Module) -> nn.Module:
    return model.score if hasattr(model, "score") else model.classifier


def bare_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed / FSDP wrappers and a PEFT adapter (whose
    LoRA layers live inside it, so its forward still uses the adapter)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if is_peft_model(model):
        model = model.get_base_model()
    return model


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def probing(model: nn.Module, device: torch.device):
    """For a one-time check of what a model computes: eval mode, no gradients, no autocast;
    the model's training mode is restored after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        model.train(training)


def enable_gradient_checkpointing(model: nn.Module, options: dict | None = None) -> None:
    """Recompute each layer's activations in backward (the value model's backbone too: the
    flag is set on every layer that supports it). Non-reentrant checkpointing by default (it
    needs no input that requires grad, so a LoRA model with frozen embeddings works as well);
    ``options``: ``gradient_checkpointing_kwargs``."""
    bare = bare_model(model)
    if not getattr(bare, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(bare).__name__} does not support it; set it to false")
    options = {"use_reentrant": False, **(options or {})}
    if hasattr(bare, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        bare.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        bare.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


class DropoutOff:
    """Dropout switched off in models, undoably: every ``nn.Dropout``'s rate, the float
    ``*dropout*`` attributes attention layers copy from the config when built (Llama's
    ``attention_dropout``), and those config values (``attn_pdrop`` ...). Dropout makes old and
    new logprobs differ with no update at all (ppo-details 7, P12).

    ``restore()`` puts the models back as they came (a trainer does after training), and
    ``original_configs()`` puts the config values back while a model is saved, so a saved
    ``config.json`` keeps the values the model came with."""

    def __init__(self, *models: nn.Module):
        self._modules: list[tuple[object, str, float]] = []
        self._configs: list[tuple[object, str, float]] = []
        seen_configs: dict[int, object] = {}
        for model in models:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    self._modules.append((module, "p", module.p))
                for key, value in list(vars(module).items()):
                    if isinstance(value, float) and "dropout" in key:
                        self._modules.append((module, key, value))
                config = getattr(module, "config", None)
                if config is not None:
                    seen_configs[id(config)] = config
        for config in seen_configs.values():
            for key, value in list(vars(config).items()):
                if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
                    self._configs.append((config, key, value))
        self.apply()

    def apply(self) -> None:
        for owner, key, _ in (*self._modules, *self._configs):
            setattr(owner, key, 0.0)

    def restore(self) -> None:
        for owner, key, value in (*self._modules, *self._configs):
            setattr(owner, key, value)

    @contextlib.contextmanager
    def original_configs(self):
        current = [getattr(owner, key) for owner, key, _ in self._configs]
        for owner, key, value in self._configs:
            setattr(owner, key, value)
        try:
            yield
        finally:
            for (owner, key, _), value in zip(self._configs, current):
                setattr(owner, key, value)


def disable_dropout(*models: nn.Module) -> DropoutOff:
    """Dropout off everywhere in ``models`` (see ``DropoutOff``); returns the undo."""
    return DropoutOff(*models)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length")


def check_positions(model: nn.Module, needed: int, what: str, because: str, fix: str) -> str | None:
    """Refuse ``needed`` positions where ``model`` learned fewer absolute ones (a GPT-2 with 1024
    would fail with an index error, or a device-side assert on a GPU); where its positions are
    rotary, return the warning that the rest are extrapolated (None: they fit). ``because`` says
    what needs them, ``fix`` which fields to lower."""
    config = getattr(bare_model(model), "config", None)
    found = [(name, getattr(config, name)) for name in POSITION_FIELDS if isinstance(getattr(config, name, None), int)]
    if not found or needed <= found[0][1]:
        return None
    name, limit = found[0]
    learned = any(
        isinstance(module, nn.Embedding) and ("pos" in module_name.rsplit(".", 1)[-1] or module_name.endswith("wpe"))
        for module_name, module in bare_model(model).named_modules()
    )
    if learned:
        raise ConfigError(f"{because} {needed} positions but the {what} has {limit} ({name}); {fix} to fit {limit}")
    return f"{because} {needed} positions, past the {limit} ({name}) of the model: rotary positions beyond are extrapolated"


def check_token_ids(model: nn.Module, sequences: dict[str, list[list[int]]], what: str) -> None:
    """Every id of ``sequences`` (``{"training row": [ids, ...], ...}``) must name one of
    ``model``'s embeddings; ids given as data (token-id columns) are checked nowhere else."""
    rows = model.get_input_embeddings().num_embeddings
    for kind, rows_ids in sequences.items():
        for row, ids in enumerate(rows_ids):
            if ids and not 0 <= min(ids) <= max(ids) < rows:
                raise DataError(
                    f"{kind} {row} has a token id outside the {what}'s {rows} embeddings (0 to {rows - 1}); "
                    "the ids were made with a different tokenizer"
                )


def check_vocabulary(tokenizer, model: nn.Module, what: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the {what} embeds only {rows}; "
            "use the tokenizer the model was trained with, or resize the model's embeddings"
        )
