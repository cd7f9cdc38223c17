"""Every code block of the README runs here, so the README cannot drift from what tether does.

Each fenced block is matched by its first line to one entry of ``BLOCKS``; a block without an
entry fails ``test_every_block_has_a_runner``. A runner runs the block as written, in a fresh
copy of a workspace that holds what the README's commands name (``my-sft-model``,
``my-reward-model``, ``prompts.jsonl``, ``sft.yaml`` ...), with only the substitutions listed
beside it: hub names become those tiny local models, and run lengths shrink (an explicit
replacement each, asserted to be present so that a README edit shows up here). Commands that
need GPUs or DeepSpeed are parsed and checked, not run; the runner says which.

Shell lines run through the installed ``tether`` command where one is installed (as a user
runs them), ``torchrun`` / ``accelerate launch`` as ``python -m ...``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tests.test_cli import check_demo_outputs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
HUB_POLICY = "EleutherAI/pythia-160m-deduped"
# The README's run.yaml, shrunk to two updates of tiny responses.
SHRINK_RUN = {"total_episodes: 10000": "total_episodes: 64", "response_length: 53": "response_length: 4"}


def blocks() -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def replaced(text: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        assert old in text, f"the README no longer has {old!r}: update tests/test_readme.py"
        text = text.replace(old, new)
    return text


def block_starting(prefix: str) -> str:
    found = [text for _, text in blocks() if first_line(text).startswith(prefix)]
    assert len(found) == 1, f"{len(found)} README blocks start with {prefix!r}"
    return found[0]


def shell_lines(text: str) -> list[str]:
    """The commands of a bash block: continuations joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def command(line: str) -> list[str]:
    words = shlex.split(line)
    installed = Path(sys.executable).with_name("tether")
    match words:
        case ["tether", *rest]:
            return [str(installed), *rest] if installed.exists() else [sys.executable, "-m", "tether", *rest]
        case ["torchrun", *rest]:
            return [sys.executable, "-m", "torch.distributed.run", *rest]
        case ["accelerate", "launch", *rest]:
            return [sys.executable, "-m", "accelerate.commands.launch", *rest]
        case [".venv/bin/tether", *rest]:
            return command(shlex.join(["tether", *rest]))
    raise AssertionError(f"no way to run {line!r}")


