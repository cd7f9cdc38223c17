"""Shared fixtures: a word-level tokenizer and tiny fp32 models built locally (no network).

Ids of ``tokenizer``: pad 0, bos 1, eos 2, unk 3, then ``w0 .. w19`` as 4 .. 23.
The model fixtures are function-scoped: every test gets a fresh, unmodified model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

# The models here are tiny: one thread is fastest, and on a busy shared CPU several OpenMP
# threads spin-wait on each 32x32 matmul (tens of ms each instead of microseconds).
torch.set_num_threads(1)

# Subprocesses (``python -m tether``, torchrun, accelerate launch) run from temporary folders:
# they must import this checkout, not whichever copy of tether is installed in editable mode.
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

TINY = dict(hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(autouse=True)
def restore_deterministic_algorithms():
    """``full_determinism`` switches torch process-wide: switch it back after each test."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture(scope="session")
def tokenizer():
    """Word tokenizer with a dedicated pad token (pad 0 != eos 2)."""
    return word_tokenizer(numbered_words(20))


@pytest.fixture
def policy(tokenizer):
    """A tiny Llama causal LM in eval mode (seed 0)."""
    return tiny_causal_lm(tokenizer, seed=0, arch="llama", **TINY).eval()


@pytest.fixture
def reward_model(tokenizer):
    """A tiny Llama sequence-classification model with one label, in eval mode (seed 1)."""
    return tiny_reward_model(tokenizer, seed=1, arch="llama", **TINY).eval()
