"""Prompts for rollouts: a table of prompts → token ids → left-padded batches.

A prompt is text, a chat (a list of ``{"role", "content"}`` messages rendered with the
tokenizer's chat template and the generation prompt appended), or token ids taken as they
are. Prompts are encoded once, up front, so that a bad row fails before training starts.
Batches are left-padded: generation appends to the right, so every row's last prompt token
must sit in the same column.

Left out on purpose: packing, streaming datasets, and on-the-fly augmentation.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tether.errors import DataError

if TYPE_CHECKING:  # imported where a table is read: ~85 MB resident that list prompts never need
    import datasets

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
PROMPT_COLUMNS = ("prompt", "messages", "input_ids", "query", "text")


# ---------------------------------------------------------------- loading


def load_table(source: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """Rows of a local file (.jsonl, .json, .parquet, .csv), a ``save_to_disk`` directory, or a Hub
    dataset (``subset``: its configuration, ``dataset_config``).

    Raises DataError for a missing or unreadable file, a Hub name that cannot be loaded, and a
    table with no rows.
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        table = _load_saved(path, split)
    elif os.path.exists(path):
        table = _load_file(path)
    elif source.lower().endswith(LOCAL_EXTENSIONS) or source.startswith((".", "/", "~")):
        raise DataError(f"dataset file not found: {source}")
    else:
        table = _load_hub(source, split, subset)
    if table.num_rows == 0:
        raise DataError(f"dataset {source} (split {split}) has no rows; add rows to it")
    return table


def load_test_split(source: str, split: str, subset: str | None = None) -> datasets.Dataset | None:
    """The ``split`` of a dataset that really has splits (a Hub dataset or a saved DatasetDict).

    None for a single file or a saved single Dataset (those hold one table, which would come
    back for any split name) and for a dataset without that split; callers then hold out a
    share of the training rows instead.
    """
    path = os.path.expanduser(source)
    if os.path.isfile(path) or (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "dataset_dict.json"))):
        return None
    if os.path.isdir(path):
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as file:
            splits = json.load(file).get("splits", [])
        if split not in splits:  # a misspelled split would otherwise pass in silence
            warnings.warn(
                f"dataset {source} has no split {split!r} (its splits: {', '.join(splits)}); no test split is used: "
                "set dataset_test_split to one of them to evaluate on it",
                stacklevel=2,
            )
            return None
    try:
        return load_table(source, split, subset)
    except DataError as error:
        warnings.warn(f"no test split {split!r} is used: {error}", stacklevel=2)
        return None


def _load_file(path: str) -> datasets.Dataset:
    """Read a local file by its extension, straight through pyarrow (no cache directory)."""
    import datasets

    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_EXTENSIONS:
        raise DataError(
            f"cannot read {path}: unknown file type {extension or '(none)'}; "
            f"use one of {', '.join(LOCAL_EXTENSIONS)}"
        )
    if os.path.getsize(path) == 0:
        # pyarrow calls an empty file malformed; for the user it is simply a table with no rows.
        return datasets.Dataset.from_dict({})
    try:
        match extension:
            case ".jsonl":
                return _read_jsonl(path)
            case ".json":
                return _read_json(path)
            case ".parquet":
                import pyarrow.parquet

                return datasets.Dataset(pyarrow.parquet.read_table(path))
            case ".csv":
                return datasets.Dataset(_read_csv_as_text(path))
    except DataError:
        raise
    except Exception as error:  # the parsers raise many types; all mean "this file is bad"
        raise DataError(f"cannot read {path}: {_one_line(error)}; fix or re-export the file") from error
    raise AssertionError(extension)


def _read_csv_as_text(path: str):
    """Every CSV cell as the text written there: ``007`` stays ``007``, not the number 7."""
    import pyarrow
    import pyarrow.csv

    names = pyarrow.csv.open_csv(path).schema.names
    options = pyarrow.csv.ConvertOptions(column_types={name: pyarrow.string() for name in names})
    return pyarrow.csv.read_csv(path, convert_options=options)


def _read_jsonl(path: str) -> datasets.Dataset:
    import datasets
    import pyarrow.json

    return datasets.Dataset(pyarrow.json.read_json(path))


def _read_json(path: str) -> datasets.Dataset:
    """A .json file holds a list of records, a dict of columns, or (often, in practice) JSON lines."""
    import datasets

    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(content, list):
        return datasets.Dataset.from_list(content)
    if isinstance(content, dict) and all(isinstance(v, list) for v in content.values()):
        return datasets.Dataset.from_dict(content)
    if isinstance(content, dict):
        return datasets.Dataset.from_list([content])
    raise DataError(f"cannot read {path}: top-level JSON is a {type(content).__name__}; write a list of records")


