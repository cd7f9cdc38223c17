"""DPO (issue 23): preference optimisation on the pair machinery reward models use.

Pinned here: every loss type against numbers computed by hand from fixed log-ratios, and its
value while the policy is its reference (log 2 for sigmoid); sequence log-probabilities summed
over completion tokens only, read where generation produces them, the same padded or alone;
the update is the same for (8,1,1), (1,8,1) and (2,2,2) splits, with the sft term too;
precomputed reference numbers give the live reference's update with no reference model kept;
LoRA's reference is the adapter switched off; TR-DPO's reference sync; the margin grows on a
tiny task; the data shapes (implicit prompts of texts and chats, token ids, max_prompt_length);
bad configs refused in one line; TRL's DPOConfig fields; the command line.
(Exact resume and checkpoints: tests/test_resume_supervised.py.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from tether import DPOConfig, DPOTrainer
from tether.cli import main
from tether.config import load_config
from tether.data.sequences import encode_pairs
from tether.errors import ConfigError, DataError
from tether.ops.preference import PAIR_LOSSES, logratios, pair_loss
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer
from tether.trainers.dpo import completion_logps
from tests.probes import gradient_norms_at_each_step
from tests.trl_lists import trl_config_fields, unknown_to_tether
from tests.workers.dpo_update import KINDS, PAIRS, build, step

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def make_tokenizer():
    tokenizer = word_tokenizer(numbered_words(16))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer, seed=0):
    return tiny_causal_lm(tokenizer, seed=seed, arch="llama", hidden_size=32, num_layers=2, num_heads=2)


def dpo(tmp_path, data=None, model=None, **fields) -> DPOTrainer:
    tokenizer = make_tokenizer()
    settings = dict(output_dir=str(tmp_path), device="cpu", seed=7, per_device_train_batch_size=4, learning_rate=1e-3,
                    max_steps=2, report_to=[], disable_tqdm=True)
    return DPOTrainer(DPOConfig(**{**settings, **fields}), tokenizer, model or make_model(tokenizer),
                      data if data is not None else list(PAIRS))


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- the losses, by hand ------------------------------------------------------------------------

def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def logsig(v: float) -> float:
    return math.log(sig(v))


# log-ratios c = 0.7 (chosen), r = -0.4 (rejected); beta 0.5; 3 and 2 completion tokens; eps 0.1
C, R, BETA, EPS = 0.7, -0.4, 0.5, 0.1
BY_HAND = {
    "sigmoid": -logsig(0.55),
    "hinge": 1 - 0.55,
    "ipo": (0.7 / 3 + 0.4 / 2 - 1.0) ** 2,
    "exo_pair": sig(0.55) * (logsig(0.55) - math.log(0.9)) + sig(-0.55) * (logsig(-0.55) - math.log(0.1)),
    "nca_pair": -logsig(0.35) - 0.5 * logsig(-0.35) - 0.5 * logsig(0.2),
    "robust": (-0.9 * logsig(0.55) + 0.1 * logsig(-0.55)) / 0.8,
    "bco_pair": -logsig(0.35) - logsig(0.2),
    "sppo_hard": (0.7 - 1.0) ** 2 + (-0.4 + 1.0) ** 2,
    "apo_zero": 1 - sig(0.35) + sig(-0.2),
    "apo_down": sig(0.35) + 1 - sig(0.55),
    "discopop": (1 - sig(11.0)) * -logsig(0.55) + sig(11.0) * math.exp(-0.55),
    "sigmoid_norm": -logsig(0.5 * (0.7 / 3 + 0.4 / 2)),
}


def fixed_logratios(divergence="reverse_kl", alpha=0.5):
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # policy logps -2.3 / -4.4 against the reference's -3.0 / -4.0: c = 0.7, r = -0.4
    return logratios(t(-2.3), t(-4.4), t(-3.0), t(-4.0), t(3.0), t(2.0), divergence, alpha)


@pytest.mark.parametrize("kind", PAIR_LOSSES)
def test_each_loss_against_its_formula_by_hand(kind):
    assert set(BY_HAND) == set(PAIR_LOSSES)
    value = pair_loss(kind, fixed_logratios(), BETA, EPS, tau=0.05)
    assert value.item() == pytest.approx(BY_HAND[kind], abs=1e-9)


def test_f_divergence_scores_by_hand():
    for divergence, c, r in [
        ("forward_kl", 1 - math.exp(-0.7), 1 - math.exp(0.4)),
        ("js_divergence", math.log(2) + logsig(0.7), math.log(2) + logsig(-0.4)),
        ("alpha_divergence", (math.exp(-0.5 * 0.7) - 1) / -0.5, (math.exp(0.5 * 0.4) - 1) / -0.5),
    ]:
        x = fixed_logratios(divergence, alpha=0.5)
        assert (x.chosen_score.item(), x.rejected_score.item()) == pytest.approx((c, r), abs=1e-9), divergence
        assert pair_loss("sigmoid", x, BETA).item() == pytest.approx(-logsig(0.5 * (c - r)), abs=1e-9)


# with the policy equal to its reference every log-ratio is 0 (beta 0.5, label_smoothing 0.1)
AT_REFERENCE = {
    "sigmoid": math.log(2), "hinge": 1.0, "ipo": 1.0, "exo_pair": 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1),
    "nca_pair": 2 * math.log(2), "robust": math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 2.0,
    "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * math.log(2) + 0.5, "sigmoid_norm": math.log(2),
}


@pytest.mark.parametrize("kind", PAIR_LOSSES)
def test_first_loss_with_the_policy_as_its_reference(tmp_path, kind):
    trainer = dpo(tmp_path, loss_type=kind, beta=0.5, label_smoothing=0.1 if kind in ("robust", "exo_pair") else 0.0)
    metrics = trainer.step()
    assert metrics["loss"] == pytest.approx(AT_REFERENCE[kind], abs=1e-6)
    assert metrics["rewards/margins"] == metrics["rewards/chosen"] == metrics["rewards/rejected"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # a tie is not a win
    assert metrics["logps/chosen"] < 0 and metrics["logps/rejected"] < 0


def test_weighted_losses_add_and_sft_is_the_chosen_tokens_nll(tmp_path):
    alone = {kind: dpo(tmp_path / kind, loss_type=kind, beta=0.5).step()["loss"] for kind in ("sigmoid", "sft", "hinge")}
    both = dpo(tmp_path / "mix", loss_type=["sigmoid", "sft", "hinge"], loss_weights=[0.8, 0.3, 2.0], beta=0.5).step()
    assert both["loss"] == pytest.approx(0.8 * alone["sigmoid"] + 0.3 * alone["sft"] + 2.0 * alone["hinge"], abs=1e-6)

    # sft by hand: the mean NLL of the chosen completions' tokens, the whole batch at once
    trainer = dpo(tmp_path / "hand", loss_type="sft", per_device_train_batch_size=8)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for pair in PAIRS:
            prompt = trainer.tokenizer(pair["prompt"])["input_ids"]
            chosen = trainer.tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"] + [trainer.tokenizer.eos_token_id]
            logits = trainer.model(torch.tensor([prompt + chosen])).logits[0]
            total -= F.log_softmax(logits[len(prompt) - 1 : -1].double(), -1).gather(1, torch.tensor(chosen)[:, None]).sum().item()
            tokens += len(chosen)
    assert trainer.step()["loss"] == pytest.approx(total / tokens, abs=1e-5)


# --- sequence log-probabilities -----------------------------------------------------------------

def by_hand_logps(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) from the model's own full forward on the unpadded row."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    start = len(prompt) - 1
    picked = F.log_softmax(logits[start : start + len(completion)], -1).gather(1, torch.tensor(completion)[:, None])
    return picked.sum().item()


def test_completion_logps_read_only_completion_tokens_the_same_padded_or_alone():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=2).eval()
    rows = [
        {"prompt": "w1 w2 w3 w4", "chosen": "w5", "rejected": "w6 w7 w8 w9 w10"},
        {"prompt": "w11", "chosen": "w12 w13 w14", "rejected": "w15"},
        {"chosen": "w3 w4 w5", "rejected": "w3 w4 w6 w7"},  # no prompt: the shared start is one
        {"chosen": "w8 w9", "rejected": "w10"},  # nothing shared: read after BOS (or the first token)
    ]
    pairs = [encode_pairs(datasets.Dataset.from_list([row]), tokenizer)[0] for row in rows]
    assert pairs[2].chosen.prompt_ids == tokenizer("w3 w4", add_special_tokens=False)["input_ids"]
    assert pairs[3].chosen.prompt_ids == []
    for start in (tokenizer.bos_token_id, None):
        with torch.no_grad():
            logps, counts = completion_logps(model, pairs, tokenizer.pad_token_id, torch.device("cpu"), 3, start)
        expected, expected_counts = [], []
        for side in ("chosen", "rejected"):
            for pair in pairs:
                sequence = getattr(pair, side)
                prompt, completion = sequence.prompt_ids, sequence.completion_ids
                if not prompt:  # BOS as the context; without one, the first token is the context
                    prompt, completion = ([start], completion) if start is not None else (completion[:1], completion[1:])
                expected.append(by_hand_logps(model, prompt, completion))
                expected_counts.append(len(completion))
        assert counts.tolist() == expected_counts
        assert logps.tolist() == pytest.approx(expected, abs=1e-4)
        for index, pair in enumerate(pairs):  # each pair alone: the same numbers as in the padded batch
            with torch.no_grad():
                alone, _ = completion_logps(model, [pair], tokenizer.pad_token_id, torch.device("cpu"), 1024, start)
            assert alone.tolist() == pytest.approx([logps[index].item(), logps[len(pairs) + index].item()], abs=1e-5)
    assert counts[3].item() == 2  # without BOS, w9 and EOS of "w8 w9": w8 is the context


def test_pairs_without_a_prompt_are_said_once(tmp_path, capsys):
    rows = [{"prompt": "", "chosen": f"w{i}", "rejected": f"w{i + 1}"} for i in range(4)]
    capsys.readouterr()
    dpo(tmp_path / "bos", data=rows, max_steps=1)
    assert "4 pairs have no prompt tokens; their completions are read after the tokenizer's BOS" in " ".join(
        capsys.readouterr().err.split())
    tokenizer = make_tokenizer()
    tokenizer.bos_token = None
    DPOTrainer(DPOConfig(output_dir=str(tmp_path / "none"), device="cpu", per_device_train_batch_size=4), tokenizer,
               make_model(make_tokenizer()), rows)
    assert "the first token of each completion is their context and is not trained on" in " ".join(
        capsys.readouterr().err.split())


def test_token_ids_outside_the_vocabulary_are_refused_before_anything_is_written(tmp_path):
    rows = [{"prompt": [5], "chosen": [999], "rejected": [7]}] + [{"prompt": [5], "chosen": [6], "rejected": [7]}] * 3
    with pytest.raises(DataError, match="training pair 0 has a token id outside the model's 20 embeddings") as error:
        dpo(tmp_path / "out", data=rows)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
    from tether import RewardConfig, RewardTrainer
    from tether.tiny import tiny_reward_model

    tokenizer = make_tokenizer()
    with pytest.raises(DataError, match="pair 0 has a token id outside the reward model's"):
        RewardTrainer(RewardConfig(output_dir=str(tmp_path / "rm"), device="cpu", per_device_train_batch_size=2,
                                   eval_fraction=0.0), tokenizer, tiny_reward_model(tokenizer),
                      datasets.Dataset.from_list(rows))


# --- the update ---------------------------------------------------------------------------------

def test_update_is_the_same_in_one_micro_batch_or_eight(tmp_path):
    for kind in KINDS:
        whole = build(tmp_path / "whole", kind, 8, 1)
        start = params(whole.model)
        whole_params, whole_metrics = step(whole)
        split_params, split_metrics = step(build(tmp_path / "split", kind, 1, 8))
        assert max((whole_params[k] - start[k]).abs().max().item() for k in start) > 1e-4, kind  # it moved
        for name, value in whole_params.items():
            torch.testing.assert_close(split_params[name], value, atol=1e-6, rtol=0, msg=f"{kind} {name}")
        for key, value in whole_metrics.items():
            if not key.startswith("timing/"):
                assert split_metrics[key] == pytest.approx(value, abs=1e-6), (kind, key)


def test_update_is_the_same_split_into_two_processes(tmp_path):
    """(8,1,1) in this process against (2,2,2) under torchrun."""
    expected = {kind: step(build(tmp_path / "whole", kind, 8, 1)) for kind in KINDS}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/workers/dpo_update.py", "--out", str(tmp_path / "two"), "--per-device", "2", "--accumulation", "2"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    assert two["world_size"] == 2
    for kind in KINDS:
        (whole_params, whole_metrics), (split_params, split_metrics) = expected[kind], two["results"][kind]
        for name, value in whole_params.items():
            torch.testing.assert_close(split_params[name], value, atol=1e-6, rtol=0, msg=f"{kind} {name}")
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert split_metrics[key] == pytest.approx(whole_metrics[key], abs=1e-6), (kind, key)


def test_precomputed_reference_gives_the_same_update_with_no_reference_model(tmp_path):
    live = dpo(tmp_path / "live", max_steps=3, learning_rate=1e-2, eval_fraction=0.25)
    live_metrics = live.train()
    ahead = dpo(tmp_path / "ahead", max_steps=3, learning_rate=1e-2, eval_fraction=0.25, precompute_ref_log_probs=True,
                precompute_ref_batch_size=3)
    assert ahead.ref_model is None and ahead._reference is None  # nothing held but the numbers
    assert all(p.reference_logps is not None for p in [*ahead.train_pairs, *ahead.eval_pairs])
    ahead_metrics = ahead.train()
    for name, value in params(live.model).items():
        torch.testing.assert_close(params(ahead.model)[name], value, atol=1e-6, rtol=0, msg=name)
    for key in ("loss", "rewards/margins", "eval/loss", "eval/rewards/margins"):
        assert ahead_metrics[-1][key] == pytest.approx(live_metrics[-1][key], abs=1e-5), key

    # a reference given apart is scored once and let go as well
    tokenizer = make_tokenizer()
    given = DPOTrainer(DPOConfig(output_dir=str(tmp_path / "given"), device="cpu", precompute_ref_log_probs=True,
                                 per_device_train_batch_size=4), tokenizer, make_model(tokenizer), list(PAIRS),
                       ref_model=make_model(tokenizer, seed=5))
    assert given.ref_model is None and given._reference is None
    first = given.train_pairs[0]
    seed5 = completion_logps(make_model(tokenizer, seed=5), [first], tokenizer.pad_token_id, given.device, 64)[0]
    assert first.reference_logps == pytest.approx(seed5.tolist(), abs=1e-5)  # the reference's, not the model's


def test_margin_grows_and_held_out_pairs_are_ranked(tmp_path):
    rows = [{"prompt": f"w{i % 16} w{(i * 5) % 16}", "chosen": f"w5 w{i % 16}", "rejected": f"w{(i * 3) % 16} w9"}
            for i in range(40)]
    began = time.perf_counter()
    history = dpo(tmp_path, data=rows, max_steps=12, learning_rate=3e-2, eval_fraction=0.2, eval_steps=6, beta=0.5).train()
    assert 0 < sum(m["timing/total"] for m in history) < time.perf_counter() - began  # each step's own seconds
    assert history[0]["rewards/margins"] == 0.0
    assert history[-1]["rewards/margins"] > 0.5 and history[-1]["loss"] < 0.5 * math.log(2) * 2 - 0.2
    assert history[-1]["eval/rewards/accuracies"] >= 0.875 and history[-1]["eval/rewards/margins"] > 0


def test_lora_reference_is_the_adapter_switched_off(tmp_path):
    trainer = dpo(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
                  learning_rate=5e-2, max_steps=3, beta=0.5)
    assert trainer.ref_model is None and trainer._reference is None  # no copy of the model
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts at zero
    assert history[-1]["rewards/margins"] > 0
    for name, value in trainer.model.named_parameters():
        if "lora" not in name:
            assert torch.equal(value, base[name]), name
    pairs = trainer.train_pairs[:4]
    with trainer.model.disable_adapter():
        off = completion_logps(trainer.model, pairs, trainer.pad_token_id, trainer.device, 64)[0]
    fresh = make_model(make_tokenizer())
    torch.testing.assert_close(off, completion_logps(fresh, pairs, trainer.pad_token_id, trainer.device, 64)[0],
                               atol=1e-5, rtol=0)
    trainer.config.save_merged = False
    assert (trainer.save_model(tmp_path / "adapter") / "adapter_config.json").is_file()
    trainer.config.save_merged = True
    merged = AutoModelForCausalLM.from_pretrained(trainer.save_model(tmp_path / "merged"))
    torch.testing.assert_close(completion_logps(merged, pairs, trainer.pad_token_id, trainer.device, 64)[0],
                               completion_logps(trainer.model, pairs, trainer.pad_token_id, trainer.device, 64)[0],
                               atol=1e-5, rtol=0)


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path):
    trainer = dpo(tmp_path, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.25, learning_rate=1e-2,
                  max_steps=2)
    reference = params(trainer.ref_model)
    trainer.step()
    assert all(torch.equal(v, params(trainer.ref_model)[n]) for n, v in reference.items())  # not yet
    trainer.step()
    for name, value in params(trainer.model).items():
        torch.testing.assert_close(params(trainer.ref_model)[name], 0.25 * value + 0.75 * reference[name])
    assert set(trainer.checkpointed_models()) == {"model", "reference"}


def test_saved_model_loads_with_from_pretrained(tmp_path):
    trainer = dpo(tmp_path, learning_rate=1e-2)
    trainer.train()
    loaded = AutoModelForCausalLM.from_pretrained(trainer.save_model(tmp_path / "saved"))
    for name, value in params(trainer.model).items():
        assert torch.equal(dict(loaded.named_parameters())[name].detach(), value), name


# --- data -------------------------------------------------------------------------------------------

def test_implicit_prompts_token_ids_and_max_prompt_length():
    tokenizer = make_tokenizer()
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    chat = lambda *turns: [{"role": r, "content": c} for r, c in zip(("user", "assistant") * 3, turns)]  # noqa: E731
    rows = datasets.Dataset.from_list([
        {"chosen": "w1 w2 w3", "rejected": "w1 w2 w4 w5"},
        {"chosen": "w1 w2", "rejected": "w1 w2 w6"},  # one side ends where the other goes on
    ])
    first, second = encode_pairs(rows, tokenizer)
    assert (first.chosen.prompt_ids, first.chosen.completion_ids, first.rejected.completion_ids) == (
        ids("w1 w2"), ids("w3") + [eos], ids("w4 w5") + [eos])
    assert (second.chosen.prompt_ids, second.chosen.completion_ids, second.rejected.completion_ids) == (
        ids("w1 w2"), [eos], ids("w6") + [eos])

    chats = datasets.Dataset.from_list([{"chosen": chat("w1", "w2"), "rejected": chat("w1", "w3")}])
    pair = encode_pairs(chats, tokenizer)[0]
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids and pair.chosen.completion_ids != pair.rejected.completion_ids

    tokens = datasets.Dataset.from_list([{"prompt": [3, 4, 5, 6], "chosen": [7], "rejected": [8, 9]}])
    with pytest.warns(UserWarning, match="1 of 1 pairs had prompts longer than max_prompt_length=2"):
        pair = encode_pairs(tokens, tokenizer, max_prompt_length=2)[0]
    assert (pair.chosen.ids, pair.rejected.ids) == ([5, 6, 7, eos], [5, 6, 8, 9, eos])


def test_python_data_mistakes_are_one_line_errors(tmp_path):
    whole = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS), "test": datasets.Dataset.from_list(PAIRS)})
    with pytest.raises(DataError, match="is a DatasetDict with splits train, test; pass one split, e.g. dataset"):
        dpo(tmp_path, data=whole)
    with pytest.raises(DataError, match="training row 0 is a tuple; give each pair as a dict"):
        dpo(tmp_path, data=[tuple(row.values()) for row in PAIRS])
    dpo(tmp_path, max_steps=1).train()
    with pytest.raises(ConfigError, match=r"from Python: train\(resume_from_checkpoint=True\) or overwrite_output_dir"):
        dpo(tmp_path, max_steps=1).train()


def test_dpo_takes_chat_pairs(tmp_path):
    chat = lambda answer: [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": answer}]  # noqa: E731
    rows = [{"chosen": chat(f"w5 w{i}"), "rejected": chat(f"w{i} w9")} for i in range(8)]
    metrics = dpo(tmp_path, data=rows, max_steps=1).train()
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# --- configs ------------------------------------------------------------------------------------

def test_defaults_are_trls():
    config = DPOConfig()
    assert (config.beta, config.loss_types, config.learning_rate, config.max_length) == (0.1, ["sigmoid"], 1e-6, 1024)
    assert (config.label_smoothing, config.precompute_ref_log_probs, config.f_divergence_type) == (0.0, False, "reverse_kl")


@pytest.mark.parametrize(("fields", "message"), [
    (dict(loss_type="aot"), "loss_type aot is not offered: it sorts over the batch"),
    (dict(loss_type="dpop"), "config field loss_type 'dpop' is not one of sigmoid"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 weights for 2 loss types"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing must lie in [0, 0.5) for robust"),
    (dict(loss_type="exo_pair"), "loss_type exo_pair needs label_smoothing in (0, 1)"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(precompute_ref_log_probs=True, sync_ref_model=True), "precompute_ref_log_probs and sync_ref_model are both"),
    (dict(sync_ref_model=True, use_peft=True), "sync_ref_model needs a reference model of its own"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "f_divergence_type forward_kl does not apply"),
    (dict(max_prompt_length=0), "max_prompt_length must be at least 1"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path, fields, message):
    with pytest.raises(ConfigError) as error:
        dpo(tmp_path, **fields)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_model_as_its_own_reference_is_refused(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    with pytest.raises(ConfigError, match="ref_model is the model itself"):
        DPOTrainer(DPOConfig(output_dir=str(tmp_path), device="cpu"), tokenizer, model, list(PAIRS), ref_model=model)


def test_every_trl_dpo_field_is_known():
    """A TRL DPOConfig moves over: each field is a tether field, a noted one, or an unsupported
    one accepted at TRL's default (from the installed TRL, else as recorded from it)."""
    from tether.config import UNSUPPORTED_FIELDS

    fields, defaults = trl_config_fields("DPOConfig")
    missing = unknown_to_tether(fields, DPOConfig)
    assert len(fields) > 130 and not missing, missing
    for name in ("use_weighting", "ld_alpha", "activation_offloading", "pad_token"):
        assert defaults[name] == dict((k, v[0]) for k, v in UNSUPPORTED_FIELDS.items())[name], name
    with pytest.raises(ConfigError, match="use_weighting=True is not supported"):
        load_config(DPOConfig, overrides={"use_weighting": "true"})
    # the same from Python: a TRL DPOConfig(...) call moves over as its YAML does
    with pytest.warns(UserWarning, match="'padding_free' has no effect in tether"):
        config = DPOConfig(padding_free=True, torch_dtype="bfloat16", use_weighting=False)
    assert config.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="use_weighting=True is not supported"):
        DPOConfig(use_weighting=True)
    with pytest.raises(ConfigError, match="unknown config field 'lerning_rate'; did you mean 'learning_rate'"):
        DPOConfig(lerning_rate=1e-6)


