"""tether vs TRL 1.12 on G-W2 (shared/bench/WORKLOADS.md): GRPO and RLOO, alternating systems.

    python bench/group.py                              # GRPO and RLOO, 128 tokens, 4 steps, 2 rounds
    python bench/group.py grpo --length 512 --steps 3 --rounds 1
    python bench/group.py run tether grpo --steps 4    # one system, one process: a JSON line

The W2 model (vocab 32000, hidden 256, 4 layers) as policy and reference, 8 prompts x 4
completions per optimizer step, temperature 0.7, beta 0.04, learning rate 1e-6, a cheap reward
function of the text, fp32, 2 threads, gradient checkpointing off in both (TRL's GRPO turns it
on by default; it trades time for memory). Each system runs in its own process; reported: the
seconds per step (median of the steps after the first), the whole ``train()`` time and the
process's peak resident memory, with tether/TRL ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import WORKLOADS, build, prompts, trl_step_clock  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROMPTS_PER_STEP, GENERATIONS = 8, 4
COMMON = dict(num_generations=GENERATIONS, per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
              gradient_accumulation_steps=1, temperature=0.7, beta=0.04, learning_rate=1e-6, seed=0)


def digit_share(completions, **_) -> list[float]:
    """The cheap reward: the share of the completion's words that end in 7."""
    return [sum(word.endswith("7") for word in text.split()) / max(len(text.split()), 1) for text in completions]


def run_tether(folder: Path, method: str, steps: int, length: int, texts: list[str]) -> tuple[list[float], float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    tokenizer = AutoTokenizer.from_pretrained(folder / "policy")
    config = config_class(
        output_dir=str(folder / "tether-out"), overwrite_output_dir=True, device="cpu", max_steps=steps,
        max_completion_length=length, local_rollout_forward_batch_size=PROMPTS_PER_STEP * GENERATIONS,
        report_to=[], save_strategy="no", disable_tqdm=True, **COMMON,
    )
    start = time.perf_counter()
    trainer = trainer_class(config, tokenizer, AutoModelForCausalLM.from_pretrained(folder / "policy"), digit_share,
                            [{"prompt": text} for text in texts])
    history = trainer.train()
    total = time.perf_counter() - start
    run_tether.phases = {k: round(v, 3) for k, v in history[-1].items() if k.startswith("timing/")}
    return [h["timing/total"] for h in history], total


def run_trl(folder: Path, method: str, steps: int, length: int, texts: list[str]) -> tuple[list[float], float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    seconds: list[float] = []
    config = config_class(
        output_dir=str(folder / "trl-out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        gradient_checkpointing=False, max_steps=steps, max_completion_length=length, logging_steps=1,
        disable_tqdm=True, **COMMON,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder / "policy", padding_side="left")
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(folder / "policy"), reward_funcs=digit_share, args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
        callbacks=[trl_step_clock(seconds)],
    )
    trainer.train()
    return seconds, time.perf_counter() - start


def run_one(system: str, method: str, steps: int, length: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    workload = WORKLOADS["W2"]
    folder = build(workload, HERE / ".fixtures")
    texts = prompts(vocab=workload.vocab)
    runner = run_tether if system == "tether" else run_trl
    seconds, total = runner(folder, method, steps, length, texts)
    return {"system": system, "method": method, "length": length, "seconds": seconds, "train_seconds": total,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "phases": getattr(runner, "phases", None)}


def compare(methods: list[str], steps: int, length: int, rounds: int, threads: int) -> None:
    for method in methods:
        results: dict[str, list[dict]] = {"trl": [], "tether": []}
        for _ in range(rounds):
            for system in ("trl", "tether"):  # alternate, so drifts in machine speed hit both
                command = [sys.executable, __file__, "run", system, method, "--steps", str(steps), "--length",
                           str(length), "--threads", str(threads)]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise SystemExit(f"{system} {method} failed:\n{result.stderr[-3000:]}")
                results[system].append(json.loads(result.stdout.strip().splitlines()[-1]))
        summary = {}
        for system, runs in results.items():
            summary[system] = {
                "seconds": statistics.median(s for r in runs for s in r["seconds"][1:]),
                "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                "peak_gb": max(r["peak_rss"] for r in runs) / 1e9,
                "phases": runs[-1]["phases"],
            }
        speed = summary["trl"]["seconds"] / summary["tether"]["seconds"]
        memory = summary["tether"]["peak_gb"] / summary["trl"]["peak_gb"]
        print(json.dumps({"method": method, "length": length, "steps": steps, **summary,
                          "speedup": round(speed, 2), "memory_ratio": round(memory, 2)}), flush=True)
        print(f"| {method} G-W2, {length} tokens | {summary['trl']['seconds']:.2f} s, {summary['trl']['peak_gb']:.2f} GB "
              f"| {summary['tether']['seconds']:.2f} s, {summary['tether']['peak_gb']:.2f} GB | {speed:.2f}x faster "
              f"| {memory:.2f}x memory |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        parser = argparse.ArgumentParser()
        parser.add_argument("system", choices=["tether", "trl"])
        parser.add_argument("method", choices=["grpo", "rloo"])
        parser.add_argument("--steps", type=int, default=4)
        parser.add_argument("--length", type=int, default=128)
        parser.add_argument("--threads", type=int, default=2)
        options = parser.parse_args(sys.argv[2:])
        print(json.dumps(run_one(options.system, options.method, options.steps, options.length, options.threads)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("methods", nargs="*", default=["grpo", "rloo"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    compare(options.methods, options.steps, options.length, options.rounds, options.threads)


if __name__ == "__main__":
    main()
