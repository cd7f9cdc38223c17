"""Supervised sequences for SFT and reward-model training: prompt + completion, right-padded.

A completion ends with EOS (appended when missing; only ``max_length`` can cut it off), so the
model learns to stop and the reward model reads its score at the EOS (ppo-details 3); an empty
completion is EOS alone. Rows come in three shapes:

* ``prompt`` + ``completion`` columns (text, or chat messages: the prompt rendered with the
  generation prompt, the completion as what the full conversation adds after it);
* a ``messages`` column: a conversation whose last message is the completion;
* a ``text`` column: one text, all of it completion (no prompt).

Preference pairs use ``chosen`` / ``rejected`` with an optional shared ``prompt``; without one,
two conversations share their longest common run of first messages as the prompt, and two
texts their common first tokens.

One framing for every shape: a text prompt is encoded as PPO encodes prompts (with the
tokenizer's special tokens), and a text with no prompt starts with the special tokens the
tokenizer puts before any text (a BOS for Llama-style tokenizers), so SFT, reward modelling,
DPO and PPO show a model the same start. Rows longer than ``max_length`` are cut or dropped by
``truncation_mode`` (``fit_sequences`` / ``fit_pairs``), said once with the count.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from tether.data.prompts import _clean_chat, _encode_values, _one_line, check_messages, is_chat
from tether.errors import DataError

TRUNCATION_MODES = ("keep_end", "keep_start", "drop")


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
    if type(dataset).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"the {what} data is a DatasetDict with splits {', '.join(dataset.keys())}; pass one split, "
                        "e.g. dataset['train']")
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
    elif is_chat(completion):
        check_messages(completion, row, column)
        if isinstance(prompt_value, str) and prompt_value:
            raise DataError(
                f"row {row}: the prompt is text but column {column!r} is a chat; give both as chats or both as text"
            )
        prior = prompt_value if isinstance(prompt_value, list) else []
        try:
            full = _render(tokenizer, [*prior, *completion], generation_prompt=False)
        except Exception as error:
            raise DataError(f"row {row} of column {column!r}: the chat template failed: {_one_line(error)}") from None
        ids = _completion_after(prompt_ids, full, row, column)
    elif isinstance(completion, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in completion):
        ids = list(completion)
    elif completion is None:
        raise DataError(f"row {row} of column {column!r} is null; give it a text or remove the row")
    else:
        raise DataError(f"row {row} of column {column!r} is a {type(completion).__name__}; give text or chat messages")
    # an empty completion is a response that stops at once: EOS alone
    return _with_eos(list(ids), eos)


def _split_conversation(messages, row: int, column: str) -> tuple[list[dict], list[dict]]:
    if not (isinstance(messages, list) and len(messages) >= 1 and all(isinstance(m, dict) for m in messages)):
        raise DataError(f"row {row} of column {column!r} must be a list of {{'role', 'content'}} messages")
    return messages[:-1], messages[-1:]


def encode_sequences(
    dataset, tokenizer, max_length: int | None = None, truncation_mode: str = "keep_end", what: str = "rows"
) -> list[Sequence]:
    """Prompt/completion token ids for every row of an SFT dataset (see the module docstring),
    fitted to ``max_length`` by ``truncation_mode`` (``fit_sequences``)."""
    columns = _columns(dataset)
    rows = dataset.with_format(None)
    if "prompt" in columns and "completion" in columns:
        prompts, completions = rows["prompt"][:], rows["completion"][:]
        _refuse_null_prompts(prompts)
        column = "completion"
    elif "messages" in columns:
        split = [_split_conversation(m, row, "messages") for row, m in enumerate(rows["messages"][:])]
        prompts = [p for p, _ in split]
        completions = [c for _, c in split]
        column = "messages"
    elif "text" in columns:
        completions = rows["text"][:]
        prompts = [""] * len(completions)
        column = "text"
    else:
        raise DataError(
            "prompt/completion data needs prompt+completion, messages, or text columns; the dataset has "
            f"{', '.join(columns) or 'no columns'}"
        )
    prompt_column = "messages" if column == "messages" else "prompt"
    sequences = encode_prompt_completions(prompts, completions, tokenizer, column, prompt_column)
    return fit_sequences(sequences, max_length, truncation_mode, what)


def encode_prompt_completions(
    prompts: list, completions: list, tokenizer, column: str = "completion", prompt_column: str = "prompt"
) -> list[Sequence]:
    """Each prompt (text, chat or ids; empty for none) followed by its completion, EOS
    appended: the one encoding of SFT rows, reward-model pairs, and of a PPO response scored by
    a reward model with its own tokenizer. ``column`` / ``prompt_column`` name the completions'
    and the prompts' column in error messages."""
    prompt_ids = _prompt_ids(prompts, completions, tokenizer, prompt_column)
    return [
        Sequence(p_ids, _completion_ids(tokenizer, p, p_ids, c, row, column))
        for row, (p, p_ids, c) in enumerate(zip(prompts, prompt_ids, completions))
    ]


