"""Scoring: ``get_reward`` reads a scalar-head model at the terminating token, reward functions
are imported and their answers checked, and the missing-stop penalty.

Pinned conventions (``/work/shared/spec/ppo-details.md`` details 14, 16, 17, 36, pitfall P1
and P14): the score is the head output at the last real token of the response, found from
the attention mask when one is given (so pad == EOS works) and only in the response region;
tokens after the stop and the amount of left padding cannot move it; ``reward_bias`` from
reward normalisation is subtracted. Reward-function problems are ``RewardError`` /
``ConfigError`` with one-line messages that say where the problem is.
"""

from __future__ import annotations

import copy
import math
import re
import sys

import numpy as np
import pytest
import torch

import tether
from tether.errors import ConfigError, RewardError
from tether.models.forward import reward_bias
from tether.ops import masks
from tether.scoring.functions import call_reward_function, import_reward_function, is_function_spec
from tether.scoring.reward import apply_missing_stop_penalty, get_reward
from tether.tiny import numbered_words, tiny_reward_model, word_tokenizer

PAD, EOS = 0, 2
TINY = dict(hidden_size=32, num_layers=2, num_heads=2)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


def batch(queries: list[list[int]], responses: list[list[int]], q_width: int | None = None, pad: int = PAD):
    """Left-padded queries + right-padded responses: ``(query_responses, attention_mask, Q)``."""
    q_width = q_width or max(len(q) for q in queries)
    r_width = max(len(r) for r in responses)
    ids = torch.full((len(queries), q_width + r_width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (q, r) in enumerate(zip(queries, responses)):
        ids[i, q_width - len(q) : q_width] = torch.tensor(q)
        mask[i, q_width - len(q) : q_width] = True
        ids[i, q_width : q_width + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, q_width : q_width + len(r)] = True
    return ids, mask, q_width


QUERIES = [[4, 5, 6], [7, 8, 9, 10, 11], [12]]
RESPONSES = [[13, 14, EOS], [15, 16, 17, 18, 19, EOS], [21, EOS]]


def scores_of(model, ids, mask, q_width, pad=PAD):
    with torch.no_grad():
        return get_reward(model, ids, pad, q_width, mask)


# ---------------------------------------------------------------- get_reward


@pytest.mark.parametrize("with_mask", [True, False])
def test_get_reward_shapes_and_read_position(reward_model, with_mask):
    ids, mask, q_width = batch(QUERIES, RESPONSES)
    with torch.no_grad():
        per_token, score, lengths = get_reward(reward_model, ids, PAD, q_width, mask if with_mask else None)
    rows, width = ids.shape
    assert per_token.shape == (rows, width, 1)
    assert score.shape == (rows,) and lengths.shape == (rows,)
    # absolute index of the last real token (the stop token here)
    expected = torch.tensor([q_width + len(r) - 1 for r in RESPONSES])
    assert torch.equal(lengths, expected)
    assert (ids[torch.arange(rows), lengths] == EOS).all()
    assert torch.equal(score, per_token[torch.arange(rows), lengths, 0])


def test_get_reward_per_token_is_the_head_on_the_backbone(reward_model):
    """Per-token outputs are ``score(backbone(ids))`` with positions that skip left padding,
    not the library's own sequence pooling (P14)."""
    ids, mask, q_width = batch(QUERIES, RESPONSES)
    per_token, _, _ = scores_of(reward_model, ids, mask, q_width)
    for b, (q, r) in enumerate(zip(QUERIES, RESPONSES)):
        alone = torch.tensor([q + r])
        with torch.no_grad():
            hidden = reward_model.model(input_ids=alone).last_hidden_state
            expected = reward_model.score(hidden)[0, :, 0]
        real = per_token[b, mask[b], 0]
        assert torch.allclose(real, expected, atol=1e-5, rtol=0)


def test_score_ignores_the_masked_tail(reward_model):
    ids, mask, q_width = batch(QUERIES, RESPONSES)
    _, base, base_lengths = scores_of(reward_model, ids, mask, q_width)
    garbage = torch.where(mask, ids, torch.randint(3, 24, ids.shape, generator=torch.Generator().manual_seed(0)))
    _, score, lengths = scores_of(reward_model, garbage, mask, q_width)
    assert torch.equal(lengths, base_lengths)
    assert torch.allclose(score, base, atol=1e-6, rtol=0)


def test_score_ignores_tokens_after_the_stop_once_truncated(reward_model):
    """Two raw responses differing only after the first stop score the same once
    ``truncate_response`` has padded the tail (no attention mask: the pad-id path)."""
    queries = torch.tensor([[PAD, PAD, 4, 5, 6], [7, 8, 9, 10, 11]])
    q_width = queries.size(1)
    raw_a = torch.tensor([[13, 14, EOS, 5, 6, 7], [15, 16, 17, 18, 19, 20]])
    raw_b = torch.tensor([[13, 14, EOS, EOS, 9, 9], [15, 16, 17, 18, 19, 20]])
    scores = []
    for raw in (raw_a, raw_b):
        post = tether.truncate_response(EOS, PAD, raw)
        with torch.no_grad():
            scores.append(get_reward(reward_model, torch.cat([queries, post], dim=1), PAD, q_width))
    assert torch.equal(scores[0][2], scores[1][2])
    assert torch.equal(scores[0][2], torch.tensor([q_width + 2, q_width + 5]))
    assert torch.allclose(scores[0][1], scores[1][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_score_does_not_depend_on_left_padding(tokenizer, arch):
    model = tiny_reward_model(tokenizer, seed=1, arch=arch, **TINY).eval()
    ids, mask, q_width = batch(QUERIES, RESPONSES)
    more_ids, more_mask, more_q = batch(QUERIES, RESPONSES, q_width=q_width + 5)
    _, base, lengths = scores_of(model, ids, mask, q_width)
    _, score, more_lengths = scores_of(model, more_ids, more_mask, more_q)
    assert torch.equal(more_lengths, lengths + 5)
    assert torch.allclose(score, base, atol=1e-5, rtol=0)
    # and each row scores as it does alone, unpadded
    for b, (q, r) in enumerate(zip(QUERIES, RESPONSES)):
        alone, alone_mask, alone_q = batch([q], [r])
        _, single, _ = scores_of(model, alone, alone_mask, alone_q)
        assert single[0] == pytest.approx(float(base[b]), abs=1e-5)


def test_changing_the_terminating_token_changes_the_score(reward_model):
    ids, mask, q_width = batch(QUERIES, RESPONSES)
    _, base, lengths = scores_of(reward_model, ids, mask, q_width)
    changed = ids.clone()
    changed[torch.arange(ids.size(0)), lengths] = 7
    _, score, changed_lengths = scores_of(reward_model, changed, mask, q_width)
    assert torch.equal(changed_lengths, lengths)
    assert ((score - base).abs() > 1e-4).all()


def test_pad_equal_to_eos_needs_the_attention_mask():
    """P1: with pad == EOS, inferring the mask from ids drops the EOS and reads the score one
    token early; the explicit mask (what tether passes) reads it at the EOS. A prompt that
    contains the EOS/pad id as a real token is fine too."""
    tokenizer = word_tokenizer(numbered_words(20), pad_token="<eos>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == EOS
    model = tiny_reward_model(tokenizer, seed=1, **TINY).eval()
    queries = [[4, EOS, 6], [7, 8, 9, 10, 11], [12]]
    ids, mask, q_width = batch(queries, RESPONSES, pad=EOS)
    rows = torch.arange(ids.size(0))
    eos_index = torch.tensor([q_width + len(r) - 1 for r in RESPONSES])
    with torch.no_grad():
        per_token, inferred, inferred_lengths = get_reward(model, ids, EOS, q_width)
        masked_per_token, explicit, explicit_lengths = get_reward(model, ids, EOS, q_width, mask)

    assert torch.equal(inferred_lengths, eos_index - 1)  # one token early
    assert torch.equal(explicit_lengths, eos_index)  # at the EOS
    assert torch.equal(explicit, masked_per_token[rows, eos_index, 0])
    assert ((explicit - inferred).abs() > 1e-4).all()
    # the explicit-mask score equals the score under a tokenizer with a distinct pad token
    distinct = tiny_reward_model(word_tokenizer(numbered_words(20)), seed=1, **TINY).eval()
    distinct.load_state_dict(model.state_dict())
    ids_distinct = torch.where(mask, ids, torch.full_like(ids, PAD))
    _, reference, _ = scores_of(distinct, ids_distinct, None, q_width)
    assert torch.allclose(explicit, reference, atol=1e-5, rtol=0)


def test_response_without_padding_is_read_at_the_last_position(reward_model):
    ids, mask, q_width = batch([[4, 5], [6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]])
    assert mask.all()
    for attention_mask in (mask, None):
        with torch.no_grad():
            per_token, score, lengths = get_reward(reward_model, ids, PAD, q_width, attention_mask)
        assert torch.equal(lengths, torch.full((2,), ids.size(1) - 1))
        assert torch.equal(score, per_token[:, -1, 0])


def test_empty_response_is_read_at_the_last_query_token(reward_model):
    """A response with no kept token (first token is pad): sequence length ``Q - 1`` (detail 14)."""
    ids, mask, q_width = batch([[4, 5, 6], [7]], [[8, EOS], [9]])
    mask[1, q_width:] = False
    ids[1, q_width:] = PAD
    per_token, score, lengths = scores_of(reward_model, ids, mask, q_width)
    assert lengths.tolist() == [q_width + 1, q_width - 1]
    assert torch.isfinite(score).all()
    assert score[1] == per_token[1, q_width - 1, 0]


def test_reward_bias_is_subtracted(reward_model):
    ids, mask, q_width = batch(QUERIES, RESPONSES)
    normalised = copy.deepcopy(reward_model)
    normalised.config.reward_bias = 0.7
    plain_tokens, plain, _ = scores_of(reward_model, ids, mask, q_width)
    biased_tokens, biased, _ = scores_of(normalised, ids, mask, q_width)
    assert torch.allclose(biased, plain - 0.7, atol=1e-6, rtol=0)
    assert torch.allclose(biased_tokens, plain_tokens - 0.7, atol=1e-6, rtol=0)
    assert reward_bias(reward_model) == 0.0
    normalised.config.reward_bias = None
    assert reward_bias(normalised) == 0.0


# ---------------------------------------------------------------- reward functions


PROMPTS = ["p0", "p1", "p2"]
ANSWERS = ["a", "b", "c"]


def returning(value):
    def reward_fn(prompts, responses):
        return value

    return reward_fn


@pytest.mark.parametrize(
    "value",
    [
        [1, 0.5, -2.0],
        (1.0, 0.5, -2.0),
        torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64),
        torch.tensor([[1.0], [0.5], [-2.0]]),
        np.array([1.0, 0.5, -2.0]),
        [np.float64(1.0), np.float32(0.5), -2],
    ],
    ids=["list", "tuple", "tensor64", "tensor-column", "numpy", "numpy-scalars"],
)
def test_valid_reward_function_answers(value):
    scores = call_reward_function(returning(value), PROMPTS, ANSWERS)
    assert scores.dtype == torch.float32
    assert scores.shape == (3,)
    assert torch.equal(scores, torch.tensor([1.0, 0.5, -2.0]))


def test_reward_function_receives_prompts_and_responses():
    seen = {}

    def reward_fn(prompts, responses):
        seen["args"] = (list(prompts), list(responses))
        return [0.0] * len(prompts)

    call_reward_function(reward_fn, PROMPTS, ANSWERS)
    assert seen["args"] == (PROMPTS, ANSWERS)


@pytest.mark.parametrize(
    "value,index",
    [
        ([1.0, float("nan"), 0.0], 1),
        ([1.0, 0.0, float("inf")], 2),
        ([-math.inf, 0.0, 0.0], 0),
        ([1.0, "high", 0.0], 1),
        ([True, 0.0, 0.0], 0),
        ([1.0, [0.5], 0.0], 1),
        (torch.tensor([0.0, float("nan"), 0.0]), 1),
    ],
    ids=["nan", "inf", "-inf", "string", "bool", "nested", "tensor-nan"],
)
def test_bad_item_names_the_completion_index(value, index):
    with pytest.raises(RewardError) as excinfo:
        call_reward_function(returning(value), PROMPTS, ANSWERS)
    message = one_line(excinfo)
    assert f"completion {index}" in message
    assert "reward_fn" in message


@pytest.mark.parametrize(
    "value",
    [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [], None, 3.0, True, "abcd", object()],
    ids=["short", "long", "empty", "none", "scalar", "bool", "string", "object"],
)
def test_bad_answer_shape_is_a_reward_error(value):
    with pytest.raises(RewardError) as excinfo:
        call_reward_function(returning(value), PROMPTS, ANSWERS)
    message = one_line(excinfo)
    assert "reward_fn" in message


def test_wrong_length_says_how_many():
    with pytest.raises(RewardError) as excinfo:
        call_reward_function(returning([1.0, 2.0]), PROMPTS, ANSWERS)
    message = one_line(excinfo)
    assert "2" in message and "3" in message


def test_raising_reward_function_is_named():
    def grumpy_reward(prompts, responses):
        raise ValueError("cannot score these")

    with pytest.raises(RewardError) as excinfo:
        call_reward_function(grumpy_reward, PROMPTS, ANSWERS)
    message = one_line(excinfo)
    assert "grumpy_reward" in message
    assert "ValueError" in message and "cannot score these" in message
    assert isinstance(excinfo.value.__cause__, ValueError)


def test_raising_reward_function_with_multiline_message_is_one_line():
    def grumpy_reward(prompts, responses):
        raise RuntimeError("first line\nsecond line")

    with pytest.raises(RewardError) as excinfo:
        call_reward_function(grumpy_reward, PROMPTS, ANSWERS)
    message = one_line(excinfo)
    assert "grumpy_reward" in message and "first line" in message


# ---------------------------------------------------------------- function specs


def test_is_function_spec(tmp_path):
    assert is_function_spec("tether.demo.task:gold_reward")
    assert is_function_spec("path/to/file.py:fn")
    assert not is_function_spec("gpt2")
    assert not is_function_spec("org/reward-model")
    assert not is_function_spec("module:")
    assert not is_function_spec("module:1fn")
    folder = tmp_path / "reward:v2"
    folder.mkdir()
    assert is_function_spec(f"{tmp_path}/other:v2")  # same shape, but no such folder
    assert not is_function_spec(str(folder))


def test_import_reward_function_from_module():
    from tether.demo.task import gold_reward

    function = import_reward_function("tether.demo.task:gold_reward")
    assert function is gold_reward
    scores = call_reward_function(function, ["the plot", "the plot"], ["was good but the cast felt dull .", "good"])
    assert torch.equal(scores, torch.tensor([0.0, -1.0]))  # mean valence; -1 for a broken review


def test_import_reward_function_from_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length_reward(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    function = import_reward_function(f"{path}:length_reward")
    assert call_reward_function(function, ["x", "y"], ["ab", "abc"]).tolist() == [2.0, 3.0]


def test_a_module_in_the_working_folder_is_found_as_python_m_finds_it(tmp_path, monkeypatch):
    """The ``tether`` console script does not put the working folder on the import path; the
    spec ``mymod:score`` still finds ``mymod.py`` there, as ``python -m tether`` would."""
    (tmp_path / "tether_readme_mymod.py").write_text("def score(prompts, responses):\n    return [1.5] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    function = import_reward_function("tether_readme_mymod:score")
    assert call_reward_function(function, ["x"], ["y"]).tolist() == [1.5]


def test_a_file_with_postponed_annotations_and_a_dataclass_imports(tmp_path):
    """A dataclass looks its module up in ``sys.modules`` to resolve string annotations."""
    path = tmp_path / "judge.py"
    path.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
        "@dataclass\nclass Rule:\n    bonus: float = 2.0\n\n"
        "def score(prompts: list[str], responses: list[str]) -> list[float]:\n"
        "    return [Rule().bonus for _ in responses]\n"
    )
    function = import_reward_function(f"{path}:score")
    assert call_reward_function(function, ["x", "y"], ["a", "b"]).tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("tether_no_such_module_xyz:fn", "tether_no_such_module_xyz"),
        ("tether.demo.task:no_such_function", "no_such_function"),
        ("tether.demo.task:VALENCE", "VALENCE"),  # exists, but not callable
        ("{tmp}/missing.py:fn", "missing.py"),
        ("{tmp}/broken.py:fn", "broken"),
        ("{tmp}/raises.py:fn", "raises"),
        ("not a spec", "not a spec"),
    ],
    ids=["missing-module", "missing-function", "not-callable", "missing-file", "syntax-error", "import-raises", "bad"],
)
def test_import_reward_function_errors(tmp_path, spec, fragment):
    (tmp_path / "broken.py").write_text("def fn(:\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError) as excinfo:
        import_reward_function(spec.format(tmp=tmp_path))
    assert fragment in one_line(excinfo)


def test_import_error_with_multiline_message_is_one_line(tmp_path):
    path = tmp_path / "noisy.py"
    path.write_text("raise RuntimeError('first line\\nsecond line')\n")
    with pytest.raises(ConfigError) as excinfo:
        import_reward_function(f"{path}:fn")
    assert "noisy" in one_line(excinfo)


# ---------------------------------------------------------------- missing-stop penalty


def test_missing_stop_penalty_subtracts():
    scores = torch.tensor([0.5, 0.5])
    terminated = torch.tensor([True, False])
    assert torch.allclose(apply_missing_stop_penalty(scores, terminated, 1.0), torch.tensor([0.5, -0.5]))
    assert torch.equal(apply_missing_stop_penalty(scores, terminated, None), scores)
    assert torch.equal(scores, torch.tensor([0.5, 0.5]))  # input not modified


# ---------------------------------------------------------------- public API


def test_seed_helpers_are_public():
    for name in ("first_true_indices", "truncate_response", "get_reward"):
        assert name in tether.__all__
    assert tether.first_true_indices is masks.first_true_indices
    assert tether.truncate_response is masks.truncate_response
    assert tether.get_reward is get_reward
    assert tether.first_true_indices(torch.tensor([[False, False, False], [False, True, True]])).tolist() == [3, 1]


# ---------------------------------------------------------------- calling conventions and answers (issue 20.5-6)


def test_none_is_no_opinion_and_combine_leaves_it_out():
    from tether.scoring.functions import combine

    first = call_reward_function(returning([1.0, None, 2.0]), PROMPTS, ANSWERS)
    assert first[0] == 1.0 and math.isnan(first[1])
    second = torch.tensor([10.0, 3.0, float("nan")])
    assert combine([first, second], [1.0, 0.5], ["a", "b"]).tolist() == [6.0, 1.5, 2.0]
    with pytest.raises(RewardError, match="no reward function scored completion 1 \\(all of a returned None\\)"):
        combine([first], [1.0], ["a"])


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ({"a": 1.0, "b": 2.0, "c": 3.0}, "returned a dict (keys a, b, c)"),
        ([1.0, 1e39, 0.0], "returned 1e+39 for completion 1, which overflows float32"),
        (np.ones((3, 2)), "returned an array of shape (3, 2)"),
        (torch.ones(3, 2), "returned an array of shape (3, 2)"),
    ],
    ids=["dict", "float32-overflow", "numpy-two-columns", "tensor-two-columns"],
)
def test_answers_that_cannot_be_scores_are_refused_one_way(value, said):
    with pytest.raises(RewardError, match=re.escape(said)):
        call_reward_function(returning(value), PROMPTS, ANSWERS)


def test_column_arrays_are_scores_from_numpy_and_torch():
    for value in (np.array([[1.0], [0.5], [-2.0]]), torch.tensor([[1.0], [0.5], [-2.0]])):
        assert call_reward_function(returning(value), PROMPTS, ANSWERS).tolist() == [1.0, 0.5, -2.0]


def test_an_exception_keeps_the_file_and_line_it_came_from(tmp_path):
    path = tmp_path / "judge.py"
    path.write_text("def helper(r):\n    return 1 / 0\n\ndef score(prompts, responses):\n    return [helper(r) for r in responses]\n")
    function = import_reward_function(f"{path}:score")
    with pytest.raises(RewardError) as excinfo:
        call_reward_function(function, PROMPTS, ANSWERS)
    assert f"ZeroDivisionError: division by zero ({path}:2)" in one_line(excinfo)


def test_trl_style_functions_get_keywords_and_the_names_they_declare():
    from tether.scoring.functions import RewardFunction

    seen = {}

    def declared(prompts, completions, answer):
        seen["declared"] = (prompts, completions, answer)
        return [0.0] * len(prompts)

    def anything(completions, **kwargs):
        seen["anything"] = sorted(kwargs)
        return [1.0] * len(completions)

    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": a}] for a in ANSWERS]
    columns = {"answer": ["x", "y", "z"], "level": [1, 2, 3]}
    RewardFunction(declared)(chats, completions, [[5], [6], [7]], columns)
    assert seen["declared"] == (chats, completions, ["x", "y", "z"])
    RewardFunction(anything)(chats, completions, [[5], [6], [7]], columns)
    assert seen["anything"] == ["answer", "completion_ids", "level", "prompts"]
    legacy = {}
    RewardFunction(lambda prompts, responses: legacy.update(r=responses) or [0.0] * 3)(chats, completions, [[]] * 3, {})
    assert legacy["r"] == ANSWERS  # tether's first convention: the response texts
