"""Rollout generation and the forward passes that line model outputs up with response tokens.

What is pinned here (``/work/shared/spec/ppo-details.md`` details 4-10 and 19, seed note 1):

* the rollout samples from exactly ``softmax(logits / (tau + 1e-7))``: a hostile
  ``generation_config`` on the model does not leak in, and the model's own config is left as
  it was (tether decision 7);
* generation stops at any configured stop id and pads the finished rows;
* chunked generation keeps the ``[B, T']`` contract and is reproducible under a seed;
* ``policy_logprobs`` / ``critic_values`` read position ``Q + t - 1`` for response token
  ``t``, do not depend on the amount of left padding (position ids skip it, which matters
  for GPT-2's absolute positions), and agree with generation scores and with ``get_reward``;
* ``disable_dropout`` and ``value_model_from_policy`` prepare models as RLHF needs.

Everything runs in fp32 on tiny models built locally.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tether.models.forward import critic_values, policy_logprobs
from tether.models.loading import disable_dropout, value_model_from_policy
from tether.ops import ended_on_stop, lengths_to_mask, response_lengths, truncate_response
from tether.rollout.generate import generate_responses, sample_tokens, sampling_config
from tether.scoring.reward import get_reward
from tether.tiny import tiny_causal_lm, tiny_config, tiny_reward_model

PAD, BOS, EOS = 0, 1, 2
TINY = dict(hidden_size=32, num_layers=2, num_heads=2)
HOSTILE = dict(
    repetition_penalty=3.0,
    top_k=3,
    top_p=0.5,
    suppress_tokens=[5, 6],
    min_new_tokens=5,
    no_repeat_ngram_size=2,
)


# ---------------------------------------------------------------- helpers


def left_pad(rows: list[list[int]], width: int | None = None, fill: int = PAD):
    """Left-padded ids ``[B, width]`` and their keep-mask."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = True
    return ids, mask


def right_pad(rows: list[list[int]], width: int | None = None, fill: int = PAD):
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def add_left_columns(ids: torch.Tensor, mask: torch.Tensor, count: int, fill: int = PAD):
    """``count`` more masked-out columns on the left, holding ``fill``."""
    extra_ids = torch.full((ids.size(0), count), fill, dtype=ids.dtype)
    extra_mask = torch.zeros((ids.size(0), count), dtype=torch.bool)
    return torch.cat([extra_ids, ids], dim=1), torch.cat([extra_mask, mask], dim=1)


def make_hostile(model) -> dict:
    for key, value in HOSTILE.items():
        setattr(model.generation_config, key, value)
    return model.generation_config.to_dict()


def fixed_distribution_policy(tokenizer, logits: dict[int, float]):
    """A policy whose next-token distribution ignores the context: ``softmax(bias)``.

    The output layer is replaced by a zero-weight ``Linear`` with a bias; ids not in
    ``logits`` get bias 0. Used to make stop tokens frequent and the pad id impossible.
    """
    model = tiny_causal_lm(tokenizer, seed=0, **TINY).eval()
    vocab = model.config.vocab_size
    head = nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, value in logits.items():
            head.bias[token] = value
    model.lm_head = head
    return model


