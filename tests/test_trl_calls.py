"""A TRL script's trainer call runs as written (``tether/trainers/trl_calls.py``): TRL's argument
names (``args``, ``processing_class``, ``model``, ``ref_model``, ``reward_model``), a model given
as a path, no tokenizer, no config, and a ``peft.LoraConfig`` as ``peft_config``, each training
exactly what the tether call would; TRL's Trainer hooks refused in one line."""

from __future__ import annotations

import pytest
import torch

from tether import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.errors import ConfigError, DataError
from tether.models.loading import load_causal_lm
from tether.tiny import tiny_causal_lm, tiny_reward_model
from tether.trainers.trl_calls import lora_fields

from .conftest import TINY

SFT_ROWS = [{"prompt": "w1 w2", "completion": " w3 w4"}, {"prompt": "w5", "completion": " w6 w7"}] * 2
PAIRS = [{"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"}, {"prompt": "w5", "chosen": " w6", "rejected": " w7"}] * 2
PROMPTS = [{"prompt": "w1 w2"}, {"prompt": "w3"}, {"prompt": "w4 w5 w6"}, {"prompt": "w7"}]


def word_count(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def saved(model, tokenizer, folder) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(first, second) -> None:
    first, second = weights(first), weights(second)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def sft_config(tmp_path, name: str, **values) -> SFTConfig:
    return SFTConfig(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     seed=0, **values)


def grpo_config(tmp_path, name: str, config_class=GRPOConfig, **values):
    return config_class(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=4, learning_rate=1e-2, seed=0, **values)


def test_sft_with_trl_names_and_a_model_path_trains_as_the_tether_call(tmp_path, tokenizer):
    path = saved(tiny_causal_lm(tokenizer, seed=0, **TINY), tokenizer, tmp_path / "policy")
    ours = SFTTrainer(sft_config(tmp_path, "ours"), tokenizer, load_causal_lm(path), SFT_ROWS)
    ours.train()
    config = sft_config(tmp_path, "theirs")
    theirs = SFTTrainer(model=path, args=config, train_dataset=SFT_ROWS)  # no processing_class: the path's
    theirs.train()
    assert theirs.config.model_name_or_path == path
    assert config.model_name_or_path is None  # the user's config object is left as it is
    assert theirs.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert not torch.equal(weights(theirs.model)["lm_head.weight"], weights(load_causal_lm(path))["lm_head.weight"])
    assert_same_weights(ours.model, theirs.model)


def test_ppo_with_trl_names_gives_each_model_its_role(tmp_path, tokenizer):
    """Reference, reward and value models all differ, so a swapped role changes the update."""

    def models():
        return dict(
            model=tiny_causal_lm(tokenizer, seed=0, **TINY), ref_model=tiny_causal_lm(tokenizer, seed=5, **TINY),
            reward_model=tiny_reward_model(tokenizer, seed=1, **TINY), value_model=tiny_reward_model(tokenizer, seed=2, **TINY),
        )

    def config(name):
        return PPOConfig(output_dir=str(tmp_path / name), total_episodes=8, per_device_train_batch_size=4,
                         response_length=4, learning_rate=1e-2, num_sample_generations=0, seed=0)

    m = models()
    ours = PPOTrainer(config("ours"), tokenizer, m["model"], m["reward_model"], PROMPTS, ref_policy=m["ref_model"],
                      value_model=m["value_model"])
    ours.train()
    theirs = PPOTrainer(args=config("theirs"), processing_class=tokenizer, train_dataset=PROMPTS, **models())
    theirs.train()
    assert_same_weights(ours.policy, theirs.policy)
    assert_same_weights(ours.value_model, theirs.value_model)
    assert not torch.equal(weights(theirs.policy)["lm_head.weight"],
                           weights(tiny_causal_lm(tokenizer, seed=0, **TINY))["lm_head.weight"])


def test_a_lora_config_argument_is_the_config_fields_adapter(tmp_path, tokenizer):
    """GRPO as TRL's docs call it (model as a path, reward_funcs, args, peft_config) trains the
    adapter that the config's own peft_config field gives."""
    import peft

    path = saved(tiny_causal_lm(tokenizer, seed=0, **TINY), tokenizer, tmp_path / "policy")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules={"v_proj", "q_proj"})
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}  # dropout 0.0 is PEFT's default
    theirs = GRPOTrainer(model=path, reward_funcs=word_count, args=grpo_config(tmp_path, "theirs"),
                         train_dataset=PROMPTS, peft_config=lora)
    theirs.train()
    ours = GRPOTrainer(grpo_config(tmp_path, "ours", peft_config=fields), tokenizer, load_causal_lm(path), word_count,
                       PROMPTS)
    ours.train()
    assert theirs.config.peft_config == fields
    adapter = {name: value for name, value in weights(theirs.policy).items() if "lora_B" in name}
    assert adapter and any(value.any() for value in adapter.values())  # the adapter trained
    assert_same_weights(ours.policy, theirs.policy)


