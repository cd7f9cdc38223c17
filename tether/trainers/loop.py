"""The step loop SFT and reward-model training share: output folder, resume, logs, checkpoints.

A trainer hands over what differs — one step with its evaluation (``advance``), a status line
and its checkpoint state — and ``run_steps`` does the rest the same way for both:

    check output_dir -> restore a checkpoint -> [advance -> log -> stop on non-finite
    -> checkpoint every save_steps, at the end and on SIGTERM/SIGINT] -> close trackers

(PPO keeps its own loop in ``ppo.py``: its updates carry rollouts, sample tables and a KL
controller.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tether.checkpoint import Interrupted, StopSignals, prepare_output_dir, restore, truncate_jsonl, write_checkpoint
from tether.config import TrainingConfig, save_config
from tether.logging import MetricsFile, console, progress_bar
from tether.trainers.common import stop_if_nonfinite


class SteppedTrainer(Protocol):
    config: TrainingConfig
    step_count: int
    total_steps: int
    nonfinite_in_a_row: int

    def advance(self) -> tuple[dict[str, float], bool]:
        """One optimizer step plus whatever evaluation is due; ``(metrics, evaluated)``."""

    def status(self, metrics: dict[str, float]) -> str: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def save_checkpoint(trainer) -> Path:
    """``<output_dir>/checkpoint-<step>`` with the trainer's model and state (see tether.checkpoint)."""
    return write_checkpoint(
        trainer.output_dir, trainer.step_count, {"model": trainer.model}, trainer.tokenizer, trainer.optimizer,
        trainer.scheduler, trainer.state_dict(), trainer.config.save_total_limit,
    )


def run_steps(trainer: SteppedTrainer, name: str, resume_from_checkpoint: bool | str | None) -> list[dict[str, float]]:
    """Every remaining step of ``trainer``; returns this call's per-step metrics (also in metrics.jsonl).

    ``resume_from_checkpoint`` (default: the config's) is True for the newest checkpoint in
    ``output_dir`` or a checkpoint's path; without it a non-empty ``output_dir`` is refused
    unless ``overwrite_output_dir``.
    """
    config = trainer.config
    resume = config.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
    checkpoint = prepare_output_dir(trainer.output_dir, resume, config.overwrite_output_dir)
    metrics_file = MetricsFile(trainer.output_dir)
    save_config(config, trainer.output_dir / "config.yaml")
    if checkpoint is not None:
        trainer.load_state_dict(restore(checkpoint, {"model": trainer.model}, trainer.optimizer, trainer.scheduler))
        truncate_jsonl(metrics_file.path, keep=lambda step: step <= trainer.step_count)  # the rest comes again
        console.print(f"resuming from {checkpoint} at step {trainer.step_count} of {trainer.total_steps}")
    history = []
    try:
        with StopSignals() as stop, progress_bar(name) as progress:
            task = progress.add_task(name.lower(), total=trainer.total_steps, completed=trainer.step_count, status="")
            while trainer.step_count < trainer.total_steps:
                metrics, evaluated = trainer.advance()
                step, last = trainer.step_count, trainer.step_count == trainer.total_steps
                history.append(metrics)
                if evaluated or last or step % config.logging_steps == 0:
                    metrics_file.write(metrics)
                    trainer.reporters.log(metrics, step=step)
                stop_if_nonfinite(trainer.nonfinite_in_a_row, config.max_nonfinite_steps, f"up to step {step}")
                if last or stop.requested or (config.save_steps and step % config.save_steps == 0):
                    saved = save_checkpoint(trainer)
                if stop.requested:
                    raise Interrupted(stop.requested, saved)
                progress.update(task, advance=1, status=trainer.status(metrics))
    finally:
        trainer.reporters.close()
    return history
