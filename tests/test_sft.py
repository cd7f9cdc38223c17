"""Behavioural tests of ``tether.trainers.sft`` on tiny fp32 models (CPU, no network).

What is pinned here (``/work/shared/spec/ppo-details.md`` 1, 3, 37 and XV.18):

* the loss mask, by hand: completion tokens including the final EOS (``completion_only_loss``)
  or every real token; padding never counts, also when the pad token *is* EOS;
* the loss equals ``F.cross_entropy`` over those positions, each row run alone and unpadded;
* one step does not depend on how its batch is split into micro-batches (the loss is divided
  by the whole batch's token count);
* a tiny model learns a small task: training and held-out loss fall, greedy decoding of a
  training prompt gives its completion and stops (with pad == EOS too);
* chat (``messages``) and text-only rows; the held-out split; the step count, the linear LR
  schedule and the per-epoch reshuffle; metrics.jsonl; a ``from_pretrained``-loadable save;
* ``tether sft --config`` in-process, and its one-line errors.

Token ids of the tokenizers built here: pad 0, bos 1, eos 2, unk 3, then ``w0 .. w15`` as
4 .. 19 (so the prompt ``w1 w2`` is ``[5, 6]`` and ``w3`` is 7).
"""

from __future__ import annotations

import json
import math
import os
import random

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.cli import main
from tether.config import SFTConfig
from tether.data.sequences import Sequence
from tether.errors import DataError
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer
from tether.data.prompts import load_test_split
from tether.trainers.sft import SFTTrainer, collate, sft_loss_mask, split_held_out, summed_nll
from tests.device import DEVICE
from tests.probes import gradient_norms_at_each_step

NUM_WORDS = 16
PAD, EOS = 0, 2
TINY = dict(hidden_size=32, num_layers=2, num_heads=2)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads and lose a lot to contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer(pad_token: str | None = "<pad>", extra: tuple[str, ...] = ()):
    return word_tokenizer([*numbered_words(NUM_WORDS), *extra], pad_token=pad_token)


def make_config(tmp_path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), device=DEVICE, seed=0, learning_rate=1e-3, num_train_epochs=1.0)
    values.update(overrides)
    return SFTConfig(**values)