def sample_queries(vocab: int, rows: int, seed: int = 0):
    """Left-padded random word queries of lengths 1..5 (no special ids)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (rows,), generator=generator).tolist()
    return left_pad([torch.randint(4, vocab, (n,), generator=generator).tolist() for n in lengths])


def gathered(logprobs_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logprobs_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- sampling config / leak


def test_sampling_config_is_pure_ancestral_sampling():
    config = sampling_config(response_length=7, temperature=0.7, stop_token_ids=[2, 9], pad_token_id=PAD)
    assert config.max_new_tokens == 7
    assert config.temperature == pytest.approx(0.7 + 1e-7, abs=0, rel=1e-12)
    assert config.stop_token_ids == (2, 9)
    assert config.pad_token_id == PAD
    assert sampling_config(3, 1.0, None, PAD).stop_token_ids == ()


def _small_vocabulary():
    return torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])


def _across_blocks():
    """Mass on both sides of the 256-id block edges, the last id, and unnormalised weights."""
    weights = torch.zeros(1000)
    weights[[3, 255, 256, 511, 512, 999]] = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.5, 2.0])
    return weights


@pytest.mark.parametrize("weights", [_small_vocabulary(), _across_blocks()], ids=["7 ids", "1000 ids"])
def test_inverse_cdf_sampling_draws_from_the_distribution(weights):
    """``sample_tokens`` frequencies match ``weights / sum`` (4 standard errors over 40k draws);
    ids of weight 0 are never drawn."""
    probs = weights / weights.sum()
    torch.manual_seed(0)
    draws = torch.cat([sample_tokens(weights.expand(1000, -1)) for _ in range(40)])
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    frequency = counts / draws.numel()
    standard_error = (probs * (1 - probs) / draws.numel()).sqrt().double()
    assert counts[probs == 0].sum() == 0
    assert ((frequency - probs.double()).abs() <= 4 * standard_error + 1e-12).all(), frequency


def test_inverse_cdf_sampling_handles_a_large_vocabulary_tail():
    """A 128k vocabulary whose mass sits on the last id: float64 sums still reach it."""
    probs = torch.full((4, 128_000), 1e-12)
    probs[:, -1] = 1.0 - 1e-12 * 127_999
    torch.manual_seed(1)
    assert (sample_tokens(probs) == 127_999).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hostile_generation_config_does_not_leak(tokenizer, arch):
    """Scores are plain ``logits / tau_eff``: finite everywhere, and their log-softmax at the
    sampled tokens equals the sampler's logprobs and the forward-pass log-probs at
    ``tau + 1e-7`` (ppo-details 6, 9b, 10). The model's own generation config is untouched."""
    model = tiny_causal_lm(tokenizer, seed=0, arch=arch, **TINY).eval()
    own_config = model.generation_config
    before = make_hostile(model)
    queries, query_mask = sample_queries(model.config.vocab_size, rows=6)
    temperature, length = 0.7, 10
    config = sampling_config(length, temperature, [EOS], PAD)

    torch.manual_seed(0)
    responses, logprobs, scores = generate_responses(model, queries, query_mask, config, 4, output_scores=True)

    assert responses.shape[0] == 6 and responses.shape[1] <= length
    assert scores.shape == (*responses.shape, model.config.vocab_size)
    assert torch.isfinite(scores).all(), "a filtering logits processor (top-k/top-p/suppress/min-length) leaked in"

    lengths = response_lengths(responses, [EOS])
    mask = lengths_to_mask(lengths, responses.size(1))
    from_scores = gathered(torch.log_softmax(scores.float(), dim=-1), responses)
    with torch.no_grad():
        from_forward, _ = policy_logprobs(model, queries, query_mask, responses, mask, temperature + 1e-7, 5)
    assert torch.allclose(from_scores[mask], from_forward[mask], atol=1e-5, rtol=0)
    assert torch.allclose(logprobs[mask], from_forward[mask], atol=1e-5, rtol=0)
    assert (logprobs[~mask] == 0).all()
    assert model.generation_config is own_config
    assert model.generation_config.to_dict() == before


def test_hostile_generation_config_changes_nothing(tokenizer):
    """Same seed, same samples whether the model's generation config asks for top-k 3,
    top-p 0.5, a repetition penalty and suppressed tokens or for nothing at all."""
    clean = tiny_causal_lm(tokenizer, seed=0, **TINY).eval()
    hostile = copy.deepcopy(clean)
    make_hostile(hostile)
    queries, query_mask = sample_queries(clean.config.vocab_size, rows=8)
    config = sampling_config(12, 1.0, [EOS], PAD)
    outputs = []
    for model in (clean, hostile):
        torch.manual_seed(7)
        outputs.append(generate_responses(model, queries, query_mask, config, 8))
    assert torch.equal(outputs[0].responses, outputs[1].responses)
    assert torch.equal(outputs[0].logprobs, outputs[1].logprobs)
    # the hostile settings would have mattered: suppressed ids 5 and 6 do get sampled here
    assert torch.isin(outputs[0].responses, torch.tensor([5, 6])).any()


# ---------------------------------------------------------------- stop tokens


STOP_BIASED = {PAD: -30.0, EOS: math.log(4.0), 9: math.log(4.0)}


