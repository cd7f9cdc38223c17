"""Several processes through Accelerate: DDP, DeepSpeed ZeRO, FSDP, and fp16 loss scaling.

``accelerate launch [--config_file ...] -m tether ppo --config run.yaml`` (or ``torchrun``)
starts one process per device; each builds the same trainer. What a trainer needs from here:

* ``Parallel.create(config)``: the Accelerator, or none at all for a plain single-process run
  (that path never touches ``torch.distributed`` and stays exactly as before);
* ``sum_over_processes`` / ``gather_rows``: global statistics and the global rollout;
* ``prepare_frozen``: reference and reward models as each engine needs them for inference;
* ``gathered_for_generation``: ZeRO-3 / FSDP parameters gathered once around a rollout's
  sampling (with the bare policy) instead of once per generated token;
* ``main_first`` / ``share``: work only the main process may do (output folder, files);
* ``write_checkpoint`` / ``restore_checkpoint``: checkpoints in the form each engine keeps its
  state (whole models, or every process's shards).

Tested with two CPU processes (gloo): DDP, DeepSpeed ZeRO-2 / ZeRO-3 on DeepSpeed's CPU
accelerator (``tests/test_deepspeed.py``), and FSDP2 through a test-only patch of Accelerate's
set-up (``tests/test_fsdp.py``); none of them on CUDA devices. The engines' own calls are kept
to the few below; what tether sets in their configs is in ``engine_settings.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import gc
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tether.checkpoint import (
    ENGINE_FOLDER,
    all_finite,
    close_checkpoint,
    fill_checkpoint,
    open_checkpoint,
    read_state,
    refuse_nonfinite,
    restore,
    rng_state,
    unwritten,
    write_checkpoint,
)
from tether.errors import ConfigError, TetherError
from tether.models.loading import is_peft_model
from tether.models.lora import merged_copy, merged_from_weights
from tether.rollout.batch import Rollout
from tether.saving import save_pretrained_atomic
from tether.trainers.common import Step, optimizer_step, resolve_device
from tether.trainers.engine_settings import (
    free_port,
    deepspeed_plugin,
    process_group_options,
    set_deepspeed_batch,
    set_deepspeed_clipping,
)


def _close_process_group() -> None:
    """Join the process group's threads before the interpreter exits: a gloo group left open
    can abort the process at exit ("terminate called without an active exception"). Objects
    in reference cycles that still hold a collective's tensors (``all_gather_object`` leaves
    some) are collected first, while the interpreter can still free them: freed during its
    shutdown instead, they aborted 2 of 16 exits of a test worker that gathers objects (0 of 40 with the collection)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def gather_rollout(rollout: Rollout, parallel: "Parallel", pad_token_id: int) -> Rollout:
    """Every process's rollout in one global batch, rank 0's rows first (``rollout`` itself in
    one process): queries padded on the left, responses on the right, masks False and numbers 0
    where padded, so every padded position reads as padding."""
    if not parallel.distributed:
        return rollout
    gathered = {}
    for field in dataclasses.fields(rollout):
        value = getattr(rollout, field.name)
        if value is None:
            gathered[field.name] = None
            continue
        pad = pad_token_id if field.name in ("queries", "responses") else 0
        as_int = value.to(torch.uint8) if value.dtype == torch.bool else value  # gloo gathers no bool
        joined = parallel.gather_rows(as_int, pad, pad_first=field.name in ("queries", "query_mask"))
        gathered[field.name] = joined.bool() if value.dtype == torch.bool else joined
    return Rollout(**gathered)


