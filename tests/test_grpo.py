"""GRPO and RLOO (issue 22): critic-free RL on PPO's engine.

Pinned here: the advantage estimators and loss aggregations against hand-computed numbers;
sampling filters against transformers' own logits processors; one prefill per group;
lr 0 leaves the policy and every ratio at 1; beta 0 builds and runs no reference; the update is
the same however a step is split into micro-batches and processes; exact resume; the reward
rises on a tiny task; reward functions get the dataset's other columns and may return None;
the command line, its bad configs and TRL's GRPO/RLOO fields.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tether import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from tether.cli import main
from tether.config import load_config
from tether.errors import ConfigError
from tether.ops.advantages import (
    aggregate_loss,
    clipped_surrogate,
    decoupled_group_advantages,
    group_advantages,
    leave_one_out_advantages,
    nan_std,
    normalized,
)
from tether.rollout import generate
from tether.rollout.generate import filtered_weights, generate_responses, sampling_config
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer
from tether.trainers.ppo_rollout import RolloutMaker
from tests.trl_lists import trl_config_fields, unknown_to_tether
from tests.workers.grpo_update import KINDS, PROMPTS, build, learn, w5_fraction

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
EPS = 1e-4  # TRL's epsilon under every scale


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer():
    return word_tokenizer(numbered_words(16))


def make_policy(tokenizer, seed=0):
    return tiny_causal_lm(tokenizer, seed=seed, arch="llama", hidden_size=32, num_layers=2, num_heads=2)


def grpo(tmp_path, reward=w5_fraction, data=None, policy=None, trainer=GRPOTrainer, config=GRPOConfig, **fields):
    tokenizer = make_tokenizer()
    settings = dict(output_dir=str(tmp_path), device="cpu", seed=7, per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=6, learning_rate=1e-3, max_steps=2, report_to=[], disable_tqdm=True)
    return trainer(config(**{**settings, **fields}), tokenizer, policy or make_policy(tokenizer), reward,
                   data if data is not None else list(PROMPTS))


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- advantages and losses, by hand ---------------------------------------------------------

def test_group_advantages_by_hand_for_each_scale():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    centred = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0])
    group_std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # Bessel-corrected, as TRL
    batch_std = rewards.std().item()
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), centred)
    torch.testing.assert_close(group_advantages(rewards, 4, "group"), centred / torch.tensor([group_std + EPS] * 4 + [EPS] * 4))
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"), centred / (batch_std + EPS))
    # a degenerate group (all equal) is exactly 0 under every scale, never NaN
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(torch.full((4,), 7.0), 4, scale), torch.zeros(4))
        assert torch.equal(group_advantages(torch.tensor([3.0]), 1, scale), torch.zeros(1))


def test_unscored_completions_leave_their_group_and_get_zero_advantage():
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 3.0, 5.0, nan, nan, 2.0, nan])
    # group 1: mean of 1, 3, 5 = 3, std 2; group 2: one scored completion, nothing to compare
    expected = torch.tensor([-2 / (2 + EPS), 0.0, 0.0, 2 / (2 + EPS), 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, "group"), expected)
    torch.testing.assert_close(leave_one_out_advantages(rewards, 4), torch.tensor([-3.0, 0, 0, 3.0, 0, 0, 0, 0]))
    assert nan_std(torch.tensor([1.0, nan, 3.0])).item() == pytest.approx(math.sqrt(2))
    assert nan_std(torch.tensor([nan, 4.0])).item() == 0.0


def test_leave_one_out_and_normalized_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 10.0])
    # each less the mean of its group's others: 1 - 3, 2 - 8/3, 3 - 7/3, 4 - 2; 0 - 10, 10 - 0
    expected = torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0])
    torch.testing.assert_close(leave_one_out_advantages(rewards[:4], 4), expected)
    torch.testing.assert_close(leave_one_out_advantages(rewards, 2), torch.tensor([-1.0, 1.0, -1.0, 1.0, -10.0, 10.0]))
    values = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    torch.testing.assert_close(normalized(values), torch.tensor([-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0]))
    kept = torch.tensor([True, True, False, False])
    std = math.sqrt(0.5)
    torch.testing.assert_close(normalized(values, kept), torch.tensor([-0.5 / (std + EPS), 0.5 / (std + EPS), 0.0, 0.0]))


def test_normalize_then_sum_scales_each_reward_in_its_group_first():
    # reward a: [0, 2 | 1, 1]; reward b: [10, 30 | nan, 5], weights 1 and 0.5
    parts = torch.tensor([[0.0, 10.0], [2.0, 30.0], [1.0, float("nan")], [1.0, 5.0]])
    std_a1, std_b1 = math.sqrt(2), math.sqrt(200)
    summed = torch.tensor([
        -1 / (std_a1 + EPS) - 0.5 * 10 / (std_b1 + EPS),
        1 / (std_a1 + EPS) + 0.5 * 10 / (std_b1 + EPS),
        0.0,  # a: no spread; b: not scored
        0.0,  # a: no spread; b: the only score of its group
    ])
    expected = (summed - summed.mean()) / (summed.std() + EPS)
    torch.testing.assert_close(decoupled_group_advantages(parts, torch.tensor([1.0, 0.5]), 2), expected)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("grpo", (2.0 + 4.0) / 2), ("dapo", 10.0 / 4), ("bnpo", 10.0 / 4), ("dr_grpo", 10.0 / (2 * 5))],
)
def test_aggregate_loss_by_hand(loss_type, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss = aggregate_loss(per_token.nan_to_num(0.0), mask, loss_type, step_sequences=2, step_tokens=4, local_tokens=4,
                          processes=1, max_completion_length=5)
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_micro_batch_parts_add_up_to_the_whole(loss_type):
    torch.manual_seed(0)
    per_token = torch.randn(6, 5)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([5, 1, 3, 2, 4, 5]).unsqueeze(1)
    common = dict(step_sequences=6, step_tokens=int(mask.sum()), local_tokens=int(mask.sum()), processes=1,
                  max_completion_length=5)
    whole = aggregate_loss(per_token, mask, loss_type, **common)
    parts = sum(aggregate_loss(per_token[i : i + 2], mask[i : i + 2], loss_type, **common) for i in (0, 2, 4))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_clipped_surrogate_by_hand():
    log_ratio = torch.tensor([[0.5], [0.5], [math.log(0.5)], [0.0]])
    advantages = torch.tensor([[1.0], [-1.0], [-1.0], [2.0]])
    loss, low, high = clipped_surrogate(log_ratio, advantages, 0.2, 0.28)
    ratio = math.exp(0.5)
    torch.testing.assert_close(loss, torch.tensor([[-1.28], [ratio], [0.8], [-2.0]]))
    assert high.squeeze(1).tolist() == [True, False, False, False]
    assert low.squeeze(1).tolist() == [False, False, True, False]
    capped, _, _ = clipped_surrogate(log_ratio, advantages, 0.2, 0.28, delta=1.5)  # two-sided: r A capped too
    assert capped[1].item() == pytest.approx(1.5)


# --- sampling --------------------------------------------------------------------------------

def test_sampling_filters_match_transformers_processors():
    """top-k, top-p, min-p and the repetition penalty give the distribution ``generate`` samples
    from, token for token."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 3
    seen_ids = torch.tensor([[1, 2, 3]] * 5)
    seen = torch.zeros(5, 40, dtype=torch.bool).scatter_(1, seen_ids, True)
    for filters in (dict(top_k=7), dict(top_p=0.6), dict(min_p=0.1), dict(repetition_penalty=1.7),
                    dict(top_k=9, top_p=0.8, min_p=0.05, repetition_penalty=1.3)):
        config = sampling_config(4, 0.7, [2], 0, **filters)
        scaled = logits / config.temperature
        ours = filtered_weights((scaled - scaled.amax(-1, keepdim=True)).exp(), scaled, config, seen)
        scores = logits.clone()
        if "repetition_penalty" in filters:
            scores = RepetitionPenaltyLogitsProcessor(filters["repetition_penalty"])(seen_ids, scores)
        scores = TemperatureLogitsWarper(config.temperature)(seen_ids, scores)
        for name, warper in (("top_k", TopKLogitsWarper), ("top_p", TopPLogitsWarper), ("min_p", MinPLogitsWarper)):
            if name in filters:
                scores = warper(filters[name])(seen_ids, scores)
        theirs = scores.softmax(-1)
        torch.testing.assert_close(ours / ours.sum(-1, keepdim=True), theirs, atol=1e-6, rtol=0, msg=str(filters))


