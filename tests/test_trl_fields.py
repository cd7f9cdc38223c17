"""A TRL config moves over unchanged (issue 21).

Every field of TRL 1.12's ``PPOConfig`` (its ``TrainingArguments`` included), ``ModelConfig`` and
``ScriptArguments`` is either a field of tether's config, with its effect (the tests below show
the ones people set), or accepted with a one-line note that it has no effect here, where that is
true and harmless (``NOTED_FIELDS``); anything else is an unknown key. The field list comes from
the installed TRL when there is one, else from ``tests/trl_1_12_fields.json`` (written from it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import yaml

from tether.cli import main
from tether.config import (
    ALIASES,
    DPOConfig,
    NOTED_FIELDS,
    UNSUPPORTED_FIELDS,
    GRPOConfig,
    PPOConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
    load_config,
)
from tether.errors import ConfigError
from tether.tiny import numbered_words, tiny_causal_lm, tiny_reward_model, word_tokenizer
from tether.trainers.ppo import PPOTrainer
from tether.trainers.sft import SFTTrainer
from tests.trl_lists import trl_config_fields, trl_defaults, unknown_to_tether

WORDS = numbered_words(20)
PROMPTS = [f"w{i} w{i + 1}" for i in range(16)]


def trl_fields() -> dict[str, list[str]]:
    try:
        from trl import ModelConfig, ScriptArguments
        from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    except Exception:  # TRL not installed (CI): the list written from TRL 1.12.0
        recorded = json.loads((Path(__file__).parent / "trl_1_12_fields.json").read_text())
        return {name: recorded[name] for name in ("PPOConfig", "ModelConfig", "ScriptArguments")}
    return {cls.__name__: [f.name for f in dataclasses.fields(cls)] for cls in (TRLPPOConfig, ModelConfig, ScriptArguments)}


ALL_TRL_FIELDS = sorted({name for names in trl_fields().values() for name in names})
TETHER_FIELDS = {f.name for f in dataclasses.fields(PPOConfig)}


@pytest.mark.parametrize("name", ALL_TRL_FIELDS)
def test_every_trl_field_has_its_effect_or_a_true_note(name):
    effect = name in TETHER_FIELDS or ALIASES.get(name) in TETHER_FIELDS
    noted = name in NOTED_FIELDS
    assert effect != noted, f"{name}: {'both' if effect else 'neither'} a tether field and a noted one"


def test_the_readme_configuration_reference_names_every_field():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    reference = readme[readme.index("## Configuration reference") : readme.index("## Scaling up")]
    classes = (PPOConfig, SFTConfig, RewardConfig, GRPOConfig, RLOOConfig, DPOConfig)
    names = {f.name for cls in classes for f in dataclasses.fields(cls)} | set(NOTED_FIELDS) | set(UNSUPPORTED_FIELDS)
    missing = sorted(name for name in names if f"`{name}`" not in reference)
    assert not missing, f"README's configuration reference does not name {missing}"


def test_a_noted_field_is_said_once_and_an_unknown_one_refused():
    notes = []
    config = load_config(PPOConfig, overrides={"push_to_hub": "true", "dataloader_num_workers": "4"}, warn=notes.append)
    assert config.output_dir == "runs/ppo" and len(notes) == 2
    assert "'push_to_hub' has no effect in tether: tether does not push to the Hub" in notes[0]
    with pytest.raises(ConfigError, match="unknown config field 'lerning_rate'; did you mean 'learning_rate'"):
        load_config(PPOConfig, overrides={"lerning_rate": "1e-5"})


# --- effects ---------------------------------------------------------------------------------------

def ppo(tmp_path, **fields) -> PPOTrainer:
    tokenizer = word_tokenizer(WORDS)
    settings = dict(output_dir=str(tmp_path), device="cpu", per_device_train_batch_size=4, num_ppo_epochs=1,
                    response_length=3, num_sample_generations=0, learning_rate=1e-3)
    config = PPOConfig(**{**settings, **fields})
    return PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), lambda p, r: [0.1 * len(x) for x in r], PROMPTS)


@pytest.mark.parametrize(("fields", "rate"), [
    # cosine after 2 warm-up steps over 8: lr * step / 2 while warming, then 0.5 (1 + cos(pi (u - 2) / 6))
    (dict(lr_scheduler_type="cosine", warmup_steps=2),
     lambda u: u / 2 if u < 2 else 0.5 * (1 + math.cos(math.pi * (u - 2) / 6))),
    (dict(lr_scheduler_type="constant_with_warmup", warmup_ratio=0.25), lambda u: min(1.0, u / 2)),
    (dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}),
     lambda u: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u / 8))),
    (dict(lr_scheduler_type="linear", warmup_steps=0.25), lambda u: u / 2 if u < 2 else (8 - u) / 6),
], ids=["cosine-warmup", "constant-warmup-ratio", "cosine-min-lr", "linear-warmup-fraction"])
def test_schedules_and_warmup_are_transformers_own(tmp_path, fields, rate):
    """max_steps 8 updates; the rate each update used, against the schedule's formula."""
    trainer = ppo(tmp_path, max_steps=8, **fields)
    assert trainer.plan.num_total_batches == 8
    rates = [trainer.step()["lr"] for _ in range(8)]
    assert rates == pytest.approx([1e-3 * rate(u) for u in range(8)], abs=1e-12)


