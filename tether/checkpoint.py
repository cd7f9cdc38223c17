"""Checkpoints that resume exactly and are never left half-written.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` holding, for every trained model, a
``from_pretrained``-loadable subfolder, plus ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``
(python, numpy, torch and CUDA generators) and ``trainer_state.json`` (counters, data position,
anything else the trainer needs). The ``.pt`` files hold tensors and plain values only and are
read back with ``weights_only``: resuming from a checkpoint never runs code stored in it.

Under DeepSpeed and FSDP, which shard the trained models and their optimizer over the
processes, every process writes its shards through Accelerate's state saving into the
checkpoint's ``engine`` folder instead of the model folders and ``optimizer.pt``
(``Parallel.write_checkpoint``); the rest is the same.

A checkpoint is written into a hidden temporary folder and renamed into place in one step, so
a crash or a kill at any moment leaves the previous checkpoint intact; only the newest
``save_total_limit`` are kept.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tether.errors import ConfigError, TetherError
from tether.saving import MANIFEST, remove_model_files, usual_mode

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
STATE_FILE = "trainer_state.json"
ENGINE_FOLDER = "engine"  # the trained models and optimizer as a sharded engine saves them
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "trackers.json", "config.yaml")
RUN_FOLDERS = ("tensorboard",)


# --- stopping on a signal ----------------------------------------------------------------------

class StopSignals:
    """Inside the block, SIGTERM and SIGINT ask the training loop to stop instead of killing it.

    The loop checks ``requested`` after each step, writes a checkpoint and raises
    ``Interrupted``, so a pre-empted job loses nothing. A second signal kills as usual.
    """

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # asked twice: give the signal its usual effect
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Interrupted(TetherError):
    """Training stopped on a signal after saving a checkpoint; the exit code says which signal."""

    def __init__(self, signum: int, checkpoint: Path | None, said_elsewhere: bool = False):
        name = signal.Signals(signum).name
        self.said_elsewhere = said_elsewhere  # every process stops; the main one says so
        if checkpoint is None:  # save_strategy no
            super().__init__(f"stopped by {name}; no checkpoint written (save_strategy no)")
        else:
            super().__init__(f"stopped by {name}; checkpoint saved to {checkpoint}; continue with --resume")
        self.exit_code = 128 + signum


# --- random number generators ------------------------------------------------------------------
# Stored as tensors and plain numbers only, so that reading them back never unpickles anything
# else (``torch.load(weights_only=True)``): a checkpoint is shared and downloaded like a model.

def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    np.random.set_state((
        numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
        numpy["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- output folder ---------------------------------------------------------------------------

def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prepare_output_dir(output_dir: str | Path, resume: bool | str | None, overwrite: bool) -> Path | None:
    """Check ``output_dir`` before any work; return the checkpoint to resume from, if any.

    A folder with earlier results is refused unless the run resumes (``resume``) or may replace
    them (``overwrite``); a folder that cannot be written is refused at once.
    """
    folder = Path(output_dir)
    if resume:
        remove_stale_temporaries(folder)
        if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
            path = Path(resume)
            if not path.exists():
                raise ConfigError(f"--resume {path}: no such checkpoint; name a checkpoint-<step> folder, or --resume alone")
            if not (path / STATE_FILE).is_file():
                raise ConfigError(f"cannot resume from {path}: not a tether checkpoint (no {STATE_FILE})")
            return path
        found = checkpoints(folder)
        if not found:
            if _has_results(folder):  # a run stopped before its first checkpoint
                raise ConfigError(
                    f"--resume: no checkpoint in {folder} (the run there wrote none: it stopped before its first, "
                    "or ran with save_strategy no); start it again with --overwrite instead of --resume"
                )
            raise ConfigError(f"--resume: no checkpoint in {folder}; start without --resume")
        return found[-1]
    if _has_results(folder):
        if not overwrite:
            raise ConfigError(
                f"output_dir {folder} is not empty; pass --resume to continue that run or --overwrite to replace it "
                "(from Python: train(resume_from_checkpoint=True) or overwrite_output_dir=True)"
            )
        # Everything tether wrote there goes: checkpoints, logs, the saved model (the files its
        # manifest lists) and what a killed write left; other files in the folder stay.
        for old in checkpoints(folder):
            shutil.rmtree(old)
        for name in RUN_LOGS:
            (folder / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(folder / name, ignore_errors=True)
        remove_model_files(folder)
        (folder / MANIFEST).unlink(missing_ok=True)
        remove_stale_temporaries(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-")
        probe.close()
    except OSError as error:
        raise ConfigError(f"output_dir {folder} cannot be written: {error.strerror or error}") from None
    return None


def _has_results(folder: Path) -> bool:
    """Whether ``folder`` holds anything but the probe another process of the same launch is
    writing to test it (every process checks the folder before they join up)."""
    return folder.is_dir() and any(not path.name.startswith(".write-test-") for path in folder.iterdir())


def remove_stale_temporaries(folder: Path) -> None:
    """What a write killed half-way left in ``folder``: tether's hidden temporary checkpoint
    folders (``.checkpoint-3.tmp-*``, ``.checkpoint-3.old-*``) and temporary files."""
    if not folder.is_dir():
        return
    own = "|".join(re.escape(name) for name in (*RUN_LOGS, MANIFEST))
    pattern = re.compile(rf"^\.({PREFIX}\d+\.(tmp|old)-.+|({own})\.tmp(-.+)?|write-test-.+)$")
    for path in folder.iterdir():
        if not pattern.match(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_output_dir_early(config) -> None:
    """Refuse a used or unwritable ``output_dir`` before any slow loading. ``train()`` checks
    again and is the one that clears earlier results for ``--overwrite``."""
    if not config.overwrite_output_dir:
        prepare_output_dir(config.output_dir, config.resume_from_checkpoint, overwrite=False)


# --- writing and reading ---------------------------------------------------------------------------

def all_finite(models: dict) -> bool:
    return all(torch.isfinite(p).all() for model in models.values() for p in model.parameters())


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    models: dict,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    total_limit: int | None,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; refuse non-finite weights; prune old ones.

    ``rng_states`` holds every process's generators in a multi-process run (``rng.pt`` is
    process 0's, ``rng-rank<r>.pt`` process r's); by default, this process's.
    """
    if not all_finite(models):
        refuse_nonfinite(output_dir, step)
    staging = open_checkpoint(output_dir, step)
    return close_checkpoint(staging, step, total_limit, lambda: fill_checkpoint(
        staging, models, tokenizer, optimizer, scheduler, state, rng_states))


