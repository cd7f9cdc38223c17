"""What every tether trainer shares: seeding, device, optimizer, schedule, mixed precision."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from tether.config import TrainingConfig
from tether.errors import ConfigError, TetherError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels(warn) -> None:
    """``full_determinism``: CUDA kernels that give the same bits on every run (cuBLAS with a
    fixed workspace, no atomics in scatter and embedding gradients, no cuDNN autotuning).
    Process-wide, as torch's switch is. torch reads cuBLAS's workspace setting once, at its
    first cuBLAS call: set after CUDA has started, it may come too late, which is flagged."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
        warn(
            "full_determinism: CUDA started before CUBLAS_WORKSPACE_CONFIG was set; "
            "export CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting Python to be sure cuBLAS is deterministic"
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has run, so that phase timings
    on a GPU charge each phase its own kernels (a no-op wait on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_bf16_is_slow(bf16: bool, device: torch.device, warn) -> None:
    """bf16 on a CPU without native bf16 matrix multiplies (AVX512-BF16 / AMX) runs 5-50x
    slower than fp32 (measured on an AVX2 machine): say so once, before any work."""
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        warn(
            "bf16 is on but this CPU has no native bf16 matrix multiply (AVX512-BF16/AMX): "
            "it will run several times slower than fp32; drop bf16 on this machine"
        )


def training_device(config: TrainingConfig, parallel, warn) -> torch.device:
    """The device a trainer runs on (the Accelerator's when there is one); bf16 without native
    support on a CPU is flagged, ``full_determinism`` switches to deterministic kernels, and on
    a CPU freed memory is kept for reuse."""
    device = parallel.device if parallel.accelerator else resolve_device(config.device)
    warn_if_bf16_is_slow(config.bf16, device, warn)
    if config.tf32 is not None:  # process-wide, as torch's switches are
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    if config.full_determinism:
        use_deterministic_kernels(warn)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    return device


GLIBC_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_set_the_allocator() -> bool:
    """Whether glibc's allocator was configured through the environment."""
    return any(name in os.environ for name in GLIBC_ALLOCATOR_VARIABLES) or (
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    )


def keep_freed_memory_for_reuse() -> bool:
    """Have glibc serve every allocation from its heap and never give freed heap back to the
    system, unless the user configured glibc's allocator (then theirs stands). Returns whether
    the setting was made; it holds for the rest of the process.

    By default glibc maps blocks above its mmap threshold (128 KiB at first, raised as blocks
    are freed, to at most 32 MiB) afresh and unmaps them when freed, and trims the heap's free
    top: a training step that frees and re-allocates the same activations every micro-batch
    then pays a page fault per 4 KiB on first touch, about 2 us each on the project's CPU
    machine and 50-70 thousand per PPO update on the benchmark workloads. Reused in place, the
    same blocks peak no higher (W1 0.85 -> 0.83 GB, W2 1.74 -> 1.72 GB). What is given up: the
    process keeps its peak resident memory until it exits. No effect outside glibc.
    """
    if user_set_the_allocator():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    no_mmap = mallopt(-4, 0)  # M_MMAP_MAX: no block is mapped on its own
    no_trim = mallopt(-1, -1)  # M_TRIM_THRESHOLD: -1 never trims the heap
    return bool(no_mmap and no_trim)


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


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optim`` names over the trainable ``params``, with the config's
    learning rate, betas, epsilon and weight decay where it takes them, plus ``optim_args``."""
    params = [p for p in params if p.requires_grad]
    extra = _optim_args(config.optim_args)
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    common = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    match config.optim:
        case "adamw_torch_fused":  # one kernel per parameter group instead of a chain of foreach ops
            return torch.optim.AdamW(params, **common, **adam, fused=True, **extra)
        case "adamw_torch":
            return torch.optim.AdamW(params, **common, **adam, foreach=True, **extra)
        case "sgd":
            return torch.optim.SGD(params, **common, **extra)
        case "adagrad":
            return torch.optim.Adagrad(params, **common, **extra)
        case "rmsprop":
            return torch.optim.RMSprop(params, **common, **extra)
        case "adafactor":
            from transformers.optimization import Adafactor

            options = dict(scale_parameter=False, relative_step=False, warmup_init=False, **extra)
            return Adafactor(params, **common, **options)
    try:
        import bitsandbytes.optim as bnb
    except ImportError:
        raise ConfigError(
            f"optim {config.optim} needs bitsandbytes (pip install bitsandbytes, on a CUDA machine); "
            "or use adamw_torch_fused"
        ) from None
    classes = {"adamw_8bit": bnb.AdamW8bit, "adamw_bnb_8bit": bnb.AdamW8bit, "paged_adamw_8bit": bnb.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.PagedAdamW32bit, "lion_8bit": bnb.Lion8bit, "paged_lion_8bit": bnb.PagedLion8bit}
    options = {} if "lion" in config.optim else adam
    return classes[config.optim](params, **common, **options, **extra)


def _optim_args(text: str | None) -> dict[str, float | int | bool | str]:
    """``optim_args`` (``key=value,key=value``) as keyword arguments, numbers and booleans parsed."""
    import yaml

    values = {}
    for part in filter(None, (text or "").split(",")):
        key, separator, value = part.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"config field optim_args: {part!r} is not key=value")
        values[key.strip()] = yaml.safe_load(value.strip())
    return values


def make_scheduler(optimizer, total_steps: int, config: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule ``lr_scheduler_type`` over ``total_steps`` optimizer steps (PPO:
    updates), after ``warmup_steps`` of linear warm-up; its ``lr_scheduler_kwargs`` passed on.
    ``linear`` with no warm-up is ``lr * (1 - u / total_steps)`` after ``u`` steps (ppo-details 32)."""
    from transformers import get_scheduler

    try:
        return get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_for(total_steps),
            num_training_steps=total_steps, scheduler_specific_kwargs=dict(config.lr_scheduler_kwargs or {}),
        )
    except (TypeError, ValueError) as error:  # a keyword the schedule does not take, a missing one
        raise ConfigError(
            f"lr_scheduler_type {config.lr_scheduler_type} with lr_scheduler_kwargs {config.lr_scheduler_kwargs}: "
            f"{str(error).splitlines()[0]}"
        ) from None


def autocast(device: torch.device, bf16: bool, fp16: bool = False):
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def gradient_norm(params) -> torch.Tensor | None:
    """The 2-norm of every gradient of ``params`` as one plain tensor (None without any): one
    fused norm, non-finite exactly when some gradient entry is (or the norm overflows). FSDP2's
    gradients are shards: the norm is then over every process's shards, the same on each."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class Step(NamedTuple):
    """What one optimizer step did."""

    taken: bool  # False: skipped for a non-finite gradient (or by fp16's loss scaler)
    grad_norm: float | None  # the gradients' 2-norm before clipping (HF Trainer's grad_norm); None without one


def optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> Step:
    """Step unless a gradient is non-finite (then skip it)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    total_norm = gradient_norm(params)
    norm, finite, clip = None, True, False
    if total_norm is not None:  # one host sync per step, not one per tensor
        checks = [total_norm, torch.isfinite(total_norm)]
        if max_grad_norm is not None:
            # torch's clipping factor is ``max / (norm + 1e-6)`` capped at 1; where the cap
            # applies it would multiply every gradient by exactly 1, a pass that changes nothing
            checks.append(max_grad_norm / (total_norm + 1e-6) < 1)
        norm, finite, *clipped = torch.stack([check.float() for check in checks]).tolist()
        finite, clip = bool(finite), bool(clipped and clipped[0])
    if finite:
        if clip:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total_norm, foreach=True)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Step(finite, norm)


