"""Gradient checkpointing and LoRA on tiny fp32 models (CPU, no network).

* gradient checkpointing really recomputes the layers of the policy and of the value model's
  backbone in backward, and leaves the update unchanged (1e-6);
* LoRA via ``peft_config``: only adapter weights train; the reference is the starting policy
  (the adapter switched off when it starts at zero, a frozen merged copy when it arrives
  trained: ppo-details fix 8); the value model may be a LoRA too; ``save_model`` writes a
  plain merged model equal to the trained policy, or the adapter alone; checkpoints resume;
* on a CPU: slow bf16 is flagged, and freed memory is reused instead of faulted in afresh.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.checkpoint import checkpoints
from tether.errors import ConfigError
from tether.models.forward import last_hidden_state, output_layer_split, policy_logprobs
from tether.models.lora import adapter_starts_at_zero, apply_lora
from tether.trainers.parallel import Parallel
from tests.test_ppo_trainer import (
    PROMPTS,
    make_config,
    make_policy,
    make_tokenizer,
    make_trainer,
    max_change,
    params,
    w5_fraction,
)
from tether.trainers.ppo import PPOTrainer

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- checkpointing


def count_layer_calls(trainer) -> dict[str, int]:
    """Calls of the first decoder layer's attention in the policy and in the value model (a
    pre-hook: the recomputation in backward stops once it has what it needs, before the
    layer's end, so a post-hook would not see it)."""
    counts = {"policy": 0, "value": 0}
    for name, model in (("policy", trainer.policy), ("value", trainer.value_model)):
        attention = model.model.layers[0].self_attn
        attention.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