def refuse_nonfinite(output_dir: str | Path, step: int):
    kept = "the previous checkpoint is kept" if checkpoints(output_dir) else "there is no earlier checkpoint"
    raise TetherError(f"not writing checkpoint {step}: the weights are not finite; {kept}")


def open_checkpoint(output_dir: str | Path, step: int) -> Path:
    """The hidden temporary folder ``checkpoint-<step>`` is written into."""
    staging = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.tmp-", dir=Path(output_dir)))
    usual_mode(staging)  # mkdtemp's is private; the checkpoint it becomes should not be
    return staging


def fill_checkpoint(staging: Path, models: dict, tokenizer, optimizer, scheduler, state: dict,
                    rng_states: list[dict] | None) -> None:
    """Everything but the engine's state into ``staging``: the ``models`` (``save_pretrained``
    folders), the tokenizer, the optimizer (None: it is in the engine's state), schedule, RNG
    states and, last, the trainer state that marks the folder complete."""
    for name, model in models.items():
        model.save_pretrained(staging / name)
    tokenizer.save_pretrained(staging / "tokenizer")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    for rank, states in enumerate(rng_states or [rng_state()]):
        torch.save(states, staging / _rng_file(rank))
    with open(staging / STATE_FILE, "w") as handle:  # written last: it marks the folder complete
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def close_checkpoint(staging: Path, step: int, total_limit: int | None, fill=None) -> Path:
    """``fill()`` (what is left to write into ``staging``), then ``staging`` renamed into place
    as ``checkpoint-<step>`` and old checkpoints pruned. On any failure ``staging`` is removed
    and the previous checkpoint is untouched (a full disk, a lost mount: one line)."""
    folder = staging.parent
    final = folder / f"{PREFIX}{step}"
    try:
        if fill is not None:
            fill()
        if final.exists():  # the same step again (a rerun): move the old one aside, never delete first
            replaced = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.old-", dir=folder))
            os.rename(final, replaced / final.name)
            os.rename(staging, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staging, final)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise unwritten(step, folder, error) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(folder, step, total_limit)
    return final


def unwritten(step: int, folder: Path, error: OSError) -> TetherError:
    return TetherError(
        f"could not write checkpoint {step} in {folder}: {error.strerror or error}; the previous checkpoint is kept"
    )


