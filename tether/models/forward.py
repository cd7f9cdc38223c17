"""Forward passes over ``query_response`` that line outputs up with response tokens.

A query is left-padded to ``Q`` columns and followed by ``T`` response columns. The output
at absolute position ``Q + t - 1`` is the one that predicts (or values the state before)
response token ``t``; that is the ``[Q-1 : -1]`` slice of seed note 1 and ppo-details 5.
The last response token's own output lies past that slice, and attention is causal, so the
token is left out of the input: the kept outputs are the same, one column cheaper. Every
forward passes position ids that skip left padding (ppo-details 4).
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from tether.models.loading import bare_model, is_peft_model, probing, scalar_head
from tether.models.packing import backbone_hidden_states
from tether.ops import position_ids_from_mask, token_logprobs
from tether.ops.logprobs import head_logprobs


def _concat(queries, query_mask, responses, response_mask):
    """``query_response`` less its last column, with its mask and position ids.

    Every output these passes keep is at a position before the last: the one at ``Q + t - 1``
    belongs to response token ``t``, so the last token's own output is never read. Attention
    is causal, so leaving that token out changes no other position and saves one column's
    pass through every layer.
    """
    input_ids = torch.cat([queries, responses[:, :-1]], dim=1)
    attention_mask = torch.cat([query_mask, response_mask[:, :-1]], dim=1)
    return input_ids, attention_mask.long(), position_ids_from_mask(attention_mask)


def _last_columns(outputs: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` columns of ``outputs`` ``[B, L, ...]``: the response's (none for 0)."""
    return outputs[:, outputs.size(1) - width :]


def accepts_argument(model: nn.Module, argument: str) -> bool:
    """Whether the Hugging Face model under any wrapper takes ``argument`` (wrappers pass it on)."""
    forward = getattr(bare_model(model), "forward", model)
    try:
        return argument in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def response_logits(model, queries, query_mask, responses, response_mask) -> torch.Tensor:
    """Policy logits that predict each response token, ``[B, T, V]``.

    Only the ``T`` last positions go through the output layer when the model supports
    ``logits_to_keep``; the prompt's logits are never computed.
    """
    width = responses.size(1)
    input_ids, attention_mask, position_ids = _concat(queries, query_mask, responses, response_mask)
    # transformers reads ``logits_to_keep=0`` as "all of them"; the slice below then keeps none
    kwargs = {"logits_to_keep": max(width, 1)} if accepts_argument(model, "logits_to_keep") else {}
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).logits
    return _last_columns(logits, width)


def policy_logprobs(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    chunk_size: int,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the response tokens under ``model`` at ``temperature`` ``[B, T]``.

    Where the model's logits are exactly its output layer applied to its backbone's hidden
    states (checked once per model, see ``output_layer_split``), the output layer runs in row
    chunks and the ``[B, T, V]`` logits never exist; otherwise the model's own forward pass
    gives the logits (``logits_to_keep`` trims them to the response).

    Only the positions ``response_mask`` keeps are scored: where the output layer runs in
    chunks it runs on those tokens alone and the other positions are zeros, so callers mask
    them out (as every loss and metric does).

    An ``Actor``, bare or inside an engine's wrapper, is called instead: the wrapper's own
    forward is what DDP / FSDP / DeepSpeed must see, and the policy inside takes the path above.
    """
    if isinstance(bare_model(model), Actor):
        return model(queries, query_mask, responses, response_mask, temperature, chunk_size, with_entropy, entropy_grad)
    split = output_layer_split(model)
    if split is None:
        logits = response_logits(model, queries, query_mask, responses, response_mask)
        return token_logprobs(logits, responses, temperature, chunk_size, with_entropy, entropy_grad)
    backbone, head = split
    width = responses.size(1)
    input_ids, attention_mask, position_ids = _concat(queries, query_mask, responses, response_mask)
    hidden = _last_columns(backbone_hidden_states(backbone, input_ids, attention_mask, position_ids), width)
    kept = response_mask.bool()
    if bool(kept.all()):
        return head_logprobs(hidden, head.weight, head.bias, responses, temperature, chunk_size, with_entropy, entropy_grad)
    # the output layer on the kept tokens alone: nothing after a response's stop token costs a
    # vocabulary-wide product
    logprobs, entropy = head_logprobs(
        hidden[kept].unsqueeze(0), head.weight, head.bias, responses[kept].unsqueeze(0), temperature, chunk_size,
        with_entropy, entropy_grad,
    )
    return _spread(logprobs, kept), _spread(entropy, kept) if entropy is not None else None


def _spread(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[1, N]`` numbers of the kept positions -> ``[B, T]``, zeros elsewhere."""
    return torch.zeros(kept.shape, dtype=values.dtype, device=values.device).masked_scatter(kept, values[0])


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, tuple | None]" = weakref.WeakKeyDictionary()


def output_layer_split(model) -> tuple[nn.Module, nn.Linear] | None:
    """``(backbone, output layer)`` of a causal LM whose logits are ``output_layer(backbone(x))``.

    A PEFT model splits like the model inside it, whose LoRA layers stay in place (so the
    adapter, and disabling it, still apply); an adapter on the output layer itself leaves it no
    plain ``nn.Linear``. Architectures that scale or soft-cap their logits, adapters that add
    virtual tokens, engine wrappers (DDP, FSDP, DeepSpeed: gradients must go through their own
    forward), sharded models (ZeRO-3, FSDP: a weight is whole only inside its own module's
    forward) and custom heads fail the check and get ``None``: they keep their own forward pass.
    The answer depends on the architecture, not the weights, so it is computed once per model,
    on four tokens in fp32.
    """
    if model in _SPLITS:
        return _SPLITS[model]
    split = None
    inner = model.get_base_model() if is_peft_model(model) else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    plain_head = type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
    if isinstance(backbone, nn.Module) and backbone is not inner and plain_head and not sharded(inner):
        split = (backbone, head) if _split_matches(model, backbone, head) else None
    _SPLITS[model] = split
    return split


