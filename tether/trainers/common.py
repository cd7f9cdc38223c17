"""What every tether trainer shares: seeding, device, optimizer, schedule, mixed precision."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable

import numpy as np
import torch

from tether.config import TrainingConfig
from tether.errors import ConfigError, TetherError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available; use --device cpu")
    return torch.device(name)


def seeded_split(num_rows: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train rows, held-out rows)``, each in dataset order: the first ``held_out`` of a
    permutation drawn under ``seed`` are held out."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held_out:]), sorted(order[:held_out])


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )


def make_scheduler(optimizer, total_steps: int, config: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``linear``: ``lr * (1 - u / total_steps)`` after ``u`` scheduler steps, never below 0."""
    if config.lr_scheduler_type == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)


def autocast(device: torch.device, bf16: bool, fp16: bool = False):
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> bool:
    """Step unless a gradient is non-finite (then skip it); returns whether it stepped."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    finite = all(torch.isfinite(p.grad).all() for p in params)
    if finite:
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def stop_if_nonfinite(in_a_row: int, limit: int, where: str) -> None:
    """Stop a run whose last ``limit`` optimizer steps were all skipped for non-finite numbers."""
    if in_a_row >= limit:
        raise TetherError(
            f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient and were skipped "
            f"({where}); lower learning_rate, set max_grad_norm, or check the data and reward"
        )