@pytest.mark.parametrize("reward", ["function", "model"])
def test_gradient_checkpointing_recomputes_and_keeps_the_update(tmp_path, reward):
    """With checkpointing every layer runs twice per training micro-batch (forward, and again
    in backward) in the policy and in the value model's backbone; the weights after one update
    equal those without it to 1e-6."""
    common = dict(reward=reward, learning_rate=1e-3, adam_epsilon=1e-6)
    plain = make_trainer(tmp_path / "plain", **common)
    checkpointed = make_trainer(tmp_path / "ckpt", gradient_checkpointing=True, **common)
    assert checkpointed.policy.is_activation_checkpointing and checkpointed.value_model.is_activation_checkpointing
    assert not plain.policy.is_activation_checkpointing

    rollouts = []
    for trainer in (plain, checkpointed):
        torch.manual_seed(3)  # the same samples
        rollout = trainer.rollout([trainer.prompts[i] for i in trainer.sampler.next_batch()])
        trainer.compute_advantages(rollout)
        rollouts.append(rollout)
    assert torch.equal(rollouts[0].responses, rollouts[1].responses)

    before = params(plain.policy)
    for trainer, rollout in zip((plain, checkpointed), rollouts):
        # a model's first backbone pass checks once whether it may run packed; done here so
        # that the counts below are the update's own
        chunk = (rollout.queries, rollout.query_mask, rollout.responses, rollout.response_mask)
        with torch.no_grad():
            policy_logprobs(trainer.policy, *chunk, trainer.temperature, 64)
    plain_calls, checkpointed_calls = count_layer_calls(plain), count_layer_calls(checkpointed)
    for trainer, rollout in zip((plain, checkpointed), rollouts):
        torch.manual_seed(0)  # the same minibatch permutation
        trainer.optimise(rollout)
    assert plain_calls["policy"] > 0 and plain_calls["value"] > 0
    assert checkpointed_calls == {key: 2 * value for key, value in plain_calls.items()}

    assert max_change(plain.policy, before) > 1e-3
    for plain_model, other in ((plain.policy, checkpointed.policy), (plain.value_model, checkpointed.value_model)):
        other_params = dict(other.named_parameters())
        for name, p in plain_model.named_parameters():
            torch.testing.assert_close(p, other_params[name], atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------- LoRA


def lora_trainer(tmp_path, policy=None, **config):
    tokenizer = make_tokenizer()
    policy = policy if policy is not None else make_policy(tokenizer)
    values = dict(peft_config=LORA, learning_rate=1e-2)
    values.update(config)
    return PPOTrainer(make_config(tmp_path, **values), tokenizer, policy, w5_fraction, list(PROMPTS))


def fixed_batch(trainer):
    rollout = trainer.rollout([trainer.prompts[i] for i in range(8)])
    return rollout.queries, rollout.query_mask, rollout.responses, rollout.response_mask


def starting_logprobs(tmp_path, batch):
    plain = make_policy(make_tokenizer())
    return policy_logprobs(plain, *batch, 1.0 + 1e-7, 1024)[0]


def test_lora_trains_the_adapter_against_the_starting_policy(tmp_path):
    """A fresh adapter: the reference is the base with the adapter off (no copy), only the
    adapter moves, the policy's log-probs change and the reference's equal the starting ones."""
    trainer = lora_trainer(tmp_path)
    assert trainer.ref_policy is None and adapter_starts_at_zero(trainer.policy)
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    batch = fixed_batch(trainer)
    start = starting_logprobs(tmp_path, batch)

    trainer.step()
    trainer.step()
    for name, p in trainer.policy.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name
    assert max((p - lora_before[n]).abs().max().item() for n, p in trainer.policy.named_parameters()
               if n in lora_before) > 1e-3
    with torch.no_grad():
        reference = trainer._reference_logprobs(*batch)
        now = policy_logprobs(trainer.policy, *batch, trainer.temperature, 1024)[0]
    mask = batch[3]
    torch.testing.assert_close(reference[mask], start[mask], atol=1e-5, rtol=0)
    assert (now - start)[mask].abs().max() > 1e-3


def test_trained_adapter_gets_a_frozen_copy_as_reference(tmp_path):
    """Fix 8: a policy whose adapter is already trained is its own starting point; the
    reference equals it (adapter on), not the bare base model."""
    tokenizer = make_tokenizer()
    policy = apply_lora(make_policy(tokenizer), LORA, "CAUSAL_LM")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not adapter_starts_at_zero(policy)
    trainer = lora_trainer(tmp_path, policy=policy)
    assert trainer.ref_policy is not None
    assert not any(p.requires_grad for p in trainer.ref_policy.parameters())
    batch = fixed_batch(trainer)
    with torch.no_grad():
        start = policy_logprobs(trainer.policy, *batch, trainer.temperature, 1024)[0]
        base = starting_logprobs(tmp_path, batch)
    mask = batch[3]
    assert (start - base)[mask].abs().max() > 1e-2  # the trained adapter matters
    trainer.step()
    with torch.no_grad():
        reference = trainer._reference_logprobs(*batch)
    torch.testing.assert_close(reference[mask], start[mask], atol=1e-5, rtol=0)


def test_lora_value_model_and_merged_or_adapter_saving(tmp_path):
    """The value model as a LoRA (its head trained in full); ``save_model`` writes a plain model
    equal to the trained policy (no adapter or value weights inside), or with
    ``save_merged: false`` the adapter alone."""
    trainer = lora_trainer(tmp_path / "run", value_model_peft=True)
    value_trainable = {n for n, p in trainer.value_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in value_trainable) and any("score" in n for n in value_trainable)
    assert all("lora_" in n or "score" in n for n in value_trainable)
    value_before = {n: p.clone() for n, p in trainer.value_model.named_parameters() if p.requires_grad}
    trainer.step()
    assert max((p - value_before[n]).abs().max().item() for n, p in trainer.value_model.named_parameters()
               if n in value_before) > 1e-4

    target = trainer.save_model(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert not any("lora" in n or "score" in n for n, _ in loaded.named_parameters())
    batch = fixed_batch(trainer)
    with torch.no_grad():
        expected = policy_logprobs(trainer.policy, *batch, trainer.temperature, 1024)[0]
        got = policy_logprobs(loaded, *batch, trainer.temperature, 1024)[0]
    torch.testing.assert_close(got[batch[3]], expected[batch[3]], atol=1e-5, rtol=0)
    assert any("lora" in n for n, _ in trainer.policy.named_parameters())  # merging left it as it was

    trainer.config.save_merged = False
    adapter = trainer.save_model(tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(make_policy(make_tokenizer()), adapter)
    with torch.no_grad():
        again = policy_logprobs(reloaded, *batch, trainer.temperature, 1024)[0]
    torch.testing.assert_close(again[batch[3]], expected[batch[3]], atol=1e-5, rtol=0)


def test_lora_resume_gives_the_same_weights(tmp_path):
    """A LoRA run stopped after one update and resumed ends with the same weights as one
    that ran through (the checkpoint holds the adapters)."""
    common = dict(value_model_peft=True, lr_scheduler_type="constant")  # the plan's length may differ
    straight = lora_trainer(tmp_path / "straight", total_episodes=16, **common)
    straight.train()
    first = lora_trainer(tmp_path / "resumed", total_episodes=8, **common)
    first.train()
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["checkpoint-1"]
    resumed = lora_trainer(tmp_path / "resumed", total_episodes=16, extend_run=True, **common)  # a longer run
    resumed.train(resume_from_checkpoint=True)
    for a, b in ((straight.policy, resumed.policy), (straight.value_model, resumed.value_model)):
        other = dict(b.named_parameters())
        for name, p in a.named_parameters():
            assert torch.equal(p, other[name]), name


def test_gpt2_lora_is_silent_about_fan_in_fan_out_and_still_correct():
    """PEFT sets fan_in_fan_out for GPT-2's transposed Conv1D weights itself; its note about it is
    dropped, and the adapter still adds to the layer's output as it must (B set non-zero)."""
    import warnings

    model = make_policy(make_tokenizer(), arch="gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = apply_lora(model, {"r": 4}, "CAUSAL_LM")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    layer = lora.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out is True
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.base_layer.weight.shape[0])
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), expected)


def test_lora_config_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="peft_config"):
        lora_trainer(tmp_path, peft_config={"r": 4, "no_such_field": 1})
    with pytest.raises(ConfigError, match="value_model_peft needs peft_config"):
        make_config(tmp_path, value_model_peft=True).validate()


