"""A TRL script's trainer call, taken as it is written.

TRL 1.12's trainers name their arguments ``args`` (the config), ``processing_class`` (the
tokenizer), ``model``, ``ref_model`` and ``reward_model``; tether's name them for what they are
(``config``, ``tokenizer``, ``policy``, ``ref_policy``, ``reward``). With ``takes_trl_names`` on its
``__init__``, a trainer takes either spelling, so a TRL script's call runs unchanged, e.g.
``GRPOTrainer(model="Qwen/Qwen3-0.6B", reward_funcs=reward_len, args=config, train_dataset=rows)``.
What else a TRL call may leave to the trainer, tether does as TRL does:

* ``model`` as a name or path: the trainer loads it with the config's model options (``dtype``,
  ``attn_implementation``, quantization ...), and it becomes the config's ``model_name_or_path``
  where that is unset;
* no ``processing_class``: the tokenizer of that name or path (of ``model.config._name_or_path``
  for a loaded model);
* no ``args``: the trainer's config with its defaults;
* ``peft_config``: a ``peft.LoraConfig`` (or its fields as a dict), the adapter the config's own
  ``peft_config`` field gives; both set is refused.

TRL's hooks into the Hugging Face ``Trainer`` (``data_collator``, ``callbacks``, ``optimizers`` ...)
have no counterpart here. Given with a value, each is refused in one line that says what to
do instead: training without it would train something else than the script asked for.
Arguments are matched by name only; TRL's positional order differs from tether's.
"""

from __future__ import annotations

import copy
import functools
import inspect

from tether.errors import ConfigError

# tether's name of each TRL name, for every trainer (a trainer adds its own, e.g. model -> policy)
SHARED_NAMES = {"args": "config", "processing_class": "tokenizer"}

# TRL arguments with no counterpart, and what to do instead
NOT_TAKEN = {
    "data_collator": "tether pads and batches the rows itself; leave it out",
    "callbacks": "tether has no callbacks; its metrics go to metrics.jsonl and the trackers of report_to",
    "optimizers": "set optim, learning_rate, lr_scheduler_type and lr_scheduler_kwargs in the config",
    "optimizer_cls_and_kwargs": "set optim and optim_args in the config",
    "compute_metrics": "tether logs its own evaluation metrics; leave it out",
    "compute_loss_func": "choose the loss with the config's fields (loss_type where there is one)",
    "preprocess_logits_for_metrics": "tether never holds whole logits for metrics; leave it out",
    "formatting_func": "format the rows before passing them (e.g. dataset.map), or use prompt/completion columns",
    "quantization_config": "set load_in_4bit or load_in_8bit (and the bnb_4bit_* fields) in the config",
    "tools": "tether samples plain completions; leave it out",
    "rollout_func": "tether samples plain completions; leave it out",
    "environment_factory": "tether samples plain completions; leave it out",
}

# PEFT's bookkeeping fields of a LoraConfig: tether sets each model's task type itself
_LORA_BOOKKEEPING = ("task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")


def takes_trl_names(model_argument: str = "model", **names: str):
    """Let the decorated trainer ``__init__`` take TRL's argument names (``names``: TRL's name
    -> tether's, besides ``SHARED_NAMES``). ``model_argument`` is tether's name of the argument
    a TRL call may give as a name or path; the trainer class says how to load it
    (``load_trl_model(path, config)``) and which config class it takes (``config_class``)."""
    renames = {**SHARED_NAMES, **names}

    def decorate(init):
        signature = inspect.signature(init)

        @functools.wraps(init)
        def init_with_trl_names(self, *args, **kwargs):
            trainer = type(self).__name__
            kwargs = _tether_names(trainer, kwargs, renames)
            peft_config = kwargs.pop("peft_config", None)
            call = signature.bind_partial(self, *args, **kwargs).arguments
            call["config"] = _config(type(self), call.get("config"), peft_config, trainer)
            model = call.get(model_argument)
            path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
            if isinstance(model, str):
                if not call["config"].model_name_or_path:
                    call["config"] = _with(call["config"], model_name_or_path=model)
                call[model_argument] = type(self).load_trl_model(model, call["config"])
            if call.get("tokenizer") is None and model is not None:
                call["tokenizer"] = _tokenizer(path, call["config"], trainer)
            return init(**call)

        return init_with_trl_names

    return decorate


def _tether_names(trainer: str, kwargs: dict, renames: dict) -> dict:
    """``kwargs`` with TRL's names as tether's; the hooks tether does not take refused."""
    for name, advice in NOT_TAKEN.items():
        value = kwargs.pop(name, None)
        if value is not None and value != (None, None):
            raise ConfigError(f"{trainer}: {name} is a TRL argument tether does not take; {advice}")
    renamed = {}
    for name, value in kwargs.items():
        ours = renames.get(name, name)
        if ours in renamed or (ours != name and ours in kwargs):
            raise ConfigError(f"{trainer}: {name} and {ours} name the same argument; pass one")
        renamed[ours] = value
    return renamed


def _config(trainer_class, config, peft_config, trainer: str):
    """The trainer's config: ``config``, or its defaults; with a ``peft_config`` argument, a
    copy with those LoRA settings (the user's config object is left as it is)."""
    if config is None:
        config = trainer_class.config_class()
    if peft_config is None:
        return config
    if not hasattr(config, "peft_config"):
        raise ConfigError(f"{trainer}: peft_config is not a setting of {type(config).__name__}")
    if config.peft_config or getattr(config, "use_peft", False):
        raise ConfigError(
            f"{trainer}: the peft_config argument and the config's {'peft_config' if config.peft_config else 'use_peft'} "
            "both ask for LoRA; give one"
        )
    return _with(config, peft_config=lora_fields(peft_config, trainer))


def lora_fields(peft_config, trainer: str = "trainer") -> dict:
    """A ``peft.LoraConfig`` as the fields that differ from PEFT's defaults (a dict as it is):
    what the config's ``peft_config`` field holds, and what its saved config.yaml records."""
    if isinstance(peft_config, dict):
        return dict(peft_config)
    import peft

    if not isinstance(peft_config, peft.LoraConfig):
        raise ConfigError(f"{trainer}: peft_config must be a peft.LoraConfig (tether trains LoRA adapters), "
                          f"not {type(peft_config).__name__}")
    defaults = peft.LoraConfig().to_dict()
    fields = {}
    for key, value in peft_config.to_dict().items():
        if key in _LORA_BOOKKEEPING or value == defaults.get(key):
            continue
        fields[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return fields


def _with(config, **values):
    changed = copy.copy(config)
    for name, value in values.items():
        setattr(changed, name, value)
    return changed


def _tokenizer(path: str | None, config, trainer: str):
    if not path:
        raise ConfigError(f"{trainer}: no processing_class (tokenizer) given, and the model names no path to load "
                          "one from; pass processing_class=")
    from tether.logging import console
    from tether.models.loading import load_tokenizer

    revision = config.model_revision if path == config.model_name_or_path else None
    return load_tokenizer(path, config.trust_remote_code, lambda message: console.print(f"[yellow]{message}"),
                          revision)


def load_causal_model(path: str, config):
    """A policy named by a TRL call's ``model``, loaded as ``tether <command>`` loads it."""
    from tether.models.loading import load_causal_lm

    return load_causal_lm(path, **config.model_options(own_revision=path == config.model_name_or_path))
