"""Reward-model training: the Bradley-Terry loss, where the score is read, batch-split
invariance, learning a simple preference, normalisation, the head's init and ``tether rm``.

The toy preference: a chosen completion contains ``w5``, a rejected one does not.
"""

from __future__ import annotations

import json
import math
import random

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from tether.cli import main
from tether.config import RewardConfig
from tether.data.sequences import encode_pairs, encode_sequences, right_pad
from tether.scoring.reward import get_reward
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.pairs import split_pairs
from tether.trainers.reward import RewardTrainer, load_reward_backbone
from tests.device import DEVICE
from tests.probes import gradient_norms_at_each_step, linear_output_dtypes

TINY = dict(hidden_size=32, num_layers=2, num_heads=2)
WORDS = numbered_words(20)
EOS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a busy shared CPU: one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def preference_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows whose chosen completion contains w5 and whose rejected one does not."""
    rng = random.Random(seed)
    others = [w for w in WORDS[:12] if w != "w5"]
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choices(others, k=rng.randint(1, 3)))
        chosen = rng.choices(others, k=rng.randint(1, 3))
        chosen.insert(rng.randint(0, len(chosen)), "w5")
        rejected = rng.choices(others, k=rng.randint(1, 4))
        rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def preference_table(count: int, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list(preference_rows(count, seed))


def rm_config(tmp_path, **overrides) -> RewardConfig:
    values = dict(
        output_dir=str(tmp_path / "rm"),
        device=DEVICE,
        seed=0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_train_epochs=1.0,
        learning_rate=1e-3,
        eval_fraction=0.0,
    )
    return RewardConfig(**{**values, **overrides})


def scores_alone(model, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence scored on its own, unpadded: ``(get_reward scores [N], outputs at the last token [N])``."""
    scores, at_end = [], []
    with torch.no_grad():
        for ids in sequences:
            row = torch.tensor([ids], device=model.device)
            per_token, score, _ = get_reward(model, row, 0, 0, torch.ones_like(row, dtype=torch.bool))
            scores.append(score[0])
            at_end.append(per_token[0, len(ids) - 1, 0])
    return torch.stack(scores).cpu(), torch.stack(at_end).cpu()


# --- the loss -------------------------------------------------------------------------------

def test_bradley_terry_hand_values_through_the_trainer_loss(tokenizer, tmp_path, monkeypatch):
    trainer = RewardTrainer(rm_config(tmp_path), tokenizer, tiny_reward_model(tokenizer, **TINY), preference_table(8))
    pair = trainer.train_pairs[:1]

    for shift in (0.0, 5.3, -40.0):  # r_c - r_r = 1 whatever the level
        monkeypatch.setattr(trainer, "score_pairs", lambda pairs, s=shift: (torch.tensor([1.0 + s]), torch.tensor([s])))
        terms = trainer.terms(pair)
        loss = trainer.loss_share(terms, pair)
        assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-5)
        assert loss.item() == pytest.approx(0.31326, abs=1e-5)
        assert terms["accuracy"].item() == 1.0 and terms["margin"].item() == pytest.approx(1.0)

    # a micro-batch holding one of the optimizer batch's two pairs contributes half its mean
    loss = trainer.loss_share(trainer.terms(pair), pair * 2)
    assert loss.item() == pytest.approx(0.31326 / 2, abs=1e-5)

    monkeypatch.setattr(trainer, "score_pairs", lambda pairs: (torch.tensor([0.5]), torch.tensor([0.5])))
    terms = trainer.terms(pair)
    assert trainer.loss_share(terms, pair).item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["accuracy"].item() == 0.0  # a tie is not a win


