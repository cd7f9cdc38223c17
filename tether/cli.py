"""The ``tether`` command: ``tether ppo|grpo|rloo|dpo|sft|rm --config run.yaml [--field value ...]``
and ``tether demo``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from tether.errors import TetherError

USAGE = """usage: tether <command> [options]

commands:
  ppo    PPO on a policy with a reward model or reward function
         tether ppo --config run.yaml [--field value ...]
  sft    supervised fine-tuning on prompt/completion data
         tether sft --config sft.yaml [--field value ...]
  grpo   GRPO: a group of completions per prompt, each scored against its group's mean
         tether grpo --config grpo.yaml [--field value ...]
  rloo   RLOO: a group of completions per prompt, each scored against the others' mean
         tether rloo --config rloo.yaml [--field value ...]
  dpo    DPO (or IPO, robust, APO, ...: loss_type) on chosen/rejected pairs, no reward model
         tether dpo --config dpo.yaml [--field value ...]
  rm     reward-model training on chosen/rejected pairs
         tether rm --config rm.yaml [--field value ...]
  demo   SFT, reward model, PPO, GRPO and DPO on a bundled review task with a tiny model, offline
         tether demo [--output-dir DIR] [--seed N] [--device cpu|cuda|auto] [--quick]

several processes (every training command):
  accelerate launch [--config_file examples/accelerate/ddp.yaml] -m tether ppo --config run.yaml
  torchrun --nproc_per_node N -m tether ppo --config run.yaml
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in ("-h", "--help", "help") and argv[1] in TRAINING_COMMANDS:
        argv = [argv[1], "--help"]  # tether help ppo, tether --help sft
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    _plain_warnings()
    if command in TRAINING_COMMANDS and ("-h" in rest or "--help" in rest):
        print(command_help(command))
        return 0
    try:
        if command in TRAINING_COMMANDS and "--print-config" in rest:
            return print_config(command, [arg for arg in rest if arg != "--print-config"])
        match command:
            case "ppo" | "grpo" | "rloo" | "dpo" | "sft" | "rm":
                from tether import commands

                if command in ("grpo", "rloo"):
                    return commands.run_critic_free(command, *_split_config_argument(rest))
                run = {"ppo": commands.run_ppo, "dpo": commands.run_dpo, "sft": commands.run_sft, "rm": commands.run_reward}
                run = run[command]
                return run(*_split_config_argument(rest))
            case "demo":
                return run_demo(rest)
            case _:
                print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
                return 2
    except TetherError as error:
        if not getattr(error, "said_elsewhere", False):  # several processes: the first that failed says it
            print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


TRAINING_COMMANDS = {
    "ppo": "PPOConfig", "grpo": "GRPOConfig", "rloo": "RLOOConfig", "dpo": "DPOConfig", "sft": "SFTConfig",
    "rm": "RewardConfig",
}


def print_config(command: str, args: list[str]) -> int:
    """``tether <command> [--config FILE] [--field value ...] --print-config``: the complete YAML,
    with the file's and the overrides' values in place of the defaults."""
    from tether import config

    cls = getattr(config, TRAINING_COMMANDS[command])
    config_path, overrides = _split_config_argument(args)
    given = None
    if config_path is not None or overrides:
        warn = lambda message: print(message, file=sys.stderr)  # noqa: E731
        given = config.load_config(cls, config_path, config.parse_overrides(overrides), warn=warn)
    print(config.config_template(cls, given), end="")
    return 0


def command_help(command: str) -> str:
    """``tether <command> --help``: the usage line and every config field of the command."""
    from tether import config

    fields = config.describe_fields(getattr(config, TRAINING_COMMANDS[command]))
    return (
        f"usage: tether {command} --config {command}.yaml [--field value ...]\n\n"
        "Every field below can be set in the YAML file or overridden as --field value.\n"
        "--resume [CHECKPOINT] continues a run; --overwrite replaces an earlier run in output_dir;\n"
        "--extend lets a resumed run go further; --print-config writes a config with every default.\n"
        f"{fields}"
    )


def _plain_warnings() -> None:
    """Warnings as one line each ("warning: ..."), without the source line Python adds."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def _quiet_transformers() -> None:
    """tether draws its own progress bars; transformers' per-load bars would interleave with them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _split_config_argument(args: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config PATH`` out of ``args``; the rest are field overrides."""
    config_path, rest, index = None, [], 0
    while index < len(args):
        arg = args[index]
        if arg == "--config":
            if index + 1 >= len(args):
                raise TetherError("--config needs a path to a YAML file")
            config_path = args[index + 1]
            index += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        index += 1
    return config_path, rest


def run_demo(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether demo", description="SFT, reward model, PPO, GRPO and DPO on a bundled task with a tiny model, offline.")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a shorter run, as the tests use")
    options = parser.parse_args(args)
    warnings.filterwarnings("ignore", message=".*generation_config.*")
    from tether.demo import run

    return run(options.output_dir, seed=options.seed, device=options.device, quick=options.quick)
