"""Backbone forward passes over the real tokens only ("packed"), for padded batches.

A batch of prompts of different lengths is left-padded, and responses that stop early are
padded on the right; every padded position costs a full pass through every layer's linear
maps, the bulk of the work. Those maps act on each token alone, so the backbone can run on
the ``N`` real tokens laid end to end as one row ``[1, N]``, with position ids that restart
in each sequence. Only attention needs the rows apart: inside it the queries, keys and values
are put back in rows, one sequence per row from its first column, ``sdpa`` runs causal with
no mask, and the real positions are taken out again. The hidden states at real positions
are those of the padded pass, to rounding (attention sums the same keys in its own blocks);
padded positions come back as zeros, which every caller masks out.

It applies to a backbone that uses transformers' ``sdpa`` attention, full attention in every
layer, and passes the keyword arguments of its forward to its attention function. Whether a
given model does is tested once per model (``_packing_matches``): a tiny padded batch must
give the same hidden states both ways, so a model that does something else keeps the padded
pass. A batch with less than ``MIN_PADDING`` of its positions padded also keeps it: the
copies in and out of attention cost about 2% of the pass.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from tether.models.loading import probing
from tether.ops import position_ids_from_mask

PACKED_ATTENTION = "tether_packed_sdpa"
MIN_PADDING = 0.05


def backbone_hidden_states(backbone: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The backbone's final hidden states ``[B, L, H]`` for left/right-padded ``input_ids``.

    Packed (see the module's notes) where the model supports it and at least ``MIN_PADDING``
    of the positions are padding; the values at padded positions are then zeros.
    """
    if (
        _packing_supported(backbone)
        and not _checkpointed(backbone)
        and 1 - attention_mask.float().mean().item() >= MIN_PADDING
    ):
        return _packed_hidden_states(backbone, input_ids, attention_mask, position_ids)
    return _padded_hidden_states(backbone, input_ids, attention_mask, position_ids)


def _padded_hidden_states(backbone, input_ids, attention_mask, position_ids) -> torch.Tensor:
    return backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


