"""Packed backbone passes (tether/models/packing.py): the real tokens of a padded batch run as
one row, and the hidden states, logprobs and gradients at real positions are those of the
padded pass; models it does not fit keep the padded pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from tether.models import packing
from tether.models.forward import last_hidden_state, policy_logprobs
from tether.ops import position_ids_from_mask
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

VOCAB = 40


def padded_batch(seed: int = 0):
    """Three rows of width 12: left padding of 5 and 0 columns, right padding of 3 and 4."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[0, :5] = 0
    attention_mask[1, 9:] = 0
    attention_mask[2, :2] = 0
    attention_mask[2, 10:] = 0
    input_ids = input_ids * attention_mask
    return input_ids, attention_mask, position_ids_from_mask(attention_mask)


def plain_hidden_states(backbone, input_ids, attention_mask, position_ids):
    return backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def gqa_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def tiny(arch: str) -> nn.Module:
    if arch == "llama-gqa":
        return gqa_llama().eval()
    return tiny_causal_lm(word_tokenizer(numbered_words(VOCAB - 4)), seed=0, arch=arch).eval()


@pytest.fixture
def packed_calls(monkeypatch):
    """How many times the packed attention ran."""
    calls = []
    real = packing.packed_sdpa_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    packing._register()
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, packing.PACKED_ATTENTION, counting)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-gqa"])
def test_packed_hidden_states_are_the_padded_ones_at_real_positions(arch, packed_calls):
    model = tiny(arch)
    backbone = getattr(model, model.base_model_prefix)
    batch = padded_batch()
    with torch.no_grad():
        expected = plain_hidden_states(backbone, *batch)
        got = packing.backbone_hidden_states(backbone, *batch)
    real = batch[1].bool()
    assert len(packed_calls) > 0  # the packed attention ran
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # padded positions: zeros