def test_max_steps_counts_optimizer_steps_in_sft(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    rows = [{"prompt": f"w{i}", "completion": f"w{i + 1}"} for i in range(8)]
    config = SFTConfig(output_dir=str(tmp_path), device="cpu", per_device_train_batch_size=4, max_steps=5)
    assert [m["step"] for m in SFTTrainer(config, tokenizer, tiny_causal_lm(tokenizer), rows).train()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("optim", "kind", "args"), [
    ("sgd", torch.optim.SGD, "momentum=0.5"), ("adamw_torch", torch.optim.AdamW, None),
    ("adagrad", torch.optim.Adagrad, None), ("rmsprop", torch.optim.RMSprop, "alpha=0.9"),
])
def test_optim_makes_that_optimizer(tmp_path, optim, kind, args):
    trainer = ppo(tmp_path, optim=optim, optim_args=args, total_episodes=4)
    assert type(trainer.optimizer) is kind
    if args:
        key, value = args.split("=")
        assert trainer.optimizer.param_groups[0][key] == float(value)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_adafactor_and_the_8bit_optimizers(tmp_path):
    from transformers.optimization import Adafactor

    assert isinstance(ppo(tmp_path, optim="adafactor").optimizer, Adafactor)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="optim adamw_8bit needs bitsandbytes"):
            ppo(tmp_path / "b", optim="adamw_8bit")
    with pytest.raises(ConfigError, match="optim 'adamw_galore' is not one of"):
        ppo(tmp_path / "c", optim="adamw_galore")


def test_model_loading_fields_reach_from_pretrained(tmp_path, monkeypatch):
    """model_revision (the policy's own), dtype (torch_dtype too), attn_implementation, through
    the command's loaders."""
    import tether.models.loading as loading

    calls = []
    real = loading.load_pretrained
    monkeypatch.setattr(loading, "load_pretrained", lambda *args, **kwargs: calls.append((args, kwargs)) or real(*args, **{k: v for k, v in kwargs.items() if k != "revision"}))
    tokenizer = word_tokenizer(WORDS)
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    code = main(["ppo", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model_path",
                 "tests.test_ppo_trainer:w5_fraction", "--dataset_name", str(tmp_path / "p.jsonl"), "--output_dir",
                 str(tmp_path / "out"), "--device", "cpu", "--total_episodes", "8", "--response_length", "2",
                 "--model_revision", "v2", "--torch_dtype", "bfloat16", "--attn_implementation", "eager"])
    assert code == 0
    policy = next(kwargs for args, kwargs in calls if args[2] == "policy model")
    assert policy["revision"] == "v2" and policy["dtype"] == torch.bfloat16 and policy["attn_implementation"] == "eager"
    assert next(kwargs for args, kwargs in calls if args[2] == "tokenizer")["revision"] == "v2"


