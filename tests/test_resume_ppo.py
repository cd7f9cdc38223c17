"""PPO checkpoints: a run stopped and resumed equals a run never stopped; saves are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tether import PPOConfig, PPOTrainer
from tether.checkpoint import Interrupted, checkpoints
from tether.cli import main
from tether.errors import ConfigError, TetherError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tests.device import DEVICE

PROMPTS = [" ".join(f"w{(5 * i + j) % 20}" for j in range(1 + i % 4)) for i in range(24)]
# Sends SIGTERM to its own process the second time it is called (during update 2), as a
# pre-empting scheduler would; it also reports a metric so the file shows where it ran.
KILLER = """
import os, signal
calls = 0
def metrics(prompts, responses):
    global calls
    calls += 1
    if calls == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return {"custom/calls": float(calls)}
"""
COUNTER = KILLER.replace("if calls == 2:", "if False:")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(out: Path, metric_file: Path | None = None, **overrides) -> PPOTrainer:
    tokenizer = word_tokenizer(numbered_words(20))
    values = dict(
        output_dir=str(out), device=DEVICE, full_determinism=DEVICE != "cpu", seed=11, total_episodes=32, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=2, response_length=5,
        learning_rate=1e-3, num_sample_generations=2, missing_eos_penalty=0.5,
        metric_function=f"{metric_file}:metrics" if metric_file else None,
    )
    values.update(overrides)
    config = PPOConfig(**values)
    return PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer, seed=0), tiny_reward_model(tokenizer, seed=1), PROMPTS)


def lines(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock timings (the only numbers allowed to differ)."""
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("timing/")}
        for line in path.read_text().splitlines()
    ]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_stop_and_resume_equals_a_straight_run(tmp_path: Path):
    (tmp_path / "kill.py").write_text(KILLER)
    (tmp_path / "count.py").write_text(COUNTER)
    straight = make_trainer(tmp_path / "straight", tmp_path / "count.py")
    straight.train()

    stopped = make_trainer(tmp_path / "resumed", tmp_path / "kill.py")
    with pytest.raises(Interrupted) as info:
        stopped.train()
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-2"]
    assert len(lines(tmp_path / "resumed" / "metrics.jsonl")) == 2

    resumed = make_trainer(tmp_path / "resumed", tmp_path / "count.py")  # fresh models, fresh process state
    resumed.train(resume_from_checkpoint=True)

    assert lines(tmp_path / "resumed" / "metrics.jsonl")[:2] == lines(tmp_path / "straight" / "metrics.jsonl")[:2]
    # after the resume the counter restarts, so compare everything but it
    drop = lambda rows: [{k: v for k, v in r.items() if k != "custom/calls"} for r in rows]  # noqa: E731
    assert drop(lines(tmp_path / "resumed" / "metrics.jsonl")) == drop(lines(tmp_path / "straight" / "metrics.jsonl"))
    assert same_weights(resumed.policy, straight.policy)
    assert same_weights(resumed.value_model, straight.value_model)
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-2", "checkpoint-4"]