def _load_saved(path: str, split: str) -> datasets.Dataset:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:
        raise DataError(
            f"cannot read dataset directory {path}: {_one_line(error)}; "
            "save it with Dataset.save_to_disk or pass a .jsonl/.parquet/.csv file"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"dataset directory {path} has no split {split!r}; its splits are {', '.join(loaded)}"
            )
        return loaded[split]
    return loaded


def _load_hub(name: str, split: str, subset: str | None = None) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(name, *([subset] if subset else []), split=split)
    except Exception as error:
        raise DataError(
            f"cannot load Hub dataset {name!r} (split {split}): {_one_line(error)}; "
            "check the name and network, or pass a local .jsonl/.json/.parquet/.csv file"
        ) from error


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------- encoding


def encode_prompts(
    dataset: datasets.Dataset,
    tokenizer,
    column: str | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "left",
) -> list[list[int]]:
    """Token ids of every prompt in ``dataset``, unpadded, one list per row.

    ``column`` defaults to the first of PROMPT_COLUMNS present. Rows longer than
    ``max_prompt_length`` keep their last tokens (``truncation="left"``, one warning for all)
    or raise (``truncation="error"``).
    """
    _check_truncation(max_prompt_length, truncation)
    column, values = prompt_column_values(dataset, column)
    return _encode_checked(values, tokenizer, column, max_prompt_length, truncation)


@dataclass
class Prompts:
    """Every prompt of a dataset: its token ids, its value as the dataset held it (text, chat
    messages or ids: what reward functions and sample tables show), and the row's other
    columns (a task's ``answer``, handed to reward functions)."""

    ids: list[list[int]]
    values: list | None  # None: given as ids alone (decoded where text is needed)
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: Sequence[int]) -> Prompts:
        return Prompts(
            [self.ids[r] for r in rows], None if self.values is None else [self.values[r] for r in rows],
            {name: [values[r] for r in rows] for name, values in self.columns.items()},
        )


def load_prompts(
    dataset, tokenizer, column: str | None = None, max_prompt_length: int | None = None, truncation: str = "left",
    other_columns: bool = True, what: str = "",
) -> Prompts:
    """``Prompts`` of a ``datasets.Dataset`` (``column``: the prompt column, else the first of
    PROMPT_COLUMNS present) or of a plain list of prompts; ``other_columns`` False keeps none
    of the rows' other columns (``remove_unused_columns``). A list of dicts is a table of rows."""
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(row, dict) for row in dataset):
        import datasets

        dataset = datasets.Dataset.from_list(list(dataset))
    if isinstance(dataset, (list, tuple)):
        column, values, columns = column or "prompt", list(dataset), {}
    else:
        column, values = prompt_column_values(dataset, column)
        rows = dataset.with_format(None)
        kept = [name for name in dataset.column_names if name != column] if other_columns else []
        columns = {name: rows[name][:] for name in kept}
    ids = encode_prompt_values(values, tokenizer, column, max_prompt_length, truncation, what)
    return Prompts(ids, [v.tolist() if hasattr(v, "tolist") else v for v in values], columns)


def prompt_text(value, tokenizer=None) -> str:
    """A prompt value as one text for a table: a chat as ``role: content`` lines, ids decoded."""
    if isinstance(value, str):
        return value
    if is_chat(value):
        return "\n".join(f"{message['role']}: {message['content']}" for message in value)
    return tokenizer.decode(value, skip_special_tokens=True) if tokenizer is not None else str(value)


def prompt_column_values(dataset: datasets.Dataset, column: str | None = None) -> tuple[str, list]:
    """``(column, values)``: the prompt column (``column``, or the first of PROMPT_COLUMNS
    present) and its values as plain Python objects, chat messages as written."""
    column = _prompt_column(dataset, column)
    values = dataset.with_format(None)[column][:]  # plain Python lists, fast, whatever the format
    return column, [_clean_chat(v) if is_chat(v) else v for v in values]


