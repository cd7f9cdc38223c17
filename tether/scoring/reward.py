"""Scores for finished responses from a reward model, read at the terminating token (reward
functions: ``scoring/functions.py``).

Seed note 3: the reward model sees the *postprocessed* query_response (cut after the first
stop token, the rest padded and masked), so tokens after the stop cannot move the score.
"""

from __future__ import annotations

import torch

from tether.data.prompts import is_chat
from tether.data.sequences import encode_prompt_completions
from tether.models.forward import Critic, last_hidden_state, scalar_outputs
from tether.models.loading import bare_model
from tether.ops import first_true_indices, position_ids_from_mask


def get_reward(
    model,
    query_responses: torch.Tensor,
    pad_token_id: int,
    context_length: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a scalar-head model over ``query_responses`` ``[B, L]``.

    Returns ``(per_token_outputs [B, L, 1], final_scores [B], sequence_lengths [B])``, where
    ``sequence_lengths`` is the absolute index of the last real token of each response and the
    final score is the output there. Real tokens are those that are not ``pad_token_id``, or
    those where ``attention_mask`` is 1 when given (needed when the pad id is also a real
    token, e.g. pad == EOS). Only the response region (from ``context_length``) is searched
    for the end, so left padding in the query cannot confuse it.
    """
    if attention_mask is None:
        attention_mask = query_responses != pad_token_id
    attention_mask = attention_mask.bool()
    position_ids = position_ids_from_mask(attention_mask)
    input_ids = query_responses.masked_fill(~attention_mask, 0)
    if isinstance(bare_model(model), Critic):  # through the DDP / FSDP wrapper that must see it
        outputs = model(input_ids, attention_mask.long(), position_ids)  # [B, L, 1]
    else:
        outputs = scalar_outputs(model, last_hidden_state(model, input_ids, attention_mask.long(), position_ids))
    sequence_lengths = first_true_indices(~attention_mask[:, context_length:]) - 1 + context_length
    rows = torch.arange(outputs.size(0), device=outputs.device)
    return outputs, outputs[rows, sequence_lengths].squeeze(-1), sequence_lengths


# --- reward models with a tokenizer of their own --------------------------------------------

PROBE_TEXT = "Tether checks tokenizers: the quick brown fox, 42 times!"


def same_tokenization(tokenizer, other) -> bool:
    """Whether ``other`` (a reward model's tokenizer; None: none of its own) makes the same ids
    of the same text as ``tokenizer``: vocabulary, special tokens added, chat template."""
    if other is None or other is tokenizer:
        return True
    return (
        tokenizer.get_vocab() == other.get_vocab()
        and tokenizer(PROBE_TEXT)["input_ids"] == other(PROBE_TEXT)["input_ids"]
        and sorted(tokenizer.all_special_ids) == sorted(other.all_special_ids)
        and getattr(tokenizer, "chat_template", None) == getattr(other, "chat_template", None)
    )


def reward_model_sequences(reward_tokenizer, prompts: list, responses: list[str], terminated: list[bool]) -> list[list[int]]:
    """The ids a reward model with its own tokenizer scores: each prompt (text or chat messages,
    as the dataset held it) and response text, encoded by that tokenizer as ``tether rm``
    encodes a prompt + completion row (after a chat, the response as the assistant's message,
    through the chat template); the EOS that ends a completion stays only where the response
    ended on a stop token (elsewhere the score is read at its last token, as with the policy's
    own ids)."""
    completions = [
        [{"role": "assistant", "content": response}] if is_chat(prompt) else response
        for prompt, response in zip(prompts, responses)
    ]
    sequences = encode_prompt_completions(list(prompts), completions, reward_tokenizer, "response")
    return [sequence.ids if ended else sequence.ids[:-1] for sequence, ended in zip(sequences, terminated)]


def apply_missing_stop_penalty(scores: torch.Tensor, terminated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response that did not end on a stop token."""
    if penalty is None:
        return scores
    return torch.where(terminated, scores, scores - penalty)
