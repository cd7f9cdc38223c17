"""Run configuration: one dataclass per command, loaded from YAML with CLI overrides.

Field names follow TRL's ``PPOConfig`` (and the ``TrainingArguments`` fields its PPO scripts
used) wherever TRL had the field, with TRL's defaults, so a TRL PPO config moves over.
Rules that span fields live in ``validate()``; derived batch sizes are computed in one
place, ``batch_plan()``. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tether.errors import ConfigError

# Fields a TRL PPO config may carry that have no effect in tether; accepted with a warning so
# the config moves over unchanged.
IGNORED_TRL_FIELDS = {
    "exp_name", "run_name", "push_to_hub", "hub_model_id", "dataset_num_proc", "ds3_gather_for_generation",
    "model_adapter_name", "ref_adapter_name", "world_size", "num_total_batches", "micro_batch_size",
    "local_batch_size", "batch_size", "local_mini_batch_size", "mini_batch_size", "eval_strategy",
    "eval_steps", "logging_first_step", "use_cpu", "save_strategy", "do_train", "do_eval",
    "torch_dtype", "dtype", "attn_implementation",
}


FLAG_ALIASES = {"resume": "resume_from_checkpoint", "overwrite": "overwrite_output_dir", "extend": "extend_run"}

# What a resumed run may change. Actions are what one command does with its output folder and
# are never written to a run's config.yaml (rerunning that file reruns the training, nothing
# else). Display fields change logging, saving, evaluation or where and how fast the same
# numbers are computed. Length fields extend a run (with ``--extend``). Every other field
# changes what is trained and must match the checkpoint's.
ACTION_FIELDS = ("resume_from_checkpoint", "overwrite_output_dir", "extend_run")
DISPLAY_FIELDS = (
    "output_dir", "logging_steps", "report_to", "save_steps", "save_total_limit", "num_sample_generations",
    "eval_steps", "dataset_test_split", "metric_function", "device", "full_determinism", "cuda_graphs",
    "gradient_checkpointing", "logprob_chunk_size", "save_merged", "max_nonfinite_steps", "trust_remote_code",
)
LENGTH_FIELDS = ("total_episodes", "num_train_epochs", "max_steps")


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes derived from the config (single process; ``world_size`` processes later).

    One rollout batch holds ``local_batch_size`` prompts. Each PPO epoch shuffles it and
    splits it into ``num_mini_batches`` minibatches; each minibatch is one optimizer step and
    is processed in micro-batches of ``micro_batch_size`` rows.
    """

    world_size: int
    local_batch_size: int
    batch_size: int
    local_mini_batch_size: int
    micro_batch_size: int
    num_total_batches: int
    sample_every: int


