"""Checkpoint and resume of the SFT, reward-model and DPO trainers (``tether.checkpoint``).

What is pinned here, for each trainer:

* a run stopped by SIGTERM during step 2 finishes that step, writes ``checkpoint-2`` and exits
  143; a new trainer resumed from it gives the same metrics.jsonl lines and bitwise the same
  weights as a run that was never stopped; checkpoints every ``save_steps`` and at the end,
  only the newest ``save_total_limit`` kept;
* a used ``output_dir`` is refused without ``--resume`` / ``--overwrite``; ``--overwrite``
  replaces the earlier run; ``--resume`` with nothing to resume is refused;
* a disk that fills up while a checkpoint is written leaves the previous one whole and no
  hidden temporary folder behind;
* non-finite losses skip their steps, are counted in the metrics, and stop the run after
  ``max_nonfinite_steps`` in a row; no checkpoint ever holds non-finite weights;
* the same through ``tether sft`` / ``tether rm`` / ``tether dpo`` in-process.

Both runs below are 4 optimizer steps: 10 rows, 2 held out, batches of 2 x 2, two epochs.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tether.checkpoint import Interrupted, checkpoints, read_state
from tether.cli import main
from tether.config import DPOConfig, RewardConfig, SFTConfig
from tether.errors import ConfigError, TetherError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.dpo import DPOTrainer
from tether.trainers.reward import RewardTrainer
from tether.trainers.sft import SFTTrainer
from tests.device import DEVICE

TINY = dict(hidden_size=32, num_layers=2, num_heads=2)
WORDS = numbered_words(20)
KINDS = ("sft", "rm", "dpo")
TRAINERS = {"sft": SFTTrainer, "rm": RewardTrainer, "dpo": DPOTrainer}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a busy shared CPU: one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def sigterm_fails_the_test():
    """A SIGTERM that reaches the handler outside the trainer fails the test instead of killing pytest."""

    def refuse(signum, frame):
        raise AssertionError("SIGTERM reached the handler outside StopSignals")

    previous = signal.signal(signal.SIGTERM, refuse)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


# --- two tiny runs of 4 steps -----------------------------------------------------------------

def sft_rows(count: int = 10, seed: int = 0) -> list[dict]:
    """Prompts of 1-3 words; the completion repeats the first word, then ``w13``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [f"w{rng.randrange(12)}" for _ in range(rng.randint(1, 3))]
        rows.append({"prompt": " ".join(words), "completion": f"{words[0]} w13"})
    return rows


def preference_rows(count: int = 10, seed: int = 0) -> list[dict]:
    """The chosen completion contains ``w5``, the rejected one does not."""
    rng = random.Random(seed)
    others = [w for w in WORDS[:12] if w != "w5"]
    rows = []
    for _ in range(count):
        chosen = rng.choices(others, k=rng.randint(1, 3))
        chosen.insert(rng.randint(0, len(chosen)), "w5")
        rows.append({
            "prompt": " ".join(rng.choices(others, k=rng.randint(1, 3))),
            "chosen": " ".join(chosen),
            "rejected": " ".join(rng.choices(others, k=rng.randint(1, 4))),
        })
    return rows


def run_settings(output_dir: Path, **overrides) -> dict:
    values = dict(
        output_dir=str(output_dir), device=DEVICE, full_determinism=DEVICE != "cpu", seed=0, learning_rate=1e-2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, num_train_epochs=2.0, eval_fraction=0.2, eval_steps=2, save_steps=3,
        save_total_limit=2, max_grad_norm=1.0,
    )
    values.update(overrides)
    return values


def make_trainer(kind: str, tokenizer, output_dir: Path, rows: list[dict] | None = None, **overrides):
    """A fresh trainer whose model starts from the same weights every time."""
    settings = run_settings(output_dir, **overrides)
    if kind == "sft":
        model = tiny_causal_lm(tokenizer, seed=0, **TINY)
        return SFTTrainer(SFTConfig(**settings), tokenizer, model, rows or sft_rows())
    if kind == "dpo":
        model = tiny_causal_lm(tokenizer, seed=0, **TINY)
        return DPOTrainer(DPOConfig(**settings), tokenizer, model, rows or preference_rows())
    settings.setdefault("normalize_rewards", True)
    model = tiny_reward_model(tokenizer, seed=1, **TINY)
    pairs = datasets.Dataset.from_list(rows or preference_rows())
    return RewardTrainer(RewardConfig(**settings), tokenizer, model, pairs)