def stop_if_nonfinite(in_a_row: int, limit: int, where: str, said_elsewhere: bool = False) -> None:
    """Stop a run whose last ``limit`` optimizer steps were all skipped for non-finite numbers.
    Every process stops at the same step (their gradients are reduced together); with
    ``said_elsewhere`` (not the main process) this one does not print it."""
    if in_a_row >= limit:
        error = TetherError(
            f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient and were skipped "
            f"({where}); lower learning_rate, set max_grad_norm, or check the data (and, in RL, the reward)"
        )
        error.said_elsewhere = said_elsewhere
        raise error


def say_if_nothing_to_evaluate(config: TrainingConfig, held_out: int, what: str) -> None:
    """One warning when ``eval_strategy`` / ``eval_steps`` ask for evaluation but there are no
    held-out ``what`` (no test split or eval dataset, no ``eval_fraction``): nothing is evaluated."""
    asked = "eval_strategy" if config.eval_strategy not in (None, "no") else "eval_steps" if config.eval_steps else None
    if asked and not held_out:
        from tether.logging import console

        console.print(f"[yellow]warning: {asked} is set but there are no held-out {what} (no test split or "
                      f"eval dataset{', eval_fraction 0' if hasattr(config, 'eval_fraction') else ''}): "
                      "nothing is evaluated")


