"""Reward and metric functions as users write them: found, called, and their answers checked.

A function is named in a config as ``module:function`` (found as ``python -m`` finds modules:
the working folder first) or ``path/file.py:function``, or passed from Python as any callable,
a module whose ``forward`` scores texts included. Two calling conventions:

* TRL's, for a function that takes ``completions`` or ``**kwargs``: keyword arguments
  ``prompts`` (as the dataset held them: text, or the message list of a chat), ``completions``
  (the decoded text; after a chat prompt, ``[{"role": "assistant", "content": text}]``),
  ``completion_ids`` (the response's token ids, stop token included, for what the text drops)
  and every other column of the dataset rows (a task's ``answer`` reaches its checker); GRPO
  and RLOO add ``trainer_state`` (``global_step``, ``max_steps``, ``epoch``), ``log_metric(name,
  value)`` and ``log_extra(column, values)`` (a column of the completions table). Only the
  names a function declares are passed unless it takes ``**kwargs``.
* tether's first, ``fn(prompts, responses)``: the same prompts, the responses as text.

A reward function returns one number per completion, or ``None`` where it has no opinion (a
list, a tuple, a 1-D or ``[B, 1]`` tensor or numpy array); anything else is refused in one line
naming the function and the completion. Exceptions keep the file and line they came from.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from tether.errors import ConfigError, RewardError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# what tether passes (the last three from GRPO and RLOO, as TRL does); no column may take a name
PASSED_NAMES = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
_FUNCTION_SPEC = re.compile(r"^(?P<module>[^:]+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


# --- finding a function --------------------------------------------------------------------------

def is_function_spec(spec: str) -> bool:
    """``module:function`` or ``path/file.py:function`` (and not an existing model folder)."""
    return bool(_FUNCTION_SPEC.match(spec)) and not os.path.isdir(spec)


def import_reward_function(spec: str) -> Callable:
    """The function ``spec`` names: ``module:function``, found as ``python -m`` would find it
    (the working folder first, then the installed packages), or ``path/file.py:function``."""
    match = _FUNCTION_SPEC.match(spec)
    if match is None:
        raise ConfigError(f"reward_model_path {spec!r} is not of the form module:function")
    module_name, name = match["module"], match["name"]
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name))
        else:
            # ``python -m tether`` has the working folder on the import path; the ``tether``
            # command (a console script) has its own folder there instead.
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as error:  # the user's module failed to import: say which, why and where
        frames = traceback.extract_tb(error.__traceback__)
        own = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith("<")]
        where = f" ({own[-1].filename}:{own[-1].lineno})" if own and own[-1].filename != __file__ else ""
        raise ConfigError(
            f"cannot import reward module {module_name!r}: {type(error).__name__}: {error}{where}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward module {module_name!r} has no function {name!r}")
    return function


def _import_file(path: Path):
    """Run ``path`` as a module registered in ``sys.modules`` (``dataclasses`` and postponed
    annotations look their module up there), under a name of its own."""
    if not path.is_file():
        raise ConfigError(f"reward function file not found: {path}")
    name = f"tether_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# --- calling one ---------------------------------------------------------------------------------

@dataclass
class TrainerState:
    """What a reward function gets as ``trainer_state`` (TRL hands over transformers'
    ``TrainerState``; these are the fields reward schedules read)."""

    global_step: int = 0  # optimizer steps so far
    max_steps: int = 0  # optimizer steps of the whole run
    epoch: float = 0.0  # passes over the training prompts so far


@dataclass
class FunctionLog:
    """What reward functions report through ``log_metric`` and ``log_extra`` in one round."""

    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    extras: dict[str, list] = field(default_factory=lambda: defaultdict(list))

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[str(name)].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extras[str(column)].extend(values)


def function_name(function: Callable) -> str:
    """A function's own name; a module's or other callable's class name; a partial's function."""
    inner = getattr(function, "func", function)  # functools.partial
    return getattr(inner, "__name__", None) or type(inner).__name__


class UserFunction:
    """A user's reward or metric callable, called in the convention its signature asks for."""

    what = "function"

    def __init__(self, function: Callable, name: str | None = None):
        self.function = function
        self.name = name or function_name(function)
        if isinstance(function, torch.nn.Module):
            function.eval()  # a judge scores as a reward model does: no dropout
        target = function.forward if isinstance(function, torch.nn.Module) else function
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):  # a builtin or C callable: the positional convention
            parameters = {}
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self.keywords = self.takes_any or "completions" in parameters
        self.declared = set(parameters)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        # what a keyword-convention call must give it: parameters without a default
        self.required = [name for name, p in parameters.items() if p.kind in named and p.default is p.empty]

    def call(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list]):
        """The function's answer for these completions (``completions`` in TRL's form: text, or
        a one-message list after a chat prompt)."""
        try:
            if not self.keywords:
                texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
                return self.function(prompts, texts)
            offered = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
            given = offered if self.takes_any else {k: v for k, v in offered.items() if k in self.declared}
            return self.function(**given)
        except Exception as error:
            if isinstance(error, TypeError) and len(traceback.extract_tb(error.__traceback__)) == 1:
                # raised by the call itself: the function's parameters do not fit what it is given
                given = "fn(prompts, responses)" if not self.keywords else (
                    f"keywords {', '.join(dict.fromkeys([*PASSED_NAMES, *columns]))}")
                data_columns = ", ".join(name for name in columns if name not in PASSED_NAMES) or "none"
                raise RewardError(
                    f"{self.what} {self.name} cannot be called with {given}: {error}; take (prompts, responses), or "
                    f"completions and **kwargs (TRL's convention; the dataset's columns: {data_columns})"
                ) from error
            raise RewardError(
                f"{self.what} {self.name} raised {type(error).__name__}: {error} ({_where(error, self.function)})"
            ) from error


