"""Worker for tests/test_parallel.py: the Python API under ``torchrun --nproc_per_node 2`` with
``device`` left at its default (``auto``). Every process trains; each writes what it saw as
``world-<rank>.json`` into ``--out``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tether import PPOConfig, PPOTrainer  # noqa: E402
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = word_tokenizer(numbered_words(20))
    prompts = [" ".join(f"w{(3 * i + j) % 20}" for j in range(2 + i % 3)) for i in range(3)]  # < one batch of 8
    config = PPOConfig(
        output_dir=str(Path(args.out) / "run"), per_device_train_batch_size=4, total_episodes=16,
        num_ppo_epochs=1, response_length=4, num_sample_generations=0,
    )
    trainer = PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), tiny_reward_model(tokenizer), prompts)
    history = trainer.train()
    seen = {"world_size": trainer.parallel.world_size, "device": trainer.device.type,
            "updates": [m["update"] for m in history], "episodes": [m["episode"] for m in history]}
    (Path(args.out) / f"world-{trainer.parallel.rank}.json").write_text(json.dumps(seen))
    trainer.parallel.barrier()  # leave together, as the command does after saving


if __name__ == "__main__":
    main()