def test_no_config_is_the_trainers_defaults_and_a_loaded_model_brings_its_tokenizer(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = saved(tiny_causal_lm(tokenizer, seed=0, **TINY), tokenizer, tmp_path / "policy")
    trainer = RLOOTrainer(model=load_causal_lm(path), reward_funcs=word_count, train_dataset=PROMPTS)
    assert type(trainer.config) is RLOOConfig and trainer.config.output_dir == RLOOConfig().output_dir
    assert trainer.tokenizer.get_vocab() == tokenizer.get_vocab()  # from the model's _name_or_path

    def reward_trainer(name, seed):
        config = RewardConfig(output_dir=str(tmp_path / name), seed=seed, per_device_train_batch_size=2)
        return RewardTrainer(model=path, args=config, train_dataset=PAIRS)

    reward, again, other = reward_trainer("a", 3), reward_trainer("b", 3), reward_trainer("c", 4)
    assert type(reward.model).__name__.endswith("ForSequenceClassification")
    assert_same_weights(reward.model, again.model)  # the new head is drawn under config.seed
    assert not torch.equal(weights(reward.model)["score.weight"], weights(other.model)["score.weight"])


def test_a_model_with_no_path_and_no_tokenizer_is_refused(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="pass processing_class="):
        DPOTrainer(model=tiny_causal_lm(tokenizer, seed=0, **TINY), args=DPOConfig(output_dir=str(tmp_path)),
                   train_dataset=PAIRS)


@pytest.mark.parametrize("name", ["data_collator", "callbacks", "optimizers", "compute_metrics", "formatting_func",
                                  "quantization_config"])
def test_trl_hooks_with_a_value_are_refused_and_unset_ones_pass(tmp_path, tokenizer, name):
    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    config = sft_config(tmp_path, "out")
    with pytest.raises(ConfigError, match=f"SFTTrainer: {name} is a TRL argument tether does not take; "):
        SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=SFT_ROWS, **{name: object()})
    unset = (None, None) if name == "optimizers" else None
    SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=SFT_ROWS, **{name: unset})


def test_two_names_for_one_argument_and_two_lora_settings_are_refused(tmp_path, tokenizer):
    import peft

    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    with pytest.raises(ConfigError, match="processing_class and tokenizer name the same argument"):
        SFTTrainer(model=model, args=sft_config(tmp_path, "a"), processing_class=tokenizer, tokenizer=tokenizer,
                   train_dataset=SFT_ROWS)
    with pytest.raises(ConfigError, match="peft_config argument and the config's use_peft both ask for LoRA"):
        SFTTrainer(model=model, args=sft_config(tmp_path, "b", use_peft=True), processing_class=tokenizer,
                   train_dataset=SFT_ROWS, peft_config=peft.LoraConfig(r=4))
    with pytest.raises(ConfigError, match="peft_config must be a peft.LoraConfig"):
        SFTTrainer(model=model, args=sft_config(tmp_path, "c"), processing_class=tokenizer, train_dataset=SFT_ROWS,
                   peft_config=peft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))


def test_lora_fields_are_never_empty_and_plain():
    """An all-default LoraConfig is still an adapter (r 8), not "no LoRA"; a dict, with a set or
    with PEFT's own bookkeeping (``to_dict()``), gives what the object gives."""
    import peft

    assert lora_fields(peft.LoraConfig()) == {"r": 8, "lora_alpha": 8}
    assert lora_fields(peft.LoraConfig(task_type="SEQ_CLS", lora_dropout=0.0)) == {"r": 8, "lora_alpha": 8}
    assert lora_fields({}) == {"r": 8, "lora_alpha": 8}
    lora = peft.LoraConfig(r=4, target_modules={"v_proj", "q_proj"}, modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    expected = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    assert lora_fields(lora) == expected
    assert lora_fields(lora.to_dict()) == expected
    assert lora_fields({"r": 4, "target_modules": {"v_proj", "q_proj"}, "modules_to_save": ["lm_head"]}) == expected
    with pytest.raises(ConfigError, match="peft_config: "):
        lora_fields({"rank": 4})


def test_trl_attribute_names_and_a_reference_given_as_a_path(tmp_path, tokenizer):
    path = saved(tiny_causal_lm(tokenizer, seed=0, **TINY), tokenizer, tmp_path / "policy")
    reference = saved(tiny_causal_lm(tokenizer, seed=4, **TINY), tokenizer, tmp_path / "reference")
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2)
    dpo = DPOTrainer(model=path, ref_model=reference, args=config, train_dataset=PAIRS, callbacks=[])  # [] is "none"
    assert_same_weights(dpo.ref_model, load_causal_lm(reference))
    assert dpo.args is dpo.config and dpo.processing_class is dpo.tokenizer
    grpo = GRPOTrainer(model=path, reward_funcs=word_count, args=grpo_config(tmp_path, "grpo"), train_dataset=PROMPTS)
    assert grpo.model is grpo.policy and grpo.args is grpo.config