def _prune(folder: Path, step: int, total_limit: int | None) -> None:
    """Drop checkpoints past ``step`` (a run resumed from an older one abandoned them), then the
    oldest beyond ``total_limit``. The checkpoint just written is never among them."""
    kept = []
    for path in checkpoints(folder):
        if int(path.name[len(PREFIX):]) > step:
            shutil.rmtree(path, ignore_errors=True)
        else:
            kept.append(path)
    if total_limit:
        for old in kept[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def read_state(path: str | Path) -> dict:
    """A checkpoint's ``trainer_state.json``; one line naming it when it is not a JSON object."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # missing, unreadable, not UTF-8, not JSON
        raise ConfigError(f"checkpoint file {file} cannot be read: {_first_line(error)}; the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint file {file} holds a {type(state).__name__}, not tether's trainer state")
    return state


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load a ``save_pretrained`` folder's safetensors weights into ``model`` in place, after
    checking that every tensor fits the model (a damaged or other model's file is refused in
    one line, with the model untouched)."""
    folder = Path(folder)
    state = {}
    try:
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(shard)))
    except Exception as error:  # safetensors' own error types: a damaged or truncated file
        raise ConfigError(f"checkpoint weights in {folder} cannot be read: {_first_line(error)}") from None
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # a LoRA checkpoint: the adapter alone
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        _check_shapes(state, get_peft_model_state_dict(model), folder, "adapter")
        unexpected = set_peft_model_state_dict(model, state).unexpected_keys
        if unexpected or not state:
            raise ConfigError(f"checkpoint {folder} does not match the adapter: unexpected {sorted(unexpected)[:3]}")
        return
    own = model.state_dict()
    _check_shapes(state, own, folder, "model")
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    tied = getattr(model.config, "tie_word_embeddings", False)
    shared = {k for k in missing if tied and ("lm_head" in k or "embed" in k)}  # tied weights are stored once
    if missing - shared or unexpected:
        raise ConfigError(f"checkpoint {folder} does not match the model: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state, strict=False)


def _check_shapes(state: dict, own: dict, folder: Path, what: str) -> None:
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ConfigError(
                f"checkpoint {folder} does not match the {what}: {key} is {tuple(value.shape)} there and "
                f"{tuple(own[key].shape)} here; resume with the model the checkpoint was trained from"
            )


def load_plain(path: Path, map_location=None):
    """A checkpoint file of tensors and plain containers, read without unpickling anything else.

    Whatever else a file holds (a crafted object whose unpickling runs code, or a file from
    another program) is refused with one line naming it, before any of it is run.
    """
    if not path.is_file():
        raise ConfigError(f"checkpoint {path.parent} has no {path.name}: it is incomplete; resume from another one")
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols: the refusal says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise _unpickling_refused(path, error, "something else") from None


def _unpickling_refused(path: Path, error: Exception, otherwise: str) -> ConfigError:
    """The one line for a checkpoint file that names an object it may not (in ``error``, from
    the unpickler that stopped at it), or is ``otherwise`` unreadable."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"a {found.group(1)} object" if found else otherwise
    return ConfigError(
        f"checkpoint file {path} holds {what}, not only tensors and plain values: it is not loaded, as "
        "unpickling it could run code; resume from a checkpoint tether wrote, or start afresh"
    )


# What the engines' own checkpoint files may name besides tensors and plain values: DeepSpeed's
# ZeRO state (read by DeepSpeed with a full unpickler), torch.distributed.checkpoint's index
# (read with pickle), numpy's random state (Accelerate). Anything else is refused unread.
_ENGINE_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "pathlib.PosixPath", "pathlib.WindowsPath", "torch.Size", "torch.serialization._get_layout",
    "torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
}


def _allowed_global(module: str, name: str) -> bool:
    if f"{module}.{name}" in _ENGINE_GLOBALS or module.startswith("torch.distributed.checkpoint."):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return super().find_class(module, name)


def check_engine_files(folder: Path) -> None:
    """Refuse, in one line naming the file, an engine state whose pickled files name anything
    but the plain values, tensors and few engine types its loaders need, before any of it is
    unpickled by them (DeepSpeed and torch.distributed.checkpoint read with full unpicklers)."""
    # .distcp: torch.distributed.checkpoint's shards, which it reads as data only (weights_only)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".py", ".safetensors", ".distcp")):
        if path.name == "latest":  # DeepSpeed's tag file: text
            continue
        try:
            if zipfile.is_zipfile(path):  # torch.save's format
                found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                         if not _allowed_global(*g.rsplit(".", 1))]
                if found:
                    raise pickle.UnpicklingError(f"GLOBAL {found[0]}")
            else:
                with open(path, "rb") as handle:
                    _IndexUnpickler(handle).load()
        except Exception as error:
            raise _unpickling_refused(path, error, f"something unreadable ({_first_line(error)})") from None


def _check_optimizer_state(optimizer, state, path: Path) -> None:
    """``state`` is the optimizer's own kind for the same parameters: the same groups and sizes,
    and every per-parameter tensor shaped like its parameter (a fused step reads them unchecked)."""
    def refuse(reason: str):
        raise ConfigError(f"checkpoint file {path} does not fit this run's optimizer: {reason}")

    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(
        state.get("param_groups"), list
    ):
        refuse("it is not an optimizer state")
    groups, saved = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved) or any(
        not isinstance(s, dict) or len(s.get("params", ())) != len(g["params"]) for g, s in zip(groups, saved)
    ):
        refuse("other parameter groups; resume with the model and settings the checkpoint was made with")
    params = {index: p for g, s in zip(groups, saved) for index, p in zip(s["params"], g["params"])}
    shaped = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))  # moments shaped like their parameter
    for index, entries in state["state"].items():
        if index not in params or not isinstance(entries, dict):
            refuse(f"state for a parameter {index!r} this run does not have")
        for key, value in entries.items():
            if key == "step" or not shaped:
                continue
            if not torch.is_tensor(value) or value.shape != params[index].shape or not value.is_floating_point():
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                refuse(f"{key} of parameter {index} is {shape}, the parameter {tuple(params[index].shape)}")


def restore(path: str | Path, models: dict, optimizer, scheduler, rank: int = 0, load_engine=None) -> dict:
    """Load a checkpoint's weights, optimizer, scheduler and (process ``rank``'s) RNG states;
    return its trainer state. Every file is read as data only (safetensors, JSON, and
    ``torch.load`` with ``weights_only``) and checked before anything is applied; a file that
    does not fit is refused in one line naming it.

    ``load_engine(folder)``, when given, loads the trained models and the optimizer from the
    checkpoint's ``engine`` folder (see ``Parallel.write_checkpoint``); ``models`` are then the
    other models the checkpoint holds as folders.
    """
    path = Path(path)
    if rank > 0 and not (path / _rng_file(rank)).is_file():
        raise ConfigError(f"checkpoint {path} was written by fewer processes than this run has; resume with as many")
    state = read_state(path)
    device = next(iter(models.values())).device if models else "cpu"
    if load_engine is None:
        optimizer_state = load_plain(path / "optimizer.pt", map_location=device)
        _check_optimizer_state(optimizer, optimizer_state, path / "optimizer.pt")
    elif not (path / ENGINE_FOLDER).is_dir():
        raise ConfigError(f"checkpoint {path} has no {ENGINE_FOLDER} folder: it is incomplete; resume from another one")
    else:
        check_engine_files(path / ENGINE_FOLDER)
    scheduler_state = load_plain(path / "scheduler.pt")
    own_schedule = scheduler.state_dict()
    if not isinstance(scheduler_state, dict) or set(scheduler_state) != set(own_schedule) or not isinstance(
        scheduler_state["last_epoch"], int
    ) or len(scheduler_state["base_lrs"]) != len(own_schedule["base_lrs"]):
        raise ConfigError(f"checkpoint file {path / 'scheduler.pt'} is not this run's learning-rate schedule state")
    rng = load_plain(path / _rng_file(rank))
    try:  # the random generators first: the one state that can only be checked by setting it
        set_rng_state(rng)
    except Exception as error:  # plain values, but not the generator states tether writes
        raise ConfigError(
            f"checkpoint file {path / _rng_file(rank)} does not hold the random generator states tether writes "
            f"({type(error).__name__}: {_first_line(error)}); it was written by another program or an older tether"
        ) from None
    for name, model in models.items():
        load_weights(model, path / name)
    if load_engine is None:
        optimizer.load_state_dict(optimizer_state)
    else:
        load_engine(path / ENGINE_FOLDER)
        set_rng_state(rng)  # the engine's loader sets its own copy of the generators: this run's are tether's
    scheduler.load_state_dict(scheduler_state)
    _rate_of_restored_step(scheduler)
    return state


def _rate_of_restored_step(scheduler) -> None:
    """Set the optimizer's rate for the next step from this run's schedule. The optimizer's
    state carries the rate its last step left, which is the schedule's own unless the run was
    extended (``--extend``): then the schedule is re-planned and the old rate, often the 0 at
    the end of a linear decay, would train the next step with it."""
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = value
    scheduler._last_lr = rates


def unlogged_steps(checkpoint: Path, recorded) -> list[dict]:
    """The metrics a checkpoint recorded of the steps after its run's last logged row (with
    ``logging_steps`` above 1, the next row's mean includes them); none in a checkpoint written
    before tether recorded them."""
    if not isinstance(recorded, list) or not all(isinstance(step, dict) for step in recorded):
        raise ConfigError(f"checkpoint {checkpoint}: its trainer state has no valid unlogged steps; it is damaged")
    return recorded


def check_progress(checkpoint: Path, done, total_steps: int) -> int:
    """The steps (updates) a checkpoint has done, refused unless a whole number from 0 to the
    run's ``total_steps`` (an extended run is re-planned first: see ``say_extension``)."""
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise ConfigError(f"checkpoint {checkpoint} says it is at step {done!r}: its trainer state is damaged")
    if done > total_steps:
        raise ConfigError(
            f"checkpoint {checkpoint} is at step {done}, past this run's {total_steps}: a run can be extended, "
            "not cut back; resume with the checkpoint's run length"
        )
    return done


