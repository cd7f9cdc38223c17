"""A TRL script's trainer call, taken as it is written.

TRL 1.12's trainers name their arguments ``args`` (the config), ``processing_class`` (the
tokenizer), ``model``, ``ref_model`` and ``reward_model``; tether's name them for what they are
(``config``, ``tokenizer``, ``policy``, ``ref_policy``, ``reward``). With ``takes_trl_names`` on its
``__init__``, a trainer takes either spelling, so a TRL script's call runs unchanged, e.g.
``GRPOTrainer(model="Qwen/Qwen3-0.6B", reward_funcs=reward_len, args=config, train_dataset=rows)``.
What else a TRL call may leave to the trainer, tether does as TRL does:

* ``model`` (and a reference, ``ref_model``) as a name or path: the trainer loads it with the
  config's model options (``dtype``, ``attn_implementation``, quantization ...), and the model's
  becomes the config's ``model_name_or_path`` (a different one already there is refused);
* no ``processing_class``: the tokenizer of that name or path (of ``model.config._name_or_path``
  for a loaded model);
* no ``args``: the trainer's config with its defaults;
* ``peft_config``: a ``peft.LoraConfig`` (or its fields as a dict), the adapter the config's own
  ``peft_config`` field gives; refused beside the config's own LoRA settings or a model that
  already is a ``PeftModel`` (as TRL refuses it).

The trainer also answers to TRL's attribute names ``args`` and ``processing_class`` (and GRPO's
and RLOO's ``model``, the policy).

TRL's hooks into the Hugging Face ``Trainer`` (``data_collator``, ``callbacks``, ``optimizers`` ...)
have no counterpart here. Given with a value, each is refused in one line that says what to
do instead: training without it would train something else than the script asked for.
Arguments are matched by name only; TRL's positional order differs from tether's, so a call
whose first positional argument is not the trainer's config is refused with the names to use.
Every mistake here is one line naming the trainer and the argument, before anything loads (but a
model with nothing to train, which shows only once it is loaded).
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import os

from torch import nn

from tether.errors import ConfigError, DataError

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


def takes_trl_names(*loads: str, **names: str):
    """Let the decorated trainer ``__init__`` take TRL's argument names (``names``: TRL's name
    -> tether's, besides ``SHARED_NAMES``). ``loads``: tether's names of the arguments a TRL call
    may give as a name or path, the trained model first (default ``model``); the trainer class
    says how to load one (``load_trl_model(path, config)``) and which config it takes
    (``config_class``)."""
    loads = loads or ("model",)
    renames = {**SHARED_NAMES, **names}
    trl_names = {ours: theirs for theirs, ours in renames.items()}

    def decorate(init):
        signature = inspect.signature(init)
        required = [name for name, parameter in list(signature.parameters.items())[1:]
                    if parameter.default is inspect.Parameter.empty]

        @functools.wraps(init)
        def init_with_trl_names(self, *args, **kwargs):
            trainer_class = type(self)
            trainer = trainer_class.__name__
            if args and not isinstance(args[0], trainer_class.config_class):
                raise ConfigError(
                    f"{trainer}: the first positional argument is the config ({trainer_class.config_class.__name__}), "
                    f"not {type(args[0]).__name__}; TRL's order differs, so pass TRL's arguments by name "
                    "(model=..., args=..., train_dataset=...)"
                )
            kwargs = _tether_names(trainer, kwargs, renames)
            peft_config = kwargs.pop("peft_config", None)
            try:
                call = signature.bind_partial(self, *args, **kwargs).arguments
            except TypeError as error:
                raise ConfigError(f"{trainer}: {error}") from None
            model = call.get(loads[0])
            # a tokenizer left out comes from the model; the config's defaults stand in for none
            missing = [name for name in required if name not in call and name not in ("tokenizer", "config")]
            if "tokenizer" in required and "tokenizer" not in call and model is None:
                missing.append("tokenizer")
            if missing:
                said = [name if name not in trl_names else f"{trl_names[name]} (tether: {name})" for name in missing]
                raise ConfigError(f"{trainer}: missing {', '.join(said)}")
            _check_data(call, trainer_class, trainer)
            call["config"] = _config(trainer_class, call.get("config"), peft_config, model, trainer)
            if isinstance(model, str):
                call["config"] = _with_model_path(call["config"], model, trainer)
            for name in [*loads, *getattr(trainer_class, "trl_scalar_models", ())]:
                if isinstance(call.get(name), str):
                    call[name] = _load(trainer_class, name, call[name], call["config"], trl_names.get(name, name), trainer)
            _refuse_frozen(call.get(loads[0]), call["config"], trainer)
            if call.get("tokenizer") is None and model is not None:
                path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
                call["tokenizer"] = _tokenizer(path, call["config"], trainer)
            return init(**call)

        return init_with_trl_names

    return decorate


class TRLAttributes:
    """TRL's names for what a trainer holds: ``args`` (the config), ``processing_class`` (the tokenizer)."""

    @property
    def args(self):
        return self.config

    @property
    def processing_class(self):
        return self.tokenizer


