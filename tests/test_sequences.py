"""Supervised sequences for SFT and reward-model data: layout, EOS, chat splitting, errors."""

from __future__ import annotations

import datasets
import pytest
import torch

from tether.data.sequences import encode_pairs, encode_sequences, right_pad
from tether.errors import DataError
from tether.tiny import numbered_words, word_tokenizer

EOS = 2
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
def tokenizer():
    words = [*numbered_words(10), "user:", "assistant:", "system:"]
    tok = word_tokenizer(words)
    tok.chat_template = TEMPLATE
    return tok


def table(**columns):
    return datasets.Dataset.from_dict(columns)


def test_prompt_completion_text_gets_eos_appended(tokenizer):
    (first, second) = encode_sequences(table(prompt=["w1 w2", "w3"], completion=["w4", "w5 w6"]), tokenizer)
    assert (first.prompt_ids, first.completion_ids) == ([5, 6], [8, EOS])
    assert (second.prompt_ids, second.completion_ids) == ([7], [9, 10, EOS])
    assert first.ids == [5, 6, 8, EOS]


def test_existing_eos_is_not_doubled_and_empty_completion_is_eos_alone(tokenizer):
    (kept, empty) = encode_sequences(table(prompt=["w1", "w1"], completion=["w4 <eos>", ""]), tokenizer)
    assert kept.completion_ids == [8, EOS]
    assert empty.completion_ids == [EOS]


def test_text_column_is_all_completion(tokenizer):
    (only,) = encode_sequences(table(text=["w1 w2 w3"]), tokenizer)
    assert only.prompt_ids == [] and only.completion_ids == [5, 6, 7, EOS]


def test_messages_split_at_the_last_message(tokenizer):
    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    (only,) = encode_sequences(datasets.Dataset.from_list([{"messages": chat}]), tokenizer)
    user, assistant = tokenizer.convert_tokens_to_ids(["user:", "assistant:"])
    assert only.prompt_ids == [user, 5, 6, assistant]  # the prompt ends with the generation prompt
    # the template renders the last turn as "assistant: w3", so after the prompt's "assistant:" the
    # conversation adds only "w3"; EOS is appended
    assert only.completion_ids == [7, EOS]


def test_max_length_cuts_the_completion_first(tokenizer):
    (cut,) = encode_sequences(table(prompt=["w1 w2"], completion=["w3 w4 w5 w6"]), tokenizer, max_length=4)
    assert cut.prompt_ids == [5, 6] and cut.completion_ids == [7, 8]
    (long_prompt,) = encode_sequences(table(prompt=["w1 w2 w3 w4"], completion=["w5"]), tokenizer, max_length=3)
    assert len(long_prompt.ids) == 3 and long_prompt.completion_ids == [9]  # at least one completion token


def test_pairs_share_the_prompt_and_end_with_eos(tokenizer):
    (pair,) = encode_pairs(table(prompt=["w1"], chosen=["w2"], rejected=["w3 w4"]), tokenizer)
    assert pair.chosen.ids == [5, 6, EOS] and pair.rejected.ids == [5, 7, 8, EOS]


def test_pairs_without_prompt_column(tokenizer):
    (pair,) = encode_pairs(table(chosen=["w1 w2"], rejected=["w3"]), tokenizer)
    assert pair.chosen.prompt_ids == [] and pair.chosen.completion_ids == [5, 6, EOS]


def test_missing_columns_are_named(tokenizer):
    with pytest.raises(DataError, match="needs the column\\(s\\) rejected; the dataset has prompt, chosen"):
        encode_pairs(table(prompt=["w1"], chosen=["w2"]), tokenizer)
    with pytest.raises(DataError, match="prompt\\+completion, messages, or text columns; the dataset has question"):
        encode_sequences(table(question=["w1"]), tokenizer)


def test_a_completion_of_the_wrong_type_names_the_row(tokenizer):
    class MixedTable:  # Arrow refuses mixed column types, so a stand-in with the same interface
        column_names = ["prompt", "completion"]

        def with_format(self, _):
            return {"prompt": ["w1", "w1"], "completion": ["w2", 7]}

    with pytest.raises(DataError, match="row 1 of column 'completion' is a int"):
        encode_sequences(MixedTable(), tokenizer)


def test_right_pad_layout():
    ids, mask = right_pad([[4, 5, 6], [7]], pad_token_id=0)
    assert torch.equal(ids, torch.tensor([[4, 5, 6], [7, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[True, True, True], [True, False, False]]))
