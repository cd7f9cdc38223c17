"""The rewards of a run, as the user names them: functions, reward models, or paths to either.

PPO takes one reward; GRPO and RLOO a list (``reward_funcs``), summed with ``reward_weights``.
Each becomes a ``RewardSource``: a ``RewardFunction`` (``scoring/functions.py``), or a frozen
reward model that reads the policy's token ids, or, when it comes with a tokenizer that makes
other ids, the prompt and response text re-encoded with that tokenizer
(``scoring/reward.py: reward_model_sequences``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from tether.data.prompts import is_chat
from tether.errors import ConfigError, TetherError
from tether.models.loading import (
    check_scalar_model,
    ensure_pad_token,
    freeze,
    is_scalar_model,
    load_own_tokenizer,
    load_scalar_model,
)
from tether.scoring.functions import RewardFunction, import_reward_function, is_function_spec
from tether.scoring.reward import reward_model_sequences, same_tokenization


@dataclass
class RewardSource:
    """One reward: ``function``, or ``model`` (frozen; ``tokenizer``: its own, when it makes
    other ids than the policy's, else None). ``forward`` is what the model's passes run through
    (the model itself, or an engine's wrapper of it: set by the trainer)."""

    name: str
    function: RewardFunction | None = None
    model: nn.Module | None = None
    tokenizer: object | None = None
    forward: nn.Module | None = None


def resolve_reward(spec, config, policy_tokenizer, prompt_values: list, tokenizer=None, say=print) -> RewardSource:
    """A ``RewardSource`` of ``spec``: a callable, a sequence classifier with one label, a
    ``module:function`` / ``file.py:function`` string, or a reward model's path (its own
    tokenizer, saved beside it, loaded too). ``tokenizer``: the model's tokenizer, given from
    Python. A model whose tokenizer makes other ids than ``policy_tokenizer`` scores the text."""
    if isinstance(spec, str):
        if is_function_spec(spec):
            function = RewardFunction(import_reward_function(spec))
            return RewardSource(function.name, function=function)
        options = config.model_options(own_revision=False)
        options.pop("quantization_config", None)  # only the trained model is quantized
        path, spec = spec, load_scalar_model(spec, "reward model", **options)
        if tokenizer is None:
            tokenizer = load_own_tokenizer(path, config.trust_remote_code, warn=say)
    if is_scalar_model(spec):  # a sequence classifier; any other callable (a judge module too) is a function
        check_scalar_model(spec, "reward model")
        name = os.path.basename(str(getattr(spec.config, "_name_or_path", "") or "").rstrip("/")) or type(spec).__name__
        own = own_tokenizer(tokenizer, policy_tokenizer, prompt_values, say)
        return RewardSource(name, model=freeze(spec), tokenizer=own)
    if callable(spec):
        function = RewardFunction(spec)
        return RewardSource(function.name, function=function)
    raise ConfigError(f"a reward must be a reward model, a callable or a string naming one; got {type(spec).__name__}")


def own_tokenizer(tokenizer, policy_tokenizer, prompt_values: list, say):
    """``tokenizer`` when it makes other ids than the policy's (the reward model then scores
    text re-encoded with it), else None; checked on the first prompt now, and said once."""
    if same_tokenization(policy_tokenizer, tokenizer):
        return None
    ensure_pad_token(tokenizer, warn=lambda message: say(f"reward tokenizer: {message}"))
    chats = [value for value in prompt_values if is_chat(value)]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the prompts are chats but the reward model's own tokenizer has no chat_template; give the "
            "reward model a tokenizer with one (reward_tokenizer= from Python), or use text prompts"
        )
    try:  # the first prompt with a placeholder response, so a template that cannot fails now
        reward_model_sequences(tokenizer, [chats[0] if chats else "x"], ["ok"], [True])
    except TetherError as error:
        raise ConfigError(f"the reward model's own tokenizer cannot encode a prompt and its response: {error}") from None
    say("note: the reward model has its own tokenizer: it scores prompt + response text encoded with it")
    return tokenizer
