"""``torch_compile``: the models' backbones, and the decoding step, compiled with ``torch.compile``.

Each model's backbone (its decoder layers, each with norms, attention with tether's packed
layout, rotary embeddings, MLP and residuals, and the final norm) is compiled in place, with
dynamic shapes, so one graph serves every batch's token count and row lengths (models of one
class share it) and the element-wise work between the matrix multiplies is fused. Where the
layers must stay apart (FSDP, DeepSpeed, activation checkpointing) each layer is compiled
instead. The trained models are compiled, and
the frozen ones (reference, reward model) where they have such layers: they share the graphs of
the trained models' passes without gradients.

Decoding compiles one step of the whole backbone instead (``compiled_decoding``): a step is a
few rows, so what it saves is the host's work between small kernels. It reads the whole
preallocated KV cache, the fixed shapes a graph needs; the compiled layers run eagerly inside
the rest of decoding (``eager_decoding``: the prompt's prefill).

Compiling in place leaves the parameters, the state-dict keys and what ``save_model`` writes
unchanged. The first batches of each kind (training pass with and without gradients, decoding
step) pay the compile time; the update and the samples are the eager ones to rounding
(``tests/test_compile.py``).
"""

from __future__ import annotations

import contextlib
import functools

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


def compile_model(model: nn.Module, backend: str | None = None, mode: str | None = None, whole: bool = True) -> None:
    """Compile ``model``'s backbone in place (``torch_compile``, with ``torch_compile_backend`` /
    ``torch_compile_mode``): the module that runs its decoder layers, as one graph per kind of
    pass; with ``whole`` false, or where no such module holds the layers, each decoder layer.

    One graph per backbone pass saves each layer's own graph call (dynamo's cache lookup, the
    autograd wrapper, the kernels' launch): about 6% of a W1 micro-batch's backbone forward and
    backward on 2 CPU cores. Layer by layer stays for what must see each layer apart: an engine
    that shards or wraps the layers (FSDP, DeepSpeed), and activation checkpointing (whose layers
    also keep Inductor's Python wrapper)."""
    layers = decoder_layers(model)
    if layers is None:
        raise ConfigError(
            f"torch_compile: no decoder layers found in {type(bare_model(model)).__name__}; set torch_compile to false"
        )
    _allow_recompiles()
    checkpointed = any(getattr(module, "gradient_checkpointing", False) is True for module in bare_model(model).modules())
    # Inductor's C++ wrapper cannot yet call the random-state ops of a checkpointed layer's graph
    wrapped_in_cpp = not checkpointed and all(p.device.type == "cpu" for p in layers.parameters())
    arguments = {**_compile_arguments(backend, mode, wrapped_in_cpp), "dynamic": True}
    backbone = _holder(model, layers) if whole and not checkpointed else None
    for module in [backbone] if backbone is not None else layers:
        module.compile(**arguments)


def _holder(model: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The module whose own attribute ``layers`` is (a causal LM's or classifier's backbone)."""
    for module in bare_model(model).modules():
        if any(child is layers for child in module.children()):
            return module
    return None


def _allow_recompiles() -> None:
    """One graph per kind of pass (with and without gradients, packed or padded, LoRA's frozen
    inputs, decoding steps ...), shared by every layer of a class in the process: more kinds than
    torch's default limit of 8 would make the rest run eagerly without a word."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def _compile_arguments(backend: str | None, mode: str | None, on_cpu: bool) -> dict:
    """``torch.compile``'s backend and mode, and on CPU Inductor's C++ wrapper: the code that
    calls a graph's kernels in C++ rather than Python, which took a W1 update on 2 cores about 4%
    faster (the graphs are small, so their Python wrapper's half millisecond a call counted).
    Inductor takes a mode or options, not both: the mode becomes its options."""
    backend = backend or "inductor"
    if backend != "inductor" or not on_cpu:
        return {"backend": backend, "mode": mode}
    from torch._inductor import list_mode_options

    return {"backend": backend, "options": {**(list_mode_options(mode) if mode else {}), "cpp_wrapper": True}}


def eager_decoding():
    """Compiled layers run eagerly inside (a rollout's prefill; ``compiled_decoding``'s step
    opts out)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@functools.cache
def compiled_decoding(backend: str | None = None, mode: str | None = None, on_cpu: bool = True):
    """``hidden(backbone, **inputs)``: ``backbone``'s last hidden state at the last position
    ``[b, H]``, one decoding step compiled as a whole. Shapes are static at first; a second cache
    length or row count recompiles once with dynamic shapes. Runs compiled inside
    ``eager_decoding`` too. One function serves every model (it is an argument)."""
    _allow_recompiles()
    step = torch.compile(_last_hidden_state, **_compile_arguments(backend, mode, on_cpu))
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return step

    def hidden(backbone, **inputs):
        with set_stance("default"):
            return step(backbone, **inputs)

    return hidden


def _last_hidden_state(backbone: nn.Module, **inputs) -> torch.Tensor:
    return backbone(**inputs).last_hidden_state[:, -1]