@pytest.mark.parametrize("stops", [[EOS], [EOS, 9]])
def test_generation_stops_at_any_stop_id_and_pads_the_rest(tokenizer, stops):
    model = fixed_distribution_policy(tokenizer, STOP_BIASED)  # the pad id is never sampled
    length = 10
    queries, query_mask = sample_queries(model.config.vocab_size, rows=24, seed=1)
    torch.manual_seed(0)
    responses = generate_responses(model, queries, query_mask, sampling_config(length, 1.0, stops, PAD), 24).responses
    assert responses.shape[0] == 24 and responses.shape[1] <= length

    lengths = response_lengths(responses, stops)
    mask = lengths_to_mask(lengths, responses.size(1))
    terminated = ended_on_stop(responses, lengths, stops)
    stop_ids = torch.tensor(stops)
    assert torch.equal(mask.sum(1), lengths)
    # kept tokens are real (pad is never sampled here), everything after the first stop is pad
    assert torch.equal(mask, responses != PAD)
    assert (responses[~mask] == PAD).all()
    for row, n, ended in zip(responses, lengths.tolist(), terminated.tolist()):
        is_stop = torch.isin(row[:n], stop_ids)
        assert not is_stop[:-1].any(), "a stop token inside the kept part"
        assert bool(is_stop[-1]) == ended
        if not ended:
            assert n == length
    # each configured stop id really terminates some row
    last = responses.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)[terminated]
    for stop in stops:
        assert (last == stop).any(), f"no row ended on stop id {stop}"
    if len(stops) == 1:
        assert (~terminated).any(), "no row hit the length limit; the unterminated branch went untested"


def test_no_stop_ids_samples_the_full_length_through_eos(tokenizer):
    """``stop_token_ids=None``: fixed-length sampling, EOS is an ordinary token (detail 9a);
    the model's own ``eos_token_id`` does not stop generation."""
    model = fixed_distribution_policy(tokenizer, STOP_BIASED)
    assert model.generation_config.eos_token_id == EOS
    queries, query_mask = sample_queries(model.config.vocab_size, rows=16, seed=2)
    torch.manual_seed(0)
    responses = generate_responses(model, queries, query_mask, sampling_config(10, 1.0, None, PAD), 16).responses
    assert responses.shape == (16, 10)
    assert (responses != PAD).all()
    eos_before_end = (responses[:, :-1] == EOS).any(dim=1)
    assert eos_before_end.any(), "EOS was never sampled before the last column; the check is vacuous"
    assert torch.equal(response_lengths(responses, None), torch.full((16,), 10))


# ---------------------------------------------------------------- chunked generation


@pytest.mark.parametrize("chunk", [1, 2, 6])
def test_chunked_generation_shape_contract(tokenizer, chunk):
    model = fixed_distribution_policy(tokenizer, {PAD: -30.0, EOS: math.log(3.0)})
    rows, length = 6, 9
    queries, query_mask = sample_queries(model.config.vocab_size, rows=rows, seed=3)
    torch.manual_seed(0)
    responses, logprobs, scores = generate_responses(
        model, queries, query_mask, sampling_config(length, 1.0, [EOS], PAD), chunk, output_scores=True
    )
    width = responses.size(1)
    assert responses.dtype == torch.long
    assert responses.shape == (rows, width) and 1 <= width <= length
    assert scores.shape == (rows, width, model.config.vocab_size)
    assert torch.isfinite(scores).all()
    lengths = response_lengths(responses, [EOS])
    mask = lengths_to_mask(lengths, width)
    assert (responses[~mask] == PAD).all()  # chunks padded on the right with the pad id
    if chunk < rows:
        # a chunk narrower than the widest one is padded with pad ids / zero scores
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            chunk_width = int(lengths[part].max())
            assert (responses[part, chunk_width:] == PAD).all()
            assert (scores[part, chunk_width:] == 0).all()


