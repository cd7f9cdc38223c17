"""Set-up the RL trainers (PPO, GRPO, RLOO) share, before anything is trained.

* ``load_prompt_sets``: the training and evaluation prompts, every row encoded and checked;
* ``refuse_column_clashes``: a dataset column may not take the name of an argument tether
  passes reward and metric functions, and each argument they need must be given;
* ``check_and_place``: every model's vocabulary against its tokenizer and its learned positions
  against the longest prompt + completion, said once, then moved to the training device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tether.data import Prompts, load_prompts
from tether.errors import DataError
from tether.models.loading import check_positions, check_vocabulary
from tether.scoring.functions import PASSED_NAMES, UserFunction
from tether.trainers.common import say_if_nothing_to_evaluate


def load_prompt_sets(config, tokenizer, train_dataset, eval_dataset) -> tuple[Prompts, Prompts | None]:
    """``(training prompts, evaluation prompts or None)`` as ``config`` reads them
    (``prompt_column``, ``max_prompt_length``, ``prompt_truncation``, ``remove_unused_columns``);
    a warning when ``eval_strategy`` asks for evaluation without evaluation prompts."""

    def load(data, what: str) -> Prompts:
        return load_prompts(
            data, tokenizer, config.prompt_column, config.max_prompt_length, config.prompt_truncation,
            other_columns=not config.remove_unused_columns, what=what,
        )

    training = load(train_dataset, "training")
    evaluation = load(eval_dataset, "evaluation") if eval_dataset is not None else None
    say_if_nothing_to_evaluate(config, len(evaluation or ()), "prompts")
    return training, evaluation


def refuse_column_clashes(columns: Iterable[str], functions: Iterable[UserFunction | None]) -> None:
    """Before any sampling: a column named like an argument tether passes, or an argument of a
    function (TRL's keyword convention) that neither tether nor a dataset column gives."""
    columns = list(columns)
    for function in filter(None, functions):
        if not function.keywords:
            continue
        clash = sorted(set(columns) & set(PASSED_NAMES))
        if clash:
            raise DataError(
                f"dataset column(s) {', '.join(clash)} have the name of an argument tether passes {function.name} "
                f"({', '.join(PASSED_NAMES)}); rename the column(s)"
            )
        missing = [name for name in function.required if name not in (*PASSED_NAMES, *columns)]
        if missing:
            raise DataError(
                f"{function.what} {function.name} takes {', '.join(missing)}, which no dataset column gives (the "
                f"dataset's other columns: {', '.join(columns) or 'none'}); rename the column or the argument, or "
                "give the argument a default"
            )


def check_and_place(
    models: dict[str, nn.Module], tokenizer, device: torch.device, *, longest: int, needs: str, fix: str,
    own_tokenizers: dict[str, object], warn: Callable[[str], None],
) -> None:
    """Check each of ``models`` (by name) against ``tokenizer`` (``own_tokenizers[name]`` for a
    reward model with a tokenizer of its own, whose positions count its own re-encoded text)
    and ``longest`` positions (``needs``: what needs them; ``fix``: how to need fewer); move it
    to ``device``. A rotary model's extrapolation is said once, however many models share it."""
    extrapolated = set()
    for name, model in models.items():
        own = own_tokenizers.get(name)
        check_vocabulary(own if own is not None else tokenizer, model, name)
        if own is None:
            extrapolated.add(check_positions(model, longest, name, needs, fix))
        model.to(device)
    for message in sorted(filter(None, extrapolated)):
        warn(message)