@dataclass
class TrainingConfig:
    """Fields every tether command shares (names and defaults of HF ``TrainingArguments``)."""

    # --- model and data -------------------------------------------------------------------
    model_name_or_path: str | None = None
    """Starting model (and its tokenizer): a local folder or a Hub name."""
    trust_remote_code: bool = False
    dataset_name: str | None = None
    """A local .jsonl/.json/.parquet/.csv file or a Hub dataset name."""
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"

    # --- batches and length of the run ----------------------------------------------------
    per_device_train_batch_size: int = 8
    """Rows per micro-batch."""
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0

    # --- optimizer ------------------------------------------------------------------------
    learning_rate: float = 5e-5
    adam_epsilon: float = 1e-8
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (HF Trainer's default 1.0); unset: no clipping."""
    lr_scheduler_type: Literal["linear", "constant"] = "linear"
    """``linear``: from ``learning_rate`` to 0 over the run."""

    # --- run ------------------------------------------------------------------------------
    output_dir: str = "runs/tether"
    seed: int = 42
    full_determinism: bool = False
    """Deterministic CUDA kernels, so that a GPU run repeats bit for bit and a resumed run
    matches a straight one; somewhat slower. CPU runs repeat without it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    """Autocast forwards (and generation) to bfloat16; weights stay fp32."""
    fp16: bool = False
    """Autocast to float16 with a loss scaler (through Accelerate); needs a CUDA device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (policy and value
    model, the value model's backbone included): less memory, about a third more compute."""
    logging_steps: int = 1
    report_to: str | list[str] = "none"
    """Trackers besides metrics.jsonl: tensorboard, wandb, trackio."""

    # --- checkpoints ----------------------------------------------------------------------
    save_steps: int | None = None
    """Write a checkpoint every this many updates / optimizer steps (always at the end and on
    SIGTERM / SIGINT)."""
    save_total_limit: int | None = 2
    """Keep only the newest this many checkpoints."""
    resume_from_checkpoint: bool | str | None = None
    """True: continue from the newest checkpoint in ``output_dir``; a path: from that one.
    ``--resume`` on the command line."""
    overwrite_output_dir: bool = False
    """Replace earlier results in ``output_dir`` (``--overwrite``); otherwise a non-empty
    ``output_dir`` is refused unless the run resumes."""
    extend_run: bool = False
    """With ``--resume``: continue the run to a greater ``total_episodes`` / ``num_train_epochs``
    than its checkpoint was planned for; the learning-rate schedule is re-planned over the new
    length. ``--extend`` on the command line."""
    max_nonfinite_steps: int = 3
    """Stop after this many optimizer steps in a row were skipped for non-finite gradients."""

    def validate(self) -> None:
        """Check types and rules that span fields; raise ConfigError naming the field and the fix."""
        check_types(self)
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config field {name} must be a finite number, got {value}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate < 0:
            raise ConfigError(f"config field learning_rate must be >= 0, got {self.learning_rate}")
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1 (or unset), got {getattr(self, name)}")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"config field num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.bf16 and self.fp16:
            raise ConfigError("config fields bf16 and fp16 are both set; choose one mixed precision")
        if self.fp16 and self.device == "cpu":
            raise ConfigError("config field fp16 needs a CUDA device; use bf16 on CPU")


@dataclass
class LoraFields:
    """The LoRA fields of ``ppo``, ``sft`` and ``rm``."""

    peft_config: dict[str, Any] | None = None
    """Train the model (in ``ppo`` the policy) as a LoRA adapter: ``peft.LoraConfig`` fields,
    e.g. ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}``. In ``ppo`` the
    reference is the starting policy (ppo-details fix 8); in ``rm`` the scalar head trains in
    full."""
    save_merged: bool = True
    """With ``peft_config``: ``save_model`` writes the model with the adapter merged in (a plain
    model); false: the adapter alone, in PEFT's format."""


@dataclass
class PPOConfig(LoraFields, TrainingConfig):
    """Everything a PPO run needs. Defaults are TRL 1.12's where TRL had the field."""

    # --- models ---------------------------------------------------------------------------
    sft_model_path: str | None = None
    """TRL's name for the starting policy; used when given, else ``model_name_or_path``."""
    reward_model_path: str | None = None
    """Reward model (``AutoModelForSequenceClassification``, one label), or ``module:function``
    / ``file.py:function`` naming ``fn(prompts, responses) -> list[float]``."""
    value_model_path: str | None = None
    """Value model; defaults to the reward model, or to the policy with a zero scalar head
    when the reward is a function."""
    value_model_peft: bool = False
    """With ``peft_config``: train the value model as a LoRA adapter too (its scalar head in full)."""
    metric_function: str | None = None
    """``module:function`` / ``file.py:function`` computing extra metrics of each rollout,
    ``fn(prompts, responses) -> dict[str, float]`` (e.g. a held-out "gold" judge)."""

    # --- data -----------------------------------------------------------------------------
    prompt_column: str | None = None
    """Column holding the prompts (text, chat messages or token ids); auto-detected if unset."""
    max_prompt_length: int | None = None
    """Prompts longer than this many tokens are cut from the left (or refused, see below)."""
    prompt_truncation: Literal["left", "error"] = "left"

    # --- batch sizes and length of the run ------------------------------------------------
    num_mini_batches: int = 1
    """Minibatches per PPO epoch; each one is an optimizer step. The rollout batch is
    per_device_train_batch_size x gradient_accumulation_steps x processes."""
    num_ppo_epochs: int = 4
    total_episodes: int | None = None
    """Prompts to roll out in total; defaults to ``num_train_epochs`` x dataset size."""
    local_rollout_forward_batch_size: int = 64
    """Rows per generation / scoring chunk during the rollout."""

    # --- sampling -------------------------------------------------------------------------
    response_length: int = 53
    temperature: float = 0.7
    stop_token: Literal["eos"] | None = None
    """``eos``: stop on the tokenizer's EOS. Unset with ``stop_token_id`` unset: the model's own
    EOS ids (tether always stops; TRL sampled the full length)."""
    stop_token_id: int | list[int] | None = None
    """One or several stop ids; a response ends at the first of any of them."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that did not end on a stop token."""
    cuda_graphs: bool = True
    """On a GPU, decode by replaying a CUDA graph of one step (falls back to eager steps, with a
    warning, where a model cannot be captured); off: eager steps always."""

    # --- objective ------------------------------------------------------------------------
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95

    # --- overridden defaults and PPO-only run settings -------------------------------------
    learning_rate: float = 3e-6
    max_grad_norm: float | None = None
    """TRL's PPO loop never clipped gradients (its max_grad_norm had no effect), so none by default."""
    output_dir: str = "runs/ppo"
    num_sample_generations: int = 10
    """How many times in the run to print a table of prompts, responses and scores."""
    logprob_chunk_size: int = 1024
    """Rows of the output layer's log-softmax computed at a time (on CPU in blocks of 512
    vocabulary entries; see ``tether.ops.logprobs.head_blocks``)."""

    # --------------------------------------------------------------------------------------
    def policy_path(self) -> str | None:
        return self.sft_model_path or self.model_name_or_path

    def validate(self) -> None:
        super().validate()
        positive = ("num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size", "logprob_chunk_size",
                    "kl_horizon")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        if self.response_length < 1:
            raise ConfigError(f"config field response_length must be at least 1, got {self.response_length}")
        if self.temperature <= 0:
            raise ConfigError(f"config field temperature must be > 0, got {self.temperature}")
        for name in ("cliprange", "cliprange_value", "kl_coef", "vf_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name} must be >= 0, got {getattr(self, name)}")
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ConfigError(
                f"config fields stop_token ({self.stop_token!r}) and stop_token_id ({self.stop_token_id}) are both set; "
                "set one (stop_token: eos means the tokenizer's EOS)"
            )
        if self.stop_token_id == []:
            raise ConfigError("config field stop_token_id is an empty list; give one or more ids, or leave it unset")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ConfigError(f"config field total_episodes must be at least 1, got {self.total_episodes}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"config field max_prompt_length must be at least 1, got {self.max_prompt_length}")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ConfigError(f"config fields gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.value_model_peft and not self.peft_config:
            raise ConfigError("config field value_model_peft needs peft_config (the LoRA settings); set both or neither")
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if local % self.num_mini_batches:
            raise ConfigError(
                f"num_mini_batches={self.num_mini_batches} does not divide the rollout batch of {local} "
                f"(per_device_train_batch_size x gradient_accumulation_steps); pick a divisor of {local}"
            )

    def batch_plan(self, num_prompts: int, world_size: int = 1) -> BatchPlan:
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        batch = local * world_size
        total = self.total_episodes or int(self.num_train_epochs * num_prompts)
        if total < batch:
            raise ConfigError(
                f"total_episodes={total} is smaller than one rollout batch ({batch} prompts); "
                "raise total_episodes or num_train_epochs, or lower the batch size"
            )
        num_total_batches = math.ceil(total / batch)
        local_mini = local // self.num_mini_batches
        return BatchPlan(
            world_size=world_size,
            local_batch_size=local,
            batch_size=batch,
            local_mini_batch_size=local_mini,
            micro_batch_size=min(self.per_device_train_batch_size, local_mini),
            num_total_batches=num_total_batches,
            sample_every=max(1, num_total_batches // self.num_sample_generations) if self.num_sample_generations else 0,
        )


@dataclass
class SFTConfig(LoraFields, TrainingConfig):
    """Supervised fine-tuning: next-token loss on prompt + completion data."""

    max_length: int | None = 1024
    """Longest sequence (prompt + completion); longer rows are cut or dropped by ``truncation_mode``."""
    truncation_mode: Literal["keep_end", "keep_start", "drop"] = "keep_end"
    """For rows longer than ``max_length``: ``keep_end`` cuts the prompt from the left and keeps
    the completion (a completion alone too long keeps its end); ``keep_start`` keeps the first
    tokens, cutting the completion's end and its EOS (TRL 1.12's default); ``drop`` drops the
    row. The rows cut or dropped are counted in one warning."""
    completion_only_loss: bool = True
    """Loss on completion tokens only (True) or on every token, the prompt's too (False)."""
    eval_fraction: float = 0.0
    """Share of the rows held out for evaluation when the dataset has no ``dataset_test_split``."""
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (and always at the end)."""
    learning_rate: float = 2e-5
    output_dir: str = "runs/sft"

    def validate(self) -> None:
        super().validate()
        _check_common_supervised(self)


@dataclass
class RewardConfig(LoraFields, TrainingConfig):
    """Reward-model training: Bradley-Terry loss on chosen / rejected pairs."""

    max_length: int | None = 1024
    """Longest sequence (prompt + chosen or rejected completion)."""
    truncation_mode: Literal["keep_end", "keep_start", "drop"] = "keep_end"
    """For pairs longer than ``max_length``: ``keep_end`` cuts the shared prompt from the left
    until both sides fit; ``keep_start`` keeps each side's first tokens; ``drop`` drops the pair.
    Pairs whose chosen and rejected end up the same tokens are dropped; both are counted."""
    eval_fraction: float = 0.1
    """Share of the pairs held out for accuracy when the dataset has no ``dataset_test_split``."""
    eval_steps: int | None = None
    normalize_rewards: bool = False
    """After training, store a bias so the reference set scores mean 0 (``get_reward`` applies it)."""
    normalization_dataset: str | None = None
    """Reference set for normalisation (prompt + completion rows); default: the chosen responses."""
    learning_rate: float = 1e-5
    output_dir: str = "runs/rm"

    def validate(self) -> None:
        super().validate()
        _check_common_supervised(self)


def _check_common_supervised(config) -> None:
    if config.max_length is not None and config.max_length < 2:
        raise ConfigError(f"config field max_length must be at least 2, got {config.max_length}")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"config field eval_fraction must lie in [0, 1), got {config.eval_fraction}")
    if config.eval_steps is not None and config.eval_steps < 1:
        raise ConfigError(f"config field eval_steps must be at least 1, got {config.eval_steps}")


# --- loading and type checking -------------------------------------------------------------

def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ValueError. Strings from the CLI are parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ValueError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if origin is dict:
        if isinstance(value, str):  # from the command line: --peft_config '{r: 8, lora_alpha: 16}'
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError from None
        if not isinstance(value, dict):
            raise ValueError
        return dict(value)
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = float(value)
            if number.is_integer():
                return int(number)
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    raise ValueError


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_types(config) -> None:
    """Coerce every field to its declared type in place; ConfigError naming the field if impossible."""
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, _coerce(value, tp))
        except (ValueError, TypeError):
            raise ConfigError(f"config field {name}: expected {_describe(tp)}, got {value!r}") from None


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``--field value`` / ``--field=value`` pairs from the command line into a dict of strings."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --field value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if index + 1 >= len(args) or args[index + 1].startswith("--"):
                value = "true"  # a bare flag
            else:
                index += 1
                value = args[index]
        key = key.replace("-", "_")
        overrides[FLAG_ALIASES.get(key, key)] = value
        index += 1
    return overrides


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None, warn=print):
    """Build ``cls`` from a YAML file plus overrides (overrides win), with types checked."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"config file {path} is not valid YAML: {reason}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    known = set(_field_types(cls))
    for key in list(values):
        if key in known:
            continue
        if key in IGNORED_TRL_FIELDS:
            warn(f"note: config field {key!r} has no effect in tether; ignored")
            del values[key]
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config field {key!r}{hint}")
    config = cls(**values)
    config.validate()
    return config


def load_command_config(cls, config_path: str | None, override_args: list[str], required: dict, warn=print):
    """A command's config from ``--config`` plus ``--field value`` overrides, with the fields the
    command cannot run without checked. ``required`` maps a field name to a function of the
    config giving its effective value (PPO's policy may come from ``sft_model_path``)."""
    config = load_config(cls, config_path, parse_overrides(override_args), warn=warn)
    missing = [name for name, value in required.items() if not value(config)]
    if missing:
        raise ConfigError(
            f"config is missing {', '.join(missing)}; set it in the YAML file or with --{missing[0]} ..."
        )
    return config


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in its class body), for ``--help``."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_fields(cls) -> str:
    """Every field of ``cls``: name, type, default and its docstring, one paragraph each."""
    docs = field_docs(cls)
    lines = []
    for name, tp in _field_types(cls).items():
        default = next(f for f in dataclasses.fields(cls) if f.name == name).default
        lines.append(f"  --{name} ({_describe(tp)}, default {default!r})")
        if docs.get(name):
            lines.append(f"      {docs[name]}")
    return "\n".join(lines)


def config_values(config) -> dict[str, Any]:
    """The config as plain values, without the command-line actions (``ACTION_FIELDS``): what
    a run's config.yaml and its checkpoints record."""
    return {name: value for name, value in dataclasses.asdict(config).items() if name not in ACTION_FIELDS}


def config_yaml(config) -> str:
    return yaml.safe_dump(config_values(config), sort_keys=False)


def resume_differences(saved: dict[str, Any], config) -> dict[str, list[str]]:
    """How ``config`` differs from the config a checkpoint was made with, by kind: ``training``
    (refused on resume), ``length`` (needs ``extend_run``) and ``display`` (said once). Fields
    the checkpoint did not record (an older tether) are not compared."""
    import json

    current = json.loads(json.dumps(config_values(config)))
    changes: dict[str, list[str]] = {"training": [], "length": [], "display": []}
    for name, value in current.items():
        if name not in saved or saved[name] == value:
            continue
        kind = "display" if name in DISPLAY_FIELDS else "length" if name in LENGTH_FIELDS else "training"
        changes[kind].append(f"{name} {saved[name]!r} -> {value!r}")
    return changes


def save_config(config, path: str | Path) -> None:
    from tether.saving import write_text_atomic

    write_text_atomic(path, config_yaml(config))
