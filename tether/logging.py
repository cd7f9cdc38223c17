"""Where a run's numbers go: ``metrics.jsonl`` always, a progress bar and sample tables on screen."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


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


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def progress_bar(description: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def sample_table(title: str, prompts: list[str], responses: list[str], scores: list[float]) -> Table:
    table = Table(title=title, show_lines=True, expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("response", ratio=3, overflow="fold")
    table.add_column("score", justify="right", width=9)
    for prompt, response, score in zip(prompts, responses, scores):
        table.add_row(prompt, response, f"{score:.3f}")
    return table