def test_use_peft_and_the_lora_fields_make_the_adapter(tmp_path):
    trainer = ppo(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
                  use_rslora=True)
    adapter = trainer.policy.peft_config["default"]
    assert (adapter.r, adapter.lora_alpha, sorted(adapter.target_modules), adapter.use_rslora) == (
        4, 8, ["q_proj", "v_proj"], True)
    with pytest.raises(ConfigError, match="use_peft and peft_config both"):
        ppo(tmp_path, use_peft=True, peft_config={"r": 4})


def test_quantization_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="load_in_4bit / load_in_8bit"):
        PPOConfig(load_in_4bit=True, use_peft=True, device="cpu").validate()


def test_data_seed_orders_the_data_and_seed_the_rest(tmp_path):
    orders = {}
    for seed, data_seed in ((1, 7), (2, 7), (1, 8)):
        trainer = ppo(tmp_path / f"{seed}-{data_seed}", seed=seed, data_seed=data_seed)
        orders[seed, data_seed] = trainer.sampler.next_batch()
    assert orders[1, 7] == orders[2, 7] != orders[1, 8]


def test_remove_unused_columns_keeps_the_prompt_column_alone(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    rows = datasets.Dataset.from_list([{"prompt": p, "answer": "w1"} for p in PROMPTS])
    for remove, expected in ((False, {"answer"}), (True, set())):
        config = PPOConfig(output_dir=str(tmp_path), device="cpu", remove_unused_columns=remove)
        trainer = PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), lambda p, r: [0.0] * len(r), rows)
        assert set(trainer.train_set.columns) == expected


