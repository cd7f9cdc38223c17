"""Worker for tests/test_parallel.py: one PPO update on a fixed global rollout.

Run in one process (``python tests/workers/ppo_update.py ...``) or several (``torchrun
--nproc_per_node 2 tests/workers/ppo_update.py ...``). Every process loads the same global
rollout (sampling differs per process, so the test fixes it), computes advantages and runs
``optimise``; process 0 writes the policy and value weights and the update's metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.test_ppo_trainer import PROMPTS, make_config, make_policy, make_tokenizer, w5_fraction  # noqa: E402
from tether.models import forward  # noqa: E402
from tether.trainers.ppo import PPOTrainer  # noqa: E402

# adam_epsilon 1e-4: Adam's first steps move an element by ~lr * g / (|g| + eps), so an element
# whose gradient is rounding noise (~1e-9, summed in another order by another split) would move
# by a different ~lr * 1e-3 with eps 1e-8; measured difference with 1e-4: 6e-8 (weights move 4e-3).
COMMON = dict(num_mini_batches=2, num_ppo_epochs=2, learning_rate=1e-3, adam_epsilon=1e-4, total_episodes=16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollout", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = build(Path(args.out), args.per_device, args.accumulation, args.gradient_checkpointing)
    # Every process samples responses to the same prompts with its own generator, as set up
    # by the trainer: the gathered rows must differ.
    samples = trainer.gather(trainer.rollout([trainer.prompts[i] for i in range(8)]))
    full_logits = count_calls(forward, "response_logits")  # the model's own [B, T, V] logits
    params, metrics = update(trainer, torch.load(args.rollout, weights_only=False))
    shards = trainer.parallel.gather_objects(trainer.next_prompt_indices())
    sampled = record_sampled_rows(trainer)
    evaluation = trainer.parallel.gather_objects((*trainer.rollout_maker.evaluate(EVAL_PROMPTS), list(sampled)))
    if trainer.parallel.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = {"params": params, "metrics": metrics, "world_size": trainer.parallel.world_size,
                  "responses": samples.responses, "shards": shards, "full_logits_passes": len(full_logits),
                  "policy_wrapper": type(trainer._policy).__name__, "evaluation": evaluation}
        torch.save(result, Path(args.out) / "result.pt")
    trainer.parallel.barrier()  # leave together, as the command does after saving


# Five prompts for two processes: shares of 3 and 2, the second filled up with an uncounted row.
EVAL_PROMPTS = [[5, 6], [7], [8, 9, 10], [11, 12], [13]]


def record_sampled_rows(trainer: PPOTrainer) -> list:
    """The number of rows of each ``sample`` call of ``trainer``'s rollout maker from now on."""
    rows, sample = [], trainer.rollout_maker.sample

    def recorded(prompt_ids, *chunking):
        rows.append(len(prompt_ids))
        return sample(prompt_ids, *chunking)

    trainer.rollout_maker.sample = recorded
    return rows


def count_calls(module, name: str) -> list:
    """Replace ``module.name`` by a function that records each call, then calls the original."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def build(out: Path, per_device: int, accumulation: int, gradient_checkpointing: bool = False) -> PPOTrainer:
    tokenizer = make_tokenizer()
    config = make_config(
        out, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        gradient_checkpointing=gradient_checkpointing, **COMMON,
    )
    return PPOTrainer(config, tokenizer, make_policy(tokenizer), w5_fraction, list(PROMPTS))


def update(trainer: PPOTrainer, rollout) -> tuple[dict, dict]:
    """Advantages and one ``optimise`` on ``rollout``; the weights and metrics after it."""
    objective = trainer.compute_advantages(rollout)
    torch.manual_seed(0)  # process 0's minibatch permutation, shared with the others
    metrics = {**objective, **trainer.optimise(rollout)}
    params = {f"policy.{n}": p.detach().clone() for n, p in trainer.policy.named_parameters()}
    params.update({f"value.{n}": p.detach().clone() for n, p in trainer.value_model.named_parameters()})
    return params, metrics


if __name__ == "__main__":
    main()
