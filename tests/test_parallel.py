"""Several processes: ``torchrun --nproc_per_node 2`` on CPU (Accelerate's MULTI_CPU, gloo).

* the PPO update is the same for (per-device batch, accumulation, processes) = (8,1,1),
  (1,8,1) and (2,2,2) to 1e-6 in fp32, metrics included (global whitening, global-token loss
  normalisation, one minibatch order shared by all processes);
* processes shard one global batch (disjoint, together the single-process batch) and sample
  differently;
* ``tether ppo`` under torchrun trains, writes one metrics file, saves a plain policy without
  value weights equal to the final checkpoint's, and resumes to the same weights.

Each torchrun costs ~10 s of start-up on the 2-core machine, so there are two.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tether.data import PromptSampler
from tether.errors import ConfigError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.parallel import Parallel
from tests.workers.ppo_update import build, update

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_update_is_the_same_for_every_split_into_processes(tmp_path):
    """One fixed global rollout of 8 rows (sampling differs per process, so it is given),
    2 epochs x 2 minibatches: (8,1,1) and (1,8,1) in this process, (2,2,2) under torchrun,
    where DDP wraps the policy's chunked-output-layer forward."""
    whole = build(tmp_path / "whole", 8, 1)
    torch.manual_seed(5)
    rollout = whole.rollout([whole.prompts[i] for i in range(8)])
    torch.save(rollout, tmp_path / "rollout.pt")
    start = {f"policy.{n}": p.detach().clone() for n, p in whole.policy.named_parameters()}
    whole_params, whole_metrics = update(whole, copy.deepcopy(rollout))
    split_params, split_metrics = update(build(tmp_path / "split", 1, 8), copy.deepcopy(rollout))

    result = torchrun(
        "tests/workers/ppo_update.py", "--rollout", str(tmp_path / "rollout.pt"), "--out", str(tmp_path / "two"),
        "--per-device", "2", "--accumulation", "2", cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    assert two["world_size"] == 2
    # Under DDP the policy is wrapped as an Actor: the chunked output layer, never the logits
    assert two["policy_wrapper"] == "DistributedDataParallel" and two["full_logits_passes"] == 0

    assert max((whole_params[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the update moved
    for other in (split_params, two["params"]):
        assert other.keys() == whole_params.keys()
        for name, value in whole_params.items():
            torch.testing.assert_close(other[name], value, atol=1e-6, rtol=0, msg=name)
    for other in (split_metrics, two["metrics"]):
        for key, value in whole_metrics.items():
            assert other[key] == pytest.approx(value, abs=1e-6), key
    assert two["metrics"]["train/optimizer_steps"] == 4

    # Sharding: both processes drew the same global batch, took disjoint halves of it, in order.
    rank0, rank1 = two["shards"]
    global_batch = PromptSampler(len(whole.prompts), 8, whole.config.seed).next_batch()
    assert rank0 + rank1 == global_batch == whole.next_prompt_indices()
    assert len(rank0) == 4 and not set(rank0) & set(rank1)
    # Sampling: the same 8 prompts on both processes, different responses.
    responses = two["responses"]
    assert responses.size(0) == 16 and not torch.equal(responses[:8], responses[8:])

    # Evaluation of 5 prompts: each process samples its share (3 rows, 2 + 1 uncounted), and
    # both return the same global figures and all 5 rows in prompt order.
    from tests.workers.ppo_update import EVAL_PROMPTS

    (metrics0, rows0, sampled0), (metrics1, rows1, sampled1) = two["evaluation"]
    assert sampled0 == sampled1 == [3]
    assert metrics0 == metrics1 and rows0 == rows1
    prompts = whole.tokenizer.batch_decode(EVAL_PROMPTS, skip_special_tokens=True)
    assert [row["prompt"] for row in rows0] == prompts
    assert metrics0["eval/scores"] == pytest.approx(sum(row["score"] for row in rows0) / 5, abs=1e-6)


def test_the_python_api_with_the_default_device_runs_as_two_processes(tmp_path):
    """``device`` left at ``auto`` on a machine without a GPU: both processes join one run on
    the CPU backend (Accelerate, asked for a GPU, would make each its own run of one)."""
    result = torchrun("tests/workers/default_device.py", "--out", str(tmp_path), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("fewer than one rollout batch") == 1  # notes come from process 0 alone
    seen = [json.loads((tmp_path / f"world-{rank}.json").read_text()) for rank in (0, 1)]
    for process in seen:  # 16 episodes of 2 processes x 4 prompts: two updates
        assert process == {"world_size": 2, "device": "cpu", "updates": [1, 2], "episodes": [8, 16]}
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [8, 16]


def test_a_launch_accelerate_cannot_join_is_refused(monkeypatch):
    """WORLD_SIZE says 2 but Accelerate sets up one process: stop at once, never train alone."""
    from types import SimpleNamespace

    import accelerate

    from tether.config import PPOConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: SimpleNamespace(num_processes=1))
    with pytest.raises(ConfigError, match="started 2 processes .* joined 1"):
        Parallel.create(PPOConfig())


def test_a_launch_without_a_rendezvous_is_one_line(monkeypatch):
    """WORLD_SIZE set by hand with no MASTER_ADDR: Accelerate's ValueError becomes one line."""
    import accelerate

    from tether.config import PPOConfig

    def no_rendezvous(**kwargs):
        raise ValueError("Tried to launch on distributed with multinode, but `MASTER_ADDR` env was not set")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "Accelerator", no_rendezvous)
    with pytest.raises(ConfigError, match="cannot join the launch of 2 processes .*MASTER_ADDR.* torchrun"):
        Parallel.create(PPOConfig())


@pytest.mark.parametrize("asked", ["DEEPSPEED", "FSDP"])
def test_a_sharded_launch_on_a_cpu_says_it_trains_as_ddp(monkeypatch, capsys, asked):
    """Accelerate sets a DeepSpeed or FSDP launch up as plain DDP on a CPU: said, not silent."""
    import accelerate

    from tether.config import PPOConfig

    class OnTheCPU:
        num_processes, process_index, state, distributed_type = 2, 0, None, "DistributedType.MULTI_CPU"

        def __init__(self, **kwargs):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(f"ACCELERATE_USE_{asked}", "true")
    monkeypatch.setattr(accelerate, "Accelerator", OnTheCPU)
    capsys.readouterr()
    assert Parallel.create(PPOConfig(device="cpu")).engine == "ddp"
    said = " ".join(capsys.readouterr().err.split())
    name = "DeepSpeed" if asked == "DEEPSPEED" else "FSDP"
    assert f"the launch asks for {name}, which Accelerate did not set up here; on this CPU its 2 processes" in said


def test_an_fsdp_launch_on_a_cpu_is_refused_in_one_line(monkeypatch):
    import accelerate

    from tether.config import PPOConfig

    def no_device(**kwargs):
        raise ValueError("There are currently no available devices found, must be one of 'XPU', 'CUDA', or 'NPU'.")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(accelerate, "Accelerator", no_device)
    with pytest.raises(ConfigError, match="FSDP through Accelerate needs CUDA devices .*launch with torchrun or an"):
        Parallel.create(PPOConfig(device="cpu"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny policy and reward model on disk, a prompt file and a two-process config."""
    root = tmp_path_factory.mktemp("parallel-cli")
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
        "total_episodes": 16,  # 2 updates of 2 processes x 2 rows x 2 accumulation
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_mini_batches": 2,
        "num_ppo_epochs": 2,
        "response_length": 5,
        "learning_rate": 1e-3,
        "save_steps": 1,  # device left at auto: on this GPU-less machine, the CPU backend
        "num_sample_generations": 2,
        "gradient_checkpointing": True,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_ppo_command_on_two_processes_saves_and_resumes(workspace: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ("-m", "tether", "ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(out))
    first = torchrun(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["update"] for line in lines] == [1, 2]  # written once, by the main process
    assert lines[-1]["episode"] == 16
    saved = load_file(str(out / "model.safetensors"))
    assert not any("score" in key for key in saved)  # the policy alone, no value weights
    policy = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(workspace / "policy")
    final = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2" / "policy")
    changed = max((a - b).abs().max().item() for a, b in zip(policy.parameters(), start.parameters()))
    assert changed > 1e-4
    for a, b in zip(policy.state_dict().values(), final.state_dict().values()):
        assert torch.equal(a, b)
    assert (out / "checkpoint-1" / "rng-rank1.pt").is_file()

    # Resume from the first checkpoint: the same second update, the same weights.
    shutil.copy(out / "model.safetensors", tmp_path / "straight.safetensors")
    again = torchrun(*args, "--resume", str(out / "checkpoint-1"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, straight = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "straight.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    relogged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["update"] for line in relogged] == [1, 2]

    # A file only process 1 reads (its random generators) refused there: both processes stop,
    # one line, nothing resumed and no traceback (issue 17.1 under two processes).
    from tests.test_checkpoint_files import plant

    plant(out / "checkpoint-1", "rng-rank1.pt", tmp_path / "ran")
    refused = torchrun(*args, "--resume", str(out / "checkpoint-1"), cwd=tmp_path)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rng-rank1.pt" in errors[0], refused.stderr[-3000:]
    assert "/tether/" not in refused.stderr  # torchrun's own traceback for a failed child, none from tether
    assert "resuming from" not in refused.stderr and refused.returncode != 0
    assert not (tmp_path / "ran").exists()


def supervised_config(workspace: Path, command: str, out: Path, **values) -> Path:
    """An SFT or RM config on the workspace's policy; 9 SFT training rows leave a last batch of
    one row, so under two processes one of them has no row in that step (it joins with weight
    0). 3 rows or pairs are held out: two processes evaluate 2 and 1 of them (plus a filler)."""
    if command == "sft":
        rows = [{"prompt": f"w{i} w{i + 1}", "completion": f"w{i} w13"} for i in range(12)]
        values.setdefault("eval_fraction", 0.25)
    else:
        rows = [{"prompt": f"w{i}", "chosen": f"w5 w{i + 2}", "rejected": f"w{i + 3} w{i + 1}"} for i in range(19)]
        values.setdefault("eval_fraction", 0.15)
    data = out.parent / f"{command}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model_name_or_path": str(workspace / "policy"), "dataset_name": str(data), "output_dir": str(out),
        "learning_rate": 1e-3, "adam_epsilon": 1e-4, "num_train_epochs": 1,
        "gradient_accumulation_steps": 1, "lr_scheduler_type": "constant", **values,
    }
    path = out.parent / f"{command}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_supervised_commands_on_two_processes_match_one(workspace: Path, tmp_path: Path, command: str):
    """``tether sft|rm`` under torchrun (2 processes x 2 rows) ends with the weights of one
    process with 4 rows per step (1e-5) and writes its metrics once; resumed from its first
    checkpoint on two processes it ends with the same weights again (bit for bit)."""
    one = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-m", "tether", command, "--config",
         str(supervised_config(workspace, command, one, per_device_train_batch_size=4))],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    two_config = supervised_config(
        workspace, command, two, per_device_train_batch_size=2, save_steps=1, save_total_limit=None
    )
    result = torchrun("-m", "tether", command, "--config", str(two_config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (two / "checkpoint-1" / "rng-rank1.pt").is_file()

    one_lines = (one / "metrics.jsonl").read_text().splitlines()
    two_lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(one_lines) == len(two_lines) == (3 if command == "sft" else 4)
    one_last, two_last = json.loads(one_lines[-1]), json.loads(two_lines[-1])
    assert two_last["loss"] == pytest.approx(one_last["loss"], abs=1e-5)
    evaluated = [key for key in one_last if key.startswith("eval/")]
    assert len(evaluated) >= 2  # the processes split the held-out rows and agree with one process
    for key in evaluated:
        assert two_last[key] == pytest.approx(one_last[key], abs=1e-5), key
    start = load_file(str(workspace / "policy" / "model.safetensors"))
    one_weights, two_weights = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert one_weights.keys() == two_weights.keys()
    moved = max((one_weights[k] - start[k]).abs().max().item() for k in start if k in one_weights)
    assert moved > 1e-3
    for key, value in one_weights.items():
        torch.testing.assert_close(two_weights[key], value, atol=1e-5, rtol=0, msg=key)

    result = torchrun("-m", "tether", command, "--config", str(two_config), "--resume", str(two / "checkpoint-1"),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(str(two / "model.safetensors"))
    for key, value in two_weights.items():
        assert torch.equal(resumed[key], value), key
    untimed = lambda lines: [{k: v for k, v in json.loads(line).items() if not k.startswith("timing/")}  # noqa: E731
                             for line in lines]
    assert untimed((two / "metrics.jsonl").read_text().splitlines()) == untimed(two_lines)


EXAMPLES = ROOT / "examples" / "accelerate"


def test_example_accelerate_configs_are_valid():
    """Accelerate's own loader (which refuses unknown keys) reads every example as the engine
    its name says. DeepSpeed and FSDP need CUDA: this is all the CPU tests can check of them."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": ("MULTI_GPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3), "fsdp": ("FSDP", None)}
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(expected)
    for name, (kind, stage) in expected.items():
        config = load_config_from_file(str(EXAMPLES / f"{name}.yaml"))
        assert str(config.distributed_type).endswith(kind), name
        assert config.mixed_precision == "no"  # tether's bf16 / fp16 fields decide
        if stage is not None:
            assert config.deepspeed_config["zero_stage"] == stage


def test_accelerate_launch_with_the_ddp_example_trains_a_lora_policy(workspace: Path, tmp_path: Path):
    """``accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2`` (gloo
    on this CPU-only machine) with a LoRA policy and value model: two updates of the global
    batch, a merged plain model saved once, different from the start."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "ddp.yaml"),
        "--num_processes", "2", "-m", "tether", "ppo", "--config", str(workspace / "run.yaml"),
        "--output_dir", str(out), "--peft_config", "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
        "--value_model_peft", "true", "--save_steps", "null",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("saved the trained policy") == 1  # one process speaks
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(line["update"], line["episode"]) for line in lines] == [(1, 8), (2, 16)]
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in key or "score" in key for key in saved)
    policy = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(workspace / "policy")
    assert max((a - b).abs().max().item() for a, b in zip(policy.parameters(), start.parameters())) > 1e-4
    assert (out / "checkpoint-2" / "policy" / "adapter_model.safetensors").is_file()


def test_deepspeed_clips_to_max_grad_norm_or_refuses_a_config_that_differs():
    """DeepSpeed clips by its own config, which Accelerate would fill with 1.0: tether writes
    ``max_grad_norm`` there (None: 0, no clipping) and refuses a config set to another value."""
    from tether.trainers.parallel import set_deepspeed_clipping

    for given, max_grad_norm, expected in [("auto", None, 0.0), ("auto", 0.5, 0.5), (None, 1.0, 1.0), (0.5, 0.5, 0.5)]:
        config = {"zero_optimization": {"stage": 2}} if given is None else {"gradient_clipping": given}
        set_deepspeed_clipping(config, max_grad_norm)
        assert config["gradient_clipping"] == expected
    with pytest.raises(ConfigError, match="gradient_clipping is 1.0 but max_grad_norm is None"):
        set_deepspeed_clipping({"gradient_clipping": 1.0}, None)


def test_a_model_saved_from_inside_its_wrapper_keeps_its_own_keys():
    """Under ZeRO-3 / FSDP the saved weights come from the engine's module, which for a reward
    or value model is its ``Critic``: the keys lose the wrapper's prefix and load as the model's."""
    from tether.models.forward import Critic
    from tether.trainers.parallel import keys_inside

    tokenizer = word_tokenizer(numbered_words(10))
    model = tiny_reward_model(tokenizer)
    critic = Critic(model)
    own = keys_inside(critic.state_dict(), critic, model)
    assert own.keys() == model.state_dict().keys()
    assert all(torch.equal(own[key], value) for key, value in model.state_dict().items())
    assert keys_inside(model.state_dict(), model, model).keys() == model.state_dict().keys()


class OneOfTwo:
    """Stands in for process ``rank`` of a two-process run, in this process: each of its sums
    over processes is recorded and returned as this process's part alone."""

    def __init__(self, real, rank: int):
        self.real, self.rank, self.world_size, self.parts = real, rank, 2, []

    distributed = property(lambda self: True)
    my_share = Parallel.my_share

    def sum_over_processes(self, tensor):
        self.parts.append(tensor.clone())
        return tensor

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_evaluation_is_split_between_processes(command, tmp_path, monkeypatch):
    """Each of two processes evaluates its own share of 3 held-out rows (2, and 1 plus an
    uncounted filler), and their parts add up to the whole evaluation."""
    from tether.config import RewardConfig, SFTConfig
    from tether.trainers.reward import RewardTrainer
    from tether.trainers.sft import SFTTrainer

    tokenizer = word_tokenizer(numbered_words(20))
    common = dict(output_dir=str(tmp_path), device="cpu", per_device_train_batch_size=2, per_device_eval_batch_size=2)
    seen = []  # rows handed to the model, per evaluation
    if command == "sft":
        rows = [{"prompt": f"w{i}", "completion": f"w{i + 1} w{i + 2}"} for i in range(3)]
        trainer = SFTTrainer(SFTConfig(**common), tokenizer, tiny_causal_lm(tokenizer), rows[:1], eval_dataset=rows)
        batches = trainer._micro_batches
        monkeypatch.setattr(trainer, "_micro_batches", lambda rows, *size: seen.append(len(rows)) or batches(rows, *size))
    else:
        import datasets

        rows = [{"prompt": f"w{i}", "chosen": f"w5 w{i}", "rejected": f"w{i + 1}"} for i in range(3)]
        pairs = datasets.Dataset.from_list(rows)
        trainer = RewardTrainer(RewardConfig(**common, eval_fraction=0.0), tokenizer, tiny_reward_model(tokenizer),
                                pairs.select(range(2)), eval_dataset=pairs)
        score_pairs = trainer.score_pairs
        monkeypatch.setattr(trainer, "score_pairs", lambda rows: seen.append(len(rows)) or score_pairs(rows))
    whole = trainer.evaluate()
    parts = []
    for rank in (0, 1):
        trainer.parallel = OneOfTwo(trainer.parallel, rank)
        trainer.evaluate()
        parts.append(trainer.parallel.parts[-1])
        trainer.parallel = trainer.parallel.real
    # the whole (in batches of 2 for rm), then rank 0 (2 rows), then rank 1 (1 row + a filler)
    assert seen == ([3, 2, 2] if command == "sft" else [2, 1, 2, 2])
    total = (parts[0] + parts[1]).tolist()
    if command == "sft":  # nll and tokens: the token-weighted loss of the whole
        assert 0 < parts[1][1] < parts[0][1]
        assert total[0] / total[1] == pytest.approx(whole["eval/loss"], abs=1e-6)
    else:  # loss, accuracy and margin summed over 2 and 1 pairs
        expected = [whole[f"eval/{name}"] for name in ("loss", "accuracy", "margin")]
        assert [value / 3 for value in total] == pytest.approx(expected, abs=1e-6)
