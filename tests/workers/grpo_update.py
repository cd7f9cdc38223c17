"""Worker for tests/test_grpo.py: one round's learning (advantages and optimizer steps) of GRPO
and RLOO on a fixed global rollout, for several loss types.

Run in one process or under ``torchrun --nproc_per_node 2``. Every process loads the same
gathered rollout (sampling differs per process, so the test fixes it) and calls ``learn``;
process 0 writes the policy weights and the metrics of each kind.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tether.config import GRPOConfig, RLOOConfig  # noqa: E402
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer  # noqa: E402
from tether.trainers.grpo import GRPOTrainer, RLOOTrainer  # noqa: E402

PROMPTS = [" ".join(f"w{(3 * i + j) % 16}" for j in range(1 + i % 5)) for i in range(16)]
# Which kinds the split must not change: bnpo normalises by each process's tokens, so it is
# the same for splits into micro-batches only (tested in-process).
KINDS = ("grpo", "dapo", "dr_grpo", "rloo")


def w5_fraction(completions, **_):
    return [text.split().count("w5") / max(len(text.split()), 1) for text in completions]


def build(out: Path, kind: str, per_device: int, accumulation: int):
    """A trainer whose round is 8 completions (2 prompts x 4), trained on for 2 iterations of
    one optimizer step; ``per_device x accumulation x processes`` must be 8."""
    tokenizer = word_tokenizer(numbered_words(16))
    policy = tiny_causal_lm(tokenizer, seed=0, arch="llama", hidden_size=32, num_layers=2, num_heads=2)
    # adam_epsilon 1e-4: an element whose gradient is rounding noise moves by ~lr * g / eps,
    # not by ~lr whatever its size (see tests/workers/ppo_update.py)
    common = dict(
        output_dir=str(out / kind), device="cpu", seed=3, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, generation_batch_size=8, num_generations=4, num_iterations=2,
        max_completion_length=6, learning_rate=1e-3, adam_epsilon=1e-4, max_steps=2, report_to=[],
        disable_tqdm=True,
    )
    if kind == "rloo":
        return RLOOTrainer(RLOOConfig(**common, beta=0.1), tokenizer, policy, w5_fraction, list(PROMPTS))
    config = GRPOConfig(**common, loss_type=kind, beta=0.1, epsilon_high=0.28)
    return GRPOTrainer(config, tokenizer, policy, w5_fraction, list(PROMPTS))


def learn(trainer, rollout) -> tuple[dict, dict]:
    torch.manual_seed(0)  # the minibatch order every process draws alike
    metrics = trainer.learn(copy.deepcopy(rollout))
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rollouts = torch.load(args.rollouts, weights_only=False)
    results, world_size = {}, 1
    for kind in KINDS:
        trainer = build(Path(args.out), kind, args.per_device, args.accumulation)
        world_size = trainer.parallel.world_size
        results[kind] = learn(trainer, rollouts[kind])
        is_main = trainer.parallel.is_main
        trainer.parallel.barrier()
    if is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"results": results, "world_size": world_size}, Path(args.out) / "result.pt")


if __name__ == "__main__":
    main()
