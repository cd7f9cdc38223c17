"""Worker for tests/test_dpo.py: one DPO optimizer step on 8 fixed pairs, for several loss types.

Run in one process or under ``torchrun --nproc_per_node 2``; every process draws the same global
batch and trains on its share. Process 0 writes the policy weights and the metrics of each kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tether.config import DPOConfig  # noqa: E402
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer  # noqa: E402
from tether.trainers.dpo import DPOTrainer  # noqa: E402

# prompts of 1-4 words, completions of 1-5: every micro-batch is padded differently
PAIRS = [
    {"prompt": " ".join(f"w{(3 * i + j) % 16}" for j in range(1 + i % 4)),
     "chosen": " ".join(["w5"] + [f"w{(i + j) % 16}" for j in range(i % 5)]),
     "rejected": " ".join(f"w{(7 * i + j) % 16}" for j in range(1 + (i + 2) % 4))}
    for i in range(8)
]
KINDS = {"sigmoid": dict(loss_type="sigmoid"), "sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
         "ipo": dict(loss_type="ipo"), "apo_zero": dict(loss_type="apo_zero"),
         "precomputed": dict(loss_type="sigmoid", precompute_ref_log_probs=True, precompute_ref_batch_size=3)}


def build(out: Path, kind: str, per_device: int, accumulation: int, **fields) -> DPOTrainer:
    """A trainer whose optimizer step takes all 8 pairs: ``per_device x accumulation x processes`` = 8."""
    tokenizer = word_tokenizer(numbered_words(16))
    model = tiny_causal_lm(tokenizer, seed=0, arch="llama", hidden_size=32, num_layers=2, num_heads=2)
    # adam_epsilon 1e-4: an element whose gradient is rounding noise moves by ~lr * g / eps
    config = DPOConfig(output_dir=str(out / kind), device="cpu", seed=3, per_device_train_batch_size=per_device,
                       gradient_accumulation_steps=accumulation, learning_rate=1e-3, adam_epsilon=1e-4, max_steps=1,
                       beta=0.5, report_to=[], disable_tqdm=True, **{**KINDS[kind], **fields})
    return DPOTrainer(config, tokenizer, model, list(PAIRS))


def step(trainer: DPOTrainer) -> tuple[dict, dict]:
    metrics = trainer.step()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results, world_size, is_main = {}, 1, True
    for kind in KINDS:
        trainer = build(Path(args.out), kind, args.per_device, args.accumulation)
        world_size, is_main = trainer.parallel.world_size, trainer.parallel.is_main
        results[kind] = step(trainer)
        trainer.parallel.barrier()
    if is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"results": results, "world_size": world_size}, Path(args.out) / "result.pt")


if __name__ == "__main__":
    main()