def test_a_group_shares_one_prefill_and_samples_the_same(monkeypatch):
    """Rows repeating the row above are prefilled once, their cache copied: the same tokens and
    log-probabilities as prefilling every row, for the growing cache and the whole one."""
    tokenizer = make_tokenizer()
    model = make_policy(tokenizer).eval()
    queries = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9], [0, 0, 4]])
    mask = queries != 0
    config = sampling_config(8, 1.0, [2], 0)
    prefill_rows = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.size(1) == queries.size(1):  # a prefill of these queries
            prefill_rows.append(ids.size(0))

    model.model.register_forward_pre_hook(record, with_kwargs=True)
    for whole in (False, True):
        torch.manual_seed(0)
        shared = generate_responses(model, queries, mask, config, 64, whole_cache=whole)
        with monkeypatch.context() as patch:
            patch.setattr(generate, "_distinct_rows", lambda *_: (None, None))
            torch.manual_seed(0)
            each = generate_responses(model, queries, mask, config, 64, whole_cache=whole)
        assert torch.equal(shared.responses, each.responses)
        torch.testing.assert_close(shared.logprobs, each.logprobs, atol=1e-6, rtol=0)
    assert prefill_rows == [3, 6, 3, 6]  # 3 distinct prompts, against 6 rows


def test_top_k_1_makes_every_completion_of_a_group_the_greedy_one(tmp_path):
    trainer = grpo(tmp_path, top_k=1, learning_rate=0.0)
    rollout = trainer.collect({})
    groups = rollout.responses.view(-1, 4, rollout.responses.size(1))
    assert all(torch.equal(group[0], member) for group in groups for member in group)
    assert trainer.learn(rollout)["frac_reward_zero_std"] == 1.0