def _where(error: BaseException, function: Callable) -> str:
    """``file:line`` where ``error`` came from in the user's own file (else where it was raised)."""
    frames = traceback.extract_tb(error.__traceback__)
    target = getattr(function, "func", function)
    target = type(target).forward if isinstance(target, torch.nn.Module) else target
    try:
        own = inspect.getsourcefile(target)
    except TypeError:
        own = None
    mine = [frame for frame in frames if own and frame.filename == own] or frames
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else "unknown place"


class RewardFunction(UserFunction):
    what = "reward function"

    def __call__(self, prompts, completions, completion_ids, columns) -> torch.Tensor:
        """Scores ``[B]`` float32, NaN where the function answered ``None``."""
        return check_scores(self.call(prompts, completions, completion_ids, columns), self.name, len(prompts))


class MetricFunction(UserFunction):
    what = "metric function"

    def __call__(self, prompts, completions, completion_ids, columns) -> dict[str, float]:
        values = self.call(prompts, completions, completion_ids, columns)
        if not isinstance(values, dict):
            raise RewardError(f"metric function {self.name} must return a dict of name: number, got {type(values).__name__}")
        try:
            return {str(key): float(value) for key, value in values.items()}
        except (TypeError, ValueError, OverflowError) as error:
            raise RewardError(f"metric function {self.name} returned a value that is not a number: {error}") from None


# --- checking an answer --------------------------------------------------------------------------

def check_scores(values, name: str, count: int) -> torch.Tensor:
    """One number (or ``None``: NaN) per completion from reward function ``name``, checked one
    way whatever container it came in; refused in one line naming the completion otherwise."""
    def refuse(reason: str):
        raise RewardError(f"reward function {name} {reason}")

    if isinstance(values, dict):
        refuse(f"returned a dict (keys {', '.join(map(str, list(values)[:3]))}); return one number per completion, in order")
    if torch.is_tensor(values) or isinstance(values, np.ndarray):
        array = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values)
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            refuse(f"returned an array of shape {tuple(array.shape)}; return [{count}] or [{count}, 1] numbers")
        values = array.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        refuse(f"must return a list of numbers, got {type(values).__name__}")
    values = list(values)
    if len(values) != count:
        refuse(f"returned {len(values)} scores for {count} completions")
    scores = []
    for index, value in enumerate(values):
        if value is None:
            scores.append(math.nan)  # no opinion on this completion
            continue
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
            refuse(f"returned {value!r} for completion {index}; every score must be a number (or None)")
        try:
            value = float(value)
        except OverflowError:  # an int past any float
            refuse(f"returned a number for completion {index} that overflows float32 (largest {FLOAT32_MAX:.3g})")
        if not math.isfinite(value):
            refuse(f"returned {value} for completion {index}; scores must be finite (None: no opinion)")
        if abs(value) > FLOAT32_MAX:
            refuse(f"returned {value:g} for completion {index}, which overflows float32 (largest {FLOAT32_MAX:.3g})")
        scores.append(value)
    return torch.tensor(scores, dtype=torch.float32)


def call_reward_function(function: Callable, prompts: list, responses: list[str]) -> torch.Tensor:
    """``function`` called on ``prompts`` and their response texts, its answer checked (no token
    ids or columns: for a quick call; trainers call ``RewardFunction`` with everything)."""
    return RewardFunction(function)(list(prompts), list(responses), [[] for _ in prompts], {})


def combine(scores: list[torch.Tensor], weights: list[float], names: list[str], unscored_allowed: bool = False) -> torch.Tensor:
    """The weighted sum of several functions' scores ``[B]``, each function's ``None`` (NaN)
    left out. A completion no function scored is NaN where ``unscored_allowed`` (GRPO and RLOO
    give it advantage 0), else refused: it would be trained on nothing."""
    stacked = torch.stack(scores, dim=1)  # [B, F]
    unscored = torch.isnan(stacked).all(dim=1)
    if unscored.any() and not unscored_allowed:
        index = int(unscored.nonzero()[0])
        raise RewardError(
            f"no reward function scored completion {index} (all of {', '.join(names)} returned None); "
            "return a number for it from at least one"
        )
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    summed = torch.nansum(weighted, dim=1)
    return torch.where(unscored, torch.full_like(summed, float("nan")), summed)