def check_resumed_config(checkpoint: Path, config, say, command: str) -> dict[str, list[str]]:
    """Before anything is restored: refuse a resume whose config changes what is trained (each
    changed field named with its two values), or the run's length without ``extend_run``; say
    once which logging, saving or evaluation fields changed. Returns the changes by kind."""
    from tether.config import resume_differences

    state = read_state(checkpoint)
    made_by = state.get("command")
    if made_by is not None and made_by != command:
        raise ConfigError(f"checkpoint {checkpoint} was written by tether {made_by}, not tether {command}; resume it with that")
    saved = state.get("config")
    if saved is None:  # written by a tether that did not record its config
        return {}
    changes = resume_differences(saved, config)
    if changes["training"]:
        raise ConfigError(
            f"cannot resume from {checkpoint} with other training settings: {'; '.join(changes['training'])}; "
            "resume with the checkpoint's values (its config is in trainer_state.json) or start a new run"
        )
    if changes["shorter"]:
        raise ConfigError(
            f"{'; '.join(changes['shorter'])} would make the run in {checkpoint} shorter: a run can be extended, "
            "not cut back; resume with the checkpoint's length, or start a new run"
        )
    if changes["length"] and not config.extend_run:
        raise ConfigError(
            f"{'; '.join(changes['length'])} changes the length of the run in {checkpoint}; pass --extend "
            "(extend_run: true) to continue it that far (the learning-rate schedule is then re-planned)"
        )
    if changes["display"]:
        say(f"note: resuming with {'; '.join(changes['display'])}")
    return changes


