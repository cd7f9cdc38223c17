"""Resuming with a changed config, and reusing a run's own config.yaml (issue 19, items 1-2).

A checkpoint records the config it was made with. On ``--resume`` a field that changes what
is trained is refused (each named with its two values) before anything is restored; a
logging, saving or evaluation field may change and is said once; a longer run needs
``--extend``, which says what the learning-rate schedule does. A run's config.yaml holds no
command-line actions (``--resume``, ``--overwrite``, ``--extend``), so rerunning it reruns the
training and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tether.cli import main
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

WORDS = numbered_words(20)


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A finished 2-update PPO run in ``run`` (checkpoints 1 and 2) and its config ``ppo.yaml``."""
    monkeypatch.chdir(tmp_path)
    tokenizer = word_tokenizer(WORDS)
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    tiny_reward_model(tokenizer).save_pretrained(tmp_path / "reward")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(16)))
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(dict(
        model_name_or_path="policy", reward_model_path="reward", dataset_name="prompts.jsonl", output_dir="run",
        device="cpu", total_episodes=16, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_ppo_epochs=1, response_length=4, num_sample_generations=0, save_steps=1, learning_rate=1e-3,
    )))
    assert main(["ppo", "--config", "ppo.yaml"]) == 0
    return tmp_path


def tether(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["ppo", "--config", "ppo.yaml", *args])
    return code, " ".join(capsys.readouterr().err.split())


