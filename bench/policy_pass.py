"""The policy's logprob pass (``policy_logprobs``) on one micro-batch of a workload's shape whose
responses stop early, as real rollouts do: forward + backward, and without gradients.

    python bench/policy_pass.py W2                  # 16 rows, each stopping after 1..128 tokens
    python bench/policy_pass.py W1 W2 --no-stops    # every response runs the full length

Prompts are 8-24 random tokens (left-padded), responses random tokens whose stop position is
uniform over the response columns (about half of them kept). Prints the median milliseconds of
each pass. To see what a change does, run it on two checkouts one after the other
(``PYTHONPATH=<other checkout> python bench/policy_pass.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, build, timed  # noqa: E402


def micro_batch(workload, vocab: int, stops: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows, width = workload.per_device, workload.response
    prompt_lengths = torch.randint(8, 25, (rows,), generator=generator)
    columns = int(prompt_lengths.max())
    query_mask = torch.arange(columns)[None] >= (columns - prompt_lengths)[:, None]
    queries = torch.randint(4, vocab, (rows, columns), generator=generator) * query_mask
    responses = torch.randint(4, vocab, (rows, width), generator=generator)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator) if stops else torch.full((rows,), width)
    return queries, query_mask, responses, torch.arange(width)[None] < lengths[:, None]


def main() -> None:
    from transformers import AutoModelForCausalLM

    from tether.models.forward import policy_logprobs

    parser = argparse.ArgumentParser()
    parser.add_argument("workloads", nargs="*", default=["W1", "W2"])
    parser.add_argument("--no-stops", action="store_true", help="every response runs the full length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print("| workload | rows x response | kept tokens | forward + backward ms | no gradients ms |")
    print("| --- | --- | --- | --- | --- |")
    for name in options.workloads:
        workload = WORKLOADS[name]
        policy = AutoModelForCausalLM.from_pretrained(build(workload, Path(__file__).resolve().parent / ".fixtures") / "policy")
        batch = micro_batch(workload, policy.config.vocab_size, not options.no_stops)
        mask = batch[3]

        def with_gradients():
            logprobs, _ = policy_logprobs(policy, *batch, 0.7, 1024, with_entropy=True)
            (logprobs * mask).sum().backward()

        def without_gradients():
            with torch.no_grad():
                policy_logprobs(policy, *batch, 0.7, 1024)

        print(f"| {name} | {mask.size(0)} x {mask.size(1)} | {mask.float().mean().item():.0%} "
              f"| {timed(with_gradients, options.repeats):.1f} | {timed(without_gradients, options.repeats):.1f} |")


if __name__ == "__main__":
    main()
