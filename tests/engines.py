"""What the sharded-engine tests share (``test_deepspeed.py``, ``test_fsdp.py``): a workspace of
tiny models, data and one config per command; launching 2 CPU processes; comparing weights.

``run_resume_and_compare`` is the check each engine passes for each trainer: 2 steps with a
checkpoint after each in the engine's own form, ``--resume`` from the first ending with the
same weights bit for bit, and the same weights (and logged gradient norms) as DDP.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LORA = "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"


def launch(*args: str, cwd: Path, env: dict | None = None, script: str | None = None,
           accelerate_config: str | None = None) -> None:
    """``tether <args>`` (or ``script <args>``) on 2 CPU processes through torchrun, or through
    ``accelerate launch`` with ``accelerate_config``; fails the test with the log's end."""
    target = [script] if script else ["-m", "tether"]
    if accelerate_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                   "--num_processes", "2", *target, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, *args]
    result = subprocess.run(command, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def make_workspace(root: Path) -> Path:
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


def ddp_run(workspace: Path, command: str, *extra: str) -> Path:
    """The same run under DDP, once per workspace."""
    out = workspace / f"{command}-ddp-{hashlib.sha1(repr(extra).encode()).hexdigest()[:8]}"
    if not out.exists():
        launch(command, "--config", f"{command}.yaml", "--output_dir", str(out), *extra, cwd=workspace)
    return out


def run_resume_and_compare(workspace: Path, command: str, name: str, engine: str, *engine_args: str,
                           settings: tuple[str, ...] = (), atol: float = 1e-5, **launched) -> Path:
    """``command`` (with ``settings``) on the engine (``engine_args``, ``launched``: how to
    launch it) with a checkpoint at each of its 2 steps recorded as ``engine``; resumed from the
    first, the same weights bit for bit; the weights (to ``atol``: Adam turns rounding-level
    differences of near-zero gradients into larger ones) and logged gradient norms of DDP with
    the same settings. Returns its output."""
    out = workspace / f"{command}-{name}"
    args = (command, "--config", f"{command}.yaml", "--output_dir", str(out), *settings, *engine_args)
    launch(*args, cwd=workspace, **launched)
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert (state["engine"], state["format"], state["world_size"]) == (engine, "engine", 2)
    straight = weights(out)
    shutil.copytree(out, out.with_name(out.name + "-straight"))

    launch(*args, "--resume", str(out / "checkpoint-1"), cwd=workspace, **launched)
    assert_same(weights(out), straight)

    ddp = ddp_run(workspace, command, *settings)
    assert_same(straight, weights(ddp), atol=atol)
    norms = [[json.loads(line).get("grad_norm", 0.0) for line in (folder / "metrics.jsonl").read_text().splitlines()]
             for folder in (out.with_name(out.name + "-straight"), ddp)]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(*norms)), norms
    start = weights(workspace / "policy")
    assert max((straight[k] - start[k]).abs().max().item() for k in start if k in straight) > 1e-4  # it trained
    return out