@pytest.mark.parametrize("pad_token", ["<pad>", "<eos>"])
def test_score_is_read_where_get_reward_reads_it(tmp_path, pad_token):
    tokenizer = word_tokenizer(WORDS, pad_token=pad_token)
    model = tiny_reward_model(tokenizer, seed=3, **TINY).eval()
    rows = [
        {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w6 w7 w8"},
        {"prompt": "w9", "chosen": "w10 w11 w12", "rejected": "w13"},
    ]
    config = rm_config(tmp_path, per_device_train_batch_size=2)
    trainer = RewardTrainer(config, tokenizer, model, datasets.Dataset.from_list(rows))
    pairs = trainer.train_pairs
    with torch.no_grad():
        chosen_scores, rejected_scores = trainer.score_pairs(pairs)  # one right-padded [4, L] batch

    sequences = [p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs]
    assert all(ids[-1] == EOS for ids in sequences)
    assert len({len(ids) for ids in sequences}) > 1  # the batch really is padded
    alone, at_eos = scores_alone(trainer.model, sequences)
    batched = torch.cat([chosen_scores, rejected_scores]).cpu()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, at_eos, atol=1e-5, rtol=0)

    # the position before the EOS gives other numbers, so reading one too early would show
    ids, mask = right_pad(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        per_token, _, lengths = get_reward(trainer.model, ids.to(trainer.device), tokenizer.pad_token_id, 0, mask.to(trainer.device))
    per_token = per_token.cpu()
    assert lengths.tolist() == [len(ids) - 1 for ids in sequences]
    before_eos = torch.stack([per_token[row, len(ids) - 2, 0] for row, ids in enumerate(sequences)])
    assert (before_eos - batched).abs().min() > 1e-4


def test_micro_batches_give_the_same_update_as_one_batch(tokenizer, tmp_path):
    table = preference_table(12)
    start = tiny_reward_model(tokenizer, seed=1, **TINY)
    weights = []
    for per_device, accumulation in ((4, 1), (1, 4), (2, 2)):
        model = tiny_reward_model(tokenizer, seed=1, **TINY)
        config = rm_config(
            tmp_path / f"{per_device}x{accumulation}",
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            adam_epsilon=1e-6,
        )
        trainer = RewardTrainer(config, tokenizer, model, table)
        trainer.step()
        weights.append({name: p.detach().cpu().clone() for name, p in model.named_parameters()})
    moved = max((weights[0][n] - p).abs().max().item() for n, p in start.named_parameters())
    assert moved > 1e-4  # the step did something
    for other in weights[1:]:
        for name, value in weights[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-5, rtol=0, msg=name)


# --- training and evaluation ----------------------------------------------------------------

def test_learns_a_simple_preference(tokenizer, tmp_path):
    config = rm_config(
        tmp_path, per_device_train_batch_size=8, num_train_epochs=4.0, learning_rate=3e-3, eval_fraction=0.2, eval_steps=8
    )
    trainer = RewardTrainer(config, tokenizer, tiny_reward_model(tokenizer, seed=1, **TINY), preference_table(80))
    assert (len(trainer.train_pairs), len(trainer.eval_pairs)) == (64, 16)
    history = trainer.train()

    assert [m["step"] for m in history] == list(range(1, 33))  # 4 epochs x floor(64 / 8)
    assert history[-1]["epoch"] == pytest.approx(4.0)
    assert history[0]["learning_rate"] == pytest.approx(3e-3) and history[-1]["learning_rate"] < history[0]["learning_rate"]  # linear to 0
    first = sum(m["loss"] for m in history[:4]) / 4
    last = sum(m["loss"] for m in history[-4:]) / 4
    assert last < first - 0.2, (first, last)
    assert [step for step, _ in trainer.eval_history] == [8, 16, 24, 32]
    assert trainer.eval_history[-1][1] >= 0.9

    # accuracy is exactly the share of held-out pairs with r_chosen > r_rejected
    chosen, _ = scores_alone(trainer.model, [p.chosen.ids for p in trainer.eval_pairs])
    rejected, _ = scores_alone(trainer.model, [p.rejected.ids for p in trainer.eval_pairs])
    evaluated = trainer.evaluate()
    assert evaluated["eval/accuracy"] == (chosen > rejected).float().mean().item()
    assert evaluated["eval/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert history[-1]["eval/accuracy"] == trainer.eval_history[-2][1] == evaluated["eval/accuracy"]

    lines = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 33))
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [8, 16, 24, 32]
    assert all(math.isfinite(v) for m in lines for v in m.values())


def test_held_out_split_is_seeded_and_disjoint(tokenizer):
    pairs = encode_pairs(preference_table(30), tokenizer)
    train, held = split_pairs(pairs, 0.1, seed=7)
    assert (len(train), len(held)) == (27, 3)
    assert {id(p) for p in train}.isdisjoint(id(p) for p in held)
    again_train, again_held = split_pairs(pairs, 0.1, seed=7)
    assert [id(p) for p in again_held] == [id(p) for p in held]
    assert split_pairs(pairs, 0.0, seed=7) == (pairs, [])


def test_ties_count_as_wrong(tokenizer, tmp_path):
    model = tiny_reward_model(tokenizer, **TINY)
    torch.nn.init.zeros_(model.score.weight)  # every score 0: every pair a tie
    trainer = RewardTrainer(
        rm_config(tmp_path), tokenizer, model, preference_table(8), eval_dataset=preference_table(6, seed=1)
    )
    metrics = trainer.evaluate()
    assert metrics["eval/accuracy"] == 0.0
    assert metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["eval/margin"] == 0.0


