"""``tether demo``: the three classic RLHF stages on the bundled review task, offline.

1. data      reviews from the task grammar; a word-level tokenizer trained on them; a tiny
             Llama-style model initialised from a config
2. SFT       ``tether sft`` on prompt/completion pairs
3. labels    two SFT samples per prompt, labelled by the hidden gold rule (clear wins only)
4. RM        ``tether rm`` on those pairs, normalised so SFT demonstrations score mean 0
5. PPO       ``tether ppo`` against the learned reward model, logging the gold score too
6. evaluate  SFT vs PPO samples on held-out prompts: gold score, reward-model score, KL, length

Every stage writes its config as YAML next to its output, so each can be rerun alone with
``tether sft|rm|ppo --config``. Figures go to ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from tether.demo import task
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


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- sampling and scoring outside training ------------------------------------------------------

@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], seed: int, device, batch: int = 128) -> list[str]:
    """Sample one completion per prompt at the demo's temperature; text without the stop token."""
    from tether.data import left_pad
    from tether.ops import ended_on_stop, response_lengths
    from tether.rollout.generate import generate_responses, sampling_config

    torch.manual_seed(seed)
    model.eval()
    config = sampling_config(RESPONSE_LENGTH, TEMPERATURE, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    texts = []
    for start in range(0, len(prompts), batch):
        ids = tokenizer(prompts[start : start + batch])["input_ids"]
        queries, mask = left_pad(ids, tokenizer.pad_token_id)
        responses = generate_responses(model, queries.to(device), mask.to(device), config, batch).responses
        lengths = response_lengths(responses, [tokenizer.eos_token_id])
        kept = lengths - ended_on_stop(responses, lengths, [tokenizer.eos_token_id]).long()
        texts += tokenizer.batch_decode([r[:n].tolist() for r, n in zip(responses, kept)], skip_special_tokens=True)
    return texts


def _query_response(tokenizer, prompts: list[str], completions: list[str], device) -> list[torch.Tensor]:
    """``queries, query_mask, responses, response_mask`` for text pairs; EOS ends each response."""
    from tether.data import left_pad
    from tether.data.sequences import right_pad

    queries, query_mask = left_pad(tokenizer(prompts)["input_ids"], tokenizer.pad_token_id)
    bodies = [ids + [tokenizer.eos_token_id] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    responses, response_mask = right_pad(bodies, tokenizer.pad_token_id)
    return [t.to(device) for t in (queries, query_mask, responses, response_mask)]


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts: list[str], completions: list[str], device) -> list[float]:
    """The learned reward model's score of each completion (EOS appended, as in training)."""
    from tether.scoring.reward import get_reward

    queries, query_mask, responses, response_mask = _query_response(tokenizer, prompts, completions, device)
    ids = torch.cat([queries, responses], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    _, scores, _ = get_reward(reward_model, ids, tokenizer.pad_token_id, queries.size(1), mask)
    return scores.tolist()


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, prompts: list[str], completions: list[str], device) -> float:
    """Mean over samples of the summed log-ratio log pi(y|x) - log pi_ref(y|x) (k1, at the sampling temperature)."""
    from tether.models.forward import policy_logprobs
    from tether.rollout.generate import sampling_temperature

    tensors = _query_response(tokenizer, prompts, completions, device)
    temperature = sampling_temperature(TEMPERATURE)
    logprobs, _ = policy_logprobs(policy.eval(), *tensors, temperature, 1024)
    ref_logprobs, _ = policy_logprobs(reference.eval(), *tensors, temperature, 1024)
    return float(((logprobs - ref_logprobs) * tensors[3]).sum(1).mean())


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
    tokenizer = AutoTokenizer.from_pretrained(out / "sft", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(out / "sft").to(device)
    prompts = [task.sample_prompt(rng) for _ in range(sizes.pair_prompts)]
    first = sample_completions(model, tokenizer, prompts, seed + 2, device)
    second = sample_completions(model, tokenizer, prompts, seed + 3, device)
    pairs = []
    for prompt, a, b in zip(prompts, first, second):
        gold_a, gold_b = task.gold_score(a), task.gold_score(b)
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
    return {
        name: _write_yaml(out / f"{name}.yaml", config) for name, config in (("sft", sft), ("rm", rm), ("ppo", ppo))
    }


def evaluate(out: Path, eval_prompts: list[str], seed: int, device) -> dict:
    """Gold score, reward-model score, KL and length of SFT and PPO samples on held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "sft", padding_side="left")
    sft = AutoModelForCausalLM.from_pretrained(out / "sft").to(device)
    ppo = AutoModelForCausalLM.from_pretrained(out / "ppo").to(device)
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "rm").to(device).eval()
    results, samples = {}, {}
    for name, model in (("sft", sft), ("ppo", ppo)):
        completions = sample_completions(model, tokenizer, eval_prompts, seed + 10, device)
        gold = [task.gold_score(c) for c in completions]
        rm = reward_scores(reward_model, tokenizer, eval_prompts, completions, device)
        results[f"gold_{name}"] = sum(gold) / len(gold)
        results[f"rm_score_{name}"] = sum(rm) / len(rm)
        results[f"length_{name}"] = sum(len(c.split()) for c in completions) / len(completions)
        results[f"well_formed_{name}"] = sum(task.well_formed(c) for c in completions) / len(completions)
        samples[name] = [{"completion": c, "gold": g, "rm": r} for c, g, r in zip(completions, gold, rm)]
        if name == "ppo":
            results["kl"] = kl_to_reference(ppo, sft, tokenizer, eval_prompts, completions, device)
    return {"figures": results, "samples": samples}


def run_pipeline(output_dir: str, seed: int = 0, device: str = "auto", quick: bool = False) -> dict:
    """Every stage in order; returns the summary written to ``summary.json``."""
    from tether.cli import run_ppo
    from tether.demo.report import read_metrics, write_report
    from tether.trainers.common import resolve_device
    from tether.trainers.reward import run_reward
    from tether.trainers.sft import run_sft

    started = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    torch_device = resolve_device(device)
    console.rule("[bold]tether demo: SFT -> reward model -> PPO on movie reviews")
    eval_prompts = build_data(out, sizes, seed)
    configs = stage_configs(out, sizes, seed, device)

    console.rule("[bold]1/3 supervised fine-tuning")
    run_sft(str(configs["sft"]), [])
    console.rule("[bold]labelling pairs with the hidden gold rule")
    labels = label_pairs(out, sizes, seed, torch_device)
    console.print(f"{labels['pairs']} of {labels['sampled']} sampled pairs had a clear winner")
    console.rule("[bold]2/3 reward model")
    run_reward(str(configs["rm"]), [])
    console.rule("[bold]3/3 PPO against the learned reward model")
    run_ppo(["--config", str(configs["ppo"])])

    console.rule("[bold]evaluation on held-out prompts")
    evaluation = evaluate(out, eval_prompts, seed, torch_device)
    rm_metrics = read_metrics(out / "rm" / "metrics.jsonl")
    accuracy = [m["eval/accuracy"] for m in rm_metrics if "eval/accuracy" in m]
    figures = evaluation["figures"]
    summary = {
        "rm_accuracy": accuracy[-1],
        "gold_sft": figures["gold_sft"],
        "gold_ppo": figures["gold_ppo"],
        "gold_best": task.GOLD_BEST,
        "rm_score_sft": figures["rm_score_sft"],
        "rm_score_ppo": figures["rm_score_ppo"],
        "kl": figures["kl"],
        "length_sft": figures["length_sft"],
        "length_ppo": figures["length_ppo"],
        "well_formed_sft": figures["well_formed_sft"],
        "well_formed_ppo": figures["well_formed_ppo"],
        "gap_closed": (figures["gold_ppo"] - figures["gold_sft"]) / (task.GOLD_BEST - figures["gold_sft"]),
        "pairs": labels["pairs"],
        "seed": seed,
        "quick": quick,
        "sizes": asdict(sizes),
        "minutes": (time.time() - started) / 60,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, evaluation["samples"], eval_prompts)
    _print_closing(summary, evaluation["samples"], eval_prompts, out)
    return summary


def _print_closing(summary: dict, samples: dict, prompts: list[str], out: Path) -> None:
    for name in ("sft", "ppo"):
        rows = samples[name][:5]
        console.print(
            sample_table(
                f"{name.upper()} samples (score = gold)", prompts[:5], [r["completion"] for r in rows], [r["gold"] for r in rows]
            )
        )
    console.print(
        f"[bold]reward model held-out accuracy {summary['rm_accuracy']:.3f}\n"
        f"gold score: SFT {summary['gold_sft']:+.3f} -> PPO {summary['gold_ppo']:+.3f} "
        f"(best {summary['gold_best']:+.1f}; {100 * summary['gap_closed']:.0f}% of the gap closed)\n"
        f"reward-model score: SFT {summary['rm_score_sft']:+.3f} -> PPO {summary['rm_score_ppo']:+.3f}\n"
        f"KL(PPO || SFT) {summary['kl']:.2f} nats per response; length {summary['length_sft']:.1f} -> "
        f"{summary['length_ppo']:.1f} words\n"
        f"{summary['minutes']:.1f} minutes; report: {out / 'report.html'}"
    )
