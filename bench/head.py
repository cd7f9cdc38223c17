"""The output layer's logprobs (``head_logprobs``) at the three workloads' shapes: blocks of
vocabulary entries (tether's CPU default) against whole rows (its layout before, and still the
one on an accelerator), forward and backward and without gradients.

    python bench/head.py            # W1 W2 W3 shapes, 2 threads
    python bench/head.py W1 --entropy   # with the entropy too, as PPO's training pass asks

To compare two checkouts, run it in each (``PYTHONPATH=<checkout> python bench/head.py``).

Shapes: the rows of one PPO micro-batch's response tokens (W1 16 x 32, W2 16 x 128, W3 16 x 256),
the hidden size and the vocabulary. Prints the median milliseconds of each and their ratio; the
two layouts alternate, so a drift in machine speed hits both.
"""

from __future__ import annotations

import argparse

import torch

from tether.ops.logprobs import head_logprobs
from workloads import timed  # bench/, the script's own folder

SHAPES = {"W1": (512, 256, 8192), "W2": (2048, 256, 32000), "W3": (4096, 128, 128000)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--entropy", action="store_true", help="also the entropy (PPO's training pass)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print("| shape | rows x hidden x vocab | pass | whole rows ms | blocks ms | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in options.shapes:
        rows, hidden_size, vocab = SHAPES[name]
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, rows, hidden_size, generator=generator).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).requires_grad_()
        tokens = torch.randint(0, vocab, (1, rows), generator=generator)
        upstream = torch.randn(1, rows, generator=generator)

        def train(columns):
            head_logprobs(hidden, weight, None, tokens, 0.7, with_entropy=options.entropy,
                          block_columns=columns)[0].backward(upstream)

        def score(columns):
            with torch.no_grad():
                head_logprobs(hidden, weight, None, tokens, 0.7, with_entropy=options.entropy, block_columns=columns)

        for label, step in (("forward + backward", train), ("no gradients", score)):
            whole = timed(lambda: step(vocab), options.repeats)
            blocks = timed(lambda: step(None), options.repeats)
            shape = f"{rows} x {hidden_size} x {vocab}"
            print(f"| {name} | {shape} | {label} | {whole:.1f} | {blocks:.1f} | {whole / blocks:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
