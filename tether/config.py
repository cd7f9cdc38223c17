"""Run configuration: one dataclass per command, loaded from YAML with CLI overrides.

Field names follow TRL's ``PPOConfig`` (and the ``TrainingArguments`` fields its PPO scripts
used) wherever TRL had the field, with TRL's defaults, so a TRL PPO config moves over.
Rules that span fields live in ``validate()``; derived batch sizes are computed in one
place, ``batch_plan()``. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tether.errors import ConfigError

# TRL 1.12's PPOConfig (with TrainingArguments), ModelConfig and ScriptArguments fields that
# tether accepts with a one-line note, because they have no effect here and that is harmless:
# what they would change does not exist in tether (a dataloader, Hub pushing, evaluation
# metrics), or tether always does what they ask for. Every other TRL field is a field of the
# config classes below and has its effect (tests/test_trl_fields.py); anything else is unknown.
NOTED_FIELDS = {
    **dict.fromkeys(("push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
                     "hub_always_push", "hub_revision"), "tether does not push to the Hub"),
    **dict.fromkeys(("trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"),
                    "tether does not sync trackio to the Hub"),
    **dict.fromkeys(("dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
                     "dataloader_persistent_workers", "dataloader_prefetch_factor",
                     "dataloader_multiprocessing_context", "dataloader_in_order", "train_sampling_strategy",
                     "length_column_name", "label_names", "dataset_num_proc", "dataset_streaming"),
                    "tether encodes the data up front, in one process, and draws its own batches"),
    **dict.fromkeys(("bf16_full_eval", "fp16_full_eval", "prediction_loss_only", "eval_delay", "eval_on_start",
                     "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
                     "include_for_metrics", "batch_eval_metrics", "load_best_model_at_end", "metric_for_best_model",
                     "greater_is_better"), "tether's evaluation has its own fixed metrics and keeps the last model"),
    **dict.fromkeys(("world_size", "num_total_batches", "micro_batch_size", "local_batch_size", "batch_size",
                     "local_mini_batch_size", "mini_batch_size"), "tether derives the batch sizes itself"),
    **dict.fromkeys(("do_train", "do_eval", "do_predict", "local_rank", "debug", "skip_memory_metrics",
                     "include_num_input_tokens_seen", "logging_nan_inf_filter", "log_on_each_node",
                     "save_on_each_node", "torch_empty_cache_steps", "auto_find_batch_size", "use_cache",
                     "enable_jit_checkpoint", "ignore_data_skip", "restore_callback_states_from_checkpoint",
                     "average_tokens_across_devices", "accelerator_config", "parallelism_config",
                     "ignore_bias_buffers", "exp_name", "log_level", "log_level_replica"),
                    "it concerns HF Trainer, which tether does not use"),
    "save_only_model": "tether's checkpoints always hold what an exact resume needs",
    "ds3_gather_for_generation": "under ZeRO-3 tether always gathers the policy once per rollout",
    "model_adapter_name": "tether trains the adapter it makes (the reference is that adapter switched off)",
    "ref_adapter_name": "the reference is the policy's adapter switched off",
    "lora_dropout": "dropout is switched off in every model tether trains",
    "label_smoothing_factor": "tether's losses are their own (no label smoothing)",
    "neftune_noise_alpha": "tether adds no noise to embeddings",
    "use_liger_kernel": "tether's output layer is already chunked",
    "liger_kernel_config": "tether's output layer is already chunked",
    "optim_target_modules": "it serves GaLore / APOLLO optimizers, which tether does not offer",
    "fsdp": "FSDP comes from an Accelerate config: accelerate launch --config_file examples/accelerate/fsdp.yaml",
    "fsdp_config": "FSDP comes from an Accelerate config: accelerate launch --config_file examples/accelerate/fsdp.yaml",
    # TRL's GRPOConfig / RLOOConfig
    **dict.fromkeys(("vllm_mode", "vllm_model_impl", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                     "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
                     "vllm_max_model_length", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
                     "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                     "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_min",
                     "vllm_importance_sampling_clip_max"), "tether samples with its own decoding loop, not vLLM"),
    **dict.fromkeys(("cache_implementation", "use_transformers_continuous_batching", "use_transformers_paged",
                     "transformers_continuous_batching_config"),
                    "tether samples with its own decoding loop over a preallocated KV cache"),
    **dict.fromkeys(("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"),
                    "they steer adaptive entropy control, which tether does not offer (use_adaptive_entropy)"),
    **dict.fromkeys(("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_k_neg",
                     "vespo_lambda_pos", "vespo_lambda_neg"),
                    "they belong to loss types tether does not offer (sapo, vespo)"),
    **dict.fromkeys(("log_multimodal", "log_unique_prompts"), "tether's completion tables show every row's text"),
    "log_completions_hub_repo": "tether does not push to the Hub",
    "disable_dropout": "tether always switches dropout off while training (and back on in what it saves)",
    "pad_to_multiple_of": "tether pads each batch to its longest row",
    "router_aux_loss_coef": "tether adds no Mixture-of-Experts load-balancing loss",
    # TRL's DPOConfig
    "padding_free": "tether already runs rows without padding (packed) where the model allows",
    # TRL's SFTConfig (GRPO and RLOO have a shuffle_dataset field of their own)
    "shuffle_dataset": "tether draws each epoch's batches from a fresh seeded shuffle (order_seed) either way",
}
# TRL fields for what tether does not offer: accepted at TRL's default value (so a TRL config
# that leaves them alone moves over) and refused at any other, with the reason.
UNSUPPORTED_FIELDS = {
    "use_vllm": (False, "tether samples with its own decoding loop, not vLLM"),
    "generation_kwargs": (None, "set temperature, top_k, top_p, min_p and repetition_penalty as fields"),
    "chat_template_kwargs": (None, "tether applies the tokenizer's chat template as it is"),
    "model_init_kwargs": (None, "set dtype, attn_implementation, model_revision and trust_remote_code as fields"),
    "cast_lm_head_to_fp32": (False, "tether's output layer runs in the training precision"),
    "use_adaptive_entropy": (False, "tether does not offer adaptive entropy control; set entropy_coef"),
    "off_policy_mask_threshold": (None, "tether does not offer off-policy sequence masking"),
    "top_entropy_quantile": (1.0, "tether trains on every kept token, not a top-entropy quantile"),
    "max_tool_calling_iterations": (None, "tether does not train tool-calling agents"),
    "use_weighting": (False, "tether does not offer WPO weighting"),
    "ld_alpha": (None, "tether does not offer LD-DPO's length weighting"),
    "activation_offloading": (False, "use gradient_checkpointing to save activation memory"),
    "pad_token": (None, "set the tokenizer's pad token (TRL 1.12 deprecates this field too)"),
    # TRL's SFTConfig and RewardConfig
    "dataset_text_field": ("text", "tether reads plain-text rows from a column named text; rename yours"),
    "dataset_kwargs": (None, "tether reads the dataset as it is"),
    "packing": (False, "tether does not join rows into packed sequences (it already runs rows without padding "
                       "where the model allows)"),
    "packing_strategy": ("bfd", "tether does not join rows into packed sequences"),
    "eval_packing": (None, "tether does not join rows into packed sequences"),
    "assistant_only_loss": (False, "give prompt/completion rows; completion_only_loss takes the loss on the "
                                   "completion alone"),
    "eos_token": (None, "tether ends each completion with the tokenizer's own EOS token; set that one"),
    "chat_template_path": (None, "save the chat template with the tokenizer"),
    "center_rewards_coefficient": (None, "tether does not add a reward-centring term; normalize_rewards centres "
                                         "the trained model's scores instead"),
}
ALIASES = {  # other names TRL and transformers configs use for tether's fields
    "torch_dtype": "dtype", "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


class _BareFlag(str):
    """``--field`` given with no value: true for a true/false field, refused for any other."""


BARE_FLAG = _BareFlag("true")

FLAG_ALIASES = {"resume": "resume_from_checkpoint", "overwrite": "overwrite_output_dir", "extend": "extend_run"}

# The schedules transformers' get_scheduler builds from a run's length alone (plateau needs a
# metric, greedy a model of its own), and the optimizers tether makes.
SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
OPTIMIZERS = (
    "adamw_torch_fused", "adamw_torch", "sgd", "adagrad", "rmsprop", "adafactor",
    "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit",
)

# What a resumed run may change. Actions are what one command does with its output folder and
# are never written to a run's config.yaml (rerunning that file reruns the training, nothing
# else). Display fields change logging, saving, evaluation or where and how fast the same
# numbers are computed. Length fields extend a run (with ``--extend``). Every other field
# changes what is trained and must match the checkpoint's.
ACTION_FIELDS = ("resume_from_checkpoint", "overwrite_output_dir", "extend_run")
DISPLAY_FIELDS = (
    "output_dir", "logging_steps", "report_to", "save_steps", "save_total_limit", "num_sample_generations",
    "eval_steps", "metric_function", "device", "full_determinism", "cuda_graphs",
    "gradient_checkpointing", "logprob_chunk_size", "save_merged", "max_nonfinite_steps", "trust_remote_code",
    "log_completions", "num_completions_to_print", "per_device_eval_batch_size", "precompute_ref_batch_size",
    "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "deepspeed",  # where its file lies may change; the engine a checkpoint needs is checked on its own
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


class _TakesTRLNames(type):
    """Config classes built from Python take the same names a YAML file may hold: a TRL config's
    keyword arguments move over as its YAML does (notes as Python warnings)."""

    def __call__(cls, *args, **kwargs):
        say = lambda message: warnings.warn(message, stacklevel=4)  # noqa: E731
        return super().__call__(*args, **_known_values(cls, kwargs, say))


@dataclass
class TrainingConfig(metaclass=_TakesTRLNames):
    """Fields every tether command shares (names and defaults of HF ``TrainingArguments``)."""

    # --- model and data -------------------------------------------------------------------
    model_name_or_path: str | None = None
    """Starting model (and its tokenizer): a local folder or a Hub name."""
    model_revision: str = "main"
    """The Hub revision (branch, tag or commit) of ``model_name_or_path``."""
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """The dtype models load in (``torch_dtype`` is read as this too); ``auto``: the checkpoint's."""
    attn_implementation: str | None = None
    """transformers' attention kernel for the models: ``sdpa``, ``eager``, ``flash_attention_2`` ..."""
    load_in_8bit: bool = False
    """QLoRA: the trained model's weights in 8 bits through bitsandbytes (CUDA; needs LoRA)."""
    load_in_4bit: bool = False
    """QLoRA: the trained model's weights in 4 bits through bitsandbytes (CUDA; needs LoRA)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    use_bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str | None = None
    dataset_name: str | None = None
    """A local .jsonl/.json/.parquet/.csv file or a Hub dataset name."""
    dataset_config: str | None = None
    """The Hub dataset's configuration (subset) name."""
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"

    # --- batches and length of the run ----------------------------------------------------
    per_device_train_batch_size: int = 8
    """Rows per micro-batch."""
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0

    # --- optimizer ------------------------------------------------------------------------
    max_steps: int = -1
    """Optimizer steps of the run (PPO: updates); when positive it replaces ``num_train_epochs``
    (and ``total_episodes``)."""
    learning_rate: float = 5e-5
    adam_epsilon: float = 1e-8
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (HF Trainer's default 1.0); unset: no clipping."""
    optim: str = "adamw_torch_fused"
    """``adamw_torch_fused``, ``adamw_torch``, ``sgd``, ``adagrad``, ``rmsprop``, ``adafactor``,
    or bitsandbytes' ``adamw_8bit`` / ``adamw_bnb_8bit`` / ``paged_adamw_8bit`` /
    ``paged_adamw_32bit`` / ``lion_8bit`` / ``paged_lion_8bit`` (with bitsandbytes installed)."""
    optim_args: str | None = None
    """Extra optimizer arguments, ``key=value,key=value`` (e.g. ``momentum=0.9`` for sgd)."""
    lr_scheduler_type: str = "linear"
    """Any schedule transformers offers (``linear``, ``cosine``, ``cosine_with_restarts``,
    ``polynomial``, ``constant``, ``constant_with_warmup``, ``inverse_sqrt``,
    ``cosine_with_min_lr``, ``cosine_warmup_with_min_lr``, ``warmup_stable_decay``), built by its
    ``get_scheduler`` over the run's optimizer steps (PPO: updates)."""
    lr_scheduler_kwargs: dict[str, Any] | None = None
    """Arguments of the schedule, e.g. ``{num_cycles: 2}`` or ``{min_lr_rate: 0.1}``."""
    warmup_steps: float = 0
    """Steps of linear warm-up; a value below 1 is a fraction of the run."""
    warmup_ratio: float | None = None
    """The warm-up as a fraction of the run (TRL's older name); refused together with warmup_steps."""

    # --- run ------------------------------------------------------------------------------
    output_dir: str = "runs/tether"
    seed: int = 42
    data_seed: int | None = None
    """The seed of the data order alone (shuffles, held-out rows); unset: ``seed``."""
    full_determinism: bool = False
    """Deterministic CUDA kernels, so that a GPU run repeats bit for bit and a resumed run
    matches a straight one; somewhat slower. CPU runs repeat without it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    use_cpu: bool = False
    """Run on the CPU even when a GPU is there (the same as ``device: cpu``)."""
    tf32: bool | None = None
    """TensorFloat-32 matrix multiplies on Ampere and newer GPUs (faster fp32; unset: torch's default)."""
    bf16: bool = False
    """Autocast forwards (and generation) to bfloat16; weights stay fp32. Under DeepSpeed: its bf16
    mode (bf16 weights, saved so; fp32 master weights in the optimizer)."""
    fp16: bool = False
    """Autocast to float16 with a loss scaler (through Accelerate); needs a CUDA device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (policy and value
    model, the value model's backbone included): less memory, about a third more compute.
    ``activation_checkpointing`` (transformers 5's name) is read as this too."""
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    """Passed to the checkpointing: ``{use_reentrant: true}`` for the reentrant variant (tether's
    default is non-reentrant)."""
    torch_compile: bool = False
    """Compile the models' backbones with ``torch.compile`` (dynamic shapes; each decoder layer
    under FSDP, DeepSpeed or gradient checkpointing) for the training and scoring passes, and the
    decoding step (where no CUDA graph replays it). The first steps pay the compile."""
    torch_compile_backend: str | None = None
    """``torch.compile``'s backend (unset: ``inductor``)."""
    torch_compile_mode: str | None = None
    """``torch.compile``'s mode: ``default``, ``reduce-overhead``, ``max-autotune`` ..."""
    per_device_eval_batch_size: int = 8
    """Rows per evaluation micro-batch (SFT, RM) and per evaluation sampling chunk (PPO)."""
    logging_strategy: Literal["steps", "epoch", "no"] = "steps"
    """``steps``: a metrics line every ``logging_steps``; ``epoch``: at the end of each pass over
    the data; ``no``: only evaluation steps and the last (metrics.jsonl, trackers)."""
    logging_steps: int = 1
    """Log every this many steps: each metric's mean over them (HF Trainer's and TRL's rows);
    step, epoch, learning rate and grad_norm are the logged step's own."""
    logging_first_step: bool = False
    """Also log the first step whatever ``logging_steps`` says."""
    report_to: str | list[str] = "none"
    """Trackers besides metrics.jsonl: tensorboard, wandb, trackio; ``all``: each of them that is
    installed; ``none``."""
    run_name: str | None = None
    """The trackers' name for the run."""
    project: str | None = None
    """The W&B / trackio project (unset: the tracker's default)."""
    disable_tqdm: bool = False
    """No progress bars (messages and metrics files stay)."""
    remove_unused_columns: bool = False
    """PPO: true keeps only the prompt column, so reward functions get no other column (TRL's
    trainers drop columns their model does not take; tether keeps them for reward functions by
    default). SFT and RM read only their data columns either way."""
    ddp_find_unused_parameters: bool | None = None
    """Several processes: let DDP allow parameters that get no gradient (slower)."""
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_static_graph: bool | None = None
    ddp_timeout: int = 1800
    """Seconds a process waits for the others in a collective before failing."""
    ddp_backend: str | None = None
    """The process group backend (``nccl``, ``gloo``); unset: Accelerate's choice."""
    deepspeed: str | dict[str, Any] | None = None
    """A DeepSpeed config (a JSON file's path or the mapping itself, inline on the command line
    too), handed to Accelerate; the same as launching with an Accelerate DeepSpeed config. Its
    batch numbers, optimizer, schedule and precision are tether's fields'."""

    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    """Evaluation on held-out data (SFT, RM: held-out rows; PPO: sampling the eval prompts):
    ``steps`` every ``eval_steps``, ``epoch`` after each pass over the data, ``no`` never. Unset:
    SFT and RM every ``eval_steps`` (when set) and at the end; PPO with its sample tables."""
    eval_steps: int | None = None
    """With ``eval_strategy`` steps (or unset, in SFT and RM): evaluate every this many steps."""

    # --- checkpoints ----------------------------------------------------------------------
    save_strategy: Literal["steps", "epoch", "no"] = "steps"
    """``steps``: a checkpoint every ``save_steps`` (and at the end and on SIGTERM / SIGINT);
    ``epoch``: after each pass over the data (and at the end, on a signal); ``no``: none at all
    (the run cannot be resumed)."""
    save_steps: int | None = 500
    """Write a checkpoint every this many updates / optimizer steps (always at the end and on
    SIGTERM / SIGINT); TRL's default, 500."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints; unset (TRL's default): keep every one."""
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

    def deepspeed_settings(self) -> dict[str, Any]:
        """The ``deepspeed`` field's DeepSpeed config as a mapping (read from its JSON file, or a
        mapping written inline, on the command line too), refused in one line where it cannot
        be read or sets what tether's own fields decide: the optimizer and its schedule
        (``optim``, ``lr_scheduler_type``) and the precision (``bf16``, ``fp16``)."""
        settings, where = self.deepspeed, "the DeepSpeed config"
        if isinstance(settings, str) and settings.lstrip().startswith("{"):  # --deepspeed '{zero_optimization: ...}'
            try:
                settings = yaml.safe_load(settings)
            except yaml.YAMLError as error:
                raise ConfigError(f"config field deepspeed: not a mapping: {str(error).splitlines()[0]}") from None
        elif isinstance(settings, str):
            path = Path(settings)
            if not path.is_file():
                raise ConfigError(f"config field deepspeed: no DeepSpeed config file {settings}")
            try:
                settings = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ConfigError(f"config field deepspeed: {path} is not a JSON file: {error}") from None
            where = f"the DeepSpeed config {path}"
        if not isinstance(settings, dict):
            raise ConfigError(f"config field deepspeed: {where} is a {type(settings).__name__}, not a mapping")
        if not isinstance(settings.get("zero_optimization"), dict):
            raise ConfigError(
                f'{where} has no zero_optimization section; add one, e.g. "zero_optimization": {{"stage": 3}}'
            )
        decided = (("optimizer", "optim, learning_rate"), ("scheduler", "lr_scheduler_type, warmup_*"))
        for section, decided_by in decided:
            if section in settings:
                raise ConfigError(f"{where} has a {section} section, but tether makes it from its own fields "
                                  f"({decided_by}); take the {section} section out")
        for name in ("bf16", "fp16"):
            section = settings.get(name)
            enabled = section.get("enabled", "auto") if isinstance(section, dict) else "auto"
            if enabled != "auto" and bool(enabled) != bool(getattr(self, name)):
                raise ConfigError(f"{where} sets {name} enabled: {enabled} but config field {name} is "
                                  f"{getattr(self, name)}; tether's {name} field decides: set it, and {name}.enabled "
                                  '"auto" or nothing in the DeepSpeed config')
        return settings

    def validate(self) -> None:
        """Check types and rules that span fields; raise ConfigError naming the field and the fix."""
        check_types(self)
        if self.torch_compile_backend or self.torch_compile_mode:  # as in transformers: either one turns it on
            self.torch_compile = True
        if self.torch_compile:
            _check_compile_settings(self.torch_compile_backend, self.torch_compile_mode)
        if getattr(self, "lora_settings", None):
            self.lora_settings()  # refuses use_peft with peft_config
        if self.load_in_4bit or self.load_in_8bit:
            self._quantization()  # refused here, before any model loads, where it cannot run
        if self.deepspeed is not None:
            self.deepspeed_settings()  # a file that cannot be read, or settings tether decides
        from tether.logging import tracker_names

        tracker_names(self.report_to)  # an unknown tracker, or one whose package is missing
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config field {name} must be a finite number, got {value}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "max_nonfinite_steps", "per_device_eval_batch_size", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate < 0:
            raise ConfigError(f"config field learning_rate must be >= 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(
                f"config field max_grad_norm must be > 0, got {self.max_grad_norm}; leave it unset (null) for no clipping"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must lie in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"config field adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.weight_decay < 0:
            raise ConfigError(f"config field weight_decay must be >= 0, got {self.weight_decay}")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ConfigError("--resume and --overwrite are both given: continue the run in output_dir, or replace it")
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1 (or unset), got {getattr(self, name)}")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"config field num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.bf16 and self.fp16:
            raise ConfigError("config fields bf16 and fp16 are both set; choose one mixed precision")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ConfigError(
                f"config field lr_scheduler_type {self.lr_scheduler_type!r} is not one of {', '.join(SCHEDULES)}"
            )
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"config field optim {self.optim!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.warmup_steps < 0 or (self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1):
            raise ConfigError("config fields warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ConfigError("config fields warmup_steps and warmup_ratio are both set; give one")
        if self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer():
            raise ConfigError(
                f"config field warmup_steps must be a whole number of steps or a fraction below 1, got {self.warmup_steps}"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"config field max_steps must be positive (or -1: use num_train_epochs), got {self.max_steps}")
        if self.use_cpu:
            self.device = "cpu"
        if self.fp16 and self.device == "cpu":
            raise ConfigError("config field fp16 needs a CUDA device; use bf16 on CPU")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ConfigError(f"config field eval_steps must be at least 1, got {self.eval_steps}")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ConfigError("config field eval_strategy is steps but eval_steps is unset; set eval_steps")

    @property
    def order_seed(self) -> int:
        """The seed of the data order: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def model_options(self, own_revision: bool = True) -> dict[str, Any]:
        """``from_pretrained`` arguments for the models this config loads: dtype, attention
        kernel, remote code, quantization; ``own_revision``: ``model_revision`` too (it names a
        revision of ``model_name_or_path``, not of a reward or value model)."""
        import torch

        options: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        options["dtype"] = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        if self.attn_implementation:
            options["attn_implementation"] = self.attn_implementation
        if own_revision and self.model_revision != "main":
            options["revision"] = self.model_revision
        if self.load_in_4bit or self.load_in_8bit:
            options["quantization_config"] = self._quantization()
        return options

    def _quantization(self):
        import torch

        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("config fields load_in_4bit and load_in_8bit are both set; choose one")
        if not torch.cuda.is_available() or self.device == "cpu":
            raise ConfigError("load_in_4bit / load_in_8bit quantize through bitsandbytes on a CUDA device; none here")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("load_in_4bit / load_in_8bit need bitsandbytes: pip install bitsandbytes") from None
        if not (getattr(self, "use_peft", False) or getattr(self, "peft_config", None)):
            raise ConfigError("a quantized model trains through LoRA: set use_peft (or peft_config) as well")
        from transformers import BitsAndBytesConfig

        storage = self.bnb_4bit_quant_storage
        return BitsAndBytesConfig(
            load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit,
            bnb_4bit_compute_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type, bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
            **({"bnb_4bit_quant_storage": getattr(torch, storage)} if storage else {}),
        )

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps``: ``warmup_steps``, or a fraction of it."""
        if self.warmup_ratio is not None:
            fraction = self.warmup_ratio
        else:
            fraction = self.warmup_steps if self.warmup_steps < 1 else None
        return math.ceil(fraction * total_steps) if fraction is not None else int(self.warmup_steps)


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
    use_peft: bool = False
    """TRL's way to ask for LoRA: the ``lora_*`` fields below make the adapter (the same one
    ``peft_config`` would); giving both is refused."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: list[str] | None = None
    """Modules the adapter wraps; unset: PEFT's choice for the architecture."""
    lora_target_parameters: list[str] | None = None
    lora_modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapter."""
    lora_task_type: str = "CAUSAL_LM"
    """Accepted for TRL configs; tether sets each model's own task type (the policy's
    ``CAUSAL_LM``, a reward or value model's ``SEQ_CLS``)."""
    use_rslora: bool = False
    use_dora: bool = False

    def lora_settings(self) -> dict[str, Any] | None:
        """The adapter's ``peft.LoraConfig`` fields: ``peft_config``, or those of the ``lora_*``
        fields with ``use_peft``; None: no adapter."""
        if self.use_peft and self.peft_config:
            raise ConfigError("config fields use_peft and peft_config both ask for LoRA; give one")
        if not self.use_peft:
            return self.peft_config
        settings = {"r": self.lora_r, "lora_alpha": self.lora_alpha,
                    "target_modules": self.lora_target_modules, "target_parameters": self.lora_target_parameters,
                    "modules_to_save": self.lora_modules_to_save, "use_rslora": self.use_rslora,
                    "use_dora": self.use_dora}
        return {key: value for key, value in settings.items() if value is not None}


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
    """Rows of the output layer's log-softmax computed at a time (on CPU in blocks of 2048
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
        if self.value_model_peft and not self.lora_settings():
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
        if self.max_steps > 0:  # updates, as TRL's max_steps overrides the episodes
            num_total_batches = self.max_steps
        else:
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


@dataclass(frozen=True)
class GroupPlan:
    """Batch sizes of a critic-free run (GRPO, RLOO), in completions unless said otherwise.

    One round samples ``generation_batch_size`` completions, ``num_generations`` per prompt, for
    ``prompts`` prompts (``local_prompts`` on each process); its rollout is trained on for
    ``num_iterations`` passes of ``mini_batches`` optimizer steps (``steps_per_round`` in all),
    each of ``per_device_train_batch_size x gradient_accumulation_steps x processes`` completions
    in micro-batches of ``per_device_train_batch_size``. ``optimizer_steps`` in the whole run:
    ``max_steps`` when set, so the last round may stop short of ``steps_per_round`` (as TRL does).
    """

    world_size: int
    generation_batch_size: int
    prompts: int
    local_prompts: int
    mini_batches: int
    steps_per_round: int
    num_rounds: int
    micro_batch_size: int
    optimizer_steps: int


@dataclass
class CriticFreeConfig(LoraFields, TrainingConfig):
    """The fields GRPO and RLOO share: TRL's ``GRPOConfig`` / ``RLOOConfig`` names and meanings."""

    # --- models and rewards -------------------------------------------------------------------
    reward_funcs: str | list[str] | None = None
    """The rewards: ``module:function`` / ``file.py:function`` names and reward-model paths (from
    Python, ``reward_funcs=`` takes callables and models too), summed with ``reward_weights``."""
    reward_weights: list[float] | None = None
    """One weight per reward (default 1 each)."""
    metric_function: str | None = None
    """``module:function`` computing extra metrics of each round's completions (a dict of numbers)."""

    # --- data -----------------------------------------------------------------------------------
    prompt_column: str | None = None
    """Column holding the prompts (text, chat messages or token ids); auto-detected if unset."""
    max_prompt_length: int | None = None
    """Prompts longer than this many tokens are cut from the left (or refused, see below)."""
    prompt_truncation: Literal["left", "error"] = "left"
    shuffle_dataset: bool = True
    """Draw the prompts in a seeded shuffle (false: in dataset order)."""

    # --- generation -----------------------------------------------------------------------------
    num_generations: int = 8
    """Completions sampled per prompt: one group, whose rewards make each other's baseline."""
    num_generations_eval: int | None = None
    """Completions per evaluation prompt (default ``num_generations``)."""
    max_completion_length: int = 512
    generation_batch_size: int | None = None
    """Completions sampled per round, all processes' (default: ``per_device_train_batch_size x
    processes x steps_per_generation``); a multiple of ``num_generations``."""
    steps_per_generation: int | None = None
    """Micro-steps of ``per_device_train_batch_size`` each round's completions make (default
    ``gradient_accumulation_steps``: one optimizer step per round)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k filtering."""
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_id: int | list[int] | None = None
    """Ids that end a completion (default: the model's EOS ids)."""
    cuda_graphs: bool = True
    """On a GPU, decode by replaying a CUDA graph of one step."""
    local_rollout_forward_batch_size: int = 64
    """Rows per generation and scoring chunk."""
    logprob_chunk_size: int = 1024
    """Rows of the output layer's log-softmax computed at a time."""

    # --- algorithm ------------------------------------------------------------------------------
    num_iterations: int = 1
    """Passes over each round's completions (μ)."""
    epsilon: float = 0.2
    epsilon_high: float | None = None
    """Upper clipping bound (DAPO's clip-higher; default ``epsilon``)."""
    mask_truncated_completions: bool = False
    """Completions that never reached a stop token are left out of the loss."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of completions that did not end on a stop token."""
    sync_ref_model: bool = False
    """Every ``ref_model_sync_steps`` steps the reference becomes ``alpha x policy + (1 - alpha) x
    reference`` (TR-DPO), with ``alpha`` = ``ref_model_mixup_alpha``."""
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    # --- logging ----------------------------------------------------------------------------------
    log_completions: bool = False
    """Print a table of prompts, completions and rewards (and append them to samples.jsonl) at
    every logged step."""
    num_completions_to_print: int | None = None
    """Rows of that table (default: every completion of the round)."""

    def validate(self) -> None:
        super().validate()
        positive = ("num_generations", "max_completion_length", "num_iterations", "local_rollout_forward_batch_size",
                    "logprob_chunk_size", "ref_model_sync_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"config field temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("config fields top_p must lie in (0, 1], top_k be >= 0, repetition_penalty > 0")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"config field min_p must lie in [0, 1], got {self.min_p}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigError("config fields epsilon and epsilon_high must be >= 0")
        if self.beta < 0:
            raise ConfigError(f"config field beta must be >= 0, got {self.beta}")
        if self.stop_token_id == []:
            raise ConfigError("config field stop_token_id is an empty list; give one or more ids, or leave it unset")
        if self.sync_ref_model and (self.beta == 0 or self.lora_settings()):
            raise ConfigError("sync_ref_model needs a reference model of its own: beta > 0 and no LoRA adapter")
        for name in ("generation_batch_size", "steps_per_generation"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1 (or unset), got {getattr(self, name)}")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("config fields generation_batch_size and steps_per_generation are both set; give one")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"config field max_prompt_length must be at least 1, got {self.max_prompt_length}")

    def group_plan(self, num_prompts: int, world_size: int = 1) -> GroupPlan:
        """The batch sizes of a run over ``num_prompts`` prompts on ``world_size`` processes;
        sizes that do not divide are refused naming the fields."""
        micro = self.per_device_train_batch_size
        step_completions = micro * self.gradient_accumulation_steps * world_size  # one optimizer step
        if self.generation_batch_size is not None:
            generation = self.generation_batch_size
        else:
            generation = micro * world_size * (self.steps_per_generation or self.gradient_accumulation_steps)
        if generation % self.num_generations:
            raise ConfigError(
                f"num_generations={self.num_generations} does not divide a round's {generation} completions "
                "(generation_batch_size, or per_device_train_batch_size x processes x steps_per_generation); "
                "make it a divisor"
            )
        if generation % step_completions:
            raise ConfigError(
                f"a round's {generation} completions do not make whole optimizer steps of {step_completions} "
                "(per_device_train_batch_size x gradient_accumulation_steps x processes)"
            )
        prompts = generation // self.num_generations
        if prompts % world_size:
            raise ConfigError(
                f"a round's {prompts} prompts cannot be shared by {world_size} processes; make "
                "generation_batch_size / num_generations a multiple of the processes"
            )
        mini_batches = generation // step_completions
        rounds_per_epoch = max(1, math.ceil(num_prompts / prompts))
        steps_per_round = mini_batches * self.num_iterations
        if self.max_steps > 0:  # TRL's max_steps: optimizer steps
            rounds = math.ceil(self.max_steps / steps_per_round)
        else:
            rounds = max(1, math.ceil(self.num_train_epochs * rounds_per_epoch))
        steps = self.max_steps if self.max_steps > 0 else rounds * steps_per_round
        return GroupPlan(world_size, generation, prompts, prompts // world_size, mini_batches, steps_per_round, rounds,
                         micro, steps)


@dataclass
class GRPOConfig(CriticFreeConfig):
    """GRPO: group-normalised advantages over ``num_generations`` completions per prompt. TRL
    1.12's ``GRPOConfig`` names and defaults where they apply."""

    beta: float = 0.0
    """KL coefficient (the k3 estimate per token, in the loss); 0 loads no reference model."""
    delta: float | None = None
    """Two-sided GRPO: the unclipped ratio is capped at ``delta`` too."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """How per-token losses become the step's loss: ``grpo`` mean of each sequence's token mean;
    ``dapo`` mean over the step's tokens; ``bnpo`` over this process's tokens; ``dr_grpo`` sum /
    (sequences x max_completion_length)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide each advantage by its group's reward std (``group``), the batch's (``batch``), or
    not (``none``); true / false are read as group / none."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The policy ratio per token, or one per sequence (GSPO: the exp of the mean log ratio)."""
    use_bias_correction_kl: bool = True
    """Weigh the KL term by the importance ratio, so its gradient is unbiased off-policy."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (its gradient flows through the chunked output layer)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Several rewards: sum them (weighted), then scale as ``scale_rewards`` says; or scale each
    within its group first, sum, and scale the sums over the batch (GDPO)."""
    learning_rate: float = 1e-6
    output_dir: str = "runs/grpo"

    def validate(self) -> None:
        if isinstance(self.scale_rewards, bool) or self.scale_rewards in ("true", "false", "True", "False"):
            self.scale_rewards = "group" if str(self.scale_rewards).lower() == "true" else "none"
        super().validate()
        if self.num_generations < 2:
            raise ConfigError(
                "config field num_generations must be at least 2: a group of one has no spread, so every "
                "advantage would be 0 and only the KL term would train"
            )
        if self.delta is not None and self.delta <= 1:
            raise ConfigError(f"config field delta must be > 1 (a cap on the ratio), got {self.delta}")


@dataclass
class RLOOConfig(CriticFreeConfig):
    """RLOO: each completion's baseline is the mean reward of its group's others; the KL to the
    reference is in the reward. TRL 1.12's ``RLOOConfig`` names and defaults where they apply."""

    beta: float = 0.05
    """KL coefficient: ``beta x`` the summed k1 KL of a completion is subtracted from its reward;
    0 loads no reference model."""
    num_generations: int = 2
    normalize_advantages: bool = False
    """Advantages scaled to mean 0 and std 1 over each round's batch."""
    reward_clip_range: list[float] | None = None
    """``[min, max]`` the rewards are clipped to before the KL is subtracted."""
    learning_rate: float = 1e-6
    output_dir: str = "runs/rloo"

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ConfigError("config field num_generations must be at least 2: a leave-one-out baseline needs others")
        if self.reward_clip_range is not None and (
            len(self.reward_clip_range) != 2 or self.reward_clip_range[0] > self.reward_clip_range[1]
        ):
            raise ConfigError(f"config field reward_clip_range must be [min, max], got {self.reward_clip_range}")


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
    completion_only_loss: bool | None = True
    """Loss on completion tokens only (True) or on every token, the prompt's too (False); None,
    TRL's default, is True (rows without a prompt have only completion tokens)."""
    loss_type: Literal["nll"] | None = None
    """TRL's name: SFT's loss is the tokens' negative log-likelihood (``nll``, also what None
    means); ``dft`` is not offered."""
    eval_fraction: float = 0.0
    """Share of the rows held out for evaluation when the dataset has no ``dataset_test_split``."""
    learning_rate: float = 2e-5
    output_dir: str = "runs/sft"

    def validate(self) -> None:
        super().validate()
        if self.completion_only_loss is None:
            self.completion_only_loss = True
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
    normalize_rewards: bool = False
    """After training, store a bias so the reference set scores mean 0 (``get_reward`` applies it)."""
    normalization_dataset: str | None = None
    """Reference set for normalisation (prompt + completion rows); default: the chosen responses."""
    learning_rate: float = 1e-4
    """TRL 1.12 RewardConfig's default."""
    output_dir: str = "runs/rm"

    def validate(self) -> None:
        super().validate()
        _check_common_supervised(self)


@dataclass
class DPOConfig(LoraFields, TrainingConfig):
    """DPO and its relatives on chosen / rejected pairs. TRL 1.12's ``DPOConfig`` names and
    defaults where they apply (``truncation_mode`` and ``gradient_checkpointing`` keep tether's)."""

    beta: float = 0.1
    """How tightly the policy is tied to its reference (IPO's tau for ``ipo``)."""
    loss_type: str | list[str] = "sigmoid"
    """One loss or a list combined with ``loss_weights``: ``sigmoid`` (DPO), ``hinge``, ``ipo``,
    ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``apo_zero``,
    ``apo_down``, ``discopop``, ``sigmoid_norm``, and ``sft`` (the chosen completions' NLL)."""
    loss_weights: list[float] | None = None
    """One weight per ``loss_type`` (default 1 each)."""
    label_smoothing: float = 0.0
    """``robust``: the chance a label is flipped, in [0, 0.5); ``exo_pair``: its epsilon, in (0, 1)."""
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """The divergence to the reference (f-DPO); ``reverse_kl`` is plain DPO."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of ``alpha_divergence``."""
    discopop_tau: float = 0.05
    """The temperature of ``discopop``'s mixing."""
    max_length: int | None = 1024
    """Longest sequence (prompt + chosen or rejected completion)."""
    max_prompt_length: int | None = None
    """Prompts longer than this many tokens keep their last tokens (older TRL configs' field)."""
    truncation_mode: Literal["keep_end", "keep_start", "drop"] = "keep_end"
    """For pairs longer than ``max_length``: ``keep_end`` cuts the shared prompt from the left
    until both sides fit; ``keep_start`` keeps each side's first tokens (TRL 1.12's only mode);
    ``drop`` drops the pair. Both are counted in one warning."""
    precompute_ref_log_probs: bool = False
    """Score every pair with the reference once before training, keep the numbers with the pairs
    and free the reference (no reference model in memory while training)."""
    precompute_ref_batch_size: int | None = None
    """Pairs per pass of that scoring (default ``per_device_eval_batch_size``)."""
    sync_ref_model: bool = False
    """Every ``ref_model_sync_steps`` steps the reference becomes ``alpha x policy + (1 - alpha) x
    reference`` (TR-DPO), with ``alpha`` = ``ref_model_mixup_alpha``."""
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    logprob_chunk_size: int = 1024
    """Rows of the output layer's log-softmax computed at a time."""
    eval_fraction: float = 0.0
    """Share of the pairs held out for evaluation when the dataset has no ``dataset_test_split``."""
    learning_rate: float = 1e-6
    output_dir: str = "runs/dpo"

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def validate(self) -> None:
        from tether.ops.preference import LOSS_TYPES

        super().validate()
        _check_common_supervised(self)
        kinds = self.loss_types
        for kind in kinds:
            if kind in ("aot", "aot_unpaired"):
                raise ConfigError(f"loss_type {kind} is not offered: it sorts over the batch, so the update would "
                                  "depend on how the batch is split; use sigmoid, ipo, robust, ...")
            if kind not in LOSS_TYPES:
                raise ConfigError(f"config field loss_type {kind!r} is not one of {', '.join(LOSS_TYPES)}")
        if not kinds or len(set(kinds)) < len(kinds):
            raise ConfigError(f"config field loss_type must name each loss once, got {kinds}")
        if self.loss_weights is not None and len(self.loss_weights) != len(kinds):
            raise ConfigError(f"config field loss_weights has {len(self.loss_weights)} weights for "
                              f"{len(kinds)} loss types {kinds}; give one each")
        if self.beta <= 0:
            raise ConfigError(f"config field beta must be > 0, got {self.beta}")
        if "robust" in kinds and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config field label_smoothing must lie in [0, 0.5) for robust, got {self.label_smoothing}")
        if "exo_pair" in kinds and not 0 < self.label_smoothing < 1:
            raise ConfigError(f"loss_type exo_pair needs label_smoothing in (0, 1) (its epsilon; 1e-3 is typical), "
                              f"got {self.label_smoothing}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"config field label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        paired = {"nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"} & set(kinds)
        if self.f_divergence_type != "reverse_kl" and paired:
            raise ConfigError(f"f_divergence_type {self.f_divergence_type} does not apply to loss_type "
                              f"{', '.join(sorted(paired))}; use reverse_kl with them")
        if self.precompute_ref_log_probs and self.sync_ref_model:
            raise ConfigError("precompute_ref_log_probs and sync_ref_model are both set: a reference that changes "
                              "cannot be scored once ahead; choose one")
        if self.sync_ref_model and self.lora_settings():
            raise ConfigError("sync_ref_model needs a reference model of its own, not the adapter switched off; "
                              "drop the LoRA adapter or sync_ref_model")
        for name in ("ref_model_sync_steps", "logprob_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_prompt_length", "precompute_ref_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be at least 1 (or unset), got {getattr(self, name)}")
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            raise ConfigError(f"config field ref_model_mixup_alpha must lie in [0, 1], got {self.ref_model_mixup_alpha}")
        if self.discopop_tau <= 0:
            raise ConfigError(f"config field discopop_tau must be > 0, got {self.discopop_tau}")


COMPILE_MODES = ("default", "lite", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile_settings(backend: str | None, mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"config field torch_compile_mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if backend is not None:
        import torch._dynamo

        backends = [name for name in torch._dynamo.list_backends(exclude_tags=()) if not name.endswith("_TESTING_ONLY")]
        if backend not in backends:
            raise ConfigError(f"config field torch_compile_backend {backend!r} is not one of {', '.join(backends)}")


def _check_common_supervised(config) -> None:
    if config.max_length is not None and config.max_length < 2:
        raise ConfigError(f"config field max_length must be at least 2, got {config.max_length}")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"config field eval_fraction must lie in [0, 1), got {config.eval_fraction}")



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
        options = typing.get_args(tp)
        if isinstance(value, str) and (value.strip().startswith("[") or "," in value):
            # a list from the command line, "[a, b]" or "a,b", for a field that also takes one item
            options = sorted(options, key=lambda option: typing.get_origin(option) is not list)
        for option in options:
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
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",")]
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
                value = BARE_FLAG  # --bf16 alone: true, for a true/false field
            else:
                index += 1
                value = args[index]
        key = key.replace("-", "_")
        overrides[FLAG_ALIASES.get(key, key)] = value
        index += 1
    return overrides


def _known_values(cls, values: dict[str, Any], warn) -> dict[str, Any]:
    """``values`` with TRL's other names for ``cls``'s fields translated (``ALIASES``), TRL fields
    that have no effect here said once and dropped (``NOTED_FIELDS``), unsupported ones dropped
    at TRL's default and refused otherwise; an unknown key is refused with the closest name."""
    values = dict(values)
    for alias, name in ALIASES.items():
        if alias in values:
            if name in values:
                raise ConfigError(f"config fields {name} and {alias} are both set; give {name}")
            values[name] = values.pop(alias)
    types_ = _field_types(cls)
    known = set(types_)
    for key in list(values):
        if key in known:
            takes_true = types_[key] is bool or bool in typing.get_args(types_[key])
            if isinstance(values[key], _BareFlag) and not takes_true:
                raise ConfigError(f"--{key} needs a value (it is {_describe(types_[key])}): --{key} VALUE")
            continue
        if key in UNSUPPORTED_FIELDS:
            default, reason = UNSUPPORTED_FIELDS[key]
            given = yaml.safe_load(values[key]) if isinstance(values[key], str) else values[key]
            if given != default and not (given == {} and default is None):
                raise ConfigError(f"config field {key}={given!r} is not supported: {reason}; leave it at {default!r}")
            del values[key]
            continue
        if key in NOTED_FIELDS:
            warn(f"note: config field {key!r} has no effect in tether: {NOTED_FIELDS[key]}")
            del values[key]
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config field {key!r}{hint}")
    return values


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
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: {reason}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    values = _known_values(cls, values, warn)
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


FIELD_GROUPS = {  # how --help and --print-config lay the fields out
    "model": (
        "model_name_or_path", "sft_model_path", "reward_model_path", "value_model_path", "model_revision",
        "trust_remote_code", "dtype", "attn_implementation", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type",
        "use_bnb_nested_quant", "bnb_4bit_quant_storage", "peft_config", "use_peft", "lora_r", "lora_alpha",
        "lora_target_modules", "lora_target_parameters", "lora_modules_to_save", "lora_task_type",
        "use_rslora", "use_dora", "value_model_peft",
    ),
    "data": (
        "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "prompt_column",
        "max_prompt_length", "prompt_truncation", "max_length", "truncation_mode", "eval_fraction",
        "normalization_dataset", "remove_unused_columns", "data_seed",
    ),
    "generation": (
        "response_length", "temperature", "stop_token", "stop_token_id", "local_rollout_forward_batch_size",
        "cuda_graphs",
    ),
    "algorithm": (
        "num_ppo_epochs", "num_mini_batches", "kl_coef", "kl_estimator", "adaptive_kl", "kl_target", "kl_horizon",
        "whiten_rewards", "whiten_advantages", "cliprange", "cliprange_value", "vf_coef", "entropy_coef", "gamma",
        "lam", "missing_eos_penalty", "completion_only_loss", "normalize_rewards", "beta", "loss_type",
        "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau",
        "precompute_ref_log_probs", "precompute_ref_batch_size", "sync_ref_model", "ref_model_mixup_alpha",
        "ref_model_sync_steps",
    ),
    "optimisation": (
        "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "total_episodes",
        "max_steps", "learning_rate", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
        "weight_decay", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
        "seed", "full_determinism", "bf16", "fp16", "tf32", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "logprob_chunk_size", "per_device_eval_batch_size", "torch_compile", "torch_compile_backend",
        "torch_compile_mode", "max_nonfinite_steps",
    ),
    "logging and checkpoints": (
        "output_dir", "logging_strategy", "logging_steps", "logging_first_step", "report_to", "run_name", "project",
        "disable_tqdm", "num_sample_generations", "metric_function", "eval_strategy", "eval_steps", "save_strategy",
        "save_steps", "save_total_limit", "save_merged", "resume_from_checkpoint", "overwrite_output_dir",
        "extend_run",
    ),
    "processes": (
        "device", "use_cpu", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
        "ddp_static_graph", "ddp_timeout", "ddp_backend", "deepspeed",
    ),
}


def grouped_fields(cls) -> dict[str, list[str]]:
    """``cls``'s fields by ``FIELD_GROUPS`` (a field in no group lands in ``other``)."""
    names = [f.name for f in dataclasses.fields(cls)]
    groups = {group: [n for n in members if n in names] for group, members in FIELD_GROUPS.items()}
    placed = {n for members in groups.values() for n in members}
    groups["other"] = [n for n in names if n not in placed]
    return {group: members for group, members in groups.items() if members}


def describe_fields(cls) -> str:
    """Every field of ``cls``, grouped: name, type, default and its docstring."""
    docs, types_ = field_docs(cls), _field_types(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    lines = []
    for group, names in grouped_fields(cls).items():
        lines.append(f"\n{group}:")
        for name in names:
            lines.append(f"  --{name} ({_describe(types_[name])}, default {defaults[name]!r})")
            if docs.get(name):
                lines.append(f"      {docs[name]}")
    return "\n".join(lines)


def config_template(cls, config=None) -> str:
    """A YAML config of every field, grouped, each with its docstring as a comment: ``tether
    <command> --print-config`` (the command-line actions left out). Every field at its default,
    or at ``config``'s values (a ``--config`` file and ``--field`` overrides given with it)."""
    docs, defaults = field_docs(cls), config_values(config if config is not None else cls())
    said = "every field at its default" if config is None else "the given fields and the defaults of the rest"
    lines = [f"# tether config ({cls.__name__}): {said}; edit and run with --config"]
    for group, names in grouped_fields(cls).items():
        lines.append(f"\n# --- {group} " + "-" * max(0, 70 - len(group)))
        for name in names:
            if name not in defaults:
                continue
            if docs.get(name):
                lines.extend(f"# {line}" for line in textwrap.wrap(docs[name], 92))
            lines.append(yaml.safe_dump({name: defaults[name]}, default_flow_style=False, width=10_000).strip())
    return "\n".join(lines) + "\n"


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
    changes: dict[str, list[str]] = {"training": [], "length": [], "shorter": [], "display": []}
    for name, value in current.items():
        if name not in saved or saved[name] == value:
            continue
        kind = "display" if name in DISPLAY_FIELDS else "length" if name in LENGTH_FIELDS else "training"
        if kind == "length" and _shorter(saved[name], value):
            kind = "shorter"
        changes[kind].append(f"{name} {saved[name]!r} -> {value!r}")
    return changes


def _shorter(before, after) -> bool:
    """Whether a run-length field's new value asks for a shorter run (``None`` and -1: unset)."""
    unset = (None, -1)
    if before in unset or after in unset:
        return False
    return float(after) < float(before)


def save_config(config, path: str | Path) -> None:
    from tether.saving import write_text_atomic

    write_text_atomic(path, config_yaml(config))
