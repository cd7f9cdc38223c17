"""Data at its limits, through the trainers and commands (issue 18): long rows, positions past
the model's, help and the messages that point a user somewhere."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml

from tether import PPOConfig, PPOTrainer
from tether.cli import main
from tether.config import RewardConfig, SFTConfig
from tether.errors import ConfigError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.reward import RewardTrainer
from tether.trainers.sft import SFTTrainer

WORDS = numbered_words(20)
LONG_PROMPT = " ".join(WORDS[:10] * 3)  # 30 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def test_sft_on_long_prompts_trains_every_completion_token(tokenizer, tmp_path):
    """Issue 18.1: 30-token prompts, max_length 24: each row keeps its whole 4-token completion
    (EOS included), not one token of it."""
    rows = [{"prompt": LONG_PROMPT, "completion": "w11 w12 w13"} for _ in range(4)]
    config = SFTConfig(output_dir=str(tmp_path), device="cpu", max_length=24, per_device_train_batch_size=4,
                       num_train_epochs=1.0)
    with pytest.warns(UserWarning, match="4 of 4 training rows were longer than max_length=24"):
        trainer = SFTTrainer(config, tokenizer, tiny_causal_lm(tokenizer), rows)
    assert all(len(s.ids) == 24 and len(s.completion_ids) == 4 for s in trainer.train_sequences)
    assert trainer.step(list(range(4)))["tokens"] == 16


def test_reward_model_on_pairs_that_share_long_prompts_learns(tokenizer, tmp_path):
    """Issue 18.1's reward-model case: with the prompt cut from the left the pairs stay apart,
    so the model learns to prefer w5 (before: loss ln 2, accuracy 0)."""
    rows = [{"prompt": LONG_PROMPT, "chosen": f"w{i % 4} w5", "rejected": f"w{i % 4} w6"} for i in range(16)]
    config = RewardConfig(output_dir=str(tmp_path), device="cpu", max_length=24, per_device_train_batch_size=8,
                          num_train_epochs=6.0, learning_rate=3e-3, eval_fraction=0.0)
    trainer = RewardTrainer(config, tokenizer, tiny_reward_model(tokenizer), datasets.Dataset.from_list(rows))
    assert len(trainer.train_pairs) == 16
    history = trainer.train()
    assert history[-1]["accuracy"] == 1.0 and history[-1]["loss"] < 0.5


# --- positions ----------------------------------------------------------------------------------

def gpt2(tokenizer, positions: int):
    return tiny_causal_lm(tokenizer, arch="gpt2", max_positions=positions)


def test_rows_longer_than_a_gpt2_positions_are_refused_naming_both(tokenizer, tmp_path):
    """Issue 18.2: before, an IndexError traceback (a device-side assert on a GPU)."""
    rows = [{"prompt": " ".join(WORDS[:12]), "completion": "w1 w2 w3 w4 w5 w6"}]
    config = SFTConfig(output_dir=str(tmp_path), device="cpu", max_length=40, per_device_train_batch_size=1)
    with pytest.raises(ConfigError, match=r"longest row \(max_length=40\) needs 19 positions but the model has 16 \(n_positions\)"):
        SFTTrainer(config, tokenizer, gpt2(tokenizer, 16), rows)
    ppo = PPOConfig(output_dir=str(tmp_path / "ppo"), device="cpu", response_length=8, per_device_train_batch_size=2)
    with pytest.raises(ConfigError, match="response_length=8 needs 20 positions but the policy has 16"):
        PPOTrainer(ppo, tokenizer, gpt2(tokenizer, 16), lambda p, r: [0.0] * len(r), [" ".join(WORDS[:12])] * 2)


def test_rotary_positions_past_the_trained_range_are_a_warning(tokenizer, tmp_path, capsys):
    rows = [{"prompt": " ".join(WORDS[:12]), "completion": "w1 w2 w3 w4 w5 w6"}] * 2
    config = SFTConfig(output_dir=str(tmp_path), device="cpu", per_device_train_batch_size=2, num_train_epochs=1.0)
    trainer = SFTTrainer(config, tokenizer, tiny_causal_lm(tokenizer, max_positions=16), rows)
    assert "needs 19 positions, past the 16 (max_position_embeddings) of the model" in " ".join(capsys.readouterr().err.split())
    trainer.train()


# --- commands and messages ------------------------------------------------------------------------

@pytest.fixture
def workspace(tokenizer, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = [{"prompt": f"w{i}", "chosen": f"w5 w{i}", "rejected": f"w{i + 1}"} for i in range(10)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(dict(
        model_name_or_path="base", dataset_name="pairs.jsonl", device="cpu", per_device_train_batch_size=4,
        num_train_epochs=1, eval_fraction=0.2,
    )))
    return tmp_path


@pytest.mark.parametrize("command", ["ppo", "sft", "rm"])
@pytest.mark.parametrize("where", ["first", "after other arguments"])
def test_help_lists_the_fields(command, where, capsys):
    """Issue 18.7: ``-h`` / ``--help`` anywhere print the command's fields (before: "unknown
    config field 'help'")."""
    args = [command, "--help"] if where == "first" else [command, "--config", "x.yaml", "--seed", "3", "-h"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"usage: tether {command}" in out and "--learning_rate" in out and "--output_dir" in out


def test_resume_after_a_stop_before_any_checkpoint_points_to_overwrite(workspace, capsys):
    (workspace / "out").mkdir()
    (workspace / "out" / "metrics.jsonl").write_text("")
    assert main(["rm", "--config", "rm.yaml", "--output_dir", "out", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in out" in err and "--overwrite" in err


def test_a_messages_dataset_without_a_chat_template_names_the_messages_column(tokenizer, tmp_path):
    chat = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    config = SFTConfig(output_dir=str(tmp_path), device="cpu")
    with pytest.raises(Exception, match="row 0 of column 'messages' is a chat but the tokenizer has no chat_template"):
        SFTTrainer(config, tokenizer, tiny_causal_lm(tokenizer), [{"messages": chat}])


def test_normalization_dataset_errors_name_the_field_and_unused_ones_are_said(workspace, capsys):
    assert main(["rm", "--config", "rm.yaml", "--output_dir", "a", "--normalize_rewards", "true",
                 "--normalization_dataset", "missing.jsonl"]) == 2
    assert "normalization_dataset missing.jsonl: dataset file not found" in capsys.readouterr().err
    assert main(["rm", "--config", "rm.yaml", "--output_dir", "b", "--normalization_dataset", "pairs.jsonl"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("normalization_dataset is set but normalize_rewards is false") == 1


def test_a_misspelled_test_split_is_said(workspace, capsys):
    rows = datasets.Dataset.from_list([{"prompt": f"w{i}", "chosen": f"w5 w{i}", "rejected": f"w{i + 1}"} for i in range(10)])
    datasets.DatasetDict({"train": rows, "test": rows.select(range(4))}).save_to_disk(str(workspace / "splits"))
    assert main(["rm", "--config", "rm.yaml", "--dataset_name", "splits", "--dataset_test_split", "tset",
                 "--output_dir", "c"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("has no split 'tset' (its splits: train, test)") == 1