def _tether_names(trainer: str, kwargs: dict, renames: dict) -> dict:
    """``kwargs`` with TRL's names as tether's; the hooks tether does not take refused (unset,
    or empty, they are TRL's defaults and pass)."""
    for name, advice in NOT_TAKEN.items():
        value = kwargs.pop(name, None)
        if value is not None and value != (None, None) and not (isinstance(value, (list, tuple)) and not value):
            raise ConfigError(f"{trainer}: {name} is a TRL argument tether does not take; {advice}")
    renamed = {}
    for name, value in kwargs.items():
        ours = renames.get(name, name)
        if ours in renamed or (ours != name and ours in kwargs):
            raise ConfigError(f"{trainer}: {name} and {ours} name the same argument; pass one")
        renamed[ours] = value
    return renamed


def _config(trainer_class, config, peft_config, model, trainer: str):
    """The trainer's config: ``config``, or its defaults; with a ``peft_config`` argument, a
    copy with those LoRA settings (the user's config object is left as it is)."""
    expected = trainer_class.config_class
    if config is None:
        config = expected()
    if not isinstance(config, expected):
        if type(config).__module__.split(".")[0] == "trl":
            raise ConfigError(f"{trainer}: args is TRL's {type(config).__name__}; pass tether's, which takes the same "
                              f"field names (from tether import {expected.__name__})")
        hint = f" (from a dict: {expected.__name__}(**values))" if isinstance(config, dict) else ""
        raise ConfigError(f"{trainer}: args must be a tether {expected.__name__}, not {type(config).__name__}{hint}")
    if peft_config is None:
        return config
    from tether.models.loading import is_peft_model

    if model is not None and not isinstance(model, str) and is_peft_model(model):
        raise ConfigError(f"{trainer}: model already is a PeftModel (its adapter trains); leave peft_config out, "
                          "or pass the base model with peft_config")
    if config.peft_config or getattr(config, "use_peft", False):
        raise ConfigError(
            f"{trainer}: the peft_config argument and the config's {'peft_config' if config.peft_config else 'use_peft'} "
            "both ask for LoRA; give one"
        )
    return _with(config, peft_config=lora_fields(peft_config, trainer))


def _with_model_path(config, path: str, trainer: str):
    """``config`` recording the model path a TRL call gave (a different one is refused)."""
    if config.model_name_or_path and not _same_model(config.model_name_or_path, path):
        raise ConfigError(f"{trainer}: model={path!r} and the config's model_name_or_path "
                          f"{config.model_name_or_path!r} name different models; give one")
    return config if config.model_name_or_path else _with(config, model_name_or_path=path)