def _refuse_null_prompts(prompts: list) -> None:
    for row, prompt in enumerate(prompts):
        if prompt is None:
            raise DataError(f"row {row} of column 'prompt' is null; give a prompt (\"\" for none) or remove the row")


def _prompt_ids(prompts: list, completions: list, tokenizer, column: str) -> list[list[int]]:
    """Prompts through the same encoder as PPO prompts. A text row without a prompt starts with
    the tokens the tokenizer puts before any text; a conversation without one, with what its
    chat template renders."""
    present = [row for row, p in enumerate(prompts) if p not in ("", None, [])]
    encoded = _encode_values([prompts[row] for row in present], column, tokenizer, present) if present else []
    start = leading_special_ids(tokenizer)
    ids: list[list[int]] = [[] if is_chat(completion) else list(start) for completion in completions]
    for row, row_ids in zip(present, encoded):
        ids[row] = row_ids
    return ids


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text when asked to add them (a BOS, or
    none): what a sequence without a prompt starts with."""
    probe = "the"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return list(framed[:start])
    return []


# --- fitting max_length -------------------------------------------------------------------------

def _cut(sequence: Sequence, max_length: int, mode: str) -> Sequence:
    """``keep_end``: the last ``max_length`` tokens (the prompt loses its start; a completion
    longer than ``max_length`` alone keeps its end, EOS included). ``keep_start``: the first
    ``max_length`` (the completion loses its end)."""
    prompt, completion = sequence.prompt_ids, sequence.completion_ids
    excess = len(prompt) + len(completion) - max_length
    if excess <= 0:
        return sequence
    if mode == "keep_end":
        if excess <= len(prompt):
            return Sequence(prompt[excess:], completion)
        return Sequence([], completion[len(completion) - max_length :])
    if max_length <= len(prompt):
        return Sequence(prompt[:max_length], [])
    return Sequence(prompt, completion[: max_length - len(prompt)])


def _check_mode(mode: str) -> None:
    if mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")


def _say_fitted(long: int, total: int, what: str, max_length: int, mode: str) -> None:
    if not long:
        return
    if mode == "drop":
        done = "were dropped (truncation_mode: drop)"
    elif mode == "keep_end":
        done = "were cut to their last tokens: the prompt from the left, the completion kept (truncation_mode: keep_end)"
    else:
        done = "were cut to their first tokens: the completion from the right, EOS included (truncation_mode: keep_start)"
    warnings.warn(f"{long} of {total} {what} were longer than max_length={max_length} tokens and {done}", stacklevel=3)


def fit_sequences(sequences: list[Sequence], max_length: int | None, mode: str, what: str = "rows") -> list[Sequence]:
    """Rows longer than ``max_length`` cut (``keep_end`` / ``keep_start``, see ``_cut``) or
    dropped (``drop``), with one warning that counts them."""
    _check_mode(mode)
    if max_length is None:
        return sequences
    long = [len(s.ids) > max_length for s in sequences]
    _say_fitted(sum(long), len(sequences), what, max_length, mode)
    if mode == "drop":
        return [s for s, too_long in zip(sequences, long) if not too_long]
    return [_cut(s, max_length, mode) for s in sequences]


@dataclass
class PreferencePair:
    chosen: Sequence
    rejected: Sequence
    reference_logps: tuple[float, float] | None = None
    """DPO with ``precompute_ref_log_probs``: the reference's (chosen, rejected) log-probabilities."""


