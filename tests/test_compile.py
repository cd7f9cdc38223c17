"""``torch_compile`` (issue 21): the trained models' decoder layers compiled for the training
passes give the eager update to rounding; decoding stays eager; saved models are plain.

Each test pays torch.compile's first compile of a tiny model (tens of seconds on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
from tether.models.compiled import decoder_layers
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer

TOKENIZER = word_tokenizer(numbered_words(16))
ROWS = [{"prompt": f"w{i} w{(3 * i) % 16}", "completion": " ".join(f"w{(i + j) % 16}" for j in range(1 + i % 4))}
        for i in range(16)]


def model(seed=0):
    return tiny_causal_lm(TOKENIZER, seed=seed, arch="llama", hidden_size=32, num_layers=2, num_heads=2)


def params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def compiled(module) -> bool:
    return all(layer._compiled_call_impl is not None for layer in decoder_layers(module))


def test_sft_update_is_the_eager_one_and_the_saved_model_is_plain(tmp_path):
    runs = {}
    for on in (False, True):
        config = SFTConfig(output_dir=str(tmp_path / str(on)), device="cpu", per_device_train_batch_size=4, max_steps=3,
                           learning_rate=1e-2, torch_compile=on, report_to=[], disable_tqdm=True)
        trainer = SFTTrainer(config, TOKENIZER, model(), ROWS)
        assert compiled(trainer.model) is on
        runs[on] = trainer, [m["loss"] for m in trainer.train()]
    (eager, eager_losses), (fast, fast_losses) = runs[False], runs[True]
    assert fast_losses == pytest.approx(eager_losses, abs=1e-5)
    moved = max((params(eager.model)[n] - p).abs().max().item() for n, p in params(model()).items())
    assert moved > 1e-3
    for name, value in params(eager.model).items():
        torch.testing.assert_close(params(fast.model)[name], value, atol=1e-5, rtol=0, msg=name)
    loaded = AutoModelForCausalLM.from_pretrained(fast.save_model(tmp_path / "saved"))
    assert params(loaded).keys() == params(eager.model).keys()  # no _orig_mod in the names


def test_ppo_update_is_the_eager_one_with_decoding_eager(tmp_path):
    runs = {}
    for on in (False, True):
        config = PPOConfig(output_dir=str(tmp_path / str(on)), device="cpu", per_device_train_batch_size=4,
                           total_episodes=8, response_length=4, num_sample_generations=0, learning_rate=1e-3,
                           torch_compile=on, report_to=[], disable_tqdm=True, seed=3)
        trainer = PPOTrainer(config, TOKENIZER, model(), lambda prompts, responses: [0.1 * len(r) for r in responses],
                             [row["prompt"] for row in ROWS])
        assert compiled(trainer.policy) is on and compiled(trainer.value_model) is on
        history = trainer.train()
        runs[on] = trainer, history
    (eager, eager_history), (fast, fast_history) = runs[False], runs[True]
    for before, after in zip(eager_history, fast_history):  # the same samples: decoding ran eagerly
        assert after["val/response_length"] == before["val/response_length"]
        assert after["loss/policy_avg"] == pytest.approx(before["loss/policy_avg"], abs=1e-5)
    for module in ("policy", "value_model"):
        for name, value in params(getattr(eager, module)).items():
            torch.testing.assert_close(params(getattr(fast, module))[name], value, atol=1e-5, rtol=0, msg=name)


def test_compile_settings_are_checked_before_any_model_and_turn_compiling_on():
    from tether.config import load_config
    from tether.errors import ConfigError

    assert load_config(SFTConfig, overrides={"torch_compile_mode": "default"}).torch_compile is True  # as in HF
    with pytest.raises(ConfigError, match="torch_compile_mode 'bogus' is not one of default"):
        load_config(SFTConfig, overrides={"torch_compile": "true", "torch_compile_mode": "bogus"})
    with pytest.raises(ConfigError, match="torch_compile_backend 'bogus' is not one of"):
        load_config(SFTConfig, overrides={"torch_compile_backend": "bogus"})
