"""Tiny models and tokenizers built locally: for tests, the demo and the benchmarks.

Nothing here downloads anything. The tokenizer is word-level over a fixed vocabulary, the
models are randomly initialised from a config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def word_tokenizer(
    words: Sequence[str], pad_token: str | None = "<pad>", padding_side: str = "left"
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``<pad> <bos> <eos> <unk>`` followed by ``words``.

    Ids: pad 0, bos 1, eos 2, unk 3, then the words in order. ``pad_token=None`` leaves the
    pad token unset; ``pad_token="<eos>"`` makes pad equal EOS.
    """
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    if pad_token is not None:
        special["pad_token"] = pad_token
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side, **special)


def numbered_words(count: int) -> list[str]:
    return [f"w{i}" for i in range(count)]


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    vocab_size: int | None = None,
):
    """A small Llama (RoPE) or GPT-2 (absolute positions) config matching ``tokenizer``."""
    vocab_size = vocab_size or len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common = dict(
        vocab_size=vocab_size,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or hidden_size * 11 // 4,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            **common,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'gpt2'")


def tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(tokenizer, **config_kwargs))


def tiny_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 1, **config_kwargs):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(tokenizer, **config_kwargs))