# --- normalisation --------------------------------------------------------------------------

def test_normalize_centres_the_reference_set_and_survives_saving(tokenizer, tmp_path):
    model = tiny_reward_model(tokenizer, seed=2, **TINY)
    torch.nn.init.normal_(model.score.weight, mean=0.3, std=0.3)  # a clearly non-zero mean raw score
    trainer = RewardTrainer(rm_config(tmp_path), tokenizer, model, preference_table(8))
    reference = encode_sequences(
        datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(20, 3)]),
        tokenizer,
    )
    ids = [s.ids for s in reference]
    raw, _ = scores_alone(trainer.model, ids)

    stats = trainer.normalize(reference)
    assert abs(stats["reward_bias"]) > 1e-2
    assert stats["reward_bias"] == pytest.approx(raw.double().mean().item(), abs=1e-6)
    assert stats["normalization/min"] == pytest.approx(raw.min().item(), abs=1e-6)
    assert stats["normalization/max"] == pytest.approx(raw.max().item(), abs=1e-6)
    assert stats["normalization/std"] == pytest.approx(raw.double().std().item(), abs=1e-6)
    centred, _ = scores_alone(trainer.model, ids)
    assert abs(centred.double().mean().item()) < 1e-5
    assert trainer.normalize(reference)["reward_bias"] == pytest.approx(stats["reward_bias"], abs=1e-6)  # idempotent

    target = trainer.save_model(tmp_path / "saved")
    assert json.loads((target / "config.json").read_text())["reward_bias"] == pytest.approx(stats["reward_bias"])
    loaded = AutoModelForSequenceClassification.from_pretrained(target).eval()
    reloaded, _ = scores_alone(loaded, ids)
    torch.testing.assert_close(reloaded, centred, atol=1e-6, rtol=0)


def test_lora_reward_model_trains_adapter_and_head_and_saves_a_plain_normalised_model(tokenizer, tmp_path):
    """With ``peft_config`` the LoRA matrices and the scalar head train, nothing else; the
    merged save (``reward_bias`` included) scores like the adapter model."""
    model = tiny_reward_model(tokenizer, seed=2, **TINY)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    trainer = RewardTrainer(rm_config(tmp_path, peft_config=lora, learning_rate=1e-2), tokenizer, model,
                            preference_table(8))
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trained) and any("score" in n for n in trained)
    assert all("lora_" in n or "score" in n for n in trained)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, start[n])}
    assert moved and moved <= set(trained)
    reference = encode_sequences(
        datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(6, 3)]),
        tokenizer,
    )
    ids = [s.ids for s in reference]
    bias = trainer.normalize(reference)["reward_bias"]
    centred, _ = scores_alone(trainer.model, ids)
    assert abs(bias) > 0 and abs(centred.double().mean().item()) < 1e-5

    target = trainer.save_model(tmp_path / "saved")
    assert json.loads((target / "config.json").read_text())["reward_bias"] == pytest.approx(bias)
    loaded = AutoModelForSequenceClassification.from_pretrained(target).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    reloaded, _ = scores_alone(loaded, ids)
    torch.testing.assert_close(reloaded, centred, atol=1e-5, rtol=0)


# --- the head -------------------------------------------------------------------------------

def test_fresh_head_from_a_causal_lm_checkpoint(tokenizer, tmp_path):
    width = 256
    lm = tiny_causal_lm(tokenizer, seed=0, hidden_size=width, num_layers=1, num_heads=4, intermediate_size=64)
    lm.config.pad_token_id = None
    lm.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    model = load_reward_backbone(str(tmp_path / "lm"))

    assert model.config.num_labels == 1
    assert model.config.pad_token_id == EOS  # unset in the checkpoint: falls back to EOS
    weight = model.score.weight.detach()
    assert weight.shape == (1, width)
    assert weight.std().item() == pytest.approx(1 / math.sqrt(width + 1), rel=0.2)
    assert abs(weight.mean().item()) < 3 / math.sqrt(width + 1) / math.sqrt(width)
    assert model.score.bias is None or torch.count_nonzero(model.score.bias) == 0
    backbone = dict(lm.model.named_parameters())
    for name, value in model.model.named_parameters():
        torch.testing.assert_close(value, backbone[name], atol=0, rtol=0)


def test_existing_reward_head_is_kept(tokenizer, tmp_path):
    reward_model = tiny_reward_model(tokenizer, seed=4, **TINY)
    reward_model.save_pretrained(tmp_path / "rm")
    torch.manual_seed(0)
    loaded = load_reward_backbone(str(tmp_path / "rm"))
    torch.testing.assert_close(loaded.score.weight, reward_model.score.weight, atol=0, rtol=0)


