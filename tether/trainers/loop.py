"""The step loop SFT and reward-model training share: output folder, resume, logs, checkpoints.

A trainer hands over what differs — one step with its evaluation (``advance``), a status line,
its checkpoint state and models — and ``run_steps`` does the rest the same way for each:

    check output_dir -> restore a checkpoint -> [advance -> log -> stop on non-finite
    -> checkpoint every save_steps, at the end and on SIGTERM/SIGINT] -> close trackers

GRPO and RLOO run on it too. (PPO keeps its own loop in ``ppo.py``: its updates carry rollouts, sample tables and a KL
controller.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import signal

from tether.checkpoint import (
    Interrupted,
    StopSignals,
    check_progress,
    check_resumed_config,
    prepare_output_dir,
    resumed_logs,
    say_extension,
    unlogged_steps,
)
from torch import nn

from tether.config import TrainingConfig, config_values, save_config
from tether.logging import LoggedRows, MetricsFile, console, progress_bar
from tether.models.loading import DropoutOff
from tether.trainers.common import Cadence, stop_if_nonfinite
from tether.trainers.parallel import Parallel


class SteppedTrainer(Protocol):
    command: str  # "sft", "rm": recorded in its checkpoints
    config: TrainingConfig
    dropout: DropoutOff
    cadence: Cadence
    parallel: Parallel
    step_count: int
    total_steps: int
    nonfinite_in_a_row: int
    latest_metrics: tuple[str, ...]  # counts since the start, settings (a logged row keeps the last)
    summed_metrics: tuple[str, ...]  # counts per step (a logged row adds them up)

    def advance(self) -> tuple[dict[str, float], bool]:
        """One optimizer step plus whatever evaluation is due; ``(metrics, evaluated)``."""

    def status(self, metrics: dict[str, float]) -> str: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def checkpointed_models(self) -> dict[str, nn.Module]:
        """The models a checkpoint holds, by name (the trained one, and any other that changes)."""


def save_checkpoint(trainer, unlogged: list[dict]) -> Path:
    """``<output_dir>/checkpoint-<step>`` with the trainer's models and state (see tether.checkpoint),
    and the metrics of the ``unlogged`` steps since the last logged row (the next row's mean)."""
    state = {**trainer.state_dict(), "config": config_values(trainer.config), "command": trainer.command,
             "unlogged": unlogged}
    with trainer.dropout.original_configs():
        return trainer.parallel.write_checkpoint(
            trainer.output_dir, trainer.step_count, trainer.checkpointed_models(), trainer.tokenizer, trainer.optimizer,
            trainer.scheduler, state, trainer.config.save_total_limit,
        )


def resume(trainer, checkpoint: Path) -> list[dict]:
    """Restore ``checkpoint`` into ``trainer``; returns the metrics of its unlogged steps."""
    say = lambda message: console.print(f"[yellow]{message}")  # noqa: E731
    changes = check_resumed_config(checkpoint, trainer.config, say, trainer.command)
    state = trainer.parallel.restore_checkpoint(checkpoint, trainer.checkpointed_models(), trainer.optimizer,
                                                trainer.scheduler)
    for recorded in ("config", "command", "world_size", "engine", "format"):  # checked before the restore
        state.pop(recorded, None)
    unlogged = unlogged_steps(checkpoint, state.pop("unlogged", []))
    trainer.load_state_dict(state)
    check_progress(checkpoint, trainer.step_count, trainer.total_steps)
    say_extension(changes, trainer.scheduler, trainer.total_steps, say)
    return unlogged


def run_steps(trainer: SteppedTrainer, name: str, resume_from_checkpoint: bool | str | None) -> list[dict[str, float]]:
    """Every remaining step of ``trainer``; returns this call's per-step metrics (also in metrics.jsonl).

    ``resume_from_checkpoint`` (default: the config's) is True for the newest checkpoint in
    ``output_dir`` or a checkpoint's path; without it a non-empty ``output_dir`` is refused
    unless ``overwrite_output_dir``.
    """
    config, parallel = trainer.config, trainer.parallel
    parallel.check_checkpointable(trainer.checkpointed_models(), saves=config.save_strategy != "no")
    wanted = config.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
    # Only the main process checks, clears and writes the output folder; all stop on its refusal.
    checkpoint = parallel.share(lambda: prepare_output_dir(trainer.output_dir, wanted, config.overwrite_output_dir))
    metrics_file = MetricsFile(trainer.output_dir)
    rows = LoggedRows(trainer.latest_metrics, trainer.summed_metrics)  # the main process's
    if checkpoint is not None:  # refuses a changed config before anything is written
        rows.pending = parallel.together(lambda: resume(trainer, checkpoint))
        trainer.reporters.resume_after(trainer.step_count)
    if parallel.is_main:
        save_config(config, trainer.output_dir / "config.yaml")
    if checkpoint is not None:
        parallel.barrier()  # every process has read the checkpoint before the logs change
        if parallel.is_main:
            resumed_logs(trainer.output_dir, checkpoint, keep=lambda step: step <= trainer.step_count)
            console.print(f"resuming from {checkpoint} at step {trainer.step_count} of {trainer.total_steps}")
    history = []
    cadence = trainer.cadence
    trainer.dropout.apply()
    try:
        with StopSignals() as stop, progress_bar(name, enabled=parallel.is_main and not config.disable_tqdm) as progress:
            task = progress.add_task(name.lower(), total=trainer.total_steps, completed=trainer.step_count, status="")
            while trainer.step_count < trainer.total_steps:
                metrics, evaluated = trainer.advance()
                step = trainer.step_count
                history.append(metrics)
                if parallel.is_main:
                    rows.log(metrics, step, cadence.logs(step, evaluated), metrics_file, trainer.reporters)
                stop_if_nonfinite(trainer.nonfinite_in_a_row, config.max_nonfinite_steps, f"up to step {step}",
                                  said_elsewhere=not parallel.is_main)
                stopping = parallel.any_process(stop.requested is not None)  # all stop at the same step
                saved = None
                if cadence.saves(step) or (stopping and cadence.saves_on_signal):
                    saved = save_checkpoint(trainer, rows.pending)
                if stopping:
                    raise Interrupted(stop.requested or signal.SIGTERM, saved, said_elsewhere=not parallel.is_main)
                progress.update(task, advance=1, status=trainer.status(metrics))
    finally:
        trainer.reporters.close()
        trainer.dropout.restore()  # the caller's model as it came
    return history
