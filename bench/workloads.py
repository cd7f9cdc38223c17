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
    # GPU rows (``--device cuda``): Llama shapes of about 134M and 1.1B parameters
    "G1": Workload("G1", 32000, 768, 12, 12, 2048, batch=64, response=128, epochs=2, minibatches=2),
    "G2": Workload("G2", 32000, 2048, 16, 16, 5632, batch=32, response=128, epochs=1, minibatches=1),
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


def matmul_flops(device: str = "cpu", bf16: bool = False, repeats: int = 5) -> float:
    """FLOP/s of a large matmul on this machine, now (the roofline the update is measured against):
    2048² fp32 on CPU; 8192² on CUDA, in bf16 for a bf16 row."""
    import time

    size = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if bf16 and device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def timed(call, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``call``, after one warm-up call (buffers,
    thread pool)."""
    import statistics
    import time

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def trl_step_clock(seconds: list[float]):
    """A ``TrainerCallback`` that appends the seconds of each TRL optimizer step to ``seconds``."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        started = 0.0

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            seconds.append(time.perf_counter() - self.started)

    return StepClock()
