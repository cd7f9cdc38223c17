"""LoRA adapters through PEFT: wrapping, the reference policy, merging for saving.

ppo-details 8 and tether fix 8: the reference must be the *starting* policy. A freshly
initialised LoRA adapter adds exactly zero (its B matrices start at zero), so the base model
with the adapter switched off is the starting policy and costs no memory. An adapter that
arrives already trained is part of the starting policy; its reference is a frozen, merged copy.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from tether.errors import ConfigError
from tether.models.loading import freeze, is_peft_model


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("peft_config needs the peft package: pip install 'tether[peft]'") from None
    return peft


def apply_lora(model: nn.Module, peft_config: dict, task_type: str) -> nn.Module:
    """``model`` with a fresh LoRA adapter from ``peft_config`` (``peft.LoraConfig`` fields);
    ``task_type`` is ``CAUSAL_LM`` (policy) or ``SEQ_CLS`` (value model: head trained in full)."""
    peft = _peft()
    options = {key: value for key, value in peft_config.items() if key != "task_type"}
    try:
        lora = peft.LoraConfig(task_type=task_type, **options)
        with warnings.catch_warnings():  # PEFT reads a transformers property deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            # GPT-2's Conv1D layers store their weight transposed; PEFT sets fan_in_fan_out for
            # each such layer itself and says so once per run, about a setting users never chose
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is `Conv1D`")
            return peft.get_peft_model(model, lora)
    except (TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"config field peft_config: {reason}") from None


def adapter_starts_at_zero(model: nn.Module) -> bool:
    """True when the adapter adds nothing yet: LoRA only, every B matrix exactly zero, and no
    fully trained module copies (``modules_to_save``)."""
    peft = _peft()
    if not all(isinstance(c, peft.LoraConfig) for c in model.peft_config.values()):
        return False
    for name, parameter in model.named_parameters():
        if "modules_to_save" in name:
            return False
        if ("lora_B" in name or "lora_embedding_B" in name) and parameter.detach().any():
            return False
    return True


def with_lora(model: nn.Module, peft_config: dict | None, task_type: str) -> nn.Module:
    """``model`` with a fresh LoRA adapter for ``peft_config``; unchanged without one, or when
    it already is a LoRA model (the adapter it arrived with is the one trained)."""
    if peft_config and not is_peft_model(model):
        return apply_lora(model, peft_config, task_type)
    return model


def policy_and_reference(
    policy: nn.Module, ref_policy: nn.Module | None, peft_config: dict | None
) -> tuple[nn.Module, nn.Module | None]:
    """The trained policy (given a fresh LoRA adapter for ``peft_config``) and its frozen
    reference, the starting policy (fix 8): ``ref_policy`` when given, else a frozen copy, or
    ``None`` for "the policy with its adapter switched off" when the adapter starts at zero."""
    policy = with_lora(policy, peft_config, "CAUSAL_LM")
    if ref_policy is not None:
        return policy, freeze(ref_policy)
    if is_peft_model(policy):
        return policy, None if adapter_starts_at_zero(policy) else freeze(merged_copy(policy))
    return policy, freeze(copy.deepcopy(policy))


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model equal to ``model`` with its adapter merged in; ``model`` is untouched."""
    return copy.deepcopy(model).merge_and_unload()


def merged_from_weights(model: nn.Module, state_dict: dict) -> nn.Module:
    """A plain model equal to the LoRA ``model`` with its adapter merged in, built on the CPU
    from ``state_dict`` (``model``'s whole weights, gathered from an engine that shards them,
    where ``model``'s own parameters are shards that a copy cannot merge)."""
    peft = _peft()
    from transformers import PreTrainedModel

    base = model.get_base_model()
    # The model's own class (a sharding engine may have put a subclass of its own in front).
    kind = next(c for c in type(base).__mro__ if issubclass(c, PreTrainedModel) and not c.__module__.startswith("torch."))
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
    shell = kind._from_config(copy.deepcopy(base.config), dtype=dtype)
    shell = peft.get_peft_model(shell, copy.deepcopy(model.peft_config[model.active_adapter]))
    shell.load_state_dict(state_dict)
    return shell.merge_and_unload()