def say_extension(changes: dict[str, list[str]], scheduler, total_steps: int, say) -> None:
    """After an extended run's schedule is restored: what the learning rate does next."""
    if not changes.get("length"):
        return
    following = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)
    say(
        f"note: extending the run ({'; '.join(changes['length'])}) to {total_steps} steps; the learning-rate "
        f"schedule is re-planned over them: {following:.4g} from the next step"
    )


def resumed_logs(output_dir: Path, checkpoint: Path, keep, key: str = "step") -> None:
    """The run logs (``metrics.jsonl``, ``samples.jsonl``) a resumed run goes on writing: its
    own, with the lines it will write again (those after the checkpoint) dropped. Resumed into
    another ``output_dir`` that has none yet, they start as the lines of the run the checkpoint
    came from, up to the checkpoint, so the new folder's logs cover the whole run."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        target, source = output_dir / name, checkpoint.parent / name
        # (the run's own folder has its logs: there ``target`` is ``source`` and exists)
        truncate_jsonl(target, keep, key, source=source if source.is_file() and not target.exists() else None)


def truncate_jsonl(path: str | Path, keep, key: str = "step", source: Path | None = None) -> None:
    """Drop the lines a resumed run will write again (those after the checkpoint), atomically;
    with ``source``, ``path`` is written with the lines of that file it keeps."""
    path = Path(path)
    source = path if source is None else Path(source)
    if not source.is_file():
        return
    kept, unreadable = [], 0
    for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            step = entry.get(key, 0) if isinstance(entry, dict) else None
        except ValueError:  # a line a kill cut short
            step = None
        if step is None or isinstance(step, bool) or not isinstance(step, (int, float)):
            unreadable += bool(line.strip())
        elif keep(step):
            kept.append(line)
    if unreadable:
        warnings.warn(f"{source}: {unreadable} unreadable line(s) dropped (a write cut short)", stacklevel=2)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)