@dataclass(frozen=True)
class PackedLayout:
    """Where the ``N`` packed tokens sit in the padded ``[rows, width]`` batch, and in the
    ``[rows, length]`` one attention runs on.

    Attention puts each sequence's tokens at columns ``0 .. n - 1`` of its row, whatever
    padding it had, with ``length`` the longest sequence. Causal attention alone is then the
    right mask: a real query at column ``j`` sees exactly its own sequence's tokens up to
    ``j``. Padding after a sequence only sees what comes before it, and its output is dropped.
    """

    index: torch.Tensor  # [N] flat positions ``row * width + column`` of the real tokens
    rows: int
    width: int
    aligned: torch.Tensor  # [N] flat positions ``row * length + rank in its sequence``
    length: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "PackedLayout":
        real = attention_mask.bool()
        rows, width = real.shape
        counts = real.sum(1)
        length = int(counts.max())
        rank = real.long().cumsum(1) - 1  # each real token's place in its own sequence
        aligned = torch.arange(rows, device=real.device).unsqueeze(1) * length + rank
        return cls(real.flatten().nonzero().squeeze(1), rows, width, aligned[real], length)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``[rows, width, ...]`` -> ``[1, N, ...]``."""
        return padded.flatten(0, 1).index_select(0, self.index).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, N, ...]`` -> ``[rows, width, ...]``, zeros at padded positions."""
        return _scatter(packed[0], self.index, self.rows, self.width)

    def to_sequences(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, N, ...]`` -> ``[rows, length, ...]``: each sequence from column 0, zeros after."""
        return _scatter(packed[0], self.aligned, self.rows, self.length)

    def from_sequences(self, rows: torch.Tensor) -> torch.Tensor:
        """``[rows, length, ...]`` -> ``[1, N, ...]``."""
        return rows.flatten(0, 1).index_select(0, self.aligned).unsqueeze(0)


def _scatter(flat: torch.Tensor, index: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    padded = flat.new_zeros(rows * width, *flat.shape[1:]).index_copy(0, index, flat)
    return padded.view(rows, width, *flat.shape[1:])


def _packed_hidden_states(backbone, input_ids, attention_mask, position_ids) -> torch.Tensor:
    layout = PackedLayout.of(attention_mask)
    # The packed row holds real tokens only, so it needs no mask; handed ids without one, a
    # model warns that they may be padded whenever the pad id (often EOS) opens or ends the
    # row. The ids are embedded here instead, by the model's own embedding layer.
    embeddings = backbone.get_input_embeddings()(layout.pack(input_ids))
    with _attention_implementation(backbone.config, PACKED_ATTENTION):
        hidden = backbone(
            inputs_embeds=embeddings, position_ids=layout.pack(position_ids), attention_mask=None,
            use_cache=False, tether_packed_layout=layout,
        ).last_hidden_state
    return layout.unpack(hidden)


def packed_sdpa_attention(module, query, key, value, attention_mask, tether_packed_layout=None, **kwargs):
    """transformers' ``sdpa`` attention for packed ``[1, heads, N, D]`` inputs: run causal, on
    one row per sequence (``PackedLayout``), returned packed as ``[1, N, heads, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = tether_packed_layout
    if layout is None:
        raise RuntimeError("packed attention called without a layout")  # the model did not pass it on

    def sequences(states):  # [1, h, N, D] -> [rows, h, length, D]
        return layout.to_sequences(states.transpose(1, 2)).transpose(1, 2)

    # no mask: sdpa's causal mask is the whole mask here (a model that is not causal fails
    # ``_packing_matches`` and keeps the padded pass)
    output, _ = sdpa_attention_forward(module, sequences(query), sequences(key), sequences(value), None, **kwargs)
    return layout.from_sequences(output), None  # output: [rows, length, h, D]


def _no_mask(*args, **kwargs):
    """The mask transformers would build for the packed row: none, the layout carries it."""
    return None


def _configs(config) -> list:
    """``config`` and its sub-configs (a multimodal model's text and vision parts), nested."""
    found = [config]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found.extend(_configs(sub))
    return found


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """``name`` as the attention of ``config`` and its sub-configs, each one's own restored after."""
    configs = _configs(config)
    previous = [c._attn_implementation_internal for c in configs]
    config._attn_implementation = name
    try:
        yield
    finally:
        for c, value in zip(configs, previous):
            c._attn_implementation_internal = value


# --- which models can run packed -------------------------------------------------------

_SUPPORTED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _packing_supported(backbone: nn.Module) -> bool:
    """Whether ``backbone`` gives the same hidden states packed (answered once per model, the
    first time it is asked: on every process at the same point, as a sharded model needs)."""
    if backbone not in _SUPPORTED:
        _SUPPORTED[backbone] = _full_sdpa_attention(getattr(backbone, "config", None)) and _packing_matches(backbone)
    return _SUPPORTED[backbone]


def _checkpointed(backbone: nn.Module) -> bool:
    """Activation checkpointing recomputes the layers during the backward pass, after the packed
    attention is switched off again; such a backbone keeps the padded pass. Checked: the
    transformers flag, and torch's ``checkpoint_wrapper`` (FSDP's activation checkpointing)."""
    return any(
        getattr(module, "gradient_checkpointing", False) is True or hasattr(module, "_checkpoint_wrapped_module")
        for module in backbone.modules()
    )


def _full_sdpa_attention(config) -> bool:
    """``sdpa`` attention over the whole sequence in every layer, in the config and every
    sub-config: a sliding window or chunked attention lives in the mask this module replaces
    (and the one-time check's few tokens fit in any window)."""
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    return all(_full_attention(c) for c in _configs(config))


def _full_attention(config) -> bool:
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not windowed and getattr(config, "attention_chunk_size", None) is None


def _packing_matches(backbone: nn.Module) -> bool:
    """A left-padded and a right-padded row give the same hidden states packed as padded."""
    _register()
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        return False
    device = embeddings.weight.device
    input_ids = torch.arange(1, 13, device=device).remainder(embeddings.num_embeddings).view(2, 6)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], device=device)
    position_ids = position_ids_from_mask(attention_mask)
    try:
        with probing(backbone, device):
            padded = _padded_hidden_states(backbone, input_ids, attention_mask, position_ids)
            packed = _packed_hidden_states(backbone, input_ids, attention_mask, position_ids)
    except Exception:  # a model that does not take these arguments keeps the padded pass
        return False
    real = attention_mask.bool()
    padded, packed = padded[real].float(), packed[real].float()
    tolerance = 1e-4 if embeddings.weight.dtype == torch.float32 else 2e-2
    return bool((packed - padded).abs().max() <= tolerance * padded.abs().max().clamp(min=1.0))


@functools.cache
def _register() -> None:
    """Make ``PACKED_ATTENTION`` a name transformers' attention layers and masks look up."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)