# --- the command ----------------------------------------------------------------------------

@pytest.fixture
def workspace(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tiny_causal_lm(tokenizer, **TINY).save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(40)))
    config = {
        "model_name_or_path": str(tmp_path / "sft"),
        "dataset_name": str(tmp_path / "pairs.jsonl"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 2,
        "learning_rate": 3e-3,
        "device": "cpu",
        "normalize_rewards": True,
    }
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_tether_rm_trains_and_saves_a_loadable_normalised_model(workspace, capsys):
    out = workspace / "out"
    code = main(["rm", "--config", str(workspace / "rm.yaml"), "--output_dir", str(out), "--seed", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "held-out accuracy" in captured.err and str(out) in captured.err

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))  # 2 epochs x floor(36 pairs / 8) full batches
    assert {"eval/accuracy", "eval/loss", "reward_bias", "normalization/std"} <= set(lines[-1])
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    assert model.config.reward_bias == pytest.approx(lines[-1]["reward_bias"])
    # the default reference set is the chosen side of the training pairs (the held-out 10% excluded)
    pairs = encode_pairs(datasets.Dataset.from_list(preference_rows(40)), word_tokenizer(WORDS), 1024)
    train, _ = split_pairs(pairs, 0.1, seed=5)
    scores, _ = scores_alone(model, [p.chosen.ids for p in train])
    assert abs(scores.double().mean().item()) < 1e-5


def test_tether_rm_rejects_a_dataset_without_pairs(workspace, capsys):
    (workspace / "sft.jsonl").write_text(json.dumps({"prompt": "w1", "completion": "w2"}) + "\n")
    code = main(["rm", "--config", str(workspace / "rm.yaml"), "--dataset_name", str(workspace / "sft.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "chosen" in errors[0] and "prompt, completion" in errors[0], err


def test_tether_rm_names_a_missing_field(workspace, capsys):
    code = main(["rm", "--model_name_or_path", str(workspace / "sft"), "--output_dir", str(workspace / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "error: config is missing dataset_name" in err


def test_step_clips_the_gradient_reaching_the_optimizer(tokenizer, tmp_path):
    """The optimizer sees the gradient clipped to ``max_grad_norm`` at every step."""
    limit = 1e-3
    trainer = RewardTrainer(rm_config(tmp_path, max_grad_norm=limit, eval_fraction=0.0), tokenizer,
                            tiny_reward_model(tokenizer, seed=1), preference_table(16))
    norms = gradient_norms_at_each_step(trainer.optimizer)
    history = trainer.train()
    assert len(norms) == len(history) >= 2
    assert norms == pytest.approx([limit] * len(norms), rel=1e-4)
    assert all(metrics["grad_norm"] > 10 * limit for metrics in history)  # logged before clipping, as HF Trainer


def test_logged_grad_norm_is_the_norm_the_optimizer_sees_without_clipping(tokenizer, tmp_path):
    trainer = RewardTrainer(rm_config(tmp_path, max_grad_norm=None, eval_fraction=0.0), tokenizer,
                            tiny_reward_model(tokenizer, seed=1), preference_table(16))
    norms = gradient_norms_at_each_step(trainer.optimizer)
    history = trainer.train()
    assert [metrics["grad_norm"] for metrics in history] == pytest.approx(norms, rel=1e-5)


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_bf16_runs_the_step_matmuls_in_bfloat16(tokenizer, tmp_path, kind):
    from tether.config import SFTConfig
    from tether.trainers.sft import SFTTrainer

    if kind == "rm":
        model = tiny_reward_model(tokenizer, seed=1)
        trainer = RewardTrainer(rm_config(tmp_path, bf16=True), tokenizer, model, preference_table(8))
    else:
        model = tiny_causal_lm(tokenizer, seed=0)
        rows = [{"prompt": f"w{i}", "completion": f"w{i + 1} w{i + 2}"} for i in range(8)]
        config = SFTConfig(output_dir=str(tmp_path), device=DEVICE, bf16=True, per_device_train_batch_size=4)
        trainer = SFTTrainer(config, tokenizer, model, rows)
    dtypes = linear_output_dtypes(trainer.model)
    trainer.advance()  # the first pass also checks, once and in fp32, whether the model packs
    dtypes.clear()
    metrics = trainer.advance()[0]
    assert math.isfinite(metrics["loss"])
    assert dtypes == {torch.bfloat16}
