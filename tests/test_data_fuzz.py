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


def load_and_encode(path: Path, column=None, max_prompt_length=None):
    table = load_table(str(path))
    prompts = encode_prompts(table, TOKENIZER, column, max_prompt_length)
    assert len(prompts) == table.num_rows
    for ids in prompts:
        assert ids and all(0 <= i < len(TOKENIZER) for i in ids)
        assert max_prompt_length is None or len(ids) <= max_prompt_length


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows, max_prompt_length=st.none() | st.integers(1, 4))
def test_any_jsonl_rows_load_or_raise_data_error(rows, max_prompt_length):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        try:
            load_and_encode(path, max_prompt_length=max_prompt_length)
        except DataError as error:
            assert "\n" not in str(error)


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_arbitrary_bytes_load_or_raise_data_error(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_bytes(content)
        try:
            load_and_encode(path)
        except DataError as error:
            assert "\n" not in str(error)