def is_chat(value) -> bool:
    """Whether a prompt value is a list of chat messages."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, dict) for item in value)


def encode_prompt_values(
    values: Sequence,
    tokenizer,
    column: str = "prompt",
    max_prompt_length: int | None = None,
    truncation: str = "left",
    what: str = "",
) -> list[list[int]]:
    """``encode_prompts`` of a plain list of prompts; ``column`` names them in error messages,
    ``what`` in the truncation warning ("training", "evaluation"). Token ids may come as numpy
    arrays or tensors, as a table would have converted them."""
    _check_truncation(max_prompt_length, truncation)
    values = [value.tolist() if hasattr(value, "tolist") else value for value in values]
    return _encode_checked(values, tokenizer, column, max_prompt_length, truncation, what)


def _encode_checked(
    values: list, tokenizer, column: str, max_prompt_length: int | None, truncation: str, what: str = ""
):
    prompts = _encode_values(values, column, tokenizer)
    _check_prompts(prompts, column, len(tokenizer))
    if max_prompt_length is None:
        return prompts
    return _truncate(prompts, column, max_prompt_length, truncation, what)


def _check_truncation(max_prompt_length: int | None, truncation: str) -> None:
    if truncation not in ("left", "error"):
        raise DataError(f"prompt_truncation must be 'left' or 'error', got {truncation!r}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise DataError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def _prompt_column(dataset: datasets.Dataset, column: str | None) -> str:
    available = list(dataset.column_names)
    if column is not None:
        if column not in available:
            raise DataError(
                f"prompt column {column!r} is not in the dataset; its columns are "
                f"{', '.join(available) or '(none)'}; set prompt_column to one of them"
            )
        return column
    for candidate in PROMPT_COLUMNS:
        if candidate in available:
            return candidate
    raise DataError(
        f"no prompt column found (looked for {', '.join(PROMPT_COLUMNS)}); the dataset has "
        f"{', '.join(available) or 'no columns'}; set prompt_column to the one holding prompts"
    )


def _encode_values(values: list, column: str, tokenizer, rows: list[int] | None = None) -> list[list[int]]:
    """Sort rows by kind, then encode each kind in one batched call. ``rows``: the dataset row
    of each value, for error messages (default: its index)."""
    rows = list(range(len(values))) if rows is None else rows
    prompts: list[list[int] | None] = [None] * len(values)
    texts, chats = [], []
    for index, value in enumerate(values):
        match _kind(value, rows[index], column):
            case "text":
                texts.append(index)
            case "chat":
                chats.append(index)
            case "ids":
                prompts[index] = [int(item) for item in value]
    if texts:
        encoded = tokenizer([values[index] for index in texts], add_special_tokens=True)["input_ids"]
        for index, ids in zip(texts, encoded):
            prompts[index] = list(ids)
    if chats:
        chat_rows = [rows[index] for index in chats]
        encoded = _encode_chats([_clean_chat(values[index]) for index in chats], chat_rows, column, tokenizer)
        for index, ids in zip(chats, encoded):
            prompts[index] = ids
    return prompts


def is_token_ids(value) -> bool:
    """Whether a prompt value is a list of token ids (Python or numpy integers)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(item, numbers.Integral) and not isinstance(item, bool) for item in value
    )


def check_messages(messages: list[dict], row: int, column: str) -> None:
    """Every message has a role and a content that is not null (Arrow writes a missing key as
    null): an empty content is ``""``, never rendered from nothing without a word."""
    for index, message in enumerate(messages):
        if message.get("role") is None:
            raise DataError(
                f"row {row} of column {column!r}: message {index} has no 'role'; "
                "write chats as [{'role': ..., 'content': ...}, ...]"
            )
        if message.get("content") is None:
            raise DataError(
                f"row {row} of column {column!r}: message {index} ({message['role']}) has no content (null or "
                'missing); give it a text ("" for an empty message) or remove the row'
            )


def _kind(value, row: int, column: str) -> str:
    if isinstance(value, str):
        return "text"
    if value is None:
        raise DataError(f"row {row} of column {column!r} is null; give it a prompt or remove the row")
    if isinstance(value, (list, tuple)) and not value:
        raise DataError(f"row {row} of column {column!r} is an empty prompt; remove the row or fill it in")
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, dict) for item in value):
            check_messages(value, row, column)
            return "chat"
        if is_token_ids(value):
            return "ids"
    raise DataError(
        f"row {row} of column {column!r} is a {_describe(value)}; a prompt must be text, "
        "a list of {'role', 'content'} messages, or a list of token ids"
    )


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value})
        return f"{type(value).__name__} of {'/'.join(kinds)}"
    return type(value).__name__


def _clean_chat(messages: list[dict]) -> list[dict]:
    # Arrow gives every message every key seen in the column, filling gaps with None;
    # drop those so templates that test `'name' in message` see the message as written.
    return [{key: val for key, val in message.items() if val is not None} for message in messages]


def _encode_chats(chats: list[list[dict]], rows: list[int], column: str, tokenizer) -> list[list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"row {rows[0]} of column {column!r} is a chat but the tokenizer has no chat_template; "
            "use a chat model's tokenizer, set tokenizer.chat_template, or give text prompts"
        )
    try:
        encoded = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True)
    except Exception as error:
        # The batched call cannot say which conversation broke the template; find it.
        for row, chat in zip(rows, chats):
            _render_one_chat(chat, row, column, tokenizer)
        raise DataError(f"column {column!r}: the chat template failed: {_one_line(error)}") from error
    # transformers 5 returns a BatchEncoding; older versions a plain list of lists.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [[int(token) for token in ids] for ids in encoded]


