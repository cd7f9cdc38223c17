"""Datasets → prompts (text, chat or token ids) → left-padded batches."""

from tether.data.prompts import (
    PROMPT_COLUMNS,
    Prompts,
    PromptSampler,
    encode_prompt_values,
    encode_prompts,
    is_chat,
    left_pad,
    load_prompts,
    load_table,
    load_test_split,
    prompt_column_values,
    prompt_text,
)

__all__ = [
    "PROMPT_COLUMNS", "Prompts", "PromptSampler", "encode_prompt_values", "encode_prompts", "is_chat", "left_pad",
    "load_prompts", "load_table", "load_test_split", "prompt_column_values", "prompt_text",
]
