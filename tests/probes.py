"""Probes the behavioural tests attach to a trainer's optimizer and models."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def gradient_norms_at_each_step(optimizer: torch.optim.Optimizer) -> list[float]:
    """The global norm of the gradients as each ``optimizer.step()`` begins (after clipping),
    appended to the returned list."""
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    optimizer.register_step_pre_hook(record)
    return norms


def linear_output_dtypes(*models: nn.Module) -> set[torch.dtype]:
    """The dtypes every ``nn.Linear`` of ``models`` produces from now on, gathered in a set."""
    seen: set[torch.dtype] = set()
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    return seen


@contextlib.contextmanager
def transformers_warnings():
    """The messages transformers logs inside the block, at warning verbosity, with its
    once-only warnings forgotten first (one given earlier in the process would not come again)."""
    import logging

    from transformers.utils import logging as hf_logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = hf_logging.get_logger("transformers")
    verbosity = hf_logging.get_verbosity()
    logging.Logger.warning_once.cache_clear()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
