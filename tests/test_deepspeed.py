"""DeepSpeed ZeRO-2 and ZeRO-3, run for real: 2 processes on the CPU (DeepSpeed's CPU
accelerator over gloo), launched as users launch them (``--deepspeed`` or ``accelerate launch``
with ``examples/accelerate/zero3.yaml``).

* every trainer reaches a checkpoint in DeepSpeed's own form (every process's shards), and
  ``--resume`` from the first one ends with the same weights bit for bit;
* the weights and logged gradient norms match the same run under DDP (``tests/engines.py``);
* the saved model is a plain ``from_pretrained`` folder, gathered from the shards; a LoRA
  policy under ZeRO-3 saves merged or as its adapter, each equal to DDP's;
* bf16 under ZeRO-3 resumes exactly too.

Parameters are sharded for real in these runs: ``stage3_param_persistence_threshold: 0``
keeps ZeRO-3 from holding the tiny models' small weights whole on every process.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed  # noqa: F401  (the test extra installs it; its absence is a failure, not a skip)
import pytest

from tests.engines import LORA, ROOT, assert_same, ddp_run, launch, make_workspace, run_resume_and_compare, weights


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("deepspeed"))
    for stage in (2, 3):
        zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
        (root / f"zero{stage}.json").write_text(json.dumps({"zero_optimization": zero, "zero_allow_untested_optimizer": True}))
    return root


def zero(workspace: Path, command: str, stage: int) -> Path:
    out = run_resume_and_compare(workspace, command, f"zero{stage}", f"deepspeed-zero{stage}", "--deepspeed",
                                 f"zero{stage}.json")
    shards = list((out / "checkpoint-1" / "engine").rglob("*optim_states.pt"))
    assert len(shards) == 2  # one per process: the optimizer state is partitioned
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_ppo_under_zero_resumes_exactly_and_matches_ddp(workspace, stage):
    zero(workspace, "ppo", stage)


@pytest.mark.parametrize("command", ["grpo", "dpo", "sft", "rm"])
def test_every_trainer_under_zero3_resumes_exactly_and_matches_ddp(workspace, command):
    zero(workspace, command, 3)


def test_the_zero3_example_file_launches_ppo(workspace):
    run_resume_and_compare(workspace, "ppo", "zero3-accelerate", "deepspeed-zero3",
                           accelerate_config=str(ROOT / "examples" / "accelerate" / "zero3.yaml"))


@pytest.mark.parametrize("merged", ["true", "false"])
def test_a_lora_policy_under_zero3_saves_merged_or_its_adapter(workspace, merged):
    name = "model.safetensors" if merged == "true" else "adapter_model.safetensors"
    lora = ("--peft_config", LORA, "--save_merged", merged)
    zero3 = workspace / f"lora-zero3-{merged}"
    launch("ppo", "--config", "ppo.yaml", "--output_dir", str(zero3), *lora, "--deepspeed", "zero3.json", cwd=workspace)
    assert not (zero3 / ("adapter_model.safetensors" if merged == "true" else "model.safetensors")).exists()
    assert_same(weights(zero3, name), weights(ddp_run(workspace, "ppo", *lora), name), atol=1e-6)


def test_bf16_under_zero3_resumes_exactly(workspace):
    out = workspace / "bf16"
    args = ("ppo", "--config", "ppo.yaml", "--output_dir", str(out), "--deepspeed", "zero3.json", "--bf16")
    launch(*args, cwd=workspace)
    straight = weights(out)
    launch(*args, "--resume", str(out / "checkpoint-1"), cwd=workspace)
    assert_same(weights(out), straight)


@pytest.mark.parametrize(("settings", "message"), [
    ("missing.json", "config field deepspeed: no DeepSpeed config file missing.json"),
    ("bad.json", r"config field deepspeed: .*bad.json is not a JSON file: Expecting"),
    ("list.json", "the DeepSpeed config list.json is a list, not a mapping"),
    ({}, "has no zero_optimization section; add one"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "has a optimizer section, but tether makes it"),
    ({"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}, r"scheduler section.*lr_scheduler_type"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "sets bf16 enabled: True but config field bf16 is"),
])
def test_a_deepspeed_config_tether_cannot_follow_is_refused_before_any_model_loads(tmp_path, monkeypatch, settings,
                                                                                     message):
    from tether.config import PPOConfig
    from tether.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3}\n "bf16": {}}')
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=message):
        PPOConfig(deepspeed=settings).validate()


def test_deepspeed_settings_inline_on_the_command_line_and_auto_precision_pass(tmp_path):
    from tether.config import PPOConfig

    inline = PPOConfig(deepspeed="{zero_optimization: {stage: 3}, bf16: {enabled: auto}}")
    inline.validate()
    assert inline.deepspeed_settings() == {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}
    (tmp_path / "z.json").write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}}')
    assert PPOConfig(deepspeed=str(tmp_path / "z.json"), bf16=True).deepspeed_settings()["bf16"] == {"enabled": True}


def test_a_resume_may_name_the_deepspeed_file_by_another_path(workspace):
    """The engine a checkpoint needs is checked from what it records, not from the path text."""
    from tether.config import PPOConfig, resume_differences

    saved = {"deepspeed": "zero3.json"}
    changes = resume_differences(saved, PPOConfig(deepspeed=str(workspace / "zero3.json")))
    assert not changes["training"] and changes["display"]
