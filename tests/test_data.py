"""Prompt loading: files → token ids → left-padded batches, and the resumable prompt sampler."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tether.data import PromptSampler, encode_prompt_values, encode_prompts, left_pad, load_table
from tether.errors import DataError
from tether.tiny import numbered_words, word_tokenizer

WORDS = [*numbered_words(20), "user:", "assistant:", "system:"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = word_tokenizer(WORDS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ids_of(tokenizer, *words):
    return tokenizer.convert_tokens_to_ids(list(words))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- load_table


ROWS = [{"prompt": "w1 w2", "score": 1}, {"prompt": "w3", "score": 2}]


def test_jsonl_round_trip(tmp_path):
    table = load_table(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert table.to_list() == ROWS


def test_json_list_of_records_round_trip(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(ROWS, indent=2))
    assert load_table(str(tmp_path / "p.json")).to_list() == ROWS


def test_parquet_round_trip(tmp_path):
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "p.parquet"))
    assert load_table(str(tmp_path / "p.parquet")).to_list() == ROWS


def test_csv_cells_are_read_as_the_text_written(tmp_path):
    """Issue 18.6: CSV cells are text: numbers-looking cells keep their exact text (a
    completion of ``007`` or ``1.50`` stays that), an empty cell is an empty text."""
    (tmp_path / "p.csv").write_text("prompt,score\nw1 w2,1\nw3,2\n007,1.50\nw4,\n")
    assert load_table(str(tmp_path / "p.csv")).to_list() == [
        {"prompt": "w1 w2", "score": "1"}, {"prompt": "w3", "score": "2"}, {"prompt": "007", "score": "1.50"},
        {"prompt": "w4", "score": ""},
    ]


def test_save_to_disk_directory_and_split(tmp_path):
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1])
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    assert load_table(str(tmp_path / "saved"), split="test").to_list() == ROWS[:1]
    with pytest.raises(DataError, match="no split 'dev'.*train"):
        load_table(str(tmp_path / "saved"), split="dev")


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as excinfo:
        load_table(missing)
    assert one_line_error(excinfo) == f"dataset file not found: {missing}"
    with pytest.raises(DataError, match="dataset file not found: ./prompts"):
        load_table("./prompts")


def test_corrupt_jsonl_names_file_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "w1"}\n{"prompt": "w2"\n')
    with pytest.raises(DataError) as excinfo:
        load_table(str(path))
    message = one_line_error(excinfo)
    assert str(path) in message and "parse error" in message.lower()


def test_corrupt_parquet_names_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError) as excinfo:
        load_table(str(path))
    assert str(path) in one_line_error(excinfo)


@pytest.mark.parametrize("content", ["", "prompt,score\n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_table(str(path), split="train")
    assert f"dataset {path} (split train) has no rows" in one_line_error(excinfo)


def test_unloadable_hub_name_suggests_local_file(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(LocalEntryNotFoundError)")

    # The real call retries the network for ~20 s before giving up; the wrapping is what matters.
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as excinfo:
        load_table("someone/prompts")
    message = one_line_error(excinfo)
    assert "someone/prompts" in message and "local" in message


# ---------------------------------------------------------------- encode_prompts


def test_text_prompts(tokenizer):
    table = datasets.Dataset.from_dict({"prompt": ["w1 w2", "w3"]})
    assert encode_prompts(table, tokenizer) == [ids_of(tokenizer, "w1", "w2"), ids_of(tokenizer, "w3")]


def test_chat_prompts_use_template_with_generation_prompt(tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "w0"}, {"role": "user", "content": "w1 w2"}]},
        {"messages": [{"role": "user", "content": "w3"}]},
    ]
    table = load_table(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert encode_prompts(table, tokenizer) == [
        ids_of(tokenizer, "system:", "w0", "user:", "w1", "w2", "assistant:"),
        ids_of(tokenizer, "user:", "w3", "assistant:"),
    ]


def test_chat_without_template_is_an_error():
    plain = word_tokenizer(WORDS)
    table = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "w1"}]]})
    with pytest.raises(DataError, match="no chat_template"):
        encode_prompts(table, plain)


def test_token_id_prompts_pass_through(tokenizer):
    table = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8]]})
    assert encode_prompts(table, tokenizer) == [[5, 6, 7], [8]]


@pytest.mark.parametrize(
    ("columns", "chosen"),
    [
        (["query", "text", "other"], "query"),
        (["text", "messages", "prompt"], "prompt"),
        (["text"], "text"),
    ],
)
def test_column_auto_detection(tokenizer, columns, chosen):
    table = datasets.Dataset.from_dict({name: [f"w{i}"] for i, name in enumerate(columns)})
    expected = [ids_of(tokenizer, f"w{columns.index(chosen)}")]
    assert encode_prompts(table, tokenizer) == expected


def test_explicit_column(tokenizer):
    table = datasets.Dataset.from_dict({"prompt": ["w1"], "question": ["w2"]})
    assert encode_prompts(table, tokenizer, column="question") == [ids_of(tokenizer, "w2")]


def test_unknown_columns_error_names_available_ones(tokenizer):
    table = datasets.Dataset.from_dict({"question": ["w1"], "answer": ["w2"]})
    with pytest.raises(DataError) as excinfo:
        encode_prompts(table, tokenizer)
    message = one_line_error(excinfo)
    assert "question, answer" in message and "prompt_column" in message
    with pytest.raises(DataError, match="'instruction' is not in the dataset.*question, answer"):
        encode_prompts(table, tokenizer, column="instruction")


def test_empty_prompt_row_is_named(tokenizer):
    table = datasets.Dataset.from_dict({"prompt": ["w1", "w2", ""]})
    with pytest.raises(DataError, match="row 2 .*empty prompt"):
        encode_prompts(table, tokenizer)
    ids = datasets.Dataset.from_dict({"input_ids": [[4], []]})
    with pytest.raises(DataError, match="row 1 .*empty prompt"):
        encode_prompts(ids, tokenizer)


def test_wrong_type_row_is_named(tokenizer):
    table = datasets.Dataset.from_dict({"prompt": [3, 4]})
    with pytest.raises(DataError, match="row 0 .*is a int"):
        encode_prompts(table, tokenizer)


@pytest.mark.parametrize("bad", [len(WORDS) + 4, -1])
def test_out_of_range_ids_name_the_row(tokenizer, bad):
    table = datasets.Dataset.from_dict({"input_ids": [[4, 5], [6, bad]]})
    with pytest.raises(DataError, match=rf"row 1 .*token id {bad}"):
        encode_prompts(table, tokenizer)


def test_left_truncation_keeps_the_tail_and_warns_once(tokenizer):
    table = datasets.Dataset.from_dict({"input_ids": [[4, 5, 6, 7], [8, 9], [10, 11, 12]]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = encode_prompts(table, tokenizer, max_prompt_length=2)
    assert prompts == [[6, 7], [8, 9], [11, 12]]
    assert len(caught) == 1 and "2 of 3 prompts" in str(caught[0].message)


def test_truncation_error_names_first_long_row(tokenizer):
    table = datasets.Dataset.from_dict({"input_ids": [[4], [5, 6, 7], [8, 9, 10, 11]]})
    with pytest.raises(DataError, match="row 1 .*has 3 tokens.*max_prompt_length=2"):
        encode_prompts(table, tokenizer, max_prompt_length=2, truncation="error")


def test_a_plain_list_encodes_like_a_table(tokenizer):
    """Prompts given as a Python list skip ``datasets`` and come out as from a one-column table
    (text, chat or token ids, with the same truncation), and may mix kinds, which one table
    column cannot; errors name the row."""
    kinds = [["w1 w2 w3", "w4"], [[{"role": "user", "content": "w4"}]], [[5, 6, 7, 8], [9]]]
    for length in (None, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_kind = []
            for values in kinds:
                table = datasets.Dataset.from_list([{"prompt": value} for value in values])
                per_kind += encode_prompts(table, tokenizer, max_prompt_length=length)
            every = [value for values in kinds for value in values]
            mixed = encode_prompt_values(every, tokenizer, max_prompt_length=length)
        assert mixed == per_kind
    assert mixed[3:] == [[7, 8], [9]]
    arrays = [np.array([5, 6, 7]), torch.tensor([8, 9]), [np.int64(10)]]  # as a table would convert them
    assert encode_prompt_values(arrays, tokenizer) == [[5, 6, 7], [8, 9], [10]]
    with pytest.raises(DataError, match="row 1 .*empty prompt"):
        encode_prompt_values(["w1", ""], tokenizer)


def test_importing_tether_leaves_datasets_unloaded():
    """``datasets`` (with pyarrow and pandas, ~85 MB resident) is imported only to read a table."""
    code = "import sys, tether; from tether import PPOTrainer; print('datasets' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- left_pad


def test_left_pad_layout():
    input_ids, attention_mask = left_pad([[5, 6], [7, 8, 9], [4]], pad_token_id=0)
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.bool
    assert input_ids.tolist() == [[0, 5, 6], [7, 8, 9], [0, 0, 4]]
    assert attention_mask.tolist() == [[False, True, True], [True, True, True], [False, False, True]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, len(WORDS) + 3), min_size=1, max_size=12), min_size=1, max_size=8))
def test_encode_then_left_pad_recovers_every_prompt(prompts):
    tokenizer = word_tokenizer(WORDS)
    encoded = encode_prompts(datasets.Dataset.from_dict({"input_ids": prompts}), tokenizer)
    input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id)
    assert input_ids.shape == (len(prompts), max(map(len, prompts)))
    for row, prompt in enumerate(prompts):
        assert input_ids[row][attention_mask[row]].tolist() == prompt
        # keep-mask is monotone: once a real token starts, no padding follows
        assert torch.all(attention_mask[row].int().diff() >= 0)
        assert torch.all(input_ids[row][~attention_mask[row]] == tokenizer.pad_token_id)


# ---------------------------------------------------------------- PromptSampler


def test_sampler_epochs_cover_each_index_at_most_once():
    sampler = PromptSampler(num_prompts=10, batch_size=3, seed=0)
    for epoch in range(3):
        batches = [sampler.next_batch() for _ in range(3)]  # 10 // 3 full batches per epoch
        assert all(len(batch) == 3 for batch in batches)
        seen = [index for batch in batches for index in batch]
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
        order = torch.randperm(10, generator=torch.Generator().manual_seed(epoch)).tolist()
        assert seen == order[:9]


def test_sampler_is_deterministic_per_seed():
    def first(seed):
        sampler = iter(PromptSampler(num_prompts=7, batch_size=2, seed=seed))
        return [next(sampler) for _ in range(10)]

    assert first(3) == first(3)
    assert first(3) != first(4)


@pytest.mark.parametrize("steps", [0, 1, 3, 4, 7])
def test_sampler_state_round_trip_resumes_identically(steps):
    original = PromptSampler(num_prompts=10, batch_size=3, seed=5)
    for _ in range(steps):
        original.next_batch()
    resumed = PromptSampler(num_prompts=10, batch_size=3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert [resumed.next_batch() for _ in range(8)] == [original.next_batch() for _ in range(8)]


def test_a_batch_larger_than_the_prompts_holds_each_and_draws_the_rest_from_the_shuffles():
    """3 prompts, batches of 8: every batch holds each prompt twice, and its other 2 come from
    the epochs' permutations laid end to end (so a resumed sampler continues the stream)."""
    sampler = PromptSampler(num_prompts=3, batch_size=8, seed=0)
    assert sampler.repeats
    batches = [sampler.next_batch() for _ in range(5)]
    stream = [i for epoch in range(4) for i in torch.randperm(3, generator=torch.Generator().manual_seed(epoch)).tolist()]
    assert all(batch[:6] == [0, 1, 2, 0, 1, 2] and len(batch) == 8 for batch in batches)
    assert [i for batch in batches for i in batch[6:]] == stream[:10]
    resumed = PromptSampler(num_prompts=3, batch_size=8, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert [resumed.next_batch() for _ in range(3)] == [sampler.next_batch() for _ in range(3)]
    assert not PromptSampler(num_prompts=4, batch_size=4, seed=0).repeats


def test_sampler_refuses_an_empty_dataset():
    with pytest.raises(DataError) as excinfo:
        PromptSampler(num_prompts=0, batch_size=4, seed=0)
    assert "no prompts" in one_line_error(excinfo)
