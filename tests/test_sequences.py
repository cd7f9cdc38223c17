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


def test_keep_end_cuts_the_prompt_from_the_left_and_keeps_the_completion(tokenizer):
    """The default: a long prompt loses its first tokens; a completion longer than max_length
    alone keeps its end, EOS included. One warning counts the rows cut."""
    rows = table(prompt=["w1 w2 w3 w4", "w1", "w1"], completion=["w5", "w2 w3 w4 w5 w6", "w2"])
    with pytest.warns(UserWarning, match="2 of 3 rows were longer than max_length=3") as caught:
        long_prompt, long_completion, short = encode_sequences(rows, tokenizer, max_length=3)
    assert len(caught) == 1
    assert (long_prompt.prompt_ids, long_prompt.completion_ids) == ([8], [9, EOS])
    assert (long_completion.prompt_ids, long_completion.completion_ids) == ([], [9, 10, EOS])
    assert (short.prompt_ids, short.completion_ids) == ([5], [6, EOS])


def test_keep_start_keeps_the_first_tokens_and_drop_drops_the_row(tokenizer):
    rows = table(prompt=["w1 w2", "w1"], completion=["w3 w4 w5 w6", "w2"])
    cut, short = encode_sequences(rows, tokenizer, max_length=4, truncation_mode="keep_start")
    assert (cut.prompt_ids, cut.completion_ids) == ([5, 6], [7, 8])  # the completion lost its end and EOS
    assert short.ids == [5, 6, EOS]
    with pytest.warns(UserWarning, match="1 of 2 rows .* were dropped"):
        (kept,) = encode_sequences(rows, tokenizer, max_length=4, truncation_mode="drop")
    assert kept.ids == [5, 6, EOS]
    with pytest.raises(DataError, match="truncation_mode must be one of keep_end, keep_start, drop"):
        encode_sequences(rows, tokenizer, max_length=4, truncation_mode="left")


def test_long_prompts_no_longer_make_pairs_identical(tokenizer):
    """Issue 18.1: with a prompt longer than max_length, keeping the prompt's tail and one
    completion token made pairs that share their first word identical. keep_end keeps both
    completions whole after the same prompt tail; under keep_start such pairs are identical
    and are dropped and counted, never trained on."""
    prompt = " ".join(numbered_words(10) * 3)  # 30 tokens
    rows = table(prompt=[prompt, prompt], chosen=["w1 w2", "w3 w4 w5"], rejected=["w1 w3", "w3 w4 w6"])
    with pytest.warns(UserWarning, match="2 of 2 pairs were longer than max_length=24"):
        pairs = encode_pairs(rows, tokenizer, max_length=24)
    for pair in pairs:
        assert pair.chosen.prompt_ids == pair.rejected.prompt_ids and pair.chosen.ids != pair.rejected.ids
        assert max(len(pair.chosen.ids), len(pair.rejected.ids)) == 24
    assert pairs[1].chosen.completion_ids == [7, 8, 9, EOS] and pairs[1].rejected.completion_ids == [7, 8, 10, EOS]
    with pytest.warns(UserWarning) as caught:
        assert encode_pairs(rows, tokenizer, max_length=24, truncation_mode="keep_start") == []
    assert "2 of 2 pairs have the same tokens chosen and rejected once fitted to max_length" in str(caught[-1].message)


def test_keep_end_keeps_a_shared_prompt_token_and_cuts_a_completion_too_long_alone(tokenizer):
    """A completion longer than max_length alone: the pair keeps one shared prompt token (its
    last) as the context of both sides, and the completion loses its end, said in the warning."""
    rows = table(prompt=["w1 w2"], chosen=[" ".join(numbered_words(12))], rejected=["w3 w4"])
    with pytest.warns(UserWarning, match="in 1 of them a completion did not fit even so and lost its end"):
        (pair,) = encode_pairs(rows, tokenizer, max_length=10)
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids == [6]  # w2
    assert pair.chosen.completion_ids == tokenizer(" ".join(numbered_words(9)), add_special_tokens=False)["input_ids"]
    assert pair.rejected.completion_ids == [7, 8, EOS]