def fit_pairs(pairs: list[PreferencePair], max_length: int | None, mode: str, what: str = "pairs") -> list[PreferencePair]:
    """Pairs fitted to ``max_length`` (one warning), then pairs whose chosen and rejected are
    the same tokens dropped (another): they teach nothing, and a cut can make them so.

    ``keep_end`` cuts the shared prompt from the left until the longer side fits, keeping at
    least one prompt token so both sides keep a context in common; completions that still do
    not fit lose their ends. ``keep_start`` keeps each side's first tokens; ``drop`` drops a
    pair when either side is too long."""
    _check_mode(mode)
    if max_length is not None:
        long = [max(len(p.chosen.ids), len(p.rejected.ids)) > max_length for p in pairs]
        if mode == "keep_end" and any(long):
            fitted = [_cut_pair(p, max_length, mode) for p in pairs]
            ends = sum(len(f.chosen.completion_ids) < len(p.chosen.completion_ids)
                       or len(f.rejected.completion_ids) < len(p.rejected.completion_ids) for p, f in zip(pairs, fitted))
            warnings.warn(
                f"{sum(long)} of {len(pairs)} {what} were longer than max_length={max_length} tokens: their shared "
                f"prompt was cut from the left (truncation_mode: keep_end)"
                + (f"; in {ends} of them a completion did not fit even so and lost its end" if ends else ""),
                stacklevel=2,
            )
            pairs = fitted
        else:
            _say_fitted(sum(long), len(pairs), what, max_length, mode)
            if mode == "drop":
                pairs = [p for p, too_long in zip(pairs, long) if not too_long]
            elif mode == "keep_start":
                pairs = [_cut_pair(p, max_length, mode) for p in pairs]
    distinct = [p for p in pairs if p.chosen.ids != p.rejected.ids]
    if len(distinct) < len(pairs):
        warnings.warn(
            f"{len(pairs) - len(distinct)} of {len(pairs)} {what} have the same tokens chosen and rejected"
            f"{' once fitted to max_length' if max_length is not None else ''}; dropped (they teach nothing)",
            stacklevel=2,
        )
    return distinct


def _cut_pair(pair: PreferencePair, max_length: int, mode: str) -> PreferencePair:
    if mode == "keep_start":
        return PreferencePair(_cut(pair.chosen, max_length, mode), _cut(pair.rejected, max_length, mode))
    excess = max(len(pair.chosen.ids), len(pair.rejected.ids)) - max_length
    if excess <= 0:
        return pair
    prompt = pair.chosen.prompt_ids
    kept = max(len(prompt) - excess, min(len(prompt), 1))  # one prompt token at least, when there is one
    prompt = prompt[len(prompt) - kept :]
    room = max_length - len(prompt)
    return PreferencePair(Sequence(prompt, pair.chosen.completion_ids[:room]),
                          Sequence(list(prompt), pair.rejected.completion_ids[:room]))


