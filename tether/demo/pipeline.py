"""``tether demo``: the classic RLHF stages on the bundled review task, offline.

1. data      reviews from the task grammar; a word-level tokenizer trained on them; a tiny
             Llama-style model initialised from a config
2. SFT       ``tether sft`` on prompt/completion pairs
3. labels    two SFT samples per prompt, labelled by the hidden gold rule (clear wins only)
4. RM        ``tether rm`` on those pairs, normalised so SFT demonstrations score mean 0
5. PPO       ``tether ppo`` against the learned reward model, logging the gold score too
6. GRPO      ``tether grpo`` against the same reward model, from the same SFT model
7. DPO       ``tether dpo`` on the labelled pairs the reward model learned from, no reward model
8. evaluate  SFT, PPO, GRPO and DPO samples on held-out prompts: gold score, reward-model
             score, KL to the SFT model, length (``tether.evaluation``: the trainers' own path)

Every stage writes its config as YAML next to its output, so each can be rerun alone with
``tether sft|rm|ppo|grpo|dpo --config``. Figures go to ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tether.demo import task
from tether.evaluation import sample_and_score
from tether.logging import console, sample_table


@dataclass(frozen=True)
class Sizes:
    sft_rows: int
    sft_epochs: float
    pair_prompts: int
    rm_epochs: float
    ppo_updates: int
    ppo_batch: int
    eval_prompts: int


FULL = Sizes(sft_rows=6000, sft_epochs=2, pair_prompts=3000, rm_epochs=2, ppo_updates=60, ppo_batch=64, eval_prompts=256)
QUICK = Sizes(sft_rows=3000, sft_epochs=2, pair_prompts=1000, rm_epochs=2, ppo_updates=12, ppo_batch=32, eval_prompts=64)

MODEL = dict(hidden_size=64, num_layers=2, num_heads=4)
RESPONSE_LENGTH = 24
TEMPERATURE = 0.7
LABEL_MARGIN = 0.25  # pairs whose gold scores differ by less are not labelled (unsure raters)
DPO_LEARNING_RATE = 1e-3
DPO_BETA = 0.1


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- the stages ------------------------------------------------------------------------------------

def build_data(out: Path, sizes: Sizes, seed: int):
    """Reviews, prompt files, the trained tokenizer and the initial model; returns held-out prompts."""
    from tether.tiny import tiny_causal_lm

    rng = random.Random(seed)
    reviews = [task.sample_review(rng) for _ in range(sizes.sft_rows)]
    _write_jsonl(out / "data" / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in reviews])
    tokenizer = task.train_tokenizer([f"{p} {c}" for p, c in reviews])
    model = tiny_causal_lm(tokenizer, seed=seed, **MODEL)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    train_prompts = [task.sample_prompt(rng) for _ in range(max(sizes.ppo_updates * sizes.ppo_batch, 512))]
    eval_prompts = [task.sample_prompt(rng) for _ in range(sizes.eval_prompts)]
    _write_jsonl(out / "data" / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    _write_jsonl(out / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    return eval_prompts


def label_pairs(out: Path, sizes: Sizes, seed: int, device) -> dict:
    """Two SFT samples per prompt; the gold rule picks the winner when it is clear."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed + 1)
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    model = AutoModelForCausalLM.from_pretrained(out / "sft")
    prompts = [task.sample_prompt(rng) for _ in range(sizes.pair_prompts)]
    first, second = (
        sample_and_score(model, tokenizer, prompts, {"gold": task.gold_reward}, max_completion_length=RESPONSE_LENGTH,
                         temperature=TEMPERATURE, seed=draw, device=device)
        for draw in (seed + 2, seed + 3)
    )
    pairs = []
    for prompt, a, b, gold_a, gold_b in zip(prompts, first.completions, second.completions, first.scores["gold"],
                                            second.scores["gold"]):
        if abs(gold_a - gold_b) >= LABEL_MARGIN:
            chosen, rejected = (a, b) if gold_a > gold_b else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    _write_jsonl(out / "data" / "pairs.jsonl", pairs)
    return {"pairs": len(pairs), "sampled": len(prompts)}


