"""What a new-user trial of issues 18-20 found: each mistake gets one line naming the cause, and
nothing trains silently on a wrong setting."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from torch import nn

from tether import PPOConfig, PPOTrainer
from tether.cli import main
from tether.data.sequences import encode_pairs, encode_sequences
from tether.errors import DataError, RewardError
from tether.scoring.functions import RewardFunction, call_reward_function, import_reward_function
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

WORDS = numbered_words(20)
PROMPTS = [f"w{i} w{i + 1}" for i in range(8)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mistakes")
    tokenizer = word_tokenizer(WORDS)
    tiny_causal_lm(tokenizer).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    tiny_reward_model(tokenizer).save_pretrained(root / "reward")
    (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / "run.yaml").write_text(yaml.safe_dump(dict(
        model_name_or_path=str(root / "policy"), reward_model_path=str(root / "reward"),
        dataset_name=str(root / "p.jsonl"), device="cpu", total_episodes=8, response_length=3, num_ppo_epochs=1,
    )))
    return root


def one_error(capsys, *args) -> str:
    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(("flags", "said"), [
    (["--max_grad_norm", "0"], "max_grad_norm must be > 0, got 0.0; leave it unset (null)"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be > 0"),
    (["--adam_beta1", "1.5"], "adam_beta1 must lie in [0, 1), got 1.5"),
    (["--adam_beta2", "1.0"], "adam_beta2 must lie in [0, 1)"),
    (["--adam_epsilon", "0"], "adam_epsilon must be > 0"),
    (["--weight_decay", "-0.1"], "weight_decay must be >= 0"),
    (["--resume", "--overwrite"], "--resume and --overwrite are both given"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["--reward_model_path", "POLICY"], "has no trained scalar head (it looks like a causal LM)"),
    (["--resume", "nowhere/checkpoint-3"], "--resume nowhere/checkpoint-3: no such checkpoint"),
], ids=["clip-0", "clip-negative", "beta1", "beta2", "epsilon", "weight-decay", "resume-overwrite", "bare-value",
        "untrained-reward-head", "missing-checkpoint"])
def test_settings_that_would_train_wrongly_are_refused(workspace, capsys, flags, said, tmp_path):
    flags = [str(workspace / "policy") if flag == "POLICY" else flag for flag in flags]
    error = one_error(capsys, "ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(tmp_path / "o"), *flags)
    assert said in error, error


def test_a_checkpoint_of_another_command_and_a_shorter_extension(workspace, capsys, tmp_path):
    rows = [{"prompt": f"w{i}", "completion": f"w{i + 1}"} for i in range(8)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sft", "--model_name_or_path", str(workspace / "policy"), "--dataset_name", str(tmp_path / "s.jsonl"),
                 "--output_dir", str(tmp_path / "sft"), "--device", "cpu", "--num_train_epochs", "1"]) == 0
    error = one_error(capsys, "ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(tmp_path / "sft"),
                      "--resume")
    assert "was written by tether sft, not tether ppo" in error
    args = ["ppo", "--config", str(workspace / "run.yaml"), "--output_dir", str(tmp_path / "ppo")]
    assert main([*args, "--total_episodes", "16"]) == 0
    error = one_error(capsys, *args, "--resume", str(tmp_path / "ppo" / "checkpoint-2"), "--total_episodes", "12",
                      "--extend")
    assert "total_episodes 16 -> 12 would make the run" in error and "not cut back" in error


def test_messages_are_one_line_each_and_said_once(workspace, capsys, tmp_path):
    """Rotary extrapolation past a Llama's 8 positions: one warning for the three models that
    read them, on one line."""
    tokenizer = word_tokenizer(WORDS)
    tiny_causal_lm(tokenizer, max_positions=8).save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    capsys.readouterr()
    assert main(["ppo", "--config", str(workspace / "run.yaml"), "--model_name_or_path", str(tmp_path / "short"),
                 "--reward_model_path", "tests.test_ppo_trainer:w5_fraction", "--output_dir", str(tmp_path / "o"),
                 "--response_length", "10"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "extrapolated" in line]
    assert len(lines) == 1 and "needs 12 positions, past the 8" in lines[0]


def test_help_forms_and_yaml_positions(capsys, tmp_path):
    for args in (["help", "ppo"], ["--help", "sft"]):
        assert main(args) == 0
        assert f"usage: tether {args[1]}" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("learning_rate: 1e-5\npeft_config: {r: 4\n")
    error = one_error(capsys, "ppo", "--config", str(tmp_path / "bad.yaml"))
    assert "not valid YAML (line 3" in error


# --- reward and metric functions ---------------------------------------------------------------------

def trainer(tmp_path, reward, prompts=PROMPTS, **fields) -> PPOTrainer:
    tokenizer = word_tokenizer(WORDS)
    config = PPOConfig(output_dir=str(tmp_path), device="cpu", total_episodes=8, response_length=3, num_ppo_epochs=1,
                       **fields)
    return PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), reward, prompts)


def test_a_metric_may_not_take_a_built_in_metrics_name(tmp_path):
    (tmp_path / "m.py").write_text("def m(prompts, responses):\n    return {'objective/scores': 99.0}\n")
    with pytest.raises(RewardError, match="returned objective/scores, which tether logs itself"):
        trainer(tmp_path, lambda p, r: [0.0] * len(r), metric_function=f"{tmp_path}/m.py:m").step()


def test_columns_named_like_the_arguments_are_refused(tmp_path):
    rows = datasets.Dataset.from_list([{"prompt": p, "completions": "REFERENCE"} for p in PROMPTS])
    with pytest.raises(DataError, match="column\\(s\\) completions have the name of an argument"):
        trainer(tmp_path, lambda prompts, completions, **kwargs: [0.0] * len(prompts), prompts=rows)


def test_huge_numbers_signatures_and_import_errors_are_named(tmp_path):
    with pytest.raises(RewardError, match="overflows float32"):
        call_reward_function(lambda p, r: [10**400] * len(r), ["a"], ["b"])
    with pytest.raises(RewardError, match="cannot be called with fn\\(prompts, responses\\).*columns: answer"):
        RewardFunction(lambda only: [0.0])(["a"], ["b"], [[1]], {"answer": ["x"]})
    (tmp_path / "broken.py").write_text("x = 1\nraise RuntimeError('config missing')\n")
    with pytest.raises(Exception, match=f"config missing \\({tmp_path}/broken.py:2\\)"):
        import_reward_function(f"{tmp_path}/broken.py:score")


def test_a_judge_module_scores_in_eval_mode(tmp_path):
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = nn.Dropout(0.9)

        def forward(self, prompts, responses):
            return self.dropout(torch.ones(len(responses)))

    judge = Noisy().train()
    scores = call_reward_function(judge, ["a", "b"], ["c", "d"])
    assert not judge.training and scores.tolist() == [1.0, 1.0]


# --- data ---------------------------------------------------------------------------------------------

def test_mixed_forms_and_message_indices(tmp_path):
    tokenizer = word_tokenizer(["user:", "assistant:", *WORDS])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    with pytest.raises(DataError, match="row 0: chosen is text but rejected is a chat"):
        encode_pairs(datasets.Dataset.from_list([{"chosen": "w1 w2", "rejected": chat}]), tokenizer)
    with pytest.raises(DataError, match="row 0: the prompt is text but column 'completion' is a chat"):
        encode_sequences(datasets.Dataset.from_list([{"prompt": "w1", "completion": chat[1:]}]), tokenizer)
    broken = [chat[0], {"role": "assistant", "content": None}]
    with pytest.raises(DataError, match="message 1 \\(assistant\\) has no content"):
        encode_pairs(datasets.Dataset.from_list([{"chosen": broken, "rejected": chat}]), tokenizer)


def test_keep_start_that_cuts_every_completion_says_so(tmp_path):
    from tether.config import SFTConfig
    from tether.trainers.sft import SFTTrainer

    tokenizer = word_tokenizer(WORDS)
    rows = [{"prompt": " ".join(WORDS[:6]), "completion": "w1"}] * 2
    config = SFTConfig(output_dir=str(tmp_path), device="cpu", max_length=4, truncation_mode="keep_start")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="keep_start cut every completion away"):
        SFTTrainer(config, tokenizer, tiny_causal_lm(tokenizer), rows)


@pytest.mark.parametrize("kind", ["ppo", "grpo", "sft", "dpo"])
def test_evaluation_asked_for_with_nothing_held_out_is_said_once(tmp_path, capsys, kind):
    """``eval_strategy: steps`` with no test split, eval dataset or eval_fraction: one warning at
    start-up, where the run would otherwise evaluate nothing without a word."""
    from tether import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    tokenizer = word_tokenizer(WORDS)
    model = tiny_causal_lm(tokenizer)
    asked = dict(output_dir=str(tmp_path), device="cpu", eval_strategy="steps", eval_steps=1, report_to=[])
    match kind:
        case "ppo":
            PPOTrainer(PPOConfig(**asked, response_length=3), tokenizer, model, lambda p, r: [0.0] * len(r), PROMPTS)
        case "grpo":
            GRPOTrainer(GRPOConfig(**asked, num_generations=2, per_device_train_batch_size=4, max_completion_length=3),
                        tokenizer, model, lambda completions, **kw: [0.0] * len(completions), PROMPTS)
        case "sft":
            rows = [{"prompt": p, "completion": "w3"} for p in PROMPTS]
            SFTTrainer(SFTConfig(**asked, per_device_train_batch_size=4), tokenizer, model, rows)
        case "dpo":
            pairs = [{"prompt": p, "chosen": "w3", "rejected": "w4"} for p in PROMPTS]
            DPOTrainer(DPOConfig(**asked, per_device_train_batch_size=4), tokenizer, model, pairs)
    said = capsys.readouterr().err
    assert said.count("warning: eval_strategy is set but there are no held-out") == 1, said
    assert "nothing is evaluated" in said


def test_metrics_that_are_not_finite_are_written_as_null(tmp_path):
    """metrics.jsonl stays strict JSON with numeric columns: a NaN or infinite metric is null (it
    was the string "nan", which turned the whole column into text)."""
    from tether.logging import MetricsFile

    MetricsFile(tmp_path).write({"step": 1, "reward": float("nan"), "loss": torch.tensor(float("inf")), "lr": 1e-3})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "reward": None, "loss": None, "lr": 1e-3}


def test_a_reward_argument_no_column_gives_is_refused_before_sampling(tmp_path, monkeypatch):
    """TRL's convention passes dataset columns by name: a function that needs ``solution`` on a
    dataset with ``answer`` is refused at start-up, naming both, not after the first rollout."""
    from tether import GRPOConfig, GRPOTrainer
    from tether.errors import DataError
    from tether.trainers.grpo import GRPOTrainer as Trainer

    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    def fine(completions, answer, scale=1.0, **kwargs):
        return [scale] * len(completions)

    sampled = []
    monkeypatch.setattr(Trainer, "rollout", lambda self, *args: sampled.append(1), raising=False)
    tokenizer = word_tokenizer(WORDS)
    rows = datasets.Dataset.from_list([{"prompt": p, "answer": "w3"} for p in PROMPTS])
    config = GRPOConfig(output_dir=str(tmp_path), device="cpu", num_generations=2, per_device_train_batch_size=4,
                        max_completion_length=3, report_to=[])
    with pytest.raises(DataError) as refused:
        GRPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), [fine, needs_solution], rows)
    message = str(refused.value)
    assert "reward function needs_solution takes solution, which no dataset column gives" in message
    assert "columns: answer" in message and "\n" not in message and sampled == []
    GRPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), [fine], rows)  # answer given, scale defaulted
