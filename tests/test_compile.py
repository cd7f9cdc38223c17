"""``torch_compile`` (issue 21): the models' decoder layers compiled for the training and scoring
passes give the eager update to rounding; the compiled decoding step gives the eager samples;
saved models are plain.

Each test pays torch.compile's first compile of a tiny model (tens of seconds on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
from tether.models.compiled import _holder, decoder_layers
from tether.rollout.generate import generate_responses, sampling_config
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer

TOKENIZER = word_tokenizer(numbered_words(16))
ROWS = [{"prompt": f"w{i} w{(3 * i) % 16}", "completion": " ".join(f"w{(i + j) % 16}" for j in range(1 + i % 4))}
        for i in range(16)]


def model(seed=0):
    return tiny_causal_lm(TOKENIZER, seed=seed, arch="llama", hidden_size=32, num_layers=2, num_heads=2)


def params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def compiled(module, whole: bool = True) -> bool:
    """Whether ``module``'s backbone (``whole``) or else each of its decoder layers is compiled."""
    layers = decoder_layers(module)
    if whole:
        return _holder(module, layers)._compiled_call_impl is not None
    return all(layer._compiled_call_impl is not None for layer in layers)


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


def test_with_activation_checkpointing_each_layer_is_compiled_and_the_update_is_the_eager_one(tmp_path):
    """Checkpointing recomputes each layer in the backward pass, apart: the layers are compiled
    one by one instead of the backbone (as under FSDP and DeepSpeed)."""
    losses = {}
    for on in (False, True):
        config = SFTConfig(output_dir=str(tmp_path / str(on)), device="cpu", per_device_train_batch_size=4, max_steps=2,
                           learning_rate=1e-2, torch_compile=on, gradient_checkpointing=True, report_to=[],
                           disable_tqdm=True)
        trainer = SFTTrainer(config, TOKENIZER, model(), ROWS)
        assert compiled(trainer.model, whole=False) is on and not compiled(trainer.model)
        losses[on] = [m["loss"] for m in trainer.train()]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_ppo_update_and_samples_are_the_eager_ones(tmp_path):
    runs = {}
    for on in (False, True):
        config = PPOConfig(output_dir=str(tmp_path / str(on)), device="cpu", per_device_train_batch_size=4,
                           total_episodes=8, response_length=4, num_sample_generations=0, learning_rate=1e-3,
                           torch_compile=on, report_to=[], disable_tqdm=True, seed=3)
        trainer = PPOTrainer(config, TOKENIZER, model(), lambda prompts, responses: [0.1 * len(r) for r in responses],
                             [row["prompt"] for row in ROWS])
        assert compiled(trainer.policy) is on and compiled(trainer.value_model) is on
        assert compiled(trainer.ref_policy) is on  # frozen, compiled too (the reward is a function)
        history = trainer.train()
        runs[on] = trainer, history
    (eager, eager_history), (fast, fast_history) = runs[False], runs[True]
    for before, after in zip(eager_history, fast_history):  # the same samples from the compiled decoding
        assert after["val/response_length"] == before["val/response_length"]
        assert after["loss/policy_avg"] == pytest.approx(before["loss/policy_avg"], abs=1e-5)
    for module in ("policy", "value_model"):
        for name, value in params(getattr(eager, module)).items():
            torch.testing.assert_close(params(getattr(fast, module))[name], value, atol=1e-5, rtol=0, msg=name)


def test_compiled_decoding_samples_the_eager_tokens_and_logprobs():
    """Two prompt widths and a short last chunk: the static first graph, then the recompile
    with dynamic shapes. The same random stream gives the same tokens; logprobs to rounding."""
    lm = model(seed=1).eval()
    config = sampling_config(6, 0.7, None, TOKENIZER.pad_token_id)
    batches = [TOKENIZER([row["prompt"] for row in ROWS[:5]], return_tensors="pt", padding=True),
               TOKENIZER([row["completion"] for row in ROWS[3:8]], return_tensors="pt", padding=True)]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for encoded in batches:
        samples = {}
        for compile_with in (None, (None, None)):
            torch.manual_seed(7)
            samples[compile_with] = generate_responses(lm, encoded["input_ids"], encoded["attention_mask"], config,
                                                       chunk_size=3, compile_with=compile_with)
        eager, fast = samples[None], samples[(None, None)]
        assert torch.equal(fast.responses, eager.responses)
        torch.testing.assert_close(fast.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the steps did run compiled


def test_compile_settings_are_checked_before_any_model_and_turn_compiling_on():
    from tether.config import load_config
    from tether.errors import ConfigError

    assert load_config(SFTConfig, overrides={"torch_compile_mode": "default"}).torch_compile is True  # as in HF
    with pytest.raises(ConfigError, match="torch_compile_mode 'bogus' is not one of default"):
        load_config(SFTConfig, overrides={"torch_compile": "true", "torch_compile_mode": "bogus"})
    with pytest.raises(ConfigError, match="torch_compile_backend 'bogus' is not one of"):
        load_config(SFTConfig, overrides={"torch_compile_backend": "bogus"})


def test_a_torch_compile_mode_still_applies_with_the_cpu_wrapper():
    """Inductor takes a mode or options: on CPU the mode is turned into its options, beside the
    C++ wrapper; another backend, or a GPU, gets the mode as it is."""
    from tether.models.compiled import _compile_arguments

    cpu = _compile_arguments(None, "max-autotune-no-cudagraphs", on_cpu=True)
    assert cpu["backend"] == "inductor" and "mode" not in cpu
    assert cpu["options"]["max_autotune"] is True and cpu["options"]["cpp_wrapper"] is True
    assert _compile_arguments(None, None, on_cpu=True)["options"] == {"cpp_wrapper": True}
    assert _compile_arguments("aot_eager", "default", on_cpu=True) == {"backend": "aot_eager", "mode": "default"}
    assert _compile_arguments(None, "reduce-overhead", on_cpu=False) == {"backend": "inductor", "mode": "reduce-overhead"}