def test_packed_logprobs_and_gradients_are_the_padded_ones(monkeypatch, packed_calls):
    """The policy's response logprobs and the gradient of a loss on them, packed against padded."""
    model = tiny("llama").train()
    queries = torch.tensor([[0, 0, 0, 7, 8], [5, 6, 7, 8, 9]])
    query_mask = (queries != 0).long()
    responses = torch.tensor([[11, 12, 2, 0], [13, 14, 15, 16]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    chunk = (queries, query_mask, responses, response_mask)

    def logprobs_and_grads():
        model.zero_grad(set_to_none=True)
        logprobs, _ = policy_logprobs(model, *chunk, 0.7, 3)
        (logprobs * response_mask).sum().backward()
        return logprobs.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    packed_logprobs, packed_grads = logprobs_and_grads()
    assert len(packed_calls) > 0
    monkeypatch.setattr(packing, "MIN_PADDING", 2.0)  # never packed
    packed_calls.clear()
    padded_logprobs, padded_grads = logprobs_and_grads()
    assert packed_calls == []
    real = response_mask.bool()
    torch.testing.assert_close(packed_logprobs[real], padded_logprobs[real], atol=1e-5, rtol=0)
    scale = max(g.abs().max().item() for g in padded_grads.values())
    assert scale > 1e-3
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_a_packed_row_opening_and_ending_with_the_pad_id_draws_no_padding_warning(packed_calls):
    """GPT-2 with pad == EOS: the packed row (real tokens only) starts and ends with EOS, which
    a model handed ids without a mask takes for padding and warns about (issue 17.4)."""
    from tests.probes import transformers_warnings

    model = tiny("gpt2")
    backbone = model.transformer
    backbone.config.pad_token_id = 2
    input_ids = torch.tensor([[0, 2, 7, 8, 2], [9, 10, 11, 2, 0]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with transformers_warnings() as warnings, torch.no_grad():
        packing.backbone_hidden_states(backbone, input_ids, attention_mask, position_ids_from_mask(attention_mask))
        after_packed = list(warnings)
        backbone(input_ids=input_ids[:, 1:4])  # the warning listened for does reach the listener
    assert len(packed_calls) > 0
    assert after_packed == []
    assert len(warnings) == 1 and "attention_mask" in warnings[0]


def test_reward_model_hidden_states_pack(packed_calls):
    model = tiny_reward_model(word_tokenizer(numbered_words(VOCAB - 4)), seed=1).eval()
    batch = padded_batch(1)
    with torch.no_grad():
        got = last_hidden_state(model, *batch)
        expected = plain_hidden_states(model.model, *batch)
    real = batch[1].bool()
    assert len(packed_calls) > 0
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_little_padding_keeps_the_padded_pass(packed_calls):
    """Under ``MIN_PADDING`` of the positions padded, the copies in and out of attention would
    cost more than the padding: the padded pass runs (its padded positions are not zeros)."""
    backbone = tiny("llama").model
    assert packing._packing_supported(backbone)  # its one-time check packs
    packed_calls.clear()
    input_ids, attention_mask, position_ids = padded_batch()
    attention_mask = torch.ones_like(attention_mask)
    attention_mask[0, 0] = 0  # 1 of 36 positions
    position_ids = position_ids_from_mask(attention_mask)
    with torch.no_grad():
        got = packing.backbone_hidden_states(backbone, input_ids, attention_mask, position_ids)
        expected = plain_hidden_states(backbone, input_ids, attention_mask, position_ids)
    assert packed_calls == [] and torch.equal(got, expected)


class LayoutDropping(nn.Module):
    """A backbone that does not pass its keyword arguments on: its attention never sees the
    layout, and the packed sequences would attend to each other."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone
        self.config = backbone.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **ignored):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_models_that_packing_does_not_fit_keep_the_padded_pass():
    """Found out by the one-time check (a model that drops the layout), or by its config
    (sliding-window attention, eager attention); gradient checkpointing also keeps it."""
    batch = padded_batch()

    dropping = LayoutDropping(tiny("llama").model)
    assert not packing._packing_supported(dropping)
    with torch.no_grad():
        got = packing.backbone_hidden_states(dropping, *batch)
        assert torch.equal(got, plain_hidden_states(dropping.inner, *batch))

    windowed = tiny("llama").model
    windowed.config.sliding_window = 4
    assert not packing._packing_supported(windowed)

    eager = tiny("llama")
    eager.set_attn_implementation("eager")
    assert not packing._packing_supported(eager.model)

    checkpointed = tiny("llama")
    checkpointed.gradient_checkpointing_enable()
    assert packing._packing_supported(checkpointed.model) and packing._checkpointed(checkpointed.model)
    with torch.no_grad():
        got = packing.backbone_hidden_states(checkpointed.model, *batch)
        assert torch.equal(got, plain_hidden_states(checkpointed.model, *batch))

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = tiny("llama")  # torch's wrapper, as FSDP's activation checkpointing applies it
    wrapped.model.layers[0] = checkpoint_wrapper(wrapped.model.layers[0])
    assert not packing._checkpointed(tiny("llama").model) and packing._checkpointed(wrapped.model)


def test_a_sliding_window_in_a_sub_config_keeps_the_padded_pass():
    """A multimodal model keeps its text model's windows in a sub-config."""
    from transformers import Gemma3Config

    config = Gemma3Config(text_config=dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8,
    ))
    config._attn_implementation = "sdpa"
    assert not packing._full_sdpa_attention(config)
    config.text_config.sliding_window = None
    config.text_config.layer_types = ["full_attention", "full_attention"]
    assert packing._full_sdpa_attention(config)


def test_the_attention_switch_restores_every_sub_configs_own_setting():
    from transformers import Gemma3Config

    config = Gemma3Config()
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "eager"
    with packing._attention_implementation(config, packing.PACKED_ATTENTION):
        assert config.text_config._attn_implementation == packing.PACKED_ATTENTION
    assert config._attn_implementation == config.text_config._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "eager"
