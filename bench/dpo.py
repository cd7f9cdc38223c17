"""tether vs TRL 1.12 on D-W2 (shared/bench/WORKLOADS.md): DPO, alternating systems.

    python bench/dpo.py                                 # 4 steps, 2 rounds, checkpointing off in both
    python bench/dpo.py --checkpointing                 # gradient checkpointing on in both (TRL's default)
    python bench/dpo.py --precompute                    # reference scored ahead, in both
    python bench/dpo.py run tether --steps 4            # one system, one process: a JSON line

The W2 model (vocab 32000, hidden 256, 4 layers) as policy and reference; 16 pairs per optimizer
step, prompts of 32-64 words and chosen / rejected completions of 96-160 words (one token each),
``max_length`` 256, ``beta`` 0.1, learning rate 1e-6, fp32, 2 threads. Each system runs in its own
process; reported: the seconds per step (median of the steps after the first), the whole
``train()`` time and the process's peak resident memory, with tether/TRL ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import WORKLOADS, build, trl_step_clock  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PAIRS_PER_STEP = 16
COMMON = dict(per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1, beta=0.1, learning_rate=1e-6,
              max_length=256, seed=0)


def pairs(count: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random-word pairs of D-W2's lengths (the word tokenizer makes one token of each word)."""
    rng = random.Random(seed)
    words = lambda low, high: " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(rng.randint(low, high)))  # noqa: E731
    return [{"prompt": words(32, 64), "chosen": words(96, 160), "rejected": words(96, 160)} for _ in range(count)]


def run_tether(folder: Path, steps: int, rows: list[dict], checkpointing: bool, precompute: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "policy")
    config = DPOConfig(output_dir=str(folder / "tether-dpo"), overwrite_output_dir=True, device="cpu", max_steps=steps,
                       report_to=[], save_strategy="no", disable_tqdm=True, gradient_checkpointing=checkpointing,
                       precompute_ref_log_probs=precompute, **COMMON)
    start = time.perf_counter()
    trainer = DPOTrainer(config, tokenizer, AutoModelForCausalLM.from_pretrained(folder / "policy"), rows)
    history = trainer.train()
    return [h["timing/total"] for h in history], time.perf_counter() - start


def run_trl(folder: Path, steps: int, rows: list[dict], checkpointing: bool, precompute: bool):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    seconds: list[float] = []
    config = DPOConfig(output_dir=str(folder / "trl-dpo"), use_cpu=True, bf16=False, report_to="none",
                       save_strategy="no", gradient_checkpointing=checkpointing, precompute_ref_log_probs=precompute,
                       max_steps=steps, logging_steps=1, disable_tqdm=True, **COMMON)
    start = time.perf_counter()
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder / "policy"), args=config,
                         train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(folder / "policy"),
                         callbacks=[trl_step_clock(seconds)])
    trainer.train()
    return seconds, time.perf_counter() - start


def run_one(system: str, steps: int, threads: int, checkpointing: bool, precompute: bool) -> dict:
    torch.set_num_threads(threads)
    workload = WORKLOADS["W2"]
    folder = build(workload, HERE / ".fixtures")
    rows = pairs(PAIRS_PER_STEP * steps, workload.vocab)
    runner = run_tether if system == "tether" else run_trl
    seconds, total = runner(folder, steps, rows, checkpointing, precompute)
    return {"system": system, "seconds": seconds, "train_seconds": total,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def compare(steps: int, rounds: int, threads: int, flags: list[str]) -> None:
    results: dict[str, list[dict]] = {"trl": [], "tether": []}
    for _ in range(rounds):
        for system in ("trl", "tether"):  # alternate, so drifts in machine speed hit both
            command = [sys.executable, __file__, "run", system, "--steps", str(steps), "--threads", str(threads), *flags]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise SystemExit(f"{system} failed:\n{result.stderr[-3000:]}")
            results[system].append(json.loads(result.stdout.strip().splitlines()[-1]))
    summary = {
        system: {"seconds": statistics.median(s for r in runs for s in r["seconds"][1:]),
                 "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                 "peak_gb": max(r["peak_rss"] for r in runs) / 1e9}
        for system, runs in results.items()
    }
    speed = summary["trl"]["seconds"] / summary["tether"]["seconds"]
    memory = summary["tether"]["peak_gb"] / summary["trl"]["peak_gb"]
    print(json.dumps({"steps": steps, "flags": flags, **summary, "speedup": round(speed, 2),
                      "memory_ratio": round(memory, 2)}), flush=True)
    print(f"| D-W2 {' '.join(flags) or 'checkpointing off'} | {summary['trl']['seconds']:.2f} s, "
          f"{summary['trl']['peak_gb']:.2f} GB | {summary['tether']['seconds']:.2f} s, {summary['tether']['peak_gb']:.2f} GB "
          f"| {speed:.2f}x faster | {memory:.2f}x memory |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        parser.add_argument("run")
        parser.add_argument("system", choices=["tether", "trl"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on in both")
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs in both")
    options = parser.parse_args()
    if getattr(options, "run", None):
        print(json.dumps(run_one(options.system, options.steps, options.threads, options.checkpointing,
                                 options.precompute)))
        return
    flags = [flag for flag, on in (("--checkpointing", options.checkpointing), ("--precompute", options.precompute)) if on]
    compare(options.steps, options.rounds, options.threads, flags)


if __name__ == "__main__":
    main()