def test_chunked_generation_logprobs_match_forward(tokenizer, policy):
    """Chunks of 2 with ragged stops: generation log-probs still equal forward log-probs on
    kept tokens (detail 10: old log-probs may come from generation scores)."""
    queries, query_mask = sample_queries(policy.config.vocab_size, rows=5, seed=4)
    torch.manual_seed(3)
    responses, logprobs, scores = generate_responses(
        policy, queries, query_mask, sampling_config(12, 1.3, [EOS, 7], PAD), 2, output_scores=True
    )
    mask = lengths_to_mask(response_lengths(responses, [EOS, 7]), responses.size(1))
    from_scores = gathered(torch.log_softmax(scores, dim=-1), responses)
    with torch.no_grad():
        from_forward, _ = policy_logprobs(policy, queries, query_mask, responses, mask, 1.3 + 1e-7, 3)
    assert torch.allclose(from_scores[mask], from_forward[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_decoding_output_layer_equals_the_linear_layer_on_both_paths(monkeypatch, bias):
    """The decoding loop's output layer (oneDNN-packed weight where available, else W @ h^T)
    gives ``head(h)`` to fp32 rounding, and a failed kernel check falls back to the plain product."""
    import tether.rollout.generate as generate

    torch.manual_seed(0)
    head = nn.Linear(24, 300, bias=bias)
    hidden = torch.randn(5, 24)
    expected = head(hidden).detach()
    with torch.no_grad():
        layer = generate._OutputLayer(head, rows=5)
        if torch.backends.mkldnn.is_available():
            assert layer.packed is not None  # the CPU fp32 path this machine should take
        torch.testing.assert_close(layer(hidden), expected, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the model's own product
            assert generate._OutputLayer(head, rows=5).packed is None
        monkeypatch.setattr(generate, "_onednn_matches_matmul", lambda: False)
        plain = generate._OutputLayer(head, rows=5)
        assert plain.packed is None
        torch.testing.assert_close(plain(hidden), expected, rtol=1e-5, atol=1e-5)


def test_decoding_cache_hands_attention_only_the_written_positions(policy):
    """The preallocated cache returns the keys and values written so far (not its whole length),
    and the next-token logits it gives equal those of a forward pass over the whole prefix."""
    from tether.rollout.generate import _kv_cache

    queries, query_mask = sample_queries(policy.config.vocab_size, rows=3, seed=2)
    prefix = queries.size(1)
    cache, whole = _kv_cache(policy, prefix + 4, whole=False)
    assert not whole
    assert len(cache.layers) == policy.config.num_hidden_layers
    attention_mask = query_mask.long()
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        policy(input_ids=queries, attention_mask=attention_mask, position_ids=positions, use_cache=True, cache=cache)
        assert [layer.filled for layer in cache.layers] == [prefix] * len(cache.layers)
        token = torch.full((3, 1), 7)
        attention_mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step = policy(
            input_ids=token, attention_mask=attention_mask, position_ids=positions[:, -1:] + 1,
            use_cache=True, cache=cache,
        ).logits[:, -1]
        layer = cache.layers[0]
        keys, _ = layer.update(torch.zeros_like(layer.keys[:, :, :1]), torch.zeros_like(layer.values[:, :, :1]))
        assert keys.size(2) == prefix + 2  # the one written by the step above, and this one
        whole = policy(
            input_ids=torch.cat([queries, token], dim=1), attention_mask=attention_mask,
            position_ids=torch.cat([positions, positions[:, -1:] + 1], dim=1),
        ).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 6])
def test_generation_is_deterministic_under_a_seed(tokenizer, policy, chunk):
    queries, query_mask = sample_queries(policy.config.vocab_size, rows=6, seed=5)
    config = sampling_config(8, 1.0, [EOS], PAD)
    outputs = []
    for _ in range(2):
        torch.manual_seed(1234)
        outputs.append(generate_responses(policy, queries, query_mask, config, chunk, output_scores=True))
    for first, second in zip(outputs[0], outputs[1]):
        assert torch.equal(first, second)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_whole_length_cache_layout_samples_the_same_tokens(tokenizer, arch):
    """The layout a CUDA graph decodes with (attention over the whole preallocated cache, the
    unwritten positions masked) samples the same tokens under a seed as the default layout
    (attention over the written positions only), with the same logprobs to fp32 rounding."""
    from tether.rollout.generate import _kv_cache

    model = tiny_causal_lm(tokenizer, seed=0, arch=arch, **TINY).eval()
    assert _kv_cache(model, 8, whole=True)[1]  # this architecture takes the whole-length layout
    queries, query_mask = sample_queries(model.config.vocab_size, rows=6, seed=8)
    config = sampling_config(10, 1.0, [EOS], PAD)
    outputs = []
    for whole in (False, True):
        torch.manual_seed(99)
        outputs.append(generate_responses(model, queries, query_mask, config, 4, output_scores=True, whole_cache=whole))
    (tokens, logprobs, scores), (tokens_whole, logprobs_whole, scores_whole) = outputs
    assert torch.equal(tokens, tokens_whole)
    assert (tokens[:, 0] != PAD).all() and tokens.size(1) > 1
    torch.testing.assert_close(logprobs_whole, logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores_whole, scores, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- forward passes


def forward_batch():
    """Three left-padded queries and right-padded responses of different lengths."""
    queries, query_mask = left_pad([[4, 5, 6], [7, 8, 9, 10, 11], [12]])
    responses, response_mask = right_pad([[13, 14, EOS], [15, 16, 17, 18, 19, 20], [21, EOS]])
    return queries, query_mask, responses, response_mask


def _model_logprobs(model, queries, query_mask, responses, response_mask, temperature):
    """Reference: log_softmax of the model's own full logits at the response positions."""
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    positions = (mask.long().cumsum(1) - mask.long()).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
    logits = logits[:, queries.size(1) - 1 : -1] / temperature
    return gathered(torch.log_softmax(logits.float(), dim=-1), responses)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_output_layer_path_equals_the_models_logits(tokenizer, arch):
    """``policy_logprobs`` runs the output layer itself, in chunks; logprobs and parameter
    gradients equal those through the model's own logits (fp32, 1e-5)."""
    from tether.models.forward import output_layer_split

    policy = tiny_causal_lm(tokenizer, seed=0, arch=arch, **TINY).eval()
    assert output_layer_split(policy) is not None
    batch = forward_batch()
    mask = batch[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    gradients = []
    for fused in (True, False):
        policy.zero_grad()
        if fused:
            logprobs, _ = policy_logprobs(policy, *batch, 0.7, 2)
        else:
            logprobs = _model_logprobs(policy, *batch, 0.7)
        (logprobs * weights).sum().backward()
        gradients.append((logprobs.detach(), [p.grad.clone() for p in policy.parameters()]))
    (fused_lp, fused_grads), (plain_lp, plain_grads) = gradients
    assert torch.allclose(fused_lp[mask], plain_lp[mask], atol=1e-5, rtol=0)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused_grad, plain_grad, atol=1e-5, rtol=1e-4)


def test_the_output_layer_runs_on_the_kept_response_tokens_only(monkeypatch, tokenizer):
    """Responses that stop early cost the output layer nothing after their stop: it sees the
    kept tokens alone, and the positions after a stop come back as zeros (logprob and entropy)."""
    import tether.models.forward as forward

    seen_rows, head_logprobs = [], forward.head_logprobs

    def counting(hidden, *args, **kwargs):
        seen_rows.append(hidden.shape[:2].numel())
        return head_logprobs(hidden, *args, **kwargs)

    monkeypatch.setattr(forward, "head_logprobs", counting)
    policy = tiny_causal_lm(tokenizer, seed=0, **TINY).eval()
    batch = forward_batch()
    mask = batch[3]
    with torch.no_grad():
        logprobs, entropy = policy_logprobs(policy, *batch, 0.7, 4, with_entropy=True)
        whole, whole_entropy = policy_logprobs(policy, *batch[:3], torch.ones_like(mask), 0.7, 4, with_entropy=True)
    assert seen_rows == [int(mask.sum()), mask.numel()]
    torch.testing.assert_close(logprobs[mask], whole[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy[mask], whole_entropy[mask], atol=1e-6, rtol=0)
    assert not logprobs[~mask].any() and not entropy[~mask].any()


def test_a_lora_policy_takes_the_chunked_path_with_its_adapter_on_and_off(tokenizer):
    """A PEFT policy splits like the model inside it: its logprobs (adapter on, and off as the
    reference) and its LoRA gradients equal those through its own logits. An adapter on the
    output layer leaves no plain output layer: that policy keeps its own forward pass."""
    from peft import LoraConfig, get_peft_model

    from tether.models.forward import output_layer_split

    def lora_policy(target_modules):
        policy = get_peft_model(
            tiny_causal_lm(tokenizer, seed=0, **TINY), LoraConfig(r=4, lora_alpha=8, target_modules=target_modules)
        )
        with torch.no_grad():  # a trained adapter: B away from its zero start
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        return policy.eval()

    policy = lora_policy(["q_proj", "v_proj"])
    assert output_layer_split(policy) is not None
    batch, mask = forward_batch(), forward_batch()[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    results = []
    for split in (True, False):
        policy.zero_grad()
        logprobs = policy_logprobs(policy, *batch, 0.7, 2)[0] if split else _model_logprobs(policy, *batch, 0.7)
        (logprobs * weights).sum().backward()
        with torch.no_grad(), policy.disable_adapter():
            reference = policy_logprobs(policy, *batch, 0.7, 2)[0] if split else _model_logprobs(policy, *batch, 0.7)
        grads = [p.grad.clone() for p in policy.parameters() if p.requires_grad]
        results.append((logprobs.detach(), reference, grads))
    (split_lp, split_ref, split_grads), (plain_lp, plain_ref, plain_grads) = results
    assert torch.allclose(split_lp[mask], plain_lp[mask], atol=1e-5, rtol=0)
    assert torch.allclose(split_ref[mask], plain_ref[mask], atol=1e-5, rtol=0)
    assert (split_lp[mask] - split_ref[mask]).abs().max() > 1e-3  # the adapter counts, and switches off
    assert len(split_grads) == 8 and all(g.abs().max() > 0 for g in split_grads)
    for split_grad, plain_grad in zip(split_grads, plain_grads):
        torch.testing.assert_close(split_grad, plain_grad, atol=1e-5, rtol=1e-4)
    assert output_layer_split(lora_policy(["q_proj", "lm_head"])) is None


def test_models_that_rescale_their_logits_keep_their_own_forward(tokenizer):
    """A model whose logits are not just output_layer(hidden) (here: doubled, like a logit
    scale) fails the check, and its logprobs still come from its real logits."""
    from tether.models.forward import output_layer_split

    class Scaled(type(tiny_causal_lm(tokenizer, seed=0, **TINY))):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = 2 * output.logits
            return output

    base = tiny_causal_lm(tokenizer, seed=0, **TINY)
    scaled = Scaled(base.config)
    scaled.load_state_dict(base.state_dict())
    scaled.eval()
    assert output_layer_split(scaled) is None
    with torch.no_grad():
        logprobs, _ = policy_logprobs(scaled, *forward_batch(), 0.7, 4)
        expected = _model_logprobs(scaled, *forward_batch(), 0.7)
    mask = forward_batch()[3]
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5, rtol=0)
    hooked = tiny_causal_lm(tokenizer, seed=0, **TINY)
    hooked.lm_head.register_forward_hook(lambda module, inputs, output: output * 2)
    assert output_layer_split(hooked) is None
    # a ZeRO-3 partitioned model (DeepSpeed marks its parameters with ds_id): the output
    # layer's weight is whole only inside the layer's own forward
    partitioned = tiny_causal_lm(tokenizer, seed=0, **TINY)
    partitioned.lm_head.weight.ds_id = 7
    assert output_layer_split(partitioned) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_and_values_ignore_left_padding(tokenizer, arch):
    """5 extra left pad columns, or garbage ids under the mask, change nothing on kept
    tokens: position ids skip padding (ppo-details 4) and masks, not ids, decide (detail 1c)."""
    policy = tiny_causal_lm(tokenizer, seed=0, arch=arch, **TINY).eval()
    critic = tiny_reward_model(tokenizer, seed=1, arch=arch, **TINY).eval()
    queries, query_mask, responses, response_mask = forward_batch()
    more_q, more_qm = add_left_columns(queries, query_mask, 5)
    garbage_q = torch.where(more_qm, more_q, torch.full_like(more_q, 17))
    garbage_r = torch.where(response_mask, responses, torch.full_like(responses, 11))

    with torch.no_grad():
        base_lp, _ = policy_logprobs(policy, queries, query_mask, responses, response_mask, 0.7, 4)
        base_v = critic_values(critic, queries, query_mask, responses, response_mask)
        for q, qm, r in [(more_q, more_qm, responses), (garbage_q, more_qm, garbage_r)]:
            lp, _ = policy_logprobs(policy, q, qm, r, response_mask, 0.7, 4)
            v = critic_values(critic, q, qm, r, response_mask)
            assert lp.shape == responses.shape and v.shape == responses.shape
            assert torch.allclose(lp[response_mask], base_lp[response_mask], atol=1e-5, rtol=0)
            assert torch.allclose(v[response_mask], base_v[response_mask], atol=1e-5, rtol=0)


def test_gpt2_without_position_ids_depends_on_left_padding(tokenizer):
    """Control for the test above: GPT-2 called with only ids and attention mask gives
    different outputs once padding moves the absolute positions, so the invariance above is
    due to the position ids tether passes."""
    model = tiny_causal_lm(tokenizer, seed=0, arch="gpt2", **TINY).eval()
    queries, query_mask, responses, response_mask = forward_batch()
    more_q, more_qm = add_left_columns(queries, query_mask, 5)
    width = responses.size(1)

    def naive(q, qm):
        ids = torch.cat([q, responses], dim=1)
        mask = torch.cat([qm, response_mask], dim=1).long()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -(width + 1) : -1]
        return gathered(torch.log_softmax(logits / 0.7, dim=-1), responses)

    with torch.no_grad():
        difference = (naive(queries, query_mask) - naive(more_q, more_qm))[response_mask].abs().max()
    assert difference > 1e-3


def test_policy_logprobs_alignment_by_hand(policy):
    """Token ``t`` is scored by ``log_softmax(logits[Q + t - 1] / tau)`` of the unpadded
    sequence (ppo-details 5)."""
    query = torch.tensor([4, 9, 5, 11])
    response = torch.tensor([13, 6, 6, 20, EOS])
    q_len, temperature = query.numel(), 0.6
    with torch.no_grad():
        logits = policy(input_ids=torch.cat([query, response])[None]).logits[0]
        expected = torch.stack(
            [torch.log_softmax(logits[q_len + t - 1] / temperature, dim=-1)[tok] for t, tok in enumerate(response)]
        )
        probs = torch.softmax(logits[q_len - 1 : -1] / temperature, dim=-1)
        expected_entropy = -(probs * probs.log()).sum(-1)
        ones_q = torch.ones(1, q_len, dtype=torch.bool)
        ones_r = torch.ones(1, response.numel(), dtype=torch.bool)
        for chunk in (1, 3, 100):
            logprobs, entropy = policy_logprobs(
                policy, query[None], ones_q, response[None], ones_r, temperature, chunk, with_entropy=True
            )
            assert torch.allclose(logprobs[0], expected, atol=1e-5, rtol=0)
            assert torch.allclose(entropy[0], expected_entropy, atol=1e-5, rtol=0)
        no_entropy = policy_logprobs(policy, query[None], ones_q, response[None], ones_r, temperature, 4)[1]
    assert no_entropy is None


def test_responses_of_width_zero_give_empty_outputs(policy, reward_model):
    """The passes leave the last response column out of their input; with no response
    columns at all there is nothing to score (not the prompt's outputs, nor all logits)."""
    queries, query_mask = left_pad([[4, 5, 6], [7, 8]])
    responses, response_mask = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool)
    with torch.no_grad():
        logprobs, entropy = policy_logprobs(policy, queries, query_mask, responses, response_mask, 0.7, 8, True)
        values = critic_values(reward_model, queries, query_mask, responses, response_mask)
    assert logprobs.shape == entropy.shape == values.shape == (2, 0)


def test_critic_values_at_step_0_equal_reward_model_per_token(reward_model):
    """A value model copied from the RM: ``values[:, t]`` equals the RM's per-token output at
    absolute position ``Q + t - 1`` for every kept token and the slot right after the last
    one (ppo-details 19), whether or not the critic sees the tail after the stop."""
    value_model = copy.deepcopy(reward_model)
    queries, query_mask = left_pad([[4, 5, 6], [7, 8, 9, 10, 11], [12]])
    responses = torch.tensor([[13, 14, EOS, 15, 16, 17], [15, 16, 17, 18, 19, 20], [21, EOS, 5, EOS, 6, 7]])
    lengths = response_lengths(responses, [EOS])
    response_mask = lengths_to_mask(lengths, responses.size(1))
    postprocessed = truncate_response(EOS, PAD, responses)
    q_len, width = queries.size(1), responses.size(1)
    with torch.no_grad():
        per_token, _, _ = get_reward(
            reward_model,
            torch.cat([queries, postprocessed], dim=1),
            PAD,
            q_len,
            torch.cat([query_mask, response_mask], dim=1),
        )
        masked_values = critic_values(value_model, queries, query_mask, responses, response_mask)
        full_values = critic_values(value_model, queries, query_mask, responses, torch.ones_like(response_mask))
    for b in range(responses.size(0)):
        for t in range(min(int(lengths[b]) + 1, width)):
            expected = per_token[b, q_len + t - 1, 0]
            assert masked_values[b, t] == pytest.approx(float(expected), abs=1e-5)
            assert full_values[b, t] == pytest.approx(float(expected), abs=1e-5)


def test_critic_values_match_a_normalised_reward_model(reward_model):
    reward_model.config.reward_bias = 0.7
    value_model = copy.deepcopy(reward_model)
    queries, query_mask = left_pad([[4, 5, 6], [7, 8]])
    responses, response_mask = right_pad([[13, EOS], [15, 16, 17]])
    with torch.no_grad():
        per_token, _, _ = get_reward(
            reward_model,
            torch.cat([queries, responses], dim=1),
            PAD,
            queries.size(1),
            torch.cat([query_mask, response_mask], dim=1),
        )
        values = critic_values(value_model, queries, query_mask, responses, response_mask)
    expected = per_token[:, queries.size(1) - 1 : -1, 0]
    assert torch.allclose(values[response_mask], expected[response_mask], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- model preparation


def dropout_model(tokenizer, arch: str, kind: str):
    config = tiny_config(tokenizer, arch=arch, **TINY)
    if arch == "gpt2":
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.5
    else:  # Llama has no dropout modules; its attention dropout is a float from the config
        config.attention_dropout = 0.5
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    return auto.from_config(config).train()


def two_outputs(model):
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


DROPOUT_CASES = [
    ("gpt2", "lm"),
    ("gpt2", "scalar"),
    ("llama", "lm"),
    ("llama", "scalar"),
]


@pytest.mark.parametrize("arch,kind", DROPOUT_CASES)
def test_dropout_is_active_before_disable_dropout(tokenizer, arch, kind):
    first, second = two_outputs(dropout_model(tokenizer, arch, kind))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("arch,kind", DROPOUT_CASES)
def test_disable_dropout_makes_train_mode_deterministic(tokenizer, arch, kind):
    model = dropout_model(tokenizer, arch, kind)
    disable_dropout(model)
    assert model.training
    first, second = two_outputs(model)
    assert torch.equal(first, second)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_value_model_from_policy(tokenizer, arch):
    policy = tiny_causal_lm(tokenizer, seed=0, arch=arch, **TINY).eval()
    policy_state = {k: v.clone() for k, v in policy.state_dict().items()}
    value_model = value_model_from_policy(policy).eval()

    assert value_model.config.num_labels == 1
    assert next(value_model.parameters()).dtype == torch.float32
    head = value_model.score
    assert (head.weight == 0).all()
    assert head.bias is None or (head.bias == 0).all()

    backbone = getattr(policy, policy.base_model_prefix).state_dict()
    value_backbone = getattr(value_model, value_model.base_model_prefix).state_dict()
    assert backbone.keys() == value_backbone.keys()
    for key in backbone:
        assert torch.equal(backbone[key], value_backbone[key]), key
        assert backbone[key].data_ptr() != value_backbone[key].data_ptr(), f"{key} shares storage with the policy"

    queries, query_mask, responses, response_mask = forward_batch()
    with torch.no_grad():
        values = critic_values(value_model, queries, query_mask, responses, response_mask)
    assert values.shape == responses.shape
    assert (values == 0).all()

    # training the value model cannot move the policy
    with torch.no_grad():
        for parameter in value_model.parameters():
            parameter.add_(1.0)
    for key, value in policy.state_dict().items():
        assert torch.equal(value, policy_state[key]), key
