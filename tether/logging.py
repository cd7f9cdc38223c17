"""Where a run's numbers go: ``metrics.jsonl`` always, a progress bar and sample tables on screen."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tether.saving import write_text_atomic

# Several processes (torchrun, accelerate launch): one copy of every message, from process 0.
# Errors are raised, not printed, so every process still reports its own.
console = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) > 0, soft_wrap=True)  # a message is one line


class MetricsFile:
    """Appends one JSON object per line to ``<output_dir>/metrics.jsonl`` and flushes it."""

    def __init__(self, output_dir: str | Path, name: str = "metrics.jsonl"):
        self.path = Path(output_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        line = json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# Where a run is and what it used, not what a step measured: a logged row holds the last step's.
# HF Trainer (and TRL through it) logs the learning rate and grad_norm of the step it logs at.
POSITIONS = ("step", "epoch", "update", "episode", "learning_rate", "lr", "grad_norm")


class LoggedRows:
    """The row ``metrics.jsonl`` and the trackers get at a logged step: each metric's mean over
    the steps since the last logged row, as HF Trainer logs its loss and TRL its other
    metrics (with ``logging_steps`` 1, the step's own numbers).

    ``POSITIONS`` and a trainer's ``latest`` (counts since the start, current settings) keep the
    last step's value; counts per step (``summed``, e.g. skipped steps) are added up. Numbers a step does
    not have (evaluation) are the mean over the steps that have them; non-numbers are the last.
    """

    def __init__(self, latest: tuple[str, ...] = (), summed: tuple[str, ...] = ()):
        self.last = {*POSITIONS, *latest}
        self.summed = set(summed)
        self.pending: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def log(self, metrics: dict, step: int, due: bool, metrics_file: MetricsFile, reporters) -> None:
        """Add a step's ``metrics``; when its row is ``due``, write the row to ``metrics_file`` and
        the trackers (``reporters``) at ``step``."""
        self.add(metrics)
        if due:
            row = self.row()
            metrics_file.write(row)
            reporters.log(row, step=step)

    def row(self) -> dict:
        """The row for every step added since the last row."""
        steps, self.pending = self.pending, []
        row = {}
        for key in dict.fromkeys(key for metrics in reversed(steps) for key in metrics):
            values = [metrics[key] for metrics in steps if key in metrics]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if key in self.last or not numbers:
                row[key] = values[-1]
            elif key in self.summed:
                row[key] = sum(values)
            else:
                row[key] = values[0] if len(values) == 1 else sum(values) / len(values)
        return row


TRACKER_RUNS = "trackers.json"  # the W&B / trackio runs an output_dir logs to, for resuming


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def tracker_names(report_to: str | list[str]) -> list[str]:
    """The trackers ``report_to`` names, each checked: a name tether does not know, or one whose
    package is not installed, is refused in one line (``ConfigError``). ``all`` (as in
    transformers) is every known tracker that is installed; ``none`` is none."""
    import importlib.util

    from tether.errors import ConfigError

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        return [name for name, module in _PACKAGES.items() if importlib.util.find_spec(module) is not None]
    names = [name for name in names if name != "none"]
    for name in names:
        if name not in _PACKAGES:
            known = ", ".join(["all", "none", *_PACKAGES])
            raise ConfigError(f"report_to {name!r} is not supported; use one of {known}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"report_to {name!r} needs the {_PACKAGES[name]} package: pip install {_PACKAGES[name]}")
    return names


class Reporters:
    """Optional experiment trackers named by ``report_to``: tensorboard, wandb, trackio.

    ``report_to`` is checked with the config (``tracker_names``), before any model loads. A resumed
    run (``resume_after``) continues the trackers' runs of its output_dir: W&B and trackio the
    same run (its id is kept in ``trackers.json``), TensorBoard with the events past the
    checkpoint dropped, since the resumed run logs those steps again.
    """

    def __init__(self, report_to: str | list[str], output_dir: str | Path, config: dict):
        self.names = tracker_names(report_to)
        self.output_dir = Path(output_dir)
        self.config = config
        self._writers: dict[str, object] = {}
        self.resumed_at: int | None = None

    def resume_after(self, step: int) -> None:
        """The run continues from a checkpoint taken at ``step``."""
        self.resumed_at = step

    def _writer(self, name: str):
        if name not in self._writers:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                purge_step = None if self.resumed_at is None else self.resumed_at + 1
                self._writers[name] = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge_step)
            elif name == "wandb":
                import wandb

                run_id = self._run_id(name, lambda: wandb.util.generate_id())
                self._writers[name] = wandb.init(
                    config=self.config, dir=str(self.output_dir), id=run_id, resume="allow",
                    project=self.config.get("project"), name=self.config.get("run_name"),
                )
            elif name == "trackio":
                import trackio

                given = self.config.get("run_name")
                run_name = self._run_id(name, lambda: given or f"{self.output_dir.name}-{uuid.uuid4().hex[:8]}")
                project = self.config.get("project") or "tether"
                self._writers[name] = trackio.init(project=project, name=run_name, config=self.config, resume="allow")
        return self._writers[name]

    def _run_id(self, tracker: str, new) -> str:
        """The run a resumed run continues, else ``new()``; kept in ``trackers.json``."""
        path = self.output_dir / TRACKER_RUNS
        runs = json.loads(path.read_text()) if path.is_file() else {}
        if self.resumed_at is None or tracker not in runs:
            runs[tracker] = new()
            write_text_atomic(path, json.dumps(runs, indent=1))
        return runs[tracker]

    def log(self, metrics: dict, step: int) -> None:
        for name in self.names:
            writer = self._writer(name)
            if name == "tensorboard":
                for key, value in metrics.items():
                    writer.add_scalar(key, value, step)
                writer.flush()
            else:
                writer.log(metrics, step=step)

    def close(self) -> None:
        for name, writer in self._writers.items():
            if name == "tensorboard":
                writer.close()
            elif hasattr(writer, "finish"):
                writer.finish()
        self._writers.clear()


def _plain(value):
    """A JSON value for ``value``: a number not finite (a step's loss overflowed, every reward was
    None) is ``null``, which stays strict JSON and reads as NaN in a numeric column."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def progress_bar(description: str, enabled: bool = True) -> Progress:
    """A progress bar on stderr; ``enabled=False`` (processes other than the main one) hides it."""
    return Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not enabled,
    )


def sample_table(title: str, prompts: list[str], responses: list[str], scores: list[float]) -> Table:
    table = Table(title=title, show_lines=True, expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("response", ratio=3, overflow="fold")
    table.add_column("score", justify="right", width=9)
    for prompt, response, score in zip(prompts, responses, scores):
        table.add_row(prompt, response, f"{score:.3f}")
    return table
