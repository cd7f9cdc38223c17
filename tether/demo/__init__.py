"""``tether demo``: a PPO run on a tiny model built on the fly, entirely offline.

It writes a tiny Llama-style policy and tokenizer, a prompt file and a YAML config into the
output folder, then runs ``tether ppo --config`` on them, so every step can be rerun by hand.
The reward is a function: the share of response words drawn from a small "liked" set, so the
policy has something visible to learn in a minute on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

LIKED_WORDS = ("good", "great", "fine", "nice", "happy")
VOCABULARY = (
    "the a movie film story plot actor scene music ending was is felt seemed and but very quite "
    "dull slow long bad odd good great fine nice happy"
).split()


def liked_word_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of response words that are liked words, minus a small cost for empty replies."""
    scores = []
    for response in responses:
        words = response.split()
        scores.append(sum(word in LIKED_WORDS for word in words) / len(words) if words else -0.5)
    return scores


def build_workspace(output_dir: Path, seed: int, device: str, quick: bool) -> Path:
    """Tiny policy, prompts and config under ``output_dir``; returns the config path."""
    from tether.tiny import tiny_causal_lm, word_tokenizer

    tokenizer = word_tokenizer(VOCABULARY)
    policy = tiny_causal_lm(tokenizer, seed=seed, hidden_size=64, num_layers=2, num_heads=4)
    base = output_dir / "base-policy"
    policy.save_pretrained(base)
    tokenizer.save_pretrained(base)

    rng = random.Random(seed)
    neutral = [w for w in VOCABULARY if w not in LIKED_WORDS]
    prompts = [{"prompt": " ".join(rng.choice(neutral) for _ in range(rng.randint(3, 8)))} for _ in range(256)]
    prompt_file = output_dir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))

    config = {
        "model_name_or_path": str(base),
        "reward_model_path": "tether.demo:liked_word_reward",
        "dataset_name": str(prompt_file),
        "output_dir": str(output_dir / "ppo"),
        "seed": seed,
        "device": device,
        "total_episodes": 16 * (6 if quick else 40),
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "num_mini_batches": 2,
        "num_ppo_epochs": 4,
        "response_length": 8,
        "temperature": 1.0,
        "learning_rate": 3e-4,
        "kl_coef": 0.02,
        "num_sample_generations": 4,
    }
    config_path = output_dir / "ppo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def run(output_dir: str, seed: int = 0, device: str = "auto", quick: bool = False) -> int:
    from tether.cli import run_ppo
    from tether.logging import console

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config_path = build_workspace(output, seed, device, quick)
    console.print(f"demo workspace in {output}; rerun the PPO stage with: tether ppo --config {config_path}")
    status = run_ppo(["--config", str(config_path)])
    metrics = [json.loads(line) for line in (output / "ppo" / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    console.print(
        f"[bold]liked-word score {first['objective/scores']:.3f} -> {last['objective/scores']:.3f}"
        f"  (KL to the reference {last['objective/kl']:.3f})"
    )
    return status