def test_precision_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        make_config(tmp_path, fp16=True).validate()
    with pytest.raises(ConfigError, match="bf16 and fp16"):
        make_config(tmp_path, fp16=True, bf16=True, device="auto").validate()


def test_gradient_checkpointing_in_sft_and_reward_training_keeps_the_step(tmp_path):
    """SFT and reward-model steps with checkpointing recompute the layers (twice the attention
    calls) and give the weights of the step without it (1e-6)."""
    from tests.test_reward_trainer import preference_table, rm_config
    from tests.test_sft import copy_task
    from tests.test_sft import make_config as sft_config
    from tether.tiny import tiny_reward_model
    from tether.trainers.reward import RewardTrainer
    from tether.trainers.sft import SFTTrainer

    tokenizer = make_tokenizer()
    runs = {}
    for checkpointing in (False, True):
        sft_model = make_policy(tokenizer)
        sft = SFTTrainer(sft_config(tmp_path / f"sft{checkpointing}", gradient_checkpointing=checkpointing,
                                    per_device_train_batch_size=2, gradient_accumulation_steps=2, adam_epsilon=1e-4),
                         tokenizer, sft_model, copy_task(4))
        rm_model = tiny_reward_model(tokenizer, seed=1, hidden_size=32, num_layers=2, num_heads=2)
        rm = RewardTrainer(rm_config(tmp_path / f"rm{checkpointing}", gradient_checkpointing=checkpointing,
                                     per_device_train_batch_size=2, gradient_accumulation_steps=2, eval_fraction=0.0,
                                     adam_epsilon=1e-4), tokenizer, rm_model, preference_table(4))
        # a model's first backbone pass checks once whether it may run packed, and a causal
        # LM's first loss whether its output layer splits off; done here so that the counts
        # below are the step's own
        with torch.no_grad():
            for model in (rm_model, sft_model):
                last_hidden_state(model, torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([[0, 0, 1]]))
            assert output_layer_split(sft_model) is not None
        calls = {"sft": 0, "rm": 0}
        for name, model in (("sft", sft_model), ("rm", rm_model)):
            model.model.layers[0].self_attn.register_forward_pre_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        assert sft_model.is_activation_checkpointing == rm_model.is_activation_checkpointing == checkpointing
        sft.step(sft._next_rows())
        rm.step()
        runs[checkpointing] = (calls, params(sft_model), params(rm_model))
    (plain_calls, *plain), (ckpt_calls, *ckpt) = runs[False], runs[True]
    assert ckpt_calls == {name: 2 * count for name, count in plain_calls.items()} and plain_calls["sft"] == 2
    start = params(make_policy(tokenizer))
    assert max((plain[0][name] - value).abs().max().item() for name, value in start.items()) > 1e-4
    for before, after in zip(plain, ckpt):
        for name, value in before.items():
            torch.testing.assert_close(after[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("native, bf16, device, warned", [
    (False, True, "cpu", True), (True, True, "cpu", False), (False, False, "cpu", False), (False, True, "meta", False),
])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged(monkeypatch, native, bf16, device, warned):
    """bf16 autocast on a CPU without AVX512-BF16/AMX runs several times slower than fp32: one
    warning, only in that case."""
    import tether.trainers.common as common

    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    messages = []
    common.warn_if_bf16_is_slow(bf16, torch.device(device), messages.append)
    assert bool(messages) == warned
    if warned:
        assert "drop bf16" in messages[0] and "\n" not in messages[0]


FAULTS_OF_A_REUSED_BLOCK = """
import resource, torch
from tether.trainers.common import keep_freed_memory_for_reuse
made = keep_freed_memory_for_reuse()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(1 << 24).fill_(1)  # 64 MiB, freed at once
before = faults()
for _ in range(5):  # the same size again, five times: 5 x 16384 pages if each is mapped afresh
    torch.empty(1 << 24).fill_(1)
print(made, faults() - before)
"""


def faults_of_a_reused_block(**variables) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK], capture_output=True, text=True, check=True,
        env={**env, **variables},
    )
    made, faults = result.stdout.split()
    return made == "True", int(faults)