def next_token_nll(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Negative log-likelihood (scalar, fp32) of each token that follows a ``loss_mask``
    position: ``loss_mask`` is ``[B, L - 1]``, True where position ``j``'s prediction of token
    ``j + 1`` counts. Only those positions reach the output layer; where the model splits
    (``output_layer_split``) it runs in row chunks on the packed backbone's hidden states, so
    no ``[B, L, V]`` logits exist. A ``NextTokenLoss`` (bare or wrapped) is called instead.
    """
    if isinstance(bare_model(model), NextTokenLoss):
        return model(input_ids, attention_mask, loss_mask)
    labels = input_ids[:, 1:][loss_mask]  # [N]
    position_ids = position_ids_from_mask(attention_mask)
    split = output_layer_split(model)
    if split is None:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids, use_cache=False
        ).logits[:, :-1]  # [B, L - 1, V]: position j predicts token j + 1
        return torch.nn.functional.cross_entropy(logits[loss_mask].float(), labels, reduction="sum")
    backbone, head = split
    hidden = backbone_hidden_states(backbone, input_ids, attention_mask.long(), position_ids)[:, :-1][loss_mask]
    logprobs, _ = head_logprobs(hidden.unsqueeze(0), head.weight, head.bias, labels.unsqueeze(0))
    return -logprobs.sum()


def sharded(model: nn.Module) -> bool:
    """Whether an engine shards ``model``'s parameters: DeepSpeed ZeRO-3 marks them with
    ``ds_id``, FSDP makes them ``DTensor`` (FSDP2) or wraps modules (FSDP1)."""
    if any(hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor" for parameter in model.parameters()):
        return True
    return any(type(module).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for module in model.modules())


def _split_matches(model, backbone, head) -> bool:
    device = head.weight.device
    ids = torch.arange(4, device=device).remainder(head.weight.size(0)).unsqueeze(0)
    mask = torch.ones_like(ids)  # all real: without one, a model warns when an id is the pad id
    try:
        with probing(model, device):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return bool(torch.allclose(head(hidden).float(), logits.float(), rtol=1e-4, atol=1e-5))
    except Exception:  # any model that does not take these arguments keeps its own forward pass
        return False


def last_hidden_state(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The backbone's final hidden states ``[B, L, H]`` of a sequence-classification model
    (zeros at padded positions where the backbone runs packed)."""
    model = bare_model(model)
    return backbone_hidden_states(getattr(model, model.base_model_prefix), input_ids, attention_mask, position_ids)


def reward_bias(model) -> float:
    """Offset stored in the config by reward normalisation (0 for a model never normalised)."""
    return float(getattr(model.config, "reward_bias", 0.0) or 0.0)


def scalar_outputs(model, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states ``[B, L, H]`` -> ``[B, L, 1]``, less the stored bias."""
    model = bare_model(model)
    return scalar_head(model)(hidden) - reward_bias(model)


def critic_values(model, queries, query_mask, responses, response_mask) -> torch.Tensor:
    """Value of the state before each response token, ``[B, T]``, from the full query_response.

    A value model copied from a normalised reward model starts from the same numbers the reward
    model gives, bias included.
    """
    width = responses.size(1)
    input_ids, attention_mask, position_ids = _concat(queries, query_mask, responses, response_mask)
    if isinstance(bare_model(model), Critic):
        outputs = model(input_ids, attention_mask, position_ids)  # through DDP / FSDP, which must see it
    else:
        outputs = scalar_outputs(model, last_hidden_state(model, input_ids, attention_mask, position_ids))
    return _last_columns(outputs, width).squeeze(-1).float()


class _ModelPass(nn.Module):
    """One model and a forward pass of tether's over it, as one module for an engine to wrap: a
    DDP or FSDP wrapper synchronises gradients only for what runs through its own ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP's per-layer wrapping reads it


class Actor(_ModelPass):
    """A policy whose ``forward`` gives ``policy_logprobs``. Wrapped around this module instead
    of the bare policy, DDP lets the update keep the chunked output layer and the packed
    backbone, where a wrapped bare policy has to run its own forward and make the ``[B, T, V]``
    logits."""

    def forward(self, queries, query_mask, responses, response_mask, temperature, chunk_size, with_entropy, entropy_grad):
        return policy_logprobs(
            self.model, queries, query_mask, responses, response_mask, temperature, chunk_size, with_entropy, entropy_grad
        )


class NextTokenLoss(_ModelPass):
    """A causal LM whose ``forward`` gives ``next_token_nll``: what DDP wraps in ``sft``, for
    the reason given at ``Actor``."""

    def forward(self, input_ids, attention_mask, loss_mask) -> torch.Tensor:
        return next_token_nll(self.model, input_ids, attention_mask, loss_mask)


class Critic(_ModelPass):
    """A value model's backbone and scalar head as one module, ``forward`` -> ``[B, L, 1]``.

    The values come from the backbone's hidden states, not the model's own forward (which
    scores the last token only). The trainer has the engine wrap this module, never the bare
    model (see ``_ModelPass``).
    """

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = last_hidden_state(self.model, input_ids, attention_mask, position_ids)
        return scalar_outputs(self.model, hidden)