def test_cli_resume_after_sigterm_matches_a_straight_run(tmp_path: Path):
    tokenizer = word_tokenizer(numbered_words(20))
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    tiny_reward_model(tokenizer, seed=1).save_pretrained(tmp_path / "reward")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "kill.py").write_text(KILLER.replace('{"custom/calls": float(calls)}', "{}"))
    base = dict(
        model_name_or_path=str(tmp_path / "policy"), reward_model_path=str(tmp_path / "reward"),
        dataset_name=str(tmp_path / "prompts.jsonl"), device=DEVICE, full_determinism=DEVICE != "cpu", seed=5, total_episodes=32,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=2,
        response_length=5, learning_rate=1e-3,
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(base))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def tether(*args):
        return subprocess.run([sys.executable, "-m", "tether", "ppo", "--config", str(tmp_path / "run.yaml"), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    straight = tether("--output_dir", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tether("--output_dir", str(tmp_path / "b"), "--metric_function", f"{tmp_path / 'kill.py'}:metrics")
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert "stopped by SIGTERM" in killed.stderr and "Traceback" not in killed.stderr
    again = tether("--output_dir", str(tmp_path / "b"))
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = tether("--output_dir", str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert lines(tmp_path / "b" / "metrics.jsonl") == lines(tmp_path / "a" / "metrics.jsonl")
    from safetensors.torch import load_file

    final_a, final_b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_output_dir_policy(tmp_path: Path):
    out = tmp_path / "run"
    make_trainer(out, total_episodes=8).train()
    with pytest.raises(ConfigError, match="is not empty; pass --resume to continue that run or --overwrite"):
        make_trainer(out, total_episodes=8).train()
    with pytest.raises(ConfigError, match="no checkpoint in"):
        make_trainer(tmp_path / "empty", total_episodes=8).train(resume_from_checkpoint=True)
    (out / "notes.txt").write_text("mine")
    make_trainer(out, total_episodes=8, overwrite_output_dir=True).train()
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces tether's files only
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_save_total_limit_keeps_the_newest(tmp_path: Path):
    make_trainer(tmp_path, save_steps=1, save_total_limit=2).train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch):
    trainer = make_trainer(tmp_path, save_steps=1)
    real_save = torch.save
    calls = {"n": 0}

    def disk_full_on_second_checkpoint(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_checkpoint)
    with pytest.raises(TetherError, match="could not write checkpoint 2 in .*: No space left on device; the previous"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")]  # no half-written folder
    resumed = make_trainer(tmp_path, save_steps=1)
    resumed.train(resume_from_checkpoint=True)  # and it is loadable
    assert resumed.update == 4


@pytest.mark.parametrize("main_process", [True, False])
def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path: Path, monkeypatch, capsys, main_process):
    """Each skipped step is said once, and the stop too: by the main process (every process of
    a launch skips and stops alike; another process says neither)."""
    from tether.cli import main as cli_main

    trainer = make_trainer(tmp_path, max_nonfinite_steps=3)
    real = trainer.parallel.backward
    monkeypatch.setattr(trainer.parallel, "backward", lambda loss: real(loss * float("nan")))
    monkeypatch.setattr(type(trainer.parallel), "is_main", property(lambda self: main_process))
    before = [p.clone() for p in trainer.policy.parameters()]
    with pytest.raises(TetherError, match="3 optimizer steps in a row had a non-finite loss or gradient") as stopped:
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert checkpoints(tmp_path) == []
    said = capsys.readouterr().err.count("optimizer step skipped")
    assert said == (3 if main_process else 0)
    assert getattr(stopped.value, "said_elsewhere", False) is not main_process
    monkeypatch.setattr("tether.commands.run_ppo", lambda *args: (_ for _ in ()).throw(stopped.value))
    assert cli_main(["ppo", "--config", "unused.yaml"]) == 2
    assert ("optimizer steps in a row" in capsys.readouterr().err) is main_process


def test_cli_refuses_an_unwritable_output_dir(tmp_path: Path, capsys):
    if os.geteuid() == 0:
        target = "/proc/tether-cannot-write-here"  # root can write anywhere a mode bit forbids
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out")
    tokenizer = word_tokenizer(numbered_words(20))
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    status = main([
        "ppo", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model_path", "tether.demo.task:gold_reward",
        "--dataset_name", str(tmp_path / "p.jsonl"), "--output_dir", target, "--device", "cpu",
        "--total_episodes", "8",
    ])
    assert status == 2
    assert f"output_dir {target} cannot be written" in capsys.readouterr().err


def test_resuming_from_an_older_checkpoint_abandons_the_newer_ones(tmp_path: Path):
    """A run resumed from checkpoint-2 while checkpoint-4 exists continues from 2; its own new
    checkpoints replace the abandoned future instead of being pruned in favour of it."""
    first = make_trainer(tmp_path / "two", save_steps=1, save_total_limit=4)
    first.train()
    assert [p.name for p in checkpoints(tmp_path / "two")] == [f"checkpoint-{i}" for i in range(1, 5)]
    resumed = make_trainer(tmp_path / "two", save_steps=1, save_total_limit=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "two" / "checkpoint-2"))
    assert resumed.update == 4
    assert [p.name for p in checkpoints(tmp_path / "two")] == ["checkpoint-4"]
    assert len(lines(tmp_path / "two" / "metrics.jsonl")) == 4


def test_a_checkpoint_resumed_into_a_new_output_dir_brings_its_run_logs(tmp_path: Path):
    """Resumed into another folder, the new metrics.jsonl starts with the first run's lines up to
    the checkpoint and goes on as that run did; samples.jsonl alike."""
    make_trainer(tmp_path / "first", save_steps=1, save_total_limit=4, num_sample_generations=4).train()
    make_trainer(tmp_path / "second", num_sample_generations=4).train(
        resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    assert len(lines(tmp_path / "second" / "metrics.jsonl")) == 4
    assert lines(tmp_path / "second" / "metrics.jsonl") == lines(tmp_path / "first" / "metrics.jsonl")
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("first", "second")]
    assert samples[0] and samples[1] == samples[0]


class FakeTrackers:
    """Stand-ins for tensorboard, wandb and trackio that record how tether starts and feeds them."""

    def __init__(self, monkeypatch):
        import importlib.machinery
        import types

        self.started, self.logged = [], []
        fake = self

        class Writer:
            def __init__(self, log_dir, purge_step=None):
                fake.started.append(("tensorboard", purge_step))

            def add_scalar(self, key, value, step):
                fake.logged.append(("tensorboard", key, step))

            def flush(self):
                pass

            def close(self):
                pass

        class Run:
            def __init__(self, tracker):
                self.tracker = tracker

            def log(self, metrics, step):
                fake.logged.append((self.tracker, "objective/scores", step))

            def finish(self):
                pass

        def module(name, **attributes):
            made = types.ModuleType(name)
            made.__spec__ = importlib.machinery.ModuleSpec(name, None)
            made.__dict__.update(attributes)
            monkeypatch.setitem(sys.modules, name, made)

        ids = iter(range(100))
        module("tensorboard")
        module("torch.utils.tensorboard", SummaryWriter=Writer)
        module("wandb", util=types.SimpleNamespace(generate_id=lambda: f"id{next(ids)}"),
               init=lambda **kw: fake.started.append(("wandb", kw["id"], kw["resume"])) or Run("wandb"))
        module("trackio", init=lambda **kw: fake.started.append(("trackio", kw["name"], kw["resume"])) or Run("trackio"))

    def steps(self, tracker: str) -> list[int]:
        return [step for name, key, step in self.logged if name == tracker and key == "objective/scores"]


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, monkeypatch):
    """``report_to`` tensorboard, wandb and trackio: every update is logged to each; a run
    resumed from update 1 continues the same W&B and trackio runs (ids kept in trackers.json),
    TensorBoard drops its events past the checkpoint (purge_step 2), and update 2 is logged again.
    A fresh run over the folder (--overwrite) starts new runs."""
    trackers = FakeTrackers(monkeypatch)
    out = tmp_path / "run"
    report = ["tensorboard", "wandb", "trackio"]
    make_trainer(out, total_episodes=16, save_steps=1, report_to=report).train()
    assert trackers.steps("tensorboard") == trackers.steps("wandb") == trackers.steps("trackio") == [1, 2]
    first = list(trackers.started)
    assert first[0] == ("tensorboard", None)
    (wandb_id,) = [entry[1] for entry in first if entry[0] == "wandb"]
    (trackio_name,) = [entry[1] for entry in first if entry[0] == "trackio"]
    assert json.loads((out / "trackers.json").read_text()) == {"wandb": wandb_id, "trackio": trackio_name}

    trackers.started.clear()
    trackers.logged.clear()
    make_trainer(out, total_episodes=16, save_steps=1, report_to=report).train(
        resume_from_checkpoint=str(out / "checkpoint-1")
    )
    assert sorted(trackers.started) == sorted(
        [("tensorboard", 2), ("wandb", wandb_id, "allow"), ("trackio", trackio_name, "allow")]
    )
    assert trackers.steps("wandb") == [2]

    trackers.started.clear()
    make_trainer(out, total_episodes=8, report_to=report, overwrite_output_dir=True).train()
    assert ("wandb", wandb_id, "allow") not in trackers.started and ("tensorboard", None) in trackers.started


def test_a_resume_mid_logging_interval_logs_the_rows_of_a_straight_run(tmp_path: Path):
    """With logging_steps 3 the row at update 3 is the mean of updates 1-3. Resumed from
    checkpoint-2, updates 1-2 come from the checkpoint: the row is the straight run's."""
    straight = make_trainer(tmp_path / "straight", save_steps=1, logging_steps=3)
    straight.train()
    assert [line["update"] for line in lines(tmp_path / "straight" / "metrics.jsonl")] == [3, 4]
    make_trainer(tmp_path / "again", save_steps=1, logging_steps=3).train()
    resumed = make_trainer(tmp_path / "again", save_steps=1, logging_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-2"))
    assert lines(tmp_path / "again" / "metrics.jsonl") == lines(tmp_path / "straight" / "metrics.jsonl")
