"""Datasets → prompts (text, chat or token ids) → left-padded batches."""

from tether.data.prompts import (
    PROMPT_COLUMNS,
    PromptSampler,
    encode_prompt_values,
    encode_prompts,
    is_chat,
    left_pad,
    prompt_column_values,
    load_table,
    load_test_split,
)

__all__ = ["PROMPT_COLUMNS", "PromptSampler", "encode_prompt_values", "encode_prompts", "is_chat", "left_pad", "prompt_column_values", "load_table", "load_test_split"]