def copy_task(count: int, seed: int = 0) -> list[dict]:
    """Prompts of 1-3 words from w0..w11; the completion repeats the first word, then ``w13``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [f"w{rng.randrange(12)}" for _ in range(rng.randint(1, 3))]
        rows.append({"prompt": " ".join(words), "completion": f"{words[0]} w13"})
    return rows


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------- the loss mask


@pytest.mark.parametrize("pad_token", ["<pad>", "<eos>"])
def test_loss_mask_by_hand(pad_token):
    """Rows ``w1 w2 | w3 EOS`` and ``w1 | EOS``: labels are tokens 1..3 of each row."""
    tokenizer = make_tokenizer(pad_token)
    pad_id = tokenizer.pad_token_id
    assert pad_id == (EOS if pad_token == "<eos>" else PAD)
    rows = [Sequence([5, 6], [7, EOS]), Sequence([5], [EOS])]

    completion_only = collate(rows, pad_id, completion_only_loss=True)
    assert completion_only.input_ids.tolist() == [[5, 6, 7, EOS], [5, EOS, pad_id, pad_id]]
    assert completion_only.attention_mask.tolist() == [[True] * 4, [True, True, False, False]]
    # labels: [6, 7, EOS] and [EOS, pad, pad]; the EOS counts, the padding never
    assert completion_only.loss_mask.tolist() == [[False, True, True], [True, False, False]]

    every_token = collate(rows, pad_id, completion_only_loss=False)
    assert every_token.loss_mask.tolist() == [[True, True, True], [True, False, False]]


def test_loss_mask_from_lengths_alone():
    """The pure helper: prompt lengths [2, 0, 3], lengths [4, 3, 3], width 5."""
    prompt_lengths, lengths = torch.tensor([2, 0, 3]), torch.tensor([4, 3, 3])
    assert sft_loss_mask(prompt_lengths, lengths, 5, True).tolist() == [
        [False, True, True, False],
        [True, True, False, False],  # no prompt: token 0 has nothing before it to predict it
        [False, False, False, False],  # no completion left
    ]
    assert sft_loss_mask(prompt_lengths, lengths, 5, False).tolist() == [
        [True, True, True, False],
        [True, True, False, False],
        [True, True, False, False],
    ]


def test_pad_equal_to_eos_keeps_the_eos_label_in_encoded_data(tmp_path):
    """Through the trainer's own encoding: the completion's EOS is a counted label."""
    tokenizer = make_tokenizer("<eos>")
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    rows = [{"prompt": "w1 w2", "completion": "w3"}, {"prompt": "w1", "completion": "w4 w5 w6"}]
    trainer = SFTTrainer(make_config(tmp_path), tokenizer, model, rows)
    batch = collate(trainer.train_sequences, tokenizer.pad_token_id, True)
    labels = batch.input_ids[:, 1:]
    assert labels[batch.loss_mask].tolist().count(EOS) == 2  # one per row
    padded = ~batch.attention_mask[:, 1:]
    assert padded.any() and not (batch.loss_mask & padded).any()


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_loss_equals_cross_entropy_by_hand(completion_only_loss):
    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0, **TINY).eval()
    rows = [Sequence([5, 6], [7, EOS]), Sequence([8], [9, 10, 11, EOS]), Sequence([12, 13, 14], [EOS])]
    batch = collate(rows, PAD, completion_only_loss)
    with torch.no_grad():
        loss = summed_nll(model, batch) / batch.loss_mask.sum()

    # by hand: each row alone, unpadded; token t is predicted by the logits at t - 1
    nll, count = torch.tensor(0.0), 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.ids])
            logits = model(input_ids=ids).logits[0]
            first = len(row.prompt_ids) if completion_only_loss else 1
            targets = list(range(max(first, 1), len(row.ids)))
            nll += F.cross_entropy(logits[[t - 1 for t in targets]], ids[0, targets], reduction="sum")
            count += len(targets)
    assert count == int(batch.loss_mask.sum()) == (2 + 4 + 1 if completion_only_loss else 3 + 4 + 3)
    torch.testing.assert_close(loss, nll / count, atol=1e-5, rtol=1e-5)


def test_loss_gradients_equal_those_through_the_models_own_logits():
    """The loss runs the output layer itself, in chunks, on the packed backbone's hidden
    states (the model's own forward never runs); its gradients equal those of cross-entropy
    on the model's logits."""
    from tether.models.forward import output_layer_split

    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0, **TINY).eval()
    rows = [Sequence([5, 6], [7, EOS]), Sequence([8], [9, 10, 11, 12, 13, 14, EOS]), Sequence([12, 13, 14], [EOS])]
    batch = collate(rows, PAD, True)
    assert output_layer_split(model) is not None
    gradients = []
    for chunked in (True, False):
        model.zero_grad()
        if chunked:
            calls = []
            hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
            loss = summed_nll(model, batch)
            hook.remove()
            assert calls == []
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits[:, :-1]
            loss = F.cross_entropy(logits[batch.loss_mask], batch.input_ids[:, 1:][batch.loss_mask], reduction="sum")
        loss.backward()
        gradients.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (chunked_loss, chunked_grads), (plain_loss, plain_grads) = gradients
    torch.testing.assert_close(chunked_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------- one step


def test_micro_batch_split_does_not_change_the_step(tmp_path):
    """(4 rows x 1 micro-batch) vs (1 row x 4) vs (2 x 2): the same single optimizer step.

    Adam's first step is about ``lr * sign(grad)`` and would hide a wrongly scaled gradient;
    with ``adam_epsilon = 1`` (gradients here are far below 1) the step is about ``lr * grad``,
    so equal weights mean equal gradients.
    """
    tokenizer = make_tokenizer()
    rows = copy_task(4)
    results = []
    for per_device, accumulation in ((4, 1), (1, 4), (2, 2)):
        model = tiny_causal_lm(tokenizer, seed=0, **TINY)
        config = make_config(
            tmp_path / f"{per_device}x{accumulation}",
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            learning_rate=1.0,
            adam_epsilon=1.0,
        )
        trainer = SFTTrainer(config, tokenizer, model, rows)
        assert trainer.total_steps == 1
        (metrics,) = trainer.train()
        results.append((metrics, parameters(model)))
    (reference, weights), *others = results
    start = parameters(tiny_causal_lm(tokenizer, seed=0, **TINY))
    assert max((weights[n] - start[n]).abs().max() for n in start) > 1e-3  # the step is large enough to see
    for metrics, other in others:
        assert metrics["tokens"] == reference["tokens"]
        assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-6)
        for name in weights:
            torch.testing.assert_close(other[name], weights[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("on", [False, True])
def test_full_determinism_switches_torch_to_deterministic_kernels(tmp_path, monkeypatch, on):
    """``full_determinism`` turns on torch's deterministic algorithms, cuBLAS's fixed workspace
    and deterministic cuDNN when the trainer is built; off, none of them is touched."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: calls.append(mode))
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    tokenizer = make_tokenizer()
    SFTTrainer(make_config(tmp_path, full_determinism=on), tokenizer, tiny_causal_lm(tokenizer, **TINY), copy_task(4))
    assert calls == ([True] if on else [])
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if on else None)
    assert torch.backends.cudnn.deterministic is on and torch.backends.cudnn.benchmark is not on


def test_step_changes_weights_and_stays_finite(tmp_path):
    """Every parameter moves, the metrics are finite, and the optimizer sees the gradient clipped
    to ``max_grad_norm`` (the logged ``grad_norm`` is the norm before clipping, above it)."""
    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    before = parameters(model)
    limit = 0.5
    config = make_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=limit)
    trainer = SFTTrainer(config, tokenizer, model, copy_task(8))
    norms = gradient_norms_at_each_step(trainer.optimizer)
    history = trainer.train()
    assert len(history) == 2
    for metrics in history:
        assert {"loss", "learning_rate", "epoch", "step", "tokens", "grad_norm"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["grad_norm"] > limit
    assert norms == pytest.approx([limit, limit], rel=1e-4)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.cpu(), before[name])]
    assert len(changed) == len(before)


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("pad_token", ["<pad>", "<eos>"])
def test_learns_a_small_task_and_stops(tmp_path, pad_token):
    tokenizer = make_tokenizer(pad_token)
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    config = make_config(
        tmp_path, per_device_train_batch_size=16, num_train_epochs=30.0, learning_rate=1e-2, eval_fraction=0.25
    )
    trainer = SFTTrainer(config, tokenizer, model, copy_task(64))
    start = trainer.evaluate()["eval/loss"]
    history = trainer.train()

    first = sum(m["loss"] for m in history[:3]) / 3
    last = sum(m["loss"] for m in history[-3:]) / 3
    assert last < 0.3 * first, (first, last)
    end = history[-1]["eval/loss"]  # held-out prompts: the copy rule generalises
    assert end < 0.5 * start, (start, end)
    assert history[-1]["eval/perplexity"] == pytest.approx(math.exp(end))

    # Greedy decoding of a training prompt gives its completion and then EOS: the EOS was
    # trained even when the pad token is EOS (ppo-details 1, 37).
    model.eval()
    prompt, completion = trainer.train_sequences[0].prompt_ids, trainer.train_sequences[0].completion_ids
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=tokenizer.pad_token_id,
        )
    assert output[0, len(prompt) :].tolist()[: len(completion)] == completion
    assert completion[-1] == EOS


# --------------------------------------------------------------------------- data shapes


def test_chat_rows_train_on_the_assistant_turn(tmp_path):
    tokenizer = make_tokenizer(extra=("user:", "assistant:"))
    tokenizer.chat_template = CHAT_TEMPLATE
    user, assistant = tokenizer.convert_tokens_to_ids(["user:", "assistant:"])
    rows = [
        {"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}, {"role": "assistant", "content": f"w{i + 2}"}]}
        for i in range(8)
    ]
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    before = parameters(model)
    trainer = SFTTrainer(make_config(tmp_path, per_device_train_batch_size=4), tokenizer, model, rows)
    sequence = trainer.train_sequences[0]
    assert sequence.prompt_ids[0] == user and sequence.prompt_ids[-1] == assistant
    assert len(sequence.completion_ids) == 2 and sequence.completion_ids[-1] == EOS  # the reply and EOS
    history = trainer.train()
    assert len(history) == 2 and all(m["tokens"] == 8 for m in history)  # 4 rows x (reply + EOS)
    assert all(not torch.equal(p.cpu(), before[n]) for n, p in model.named_parameters())


def test_text_rows_train_on_every_token_after_the_first(tmp_path):
    tokenizer = make_tokenizer()
    # a lone EOS has no token before it to predict it from: nothing to learn, skipped
    rows = [{"text": "w1 w2 w3"}, {"text": "w4 w5"}, {"text": "w6"}, {"text": "<eos>"}]
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    trainer = SFTTrainer(make_config(tmp_path, per_device_train_batch_size=4), tokenizer, model, rows)
    assert [s.ids for s in trainer.train_sequences] == [[5, 6, 7, EOS], [8, 9, EOS], [10, EOS]]
    (metrics,) = trainer.train()
    assert metrics["tokens"] == 3 + 2 + 1 and math.isfinite(metrics["loss"])

    with pytest.raises(DataError, match="no row"):
        SFTTrainer(make_config(tmp_path), tokenizer, model, [{"text": "<eos>"}])


def test_missing_columns_are_named(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(DataError, match="question, answer"):
        SFTTrainer(make_config(tmp_path), tokenizer, tiny_causal_lm(tokenizer, **TINY), [{"question": "w1", "answer": "w2"}])


# --------------------------------------------------------------------------- the loop


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    train, held_out = split_held_out(16, 0.25, seed=3)
    assert len(held_out) == 4 and sorted(train + held_out) == list(range(16))
    assert split_held_out(16, 0.25, seed=3) == (train, held_out) != split_held_out(16, 0.25, seed=4)
    assert split_held_out(5, 0.0, seed=3) == ([0, 1, 2, 3, 4], [])

    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, **TINY)
    rows = copy_task(16)
    trainer = SFTTrainer(make_config(tmp_path, eval_fraction=0.25), tokenizer, model, rows)
    assert (len(trainer.train_sequences), len(trainer.eval_sequences)) == (12, 4)
    given = SFTTrainer(make_config(tmp_path, eval_fraction=0.25), tokenizer, model, rows, eval_dataset=rows[:3])
    assert (len(given.train_sequences), len(given.eval_sequences)) == (16, 3)


def test_steps_schedule_shuffle_and_metrics_file(tmp_path):
    """10 rows, batches of 4: 3 steps per epoch (the last has 2 rows), 2 epochs = 6 steps."""
    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, **TINY)
    config = make_config(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2.0,
        learning_rate=0.01, eval_fraction=0.2, eval_steps=4,
    )
    trainer = SFTTrainer(config, tokenizer, model, copy_task(12))
    assert (len(trainer.train_sequences), trainer.steps_per_epoch, trainer.total_steps) == (10, 3, 6)

    seen = []
    step = trainer.step
    trainer.step = lambda rows: seen.append(rows) or step(rows)
    history = trainer.train()

    epochs = [sorted(sum(seen[:3], [])), sorted(sum(seen[3:], []))]
    assert epochs == [list(range(10))] * 2 and seen[:3] != seen[3:]  # every row once, reshuffled
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in history] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    # linear schedule: step u trains with lr * (1 - (u - 1) / N)
    assert [m["learning_rate"] for m in history] == pytest.approx([0.01 * (1 - u / 6) for u in range(6)])
    assert [m["step"] for m in history if "eval/loss" in m] == [4, 6]

    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["eval/loss"] == pytest.approx(history[-1]["eval/loss"])


def test_save_model_is_loadable(tmp_path):
    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, **TINY)
    trainer = SFTTrainer(make_config(tmp_path), tokenizer, model, copy_task(4))
    trainer.train()
    target = trainer.save_model(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(target)
    for name, p in model.named_parameters():
        torch.testing.assert_close(loaded.state_dict()[name], p.detach().cpu())
    assert AutoTokenizer.from_pretrained(target).convert_tokens_to_ids("w3") == 7


def test_lora_trains_the_adapter_and_saves_merged_or_the_adapter_alone(tmp_path):
    """With ``peft_config`` only the LoRA matrices train; ``save_model`` writes a plain model
    with the adapter merged in (same logits, loads with ``from_pretrained``), or with
    ``save_merged: false`` the adapter alone, which loads back onto the base model."""
    from peft import PeftModel

    tokenizer = make_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    start = parameters(model)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    trainer = SFTTrainer(make_config(tmp_path, peft_config=lora, learning_rate=1e-2), tokenizer, model, copy_task(8))
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    trainer.train()
    moved = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert max(p.abs().max().item() for p in moved.values()) > 1e-3  # B left zero: the adapter trained
    state = trainer.model.get_base_model().state_dict()
    for name, value in start.items():  # the base weights did not move (LoRA's wrapped layers hold them as base_layer)
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(state[key].cpu(), value, atol=0, rtol=0)

    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids.to(trainer.device)).logits.cpu()
    merged = AutoModelForCausalLM.from_pretrained(trainer.save_model(tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    trainer.config.save_merged = False
    adapter = trainer.save_model(tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(tokenizer, seed=0, **TINY), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_run_resumed_from_a_checkpoint_ends_with_the_same_adapter(tmp_path):
    tokenizer = make_tokenizer()
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    values = dict(peft_config=lora, learning_rate=1e-2, per_device_train_batch_size=4, save_steps=1)
    straight = SFTTrainer(make_config(tmp_path, **values), tokenizer, tiny_causal_lm(tokenizer, seed=0, **TINY),
                          copy_task(8))
    assert len(straight.train()) == 2
    resumed = SFTTrainer(
        make_config(tmp_path, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"), **values),
        tokenizer, tiny_causal_lm(tokenizer, seed=0, **TINY), copy_task(8),
    )
    assert len(resumed.train()) == 1
    expected = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


# --------------------------------------------------------------------------- the command


@pytest.fixture
def workspace(tmp_path):
    tokenizer = make_tokenizer()
    tiny_causal_lm(tokenizer, **TINY).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in copy_task(12)))
    config = {
        "model_name_or_path": str(tmp_path / "base"),
        "dataset_name": str(tmp_path / "train.jsonl"),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "eval_fraction": 0.25,
        "device": "cpu",
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_cli_trains_and_saves(workspace):
    out = workspace / "run"
    assert main(["sft", "--config", str(workspace / "sft.yaml"), "--output_dir", str(out), "--seed", "1"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and "eval/loss" in lines[-1]  # 9 rows / 4 per step
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    AutoModelForCausalLM.from_pretrained(out)


def test_cli_errors_are_one_line(workspace, capsys):
    (workspace / "bad.jsonl").write_text(json.dumps({"question": "w1", "answer": "w2"}) + "\n")
    config = str(workspace / "sft.yaml")
    out = str(workspace / "run")
    assert main(["sft", "--config", config, "--dataset_name", str(workspace / "bad.jsonl"), "--output_dir", out]) == 2
    error = capsys.readouterr().err.strip()  # nothing else: the data is checked before the model loads
    assert error.startswith("error:") and "\n" not in error and "question, answer" in error

    assert main(["sft", "--model_name_or_path", str(workspace / "base")]) == 2
    assert "dataset_name" in capsys.readouterr().err


def test_test_split_only_from_split_layouts(workspace):
    """A saved DatasetDict gives its test split; a single saved Dataset or a file gives none."""
    rows = copy_task(6)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
    ).save_to_disk(workspace / "splits")
    datasets.Dataset.from_list(rows).save_to_disk(workspace / "single")
    test_split = lambda name: load_test_split(str(workspace / name), "test")  # noqa: E731
    assert test_split("splits")["prompt"] == [r["prompt"] for r in rows[4:]]
    assert test_split("single") is None
    assert test_split("train.jsonl") is None