@pytest.mark.parametrize(("fields", "logged", "saved"), [
    (dict(logging_strategy="no"), [4], ["checkpoint-4"]),
    (dict(logging_steps=3, logging_first_step=True), [1, 3, 4], ["checkpoint-4"]),
    (dict(logging_strategy="epoch", save_strategy="epoch", save_total_limit=None), [2, 4], ["checkpoint-2", "checkpoint-4"]),
    (dict(save_strategy="no"), [1, 2, 3, 4], []),
    (dict(save_steps=3, save_total_limit=None), [1, 2, 3, 4], ["checkpoint-3", "checkpoint-4"]),
], ids=["log-no", "log-first", "epoch", "save-no", "save-steps"])
def test_logging_and_save_strategies(tmp_path, fields, logged, saved):
    """4 updates of 8 of the 16 prompts: an epoch is 2 updates."""
    trainer = ppo(tmp_path, per_device_train_batch_size=8, total_episodes=32, **fields)
    trainer.train()
    lines = [json.loads(line)["update"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == logged
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == saved


def test_a_logged_row_averages_the_steps_since_the_last_one():
    """As HF Trainer logs its loss and TRL its metrics: means over the interval; positions,
    settings and counts so far are the last step's; counts per step add up; a number only some
    steps have (evaluation) is their mean; each row starts afresh."""
    from tether.logging import LoggedRows

    rows = LoggedRows(latest=("skipped_steps",), summed=("train/skipped_steps",))
    rows.add({"step": 1, "loss": 1.0, "learning_rate": 0.1, "grad_norm": 4.0, "skipped_steps": 1,
              "train/skipped_steps": 1, "epoch": 0.5})
    rows.add({"step": 2, "loss": 4.0, "learning_rate": 0.2, "grad_norm": 2.0, "skipped_steps": 1,
              "train/skipped_steps": 0, "epoch": 1.0, "eval/loss": 7.0, "note": "x"})
    assert rows.row() == {"step": 2, "loss": 2.5, "learning_rate": 0.2, "grad_norm": 2.0, "skipped_steps": 1,
                          "train/skipped_steps": 1, "epoch": 1.0, "eval/loss": 7.0, "note": "x"}
    rows.add({"step": 3, "loss": 6.0, "train/skipped_steps": 2})
    assert rows.row() == {"step": 3, "loss": 6.0, "train/skipped_steps": 2}


def test_ppo_logs_the_mean_of_the_updates_since_its_last_row(tmp_path):
    trainer = ppo(tmp_path, per_device_train_batch_size=8, total_episodes=32, logging_steps=3, logging_first_step=True,
                  kl_coef=0.05, adaptive_kl=True)
    history = trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["update"] for line in lines] == [1, 3, 4]
    first, middle, last = lines
    assert first["loss/policy_avg"] == history[0]["loss/policy_avg"] and last == pytest.approx(history[3])
    assert middle["loss/policy_avg"] == pytest.approx((history[1]["loss/policy_avg"] + history[2]["loss/policy_avg"]) / 2)
    assert middle["train/optimizer_steps"] == history[1]["train/optimizer_steps"] + history[2]["train/optimizer_steps"]
    assert middle["objective/kl_coef"] == history[2]["objective/kl_coef"] != history[1]["objective/kl_coef"]
    assert middle["lr"] == history[2]["lr"] and middle["episode"] == history[2]["episode"]


def test_eval_strategy_steps_evaluates_on_its_own_cadence(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    config = PPOConfig(output_dir=str(tmp_path), device="cpu", per_device_train_batch_size=4, num_ppo_epochs=1,
                       response_length=3, num_sample_generations=0, total_episodes=16, eval_strategy="steps",
                       eval_steps=3, per_device_eval_batch_size=2)
    trainer = PPOTrainer(config, tokenizer, tiny_causal_lm(tokenizer), lambda p, r: [0.0] * len(r), PROMPTS,
                         eval_dataset=PROMPTS[:3])
    sampled = []
    sample = trainer.rollout_maker.sample
    trainer.rollout_maker.sample = lambda ids, chunk=None: sampled.append(chunk) or sample(ids, chunk)
    history = trainer.train()
    assert [m["update"] for m in history if "eval/scores" in m] == [3, 4]  # every 3, and the last
    assert sampled.count(2) == 2  # evaluation samples in chunks of per_device_eval_batch_size
    with pytest.raises(ConfigError, match="eval_strategy is steps but eval_steps is unset"):
        PPOConfig(eval_strategy="steps").validate()


def test_disable_tqdm_and_checkpointing_kwargs_and_aliases(tmp_path, monkeypatch):
    import tether.trainers.ppo as ppo_module
    from tether.models import loading

    bars, options = [], []
    real_bar, real_enable = ppo_module.progress_bar, loading.enable_gradient_checkpointing
    monkeypatch.setattr(ppo_module, "progress_bar", lambda name, enabled: bars.append(enabled) or real_bar(name, enabled))
    monkeypatch.setattr(ppo_module, "enable_gradient_checkpointing",
                        lambda model, kwargs: options.append(kwargs) or real_enable(model, kwargs))
    config = load_config(PPOConfig, overrides={"activation_checkpointing": "true", "disable_tqdm": "true",
                                               "gradient_checkpointing_kwargs": "{use_reentrant: true}"})
    assert config.gradient_checkpointing is True
    ppo(tmp_path, disable_tqdm=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True}, total_episodes=4).train()
    assert bars == [False] and options == [{"use_reentrant": True}] * 2


def test_tf32_and_use_cpu_apply():
    config = PPOConfig(use_cpu=True)
    config.validate()
    assert config.device == "cpu"
    from tether.trainers.common import training_device
    from tether.trainers.parallel import Parallel

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        training_device(PPOConfig(device="cpu", tf32=not before), Parallel(None), print)
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_ddp_and_deepspeed_fields_reach_accelerate(monkeypatch, tmp_path):
    import accelerate
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from tether.trainers import parallel

    given = {}
    ds_config = {"train_micro_batch_size_per_gpu": "auto"}

    class Stub:
        num_processes, process_index, distributed_type = 2, 0, "DistributedType.DEEPSPEED"
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2, deepspeed_config=ds_config))

        def __init__(self, **kwargs):
            given.update(kwargs)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "Accelerator", Stub)
    monkeypatch.setattr(parallel, "deepspeed_plugin", lambda settings: ("plugin", settings))
    zero2 = {"zero_optimization": {"stage": 2}}
    config = PPOConfig(ddp_find_unused_parameters=True, ddp_timeout=60, ddp_backend="nccl", deepspeed=zero2,
                       per_device_train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    parallel.Parallel.create(config, accumulation_steps=4)
    ddp, group = given["kwargs_handlers"]
    assert isinstance(ddp, DistributedDataParallelKwargs) and ddp.find_unused_parameters is True
    assert isinstance(group, InitProcessGroupKwargs) and group.timeout.seconds == 60 and group.backend == "nccl"
    assert given["deepspeed_plugin"] == ("plugin", zero2)  # the settings as read
    assert ds_config == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4,
                         "train_batch_size": 3 * 4 * 2, "gradient_clipping": 0.5}  # "auto" filled from tether's

    # A number the user's DeepSpeed config sets otherwise is refused, naming the field that decides;
    # what Accelerate filled in itself is replaced.
    ds_config.clear()
    ds_config["gradient_accumulation_steps"] = 1
    parallel.Parallel.create(config, accumulation_steps=4)
    assert ds_config["gradient_accumulation_steps"] == 4
    ds_config.clear()
    config.deepspeed = {**zero2, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 2, but tether's gradient_accumulation_ste"):
        parallel.Parallel.create(config, accumulation_steps=4)

    # On a CPU, DeepSpeed runs on its CPU accelerator over gloo: Accelerate is told it is no CPU (DDP) launch.
    ds_config.clear()
    parallel.Parallel.create(PPOConfig(device="cpu", deepspeed=zero2))
    assert given["cpu"] is False and given["kwargs_handlers"][1].backend == "gloo"


def test_deepspeed_without_the_package_is_one_line():
    from tether.trainers.parallel import deepspeed_plugin

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="deepspeed needs the deepspeed package"):
            deepspeed_plugin({"zero_optimization": {"stage": 2}})