def run(line: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command(line), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    return result


# --- the workspace --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", root / "examples")  # the launch lines name examples/accelerate/*.yaml
    tokenizer = word_tokenizer(numbered_words(30))
    for name, model in (("my-sft-model", tiny_causal_lm(tokenizer)), ("my-reward-model", tiny_reward_model(tokenizer))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    prompts = [" ".join(f"w{(3 * i + j) % 30}" for j in range(2 + i % 4)) for i in range(40)]
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
    write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": "w1 w2"} for p in prompts[:8]])
    write_jsonl(root / "rm.jsonl", [{"prompt": p, "chosen": "w5 w6", "rejected": "w7"} for p in prompts[:10]])
    for name in ("my_rewards.py", "rewards.py"):
        (root / name).write_text("def score(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n")
    run_yaml = replaced(block_starting(f"model_name_or_path: {HUB_POLICY}"), {HUB_POLICY: "my-sft-model", **SHRINK_RUN})
    (root / "run.yaml").write_text(run_yaml)
    small = dict(model_name_or_path="my-sft-model", per_device_train_batch_size=2, num_train_epochs=1,
                 eval_fraction=0.25)
    (root / "sft.yaml").write_text(yaml.safe_dump({**small, "dataset_name": "sft.jsonl", "output_dir": "runs/sft"}))
    (root / "rm.yaml").write_text(yaml.safe_dump({**small, "dataset_name": "rm.jsonl", "output_dir": "runs/rm"}))
    (root / "dpo.yaml").write_text(yaml.safe_dump({**small, "dataset_name": "rm.jsonl", "output_dir": "runs/dpo"}))
    write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": "w5 w6", "rejected": "w7"} for p in prompts[:20]])
    write_jsonl(root / "tasks.jsonl", [{"prompt": p, "answer": f"w{i % 5}"} for i, p in enumerate(prompts)])
    (root / "checks.py").write_text(
        "def correct(completions, answer, **kwargs):\n"
        "    return [1.0 if a in c.split() else 0.0 for c, a in zip(completions, answer)]\n\n\n"
        "def short(completions, **kwargs):\n"
        "    return [-len(c.split()) / 10 for c in completions]\n"
    )
    for method in ("grpo", "rloo"):
        (root / f"{method}.yaml").write_text(yaml.safe_dump(dict(
            model_name_or_path="my-sft-model", reward_funcs=["checks.py:correct"], dataset_name="tasks.jsonl",
            output_dir=f"runs/{method}", per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
            max_steps=2,
        )))
    (root / "ppo.yaml").write_text(yaml.safe_dump(dict(
        model_name_or_path="my-sft-model", reward_model_path="my-reward-model", dataset_name="prompts.jsonl",
        output_dir="runs/ppo", per_device_train_batch_size=4, total_episodes=8, response_length=4,
    )))
    return root


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def workspace(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "work")
    return tmp_path / "work"


def metric_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- one runner per block -------------------------------------------------------------------------

def setup_and_tests(text: str, workspace: Path) -> None:
    """CI runs both lines from a clean clone (``.ci/run``); the demo runs here with ``--quick``."""
    setup_line, test_line = shell_lines(text)
    ci = (ROOT / ".ci" / "run").read_text()
    setup, demo = setup_line.split(" && ")
    assert setup in ci and test_line in ci
    run(f"{demo} --quick --output-dir {workspace / 'demo'} --device cpu", workspace)
    check_demo_outputs(workspace / "demo")


def the_commands(text: str, workspace: Path) -> None:
    for line in shell_lines(text):
        run(line.replace("[--field value ...]", ""), workspace)
    for stage in ("sft", "rm", "ppo", "grpo", "rloo", "dpo"):
        assert (workspace / "runs" / stage / "model.safetensors").is_file(), stage


def minimal_run_yaml(text: str, workspace: Path) -> None:
    """The config as written (shrunk), then each commented alternative for the reward."""
    run("tether ppo --config run.yaml", workspace)
    assert [line["episode"] for line in metric_lines(workspace / "runs/my-ppo/metrics.jsonl")] == [32, 64]
    alternatives = re.findall(r"^# (reward_model_path: \S+)", text, flags=re.M)
    assert alternatives == ["reward_model_path: my_rewards:score", "reward_model_path: rewards.py:score"]
    for index, alternative in enumerate(alternatives):
        value = alternative.split(": ", 1)[1]
        run(f"tether ppo --config run.yaml --reward_model_path {value} --output_dir runs/alt{index}", workspace)
        scores = [line["objective/scores"] for line in metric_lines(workspace / f"runs/alt{index}/metrics.jsonl")]
        assert all(0 <= score <= 4 for score in scores)  # the file's word count, minus the missing-EOS penalty


def checkpoints_and_resume(text: str, workspace: Path) -> None:
    lines = shell_lines(replaced(text, {"--save_steps 50": "--save_steps 1", "checkpoint-100": "checkpoint-1"}))
    run(lines[0], workspace)
    out = workspace / "runs/my-ppo"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    finished = metric_lines(out / "metrics.jsonl")
    run(lines[1], workspace)  # the newest checkpoint is the end of the run: nothing left to do
    run(lines[2], workspace)  # from the first checkpoint: update 2 again, the same
    again = metric_lines(out / "metrics.jsonl")
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]  # noqa: E731
    assert drop(again) == drop(finished)


def python_example(text: str, workspace: Path) -> None:
    script = replaced(text, {"total_episodes=10_000": "total_episodes=16", "response_length=53": "response_length=4"})
    (workspace / "example.py").write_text(script)
    result = subprocess.run([sys.executable, "example.py"], cwd=workspace, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("fewer than one rollout batch") == 1  # 2 prompts, batches of 8
    assert [line["episode"] for line in metric_lines(workspace / "runs/ppo/metrics.jsonl")] == [8, 16]
    AutoModelForCausalLM.from_pretrained(workspace / "runs/ppo")


def grpo_yaml(text: str, workspace: Path) -> None:
    """The GRPO config as written (shrunk), then RLOO on the same file."""
    shrunk = replaced(text, {"Qwen/Qwen2.5-0.5B-Instruct": "my-sft-model", "per_device_train_batch_size: 16":
                             "per_device_train_batch_size: 4", "max_completion_length: 256": "max_completion_length: 4",
                             "max_steps: 500": "max_steps: 2"})
    (workspace / "grpo.yaml").write_text(shrunk)
    run("tether grpo --config grpo.yaml", workspace)
    lines = metric_lines(workspace / "runs/my-grpo/metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2] and [line["train/optimizer_steps"] for line in lines] == [1, 2]
    assert all("rewards/correct/mean" in line and "rewards/short/mean" in line for line in lines)
    assert len(metric_lines(workspace / "runs/my-grpo/samples.jsonl")) == 2 * 8  # log_completions: every row
    run("tether rloo --config grpo.yaml --output_dir runs/my-rloo --num_generations 2", workspace)
    AutoModelForCausalLM.from_pretrained(workspace / "runs/my-rloo")


def grpo_python(text: str, workspace: Path) -> None:
    script = replaced(text, {"max_completion_length=64": "max_completion_length=4", "max_steps=100": "max_steps=2"})
    (workspace / "grpo_example.py").write_text(script)
    result = subprocess.run([sys.executable, "grpo_example.py"], cwd=workspace, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in metric_lines(workspace / "runs/grpo/metrics.jsonl")] == [1, 2]
    AutoModelForCausalLM.from_pretrained(workspace / "runs/grpo")


def trl_style_grpo(text: str, workspace: Path) -> None:
    """TRL's call as written: the model from its path, its own tokenizer, a LoraConfig."""
    script = replaced(text, {"max_steps=100": "max_steps=2, max_completion_length=4, per_device_train_batch_size=4, "
                                              "num_generations=2"})
    (workspace / "trl_grpo.py").write_text(script)
    result = subprocess.run([sys.executable, "trl_grpo.py"], cwd=workspace, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in metric_lines(workspace / "runs/trl-grpo/metrics.jsonl")] == [1, 2]
    saved = yaml.safe_load((workspace / "runs/trl-grpo/config.yaml").read_text())
    assert saved["model_name_or_path"] == "my-sft-model" and saved["peft_config"] == {"r": 16, "lora_alpha": 32}
    AutoModelForCausalLM.from_pretrained(workspace / "runs/trl-grpo")


def dpo_yaml(text: str, workspace: Path) -> None:
    shrunk = replaced(text, {"HuggingFaceTB/SmolLM2-360M-Instruct": "my-sft-model", "per_device_train_batch_size: 8":
                             "per_device_train_batch_size: 2", "learning_rate: 5.0e-7": "learning_rate: 1.0e-3"})
    (workspace / "dpo.yaml").write_text(shrunk)
    run("tether dpo --config dpo.yaml", workspace)
    lines = metric_lines(workspace / "runs/my-dpo/metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]  # 20 pairs, batches of 2 x 2: one epoch
    assert lines[-1]["rewards/margins"] > 0 and lines[0]["rewards/margins"] == 0.0
    AutoModelForCausalLM.from_pretrained(workspace / "runs/my-dpo")


def dpo_python(text: str, workspace: Path) -> None:
    script = replaced(text, {"max_steps=50": "max_steps=2"})
    (workspace / "dpo_example.py").write_text(script)
    result = subprocess.run([sys.executable, "dpo_example.py"], cwd=workspace, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in metric_lines(workspace / "runs/dpo/metrics.jsonl")] == [1, 2]
    AutoModelForCausalLM.from_pretrained(workspace / "runs/dpo")


def launches_needing_gpus(text: str, workspace: Path) -> None:
    """DeepSpeed and 8 processes need GPUs: each line's accelerate file loads as the engine its
    name says, and the tether part of the line parses into a valid config. Not run here."""
    from accelerate.commands.config.config_args import load_config_from_file

    from tether.cli import _split_config_argument
    from tether.config import PPOConfig, SFTConfig, load_config, parse_overrides

    for line in shell_lines(text):
        words = shlex.split(line)
        if "--config_file" in words:
            load_config_from_file(str(ROOT / words[words.index("--config_file") + 1]))
        kind, *rest = words[words.index("tether") + 1 :]
        config_path, overrides = _split_config_argument(rest)
        load_config({"ppo": PPOConfig, "sft": SFTConfig}[kind], workspace / config_path, parse_overrides(overrides))


def launches_run_here(text: str, workspace: Path) -> None:
    """Each line is its own run, in a fresh copy of the workspace (two of them write runs/my-ppo)."""
    lines = shell_lines(text)
    outputs = ["runs/my-ppo", "runs/sft", "runs/rm", "runs/dpo", "runs/my-ppo"]
    assert len(lines) == len(outputs)
    for index, (line, output) in enumerate(zip(lines, outputs)):
        copy = shutil.copytree(workspace, workspace.with_name(f"line{index}"))
        run(line, copy)
        assert (copy / output / "model.safetensors").is_file(), line


def deepspeed_launches(text: str, workspace: Path) -> None:
    """The install line is the test extra's (deepspeed is there); the file line as written; each
    launch in a fresh copy of the workspace, to a model and ZeRO-3 checkpoints."""
    import deepspeed  # noqa: F401

    install, write_file, *launches = shell_lines(text)
    assert install == "pip install 'tether[deepspeed]'" and len(launches) == 2
    subprocess.run(write_file, shell=True, cwd=workspace, check=True)
    for index, line in enumerate(launches):
        copy = shutil.copytree(workspace, workspace.with_name(f"deepspeed{index}"))
        run(line, copy)
        newest = max((copy / "runs/my-ppo").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        state = json.loads((newest / "trainer_state.json").read_text())
        assert (copy / "runs/my-ppo/model.safetensors").is_file() and state["engine"] == "deepspeed-zero3", line


def lora_fields(text: str, workspace: Path) -> None:
    with_lora = (workspace / "run.yaml").read_text() + text
    (workspace / "lora.yaml").write_text(with_lora)
    run("tether ppo --config lora.yaml", workspace)
    assert (workspace / "runs/my-ppo/checkpoint-2/value_model/adapter_model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(workspace / "runs/my-ppo")  # merged: a plain model


def gpu_fields(text: str, workspace: Path) -> None:
    """Runs on a GPU; on a machine without one, the run stops at once in one line."""
    (workspace / "gpu.yaml").write_text((workspace / "run.yaml").read_text() + text)
    if torch.cuda.is_available():
        run("tether ppo --config gpu.yaml", workspace)
        return
    result = subprocess.run(command("tether ppo --config gpu.yaml"), cwd=workspace, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2 and "no CUDA device is available" in result.stderr, result.stderr[-2000:]


BLOCKS = {
    "bash scripts/setup.sh": setup_and_tests,
    "tether sft  --config sft.yaml  [--field value ...]": the_commands,
    "model_name_or_path: EleutherAI/pythia-160m-deduped": minimal_run_yaml,
    "tether ppo --config run.yaml --save_steps 50": checkpoints_and_resume,
    "from transformers import": python_example,
    "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct": grpo_yaml,
    "from tether import GRPOConfig": grpo_python,
    "from datasets import Dataset": trl_style_grpo,
    "model_name_or_path: HuggingFaceTB/SmolLM2-360M-Instruct": dpo_yaml,
    "from tether import DPOConfig": dpo_python,
    "accelerate launch --config_file examples/accelerate/ddp.yaml -m tether ppo": launches_needing_gpus,
    "torchrun --standalone --nproc_per_node 2 -m tether ppo": launches_run_here,
    "pip install 'tether[deepspeed]'": deepspeed_launches,
    "peft_config:": lora_fields,
    "device: cuda": gpu_fields,
}


def runner(text: str):
    found = [block_runner for prefix, block_runner in BLOCKS.items() if first_line(text).startswith(prefix)]
    return found[0] if len(found) == 1 else None


def test_every_block_has_a_runner():
    missing = [first_line(text) for _, text in blocks() if runner(text) is None]
    assert not missing, f"README blocks that no test runs: {missing}"
    assert len(blocks()) == len(BLOCKS)


@pytest.mark.parametrize("prefix", list(BLOCKS))
def test_readme_block(prefix, workspace):
    BLOCKS[prefix](block_starting(prefix), workspace)