def stage_configs(out: Path, sizes: Sizes, seed: int, device: str) -> dict[str, Path]:
    """The YAML config of every stage, written where a user can rerun it."""
    # a rerun of the demo (or of one stage) replaces that stage's earlier results
    common = {"seed": seed, "device": device, "overwrite_output_dir": True}
    sft = {
        "model_name_or_path": str(out / "base"),
        "dataset_name": str(out / "data" / "sft.jsonl"),
        "output_dir": str(out / "sft"),
        "num_train_epochs": sizes.sft_epochs,
        "per_device_train_batch_size": 32,
        "learning_rate": 3e-3,
        "eval_fraction": 0.05,
        "completion_only_loss": False,
        **common,
    }
    rm = {
        "model_name_or_path": str(out / "sft"),
        "dataset_name": str(out / "data" / "pairs.jsonl"),
        "output_dir": str(out / "rm"),
        "num_train_epochs": sizes.rm_epochs,
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-3,
        "eval_fraction": 0.1,
        "eval_steps": 10,
        "normalize_rewards": True,
        "normalization_dataset": str(out / "data" / "sft.jsonl"),
        **common,
    }
    ppo = {
        "model_name_or_path": str(out / "sft"),
        "reward_model_path": str(out / "rm"),
        "dataset_name": str(out / "data" / "prompts.jsonl"),
        "output_dir": str(out / "ppo"),
        "metric_function": "tether.demo.task:gold_metrics",
        "total_episodes": sizes.ppo_updates * sizes.ppo_batch,
        "per_device_train_batch_size": sizes.ppo_batch // 4,
        "gradient_accumulation_steps": 4,
        "num_mini_batches": 4,
        "num_ppo_epochs": 4,
        "local_rollout_forward_batch_size": sizes.ppo_batch,
        "response_length": RESPONSE_LENGTH,
        "temperature": TEMPERATURE,
        "learning_rate": 1e-4,
        "kl_coef": 0.1,
        "missing_eos_penalty": 1.0,
        "num_sample_generations": 0,
        **common,
    }
    # GRPO: as many completions as PPO's episodes, 8 per prompt, 4 optimizer steps per round
    grpo = {
        "model_name_or_path": str(out / "sft"),
        "reward_funcs": [str(out / "rm")],
        "dataset_name": str(out / "data" / "prompts.jsonl"),
        "output_dir": str(out / "grpo"),
        "metric_function": "tether.demo.task:gold_metrics",
        "num_generations": 8,
        "per_device_train_batch_size": sizes.ppo_batch // 4,
        "steps_per_generation": 4,
        "max_steps": sizes.ppo_updates * 4,
        "local_rollout_forward_batch_size": sizes.ppo_batch,
        "max_completion_length": RESPONSE_LENGTH,
        "temperature": TEMPERATURE,
        "learning_rate": 3e-4,
        "beta": 0.04,
        "missing_eos_penalty": 1.0,
        "logging_steps": 4,
        **common,
    }
    # DPO: the reward model's pairs, from the SFT model; the reference scored once ahead
    dpo = {
        "model_name_or_path": str(out / "sft"),
        "dataset_name": str(out / "data" / "pairs.jsonl"),
        "output_dir": str(out / "dpo"),
        "num_train_epochs": sizes.rm_epochs,
        "per_device_train_batch_size": 32,
        "learning_rate": DPO_LEARNING_RATE,
        "beta": DPO_BETA,
        "precompute_ref_log_probs": True,
        "logging_steps": 5,
        **common,
    }
    stages = (("sft", sft), ("rm", rm), ("ppo", ppo), ("grpo", grpo), ("dpo", dpo))
    return {name: _write_yaml(out / f"{name}.yaml", config) for name, config in stages}


POLICIES = ("sft", "ppo", "grpo", "dpo")


