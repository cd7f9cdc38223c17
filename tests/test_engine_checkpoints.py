"""Checkpoints in the form sharded engines keep their state (``Parallel.write_checkpoint``).

Under DeepSpeed and FSDP every process writes its shards of the trained models and optimizer
through Accelerate's ``save_state`` into the checkpoint's ``engine`` folder; process 0 writes
the rest (schedule, every process's generators, trainer state, any other model that changes)
and renames the folder into place. Those engines need CUDA; the worker here turns the same
format on under DDP (2 gloo processes), so that the shared code runs on a CPU:

* PPO (its own loop, two trained models) and GRPO with a synced reference (the shared loop,
  a changing model outside the engine) resume from the format to the same weights, bit for bit;
* a checkpoint is refused in one line, before anything loads, by a run under another engine
  or format, and when its engine folder is missing;
* ZeRO-3 / FSDP with a changing reference and checkpoints is refused before training.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.engines import ROOT, make_workspace, run_resume_and_compare
from tether.checkpoint import STATE_FILE
from tether.errors import ConfigError
from tether.trainers.parallel import Parallel

WORKER = str(ROOT / "tests" / "workers" / "engine_checkpoints.py")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("engine-checkpoints"))


def run_and_resume(workspace: Path, command: str, trained: list[str], *settings: str) -> Path:
    """``command`` in the engine format under DDP: resumed exactly and the weights of the plain
    format's run (``tests/engines.py``); the engine folder holds Accelerate's state of ``trained``."""
    out = run_resume_and_compare(workspace, command, "engine-format", "ddp", settings=settings, script=WORKER, atol=0)
    checkpoint = out.with_name(out.name + "-straight") / "checkpoint-1"
    engine = sorted(path.name for path in (checkpoint / "engine").iterdir())
    assert [name for name in engine if name.startswith("model")] == trained
    assert {"optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(engine)
    assert not (checkpoint / "optimizer.pt").exists() and (checkpoint / "rng-rank1.pt").is_file()
    return checkpoint


def test_ppo_resumes_exactly_from_engine_checkpoints(workspace: Path):
    run_and_resume(workspace, "ppo", trained=["model.safetensors", "model_1.safetensors"])  # policy, critic


def test_grpo_with_a_synced_reference_resumes_exactly_from_engine_checkpoints(workspace: Path):
    checkpoint = run_and_resume(workspace, "grpo", ["model.safetensors"], "--sync_ref_model", "true",
                                "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.5")
    reference = load_file(str(checkpoint / "reference" / "model.safetensors"))  # outside the engine
    start = load_file(str(workspace / "policy" / "model.safetensors"))
    assert any(not torch.equal(reference[key], start[key]) for key in start)  # mixed towards the policy


def written(tmp_path: Path, **state) -> Path:
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps({"world_size": 1, **state}))
    return checkpoint


class Engine(Parallel):
    """A Parallel that reports an engine without starting one."""

    def __init__(self, kind: str, zero_stage: int = 0):
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
        super().__init__(SimpleNamespace(distributed_type=f"DistributedType.{kind}", state=state), 0, 1)


@pytest.mark.parametrize(("state", "parallel", "message"), [
    ({"format": "engine", "engine": "deepspeed-zero3"}, Parallel(None), "written under deepspeed-zero3, this run is none"),
    ({"format": "engine", "engine": "deepspeed-zero2"}, Engine("DEEPSPEED", 3),
     "written under deepspeed-zero2, this run is deepspeed-zero3"),
    ({}, Engine("FSDP"), "written under ddp, this run is fsdp"),
    ({"format": "engine", "engine": "fsdp", "world_size": 2}, Engine("FSDP"), "written by 2 processes, this run has 1"),
])
def test_a_checkpoint_of_another_engine_is_refused_before_loading(tmp_path, state, parallel, message):
    checkpoint = written(tmp_path, **state)
    with pytest.raises(ConfigError, match=message + ".*resume"):
        parallel.restore_checkpoint(checkpoint, {}, optimizer=None, scheduler=None)


def test_an_engine_checkpoint_without_its_engine_folder_is_refused(tmp_path):
    checkpoint = written(tmp_path, format="engine", engine="fsdp")
    with pytest.raises(ConfigError, match="has no engine folder: it is incomplete"):
        Engine("FSDP").restore_checkpoint(checkpoint, {}, optimizer=None, scheduler=None)


@pytest.mark.parametrize(("parallel", "refused"), [
    (Engine("DEEPSPEED", 3), True), (Engine("FSDP"), True), (Engine("DEEPSPEED", 2), False), (Parallel(None), False),
])
def test_a_changing_reference_under_zero3_or_fsdp_is_refused_with_checkpoints(parallel, refused):
    trained, reference = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    models = {"model": trained, "reference": reference}
    parallel.check_checkpointable(models, saves=False)  # no checkpoints: nothing to hold
    if not refused:
        parallel.check_checkpointable(models, saves=True)
        return
    with pytest.raises(ConfigError, match="cannot hold the changing reference model .*sync_ref_model: false"):
        parallel.check_checkpointable(models, saves=True)


def test_engine_files_that_name_other_objects_are_refused_unread(tmp_path):
    """DeepSpeed reads its shards with a full unpickler and torch.distributed.checkpoint its
    index with pickle: a planted object is refused by name before either runs it, in a torch
    file or a raw pickle; the types those engines write themselves pass."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from tests.test_checkpoint_files import Payload, plant

    from tether.checkpoint import check_engine_files

    engine, marker = tmp_path / "engine", tmp_path / "ran"
    (engine / "pytorch_model").mkdir(parents=True)
    torch.save({"loss_scaler": LossScaler(1.0), "step": torch.ones(2)}, engine / "pytorch_model" / "optim_states.pt")
    (engine / "latest").write_text("pytorch_model")
    check_engine_files(engine)  # DeepSpeed's own kinds pass

    plant(engine / "pytorch_model", "model_states.pt", marker)
    with pytest.raises(ConfigError, match=r"model_states.pt holds a posix.system object.* it is not loaded"):
        check_engine_files(engine)
    (engine / "pytorch_model" / "model_states.pt").unlink()
    (engine / "optimizer_0").mkdir()
    (engine / "optimizer_0" / ".metadata").write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(ConfigError, match=r"\.metadata holds a posix.system object"):
        check_engine_files(engine)
    assert not marker.exists()
