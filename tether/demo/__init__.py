"""``tether demo``: the whole RLHF pipeline (SFT -> reward model -> PPO) offline on a bundled task."""

from __future__ import annotations


def run(output_dir: str, seed: int = 0, device: str = "auto", quick: bool = False) -> int:
    from tether.demo.pipeline import run_pipeline

    run_pipeline(output_dir, seed=seed, device=device, quick=quick)
    return 0