def encode_pairs(
    dataset, tokenizer, max_length: int | None = None, truncation_mode: str = "keep_end", what: str = "pairs",
    max_prompt_length: int | None = None,
) -> list[PreferencePair]:
    """Chosen and rejected sequences for every row of a preference dataset: prompts longer than
    ``max_prompt_length`` cut from the left (one warning), then fitted to ``max_length``
    (``fit_pairs``).

    Without a ``prompt`` column the prompt is what both sides share: the first messages of two
    conversations, or the first tokens of two texts (the text is encoded whole and split where
    the two differ, so its tokens are exactly the whole text's)."""
    _require(dataset, ("chosen", "rejected"), "preference")
    rows = dataset.with_format(None)
    chosen, rejected = rows["chosen"][:], rows["rejected"][:]
    implicit = "prompt" not in _columns(dataset)
    if implicit:
        split = [_implicit_prompt(c, r, row) for row, (c, r) in enumerate(zip(chosen, rejected))]
        prompts, chosen, rejected = ([part[i] for part in split] for i in range(3))
    else:
        prompts = rows["prompt"][:]
        _refuse_null_prompts(prompts)
    prompt_column = "chosen" if implicit else "prompt"
    chosen_sequences = encode_prompt_completions(prompts, chosen, tokenizer, "chosen", prompt_column)
    rejected_sequences = encode_prompt_completions(prompts, rejected, tokenizer, "rejected", prompt_column)
    pairs = [PreferencePair(c, r) for c, r in zip(chosen_sequences, rejected_sequences)]
    if implicit:
        pairs = [_shared_start_as_prompt(pair) if not is_chat(value) else pair for pair, value in zip(pairs, chosen)]
    if max_prompt_length is not None:
        pairs = _cut_prompts(pairs, max_prompt_length, what)
    return fit_pairs(pairs, max_length, truncation_mode, what)


def _shared_start_as_prompt(pair: PreferencePair) -> PreferencePair:
    """A text pair's common first tokens moved from both completions into the prompt."""
    chosen, rejected = pair.chosen.completion_ids, pair.rejected.completion_ids
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1  # each side keeps at least its last token (its EOS) as completion
    prompt = pair.chosen.prompt_ids + chosen[:shared]
    return PreferencePair(Sequence(prompt, chosen[shared:]), Sequence(list(prompt), rejected[shared:]))


def _cut_prompts(pairs: list[PreferencePair], max_prompt_length: int, what: str) -> list[PreferencePair]:
    """Prompts longer than ``max_prompt_length`` keep their last tokens (said once, counted)."""
    long = sum(len(p.chosen.prompt_ids) > max_prompt_length for p in pairs)
    if long:
        warnings.warn(
            f"{long} of {len(pairs)} {what} had prompts longer than max_prompt_length={max_prompt_length} tokens; "
            "they were cut from the left (their last tokens kept)",
            stacklevel=3,
        )
    cut = lambda s: Sequence(s.prompt_ids[max(0, len(s.prompt_ids) - max_prompt_length) :], s.completion_ids)  # noqa: E731
    return [PreferencePair(cut(p.chosen), cut(p.rejected)) for p in pairs]


def _implicit_prompt(chosen, rejected, row: int) -> tuple:
    """``(prompt, chosen, rejected)`` of a pair without a prompt column. Two conversations share
    their longest common run of first messages as the prompt; they must part at their last
    assistant turn, not before (a pair of different conversations compares nothing). Texts
    have no prompt."""
    if is_chat(chosen) != is_chat(rejected):
        raise DataError(
            f"row {row}: chosen is {'a chat' if is_chat(chosen) else 'text'} but rejected is "
            f"{'a chat' if is_chat(rejected) else 'text'}; give both in one form"
        )
    if not is_chat(chosen):
        return "", chosen, rejected
    check_messages(chosen, row, "chosen")  # indices in the whole conversation, before it is split
    check_messages(rejected, row, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        turns = [index for index, message in enumerate(messages) if message.get("role") == "assistant"]
        if not turns or shared < turns[-1]:
            raise DataError(
                f"row {row}: the chosen and rejected conversations differ before the {side} one's last assistant "
                "turn; a pair must share everything before it (or give a prompt column)"
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L] bool)`` with padding on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = True
    return ids, mask