def keys_inside(state_dict: dict, outer: nn.Module, model: nn.Module) -> dict:
    """``outer``'s ``state_dict`` as ``model``'s own, where ``model`` sits inside ``outer`` (a
    reward model inside its ``Critic``: ``model.`` comes off every key); unchanged otherwise."""
    prefix = next((f"{name}." for name, module in outer.named_modules() if module is model and name), None)
    if prefix is None:
        return state_dict
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def launched_processes() -> int:
    """Processes of this launch, from the environment torchrun / accelerate set (1 if neither)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Parallel:
    """The process group a trainer runs in. ``accelerator`` is None for one plain process."""

    accelerator: object | None
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, config, accumulation_steps: int = 1) -> "Parallel":
        """An Accelerator when launched as several processes, with a DeepSpeed / FSDP config
        (even on one device) or asked for fp16; else none.

        ``accumulation_steps``: backward passes per optimizer step (DeepSpeed steps its engine
        after that many; every engine divides each loss by it).
        """
        sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("DEEPSPEED", "FSDP"))
        if launched_processes() == 1 and not config.fp16 and not sharded and not config.deepspeed:
            return cls(None)
        from accelerate import Accelerator

        precision = "fp16" if config.fp16 else "bf16" if config.bf16 else "no"
        # ``auto`` without a GPU is the CPU backend (gloo): asked for a GPU that is not there,
        # Accelerate would set every process up as a run of its own.
        cpu = resolve_device(config.device).type == "cpu"
        deepspeed = bool(config.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        options = dict(mixed_precision=precision, cpu=cpu, gradient_accumulation_steps=accumulation_steps,
                       kwargs_handlers=process_group_options(config, gloo=cpu and deepspeed))
        given = config.deepspeed_settings() if config.deepspeed else {}  # the file is read once here
        if config.deepspeed:
            options["deepspeed_plugin"] = deepspeed_plugin(given)
        elif deepspeed:
            deepspeed_plugin(None)  # installed?
        if cpu and deepspeed:
            # Accelerate sets a CPU launch up as DDP unless told it is not one; DeepSpeed then
            # runs on its CPU accelerator, over gloo.
            options["cpu"] = False
        if deepspeed:  # DeepSpeed's collectives, every step on every process: torch's notes on their names
            warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")
        if deepspeed and launched_processes() == 1 and "MASTER_ADDR" not in os.environ:  # one process, no launcher
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
        try:
            accelerator = Accelerator(**options)
        except (ValueError, RuntimeError) as error:  # e.g. WORLD_SIZE set by hand, with no rendezvous
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
                raise ConfigError(
                    f"FSDP through Accelerate needs CUDA devices ({reason}); on this CPU launch with torchrun or "
                    "an Accelerate DDP config (examples/accelerate/ddp.yaml)"
                ) from None
            raise ConfigError(
                f"cannot join the launch of {launched_processes()} processes (WORLD_SIZE): {reason}; start several "
                "processes with torchrun or accelerate launch, or unset WORLD_SIZE for one"
            ) from None
        if accelerator.num_processes != launched_processes():
            raise ConfigError(
                f"the launch started {launched_processes()} processes (WORLD_SIZE) but Accelerate joined "
                f"{accelerator.num_processes} of them into one run (device {config.device!r}); launch with "
                "torchrun or accelerate launch on devices the run can use, or set device: cpu"
            )
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            set_deepspeed_clipping(plugin.deepspeed_config, config.max_grad_norm)
            set_deepspeed_batch(plugin.deepspeed_config, config.per_device_train_batch_size, accumulation_steps,
                                launched_processes(), given)
        atexit.register(_close_process_group)
        parallel = cls(accelerator, accelerator.process_index, accelerator.num_processes)
        if parallel.engine == "fsdp" and not accelerator.is_fsdp2:
            parallel.refuse(
                "tether runs FSDP version 2 (per-parameter sharding); set fsdp_version: 2 in the Accelerate config "
                "(as examples/accelerate/fsdp.yaml does)"
            )
        if parallel.zero_stage == 3:
            # Accelerate's ZeRO-3 plugin makes transformers create every model already
            # partitioned (zero.Init), and a copy of a partitioned model (the value model from
            # the reward model, the reference from the policy) holds empty tensors: models load
            # whole, and each is partitioned when it is prepared.
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        asked = "DeepSpeed" if deepspeed else "FSDP" if sharded else None
        if asked and parallel.engine not in ("deepspeed", "fsdp") and parallel.is_main:
            from tether.logging import console

            plain = f"its {parallel.world_size} processes train as plain DDP (gloo)" if parallel.distributed else (
                "it trains as one plain process")
            console.print(f"[yellow]warning: the launch asks for {asked}, which Accelerate did not set up here; "
                          f"on this CPU {plain}, with whole copies of every model")
        return parallel

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # --- who does what ----------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def engine(self) -> str:
        """``none``, ``ddp``, ``deepspeed`` or ``fsdp``."""
        if self.accelerator is None:
            return "none"
        kind = str(self.accelerator.distributed_type)
        if "DEEPSPEED" in kind or "FSDP" in kind:
            return "deepspeed" if "DEEPSPEED" in kind else "fsdp"
        return "ddp" if self.distributed else "none"

    @property
    def zero_stage(self) -> int:
        if self.engine != "deepspeed":
            return 0
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    def share(self, make):
        """``make()`` on the main process; its result (or its TetherError) on every process.

        For the output folder: only one process may check, clear and create it, and all must
        stop with the same message when it is refused.
        """
        if not self.distributed:
            return make()
        from accelerate.utils import broadcast_object_list

        box = [None]
        if self.is_main:
            try:
                box = [("ok", make())]
            except TetherError as error:
                box = [("error", error)]
        broadcast_object_list(box)
        status, value = box[0]
        if status == "error":
            value.said_elsewhere = not self.is_main  # the command prints it once, from process 0
            raise value
        return value

    def refuse(self, message: str):
        """Stop every process with a ``ConfigError``, said once (by the main process)."""
        def fail():
            raise ConfigError(message)

        self.share(fail)
        fail()  # one process

    def together(self, make):
        """``make()`` on every process; when it fails on any, it fails on all, with the first
        failing process's one-line error (printed once, by that process), so that no process
        goes on alone into a collective the others never reach. For resuming: each process
        reads its own random generators, which may be the one file that is bad."""
        if not self.distributed:
            return make()
        try:
            value, error = make(), None
        except TetherError as caught:
            value, error = None, caught
        messages = self.gather_objects(None if error is None else (str(error), getattr(error, "exit_code", 2)))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return value
        rank, (message, exit_code) = failed[0]
        if rank == self.rank:
            raise error
        elsewhere = TetherError(message if rank == 0 else f"process {rank}: {message}")
        elsewhere.exit_code, elsewhere.said_elsewhere = exit_code, True
        raise elsewhere

    @property
    def loss_scale(self) -> int:
        """What a loss that sums over the whole optimizer batch (divided by its global size) is
        multiplied by: processes average their gradients (DDP, ZeRO, FSDP) and Accelerate
        divides each loss by its accumulation steps; this undoes both. 1 in one plain process."""
        if self.accelerator is None:
            return 1
        return self.world_size * self.accelerator.gradient_accumulation_steps

    def my_rows(self, rows: list) -> tuple[list, int]:
        """``(this process's rows of a global batch, weight)``: every ``world_size``-th row.

        A process left without rows (a short last batch) takes one row with weight 0, so that it
        still joins the gradient average of every optimizer step.
        """
        mine = rows[self.rank :: self.world_size]
        return (mine, 1) if mine else (rows[:1], 0)

    def my_share(self, rows: list) -> tuple[list, list[bool]]:
        """``(this process's share of rows, which of them count)``, for work that processes
        split rather than repeat (evaluation): process r takes the r-th contiguous block of
        ``ceil(N / world_size)`` rows, so the shares in rank order are ``rows`` again. Every
        process runs the same number of passes (a sharded or DDP model needs every process in
        each): a block that runs past the end is filled with copies of row 0 that do not count."""
        if not self.distributed:
            return list(rows), [True] * len(rows)
        size = -(-len(rows) // self.world_size)
        mine = list(rows[self.rank * size : (self.rank + 1) * size])
        filler = size - len(mine)
        return mine + rows[:1] * filler, [True] * len(mine) + [False] * filler

    def gather_shares(self, values: list) -> list:
        """Every process's ``values`` (the counted results of its ``my_share``), in rank order."""
        return [value for part in self.gather_objects(values) for value in part]

    def optimizer_step(self, optimizer, params, max_grad_norm: float | None) -> Step:
        """One optimizer step: whether it was taken, and the gradients' norm before clipping, the
        same on every process. fp16: the loss scaler decides (and lowers its scale after an
        overflow), and the norm is the unscaled one where ``max_grad_norm`` clips (None without
        it, as in HF Trainer); otherwise a non-finite gradient skips the step. DeepSpeed keeps
        the gradients in its engine and steps it in the last backward pass: there, the norm the
        engine computed for that step."""
        if self.accelerator is None or self.accelerator.mixed_precision != "fp16":
            step = optimizer_step(optimizer, max_grad_norm)
        else:
            norm = None
            if max_grad_norm is not None:
                norm = self.accelerator.clip_grad_norm_(list(params), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = Step(not self.accelerator.optimizer_step_was_skipped, None if norm is None else float(norm))
        if self.engine == "deepspeed":
            norm = self.accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()
            step = step._replace(grad_norm=None if norm is None else float(norm))
        if not step.taken and self.is_main:  # every process skips it alike: said once
            from tether.logging import console

            console.print("[red]non-finite loss or gradient: optimizer step skipped")
        return step

    def save_model(self, model: nn.Module, wrapped: nn.Module, tokenizer, target: Path, merged: bool = False) -> Path:
        """The trained ``model`` (bare) and ``tokenizer`` into ``target`` by the main process;
        returns ``target``. A LoRA model is saved as its adapter, or with ``merged`` as a plain
        model with the adapter merged in. Under ZeRO-3 / FSDP every process first helps gather
        the whole weights from ``wrapped``, its engine's wrapper."""
        state_dict = None
        if self.engine == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(wrapped.parameters())):
                state_dict = {k: v.detach().cpu().clone() for k, v in self.unwrap(wrapped).state_dict().items()}
        elif self.engine == "fsdp":
            state_dict = self.accelerator.get_state_dict(wrapped)
        if state_dict is not None:
            state_dict = keys_inside(state_dict, self.unwrap(wrapped), model)
        if self.is_main:
            if merged and is_peft_model(model):
                model = merged_copy(model) if state_dict is None else merged_from_weights(model, state_dict)
                state_dict = None
            save_pretrained_atomic(target, [model, tokenizer], state_dict=state_dict)
        self.barrier()
        return target

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def no_sync(self, *models: nn.Module, skip: bool):
        """With ``skip``, the backward passes inside belong to one of a minibatch's earlier
        micro-batches: DDP keeps their gradients local (they are averaged across processes with
        the last one) and DeepSpeed accumulates them without stepping its engine, which it does
        only after the last micro-batch's backward."""
        stack = contextlib.ExitStack()
        if skip and self.engine == "ddp" and self.distributed:
            for model in models:
                stack.enter_context(self.accelerator.no_sync(model))
        if self.engine == "deepspeed":
            # Accelerate steps the engine after every backward that it is told ends an
            # accumulation, and it is told so unless sync_gradients is lowered.
            stack.enter_context(self._deepspeed_boundary(not skip))
        return stack

    @contextlib.contextmanager
    def _deepspeed_boundary(self, is_boundary: bool):
        self.accelerator.sync_gradients = is_boundary
        try:
            yield
        finally:
            self.accelerator.sync_gradients = True

    def same_permutation(self, rows: int, device) -> torch.Tensor:
        """``randperm(rows)`` from this process's generator, or process 0's for all processes."""
        order = torch.randperm(rows, device=device)
        if self.distributed:
            from accelerate.utils import broadcast

            order = broadcast(order, from_process=0)
        return order

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    # --- numbers across processes -------------------------------------------------------
    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``tensor`` over all processes (itself with one)."""
        if not self.distributed:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def any_process(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (a stop signal seen by one stops all)."""
        if not self.distributed:
            return flag
        return bool(self.sum_over_processes(torch.tensor([float(flag)], device=self.accelerator.device)) > 0)

    def gather_rows(self, tensor: torch.Tensor, pad_value=0, pad_first: bool = False) -> torch.Tensor:
        """Every process's rows, rank 0's first: ``[W * B, ...]``; dim 1 padded to the widest
        (on the left with ``pad_first``) with ``pad_value``."""
        if not self.distributed:
            return tensor
        if tensor.dim() > 1:
            tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value, pad_first=pad_first)
        return self.accelerator.gather(tensor.contiguous())

    def gather_objects(self, value) -> list:
        if not self.distributed:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    # --- models -------------------------------------------------------------------------
    def prepare_trained(self, *objects):
        """The trained models and their optimizer (last), wrapped for the engine.

        DeepSpeed takes one model per engine: several (PPO's policy and critic) go in as one
        ``ModuleList`` and come back as its members, whose forward passes the engine's
        parameter hooks still serve; ``backward`` goes through the engine.
        """
        if self.accelerator is None:
            return objects
        *models, optimizer = objects
        if self.engine == "deepspeed" and len(models) > 1:
            engine, optimizer = self.accelerator.prepare(nn.ModuleList(models), optimizer)
            return (*engine.module, optimizer)
        return self.accelerator.prepare(*models, optimizer)

    def pass_module(self, make, model: nn.Module) -> nn.Module:
        """``make(model)`` (a module whose forward is one of tether's passes over ``model``, such
        as ``Actor``) for ``prepare_trained`` in one process and under DDP; the bare ``model``
        under DeepSpeed and FSDP, never run here, where it then runs its own forward pass."""
        return make(model) if self.engine in ("none", "ddp") else model

    def prepare_frozen(self, model: nn.Module, micro_batch_size: int) -> nn.Module:
        """A frozen model (reference, reward) ready for inference on this engine.

        DDP, ZeRO-2 and FSDP: a whole copy on every device. ZeRO-3: its own inference engine,
        sharded like the trained models (a whole copy of a large frozen model is what ZeRO-3 is
        there to avoid).
        """
        if self.accelerator is None:
            return model
        match self.engine:
            case "deepspeed" if self.zero_stage == 3:
                import deepspeed

                ds_config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
                for key in ("optimizer", "scheduler", "train_batch_size"):
                    ds_config.pop(key, None)
                ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
                ds_config["gradient_accumulation_steps"] = 1
                engine, *_ = deepspeed.initialize(model=model, config=ds_config)
                engine.eval()
                return engine
            case _:  # Accelerate's evaluation mode does not shard under FSDP, and would checkpoint it
                return model.to(self.accelerator.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        if self.accelerator is None:
            return model
        return self.accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def gathered_for_generation(self, model: nn.Module):
        """Around a rollout's sampling with the bare policy inside ``model``. ZeRO-3 and FSDP
        shard parameters, and a sharded model would gather every layer for every new token;
        the parameters are gathered once here, for the whole rollout."""
        match self.engine:
            case "deepspeed" if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    yield
            case _:
                yield

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_format(self) -> str:
        """How a checkpoint holds the trained models and their optimizer: ``plain`` (whole
        ``save_pretrained`` folders and ``optimizer.pt``, written by process 0) or, under
        DeepSpeed and FSDP, which shard them, ``engine`` (every process writes its shards
        through Accelerate's ``save_state``)."""
        return "engine" if self.engine in ("deepspeed", "fsdp") else "plain"

    @property
    def engine_name(self) -> str:
        """The engine as a checkpoint records it: ``none``, ``ddp``, ``fsdp``, ``deepspeed-zero<stage>``."""
        return f"deepspeed-zero{self.zero_stage}" if self.engine == "deepspeed" else self.engine

    def check_checkpointable(self, models: dict[str, nn.Module], saves: bool) -> None:
        """Before training: a checkpoint under ZeRO-3 or FSDP holds the trained models as the
        engine's shards, and no other model that changes (a reference that ``sync_ref_model``
        mixes into), which tether cannot gather and put back there yet."""
        other = [name for name, model in models.items() if not _trains(model)]
        if saves and other and (self.engine == "fsdp" or self.zero_stage == 3):
            raise ConfigError(
                f"checkpoints under {self.engine_name} cannot hold the changing {other[0]} model (sync_ref_model) yet; "
                "set sync_ref_model: false, save_strategy: no, or train under ZeRO-2 or DDP"
            )

    def write_checkpoint(self, output_dir: Path, step: int, models: dict[str, nn.Module], tokenizer, optimizer,
                         scheduler, state: dict, total_limit: int | None) -> Path:
        """``checkpoint-<step>`` (see tether.checkpoint) with ``models`` (bare, by name), the
        optimizer, schedule, ``state`` and every process's random generators; in the ``engine``
        format every process writes its shards, then process 0 the rest and renames it into place."""
        state = {**state, "world_size": self.world_size, "engine": self.engine_name, "format": self.checkpoint_format}
        rng_states = self.gather_objects(rng_state()) if self.distributed else None
        if self.checkpoint_format == "plain":
            return self.share(lambda: write_checkpoint(
                output_dir, step, models, tokenizer, optimizer, scheduler, state, total_limit, rng_states))
        if self.any_process(not all_finite(models)):  # each process sees the weights it holds
            self.share(lambda: refuse_nonfinite(output_dir, step))
        staging = self.share(lambda: open_checkpoint(output_dir, step))

        def save_engine_state():
            try:
                self.accelerator.save_state(str(staging / ENGINE_FOLDER))
            except OSError as error:
                raise unwritten(step, Path(output_dir), error) from error

        try:
            self.together(save_engine_state)
        except BaseException:
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        others = {name: model for name, model in models.items() if not _trains(model)}
        return self.share(lambda: close_checkpoint(staging, step, total_limit, lambda: fill_checkpoint(
            staging, others, tokenizer, None, scheduler, state, rng_states)))

    def restore_checkpoint(self, path: Path, models: dict[str, nn.Module], optimizer, scheduler) -> dict:
        """A checkpoint ``write_checkpoint`` wrote, into this run's models, optimizer, schedule and
        generators; its trainer state. One that another process count or engine wrote is
        refused in one line before anything is loaded."""
        state = read_state(path)
        written_by = state.get("world_size", 1)
        if written_by != self.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by {written_by} processes, this run has {self.world_size}; "
                f"resume with {written_by} (the data order depends on it)"
            )
        made_as = state.get("format", "plain")
        if made_as != self.checkpoint_format or (made_as == "engine" and state.get("engine") != self.engine_name):
            raise ConfigError(
                f"checkpoint {path} was written under {state.get('engine', 'ddp')}, this run is {self.engine_name}; "
                "resume under the engine that wrote it"
            )
        if made_as == "plain":
            return restore(path, models, optimizer, scheduler, self.rank)

        def load_engine_state(folder: Path):
            try:
                self.accelerator.load_state(str(folder))
            except Exception as error:  # the engine's own errors: missing or mismatched shards
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                raise ConfigError(f"checkpoint {folder} cannot be loaded into this run: {first}") from None

        others = {name: model for name, model in models.items() if not _trains(model)}
        return restore(path, others, optimizer, scheduler, self.rank, load_engine=load_engine_state)


def _trains(model: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in model.parameters())
