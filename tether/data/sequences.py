"""Supervised sequences for SFT and reward-model training: prompt + completion, right-padded.

A completion ends with EOS (appended when missing; only ``max_length`` can cut it off), so the
model learns to stop and the reward model reads its score at the EOS (ppo-details 3); an empty
completion is EOS alone. Rows come in three shapes:

* ``prompt`` + ``completion`` columns (text, or chat messages: the prompt rendered with the
  generation prompt, the completion as what the full conversation adds after it);
* a ``messages`` column: a conversation whose last message is the completion;
* a ``text`` column: one text, all of it completion (no prompt).

Preference pairs use ``chosen`` / ``rejected`` with an optional shared ``prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether.data.prompts import _clean_chat, _encode_values, _one_line
from tether.errors import DataError


@dataclass
class Sequence:
    """Token ids of one example: ``prompt_ids`` then ``completion_ids`` (ending in EOS)."""

    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


def _columns(dataset) -> list[str]:
    return list(dataset.column_names)


def _require(dataset, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in _columns(dataset)]
    if missing:
        raise DataError(
            f"{what} data needs the column(s) {', '.join(missing)}; the dataset has "
            f"{', '.join(_columns(dataset)) or 'no columns'}"
        )


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must end with one")
    return tokenizer.eos_token_id


def _completion_after(prompt_ids: list[int], full_ids: list[int], row: int, column: str) -> list[int]:
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"row {row} of column {column!r}: the chat template renders the prompt differently inside "
            "the full conversation, so the completion cannot be split off; use text columns instead"
        )
    return full_ids[len(prompt_ids) :]


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def _render(tokenizer, chat: list[dict], generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(_clean_chat(chat), add_generation_prompt=generation_prompt, tokenize=True)
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def _completion_ids(tokenizer, prompt_value, prompt_ids: list[int], completion, row: int, column: str) -> list[int]:
    """Ids of ``completion`` following a prompt (text or chat), EOS appended."""
    eos = _eos(tokenizer)
    if isinstance(completion, str):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    elif isinstance(completion, list) and completion and all(isinstance(m, dict) for m in completion):
        prior = prompt_value if isinstance(prompt_value, list) else []
        try:
            full = _render(tokenizer, [*prior, *completion], generation_prompt=False)
        except Exception as error:
            raise DataError(f"row {row} of column {column!r}: the chat template failed: {_one_line(error)}") from None
        ids = _completion_after(prompt_ids, full, row, column)
    elif isinstance(completion, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in completion):
        ids = list(completion)
    else:
        raise DataError(f"row {row} of column {column!r} is a {type(completion).__name__}; give text or chat messages")
    # an empty completion is a response that stops at once: EOS alone
    return _with_eos(list(ids), eos)


def _split_conversation(messages, row: int, column: str) -> tuple[list[dict], list[dict]]:
    if not (isinstance(messages, list) and len(messages) >= 1 and all(isinstance(m, dict) for m in messages)):
        raise DataError(f"row {row} of column {column!r} must be a list of {{'role', 'content'}} messages")
    return messages[:-1], messages[-1:]


def encode_sequences(dataset, tokenizer, max_length: int | None = None) -> list[Sequence]:
    """Prompt/completion token ids for every row of an SFT dataset (see the module docstring)."""
    columns = _columns(dataset)
    rows = dataset.with_format(None)
    if "prompt" in columns and "completion" in columns:
        prompts, completions = rows["prompt"][:], rows["completion"][:]
        column = "completion"
    elif "messages" in columns:
        split = [_split_conversation(m, row, "messages") for row, m in enumerate(rows["messages"][:])]
        prompts = [p if p else "" for p, _ in split]
        completions = [c for _, c in split]
        column = "messages"
    elif "text" in columns:
        completions = rows["text"][:]
        prompts = [""] * len(completions)
        column = "text"
    else:
        raise DataError(
            "SFT data needs prompt+completion, messages, or text columns; the dataset has "
            f"{', '.join(columns) or 'no columns'}"
        )
    return [_cut(s, max_length) for s in encode_prompt_completions(prompts, completions, tokenizer, column)]


def encode_prompt_completions(prompts: list, completions: list, tokenizer, column: str = "completion") -> list[Sequence]:
    """Each prompt (text, chat or ids; empty for none) followed by its completion, EOS
    appended: the one encoding of SFT rows, reward-model pairs, and of a PPO response scored by
    a reward model with its own tokenizer."""
    prompt_ids = _prompt_ids(prompts, tokenizer)
    return [
        Sequence(p_ids, _completion_ids(tokenizer, p, p_ids, c, row, column))
        for row, (p, p_ids, c) in enumerate(zip(prompts, prompt_ids, completions))
    ]


def _prompt_ids(prompts: list, tokenizer) -> list[list[int]]:
    """Prompts through the same encoder as PPO prompts; an empty prompt stays empty."""
    present = [row for row, p in enumerate(prompts) if p not in ("", None, [])]
    encoded = _encode_values([prompts[row] for row in present], "prompt", tokenizer) if present else []
    ids: list[list[int]] = [[] for _ in prompts]
    for row, row_ids in zip(present, encoded):
        ids[row] = row_ids
    return ids


def _cut(sequence: Sequence, max_length: int | None) -> Sequence:
    """Keep at most ``max_length`` tokens: the completion is cut from the right first."""
    if max_length is None or len(sequence.ids) <= max_length:
        return sequence
    room = max(max_length - len(sequence.prompt_ids), 1)
    prompt = sequence.prompt_ids[-(max_length - room) :] if max_length > room else []
    return Sequence(prompt, sequence.completion_ids[:room])


@dataclass
class PreferencePair:
    chosen: Sequence
    rejected: Sequence


def encode_pairs(dataset, tokenizer, max_length: int | None = None) -> list[PreferencePair]:
    """Chosen and rejected sequences for every row of a preference dataset."""
    _require(dataset, ("chosen", "rejected"), "preference")
    rows = dataset.with_format(None)
    chosen, rejected = rows["chosen"][:], rows["rejected"][:]
    if "prompt" in _columns(dataset):
        prompts = rows["prompt"][:]
    else:  # implicit prompt: chats share all but their last message; texts have none
        prompts = [c[:-1] if isinstance(c, list) and c and isinstance(c[0], dict) else "" for c in chosen]
        chosen = [c[-1:] if isinstance(c, list) and c and isinstance(c[0], dict) else c for c in chosen]
        rejected = [r[-1:] if isinstance(r, list) and r and isinstance(r[0], dict) else r for r in rejected]
    prompt_ids = _prompt_ids(prompts, tokenizer)
    pairs = []
    for row, (p, p_ids, c, r) in enumerate(zip(prompts, prompt_ids, chosen, rejected)):
        pairs.append(
            PreferencePair(
                _cut(Sequence(p_ids, _completion_ids(tokenizer, p, p_ids, c, row, "chosen")), max_length),
                _cut(Sequence(p_ids, _completion_ids(tokenizer, p, p_ids, r, row, "rejected")), max_length),
            )
        )
    return pairs


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L] bool)`` with padding on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = True
    return ids, mask