def episodes(path: Path) -> list[int]:
    return [json.loads(line)["episode"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("field", "value", "said"), [
    ("learning_rate", "0.5", "learning_rate 0.001 -> 0.5"),
    ("kl_coef", "0.5", "kl_coef 0.05 -> 0.5"),
    ("gradient_accumulation_steps", "1", "gradient_accumulation_steps 2 -> 1"),
    ("temperature", "1.0", "temperature 0.7 -> 1.0"),
    ("seed", "1", "seed 42 -> 1"),
])
def test_a_resume_that_changes_what_is_trained_is_refused(workspace, capsys, field, value, said):
    before = (workspace / "run" / "metrics.jsonl").read_text()
    code, err = tether(capsys, "--resume", "run/checkpoint-1", f"--{field}", value)
    assert code == 2 and said in err and "other training settings" in err, err
    assert (workspace / "run" / "metrics.jsonl").read_text() == before  # nothing restored, nothing rewritten
    assert yaml.safe_load((workspace / "run" / "config.yaml").read_text())[field] != float(value)


def test_logging_and_saving_fields_may_change_and_are_said(workspace, capsys):
    code, err = tether(capsys, "--resume", "run/checkpoint-1", "--save_total_limit", "1", "--logging_steps", "2")
    assert code == 0, err
    assert err.count("note: resuming with") == 1 and "save_total_limit None -> 1" in err and "logging_steps 1 -> 2" in err
    assert [p.name for p in (workspace / "run").glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_longer_run_needs_extend_and_says_what_the_schedule_does(workspace, capsys):
    code, err = tether(capsys, "--resume", "--total_episodes", "32")
    assert code == 2 and "total_episodes 16 -> 32 changes the length of the run" in err and "--extend" in err
    code, err = tether(capsys, "--resume", "--total_episodes", "32", "--extend")
    assert code == 0, err
    # 2 of 4 updates done: the linear schedule re-planned over 4 gives 1e-3 * (1 - 2/4) next
    assert "extending the run (total_episodes 16 -> 32) to 4 steps" in err and "0.0005 from the next step" in err
    assert episodes(workspace / "run" / "metrics.jsonl") == [8, 16, 24, 32]
    rates = [json.loads(line)["lr"] for line in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([1e-3, 5e-4, 5e-4, 2.5e-4])  # the rate said, not the 0 the first plan ended on
    written = yaml.safe_load((workspace / "run" / "config.yaml").read_text())
    assert written["total_episodes"] == 32 and "extend_run" not in written
    code, err = tether(capsys, "--resume", "--total_episodes", "8", "--extend")
    assert code == 2 and "a run can be extended, not cut back" in err


def test_a_runs_own_config_reruns_the_training_and_nothing_else(workspace, capsys):
    """Issue 19.2: config.yaml of a run made with --overwrite, or resumed, holds neither."""
    code, err = tether(capsys, "--overwrite", "--total_episodes", "8")
    assert code == 0, err
    written = yaml.safe_load((workspace / "run" / "config.yaml").read_text())
    assert not {"overwrite_output_dir", "resume_from_checkpoint", "extend_run"} & set(written)
    model = (workspace / "run" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["ppo", "--config", "run/config.yaml", "--seed", "123"]) == 2  # refused, not overwritten
    assert "is not empty" in capsys.readouterr().err
    assert (workspace / "run" / "model.safetensors").read_bytes() == model
    assert main(["ppo", "--config", "run/config.yaml", "--resume"]) == 0  # resumes: nothing left to do
    written = yaml.safe_load((workspace / "run" / "config.yaml").read_text())
    assert "resume_from_checkpoint" not in written
    assert main(["ppo", "--config", "run/config.yaml", "--output_dir", "again"]) == 0  # a fresh run elsewhere
    assert episodes(workspace / "again" / "metrics.jsonl") == [8]


def test_sft_and_rm_resumes_are_checked_the_same_way(tmp_path):
    """The step loop SFT and RM share: a changed learning rate refused, a longer run only with
    extend_run, and then the steps go on."""
    import datasets

    from tether.config import RewardConfig, SFTConfig
    from tether.errors import ConfigError
    from tether.trainers.reward import RewardTrainer
    from tether.trainers.sft import SFTTrainer

    tokenizer = word_tokenizer(WORDS)
    sft_rows = [{"prompt": f"w{i}", "completion": f"w{i + 1}"} for i in range(8)]
    rm_rows = datasets.Dataset.from_list([{"prompt": f"w{i}", "chosen": f"w5 w{i}", "rejected": f"w{i + 1}"}
                                          for i in range(8)])

    def make(kind: str, **changes):
        common = {"output_dir": str(tmp_path / kind), "device": "cpu", "per_device_train_batch_size": 4,
                  "num_train_epochs": 1.0, **changes}
        if kind == "sft":
            return SFTTrainer(SFTConfig(**common), tokenizer, tiny_causal_lm(tokenizer), sft_rows)
        return RewardTrainer(RewardConfig(**common, eval_fraction=0.0), tokenizer, tiny_reward_model(tokenizer), rm_rows)

    for kind in ("sft", "rm"):
        make(kind).train()
        with pytest.raises(ConfigError, match="learning_rate .* -> 0.5"):
            make(kind, learning_rate=0.5).train(resume_from_checkpoint=True)
        with pytest.raises(ConfigError, match="num_train_epochs 1.0 -> 2.0 changes the length"):
            make(kind, num_train_epochs=2.0).train(resume_from_checkpoint=True)
        history = make(kind, num_train_epochs=2.0, extend_run=True).train(resume_from_checkpoint=True)
        assert [m["step"] for m in history] == [3, 4]


# --- what --overwrite and saving remove (issue 19.3) ----------------------------------------------

def test_overwrite_after_an_adapter_only_save_leaves_one_plain_model(tmp_path):
    """An adapter-only LoRA save, then a full run with --overwrite in the same folder: the old
    adapter files go, and from_pretrained loads exactly the new model (before, the old adapter
    was stacked on it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tether.config import SFTConfig
    from tether.trainers.sft import SFTTrainer

    tokenizer = word_tokenizer(WORDS)
    rows = [{"prompt": f"w{i}", "completion": f"w{i + 1}"} for i in range(8)]
    out = tmp_path / "out"
    lora = SFTConfig(output_dir=str(out), device="cpu", per_device_train_batch_size=4, num_train_epochs=1.0,
                     learning_rate=1e-2, save_merged=False,
                     peft_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    first = SFTTrainer(lora, tokenizer, tiny_causal_lm(tokenizer), rows)
    first.train()
    first.save_model()
    assert (out / "adapter_model.safetensors").is_file()
    (out / ".checkpoint-7.tmp-killed").mkdir()  # what a kill during a checkpoint write leaves
    (out / "notes.txt").write_text("mine")
    full = SFTConfig(output_dir=str(out), device="cpu", per_device_train_batch_size=4, num_train_epochs=1.0,
                     learning_rate=1e-2, overwrite_output_dir=True)
    second = SFTTrainer(full, tokenizer, tiny_causal_lm(tokenizer), rows)
    second.train()
    second.save_model()
    assert not list(out.glob("adapter_*")) and not (out / ".checkpoint-7.tmp-killed").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not tether's: kept
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, second.model.cpu()(ids).logits, atol=0, rtol=0)


def test_saving_again_replaces_the_previous_models_files(tmp_path):
    from tether.saving import MANIFEST, save_pretrained_atomic

    tokenizer = word_tokenizer(WORDS)
    model = tiny_causal_lm(tokenizer)
    save_pretrained_atomic(tmp_path / "m", [model, tokenizer])
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "model-00001-of-00002.safetensors")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    manifest["model"].append("model-00001-of-00002.safetensors")  # as a sharded save would record it
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / ".m.tmp-killed").mkdir()  # a save killed half-way
    save_pretrained_atomic(tmp_path / "m", [model, tokenizer])
    assert not (tmp_path / "m" / "model-00001-of-00002.safetensors").exists()
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / ".m.tmp-killed").exists()


def test_resume_clears_what_a_killed_checkpoint_write_left(workspace, capsys):
    (workspace / "run" / ".checkpoint-3.tmp-abc").mkdir()
    (workspace / "run" / ".metrics.jsonl.tmp").write_text("half")
    code, err = tether(capsys, "--resume")
    assert code == 0, err
    assert not [p.name for p in (workspace / "run").iterdir() if p.name.startswith(".") and "tmp" in p.name]


# --- evaluation's randomness (issue 19.4) --------------------------------------------------------------

def test_evaluation_changes_nothing_that_is_trained(tmp_path):
    """With an eval set, sampling tables every update, twice, or never: the training metrics and
    weights are the same (evaluation draws from a generator of its own)."""
    import torch

    from tether import PPOConfig, PPOTrainer

    tokenizer = word_tokenizer(WORDS)
    prompts = [f"w{i} w{i + 1}" for i in range(16)]
    runs = {}
    for generations in (0, 1, 4):
        config = PPOConfig(output_dir=str(tmp_path / str(generations)), device="cpu", total_episodes=32,
                           per_device_train_batch_size=8, num_ppo_epochs=1, response_length=4, learning_rate=1e-3,
                           num_sample_generations=generations, seed=3)
        trainer = PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), tiny_reward_model(tokenizer), prompts,
                             eval_dataset=prompts[:5])
        history = trainer.train()
        trained = [{k: v for k, v in m.items() if not k.startswith(("eval/", "timing/"))} for m in history]
        runs[generations] = (trained, [p.detach().clone() for p in trainer.policy.parameters()])
        assert sum("eval/scores" in m for m in history) == generations
    for generations in (1, 4):
        assert runs[generations][0] == runs[0][0]
        assert all(torch.equal(a, b) for a, b in zip(runs[generations][1], runs[0][1]))
