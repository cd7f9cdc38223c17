"""Reading a checkpoint never runs code stored in it (``tether.checkpoint.load_plain``).

A checkpoint's ``optimizer.pt``, ``scheduler.pt`` and every process's ``rng*.pt`` are read with
``torch.load(weights_only=True)``. Each test below replaces one of them with a pickle whose
unpickling would run a command (it would create a marker file), then resumes: the resume must
stop with one line naming the file, and the marker must never appear. PPO goes through the
``tether ppo`` command, SFT and RM through their trainers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tether.checkpoint import checkpoints, restore, rng_state, set_rng_state
from tether.cli import main
from tether.config import RewardConfig, SFTConfig
from tether.errors import ConfigError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.reward import RewardTrainer
from tether.trainers.sft import SFTTrainer

WORDS = numbered_words(20)
FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")


class Payload:
    """Unpickling this runs ``touch <marker>``, as a crafted checkpoint file would run anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(checkpoint: Path, name: str, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, checkpoint / name)


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The test's payload is real: loading it the unsafe way creates the marker."""
    marker = tmp_path / "ran"
    plant(tmp_path, "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_rng_state_is_tensors_and_plain_values_and_restores_every_generator(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.normal()  # numpy keeps a cached gaussian: it must come back too
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist()) == expected


# --- PPO, through the command ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A finished two-update PPO run made by ``tether ppo``, and its config."""
    root = tmp_path_factory.mktemp("ppo")
    tokenizer = word_tokenizer(WORDS)
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    tiny_reward_model(tokenizer, seed=1).save_pretrained(root / "reward")
    prompts = [" ".join(WORDS[i : i + 3]) for i in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    config = dict(
        model_name_or_path=str(root / "policy"), reward_model_path=str(root / "reward"),
        dataset_name=str(root / "prompts.jsonl"), device="cpu", total_episodes=8, per_device_train_batch_size=4,
        num_ppo_epochs=1, response_length=4, num_sample_generations=0, save_steps=1,
    )
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["ppo", "--config", str(root / "run.yaml"), "--output_dir", str(root / "run")]) == 0
    return root


