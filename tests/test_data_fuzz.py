"""Fuzzing the data path: whatever a prompt file holds, loading it either works or raises DataError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.data import encode_prompts, load_table
from tether.errors import DataError
from tether.tiny import numbered_words, word_tokenizer

TOKENIZER = word_tokenizer(numbered_words(30))
TOKENIZER.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=3),
    max_leaves=8,
)
rows = st.lists(st.dictionaries(st.sampled_from(["prompt", "messages", "input_ids", "text", "other"]), json_values,
                                min_size=1, max_size=3), max_size=6)
# Rows a user would write: text, chats and token ids, so that fuzzing reaches the encoders.
words = st.lists(st.sampled_from(numbered_words(30) + ["zz", "w"]), min_size=1, max_size=6).map(" ".join)
prompt_values = (
    words
    | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": words}), min_size=1,
               max_size=3)
    | st.lists(st.integers(0, 33), min_size=1, max_size=6)
)
valid_rows = st.lists(st.fixed_dictionaries({"prompt": prompt_values}), min_size=1, max_size=6)
valid_files = st.lists(words, min_size=1, max_size=5).map(
    lambda texts: "".join(json.dumps({"prompt": t}) + "\n" for t in texts).encode()
)


def load_and_encode(path: Path, column=None, max_prompt_length=None):
    table = load_table(str(path))
    prompts = encode_prompts(table, TOKENIZER, column, max_prompt_length)
    assert len(prompts) == table.num_rows
    for ids in prompts:
        assert ids and all(0 <= i < len(TOKENIZER) for i in ids)
        assert max_prompt_length is None or len(ids) <= max_prompt_length


def test_any_jsonl_rows_load_or_raise_data_error():
    """Both outcomes occur: a fuzz run in which every input is refused would prove nothing."""
    outcomes = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=rows | valid_rows, max_prompt_length=st.none() | st.integers(1, 4))
    def check(rows, max_prompt_length):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "prompts.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            outcomes.append(outcome(path, max_prompt_length=max_prompt_length))

    check()
    assert outcomes.count("loaded") >= 10 and outcomes.count("refused") >= 10, outcomes.count("loaded")


def test_arbitrary_bytes_load_or_raise_data_error():
    outcomes = []

    @settings(max_examples=100, deadline=None)
    @given(content=st.binary(max_size=200) | valid_files, suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
    def check(content, suffix):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"prompts{suffix}"
            path.write_bytes(content)
            outcomes.append(outcome(path))

    check()
    assert outcomes.count("loaded") >= 5 and outcomes.count("refused") >= 5, outcomes.count("loaded")


def outcome(path: Path, **options) -> str:
    """``loaded`` (every prompt checked) or ``refused`` (a one-line DataError)."""
    try:
        load_and_encode(path, **options)
    except DataError as error:
        assert "\n" not in str(error)
        return "refused"
    return "loaded"