def _same_model(first: str, second: str) -> bool:
    """Whether two names or paths name one model (a local folder however it is written)."""
    if first == second:
        return True
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def lora_fields(peft_config, trainer: str = "trainer") -> dict:
    """A ``peft.LoraConfig`` (or its fields as a dict) as what the config's ``peft_config`` field
    holds: ``r``, ``lora_alpha`` and every other field that differs from PEFT's defaults, as plain
    values (a set as a sorted list), which the saved config.yaml records."""
    import peft

    if isinstance(peft_config, dict):
        values = {key: value for key, value in peft_config.items() if key not in _LORA_BOOKKEEPING}
        try:
            peft_config = peft.LoraConfig(**values)
        except (TypeError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{trainer}: peft_config: {reason}") from None
    if not isinstance(peft_config, peft.LoraConfig):
        raise ConfigError(f"{trainer}: peft_config must be a peft.LoraConfig (tether trains LoRA adapters), "
                          f"not {type(peft_config).__name__}")
    defaults = peft.LoraConfig().to_dict()
    return {key: _plain(value) for key, value in peft_config.to_dict().items()
            if key not in _LORA_BOOKKEEPING and (key in ("r", "lora_alpha") or value != defaults.get(key))}


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _with(config, **values):
    changed = copy.copy(config)
    for name, value in values.items():
        setattr(changed, name, value)
    return changed


def _check_data(call: dict, trainer_class, trainer: str) -> None:
    """The datasets of a TRL call that tether cannot take, refused in one line: several named
    evaluation sets (or a ``DatasetDict``'s splits), a model or path where a dataset goes (TRL's
    positional order), and a stream where every row is encoded up front."""
    import datasets

    for name in ("train_dataset", "eval_dataset"):
        data = call.get(name)
        if isinstance(data, dict) and data and all(hasattr(v, "column_names") for v in data.values()):
            if name == "train_dataset" or len(data) == 1:
                kind = type(data).__name__ if type(data).__name__.endswith("DatasetDict") else "dict of datasets"
                raise DataError(f"{trainer}: {name} is a {kind} with splits {', '.join(data)}; pass one split, "
                                f"e.g. dataset[{next(iter(data))!r}]")
            raise ConfigError(f"{trainer}: eval_dataset is a dict of {len(data)} datasets; tether evaluates one: "
                              "pass one dataset (datasets.concatenate_datasets joins them)")
        if isinstance(data, (str, nn.Module)):
            raise ConfigError(f"{trainer}: {name} is a {type(data).__name__}, not rows; TRL's positional order differs "
                              "from tether's, so pass TRL's arguments by name (model=..., train_dataset=...)")
        if isinstance(data, datasets.IterableDataset) and not getattr(trainer_class, "streams", False):
            raise ConfigError(f"{trainer}: {name} is a streaming IterableDataset; {trainer} encodes every row before "
                              "training: pass a Dataset (e.g. Dataset.from_list(list(stream.take(n))))")


def _load(trainer_class, name: str, path: str, config, said: str, trainer: str):
    """Argument ``name`` of a TRL call given as a path, loaded by the trainer's ``load_trl_<name>``
    (or ``load_trl_model``); an error names the trainer and the argument."""
    loader = getattr(trainer_class, f"load_trl_{name}", trainer_class.load_trl_model)
    try:
        return loader(path, config)
    except ConfigError as error:
        raise ConfigError(f"{trainer}: {said}: {error}") from None


def _refuse_frozen(model, config, trainer: str) -> None:
    """A model with nothing to train: one that transformers loaded with a PEFT adapter (frozen,
    and not PEFT's own model, which tether could train or save), or all of whose parameters
    are frozen with no LoRA asked for."""
    if model is None or isinstance(model, str) or not hasattr(model, "parameters"):
        return
    how = ("peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_folder, "
           "is_trainable=True), or merge the adapter into the base model first")
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ConfigError(f"{trainer}: model carries a PEFT adapter that transformers loaded (frozen); to train it "
                          f"pass {how}")
    if not any(parameter.requires_grad for parameter in model.parameters()) and not config.lora_settings():
        raise ConfigError(f"{trainer}: model has no trainable parameters; unfreeze them, pass peft_config, or for a "
                          f"saved adapter pass {how}")


def _tokenizer(path: str | None, config, trainer: str):
    if not path:
        raise ConfigError(f"{trainer}: no processing_class (tokenizer) given, and the model names no path to load "
                          "one from; pass processing_class=")
    from tether.logging import console
    from tether.models.loading import load_tokenizer

    revision = config.model_revision if path == config.model_name_or_path else None
    try:
        return load_tokenizer(path, config.trust_remote_code, lambda message: console.print(f"[yellow]{message}"),
                              revision)
    except ConfigError as error:
        raise ConfigError(f"{trainer}: no processing_class given, and {error}; pass processing_class=") from None


def load_causal_model(path: str, config):
    """A causal LM named by a TRL call (``model``, ``ref_model``), loaded as ``tether <command>`` loads one."""
    from tether.models.loading import load_causal_lm

    return load_causal_lm(path, "model", **config.model_options(own_revision=path == config.model_name_or_path))