def evaluate(out: Path, eval_prompts: list[str], seed: int, device) -> dict:
    """Gold score, reward-model score, KL to the SFT model and length of each policy's samples
    on held-out prompts (``tether.evaluation``: the trainers' own sampling and scoring)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    sft = AutoModelForCausalLM.from_pretrained(out / "sft")
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    rewards = {"gold": task.gold_reward, "rm": reward_model}
    results, samples = {}, {}
    for name in POLICIES:
        model = sft if name == "sft" else AutoModelForCausalLM.from_pretrained(out / name)
        scored = sample_and_score(model, tokenizer, eval_prompts, rewards, reference=sft if name != "sft" else None,
                                  max_completion_length=RESPONSE_LENGTH, temperature=TEMPERATURE, seed=seed + 10,
                                  device=device)
        completions = scored.completions
        results[f"gold_{name}"] = scored.mean("gold")
        results[f"rm_score_{name}"] = scored.mean("rm")
        results[f"length_{name}"] = sum(len(c.split()) for c in completions) / len(completions)
        results[f"well_formed_{name}"] = sum(task.well_formed(c) for c in completions) / len(completions)
        results[f"kl_{name}"] = sum(scored.kl) / len(scored.kl) if scored.kl is not None else 0.0
        samples[name] = [
            {"completion": c, "gold": g, "rm": r}
            for c, g, r in zip(completions, scored.scores["gold"], scored.scores["rm"])
        ]
    return {"figures": results, "samples": samples}


def run_pipeline(output_dir: str, seed: int = 0, device: str = "auto", quick: bool = False) -> dict:
    """Every stage in order; returns the summary written to ``summary.json``."""
    from tether.commands import run_critic_free, run_dpo, run_ppo, run_reward, run_sft
    from tether.demo.report import read_metrics, write_report
    from tether.trainers.common import resolve_device

    started = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    torch_device = resolve_device(device)
    console.rule("[bold]tether demo: SFT -> reward model -> PPO and GRPO; DPO from the pairs; on movie reviews")
    eval_prompts = build_data(out, sizes, seed)
    configs = stage_configs(out, sizes, seed, device)

    console.rule("[bold]1/5 supervised fine-tuning")
    run_sft(str(configs["sft"]), [])
    console.rule("[bold]labelling pairs with the hidden gold rule")
    labels = label_pairs(out, sizes, seed, torch_device)
    console.print(f"{labels['pairs']} of {labels['sampled']} sampled pairs had a clear winner")
    console.rule("[bold]2/5 reward model")
    run_reward(str(configs["rm"]), [])
    console.rule("[bold]3/5 PPO against the learned reward model")
    run_ppo(str(configs["ppo"]), [])
    console.rule("[bold]4/5 GRPO against the same reward model")
    run_critic_free("grpo", str(configs["grpo"]), [])
    console.rule("[bold]5/5 DPO on the labelled pairs, without the reward model")
    run_dpo(str(configs["dpo"]), [])

    console.rule("[bold]evaluation on held-out prompts")
    evaluation = evaluate(out, eval_prompts, seed, torch_device)
    rm_metrics = read_metrics(out / "rm" / "metrics.jsonl")
    accuracy = [m["eval/accuracy"] for m in rm_metrics if "eval/accuracy" in m]
    figures = evaluation["figures"]
    summary = {"rm_accuracy": accuracy[-1], "gold_best": task.GOLD_BEST}
    for name in POLICIES:
        for figure in ("gold", "rm_score", "kl", "length", "well_formed"):
            summary[f"{figure}_{name}"] = figures[f"{figure}_{name}"]
        gap = (figures[f"gold_{name}"] - figures["gold_sft"]) / (task.GOLD_BEST - figures["gold_sft"])
        summary[f"gap_closed_{name}"] = gap
    summary.update({
        "pairs": labels["pairs"], "seed": seed, "quick": quick, "sizes": asdict(sizes),
        "minutes": (time.time() - started) / 60,
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, evaluation["samples"], eval_prompts)
    _print_closing(summary, evaluation["samples"], eval_prompts, out)
    return summary


def _print_closing(summary: dict, samples: dict, prompts: list[str], out: Path) -> None:
    for name in POLICIES:
        rows = samples[name][:5]
        completions, gold = [r["completion"] for r in rows], [r["gold"] for r in rows]
        console.print(sample_table(f"{name.upper()} samples (score = gold)", prompts[:5], completions, gold))
    lines = [f"[bold]reward model held-out accuracy {summary['rm_accuracy']:.3f}"]
    for name in POLICIES:
        figure = lambda key: summary[f"{key}_{name}"]  # noqa: E731
        closed = "" if name == "sft" else f" ({figure('gap_closed'):.0%} of the gap to {summary['gold_best']:+.1f})"
        lines.append(
            f"{name.upper():>4}: gold {figure('gold'):+.3f}{closed}, reward model {figure('rm_score'):+.2f}, "
            f"KL to SFT {figure('kl'):.2f} nats, {figure('length'):.1f} words"
        )
    lines.append(f"{summary['minutes']:.1f} minutes; report: {out / 'report.html'}")
    console.print("\n".join(lines))
