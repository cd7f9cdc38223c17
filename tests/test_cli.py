"""The ``tether`` command as a user runs it: a YAML config, overrides, exit codes and messages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tether.cli import main
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny policy and reward model on disk, a prompt file, and a config that uses them."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = word_tokenizer(numbered_words(30))
    for name, model in (("policy", tiny_causal_lm(tokenizer)), ("reward", tiny_reward_model(tokenizer))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"prompt": " ".join(f"w{(3 * i + j) % 30}" for j in range(2 + i % 4))} for i in range(32)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model_name_or_path": str(root / "policy"),
        "reward_model_path": str(root / "reward"),
        "dataset_name": str(root / "prompts.jsonl"),
        "total_episodes": 16,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_mini_batches": 2,
        "num_ppo_epochs": 2,
        "response_length": 6,
        "learning_rate": 1e-3,
        "device": "cpu",
        "missing_eos_penalty": 1.0,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_ppo_from_yaml_trains_and_saves_a_loadable_policy(workspace: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = tether("ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(out), "--seed", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [1, 2]
    for metrics in lines:
        for key, value in metrics.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    assert lines[-1]["episode"] == 16

    saved = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(workspace / "policy")
    changed = [
        name for (name, p), q in zip(saved.named_parameters(), base.parameters()) if not torch.equal(p, q)
    ]
    assert changed, "PPO left every policy weight unchanged"
    assert set(saved.state_dict()) == set(base.state_dict())  # the policy alone: no value head inside
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3  # the override won


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--learnig_rate", "1"], "unknown config field 'learnig_rate'; did you mean 'learning_rate'?"),
        (["--learning_rate", "fast"], "config field learning_rate: expected a number, got 'fast'"),
        (["--response_length", "0"], "response_length must be at least 1"),
        (["--num_mini_batches", "3"], "num_mini_batches=3 does not divide the rollout batch of 8"),
        (["--dataset_name", "missing.jsonl"], "dataset file not found: missing.jsonl"),
        (["--reward_model_path", "no_such_module:score"], "cannot import reward module 'no_such_module'"),
        (["--model_name_or_path", "./no-such-model"], "cannot load tokenizer from './no-such-model'"),
    ],
)
def test_bad_input_is_one_line(workspace: Path, tmp_path: Path, monkeypatch, capsys, args, expected):
    """In-process ``main`` (the same code path as the command, without a new interpreter each time)."""
    monkeypatch.chdir(tmp_path)
    status = main(["ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(tmp_path / "o"), *args])
    stderr = capsys.readouterr().err
    assert status == 2
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], stderr[-2000:]


def test_bad_input_from_the_command_line_has_no_traceback(workspace: Path, tmp_path: Path):
    result = tether("ppo", "--config", str(workspace / "run.yaml"), "--reward_model_path", "nope:fn", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot import reward module 'nope'")


def test_missing_config_file_and_missing_fields(tmp_path: Path):
    result = tether("ppo", "--config", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "config file not found: nope.yaml" in result.stderr
    (tmp_path / "empty.yaml").write_text("learning_rate: 1.0e-5\n")
    result = tether("ppo", "--config", "empty.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "config is missing model_name_or_path, reward_model_path, dataset_name" in result.stderr


def test_reward_function_from_a_file(workspace: Path, tmp_path: Path):
    """The scores are the function's values: each sample's score is its response's word count."""
    (tmp_path / "my_reward.py").write_text(
        "def score(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
    )
    out = tmp_path / "out"
    result = tether(
        "ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(out),
        "--reward_model_path", "my_reward.py:score", "--total_episodes", "8", "--missing_eos_penalty", "null",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and [row["score"] for row in samples] == [float(len(row["response"].split())) for row in samples]
    assert any(row["score"] > 0 for row in samples)


def check_demo_outputs(out: Path) -> None:
    """What ``tether demo --quick`` leaves in ``out``: SFT -> RM -> PPO and GRPO, DPO, every output
    loadable, figures and report written. (The README test runs the demo as the README shows it.)"""
    summary = json.loads((out / "summary.json").read_text())
    for method in ("sft", "ppo", "grpo", "dpo"):
        for figure in ("gold", "rm_score", "kl", "length", "well_formed"):
            assert math.isfinite(summary[f"{figure}_{method}"]), (figure, method)
    assert summary["rm_accuracy"] > 0.8  # the reward model learned the hidden rule from pairs alone
    assert summary["kl_sft"] == 0.0
    for method in ("ppo", "grpo", "dpo"):
        assert summary[f"rm_score_{method}"] > summary["rm_score_sft"]  # each raised what it optimises
        assert summary[f"gold_{method}"] > summary["gold_sft"]  # and, in this short run, what the gold rule prefers
        assert summary[f"kl_{method}"] > 0.0  # by moving away from the SFT model

    for stage in ("sft", "ppo", "grpo", "dpo"):
        AutoModelForCausalLM.from_pretrained(out / stage)
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert reward_model.config.num_labels == 1 and reward_model.config.reward_bias != 0.0
    for stage in ("sft", "rm", "ppo", "grpo", "dpo"):
        config = yaml.safe_load((out / f"{stage}.yaml").read_text())
        assert config["output_dir"] == str(out / stage)  # each stage can be rerun alone
    report = (out / "report.html").read_text()
    for image in ("gold_vs_kl.png", "scores.png", "grpo_scores.png", "dpo.png", "kl.png", "length.png", "rm_accuracy.png"):
        assert (out / "report_files" / image).stat().st_size > 1000
        assert f"report_files/{image}" in report


def test_demo_is_deterministic_for_a_seed_on_cpu(tmp_path: Path):
    from tether.demo.pipeline import run_pipeline

    first = run_pipeline(str(tmp_path / "a"), seed=5, device="cpu", quick=True)
    second = run_pipeline(str(tmp_path / "b"), seed=5, device="cpu", quick=True)
    first.pop("minutes"), second.pop("minutes")
    assert first == second
