"""What sharing one prefill per group saves in generation: G-W2's model, 8 prompts x 4 samples.

    python bench/prefill.py [--prompt-tokens 16 256] [--length 128]

Times ``generate_responses`` (median of 3 after a warm-up) with each group's prompt prefilled
once and its KV cache copied to the group's rows, against every row prefilled on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import WORKLOADS, build, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    from transformers import AutoModelForCausalLM

    from tether.rollout import generate
    from tether.rollout.generate import generate_responses, sampling_config

    folder = build(WORKLOADS["W2"], HERE / ".fixtures")
    model = AutoModelForCausalLM.from_pretrained(folder / "policy").eval()
    config = sampling_config(options.length, 0.7, [], 0)  # no stop: every row decodes the whole length
    shared_rows = generate._distinct_rows
    for tokens in options.prompt_tokens:
        torch.manual_seed(0)
        prompts = torch.randint(4, 32000, (8, tokens)).repeat_interleave(4, dim=0)  # [32, tokens]
        mask = torch.ones_like(prompts, dtype=torch.bool)

        def run() -> None:
            generate_responses(model, prompts, mask, config, 32)

        shared = timed(run, 3)
        generate._distinct_rows = lambda *_: (None, None)
        each = timed(run, 3)
        generate._distinct_rows = shared_rows
        print(f"| {tokens} prompt tokens, {options.length} sampled | {each:.0f} ms | {shared:.0f} ms | "
              f"{each / shared:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