def test_identical_pairs_are_dropped_and_counted(tokenizer):
    rows = table(prompt=["w1", "w1"], chosen=["w2", "w3"], rejected=["w2", "w4"])
    with pytest.warns(UserWarning, match="1 of 2 pairs have the same tokens chosen and rejected; dropped"):
        (pair,) = encode_pairs(rows, tokenizer)
    assert pair.chosen.completion_ids == [7, EOS]


@pytest.fixture
def bos_tokenizer():
    """A word tokenizer whose post-processor puts BOS before every text, as Llama's does."""
    from tokenizers import processors

    tok = word_tokenizer(numbered_words(10))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return tok


def test_every_data_shape_starts_the_same_way(bos_tokenizer):
    """Issue 18.3: one framing for every shape: the tokenizer's BOS once at the start, whether
    the row has a prompt (as PPO prompts have) or not (text rows, pairs without a prompt)."""
    from tether.data import encode_prompts

    (with_prompt,) = encode_sequences(table(prompt=["w1"], completion=["w2"]), bos_tokenizer)
    (text_row,) = encode_sequences(table(text=["w1 w2"]), bos_tokenizer)
    (pair,) = encode_pairs(table(chosen=["w1 w2"], rejected=["w3"]), bos_tokenizer)
    (ppo_prompt,) = encode_prompts(table(prompt=["w1"]), bos_tokenizer)
    assert with_prompt.ids == text_row.ids == [1, 5, 6, EOS]
    assert pair.chosen.ids == [1, 5, 6, EOS] and pair.rejected.ids == [1, 7, EOS]
    assert ppo_prompt == [1, 5]


def test_conversations_without_a_prompt_share_their_common_first_messages(tokenizer):
    """Issue 18.4: the rejected conversation keeps its own turns; the shared first messages are
    the prompt."""
    user = {"role": "user", "content": "w1"}
    chosen = [user, {"role": "assistant", "content": "w2"}, {"role": "user", "content": "w3"},
              {"role": "assistant", "content": "w4"}]
    rejected = [*chosen[:3], {"role": "assistant", "content": "w5 w6"}]
    (pair,) = encode_pairs(datasets.Dataset.from_list([{"chosen": chosen, "rejected": rejected}]), tokenizer)
    user_id, assistant_id = tokenizer.convert_tokens_to_ids(["user:", "assistant:"])
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids == [user_id, 5, assistant_id, 6, user_id, 7, assistant_id]
    assert pair.chosen.completion_ids == [8, EOS] and pair.rejected.completion_ids == [9, 10, EOS]


def test_conversations_that_part_before_the_last_assistant_turn_are_refused(tokenizer):
    chosen = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    rejected = [{"role": "user", "content": "w3"}, {"role": "assistant", "content": "w2"}]
    rows = datasets.Dataset.from_list([{"chosen": chosen, "rejected": chosen}, {"chosen": chosen, "rejected": rejected}])
    with pytest.raises(DataError, match="row 1: the chosen and rejected conversations differ before"):
        encode_pairs(rows, tokenizer)


@pytest.mark.parametrize("where", ["prompt", "completion", "messages"])
def test_null_message_content_is_refused(tokenizer, where):
    """Issue 18.5: a null content was rendered as empty text; it is refused like a null completion."""
    null = [{"role": "user", "content": None}]
    fine = [{"role": "user", "content": "w1"}]
    if where == "messages":
        rows = datasets.Dataset.from_list([{"messages": [*null, {"role": "assistant", "content": "w2"}]}])
    else:
        reply = [{"role": "assistant", "content": "w2"}]
        rows = datasets.Dataset.from_list(
            [{"prompt": null if where == "prompt" else fine, "completion": null if where == "completion" else reply}]
        )
    with pytest.raises(DataError, match="row 0 of column .*: message 0 \\(user\\) has no content"):
        encode_sequences(rows, tokenizer)


def test_a_null_prompt_is_refused(tokenizer):
    with pytest.raises(DataError, match="row 1 of column 'prompt' is null"):
        encode_sequences(table(prompt=["w1", None], completion=["w2", "w3"]), tokenizer)
    with pytest.raises(DataError, match="row 0 of column 'prompt' is null"):
        encode_pairs(table(prompt=[None], chosen=["w2"], rejected=["w3"]), tokenizer)


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
