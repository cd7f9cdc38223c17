"""FSDP (version 2) on 2 CPU processes (gloo). Accelerate 1.15 turns an FSDP launch on a CPU
into DDP; ``tests/workers/fsdp_on_cpu.py`` makes the Accelerator an FSDP one after it is built,
as it is on CUDA devices, so tether's FSDP paths run here with the settings
``examples/accelerate/fsdp.yaml`` gives (as the environment ``accelerate launch`` sets from it).

* SFT, RM, DPO and GRPO checkpoint in FSDP's own form (every process's shards through
  torch.distributed.checkpoint), resume bit for bit, and match DDP (``tests/engines.py``);
* a LoRA model saves merged or as its adapter, gathered whole, each equal to DDP's;
* PPO (two trained models, one optimizer) and FSDP version 1 are refused in one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.engines import ENV, LORA, ROOT, assert_same, ddp_run, launch, make_workspace, run_resume_and_compare, weights

WORKER = str(ROOT / "tests" / "workers" / "fsdp_on_cpu.py")
EXAMPLE = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
FSDP = {  # what accelerate launch sets from the example (and sync_module_states off: it needs a device)
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(EXAMPLE["fsdp_version"]),
    "FSDP_AUTO_WRAP_POLICY": EXAMPLE["fsdp_auto_wrap_policy"], "FSDP_STATE_DICT_TYPE": EXAMPLE["fsdp_state_dict_type"],
    "FSDP_RESHARD_AFTER_FORWARD": str(EXAMPLE["fsdp_reshard_after_forward"]).lower(),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_SYNC_MODULE_STATES": "false",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "grpo"])
def test_every_single_model_trainer_under_fsdp_resumes_exactly_and_matches_ddp(workspace, command):
    out = run_resume_and_compare(workspace, command, "fsdp", "fsdp", script=WORKER, env=FSDP, atol=1e-4)
    engine = out / "checkpoint-1" / "engine"
    assert (engine / "optimizer_0").is_dir() and (engine / "pytorch_model_fsdp_0").is_dir()  # shards, through DCP
    assert not (engine / "pytorch_model_fsdp_1").exists()  # the trained model alone (DPO's reference is frozen)


@pytest.mark.parametrize("merged", ["true", "false"])
def test_a_lora_model_under_fsdp_saves_merged_or_its_adapter(workspace, merged):
    name = "model.safetensors" if merged == "true" else "adapter_model.safetensors"
    lora = ("--peft_config", LORA, "--save_merged", merged)
    out = workspace / f"lora-fsdp-{merged}"
    launch("sft", "--config", "sft.yaml", "--output_dir", str(out), *lora, cwd=workspace, script=WORKER, env=FSDP)
    assert_same(weights(out, name), weights(ddp_run(workspace, "sft", *lora), name), atol=1e-6)


@pytest.mark.parametrize(("command", "version", "message"), [
    ("ppo", "2", "error: PPO trains its policy and value model with one optimizer, which Accelerate's FSDP"),
    ("sft", "1", "error: tether runs FSDP version 2 (per-parameter sharding); set fsdp_version: 2"),
])
def test_ppo_and_fsdp_version_1_are_refused_once(workspace, command, version, message):
    command_line = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
                    command, "--config", f"{command}.yaml", "--output_dir", str(workspace / f"refused-{command}")]
    result = subprocess.run(command_line, cwd=workspace, env={**ENV, **FSDP, "FSDP_VERSION": version},
                            capture_output=True, text=True, timeout=600)
    said = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(said) == 1 and said[0].startswith(message), result.stderr[-3000:]
    assert not (workspace / f"refused-{command}" / "config.yaml").exists()