@pytest.mark.parametrize("name", FILES)
def test_ppo_resume_refuses_a_crafted_file_without_running_it(ppo_run, name, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ppo_run / "run", out)
    newest = checkpoints(out)[-1]
    marker = tmp_path / "ran"
    plant(newest, name, marker)
    capsys.readouterr()
    code = main(["ppo", "--config", str(ppo_run / "run.yaml"), "--output_dir", str(out), "--resume"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert str(newest / name) in errors[0] and "Traceback" not in err
    assert "system object" in errors[0] and "weights_only" not in errors[0]  # says what, never "load it unsafely"
    assert not marker.exists()


def _optimizer_with_other_shapes(path: Path) -> None:
    """Tensors only, but not the parameters' shapes: a fused AdamW step read past them (a segfault)."""
    state = torch.load(path, weights_only=True)
    for entries in state["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            entries[key] = torch.zeros(7)
    torch.save(state, path)


def _state_with(**changes):
    def damage(path: Path) -> None:
        state = json.loads(path.read_text())
        state.update(changes)
        path.write_text(json.dumps(state))
    return damage


DAMAGE = {  # (file, how, what the one line says)
    "optimizer of other shapes": ("optimizer.pt", _optimizer_with_other_shapes, "exp_avg of parameter 0 is (7,)"),
    "optimizer a tensor": ("optimizer.pt", lambda p: torch.save(torch.zeros(3), p), "not an optimizer state"),
    "optimizer empty": ("optimizer.pt", lambda p: torch.save({}, p), "not an optimizer state"),
    "optimizer missing": ("optimizer.pt", lambda p: p.unlink(), "has no optimizer.pt"),
    "schedule a tensor": ("scheduler.pt", lambda p: torch.save(torch.zeros(3), p), "learning-rate schedule"),
    "schedule empty": ("scheduler.pt", lambda p: torch.save({}, p), "learning-rate schedule"),
    "generators a tensor": ("rng.pt", lambda p: torch.save(torch.zeros(3), p), "random generator states"),
    "generators missing": ("rng.pt", lambda p: p.unlink(), "has no rng.pt"),
    "state not JSON": ("trainer_state.json", lambda p: p.write_text("{broken"), "cannot be read"),
    "state a list": ("trainer_state.json", lambda p: p.write_text("[1, 2]"), "holds a list"),
    "state not UTF-8": ("trainer_state.json", lambda p: p.write_bytes(b"\xff\xfe{"), "cannot be read"),
    "state without sampler": ("trainer_state.json", _state_with(sampler=None), "sampler"),
    "update past the run": ("trainer_state.json", _state_with(update=100), "step 100, past this run's 2"),
    "update negative": ("trainer_state.json", _state_with(update=-3), "at step -3"),
    "weights garbage": ("policy/model.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "cannot be read"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line(ppo_run, case, tmp_path, capsys):
    """Data-only files that are not what tether wrote: one line naming the file, exit 2, never a
    traceback or a crash (helper trial of issue 17)."""
    name, damage, said = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(ppo_run / "run", out)
    newest = checkpoints(out)[-1]
    damage(newest / name)
    capsys.readouterr()
    code = main(["ppo", "--config", str(ppo_run / "run.yaml"), "--output_dir", str(out), "--resume"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert said in errors[0] and str(newest) in errors[0], errors[0]


def test_a_log_line_cut_short_is_dropped_on_resume(ppo_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ppo_run / "run", out)
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"update": 3, "objective/sco')
    assert main(["ppo", "--config", str(ppo_run / "run.yaml"), "--output_dir", str(out), "--resume",
                 "--total_episodes", "12", "--extend"]) == 0
    assert "1 unreadable line(s) dropped" in " ".join(capsys.readouterr().err.split())
    assert [json.loads(line)["update"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# --- SFT and RM, through their trainers ---------------------------------------------------------

def sft_trainer(tokenizer, out: Path) -> SFTTrainer:
    rows = [{"prompt": f"w{i} w{i + 1}", "completion": f"w{i + 2}"} for i in range(8)]
    config = SFTConfig(output_dir=str(out), device="cpu", per_device_train_batch_size=4, num_train_epochs=1.0)
    return SFTTrainer(config, tokenizer, tiny_causal_lm(tokenizer, seed=0), rows)


def rm_trainer(tokenizer, out: Path) -> RewardTrainer:
    import datasets

    rows = [{"prompt": f"w{i}", "chosen": f"w5 w{i}", "rejected": f"w{i + 1}"} for i in range(8)]
    config = RewardConfig(output_dir=str(out), device="cpu", per_device_train_batch_size=4, num_train_epochs=1.0,
                          eval_fraction=0.0)
    return RewardTrainer(config, tokenizer, tiny_reward_model(tokenizer, seed=1), datasets.Dataset.from_list(rows))


MAKERS = {"sft": sft_trainer, "rm": rm_trainer}


@pytest.fixture(scope="module")
def supervised_runs(tmp_path_factory):
    tokenizer = word_tokenizer(WORDS)
    runs = {}
    for kind, make in MAKERS.items():
        out = tmp_path_factory.mktemp(kind) / "run"
        make(tokenizer, out).train()
        runs[kind] = out
    return tokenizer, runs


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("name", FILES)
def test_supervised_resume_refuses_a_crafted_file_without_running_it(supervised_runs, kind, name, tmp_path):
    tokenizer, runs = supervised_runs
    out = tmp_path / "run"
    shutil.copytree(runs[kind], out)
    newest = checkpoints(out)[-1]
    marker = tmp_path / "ran"
    plant(newest, name, marker)
    trainer = MAKERS[kind](tokenizer, out)
    with pytest.raises(ConfigError, match=str(newest / name).replace(".", r"\.")) as refused:
        trainer.train(resume_from_checkpoint=True)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_every_process_rng_file_is_read_safely(supervised_runs, tmp_path):
    """Process 1 of a two-process run reads ``rng-rank1.pt``: the same refusal."""
    tokenizer, runs = supervised_runs
    out = tmp_path / "run"
    shutil.copytree(runs["sft"], out)
    newest = checkpoints(out)[-1]
    marker = tmp_path / "ran"
    plant(newest, "rng-rank1.pt", marker)
    trainer = sft_trainer(tokenizer, tmp_path / "other")
    with pytest.raises(ConfigError, match="rng-rank1"):
        restore(newest, {"model": trainer.model}, trainer.optimizer, trainer.scheduler, rank=1)
    assert not marker.exists()


def test_outputs_get_the_permissions_of_the_umask_not_of_their_temporary_files(tmp_path):
    """Written as private temporary files and folders, then renamed: the results are readable as
    any file the user writes (a umask of 022: 644 files, 755 folders)."""
    from tether.checkpoint import open_checkpoint
    from tether.saving import save_pretrained_atomic, write_text_atomic
    from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer

    before = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
        tokenizer = word_tokenizer(numbered_words(5))
        save_pretrained_atomic(tmp_path / "model", [tiny_causal_lm(tokenizer), tokenizer])
        staging = open_checkpoint(tmp_path, 3)
    finally:
        os.umask(before)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert {path.stat().st_mode & 0o777 for path in (tmp_path / "model").iterdir()} == {0o644}
    assert staging.stat().st_mode & 0o777 == 0o755


def test_a_fresh_output_dir_another_process_is_probing_is_not_taken_for_a_used_one(tmp_path):
    """Every process of a launch checks output_dir before they join up; one may find the
    probe file another is writing there at that moment: that is no earlier run."""
    from tether.checkpoint import prepare_output_dir

    (tmp_path / ".write-test-abc123").write_text("")
    assert prepare_output_dir(tmp_path, resume=None, overwrite=False) is None
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="is not empty"):
        prepare_output_dir(tmp_path, resume=None, overwrite=False)