def _render_one_chat(chat: list[dict], row: int, column: str, tokenizer) -> None:
    try:
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    except Exception as error:
        raise DataError(
            f"row {row} of column {column!r}: the chat template failed: {_one_line(error)}; "
            "fix the messages or the template"
        ) from error


def _check_prompts(prompts: list[list[int]], column: str, vocab_size: int) -> None:
    for row, ids in enumerate(prompts):
        if not ids:
            raise DataError(f"row {row} of column {column!r} is an empty prompt; remove the row or fill it in")
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DataError(
                f"row {row} of column {column!r} has token id {bad}, outside the tokenizer's "
                f"[0, {vocab_size}); the ids were made with a different tokenizer"
            )


def _truncate(prompts: list[list[int]], column: str, max_length: int, truncation: str, what: str = "") -> list[list[int]]:
    too_long = [row for row, ids in enumerate(prompts) if len(ids) > max_length]
    if not too_long:
        return prompts
    if truncation == "error":
        row = too_long[0]
        raise DataError(
            f"row {row} of column {column!r} has {len(prompts[row])} tokens, more than "
            f"max_prompt_length={max_length}; raise max_prompt_length or set prompt_truncation: left"
        )
    # Keep the tail: the end of a prompt (the question, the generation prompt) is what the
    # response continues from.
    warnings.warn(
        f"{len(too_long)} of {len(prompts)} {what + ' ' if what else ''}prompts were longer than max_prompt_length="
        f"{max_length} and lost their first tokens",
        stacklevel=3,
    )
    return [ids[-max_length:] for ids in prompts]


# ---------------------------------------------------------------- batching


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts in one batch.

    Returns ``input_ids`` [B, Q] long and ``attention_mask`` [B, Q] bool (True = real token),
    Q = the longest prompt, padding on the left.
    """
    width = max((len(ids) for ids in prompts), default=0)
    rows = [[pad_token_id] * (width - len(ids)) + list(ids) for ids in prompts]
    keep = [[False] * (width - len(ids)) + [True] * len(ids) for ids in prompts]
    input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(prompts), width)  # [B, Q]
    attention_mask = torch.tensor(keep, dtype=torch.bool).reshape(len(prompts), width)  # [B, Q]
    return input_ids, attention_mask


class PromptSampler:
    """Batches of prompt indices, forever: a fresh shuffle each epoch.

    Epoch ``e`` is ``randperm`` under seed ``seed + e``, so the order depends only on
    (seed, epoch) and a sampler restored from ``state_dict()`` continues with the same batches.
    With at least ``batch_size`` prompts every batch lies within one epoch (the remainder of an
    epoch is skipped, so all batches have the same size). With fewer (``repeats``), a batch
    holds every prompt ``batch_size // num_prompts`` times, and the rest of it comes from the
    epochs' shuffles laid end to end, as RL samples a prompt many times anyway.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1:
            raise DataError(f"a rollout batch needs at least one prompt, got batch size {batch_size}")
        if num_prompts < 1:
            raise DataError("the dataset has no prompts; add prompts to it")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle  # False: every epoch in dataset order
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next batch's first prompt
        self._order: list[int] | None = None

    @property
    def repeats(self) -> bool:
        """Whether a batch holds some prompts more than once (fewer prompts than a batch)."""
        return self.num_prompts < self.batch_size

    def _permutation(self) -> list[int]:
        if self._order is None and not self.shuffle:
            self._order = list(range(self.num_prompts))
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.num_prompts, generator=generator).tolist()
        return self._order

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._order = None

    def next_batch(self) -> list[int]:
        if not self.repeats:
            if self.position + self.batch_size > self.num_prompts:
                self._next_epoch()  # drop_last: the rest of this epoch is skipped
            batch = self._permutation()[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            return batch
        copies, rest = divmod(self.batch_size, self.num_prompts)
        batch = list(range(self.num_prompts)) * copies
        while len(batch) < self.batch_size:  # the rest, running on through the shuffles
            if self.position == self.num_prompts:
                self._next_epoch()
            take = min(self.batch_size - len(batch), self.num_prompts - self.position)
            batch += self._permutation()[self.position : self.position + take]
            self.position += take
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"prompt sampler state {state!r} is not {{'epoch': int, 'position': int}}; "
                "the checkpoint is damaged or from another program"
            ) from error
        if epoch < 0 or not 0 <= position <= self.num_prompts:
            raise DataError(
                f"prompt sampler state {state!r} does not fit a dataset of {self.num_prompts} prompts; "
                "resume with the same dataset"
            )
        self.epoch, self.position, self._order = epoch, position, None