def test_ppo_value_model_as_a_path_and_one_folder_written_two_ways(tmp_path, tokenizer, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(tmp_path)
    path = saved(tiny_causal_lm(tokenizer, seed=0, **TINY), tokenizer, tmp_path / "policy")
    scorer = saved(tiny_reward_model(tokenizer, seed=2, **TINY), tokenizer, tmp_path / "scorer")
    config = PPOConfig(output_dir=str(tmp_path / "ppo"), total_episodes=8, per_device_train_batch_size=4,
                       response_length=4, model_name_or_path=path)
    ppo = PPOTrainer(model="./policy", args=config, reward_model=scorer, value_model=scorer, train_dataset=PROMPTS)
    assert_same_weights(ppo.value_model, AutoModelForSequenceClassification.from_pretrained(scorer))
    assert ppo.config.model_name_or_path == path  # "./policy" is the same folder


def refusals(tmp_path, tokenizer) -> dict:
    """Each TRL-style call that must stop at once, and the start of its one-line message."""
    import datasets
    import peft

    model = tiny_causal_lm(tokenizer, seed=0, **TINY)
    path = saved(model, tokenizer, tmp_path / "policy")
    no_tokenizer = tmp_path / "bare"
    model.save_pretrained(no_tokenizer)
    grpo = grpo_config(tmp_path, "grpo")
    rows = datasets.Dataset.from_list(PROMPTS)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(load_causal_lm(path), peft.LoraConfig(r=2)).save_pretrained(adapter)
    frozen = tiny_causal_lm(tokenizer, seed=0, **TINY).requires_grad_(False)
    trl_config = type("GRPOConfig", (), {"__module__": "trl.trainer.grpo_config"})()  # as TRL's class says it
    scorer = tiny_reward_model(tokenizer, seed=1, **TINY)
    return {
        "TRL's config class": (
            lambda: GRPOTrainer(model=path, reward_funcs=word_count, args=trl_config, train_dataset=PROMPTS),
            r"GRPOTrainer: args is TRL's GRPOConfig; pass tether's, which takes the same field names \(from tether "
            r"import GRPOConfig\)$"),
        "TRL's positional order for PPO": (
            lambda: PPOTrainer(PPOConfig(), tokenizer, model, tiny_causal_lm(tokenizer, seed=3, **TINY), scorer, PROMPTS),
            "PPOTrainer: train_dataset is a LlamaForSequenceClassification, not rows; TRL's positional order differs"),
        "a streaming dataset": (
            lambda: SFTTrainer(model=path, args=sft_config(tmp_path, "s"),
                               train_dataset=datasets.Dataset.from_list(SFT_ROWS).to_iterable_dataset()),
            "SFTTrainer: train_dataset is a streaming IterableDataset; SFTTrainer encodes every row"),
        "a DatasetDict": (
            lambda: DPOTrainer(model=path, args=DPOConfig(), train_dataset=datasets.DatasetDict(train=rows, test=rows)),
            r"DPOTrainer: train_dataset is a DatasetDict with splits train, test; pass one split, e.g. "
            r"dataset\['train'\]$"),
        "an adapter folder": (
            lambda: SFTTrainer(model=str(adapter), args=sft_config(tmp_path, "s"), processing_class=tokenizer,
                               train_dataset=SFT_ROWS),
            "SFTTrainer: model carries a PEFT adapter that transformers loaded \\(frozen\\); to train it pass "
            "peft.PeftModel.from_pretrained"),
        "a frozen model": (
            lambda: SFTTrainer(model=frozen, args=sft_config(tmp_path, "s"), processing_class=tokenizer,
                               train_dataset=SFT_ROWS),
            "SFTTrainer: model has no trainable parameters; unfreeze them, pass peft_config"),
        "no model": (
            lambda: SFTTrainer(args=sft_config(tmp_path, "s"), train_dataset=SFT_ROWS),
            r"SFTTrainer: missing model, processing_class \(tether: tokenizer\)$"),
        "a missing reference folder": (
            lambda: DPOTrainer(model=path, ref_model=str(tmp_path / "nope"), args=DPOConfig(), train_dataset=PAIRS),
            "DPOTrainer: ref_model: cannot load model from .*nope': no such folder$"),
        "a config of another trainer": (
            lambda: GRPOTrainer(model=path, reward_funcs=word_count, args=SFTConfig(), train_dataset=PROMPTS),
            "GRPOTrainer: args must be a tether GRPOConfig, not SFTConfig"),
        "RLOO given GRPO's config": (
            lambda: RLOOTrainer(model=path, reward_funcs=word_count, args=grpo, train_dataset=PROMPTS),
            "RLOOTrainer: args must be a tether RLOOConfig, not GRPOConfig"),
        "a dict as the config": (
            lambda: SFTTrainer(model=path, args={"output_dir": "x"}, train_dataset=SFT_ROWS),
            r"SFTTrainer: args must be a tether SFTConfig, not dict \(from a dict: SFTConfig\(\*\*values\)\)"),
        "TRL's positional order": (
            lambda: GRPOTrainer(path, word_count, grpo, PROMPTS),
            "GRPOTrainer: the first positional argument is the config \\(GRPOConfig\\), not str; TRL's order differs"),
        "a PeftModel and peft_config": (
            lambda: SFTTrainer(model=peft.get_peft_model(tiny_causal_lm(tokenizer, seed=0, **TINY), peft.LoraConfig(r=2)),
                               args=sft_config(tmp_path, "s"), processing_class=tokenizer, train_dataset=SFT_ROWS,
                               peft_config=peft.LoraConfig(r=8)),
            "SFTTrainer: model already is a PeftModel"),
        "no reward_funcs": (
            lambda: GRPOTrainer(model=path, args=grpo, train_dataset=PROMPTS), "GRPOTrainer: missing reward_funcs$"),
        "no reward_model": (
            lambda: PPOTrainer(model=model, args=PPOConfig(), processing_class=tokenizer, train_dataset=PROMPTS),
            r"PPOTrainer: missing reward_model \(tether: reward\)$"),
        "an unknown argument": (
            lambda: SFTTrainer(model=path, args=sft_config(tmp_path, "s"), train_dataset=SFT_ROWS, model_init=None),
            "SFTTrainer: got an unexpected keyword argument 'model_init'"),
        "several evaluation sets": (
            lambda: GRPOTrainer(model=path, reward_funcs=word_count, args=grpo, train_dataset=rows,
                                eval_dataset={"a": rows, "b": rows}),
            "GRPOTrainer: eval_dataset is a dict of 2 datasets; tether evaluates one"),
        "two model paths": (
            lambda: SFTTrainer(model=path, args=sft_config(tmp_path, "s", model_name_or_path="other"),
                               train_dataset=SFT_ROWS),
            "SFTTrainer: model=.* and the config's model_name_or_path 'other' name different models"),
        "a missing local folder": (
            lambda: SFTTrainer(model=str(tmp_path / "nope"), args=sft_config(tmp_path, "s"), train_dataset=SFT_ROWS),
            "SFTTrainer: model: cannot load model from .*nope': no such folder"),
        "a folder without a tokenizer": (
            lambda: SFTTrainer(model=str(no_tokenizer), args=sft_config(tmp_path, "s"), train_dataset=SFT_ROWS),
            "SFTTrainer: no processing_class given, and cannot load tokenizer from .*; pass processing_class=$"),
    }


REFUSALS = ["a config of another trainer", "RLOO given GRPO's config", "a dict as the config", "TRL's positional order",
            "a PeftModel and peft_config", "no reward_funcs", "no reward_model", "an unknown argument",
            "several evaluation sets", "two model paths", "a missing local folder", "a folder without a tokenizer",
            "TRL's config class", "TRL's positional order for PPO", "a streaming dataset", "a DatasetDict",
            "an adapter folder", "a frozen model", "no model", "a missing reference folder"]


@pytest.mark.parametrize("case", REFUSALS)
def test_a_wrong_trl_call_stops_in_one_line(tmp_path, tokenizer, case):
    call, message = refusals(tmp_path, tokenizer)[case]
    with pytest.raises((ConfigError, DataError), match=message) as raised:
        call()
    assert "\n" not in str(raised.value)
