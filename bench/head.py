"""The output layer's logprobs (``head_logprobs``) at the three workloads' shapes: blocks of
vocabulary entries (tether's CPU default, ``CPU_BLOCK_COLUMNS``) against whole rows (its layout
before, and still the one on an accelerator) or against other block widths, forward and
backward and without gradients.

    python bench/head.py                       # W1 W2 W3 shapes, whole rows against the default
    python bench/head.py W1 --entropy          # with the entropy too, as PPO's training pass asks
    python bench/head.py --columns 512,1024,2048 --entropy   # block widths side by side

To compare two checkouts, run it in each (``PYTHONPATH=<checkout> python bench/head.py``).

Shapes: the rows of one PPO micro-batch's response tokens (W1 16 x 32, W2 16 x 128, W3 16 x 256),
the hidden size and the vocabulary. Prints the median milliseconds of each width; the widths
take turns call by call, so a drift in machine speed hits them all.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from tether.ops.logprobs import CPU_BLOCK_COLUMNS, head_logprobs

SHAPES = {"W1": (512, 256, 8192), "W2": (2048, 256, 32000), "W3": (4096, 128, 128000)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--entropy", action="store_true", help="also the entropy (PPO's training pass)")
    parser.add_argument("--columns", help="block widths to compare, comma-separated (default: whole rows and "
                        f"tether's {CPU_BLOCK_COLUMNS})")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    widths = [int(w) for w in options.columns.split(",")] if options.columns else [None, CPU_BLOCK_COLUMNS]
    names = ["whole rows" if w is None else f"{w} wide" for w in widths]
    print(f"| shape | rows x hidden x vocab | pass | {' | '.join(n + ' ms' for n in names)} |")
    print("| --- | --- | --- |" + " --- |" * len(widths))
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
            calls = [functools.partial(step, vocab if w is None else w) for w in widths]
            times = " | ".join(f"{ms:.1f}" for ms in timed_in_turn(calls, options.repeats))
            print(f"| {name} | {rows} x {hidden_size} x {vocab} | {label} | {times} |", flush=True)


def timed_in_turn(calls, repeats: int) -> list[float]:
    """Median milliseconds of each of ``calls``, called in turn ``repeats`` times after a warm-up."""
    times = [[] for _ in calls]
    for repeat in range(repeats + 1):
        for call, seconds in zip(calls, times):
            start = time.perf_counter()
            call()
            if repeat:
                seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) * 1e3 for seconds in times]


if __name__ == "__main__":
    main()
