"""The benchmark workloads of shared/bench/WORKLOADS.md, built locally (nothing downloaded)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Workload:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    batch: int
    response: int
    epochs: int
    minibatches: int

    @property
    def per_device(self) -> int:
        """Rows per micro-batch: one micro-batch per minibatch."""
        return self.batch // self.minibatches


WORKLOADS = {
    "W1": Workload("W1", 8192, 256, 4, 4, 688, batch=32, response=32, epochs=4, minibatches=2),
    "W2": Workload("W2", 32000, 256, 4, 4, 688, batch=16, response=128, epochs=1, minibatches=1),
    "W3": Workload("W3", 128000, 128, 2, 2, 344, batch=16, response=256, epochs=1, minibatches=1),
}


def prompts(count: int = 512, vocab: int = 8192, seed: int = 0) -> list[str]:
    """``count`` prompts of 8-24 uniformly random words."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(rng.randint(8, 24))) for _ in range(count)]


def build(workload: Workload, root: Path) -> Path:
    """Tokenizer, policy and reward model for ``workload`` under ``root/<name>`` (once)."""
    from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer

    folder = root / workload.name
    if (folder / "reward" / "config.json").is_file():
        return folder
    tokenizer = word_tokenizer(numbered_words(workload.vocab - 4))
    shape = dict(hidden_size=workload.hidden, num_layers=workload.layers, num_heads=workload.heads,
                 intermediate_size=workload.mlp, max_positions=512)
    tiny_causal_lm(tokenizer, seed=0, **shape).save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    tiny_reward_model(tokenizer, seed=1, **shape).save_pretrained(folder / "reward")
    tokenizer.save_pretrained(folder / "reward")
    return folder


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this machine, now (the roofline the update is measured against)."""
    import time

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)
