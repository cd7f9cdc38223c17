"""``torch_compile``: the trained models' decoder layers compiled with ``torch.compile``.

Each decoder layer of a trained model (the block a backbone repeats: norms, attention with
tether's packed layout, rotary embeddings, MLP, residuals) is compiled in place, with dynamic
shapes, so one graph serves every batch's token count and row lengths (the layers share it) and
the element-wise work between the matrix multiplies is fused. What stays eager, and why:

* decoding (``eager_decoding``): each new token's cache length is a new shape, and a rollout's
  steps are too small for fusion to pay back the compile (measured: ``bench/RESULTS.md``);
* frozen models (reference, reward): they run forward only, once per rollout.

Compiling in place leaves the parameters, the state-dict keys and what ``save_model`` writes
unchanged. The first batches of each kind (training pass with and without gradients) pay the
compile time; the update is the eager one to rounding (``tests/test_compile.py``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tether.errors import ConfigError
from tether.models.loading import bare_model

RECOMPILE_LIMIT = 64


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The backbone's repeated block: a ``ModuleList`` of ``num_hidden_layers`` modules of one type."""
    bare = bare_model(model)
    count = getattr(getattr(bare, "config", None), "num_hidden_layers", None)
    for module in bare.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and len({type(m) for m in module}) == 1:
            return module
    return None


def compile_layers(model: nn.Module, backend: str | None = None, mode: str | None = None) -> None:
    """Compile every decoder layer of ``model`` in place (``torch_compile``, with
    ``torch_compile_backend`` / ``torch_compile_mode``)."""
    layers = decoder_layers(model)
    if layers is None:
        raise ConfigError(
            f"torch_compile: no decoder layers found in {type(bare_model(model)).__name__}; set torch_compile to false"
        )
    # One graph per kind of pass (with and without gradients, packed or padded, LoRA's frozen
    # inputs ...), shared by every layer of that class in the process: more kinds than torch's
    # default limit of 8 would make the rest run eagerly without a word.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for layer in layers:
        layer.compile(backend=backend or "inductor", mode=mode, dynamic=True)


def eager_decoding():
    """Compiled layers run eagerly inside (a rollout's token-by-token sampling)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
