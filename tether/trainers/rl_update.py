"""The update loop every RL trainer shares: epochs x minibatches x micro-batches over a rollout.

One rollout batch (all processes' rows, gathered) is trained on for ``epochs`` passes; each
pass draws one permutation shared by all processes and cuts it into ``num_mini_batches``
minibatches, each one optimizer step; every process takes its equal share of a minibatch's rows
and runs them in micro-batches. What differs between PPO, GRPO and RLOO is only the loss of a
micro-batch (``backward``), which gets the ``Minibatch`` it belongs to so that it can normalise
by the whole minibatch's tokens or rows: then the update is the same however the minibatch is
split into micro-batches and processes (``tests/test_parallel.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tether.errors import ConfigError
from tether.rollout.batch import Rollout
from tether.trainers.parallel import Parallel


@dataclass(frozen=True)
class Minibatch:
    """What a micro-batch's loss is normalised by: its minibatch's kept tokens and rows (over
    every process) and this process's kept tokens of it."""

    tokens: int
    sequences: int
    local_tokens: int


def train_on_rollout(
    rollout: Rollout, parallel: Parallel, device: torch.device, *, epochs: int, num_mini_batches: int,
    micro_batch_size: int, models: tuple[nn.Module, ...], backward: Callable[[Rollout, Minibatch], None],
    step: Callable[[], None], steps: int | None = None,
) -> None:
    """``epochs`` x ``num_mini_batches`` optimizer steps on ``rollout`` (only the first ``steps``
    of them when given): ``backward(micro, minibatch)`` for each of this process's micro-batches
    (gradients kept local to ``models`` until a minibatch's last one), then ``step()``. A
    minibatch without a kept token is skipped: nothing to learn, no step (it still counts)."""
    rows = rollout.response_mask.size(0)
    mini_batch_size = math.ceil(rows / num_mini_batches)
    if mini_batch_size % parallel.world_size:
        raise ConfigError(
            f"a minibatch of {mini_batch_size} rows cannot be shared equally by {parallel.world_size} processes"
        )
    share = mini_batch_size // parallel.world_size  # this process's rows of every minibatch
    mini_starts = range(0, rows, mini_batch_size)
    left = epochs * len(mini_starts)
    if steps is not None:
        left = min(left, steps)
    while left > 0:  # an epoch at a time
        order = parallel.same_permutation(rows, device)
        for mini_start in mini_starts[:left]:
            left -= 1
            minibatch = order[mini_start : mini_start + mini_batch_size]
            tokens = int(rollout.response_mask[minibatch].sum())  # over all processes' rows
            if tokens == 0:
                continue
            mine = minibatch[parallel.rank * share : (parallel.rank + 1) * share]
            info = Minibatch(tokens, minibatch.numel(), int(rollout.response_mask[mine].sum()))
            starts = range(0, mine.numel(), micro_batch_size)
            for micro_start in starts:
                micro = rollout.select(mine[micro_start : micro_start + micro_batch_size])
                with parallel.no_sync(*models, skip=micro_start != starts[-1]):
                    backward(micro, info)
            step()