def test_cpu_training_reuses_freed_memory_unless_the_user_set_the_allocator():
    """Freed 64 MiB blocks come back without faulting their pages in again (glibc would map each
    anew; the heap may grow once, as a block of the same size but aligned can be a little too
    big for the freed one); a user's own glibc allocator settings are left to stand, other
    tunables are not."""
    kept = faults_of_a_reused_block()
    unrelated_tunable = faults_of_a_reused_block(GLIBC_TUNABLES="glibc.pthread.rseq=0")
    users = faults_of_a_reused_block(MALLOC_MMAP_MAX_="65536")
    users_tunable = faults_of_a_reused_block(GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
    assert kept[0] and unrelated_tunable[0] and not users[0] and not users_tunable[0]
    for ours, theirs in ((kept, users), (unrelated_tunable, users_tunable)):
        assert ours[1] <= (1 << 24) * 4 // 4096 + 1000 < theirs[1]  # at most one growth of the heap


@pytest.mark.parametrize("device, applied", [("cpu", True), ("meta", False)])
def test_trainers_set_the_allocator_on_cpu_only(monkeypatch, device, applied):
    import tether.trainers.common as common

    calls = []
    monkeypatch.setattr(common, "keep_freed_memory_for_reuse", lambda: calls.append(1))
    monkeypatch.setattr(common, "resolve_device", lambda name: torch.device(name))
    config = types.SimpleNamespace(device=device, bf16=False, full_determinism=False, tf32=None)
    assert common.training_device(config, Parallel(None), lambda message: None) == torch.device(device)
    assert bool(calls) == applied
