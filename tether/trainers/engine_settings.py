"""What tether sets in Accelerate and DeepSpeed for a launch of several processes: the process
group's options (the ``ddp_*`` fields), the DeepSpeed plugin from the ``deepspeed`` field, and
the DeepSpeed numbers tether's own fields decide (batch sizes, gradient clipping).
"""

from __future__ import annotations

import copy

from tether.errors import ConfigError


def set_deepspeed_batch(deepspeed_config: dict, micro_batch_size: int, accumulation_steps: int, processes: int,
                        given: dict) -> None:
    """DeepSpeed's batch numbers are tether's, set in the engine's ``deepspeed_config`` (where
    Accelerate has filled in its own defaults); a number the user's DeepSpeed config (``given``)
    sets otherwise is refused, naming the tether field that decides it."""
    wanted = {"train_micro_batch_size_per_gpu": (micro_batch_size, "per_device_train_batch_size"),
              "gradient_accumulation_steps": (accumulation_steps, "gradient_accumulation_steps"),
              "train_batch_size": (micro_batch_size * accumulation_steps * processes,
                                   "per_device_train_batch_size x gradient_accumulation_steps x processes")}
    for key, (value, field) in wanted.items():
        if given.get(key, "auto") not in ("auto", None, value):
            raise ConfigError(f"the DeepSpeed config's {key} is {given[key]}, but tether's {field} makes it {value}; "
                              f'set it to "auto" (or leave it out): tether\'s fields decide')
        deepspeed_config[key] = int(value)


def set_deepspeed_clipping(deepspeed_config: dict, max_grad_norm: float | None) -> None:
    """DeepSpeed clips gradients itself, to its config's ``gradient_clipping``, which Accelerate
    fills with 1.0 where it says "auto" or nothing: make it ``max_grad_norm`` (0: no clipping,
    like one process with ``max_grad_norm: null``), and refuse a config that sets another value."""
    wanted = float(max_grad_norm or 0.0)
    given = deepspeed_config.get("gradient_clipping", "auto")
    if given in ("auto", None):
        deepspeed_config["gradient_clipping"] = wanted
    elif float(given) != wanted:
        raise ConfigError(
            f"the DeepSpeed config's gradient_clipping is {given} but max_grad_norm is {max_grad_norm}; "
            f"set max_grad_norm: {given}, or take gradient_clipping out of the DeepSpeed / Accelerate config"
        )


def process_group_options(config, gloo: bool = False) -> list:
    """Accelerate's handlers for the ``ddp_*`` fields: DDP's own options and the process
    group's timeout and backend (``gloo``: gloo unless ``ddp_backend`` names another)."""
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    ddp = {name: getattr(config, f"ddp_{name}") for name in ("find_unused_parameters", "bucket_cap_mb",
                                                             "broadcast_buffers", "static_graph")}
    group = {"timeout": timedelta(seconds=config.ddp_timeout)}
    if config.ddp_backend or gloo:
        group["backend"] = config.ddp_backend or "gloo"
    return [DistributedDataParallelKwargs(**{k: v for k, v in ddp.items() if v is not None}), InitProcessGroupKwargs(**group)]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deepspeed_plugin(settings):
    """The ``deepspeed`` field's settings (``TrainingConfig.deepspeed_settings``) as Accelerate's plugin."""
    from accelerate.utils import DeepSpeedPlugin

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("DeepSpeed needs the deepspeed package: pip install 'tether[deepspeed]'") from None
    if settings is None:
        return None
    return DeepSpeedPlugin(hf_ds_config=copy.deepcopy(settings))