@dataclass(frozen=True)
class Cadence:
    """When a run's step (PPO: update; GRPO, RLOO: round) ``step`` of ``total`` logs, evaluates
    and checkpoints, by the config's ``*_strategy`` and ``*_steps`` fields; ``per_epoch``: steps
    in one pass over the data (the ``epoch`` strategies). ``unit``: what ``*_steps`` count in
    one step (a GRPO round of several optimizer steps, which TRL's ``*_steps`` count): a step
    acts when it reaches or passes a multiple."""

    config: TrainingConfig
    total: int
    per_epoch: int
    unit: int = 1

    def _every(self, step: int, strategy: str | None, steps: int | None) -> bool:
        if strategy == "epoch":
            return step % max(self.per_epoch, 1) == 0
        return strategy == "steps" and bool(steps) and (step * self.unit) // steps > ((step - 1) * self.unit) // steps

    def logs(self, step: int, evaluated: bool = False) -> bool:
        config = self.config
        first = config.logging_first_step and step == 1
        return step == self.total or evaluated or first or self._every(step, config.logging_strategy, config.logging_steps)

    def evaluates(self, step: int, default: bool) -> bool:
        """``default``: the trainer's own schedule, used while ``eval_strategy`` is unset."""
        strategy = self.config.eval_strategy
        if strategy is None:
            return default
        return strategy != "no" and (step == self.total or self._every(step, strategy, self.config.eval_steps))

    def saves(self, step: int) -> bool:
        strategy = self.config.save_strategy
        return strategy != "no" and (step == self.total or self._every(step, strategy, self.config.save_steps))

    @property
    def saves_on_signal(self) -> bool:
        return self.config.save_strategy != "no"


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update: ``reference = alpha x policy + (1 - alpha) x reference``."""
    for ref_param, param in zip(reference.parameters(), policy.parameters()):
        ref_param.mul_(1 - alpha).add_(param.detach().to(ref_param.dtype), alpha=alpha)


def compile_trained(config: TrainingConfig, engine: str, *models: torch.nn.Module, frozen: tuple = ()) -> None:
    """``torch_compile``: the backbone of each trained model compiled (``models/compiled.py``),
    and those of the ``frozen`` models (reference, reward model) that have decoder layers; a
    frozen model of another kind (a function, an architecture without a repeated block) runs
    eagerly. Under FSDP or DeepSpeed (``engine``, ``Parallel.engine``) and with activation
    checkpointing, each decoder layer is compiled instead of the backbone."""
    if config.torch_compile:
        from tether.models.compiled import compile_model, decoder_layers

        settings = config.torch_compile_backend, config.torch_compile_mode, engine in ("none", "ddp")
        for model in models:
            compile_model(model, *settings)
        for model in frozen:
            if isinstance(model, torch.nn.Module) and decoder_layers(model) is not None:
                compile_model(model, *settings)
