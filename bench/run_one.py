"""One system on one workload, in its own process: ``python bench/run_one.py tether W1 --updates 4``.

Prints one JSON line: seconds of every update, peak resident memory (with ``--device cuda``,
also the peaks of CUDA memory allocated and reserved by torch's caching allocator), and the
update's model FLOPs (2 x params x tokens per forward, 6 x params x tokens per
forward+backward, tokens that were actually computed; none with ``--lora``, whose frozen
weights need no weight gradients).
``bench/compare.py`` runs both systems alternately and makes the table.

``--lora``: both systems train a LoRA adapter on the policy (``LORA``; the value model in full)
and take the starting policy, adapter off, as the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, build, matmul_flops, prompts, synchronize  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def non_embedding_params(model) -> int:
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def update_flops(policy_params: int, scalar_params: int, batch: int, query: float, response: float, epochs: int) -> float:
    """Model FLOPs of one PPO update: generation, four scoring forwards, and the training passes."""
    generate = 2 * policy_params * batch * (query + response)
    score = 2 * (2 * policy_params + 2 * scalar_params) * batch * (query + response)
    train = epochs * 6 * (policy_params + scalar_params) * batch * (query + response)
    return generate + score + train


LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def run_tether(folder: Path, workload, updates: int, bf16: bool, lora: bool, texts: list[str], device: str,
               compile_layers: bool = False) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tether import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "policy", padding_side="left")
    config = PPOConfig(
        output_dir=str(folder / "tether-out"), device=device, bf16=bf16, seed=0,
        per_device_train_batch_size=workload.per_device, gradient_accumulation_steps=workload.minibatches,
        num_mini_batches=workload.minibatches, num_ppo_epochs=workload.epochs,
        total_episodes=workload.batch * updates, local_rollout_forward_batch_size=workload.batch,
        response_length=workload.response, temperature=0.7, stop_token="eos", missing_eos_penalty=1.0,
        learning_rate=3e-6, num_sample_generations=0, peft_config=LORA if lora else None,
        torch_compile=compile_layers,
    )
    trainer = PPOTrainer(
        config, tokenizer, AutoModelForCausalLM.from_pretrained(folder / "policy"),
        AutoModelForSequenceClassification.from_pretrained(folder / "reward"), texts,
    )
    seconds = []
    for _ in range(updates):
        start = time.perf_counter()
        metrics = trainer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        run_tether.phases = {k: round(v, 3) for k, v in metrics.items() if k.startswith("timing/")}
    return seconds


def run_trl(folder: Path, workload, updates: int, bf16: bool, lora: bool, texts: list[str], device: str) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "policy", padding_side="left")
    dataset = datasets.Dataset.from_dict({"input_ids": tokenizer(texts)["input_ids"]})
    seconds: list[float] = []

    class Clock(TrainerCallback):
        start = None

        def on_train_begin(self, *args, **kwargs):
            Clock.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            synchronize(device)
            now = time.perf_counter()
            seconds.append(now - Clock.start)
            Clock.start = now

    config = PPOConfig(
        output_dir=str(folder / "trl-out"), use_cpu=device == "cpu", bf16=bf16, report_to="none", num_sample_generations=0,
        save_strategy="no", gradient_checkpointing=False, seed=0,
        per_device_train_batch_size=workload.per_device, gradient_accumulation_steps=workload.minibatches,
        num_mini_batches=workload.minibatches, num_ppo_epochs=workload.epochs,
        total_episodes=workload.batch * updates, local_rollout_forward_batch_size=workload.batch,
        response_length=workload.response, temperature=0.7, stop_token="eos", missing_eos_penalty=1.0,
        learning_rate=3e-6,
    )
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy,
        ref_model=None if lora else AutoModelForCausalLM.from_pretrained(folder / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(folder / "reward"),
        value_model=AutoModelForSequenceClassification.from_pretrained(folder / "reward"),
        train_dataset=dataset, callbacks=[Clock()], peft_config=_peft_config() if lora else None,
    )
    trainer.train()
    return seconds


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["tether", "trl"])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cache", default="bench/.fixtures")
    parser.add_argument("--compile", action="store_true", help="tether with torch_compile (TRL unchanged)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    workload = WORKLOADS[options.workload]
    folder = build(workload, Path(options.cache))
    texts = prompts(vocab=workload.vocab)
    runner = run_tether if options.system == "tether" else run_trl
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arguments = (folder, workload, options.updates, options.bf16, options.lora, texts, options.device)
        seconds = runner(*arguments, compile_layers=True) if options.compile and runner is run_tether else runner(*arguments)
    for message in sorted({str(w.message) for w in caught}):
        print(f"warning: {message}", file=sys.stderr)

    from transformers import AutoConfig, AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder / "policy"))
    params = non_embedding_params(policy)
    scalar = params - policy.get_output_embeddings().weight.numel() + policy.config.hidden_size
    query = sum(len(t.split()) for t in texts) / len(texts)
    flops = update_flops(params, scalar, workload.batch, query, workload.response, workload.epochs)
    print(json.dumps({
        "system": options.system, "workload": options.workload, "bf16": options.bf16, "lora": options.lora,
        "device": options.device, "seconds": seconds, "peak_rss": peak_rss_bytes(),
        "peak_cuda": torch.cuda.max_memory_allocated() if options.device == "cuda" else None,
        "peak_cuda_reserved": torch.cuda.max_memory_reserved() if options.device == "cuda" else None,
        "phases": getattr(runner, "phases", None),  # tether's last update, by phase
        "graph_fallback": any("without a CUDA graph" in str(w.message) for w in caught),
        "update_flops": None if options.lora else flops, "matmul_flops": matmul_flops(options.device, options.bf16),
    }))


if __name__ == "__main__":
    main()