# --- the command line -------------------------------------------------------------------------

def test_command_trains_and_saves_a_loadable_model(tmp_path, capsys):
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    config = {"model_name_or_path": str(tmp_path / "base"), "dataset_name": str(tmp_path / "pairs.jsonl"),
              "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "device": "cpu",
              "loss_type": ["sigmoid", "sft"], "eval_fraction": 0.25}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    assert main(["dpo", "--config", str(tmp_path / "dpo.yaml"), "--output_dir", str(tmp_path / "out")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and "eval/rewards/accuracies" in lines[-1]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert any(not torch.equal(p, q) for p, q in zip(loaded.parameters(), make_model(tokenizer).parameters()))

    capsys.readouterr()
    assert main(["dpo", "--help"]) == 0
    assert "--loss_type" in capsys.readouterr().out
    assert main(["dpo", "--print-config"]) == 0
    template = yaml.safe_load(capsys.readouterr().out)
    assert template["loss_type"] == "sigmoid" and template["beta"] == 0.1


def test_print_config_takes_the_file_and_the_overrides(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"model_name_or_path": "base", "beta": 0.3}))
    capsys.readouterr()
    assert main(["dpo", "--config", str(tmp_path / "mine.yaml"), "--max_steps", "7", "--loss_type", "sigmoid,sft",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["model_name_or_path"], printed["beta"], printed["max_steps"]) == ("base", 0.3, 7)
    assert printed["loss_type"] == ["sigmoid", "sft"] and printed["learning_rate"] == 1e-6  # the rest at defaults
    assert load_config(DPOConfig, overrides={"loss_type": "sigmoid, sft"}).loss_type == ["sigmoid", "sft"]
    assert main(["dpo", "--lerning_rate", "1", "--print-config"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_epochs_count_whole_batches_and_a_small_dataset_is_refused_in_one_line(tmp_path, capsys):
    history = dpo(tmp_path / "run", max_steps=-1, num_train_epochs=2, per_device_train_batch_size=3).train()
    assert [m["epoch"] for m in history] == [0.5, 1.0, 1.5, 2.0]  # 8 pairs: 2 whole batches of 3 an epoch
    said = capsys.readouterr().err  # the 2 pairs an epoch leaves out: said once
    assert said.count("the 2 of 8 training pairs left over are not trained on in that epoch") == 1, said
    dpo(tmp_path / "whole", per_device_train_batch_size=4)
    assert "left over" not in capsys.readouterr().err
    with pytest.raises(DataError) as error:
        dpo(tmp_path / "small", per_device_train_batch_size=16)
    assert "there are 8 training pairs; lower the batch sizes or add pairs" in str(error.value)
    assert "num_train_epochs" not in str(error.value)


def test_evaluation_asked_for_without_held_out_pairs_is_said(tmp_path, capsys):
    capsys.readouterr()
    dpo(tmp_path, eval_strategy="steps", eval_steps=1)
    assert "eval_strategy is set but there are no held-out pairs" in " ".join(capsys.readouterr().err.split())


def test_resume_on_changed_pairs_of_the_same_count_is_refused(tmp_path):
    dpo(tmp_path, max_steps=2).train()
    changed = [dict(row, chosen=row["chosen"] + " w1") for row in PAIRS]
    with pytest.raises(ConfigError, match="trained on 8 pairs, this run has other pairs; resume with the same data"):
        dpo(tmp_path, data=changed, max_steps=2).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_grad_norm_is_logged_before_clipping(tmp_path, max_grad_norm):
    """``grad_norm`` (as HF Trainer logs it): the norm of each step's gradients before clipping,
    the one the optimizer sees without ``max_grad_norm`` and above it with one."""
    trainer = dpo(tmp_path, max_grad_norm=max_grad_norm)
    norms = gradient_norms_at_each_step(trainer.optimizer)
    logged = [metrics["grad_norm"] for metrics in trainer.train()]
    assert len(logged) == len(norms) == 2
    if max_grad_norm is None:
        assert logged == pytest.approx(norms, rel=1e-5)
    else:
        assert norms == pytest.approx([max_grad_norm] * 2, rel=1e-4) and min(logged) > 10 * max_grad_norm
