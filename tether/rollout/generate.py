"""Sampling responses: a clean generation config, generate, split the response off by hand.

Seed note 1: ``generate`` returns prompt + response as one tensor; the response is taken as
``sequences[:, Q:]`` with ``Q`` the padded query width, so every response starts in the same
column and lines up with the logits that produced it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from tether.models.loading import bare_model


def sampling_temperature(temperature: float) -> float:
    """The temperature generation samples with and every logprob divides by: TRL's ``+ 1e-7``,
    kept so that a TRL config gives the same numbers."""
    return temperature + 1e-7


def sampling_config(
    response_length: int, temperature: float, stop_token_ids: list[int] | None, pad_token_id: int
) -> GenerationConfig:
    """Pure ancestral sampling at ``sampling_temperature(temperature)`` (ppo-details 9): no top-k,
    top-p, repetition penalty, minimum length or suppressed tokens."""
    return GenerationConfig(
        max_new_tokens=response_length,
        min_new_tokens=0,
        do_sample=True,
        temperature=sampling_temperature(temperature),
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
        num_beams=1,
        use_cache=True,
    )


@contextmanager
def isolated_generation_config(model):
    """Hide the model's own ``generation_config`` while generating.

    ``generate`` fills every field our config leaves unset from the model's config (a
    checkpoint's ``top_k=50`` or repetition penalty would leak into rollouts; transformers
    #42762). With a blank config in its place only transformers' global defaults apply, and
    ours overrides those. The model's own config is put back untouched, so it is saved as is.
    """
    model = bare_model(model)  # a PEFT model's generate reads the inner model's config
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


@torch.no_grad()
def generate_responses(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    generation_config: GenerationConfig,
    chunk_size: int,
    pad_token_id: int,
    output_scores: bool = False,
):
    """Sample one response per query, in chunks of ``chunk_size`` rows.

    Returns ``responses [B, T]`` (chunks padded on the right with ``pad_token_id`` to the widest
    one), and with ``output_scores`` also the per-step sampling logits ``[B, T, V]`` (for tests).
    """
    context_length = queries.size(1)
    generation_config = copy.deepcopy(generation_config)
    generation_config.return_dict_in_generate = True
    generation_config.output_scores = output_scores
    responses, scores = [], []
    with isolated_generation_config(model):
        for start in range(0, queries.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            output = model.generate(
                input_ids=queries[rows],
                attention_mask=query_mask[rows].long(),
                generation_config=generation_config,
            )
            responses.append(output.sequences[:, context_length:])
            if output_scores:
                scores.append(torch.stack(output.scores, dim=1))
    width = max(r.size(1) for r in responses)
    responses = torch.cat([_pad_right(r, width, pad_token_id) for r in responses])
    if output_scores:
        return responses, torch.cat([_pad_right(s, width, 0.0) for s in scores])
    return responses


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing == 0:
        return tensor
    shape = (tensor.size(0), missing, *tensor.shape[2:])
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)], dim=1)
