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
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tether.checkpoint import STATE_FILE
from tether.errors import ConfigError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.parallel import Parallel

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
WORKER = str(ROOT / "tests" / "workers" / "engine_checkpoints.py")


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine-checkpoints")
    tokenizer = word_tokenizer(numbered_words(30))
    for name, model in (("policy", tiny_causal_lm(tokenizer)), ("reward", tiny_reward_model(tokenizer))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"prompt": " ".join(f"w{(3 * i + j) % 30}" for j in range(2 + i % 4)), "target": "w5"} for i in range(32)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(
        "def hits(completions, target, **kwargs):\n"
        "    return [float(c.split().count(t)) for c, t in zip(completions, target)]\n"
    )
    common = {"model_name_or_path": str(root / "policy"), "dataset_name": str(root / "prompts.jsonl"),
              "learning_rate": 1e-3, "save_steps": 1, "device": "cpu"}
    ppo = {**common, "reward_model_path": str(root / "reward"), "total_episodes": 16, "per_device_train_batch_size": 2,
           "gradient_accumulation_steps": 2, "num_mini_batches": 2, "num_ppo_epochs": 2, "response_length": 5}
    grpo = {**common, "reward_funcs": ["rewards.py:hits"], "per_device_train_batch_size": 4, "num_generations": 4,
            "max_completion_length": 5, "max_steps": 2, "beta": 0.04, "sync_ref_model": True,
            "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5}
    (root / "ppo.yaml").write_text(yaml.safe_dump(ppo))
    (root / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    return root


def run_and_resume(workspace: Path, tmp_path: Path, command: str, trained: list[str]) -> Path:
    """``command`` for 2 steps with a checkpoint after each, then again from the first: the
    same saved weights bit for bit. Returns the output folder."""
    out = tmp_path / "out"
    args = (command, "--config", str(workspace / f"{command}.yaml"), "--output_dir", str(out))
    first = torchrun(*args, cwd=workspace)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoint-1"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert (state["format"], state["engine"], state["world_size"]) == ("engine", "ddp", 2)
    engine = sorted(path.name for path in (checkpoint / "engine").iterdir())
    assert [name for name in engine if name.startswith("model")] == trained
    assert {"optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(engine)
    assert not (checkpoint / "optimizer.pt").exists() and (checkpoint / "rng-rank1.pt").is_file()
    start = load_file(str(workspace / "policy" / "model.safetensors"))
    straight = load_file(str(out / "model.safetensors"))
    assert max((straight[key] - start[key]).abs().max().item() for key in start) > 1e-4
    shutil.copy(out / "model.safetensors", tmp_path / "straight.safetensors")

    again = torchrun(*args, "--resume", str(checkpoint), cwd=workspace)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = load_file(str(out / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    return out


def test_ppo_resumes_exactly_from_engine_checkpoints(workspace: Path, tmp_path: Path):
    run_and_resume(workspace, tmp_path, "ppo", trained=["model.safetensors", "model_1.safetensors"])  # policy, critic


def test_grpo_with_a_synced_reference_resumes_exactly_from_engine_checkpoints(workspace: Path, tmp_path: Path):
    out = run_and_resume(workspace, tmp_path, "grpo", trained=["model.safetensors"])
    reference = load_file(str(out / "checkpoint-1" / "reference" / "model.safetensors"))  # outside the engine
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
