"""The training commands, ``tether ppo|grpo|rloo|dpo|sft|rm --config FILE [--field value ...]``.

Each one reads its config (YAML plus ``--field value`` overrides) and refuses what it can
before anything slow, checks the output folder, loads the tokenizer and the data (every row
encoded, so bad data fails before a model loads), then the models; trains, and saves. The
demo runs its stages through these same functions.
"""

from __future__ import annotations

from tether.checkpoint import check_output_dir_early
from tether.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, RLOOConfig, SFTConfig, load_command_config
from tether.data import load_table, load_test_split
from tether.logging import console
from tether.models.loading import load_causal_lm, load_tokenizer


def _warn(message: str) -> None:
    console.print(f"[yellow]{message}")


def _needs(*names: str) -> dict:
    return {name: (lambda config, name=name: getattr(config, name)) for name in names}


def _encoded_splits(config, encode) -> tuple[list, list | None]:
    """The training split and the test split (None without one), each through ``encode(table,
    what)`` before any model loads: a wrong column or a bad row fails at once, and what
    max_length cuts is said once."""
    train = encode(load_table(config.dataset_name, config.dataset_train_split, config.dataset_config), "training")
    test = load_test_split(config.dataset_name, config.dataset_test_split, config.dataset_config)
    return train, encode(test, "evaluation") if test is not None else None


def run_ppo(config_path: str | None, override_args: list[str]) -> int:
    """``tether ppo``: PPO on a policy against a reward model or function; saves the policy."""
    from tether.trainers.ppo import PPOTrainer, load_value_model

    required = {"model_name_or_path": PPOConfig.policy_path, **_needs("reward_model_path", "dataset_name")}
    config = load_command_config(PPOConfig, config_path, override_args, required, _warn)
    check_output_dir_early(config)
    revision = config.model_revision if config.model_name_or_path else None  # the revision names model_name_or_path's
    tokenizer = load_tokenizer(config.model_name_or_path or config.policy_path(), config.trust_remote_code, _warn,
                               revision)
    train_dataset = load_table(config.dataset_name, config.dataset_train_split, config.dataset_config)
    eval_dataset = load_test_split(config.dataset_name, config.dataset_test_split, config.dataset_config)
    console.print(f"loading models from {config.policy_path()} and {config.reward_model_path}")
    policy = load_causal_lm(config.policy_path(), **config.model_options(own_revision=not config.sft_model_path))
    value_model = load_value_model(config.value_model_path, config) if config.value_model_path else None
    trainer = PPOTrainer(
        config, tokenizer, policy, config.reward_model_path, train_dataset, value_model=value_model,
        eval_dataset=eval_dataset,
    )
    trainer.train()
    console.print(f"[green]saved the trained policy to {trainer.save_model()}")
    return 0


def run_critic_free(command: str, config_path: str | None, override_args: list[str]) -> int:
    """``tether grpo`` / ``tether rloo``: train against ``reward_funcs``; saves the policy."""
    from tether.trainers.grpo import GRPOTrainer, RLOOTrainer
    from tether.trainers.parallel import launched_processes

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[command]
    required = _needs("model_name_or_path", "reward_funcs", "dataset_name")
    config = load_command_config(config_class, config_path, override_args, required, _warn)
    config.group_plan(1, launched_processes())  # batch sizes that do not divide: refused before anything loads
    check_output_dir_early(config)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code, _warn, config.model_revision)
    train_dataset = load_table(config.dataset_name, config.dataset_train_split, config.dataset_config)
    eval_dataset = load_test_split(config.dataset_name, config.dataset_test_split, config.dataset_config)
    console.print(f"loading the policy from {config.model_name_or_path}")
    policy = load_causal_lm(config.model_name_or_path, **config.model_options())
    trainer = trainer_class(config, tokenizer, policy, None, train_dataset, eval_dataset=eval_dataset)
    trainer.train()
    console.print(f"[green]saved the trained policy to {trainer.save_model()}")
    return 0


def run_sft(config_path: str | None, override_args: list[str]) -> int:
    """``tether sft``: supervised fine-tuning; saves the model to ``output_dir``."""
    from tether.data.sequences import encode_sequences
    from tether.trainers.sft import SFTTrainer

    config = load_command_config(SFTConfig, config_path, override_args, _needs("model_name_or_path", "dataset_name"),
                                 _warn)
    check_output_dir_early(config)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code, _warn, config.model_revision)
    train_rows, eval_rows = _encoded_splits(config, lambda table, what: encode_sequences(
        table, tokenizer, config.max_length, config.truncation_mode, f"{what} rows"))
    console.print(f"loading the model from {config.model_name_or_path}")
    model = load_causal_lm(config.model_name_or_path, **config.model_options())
    trainer = SFTTrainer(config, tokenizer, model, train_rows, eval_rows)
    trainer.train()
    console.print(f"[green]saved the fine-tuned model to {trainer.save_model()}")
    return 0


def run_reward(config_path: str | None, override_args: list[str]) -> int:
    """``tether rm``: reward-model training on chosen/rejected pairs; saves the model."""
    from tether.data.sequences import encode_pairs
    from tether.trainers.common import seed_everything
    from tether.trainers.reward import RewardTrainer, load_reward_backbone

    config = load_command_config(RewardConfig, config_path, override_args,
                                 _needs("model_name_or_path", "dataset_name"), _warn)
    check_output_dir_early(config)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code, _warn, config.model_revision)
    train_pairs, eval_pairs = _encoded_splits(config, lambda table, what: encode_pairs(
        table, tokenizer, config.max_length, config.truncation_mode, f"{what} pairs"))
    console.print(f"loading the reward model backbone from {config.model_name_or_path}")
    model = load_reward_backbone(config.model_name_or_path, **config.model_options())
    trainer = RewardTrainer(config, tokenizer, model, train_pairs, eval_pairs)
    trainer.train()
    target = trainer.save_model()
    if trainer.eval_history:
        step, accuracy = trainer.eval_history[-1]
        console.print(f"held-out accuracy {accuracy:.3f} on {len(trainer.eval_pairs)} pairs after {step} steps")
    else:
        console.print("no held-out pairs (eval_fraction 0 and no test split): accuracy not measured")
    if trainer.normalization:
        console.print(f"reward_bias {trainer.normalization['reward_bias']:+.4f} stored in the model config")
    console.print(f"[green]saved the reward model to {target}")
    return 0


def run_dpo(config_path: str | None, override_args: list[str]) -> int:
    """``tether dpo``: DPO (or a relative, ``loss_type``) on chosen/rejected pairs; saves the model."""
    from tether.data.sequences import encode_pairs
    from tether.trainers.dpo import DPOTrainer

    config = load_command_config(DPOConfig, config_path, override_args, _needs("model_name_or_path", "dataset_name"),
                                 _warn)
    check_output_dir_early(config)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code, _warn, config.model_revision)
    train_pairs, eval_pairs = _encoded_splits(config, lambda table, what: encode_pairs(
        table, tokenizer, config.max_length, config.truncation_mode, f"{what} pairs", config.max_prompt_length))
    console.print(f"loading the model from {config.model_name_or_path}")
    model = load_causal_lm(config.model_name_or_path, **config.model_options())
    trainer = DPOTrainer(config, tokenizer, model, train_pairs, eval_dataset=eval_pairs)
    trainer.train()
    if trainer.eval_history:
        step, accuracy = trainer.eval_history[-1]
        console.print(f"held-out reward accuracy {accuracy:.3f} on {len(trainer.eval_pairs)} pairs after {step} steps")
    console.print(f"[green]saved the trained model to {trainer.save_model()}")
    return 0