def steps_done(trainer) -> int:
    return trainer.step_count


def signal_during_step(trainer, step: int, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to this process as optimizer step ``step`` begins; the step still runs."""
    original = trainer.step

    def step_with_signal(*args):
        if steps_done(trainer) == step - 1:
            os.kill(os.getpid(), signum)
        return original(*args)

    trainer.step = step_with_signal


def metric_lines(output_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("timing")} for line in lines]


def names(output_dir: Path) -> list[str]:
    return [path.name for path in checkpoints(output_dir)]


def hidden(output_dir: Path) -> list[str]:
    return [path.name for path in output_dir.iterdir() if path.name.startswith(".")]


def assert_same_weights(model, other) -> None:
    others = dict(other.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(value.cpu(), others[name].cpu()), name


# --- stop and resume --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_interrupted_and_resumed_run_equals_a_straight_run(kind, tokenizer, tmp_path):
    straight = make_trainer(kind, tokenizer, tmp_path / "straight")
    straight.train()

    out = tmp_path / "stopped"
    first = make_trainer(kind, tokenizer, out)
    signal_during_step(first, 2)
    with pytest.raises(Interrupted) as stopped:
        first.train()
    assert stopped.value.exit_code == 143 and "checkpoint-2" in str(stopped.value)
    assert steps_done(first) == 2  # the step under way when the signal came was finished
    assert names(out) == ["checkpoint-2"]  # save_steps 3: this one is the signal's
    assert read_state(out / "checkpoint-2")["step"] == 2
    assert [line["step"] for line in metric_lines(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM).__name__ == "refuse"  # the handler before train() is back

    second = make_trainer(kind, tokenizer, out)  # a new process would start from the same weights
    history = second.train(resume_from_checkpoint=True)
    assert [m["step"] for m in history] == [3, 4]

    assert metric_lines(out) == metric_lines(tmp_path / "straight")
    assert [line["step"] for line in metric_lines(out)] == [1, 2, 3, 4]
    assert_same_weights(second.model, straight.model)
    # checkpoint-3 by save_steps, checkpoint-4 at the end; save_total_limit 2 pruned checkpoint-2
    assert names(out) == names(tmp_path / "straight") == ["checkpoint-3", "checkpoint-4"]
    assert hidden(out) == []
    if kind != "sft":
        assert second.eval_history == straight.eval_history and len(second.eval_history) == 2
    if kind == "rm":
        assert second.normalization == straight.normalization
        assert second.model.config.reward_bias == straight.model.config.reward_bias


def test_a_resume_mid_logging_interval_logs_the_rows_of_a_straight_run(tokenizer, tmp_path):
    """logging_steps 3: the row at step 3 is the mean of steps 1-3, and the checkpoint at step 2
    carries steps 1-2 into the resumed run (every trainer on this loop: SFT, RM, DPO, GRPO)."""
    settings = dict(logging_steps=3, save_steps=1, save_total_limit=None, eval_steps=4)  # evaluated at 4 only
    make_trainer("sft", tokenizer, tmp_path / "straight", **settings).train()
    assert [line["step"] for line in metric_lines(tmp_path / "straight")] == [3, 4]
    make_trainer("sft", tokenizer, tmp_path / "again", **settings).train()
    resumed = make_trainer("sft", tokenizer, tmp_path / "again", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-2"))
    assert metric_lines(tmp_path / "again") == metric_lines(tmp_path / "straight")


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_a_finished_run_trains_nothing_and_restores_it(kind, tokenizer, tmp_path):
    out = tmp_path / "run"
    finished = make_trainer(kind, tokenizer, out)
    finished.train()
    again = make_trainer(kind, tokenizer, out)
    assert again.train(resume_from_checkpoint=True) == []
    assert_same_weights(again.model, finished.model)
    assert [line["step"] for line in metric_lines(out)] == [1, 2, 3, 4]
    if kind == "rm":  # the normalisation is part of the restored run, not of the weights
        assert again.model.config.reward_bias == finished.model.config.reward_bias
        assert again.eval_history == finished.eval_history


@pytest.mark.parametrize(("save_steps", "save_total_limit", "expected"), [
    (1, 2, ["checkpoint-3", "checkpoint-4"]),
    (1, None, ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]),
    (None, 2, ["checkpoint-4"]),  # always one at the end
])
def test_checkpoint_schedule_and_pruning(tokenizer, tmp_path, save_steps, save_total_limit, expected):
    out = tmp_path / "run"
    make_trainer("sft", tokenizer, out, save_steps=save_steps, save_total_limit=save_total_limit).train()
    assert names(out) == expected
    for path in checkpoints(out):
        assert {"model", "tokenizer", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= {
            p.name for p in path.iterdir()
        }
    assert read_state(out / expected[-1])["step"] == 4


def test_resume_from_a_named_checkpoint_and_a_changed_dataset(tokenizer, tmp_path):
    out = tmp_path / "run"
    straight = make_trainer("sft", tokenizer, out, save_steps=1, save_total_limit=None)
    straight.train()
    again = make_trainer("sft", tokenizer, out, save_steps=1, save_total_limit=None)
    again.train(resume_from_checkpoint=str(out / "checkpoint-2"))  # replays steps 3-4
    assert_same_weights(again.model, straight.model)
    assert [line["step"] for line in metric_lines(out)] == [1, 2, 3, 4]

    other_data = make_trainer("sft", tokenizer, out, rows=sft_rows(15))
    with pytest.raises(ConfigError, match="same data"):
        other_data.train(resume_from_checkpoint=True)


def test_a_checkpoint_resumed_into_a_new_output_dir_brings_its_run_logs(tokenizer, tmp_path):
    """The new folder's metrics.jsonl covers the whole run: the first run's lines up to the
    checkpoint, then its own; the first run's folder is left as it was."""
    first = tmp_path / "first"
    make_trainer("sft", tokenizer, first, save_steps=1, save_total_limit=None).train()
    before = (first / "metrics.jsonl").read_text()
    second = tmp_path / "second"
    make_trainer("sft", tokenizer, second).train(resume_from_checkpoint=str(first / "checkpoint-2"))
    assert metric_lines(second) == metric_lines(first)
    assert (first / "metrics.jsonl").read_text() == before


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_used_output_dir_is_refused_unless_resumed_or_overwritten(kind, tokenizer, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no checkpoint"):
        make_trainer(kind, tokenizer, out).train(resume_from_checkpoint=True)

    make_trainer(kind, tokenizer, out).train()
    assert (out / "config.yaml").is_file()  # written by train(), not only by the command
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        make_trainer(kind, tokenizer, out).train()
    assert (out / "metrics.jsonl").read_text() == before and names(out) == ["checkpoint-3", "checkpoint-4"]

    # one epoch this time: two steps, and nothing left of the earlier four
    make_trainer(kind, tokenizer, out, num_train_epochs=1.0, overwrite_output_dir=True).train()
    assert [line["step"] for line in metric_lines(out)] == [1, 2]
    assert names(out) == ["checkpoint-2"]
    assert yaml.safe_load((out / "config.yaml").read_text())["num_train_epochs"] == 1.0


# --- failures while writing -------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(kind, tokenizer, tmp_path, monkeypatch):
    straight = make_trainer(kind, tokenizer, tmp_path / "straight")
    straight.train()

    out = tmp_path / "run"
    save = torch.save

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        if ".checkpoint-2." in str(path):  # the staging folder of the second checkpoint
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_until_the_disk_is_full)
        with pytest.raises(TetherError, match="checkpoint 2.*No space left on device"):
            make_trainer(kind, tokenizer, out, save_steps=1).train()
    assert names(out) == ["checkpoint-1"] and hidden(out) == []
    loader = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
    loaded = loader.from_pretrained(out / "checkpoint-1" / "model")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())

    resumed = make_trainer(kind, tokenizer, out)
    resumed.train(resume_from_checkpoint=True)
    assert_same_weights(resumed.model, straight.model)
    assert metric_lines(out) == metric_lines(tmp_path / "straight")


