"""Bad input through the command line: exit code 2 and one line that names what and where.

Run in-process through ``tether.cli.main`` (the command's own code path) to keep the suite
fast; ``test_cli.py`` checks once in a real subprocess that no traceback reaches the user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tether.cli import main
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

PROMPTS = [f"w{i % 20} w{(i + 3) % 20}" for i in range(16)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tokenizer = word_tokenizer(numbered_words(20))
    tiny_causal_lm(tokenizer).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    tiny_reward_model(tokenizer).save_pretrained(root / "reward")
    no_pad = word_tokenizer(numbered_words(20), pad_token=None)
    tiny_causal_lm(tokenizer).save_pretrained(root / "policy-no-pad")
    no_pad.save_pretrained(root / "policy-no-pad")
    two_labels = tiny_reward_model(tokenizer)
    two_labels.config.num_labels = 2
    two_labels.score = torch.nn.Linear(two_labels.config.hidden_size, 2, bias=False)
    two_labels.save_pretrained(root / "reward-2-labels")
    big = word_tokenizer(numbered_words(60))
    tiny_causal_lm(tokenizer).save_pretrained(root / "policy-small-vocab")
    big.save_pretrained(root / "policy-small-vocab")
    (root / "rewards.py").write_text(
        "def raises(p, r):\n    raise RuntimeError('judge offline')\n"
        "def short(p, r):\n    return [0.0] * (len(r) - 1)\n"
        "def nan(p, r):\n    return [float('nan')] + [0.0] * (len(r) - 1)\n"
        "def words(p, r):\n    return ['good'] * len(r)\n"
        "def fine(p, r):\n    return [1.0] * len(r)\n"
    )
    return root


def run(tmp_path: Path, models: Path, capsys, rows=None, **fields) -> tuple[int, str]:
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS] if rows is None else rows
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model_name_or_path": str(models / "policy"), "reward_model_path": str(models / "reward"),
        "dataset_name": str(data), "output_dir": str(tmp_path / "out"), "device": "cpu",
        "total_episodes": 8, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "response_length": 4, "num_ppo_epochs": 1, "num_sample_generations": 0,
    }
    config.update(fields)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    status = main(["ppo", "--config", str(tmp_path / "run.yaml")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return status, errors[0] if len(errors) == 1 else "\n".join(errors)


CASES = {
    "empty dataset": ([], {}, "has no rows"),
    "missing column": ([{"question": "w1"}], {}, "the dataset has question; set prompt_column"),
    "empty prompt": ([{"prompt": p} for p in PROMPTS[:5]] + [{"prompt": ""}], {}, "row 5 of column 'prompt' is an empty prompt"),
    "long prompt refused": (None, {"max_prompt_length": 1, "prompt_truncation": "error"}, "row 0 of column 'prompt'"),
    "reward model with two labels": (None, {"reward_model_path": "{models}/reward-2-labels"}, "has 2 labels"),
    "tokenizer larger than the model": (None, {"model_name_or_path": "{models}/policy-small-vocab"}, "the tokenizer has 64 tokens but the policy embeds only 24"),
    "batch does not divide": (None, {"num_mini_batches": 3}, "num_mini_batches=3 does not divide the rollout batch of 8"),
    "response_length 0": (None, {"response_length": 0}, "response_length must be at least 1"),
    "wrong type": (None, {"kl_coef": "lots"}, "config field kl_coef: expected a number, got 'lots'"),
    "unknown key": (None, {"clip_range": 0.2}, "unknown config field 'clip_range'; did you mean 'cliprange'?"),
    "reward function raises": (None, {"reward_model_path": "{models}/rewards.py:raises"}, "reward function raises raised RuntimeError: judge offline"),
    "reward function short": (None, {"reward_model_path": "{models}/rewards.py:short"}, "returned 7 scores for 8 completions"),
    "reward function NaN": (None, {"reward_model_path": "{models}/rewards.py:nan"}, "returned nan for completion 0"),
    "reward function words": (None, {"reward_model_path": "{models}/rewards.py:words"}, "returned 'good' for completion 0"),
    "missing model": (None, {"model_name_or_path": "{models}/nope"}, "cannot load tokenizer from"),
    "missing reward module": (None, {"reward_model_path": "{models}/nope.py:fn"}, "reward function file not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, models, capsys, monkeypatch):
    """Refused before any optimizer step: nothing trained, no metrics, no checkpoint."""
    from tether.trainers.ppo import PPOTrainer

    updates = []
    monkeypatch.setattr(PPOTrainer, "optimise", lambda self, rollout: updates.append(1))
    rows, fields, expected = CASES[case]
    fields = {k: v.format(models=models) if isinstance(v, str) else v for k, v in fields.items()}
    status, error = run(tmp_path, models, capsys, rows, **fields)
    assert status == 2, error
    assert expected in error, error
    assert "\n" not in error
    assert updates == []
    out = tmp_path / "out"
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))


IMPOSSIBLE = {  # issue 20.7: refused in one line, exit 2, before any model loads
    "learning_rate nan": ({"learning_rate": "nan"}, "config field learning_rate must be a finite number, got nan"),
    "learning_rate inf": ({"learning_rate": "inf"}, "learning_rate must be a finite number, got inf"),
    "temperature inf": ({"temperature": "inf"}, "temperature must be a finite number"),
    "kl_coef nan": ({"kl_coef": "nan"}, "kl_coef must be a finite number"),
    "missing_eos_penalty inf": ({"missing_eos_penalty": "-inf"}, "missing_eos_penalty must be a finite number"),
    "negative cliprange": ({"cliprange": "-0.2"}, "cliprange must be >= 0, got -0.2"),
    "stop_token and stop_token_id": ({"stop_token": "eos", "stop_token_id": "2"}, "stop_token ('eos') and stop_token_id (2) are both set"),
    "empty stop_token_id": ({"stop_token_id": "[]"}, "stop_token_id is an empty list"),
    "prompt_truncation": ({"prompt_truncation": "right"}, "prompt_truncation: expected 'left' or 'error'"),
    "unknown tracker": ({"report_to": "wandbb"}, "report_to 'wandbb' is not supported; use one of all, none, tensorboard"),
    "tracker not installed": ({"report_to": "[tensorboard]"}, "report_to 'tensorboard' needs the tensorboard package"),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_config_values_that_cannot_be_right_are_refused_before_loading(case, tmp_path, models, capsys, monkeypatch):
    import tether.models.loading as loading

    loads = []
    monkeypatch.setattr(loading, "load_pretrained", lambda *args, **kwargs: loads.append(args) or 1 / 0)
    fields, expected = IMPOSSIBLE[case]
    args = [item for key, value in fields.items() for item in (f"--{key}", value)]
    config = {"model_name_or_path": str(models / "policy"), "reward_model_path": str(models / "reward"),
              "dataset_name": "prompts.jsonl", "output_dir": str(tmp_path / "out")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    status = main(["ppo", "--config", str(tmp_path / "run.yaml"), *args])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and expected in errors[0], errors
    assert loads == []


def test_long_prompts_are_cut_from_the_left_with_one_warning(tmp_path, models, capsys, monkeypatch):
    """max_prompt_length 1: the policy sees each prompt's last token, and one warning says so."""
    from tether.trainers.ppo import PPOTrainer

    seen = []
    rollout = PPOTrainer.rollout
    monkeypatch.setattr(PPOTrainer, "rollout", lambda self, prompts: seen.extend(prompts.ids) or rollout(self, prompts))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    status = main([
        "ppo", "--model_name_or_path", str(models / "policy"), "--reward_model_path", f"{models}/rewards.py:fine",
        "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--total_episodes", "8", "--per_device_train_batch_size", "8", "--response_length", "3",
        "--num_ppo_epochs", "1", "--max_prompt_length", "1",
    ])
    assert status == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 16 of 16 training prompts were longer than max_prompt_length=1 and lost their first tokens"]
    tokenizer = word_tokenizer(numbered_words(20))
    last_words = {prompt.split()[-1] for prompt in PROMPTS}
    assert len(seen) == 8 and all(len(ids) == 1 for ids in seen)
    assert {tokenizer.decode(ids) for ids in seen} <= last_words


def test_fewer_prompts_than_a_batch_are_drawn_again_with_one_note(tmp_path, models, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    status = main([
        "ppo", "--model_name_or_path", str(models / "policy"), "--reward_model_path", f"{models}/rewards.py:fine",
        "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--total_episodes", "16", "--per_device_train_batch_size", "8", "--response_length", "3",
        "--num_ppo_epochs", "1", "--num_sample_generations", "0",
    ])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 0, err
    assert err.count("the dataset has 3 prompts, fewer than one rollout batch of 8") == 1
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [8, 16]


def test_tokenizer_without_pad_token_is_given_one_and_told(tmp_path, models, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    status = main([
        "ppo", "--model_name_or_path", str(models / "policy-no-pad"), "--reward_model_path",
        f"{models}/rewards.py:fine", "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--device", "cpu", "--total_episodes", "8", "--per_device_train_batch_size", "8", "--response_length", "3",
        "--num_ppo_epochs", "1",
    ])
    assert status == 0
    assert "the tokenizer has no pad token; using EOS" in " ".join(capsys.readouterr().err.split())
