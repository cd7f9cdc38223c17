"""DeepSpeed ZeRO-2 and ZeRO-3, run for real: 2 processes on the CPU (DeepSpeed's CPU
accelerator over gloo), launched as users launch them (``--deepspeed`` or ``accelerate launch``
with ``examples/accelerate/zero3.yaml``).

* every trainer reaches a checkpoint in DeepSpeed's own form (every process's shards), and
  ``--resume`` from the first one ends with the same weights bit for bit;
* the weights match the same run under DDP (to 1e-5: only the order of the sums differs);
* the saved model is a plain ``from_pretrained`` folder, gathered from the shards; a LoRA
  policy under ZeRO-3 saves merged or as its adapter, each equal to DDP's;
* bf16 under ZeRO-3 resumes exactly too.

Parameters are sharded for real in these runs: ``stage3_param_persistence_threshold: 0``
keeps ZeRO-3 from holding the tiny models' small weights whole on every process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (the test extra installs it; its absence is a failure, not a skip)
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LORA = "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"


def launch(*args: str, cwd: Path, accelerate_config: str | None = None) -> None:
    if accelerate_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                   "--num_processes", "2", "-m", "tether", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "tether", *args]
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deepspeed")
    tokenizer = word_tokenizer(numbered_words(30))
    for name, model in (("policy", tiny_causal_lm(tokenizer)), ("reward", tiny_reward_model(tokenizer))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    prompts = [{"prompt": " ".join(f"w{(3 * i + j) % 30}" for j in range(2 + i % 4)), "target": "w5"} for i in range(32)]
    pairs = [{"prompt": f"w{i}", "chosen": f"w5 w{i + 2}", "rejected": f"w{i + 3} w{i + 1}"} for i in range(16)]
    completions = [{"prompt": f"w{i} w{i + 1}", "completion": f"w{i} w13"} for i in range(16)]
    for name, rows in (("prompts", prompts), ("pairs", pairs), ("sft", completions)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "rewards.py").write_text(
        "def hits(completions, target, **kwargs):\n"
        "    return [float(c.split().count(t)) for c, t in zip(completions, target)]\n"
    )
    common = {"model_name_or_path": "policy", "learning_rate": 1e-3, "save_steps": 1, "save_total_limit": None}
    configs = {
        "ppo": {"dataset_name": "prompts.jsonl", "reward_model_path": "reward", "total_episodes": 16,
                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "num_mini_batches": 2,
                "num_ppo_epochs": 2, "response_length": 5},
        "grpo": {"dataset_name": "prompts.jsonl", "reward_funcs": ["rewards.py:hits"], "per_device_train_batch_size": 4,
                 "num_generations": 4, "max_completion_length": 5, "max_steps": 2, "beta": 0.04},
        "dpo": {"dataset_name": "pairs.jsonl", "per_device_train_batch_size": 2, "max_steps": 2},
        "rm": {"dataset_name": "pairs.jsonl", "per_device_train_batch_size": 2, "max_steps": 2},
        "sft": {"dataset_name": "sft.jsonl", "per_device_train_batch_size": 2, "max_steps": 2},
    }
    for command, values in configs.items():
        (root / f"{command}.yaml").write_text(yaml.safe_dump({**common, **values}))
    for stage in (2, 3):
        zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
        (root / f"zero{stage}.json").write_text(json.dumps({"zero_optimization": zero, "zero_allow_untested_optimizer": True}))
    return root


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if atol == 0:
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, atol=atol, rtol=0, msg=key)


def run_resume_and_compare(workspace: Path, command: str, stage: int, *extra: str,
                           accelerate_config: str | None = None) -> Path:
    """``command`` under ZeRO-``stage`` with a checkpoint at each of its 2 steps; resumed from
    the first, the same weights bit for bit; the same weights as DDP to 1e-5. Returns its output."""
    out = workspace / f"{command}-zero{stage}{'-accelerate' if accelerate_config else ''}"
    engine = () if accelerate_config else ("--deepspeed", f"zero{stage}.json")
    args = (command, "--config", f"{command}.yaml", "--output_dir", str(out), *engine, *extra)
    launch(*args, cwd=workspace, accelerate_config=accelerate_config)
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert (state["engine"], state["format"], state["world_size"]) == (f"deepspeed-zero{stage}", "engine", 2)
    shards = sorted(path.name for path in (out / "checkpoint-1" / "engine").rglob("*optim_states.pt"))
    assert len(shards) == 2  # one per process: the optimizer state is partitioned
    straight = weights(out)
    shutil.copytree(out, out.with_name(out.name + "-straight"))

    launch(*args, "--resume", str(out / "checkpoint-1"), cwd=workspace,
           accelerate_config=accelerate_config)
    assert_same(weights(out), straight)

    ddp = workspace / f"{command}-ddp{'-'.join(extra)}"
    if not ddp.exists():
        launch(command, "--config", f"{command}.yaml", "--output_dir", str(ddp), *extra, cwd=workspace)
    assert_same(straight, weights(ddp), atol=1e-5)
    start = weights(workspace / "policy")
    assert max((straight[k] - start[k]).abs().max().item() for k in start if k in straight) > 1e-4  # it trained
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_ppo_under_zero_resumes_exactly_and_matches_ddp(workspace, stage):
    run_resume_and_compare(workspace, "ppo", stage)


@pytest.mark.parametrize("command", ["grpo", "dpo", "sft", "rm"])
def test_every_trainer_under_zero3_resumes_exactly_and_matches_ddp(workspace, command):
    run_resume_and_compare(workspace, command, 3)


def test_the_zero3_example_file_launches_ppo(workspace):
    run_resume_and_compare(workspace, "ppo", 3, accelerate_config=str(ROOT / "examples" / "accelerate" / "zero3.yaml"))


@pytest.mark.parametrize("merged", ["true", "false"])
def test_a_lora_policy_under_zero3_saves_merged_or_its_adapter(workspace, merged):
    name = "model.safetensors" if merged == "true" else "adapter_model.safetensors"
    zero3 = workspace / f"lora-zero3-{merged}"
    ddp = workspace / f"lora-ddp-{merged}"
    for out, engine in ((zero3, ("--deepspeed", "zero3.json")), (ddp, ())):
        launch("ppo", "--config", "ppo.yaml", "--output_dir", str(out), "--peft_config", LORA, "--save_merged", merged,
               *engine, cwd=workspace)
    assert not (zero3 / ("adapter_model.safetensors" if merged == "true" else "model.safetensors")).exists()
    assert_same(weights(zero3, name), weights(ddp, name), atol=1e-6)


def test_bf16_under_zero3_resumes_exactly(workspace):
    out = workspace / "bf16"
    args = ("ppo", "--config", "ppo.yaml", "--output_dir", str(out), "--deepspeed", "zero3.json", "--bf16")
    launch(*args, cwd=workspace)
    straight = weights(out)
    launch(*args, "--resume", str(out / "checkpoint-1"), cwd=workspace)
    assert_same(weights(out), straight)