# --- the trainers ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_lr_zero_keeps_every_ratio_at_one_and_the_weights(tmp_path, kind):
    trainer_class, config_class = (GRPOTrainer, GRPOConfig) if kind == "grpo" else (RLOOTrainer, RLOOConfig)
    trainer = grpo(tmp_path, trainer=trainer_class, config=config_class, learning_rate=0.0, beta=0.1,
                   num_iterations=3, max_steps=3, epsilon=1e-5)
    before = params(trainer.policy)
    metrics = trainer.step()
    after = params(trainer.policy)
    assert all(torch.equal(before[name], after[name]) for name in before)
    # epsilon 1e-5: a ratio further from 1 than rounding (sampling and training passes differ
    # in the last bits) would count as clipped
    assert metrics["clip_ratio/region_mean"] == 0.0 and metrics["train/optimizer_steps"] == 3
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)  # the reference is the unchanged policy
    assert metrics["grad_norm"] > 0  # the gradient exists; the step is what lr 0 cancels


def test_beta_zero_builds_and_runs_no_reference(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(RolloutMaker, "reference_logprobs", lambda self, *chunk: calls.append(1))
    trainer = grpo(tmp_path, beta=0.0, ref_policy=None) if False else grpo(tmp_path, beta=0.0)
    assert trainer.ref_policy is None and trainer._ref is None
    rollout = trainer.collect({})
    assert rollout.ref_logprobs is None and rollout.values is None and not calls
    assert "kl" not in trainer.learn(rollout)
    with_kl = grpo(tmp_path / "kl", beta=0.04)
    assert with_kl.ref_policy is not None and with_kl.ref_policy is not with_kl.policy


def test_update_is_the_same_in_one_micro_batch_or_eight(tmp_path):
    """One round of 8 completions, 2 iterations: micro-batches of 8 or of 1 (and bnpo too,
    which is the same only within one process)."""
    for kind in (*KINDS, "bnpo"):
        whole = build(tmp_path / "whole", kind, 8, 1)
        rollout = whole.collect({})
        start = params(whole.policy)
        whole_params, whole_metrics = learn(whole, rollout)
        split_params, split_metrics = learn(build(tmp_path / "split", kind, 1, 8), rollout)
        assert max((whole_params[k] - start[k]).abs().max().item() for k in start) > 1e-4, kind  # it moved
        for name, value in whole_params.items():
            torch.testing.assert_close(split_params[name], value, atol=1e-6, rtol=0, msg=f"{kind} {name}")
        for key, value in whole_metrics.items():
            assert split_metrics[key] == pytest.approx(value, abs=1e-6), (kind, key)


def test_update_is_the_same_split_into_two_processes(tmp_path):
    """(8,1,1) in this process against (2,2,2) under torchrun, each loss type but bnpo."""
    rollouts, expected = {}, {}
    for kind in KINDS:
        whole = build(tmp_path / "whole", kind, 8, 1)
        rollouts[kind] = whole.collect({})
        expected[kind] = learn(whole, rollouts[kind])
    torch.save(rollouts, tmp_path / "rollouts.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/workers/grpo_update.py", "--rollouts", str(tmp_path / "rollouts.pt"), "--out",
               str(tmp_path / "two"), "--per-device", "2", "--accumulation", "2"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    assert two["world_size"] == 2
    for kind in KINDS:
        (whole_params, whole_metrics), (split_params, split_metrics) = expected[kind], two["results"][kind]
        for name, value in whole_params.items():
            torch.testing.assert_close(split_params[name], value, atol=1e-6, rtol=0, msg=f"{kind} {name}")
        for key in ("loss", "grad_norm", "kl", "entropy", "reward", "clip_ratio/region_mean"):
            assert split_metrics[key] == pytest.approx(whole_metrics[key], abs=1e-6), (kind, key)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_resume_continues_exactly(tmp_path, kind):
    trainer_class, config_class = (GRPOTrainer, GRPOConfig) if kind == "grpo" else (RLOOTrainer, RLOOConfig)
    fields = dict(trainer=trainer_class, config=config_class, max_steps=4, save_steps=2, beta=0.05,
                  sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    straight = grpo(tmp_path / "straight", **fields)
    straight_history = straight.train()
    first = grpo(tmp_path / "resumed", **fields)
    first.total_steps = 2  # stop half-way, as a killed run would
    first.train()
    resumed = grpo(tmp_path / "resumed", **fields)
    resumed_history = resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert [h["step"] for h in resumed_history] == [3, 4]
    for ours, theirs in zip(resumed_history, straight_history[2:]):
        for key, value in theirs.items():
            if not key.startswith("timing/"):
                assert ours[key] == pytest.approx(value, abs=1e-6), key
    for name, value in params(straight.policy).items():
        assert torch.equal(dict(resumed.policy.named_parameters())[name].detach(), value), name
    for name, value in params(straight.ref_policy).items():  # the mixed-in reference came back too
        assert torch.equal(dict(resumed.ref_policy.named_parameters())[name].detach(), value), name
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_the_reward_rises_on_a_tiny_task(tmp_path, kind):
    """Reward: the fraction of w5 in the completion (about 1 in 16 words at the start)."""
    trainer_class, config_class = (GRPOTrainer, GRPOConfig) if kind == "grpo" else (RLOOTrainer, RLOOConfig)
    history = grpo(tmp_path, trainer=trainer_class, config=config_class, per_device_train_batch_size=16,
                   learning_rate=3e-3, max_steps=30).train()
    first, last = (sum(h["reward"] for h in part) / 5 for part in (history[:5], history[-5:]))
    assert first < 0.1 and last > 2 * first + 0.1, (first, last)


def test_reward_functions_get_the_rows_other_columns_and_may_return_none(tmp_path, capsys):
    import datasets

    rows = [{"prompt": text, "answer": f"a{i}", "level": i % 3} for i, text in enumerate(PROMPTS)]
    seen = []

    def checker(prompts, completions, completion_ids, answer, level, trainer_state, **kwargs):
        seen.append((list(prompts), list(answer), list(level), completion_ids, trainer_state.global_step, completions))
        kwargs["log_metric"]("custom/calls", len(seen))
        kwargs["log_extra"]("answer_seen", list(answer))
        return [None if lv == 0 else float(len(c.split())) for c, lv in zip(completions, level)]

    def length_penalty(completions, level, **_):
        return [-0.5 if lv == 1 else None for lv in level]

    trainer = grpo(tmp_path, reward=[checker, length_penalty], data=datasets.Dataset.from_list(rows),
                   reward_weights=[1.0, 2.0], log_completions=True, num_completions_to_print=3, max_steps=2)
    rollout = trainer.collect({})
    prompts, answers, levels, completion_ids, global_step, completions = seen[-1]
    by_prompt = {row["prompt"]: row for row in rows}
    assert [by_prompt[p]["answer"] for p in prompts] == answers and [by_prompt[p]["level"] for p in prompts] == levels
    assert len(prompts) == 8 and len(set(prompts[:4])) == 1 and global_step == 0
    lengths = rollout.lengths.tolist()
    assert [len(ids) for ids in completion_ids] == lengths
    for level, score, parts, completion in zip(levels, rollout.scores.tolist(), rollout.reward_parts.tolist(),
                                               completions):
        words = len(completion.split())
        if level == 0:  # no function scored it
            assert math.isnan(score) and all(math.isnan(p) for p in parts)
        elif level == 1:
            assert score == pytest.approx(words - 1.0) and parts == [pytest.approx(words), -0.5]
        else:
            assert score == pytest.approx(words) and math.isnan(parts[1])
    trainer.round_log = trainer._gathered_log()
    metrics = trainer.learn(rollout)
    unscored = torch.isnan(rollout.scores)
    assert unscored.any() and torch.equal(rollout.advantages[unscored], torch.zeros(int(unscored.sum())))
    assert set(levels) == {0, 2}  # this seed's round: unscored rows, and rows only the checker scored
    assert math.isnan(metrics["rewards/length_penalty/mean"]) and metrics["rewards/checker/mean"] > 0
    assert math.isfinite(metrics["reward"]) and math.isfinite(metrics["loss"])
    said = capsys.readouterr()
    assert "no reward function scored 4 completion(s)" in said.out + said.err
    trainer.step_count += 1
    second = trainer.step()  # a whole round: log_metric's values join its metrics, trainer_state moved on
    assert second["custom/calls"] == 2 and seen[-1][4] == 1
    trainer._show_completions()
    shown = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(shown) == 3 and all(row["answer_seen"] == by_prompt[row["prompt"]]["answer"] for row in shown)


def test_a_column_named_like_an_argument_is_refused(tmp_path):
    import datasets

    from tether.errors import DataError

    rows = [{"prompt": text, "trainer_state": 1} for text in PROMPTS]
    with pytest.raises(DataError, match="dataset column\\(s\\) trainer_state have the name of an argument"):
        grpo(tmp_path, data=datasets.Dataset.from_list(rows))


def test_log_completions_writes_the_table_and_samples(tmp_path, capsys):
    trainer = grpo(tmp_path, log_completions=True, num_completions_to_print=3, max_steps=2)
    trainer.train()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [1, 1, 1, 2, 2, 2]
    assert set(samples[0]) == {"step", "prompt", "response", "score"}
    assert "completions at step 2" in capsys.readouterr().err  # the console writes to stderr


def test_mask_truncated_completions_leaves_them_out_of_the_loss(tmp_path):
    """With no stop token every completion is truncated: masked, nothing is learnt; unmasked,
    the same round moves the weights."""
    import dataclasses

    for masked in (True, False):
        trainer = grpo(tmp_path / str(masked), mask_truncated_completions=masked, learning_rate=1e-2)
        maker = trainer.rollout_maker
        maker.sampling = dataclasses.replace(maker.sampling, stop_token_ids=())
        maker.stop_token_ids = []
        before = params(trainer.policy)
        metrics = trainer.step()
        assert metrics["completions/clipped_ratio"] == 1.0
        unchanged = all(torch.equal(before[n], p) for n, p in params(trainer.policy).items())
        assert unchanged == masked and (metrics["train/optimizer_steps"] == 0) == masked


def test_saved_policy_loads_with_from_pretrained(tmp_path):
    trainer = grpo(tmp_path, max_steps=1, learning_rate=1e-2)
    trainer.train()
    target = trainer.save_model(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(target)
    for name, value in params(trainer.policy).items():
        assert torch.equal(dict(loaded.named_parameters())[name].detach(), value), name


# --- configs ----------------------------------------------------------------------------------

def test_defaults_are_trls():
    grpo_config, rloo_config = GRPOConfig(), RLOOConfig()
    assert (grpo_config.beta, grpo_config.loss_type, grpo_config.num_generations, grpo_config.epsilon) == (0.0, "dapo", 8, 0.2)
    assert (grpo_config.scale_rewards, grpo_config.learning_rate, grpo_config.max_completion_length) == ("group", 1e-6, 512)
    assert (rloo_config.beta, rloo_config.num_generations, rloo_config.normalize_advantages) == (0.05, 2, False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_generations=3), "num_generations=3 does not divide a round's 8 completions (generation_batch_size"),
        (dict(generation_batch_size=12, num_generations=4),
         "a round's 12 completions do not make whole optimizer steps of 8"),
        (dict(loss_type="sapo"), "loss_type"),
        (dict(scale_rewards="weird"), "scale_rewards"),
        (dict(epsilon=-1), "epsilon and epsilon_high must be >= 0"),
        (dict(delta=0.5), "delta must be > 1"),
        (dict(generation_batch_size=8, steps_per_generation=1), "both set"),
    ],
)
def test_bad_group_configs_are_refused_in_one_line(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=None) as error:
        grpo(tmp_path, **fields)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_group_needs_two_completions_per_prompt(tmp_path, kind):
    """One completion per prompt has no baseline to compare with (TRL's GRPO refuses it too)."""
    classes = {"grpo": {}, "rloo": {"trainer": RLOOTrainer, "config": RLOOConfig}}[kind]
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        grpo(tmp_path, num_generations=1, **classes)


def test_scale_rewards_true_and_false_read_as_trl_does():
    assert load_config(GRPOConfig, overrides={"scale_rewards": "true"}).scale_rewards == "group"
    assert load_config(GRPOConfig, overrides={"scale_rewards": "false"}).scale_rewards == "none"


def test_unsupported_trl_fields_pass_at_their_default_and_are_refused_otherwise():
    notes = []
    config = load_config(GRPOConfig, overrides={"use_vllm": "false", "vllm_mode": "server", "top_entropy_quantile": "1.0"},
                         warn=notes.append)
    assert config.loss_type == "dapo" and len(notes) == 1 and "'vllm_mode' has no effect" in notes[0]
    with pytest.raises(ConfigError, match="config field use_vllm=True is not supported: tether samples with its own"):
        load_config(GRPOConfig, overrides={"use_vllm": "true"})
    with pytest.raises(ConfigError, match="generation_kwargs=.* is not supported"):
        load_config(RLOOConfig, overrides={"generation_kwargs": "{top_k: 3}"})


def test_every_trl_grpo_and_rloo_field_is_known():
    """A TRL GRPOConfig / RLOOConfig moves over: each of its fields is a tether field, a noted
    one or an unsupported one accepted at TRL's default."""
    from tether.config import UNSUPPORTED_FIELDS

    defaults = {}
    for ours, name in ((GRPOConfig, "GRPOConfig"), (RLOOConfig, "RLOOConfig")):
        fields, its_defaults = trl_config_fields(name)
        defaults |= its_defaults
        missing = unknown_to_tether(fields, ours)
        assert len(fields) > 150 and not missing, f"{name}: {missing}"
    checked = [name for name in UNSUPPORTED_FIELDS if name in defaults]  # DPO's: tests/test_dpo.py
    assert len(checked) >= 9
    for name in checked:
        assert defaults[name] == UNSUPPORTED_FIELDS[name][0], name


# --- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    tokenizer = make_tokenizer()
    make_policy(tokenizer).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rows = [{"prompt": text, "target": "w5"} for text in PROMPTS]
    (root / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "rewards.py").write_text(
        "def hits(completions, target, **kwargs):\n"
        "    return [float(c.split().count(t)) for c, t in zip(completions, target)]\n"
    )
    config = {"model_name_or_path": str(root / "policy"), "dataset_name": str(root / "tasks.jsonl"),
              "reward_funcs": ["rewards.py:hits"], "per_device_train_batch_size": 8, "num_generations": 4,
              "max_completion_length": 5, "max_steps": 2, "learning_rate": 1e-3, "device": "cpu", "beta": 0.04}
    (root / "grpo.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_command_trains_and_saves_a_loadable_policy(workspace, tmp_path, monkeypatch, command):
    monkeypatch.chdir(workspace)  # rewards.py is found from the working directory
    out = tmp_path / "out"
    status = main([command, "--config", "grpo.yaml", "--output_dir", str(out), "--logging_steps", "1"])
    assert status == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for name in ("reward", "reward_std", "rewards/hits/mean", "rewards/hits/std", "frac_reward_zero_std", "kl",
                 "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "completions/mean_length", "completions/clipped_ratio", "loss", "grad_norm", "learning_rate"):
        assert all(math.isfinite(line[name]) for line in lines), name
    saved = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(workspace / "policy")
    assert any(not torch.equal(p, q) for p, q in zip(saved.parameters(), base.parameters()))
    assert yaml.safe_load((out / "config.yaml").read_text())["reward_funcs"] == ["rewards.py:hits"]


def test_command_refuses_a_group_that_does_not_divide_before_loading(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    status = main(["grpo", "--config", "grpo.yaml", "--output_dir", str(tmp_path / "o"), "--num_generations", "3",
                   "--model_name_or_path", "./not-loaded"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1
    assert "num_generations=3 does not divide a round's 8 completions" in errors[0]
    assert not (tmp_path / "o").exists()


def test_command_help_lists_the_group_fields(capsys):
    assert main(["grpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "num_generations" in text and "loss_type" in text and "scale_rewards" in text
    assert main(["rloo", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["beta"] == 0.05 and printed["num_generations"] == 2


def test_evaluation_reports_eval_metrics_and_changes_nothing_trained(tmp_path):
    """``eval_dataset``: ``eval/*`` every ``eval_steps`` (``num_generations_eval`` completions
    per prompt), sampled from a generator of its own: the same weights as a run without it."""
    plain = grpo(tmp_path / "plain", max_steps=3)
    plain.train()
    evaluated = grpo(tmp_path / "eval", max_steps=3, num_generations_eval=3, eval_strategy="steps", eval_steps=2)
    evaluated.eval_set = evaluated.train_set.take([0, 1, 2])
    history = evaluated.train()
    assert ["eval/reward" in h for h in history] == [False, True, True]  # step 2, and the last
    assert all(math.isfinite(h["eval/reward"]) and 0 < h["eval/completions/mean_length"] <= 6 for h in history[1:])
    for name, value in params(plain.policy).items():
        assert torch.equal(dict(evaluated.policy.named_parameters())[name].detach(), value), name


def test_max_steps_not_a_multiple_of_a_round_stops_there_as_trl(tmp_path):
    """Rounds of 2 optimizer steps and max_steps 7: 4 rounds, the last one of a single step, and
    the learning rate planned over the 7 (linear: the 7th step runs at lr / 7)."""
    trainer = grpo(tmp_path, per_device_train_batch_size=4, num_generations=4, steps_per_generation=2, max_steps=7,
                   learning_rate=1e-3)
    history = trainer.train()
    assert [h["train/optimizer_steps"] for h in history] == [2, 4, 6, 7]
    assert history[-1]["learning_rate"] == pytest.approx(1e-3 / 7)
    assert trainer.progress.max_steps == 7


def test_logging_and_save_steps_count_optimizer_steps_as_trl(tmp_path):
    """Rounds of 2 optimizer steps (steps_per_generation 2): max_steps 8 is 4 rounds, and
    logging_steps / save_steps 4 act every second round (TRL counts optimizer steps)."""
    trainer = grpo(tmp_path, per_device_train_batch_size=4, num_generations=4, steps_per_generation=2, max_steps=8,
                   logging_steps=4, save_steps=4, save_total_limit=5)
    history = trainer.train()
    assert trainer.plan.steps_per_round == 2 and [h["train/optimizer_steps"] for h in history] == [2, 4, 6, 8]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    for line, (before, at) in zip(lines, (history[0:2], history[2:4])):  # the rounds' means, as TRL logs
        assert line["loss"] == pytest.approx((before["loss"] + at["loss"]) / 2)
        assert line["completions/mean_length"] == pytest.approx((before["completions/mean_length"]
                                                                 + at["completions/mean_length"]) / 2)
        assert line["train/optimizer_steps"] == at["train/optimizer_steps"]  # so far
        assert line["train/skipped_steps"] == before["train/skipped_steps"] + at["train/skipped_steps"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