def test_dataset_config_reaches_the_hub_loader(monkeypatch):
    from tether.data import prompts

    seen = {}
    monkeypatch.setattr("datasets.load_dataset", lambda name, *args, **kwargs: seen.update(args=args, kwargs=kwargs)
                        or datasets.Dataset.from_list([{"prompt": "w1"}]))
    prompts.load_table("org/set", "train", "subset")
    assert seen["args"] == ("subset",) and seen["kwargs"]["split"] == "train"


def test_run_name_and_project_reach_the_trackers(tmp_path, monkeypatch):
    import sys
    import types

    init = {}
    import importlib.machinery

    fake = types.SimpleNamespace(__spec__=importlib.machinery.ModuleSpec("wandb", None), init=lambda **kwargs: init.update(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None,
                                 finish=lambda: None), util=types.SimpleNamespace(generate_id=lambda: "abc"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    ppo(tmp_path, report_to="wandb", run_name="first", project="mine", total_episodes=4).train()
    assert init["name"] == "first" and init["project"] == "mine"


# --- TRL's documented PPO command lines, as YAML, run to the end ------------------------------------

TLDR = """  # TRL's PPO TL;DR example (docs: ppo_trainer, "Baseline experiments")
dataset_name: trl-internal-testing/tldr-preference-sft-trl-style
dataset_test_split: validation
learning_rate: 3.0e-6
output_dir: models/minimal/ppo_tldr
per_device_train_batch_size: 1
gradient_accumulation_steps: 64
total_episodes: 30000
model_name_or_path: EleutherAI/pythia-1b-deduped
sft_model_path: cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr
reward_model_path: cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr
missing_eos_penalty: 1.0
stop_token: eos
response_length: 53
eval_strategy: steps
eval_steps: 100
"""
DESCRIPTIVENESS = """  # TRL's PPO quick-start example (docs: ppo_trainer, "Get started")
dataset_name: trl-internal-testing/descriptiveness-sentiment-trl-style
dataset_train_split: descriptiveness
learning_rate: 3.0e-6
output_dir: pythia-1b-deduped-descriptiveness-sentiment-trl-style-ppo
per_device_train_batch_size: 64
gradient_accumulation_steps: 1
total_episodes: 10000
model_name_or_path: EleutherAI/pythia-1b-deduped
sft_model_path: EleutherAI/pythia-1b-deduped
reward_model_path: EleutherAI/pythia-1b-deduped
missing_eos_penalty: 1.0
"""


@pytest.mark.parametrize("example", [TLDR, DESCRIPTIVENESS], ids=["tldr", "descriptiveness"])
def test_trls_documented_ppo_examples_run(example, tmp_path, monkeypatch):
    """Hub names become tiny local models and a local DatasetDict of the same splits; the run
    shrinks by command-line overrides (the YAML itself is TRL's, unchanged)."""
    monkeypatch.chdir(tmp_path)
    tokenizer = word_tokenizer(WORDS)
    config = yaml.safe_load(example)
    # Each hub name becomes a tiny local model of its kind. The descriptiveness example names one
    # causal LM for all three, which TRL ran with a random reward head; tether refuses a reward
    # model without a trained head, so its reward is a (tiny) trained-format reward model.
    for field, make, kind in (("model_name_or_path", tiny_causal_lm, "lm"), ("sft_model_path", tiny_causal_lm, "lm"),
                              ("reward_model_path", tiny_reward_model, "rm")):
        folder = tmp_path / f"{config[field].replace('/', '_')}-{kind}"
        if not folder.exists():
            make(tokenizer).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        config[field] = str(folder)
    rows = datasets.Dataset.from_list([{"prompt": p, "chosen": "w1", "rejected": "w2"} for p in PROMPTS])
    splits = {config.get("dataset_train_split", "train"): rows, config.get("dataset_test_split", "test"): rows.select(range(4))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    config["dataset_name"] = str(tmp_path / "data")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    code = main(["ppo", "--config", "run.yaml", "--device", "cpu", "--total_episodes", "8",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--response_length", "4",
                 "--num_ppo_epochs", "1", "--eval_steps", "1"] if "eval_steps" in config else
                ["ppo", "--config", "run.yaml", "--device", "cpu", "--total_episodes", "8",
                 "--per_device_train_batch_size", "4", "--response_length", "4", "--num_ppo_epochs", "1"])
    assert code == 0
    out = Path(config["output_dir"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [4, 8]
    if "eval_steps" in config:
        assert all("eval/scores" in line for line in lines)


def test_report_to_all_means_every_installed_tracker(monkeypatch):
    """transformers' ``report_to: all``: each tracker tether knows whose package is installed
    (here only a stand-in wandb), accepted by the config; ``none`` is none."""
    import importlib.machinery
    import sys
    import types

    from tether.logging import tracker_names

    for name in ("tensorboard", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed, whatever this machine has
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert tracker_names("all") == ["wandb"] and tracker_names(["all"]) == ["wandb"]
    assert tracker_names("none") == [] and tracker_names([]) == []
    assert PPOConfig(output_dir="unused", report_to="all").report_to == "all"


@pytest.mark.parametrize("name", ["SFTConfig", "RewardConfig"])
def test_every_trl_sft_and_reward_field_is_known(name, tmp_path):
    """A TRL SFTConfig / RewardConfig moves over too: each field is a tether field, a noted one,
    an alias, or one tether does not offer, accepted at TRL's default and refused otherwise."""
    from tether.config import UNSUPPORTED_FIELDS, RewardConfig, SFTConfig

    fields, defaults = trl_config_fields(name)
    missing = unknown_to_tether(fields, {"SFTConfig": SFTConfig, "RewardConfig": RewardConfig}[name])
    assert len(fields) > 120 and not missing, missing
    for field in set(fields) & set(UNSUPPORTED_FIELDS):
        assert defaults[field] == UNSUPPORTED_FIELDS[field][0], field
    if name == "SFTConfig":  # TRL's defaults, written out, load; another value is refused with the reason
        config = load_config(SFTConfig, overrides={"completion_only_loss": "null", "loss_type": "nll", "packing": "false",
                                                   "dataset_text_field": "text", "assistant_only_loss": "false"})
        assert config.completion_only_loss is True and config.loss_type == "nll"
        with pytest.raises(ConfigError, match="packing=True is not supported: tether does not join rows"):
            load_config(SFTConfig, overrides={"packing": "true"})
        with pytest.raises(ConfigError, match="loss_type"):
            load_config(SFTConfig, overrides={"loss_type": "dft"})
    else:
        with pytest.raises(ConfigError, match="center_rewards_coefficient=0.01 is not supported"):
            load_config(RewardConfig, overrides={"center_rewards_coefficient": "0.01"})


def test_a_trl_reward_config_left_at_its_learning_rate_trains_at_trls():
    """TRL 1.12's RewardConfig defaults learning_rate to 1e-4 (the other trainers' defaults are
    TRL's too): a TRL YAML that leaves it out trains at the same rate."""
    from tether.config import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

    expected = {RewardConfig: 1e-4, SFTConfig: 2e-5, DPOConfig: 1e-6, GRPOConfig: 1e-6, RLOOConfig: 1e-6}
    assert {cls: cls().learning_rate for cls in expected} == expected


# Where a tether default differs from TRL 1.12's on purpose (the README says each): a TRL YAML that
# leaves one of these out runs with tether's. Every other shared field defaults as in TRL.
CHOSEN_DEFAULTS = {
    "output_dir": "runs/<command> (TRL: trainer_output)",
    "bf16": "off (TRL: on unless fp16); bf16 is slower than fp32 on CPUs without AVX512-BF16",
    "gradient_checkpointing": "off (TRL: on); it trades a third more compute for memory",
    "logging_steps": "1 (TRL: 10); a row every step, the mean over the interval when set higher",
    "project": "tracker default (TRL: huggingface)",
    "disable_tqdm": "False (TRL: None, which transformers reads as False at the default log level)",
    "remove_unused_columns": "False: reward and metric functions get every column",
    "eval_strategy": "each trainer's own schedule when held-out data exists (TRL: no)",
    "truncation_mode": "keep_end keeps the completion (TRL: keep_start)",
    "completion_only_loss": "True, which TRL's None means",
    "loss_type": "'sigmoid', which TRL's ['sigmoid'] means",
    "max_grad_norm": "PPO: none, as TRL's PPO loop never clipped",
    "sft_model_path": "none (TRL: EleutherAI/pythia-160m from the hub): the user names the model",
    "reward_model_path": "none (TRL: EleutherAI/pythia-160m from the hub): the user names the model",
}


@pytest.mark.parametrize("name", ["SFTConfig", "RewardConfig", "DPOConfig", "GRPOConfig", "RLOOConfig", "PPOConfig"])
def test_every_shared_field_defaults_as_in_trl_unless_chosen(name):
    import tether.config

    ours, theirs = getattr(tether.config, name)(), trl_defaults(name)
    differ = {f.name for f in dataclasses.fields(ours)
              if f.name in theirs and _plain(getattr(ours, f.name)) != theirs[f.name]}
    assert differ <= set(CHOSEN_DEFAULTS), sorted(differ - set(CHOSEN_DEFAULTS))
    assert {"save_steps", "save_total_limit", "learning_rate", "lr_scheduler_type"} <= set(theirs) - differ


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