def head(trainer):
    return trainer.model.score if isinstance(trainer, RewardTrainer) else trainer.model.lm_head


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_losses_are_skipped_then_stop_the_run(kind, tokenizer, tmp_path):
    out = tmp_path / "run"
    # three epochs (more than four steps) and no held-out rows, whose forward would be NaN too
    trainer = make_trainer(
        kind, tokenizer, out, num_train_epochs=3.0, eval_fraction=0.0, save_steps=1, save_total_limit=None
    )

    def nan_from_step_2(module, inputs, output):  # so are the loss and every gradient
        return output * float("nan") if steps_done(trainer) >= 1 else output

    head(trainer).register_forward_hook(nan_from_step_2)
    with pytest.raises(TetherError, match="3 optimizer steps in a row had a non-finite loss") as stopped:
        trainer.train()
    assert "learning_rate" in str(stopped.value) and "\n" not in str(stopped.value)

    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 2, 3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # the skipped steps left the weights as step 1 made them; no checkpoint after the third skip
    assert names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"] and hidden(out) == []
    loader = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
    for path in checkpoints(out):
        state = read_state(path)
        assert state["skipped_steps"] == state["nonfinite_in_a_row"] == state["step"] - 1
        assert_same_weights(loader.from_pretrained(path / "model"), trainer.model)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_weights_are_never_checkpointed(kind, tokenizer, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(kind, tokenizer, out, save_steps=1)
    original = trainer.step

    def step_then_break_a_weight(*args):
        metrics = original(*args)
        if steps_done(trainer) == 2:  # finite gradients, but the weights went bad
            with torch.no_grad():
                head(trainer).weight[0, 0] = float("inf")
        return metrics

    trainer.step = step_then_break_a_weight
    with pytest.raises(TetherError, match="not writing checkpoint 2"):
        trainer.train()
    assert names(out) == ["checkpoint-1"] and hidden(out) == []


# --- the commands -----------------------------------------------------------------------------

@pytest.fixture
def workspace(tokenizer, tmp_path, monkeypatch):
    """A saved causal LM and the data of both commands; ``<kind>.yaml`` configs for ``tether``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tiny_causal_lm(tokenizer, seed=0, **TINY).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for kind, rows in (("sft", sft_rows()), ("rm", preference_rows()), ("dpo", preference_rows())):
        (tmp_path / f"{kind}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        settings = run_settings(tmp_path / "unused", model_name_or_path=str(tmp_path / "base"),
                                dataset_name=str(tmp_path / f"{kind}.jsonl"))
        del settings["output_dir"]
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(settings))
    return tmp_path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind", KINDS)
def test_command_refuses_a_used_output_dir_and_resumes_after_a_signal(kind, workspace, capsys, monkeypatch):
    def tether(output_dir: Path, *flags: str) -> int:
        return main([kind, "--config", str(workspace / f"{kind}.yaml"), "--output_dir", str(output_dir), *flags])

    straight = workspace / "straight"
    assert tether(straight) == 0
    capsys.readouterr()

    assert tether(straight) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "--resume" in err and "--overwrite" in err, err
    assert "Traceback" not in err and "loading" not in err  # refused before any model was loaded

    out = workspace / "stopped"
    trainer_class = TRAINERS[kind]
    step = trainer_class.step

    def step_with_signal(self, *args):
        if steps_done(self) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_class, "step", step_with_signal)
        assert tether(out) == 143
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "SIGTERM" in err and "--resume" in err, err
    assert names(out) == ["checkpoint-2"] and not (out / "model.safetensors").exists()

    assert tether(out, "--resume") == 0
    assert metric_lines(out) == metric_lines(straight)
    loader = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
    assert_same_weights(loader.from_pretrained(out), loader.from_pretrained(straight))
    written = yaml.safe_load((out / "config.yaml").read_text())  # the training, not this command's actions
    assert not {"resume_from_checkpoint", "overwrite_output_dir", "extend_run"} & set(written)

    assert tether(straight, "--overwrite") == 0
    assert [line["step"] for line in metric_lines(straight)] == [1, 2, 3, 4]
