"""Unit tests for ``tether.ops``, the pure tensor maths of the PPO/RLHF loop.

Expected numbers are written out by hand (see ``/work/shared/spec/ppo-details.md`` details
12-29 and 34, and Part XV). Where tether deliberately differs from TRL the tests pin tether's
convention:

* masks are keep-masks (True = real token) and lengths come from stop tokens, never from
  comparing ids with the pad id;
* the score is credited to the terminating token ``lengths - 1`` (not the slot after it, as
  in TRL's detail 22), and the state after the last kept token is terminal with value 0;
* whitening is unbiased by default, ``unbiased=False`` gives the biased (N+/TF) variant;
* degenerate input (nothing kept, one kept token) never produces NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.ops.logprobs import head_logprobs
from tether.ops import (
    AdaptiveKLController,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    ended_on_stop,
    first_true_indices,
    gae,
    kl_estimate,
    lengths_to_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    response_lengths,
    shape_rewards,
    token_logprobs,
    truncate_response,
)

F64 = torch.float64
F, T_ = False, True  # short names for boolean literals (T is used for widths below)


def close(actual, expected, atol=1e-6, rtol=0.0):
    """assert_close of a float tensor against a literal, with explicit tolerances."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# first_true_indices (detail 12)
# ---------------------------------------------------------------------------------------------


def _first_true_reference(row: list[bool]) -> int:
    """Slow python reference: index of the first True, or len(row)."""
    for i, b in enumerate(row):
        if b:
            return i
    return len(row)


def test_first_true_indices_spec_example():
    """All-False row -> row length; mixed rows -> index of the first True (detail 12)."""
    out = first_true_indices(bools([[F, F, F], [F, T_, T_], [T_, F, T_]]))
    assert out.tolist() == [3, 1, 0]


def test_first_true_indices_dtype_is_long():
    """Default dtype is torch.long."""
    assert first_true_indices(bools([[F, T_]])).dtype == torch.long


def test_first_true_indices_nd_reduces_last_dim():
    """N-D input: the last dimension is reduced, leading dims are kept."""
    b = bools(
        [
            [[F, F, T_, F], [F, F, F, F], [T_, T_, T_, T_]],
            [[F, T_, F, F], [F, F, F, T_], [F, F, F, F]],
        ]
    )  # [2, 3, 4]
    out = first_true_indices(b)
    assert out.shape == (2, 3)
    assert out.tolist() == [[2, 4, 0], [1, 3, 4]]


def test_first_true_indices_of_integer_and_float_masks_count_nonzero_as_true():
    """``~`` on an integer tensor flips bits (it gave [-5, -3, -6] here): nonzero is True."""
    expected = [1, 3, 0]
    rows = [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    for dtype in (torch.long, torch.uint8, torch.int32, torch.float32):
        assert first_true_indices(torch.tensor(rows, dtype=dtype)).tolist() == expected, dtype
    assert first_true_indices(torch.zeros(2, 200, dtype=torch.bool), dtype=torch.int16).tolist() == [200, 200]
    with pytest.raises(ValueError, match="do not fit torch.int8"):
        first_true_indices(torch.zeros(2, 200, dtype=torch.bool), dtype=torch.int8)
    with pytest.raises(ValueError, match="at least one dimension"):
        first_true_indices(torch.tensor(True))


def test_first_true_indices_rows_of_width_zero_are_length_zero():
    """A row with no True answers its length, also when that length is 0 (TRL's raised)."""
    out = first_true_indices(torch.zeros(4, 0, dtype=torch.bool))
    assert out.tolist() == [0, 0, 0, 0] and out.dtype == torch.long
    assert first_true_indices(torch.zeros(2, 3, 0, dtype=torch.bool)).tolist() == [[0, 0, 0], [0, 0, 0]]


@settings(deadline=None, max_examples=200)
@given(
    st.integers(min_value=0, max_value=9).flatmap(
        lambda width: st.lists(
            st.lists(st.booleans(), min_size=width, max_size=width), min_size=1, max_size=6
        )
    )
)
def test_first_true_indices_matches_python_loop(rows):
    """Equals a python-loop reference on arbitrary boolean matrices."""
    out = first_true_indices(bools(rows))
    assert out.tolist() == [_first_true_reference(r) for r in rows]


def test_first_true_indices_matches_python_loop_3d_random():
    """Equals the python-loop reference on seeded random 3-D boolean tensors."""
    gen = torch.Generator().manual_seed(0)
    b = torch.rand(4, 5, 7, generator=gen) < 0.15
    out = first_true_indices(b)
    expected = [[_first_true_reference(r) for r in plane] for plane in b.tolist()]
    assert out.tolist() == expected


# ---------------------------------------------------------------------------------------------
# truncate_response (detail 13)
# ---------------------------------------------------------------------------------------------


def test_truncate_response_spec_example():
    """Stop token kept, everything after it padded; rows without a stop unchanged (detail 13)."""
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    out = truncate_response(2, 0, responses)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]


def test_truncate_response_stop_at_first_position():
    """A stop token at position 0 keeps only that token."""
    out = truncate_response(2, 0, torch.tensor([[2, 5, 6]]))
    assert out.tolist() == [[2, 0, 0]]


def test_truncate_response_does_not_modify_input():
    """The input tensor is left untouched."""
    responses = torch.tensor([[5, 2, 7, 2]])
    truncate_response(2, 0, responses)
    assert responses.tolist() == [[5, 2, 7, 2]]


def test_truncate_response_idempotent():
    """Applying it twice equals applying it once (random responses, one and several stops)."""
    gen = torch.Generator().manual_seed(1)
    responses = torch.randint(0, 10, (32, 12), generator=gen)
    for stop in (2, [2, 9]):
        once = truncate_response(stop, 0, responses)
        twice = truncate_response(stop, 0, once)
        assert torch.equal(once, twice)


def test_truncate_response_several_stop_ids_cut_at_first_of_any():
    """With stop ids [2, 9] the response ends at whichever occurs first."""
    responses = torch.tensor([[5, 9, 2, 7], [2, 9, 9, 9], [5, 6, 7, 8], [5, 6, 2, 9]])
    out = truncate_response([2, 9], 0, responses)
    assert out.tolist() == [[5, 9, 0, 0], [2, 0, 0, 0], [5, 6, 7, 8], [5, 6, 2, 0]]


def test_truncate_response_pad_equal_to_stop_keeps_stop_token():
    """pad id == stop id (pad == EOS tokenizers): the stop token is kept, its length still counts it."""
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8]])
    out = truncate_response(2, 2, responses)
    assert out.tolist() == [[5, 2, 2, 2], [5, 6, 7, 8]]
    # The kept length is read from the first stop token, not from the padding.
    assert response_lengths(out, 2).tolist() == [2, 4]


# ---------------------------------------------------------------------------------------------
# response_lengths / lengths_to_mask / ended_on_stop (details 14-16, tether convention)
# ---------------------------------------------------------------------------------------------


def test_response_lengths_stop_in_middle():
    """T=6, stop at index 2 -> length 3 (stop included), mask [T,T,T,F,F,F], ended True."""
    responses = torch.tensor([[4, 5, 2, 7, 8, 9]])
    lengths = response_lengths(responses, 2)
    assert lengths.dtype == torch.long
    assert lengths.tolist() == [3]
    assert lengths_to_mask(lengths, 6).tolist() == [[T_, T_, T_, F, F, F]]
    assert ended_on_stop(responses, lengths, 2).tolist() == [True]


def test_response_lengths_no_stop_is_full_length_not_ended():
    """No stop token -> length T, ended_on_stop False (cut by the length limit)."""
    responses = torch.tensor([[4, 5, 6, 7, 8, 9]])
    lengths = response_lengths(responses, 2)
    assert lengths.tolist() == [6]
    assert lengths_to_mask(lengths, 6).tolist() == [[T_] * 6]
    assert ended_on_stop(responses, lengths, 2).tolist() == [False]


def test_response_lengths_stop_at_last_position_is_ended():
    """A stop token at T-1 gives length T and ended True (distinguishable from no stop)."""
    responses = torch.tensor([[4, 5, 6, 7, 8, 2]])
    lengths = response_lengths(responses, 2)
    assert lengths.tolist() == [6]
    assert ended_on_stop(responses, lengths, 2).tolist() == [True]


def test_response_lengths_stop_at_first_position():
    """A stop token at position 0 gives length 1, ended True."""
    responses = torch.tensor([[2, 5, 6]])
    lengths = response_lengths(responses, 2)
    assert lengths.tolist() == [1]
    assert ended_on_stop(responses, lengths, 2).tolist() == [True]


def test_response_lengths_none_stop_ids():
    """stop_token_ids=None -> every row keeps its full length and none ended on a stop."""
    responses = torch.tensor([[2, 0, 0], [5, 6, 7]])
    lengths = response_lengths(responses, None)
    assert lengths.dtype == torch.long
    assert lengths.tolist() == [3, 3]
    assert ended_on_stop(responses, lengths, None).tolist() == [False, False]


def test_response_lengths_ignore_pad_ids():
    """Lengths come from stop tokens only: a sampled pad id (0) before the stop is a real token."""
    responses = torch.tensor([[0, 0, 5, 2, 0, 0], [7, 0, 0, 0, 0, 0]])
    lengths = response_lengths(responses, 2)
    assert lengths.tolist() == [4, 6]
    assert ended_on_stop(responses, lengths, 2).tolist() == [True, False]


def test_response_lengths_several_stop_ids():
    """Several stop ids: length up to and including the first of any of them."""
    responses = torch.tensor([[5, 9, 2, 7], [5, 6, 7, 2], [5, 6, 7, 8]])
    lengths = response_lengths(responses, [2, 9])
    assert lengths.tolist() == [2, 4, 4]
    assert ended_on_stop(responses, lengths, [2, 9]).tolist() == [True, True, False]


def test_ended_on_stop_zero_length_is_false():
    """A zero-length row never counts as ended on a stop token."""
    responses = torch.tensor([[2, 2, 2]])
    assert ended_on_stop(responses, torch.tensor([0]), 2).tolist() == [False]


def test_lengths_to_mask_values():
    """Keep-mask has exactly lengths[b] leading True values."""
    mask = lengths_to_mask(torch.tensor([0, 2, 4]), 4)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[F, F, F, F], [T_, T_, F, F], [T_, T_, T_, T_]]


@settings(deadline=None, max_examples=100)
@given(
    st.integers(min_value=1, max_value=8).flatmap(
        lambda width: st.lists(
            st.lists(st.integers(min_value=0, max_value=4), min_size=width, max_size=width),
            min_size=1,
            max_size=5,
        )
    )
)
def test_response_lengths_matches_python_loop(rows):
    """Lengths and ended flags equal a python-loop reference (stop ids {2, 3})."""
    responses = torch.tensor(rows)
    lengths = response_lengths(responses, [2, 3])
    ended = ended_on_stop(responses, lengths, [2, 3])
    exp_len, exp_ended = [], []
    for row in rows:
        stops = [i for i, tok in enumerate(row) if tok in (2, 3)]
        exp_len.append(stops[0] + 1 if stops else len(row))
        exp_ended.append(bool(stops))
    assert lengths.tolist() == exp_len
    assert ended.tolist() == exp_ended


# ---------------------------------------------------------------------------------------------
# position_ids_from_mask (detail 4)
# ---------------------------------------------------------------------------------------------


def test_position_ids_from_mask_skips_left_padding():
    """Mask [0,0,1,1,1] -> positions [0,0,0,1,2]; an unpadded row counts from 0."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert position_ids_from_mask(mask).tolist() == expected
    assert position_ids_from_mask(mask.bool()).tolist() == expected


# ---------------------------------------------------------------------------------------------
# kl_estimate (detail 20)
# ---------------------------------------------------------------------------------------------


def test_kl_estimate_spec_values():
    """k1, k2, k3 at the two hand-computed points of detail 20.

    logp=-1.0, ref=-1.5: log r = ref - logp = -0.5
        k1 = 0.5, k2 = 0.5 * 0.25 = 0.125, k3 = e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    logp=-1.5, ref=-1.0: log r = +0.5
        k1 = -0.5, k2 = 0.125, k3 = e^0.5 - 1 - 0.5 = 1.6487213 - 1.5 = 0.1487213
    """
    logp = torch.tensor([-1.0, -1.5], dtype=F64)
    ref = torch.tensor([-1.5, -1.0], dtype=F64)
    close(kl_estimate(logp, ref, "k1"), [0.5, -0.5], atol=1e-12)
    close(kl_estimate(logp, ref, "k2"), [0.125, 0.125], atol=1e-12)
    close(kl_estimate(logp, ref, "k3"), [0.1065307, 0.1487213], atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kl_estimate_k3_nonnegative(dtype):
    """k3 is never negative, even where k1 is."""
    gen = torch.Generator().manual_seed(2)
    logp = -5 * torch.rand(64, 32, generator=gen).to(dtype)
    ref = -5 * torch.rand(64, 32, generator=gen).to(dtype)
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # the test input does exercise negative k1
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_zero_where_equal(estimator):
    """Every estimator is exactly 0 wherever logprobs == ref_logprobs."""
    gen = torch.Generator().manual_seed(3)
    logp = -3 * torch.rand(4, 6, generator=gen)
    out = kl_estimate(logp, logp.clone(), estimator)
    assert torch.equal(out, torch.zeros_like(logp))


def test_kl_estimate_unknown_estimator_raises():
    """An unknown estimator name is a ValueError, not a silent default."""
    with pytest.raises(ValueError):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------------------------------------
# shape_rewards (details 21-22, tether convention: score on the terminating token)
# ---------------------------------------------------------------------------------------------


def test_shape_rewards_hand_example():
    """Score lands at lengths-1; -beta*kl on kept tokens only.

    beta = 0.05
    row 0: length 3, kl [.01,.02,.03,.5] (the .5 is masked), score 2
        non_score = [-.0005, -.001, -.0015, 0]
        rewards   = [-.0005, -.001, -.0015 + 2 = 1.9985, 0]
    row 1: length 4 (cut by the limit), kl [.1]*4, score 1
        non_score = [-.005]*4
        rewards   = [-.005, -.005, -.005, 1 - .005 = .995]
    """
    kl = torch.tensor([[0.01, 0.02, 0.03, 0.5], [0.1, 0.1, 0.1, 0.1]], dtype=F64)
    lengths = torch.tensor([3, 4])
    mask = lengths_to_mask(lengths, 4)
    rewards, non_score = shape_rewards(torch.tensor([2.0, 1.0], dtype=F64), kl, mask, lengths, 0.05)
    close(non_score, [[-0.0005, -0.001, -0.0015, 0.0], [-0.005, -0.005, -0.005, -0.005]], atol=1e-12)
    close(rewards, [[-0.0005, -0.001, 1.9985, 0.0], [-0.005, -0.005, -0.005, 0.995]], atol=1e-12)


def test_shape_rewards_zero_score_sum_is_minus_beta_kl():
    """With score 0, sum_t rewards[b,t] = -beta * sum over kept tokens of kl[b,t] (detail 21)."""
    gen = torch.Generator().manual_seed(4)
    kl = torch.rand(8, 10, generator=gen, dtype=F64)
    lengths = torch.randint(0, 11, (8,), generator=gen)
    mask = lengths_to_mask(lengths, 10)
    rewards, non_score = shape_rewards(torch.zeros(8, dtype=F64), kl, mask, lengths, 0.05)
    expected = -0.05 * (kl * mask).sum(1)
    torch.testing.assert_close(rewards.sum(1), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(non_score.sum(1), expected, atol=1e-12, rtol=0)


def test_shape_rewards_zero_length_row_gets_no_score():
    """A zero-length row gets no score anywhere, and nothing is NaN."""
    kl = torch.tensor([[0.3, 0.3, 0.3], [0.01, 0.02, 0.03]])
    lengths = torch.tensor([0, 2])
    mask = lengths_to_mask(lengths, 3)
    rewards, non_score = shape_rewards(torch.tensor([5.0, 1.0]), kl, mask, lengths, 0.1)
    assert torch.isfinite(rewards).all() and torch.isfinite(non_score).all()
    # row 1: [-.001, -.002 + 1 = .998, 0]
    close(rewards, [[0.0, 0.0, 0.0], [-0.001, 0.998, 0.0]], atol=1e-6)
    close(non_score, [[0.0, 0.0, 0.0], [-0.001, -0.002, 0.0]], atol=1e-6)


def test_shape_rewards_masked_kl_ignored():
    """Non-score reward is 0 at masked positions even where kl is nonzero there."""
    kl = torch.tensor([[0.1, 7.0, -3.0, 42.0]])
    lengths = torch.tensor([1])
    mask = lengths_to_mask(lengths, 4)
    rewards, non_score = shape_rewards(torch.tensor([0.0]), kl, mask, lengths, 0.5)
    close(non_score, [[-0.05, 0.0, 0.0, 0.0]], atol=1e-7)
    close(rewards, [[-0.05, 0.0, 0.0, 0.0]], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# gae (detail 24, tether convention: terminal state after the last kept token)
# ---------------------------------------------------------------------------------------------


def test_gae_and_shaping_numeric_example():
    """Detail 22's example, adapted to tether's score placement (score on token lengths-1 = 2).

    T=6, length 3, V = [.1,.2,.3,.4,.5,.6] -> masked [.1,.2,.3,0,0,0],
    kl = [.01,.02,.03,0,0,0], beta=.05, score=2, gamma=1, lam=.95.

    rewards = [-.05*.01, -.05*.02, -.05*.03 + 2, 0, 0, 0] = [-.0005, -.001, 1.9985, 0, 0, 0]
    deltas (next value after token 2 is terminal = 0):
        d2 = 1.9985 + 0   - .3 = 1.6985
        d1 = -.001  + .3  - .2 = 0.099
        d0 = -.0005 + .2  - .1 = 0.0995
    advantages (gamma*lam = .95):
        A2 = 1.6985
        A1 = 0.099  + .95 * 1.6985   = 0.099  + 1.613575   = 1.712575
        A0 = 0.0995 + .95 * 1.712575 = 0.0995 + 1.62694625 = 1.72644625
    returns = A + V = [1.82644625, 1.912575, 1.9985, 0, 0, 0]
    """
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=F64)
    kl = torch.tensor([[0.01, 0.02, 0.03, 0.0, 0.0, 0.0]], dtype=F64)
    lengths = torch.tensor([3])
    mask = lengths_to_mask(lengths, 6)
    rewards, _ = shape_rewards(torch.tensor([2.0], dtype=F64), kl, mask, lengths, 0.05)
    close(rewards, [[-0.0005, -0.001, 1.9985, 0.0, 0.0, 0.0]], atol=1e-12)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[1.72644625, 1.712575, 1.6985, 0.0, 0.0, 0.0]], atol=1e-10)
    close(returns, [[1.82644625, 1.912575, 1.9985, 0.0, 0.0, 0.0]], atol=1e-10)


def test_gae_lambda1_gamma1_hand_example():
    """lam=1, gamma=1: A_t = sum_{k>=t} r_k - V_t over kept tokens.

    r = [1, 2, 3 | 9], V = [.5, 1, 1.5 | 9], length 3:
        A0 = 6 - .5 = 5.5, A1 = 5 - 1 = 4, A2 = 3 - 1.5 = 1.5, A3 = 0
        returns = [6, 5, 3, 0]
    """
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]], dtype=F64)
    mask = lengths_to_mask(torch.tensor([3]), 4)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.0, 1.5, 0.0]], atol=1e-12)
    close(ret, [[6.0, 5.0, 3.0, 0.0]], atol=1e-12)


def test_gae_lambda1_gamma1_monte_carlo_identity_random():
    """lam=1, gamma=1 on random rows: A_t = (suffix sum of kept rewards) - V_t, returns = suffix sum."""
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(6, 9, generator=gen, dtype=F64)
    values = torch.randn(6, 9, generator=gen, dtype=F64)
    lengths = torch.tensor([0, 1, 4, 8, 9, 5])
    mask = lengths_to_mask(lengths, 9)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    kept_r = rewards * mask
    suffix = kept_r.flip(1).cumsum(1).flip(1)  # sum_{k>=t} r_k over kept tokens
    torch.testing.assert_close(adv, (suffix - values) * mask, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, suffix * mask, atol=1e-12, rtol=0)


def test_gae_lambda0_is_one_step_delta():
    """lam=0: A_t = r_t + gamma*V_{t+1} - V_t, with V = 0 after the last kept token.

    gamma = .9, r = [1, 2, 3 | 5], V = [.5, 1, 1.5 | 9], length 3:
        A0 = 1 + .9*1.0 - .5 = 1.4
        A1 = 2 + .9*1.5 - 1  = 2.35
        A2 = 3 + .9*0   - 1.5 = 1.5   (terminal: the masked V3 = 9 is not bootstrapped)
        returns = A + V = [1.9, 3.35, 3.0, 0]
    """
    rewards = torch.tensor([[1.0, 2.0, 3.0, 5.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]], dtype=F64)
    mask = lengths_to_mask(torch.tensor([3]), 4)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv, [[1.4, 2.35, 1.5, 0.0]], atol=1e-12)
    close(ret, [[1.9, 3.35, 3.0, 0.0]], atol=1e-12)


def test_gae_full_length_row_not_bootstrapped():
    """A row cut by the length limit (length T) is terminal: nothing bootstrapped past T-1.

    gamma = lam = 1, r = [0, 1], V = [.25, .5]: A1 = 1 - .5 = .5, A0 = 0 + .5 - .25 + .5 = .75
    """
    rewards = torch.tensor([[0.0, 1.0]], dtype=F64)
    values = torch.tensor([[0.25, 0.5]], dtype=F64)
    mask = lengths_to_mask(torch.tensor([2]), 2)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.75, 0.5]], atol=1e-12)
    close(ret, [[1.0, 1.0]], atol=1e-12)


def test_gae_zeros_at_masked_positions():
    """Advantages and returns are exactly 0 at masked positions (including zero-length rows)."""
    gen = torch.Generator().manual_seed(6)
    rewards = torch.randn(5, 7, generator=gen)
    values = torch.randn(5, 7, generator=gen)
    mask = lengths_to_mask(torch.tensor([0, 1, 3, 6, 7]), 7)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~mask] == 0).all()
    assert (ret[~mask] == 0).all()


def test_gae_ignores_values_and_rewards_at_masked_positions():
    """Changing values or rewards at masked positions changes nothing."""
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(4, 6, generator=gen, dtype=F64)
    values = torch.randn(4, 6, generator=gen, dtype=F64)
    mask = lengths_to_mask(torch.tensor([0, 2, 5, 6]), 6)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    junk = 100.0 * torch.randn(4, 6, generator=gen, dtype=F64)
    adv2, ret2 = gae(
        torch.where(mask, rewards, junk), torch.where(mask, values, -junk), mask, gamma=0.95, lam=0.9
    )
    torch.testing.assert_close(adv2, adv, atol=0, rtol=0)
    torch.testing.assert_close(ret2, ret, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# masked statistics and whitening (details 23, 25)
# ---------------------------------------------------------------------------------------------

X = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
M = torch.tensor([F, T_, T_, F])


def test_masked_sum_mean_var_hand_values():
    """[1,2,3,4] mask [0,1,1,0]: sum 5, mean 2.5, unbiased var .5, biased var .25."""
    close(masked_sum(X, M), 5.0, atol=1e-12)
    close(masked_mean(X, M), 2.5, atol=1e-12)
    close(masked_var(X, M), 0.5, atol=1e-12)
    close(masked_var(X, M, unbiased=True), 0.5, atol=1e-12)
    close(masked_var(X, M, unbiased=False), 0.25, atol=1e-12)


def test_masked_whiten_unbiased_default():
    """Default (unbiased, TRL): (2-2.5)/sqrt(.5) = -0.70711, +0.70711; masked positions 0."""
    out = masked_whiten(X, M)
    close(out, [0.0, -0.7071068, 0.7071068, 0.0], atol=1e-6)
    assert out[0] == 0 and out[3] == 0


def test_masked_whiten_biased():
    """unbiased=False (N+/TF): (2-2.5)/sqrt(.25) = -1, +1."""
    close(masked_whiten(X, M, unbiased=False), [0.0, -1.0, 1.0, 0.0], atol=1e-6)


def test_masked_whiten_no_shift_keeps_mean():
    """shift_mean=False keeps the masked mean 2.5: 2.5 -+ 0.70711 = [1.79289, 3.20711]."""
    out = masked_whiten(X, M, shift_mean=False)
    close(out, [0.0, 1.7928932, 3.2071068, 0.0], atol=1e-6)
    close(masked_mean(out, M), 2.5, atol=1e-6)


def test_masked_whiten_random_unit_stats():
    """On random data the kept entries get mean ~0 and variance ~1 (in the chosen convention)."""
    gen = torch.Generator().manual_seed(8)
    x = 3.0 + 5.0 * torch.randn(6, 10, generator=gen, dtype=F64)
    mask = torch.rand(6, 10, generator=gen) < 0.6
    for unbiased in (True, False):
        out = masked_whiten(x, mask, unbiased=unbiased)
        close(masked_mean(out, mask), 0.0, atol=1e-6)
        close(masked_var(out, mask, unbiased=unbiased), 1.0, atol=1e-6)
        assert (out[~mask] == 0).all()


def test_masked_mean_all_false_is_zero():
    """Nothing kept: masked_mean is 0, not NaN."""
    out = masked_mean(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.bool))
    assert torch.isfinite(out)
    close(out, 0.0, atol=0)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_degenerate_is_zero(unbiased):
    """One kept element (or none): masked_var is 0, not NaN or inf."""
    x = torch.tensor([1.0, 2.0, 3.0])
    one = masked_var(x, torch.tensor([F, T_, F]), unbiased=unbiased)
    none = masked_var(x, torch.zeros(3, dtype=torch.bool), unbiased=unbiased)
    close(one, 0.0, atol=0)
    close(none, 0.0, atol=0)


def test_masked_whiten_degenerate_is_finite():
    """One kept element or none: whitening stays finite, masked positions stay 0."""
    x = torch.tensor([1.0, 2.0, 3.0])
    for unbiased in (True, False):
        one = masked_whiten(x, torch.tensor([F, T_, F]), unbiased=unbiased)
        assert torch.isfinite(one).all()
        close(one, [0.0, 0.0, 0.0], atol=1e-6)  # the only kept value equals the mean
        kept_mean = masked_whiten(x, torch.tensor([F, T_, F]), shift_mean=False, unbiased=unbiased)
        close(kept_mean, [0.0, 2.0, 0.0], atol=1e-6)
        none = masked_whiten(x, torch.zeros(3, dtype=torch.bool), unbiased=unbiased)
        assert torch.isfinite(none).all()
        close(none, [0.0, 0.0, 0.0], atol=0)


# ---------------------------------------------------------------------------------------------
# clipped_policy_loss (detail 27)
# ---------------------------------------------------------------------------------------------


def _policy_case(ratio: float, advantage: float):
    """Per-token loss, clipped flag, ratio and d loss / d logprobs for one token with that ratio."""
    old = torch.tensor([-2.0], dtype=F64)
    new = (old + math.log(ratio)).detach().requires_grad_(True)  # exp(new - old) == ratio
    loss, clipped, r = clipped_policy_loss(new, old, torch.tensor([advantage], dtype=F64), 0.2)
    loss.sum().backward()
    return loss.detach(), clipped, r.detach(), new.grad


def test_policy_loss_positive_advantage_high_ratio_clipped():
    """A=1, ratio 1.5: max(-1.5, -1.2) = -1.2, clipped, zero gradient."""
    loss, clipped, r, grad = _policy_case(1.5, 1.0)
    close(r, [1.5], atol=1e-12)
    close(loss, [-1.2], atol=1e-12)
    assert clipped.tolist() == [True]
    close(grad, [0.0], atol=0)


def test_policy_loss_positive_advantage_low_ratio_unclipped():
    """A=1, ratio 0.5: max(-0.5, -0.8) = -0.5, not clipped; d/dlogp (-A*exp(dlogp)) = -0.5."""
    loss, clipped, r, grad = _policy_case(0.5, 1.0)
    close(loss, [-0.5], atol=1e-12)
    assert clipped.tolist() == [False]
    close(grad, [-0.5], atol=1e-12)


def test_policy_loss_negative_advantage_low_ratio_clipped():
    """A=-1, ratio 0.5: max(0.5, 0.8) = 0.8, clipped, zero gradient."""
    loss, clipped, r, grad = _policy_case(0.5, -1.0)
    close(loss, [0.8], atol=1e-12)
    assert clipped.tolist() == [True]
    close(grad, [0.0], atol=0)


def test_policy_loss_negative_advantage_high_ratio_unclipped():
    """A=-1, ratio 1.5: max(1.5, 1.2) = 1.5, not clipped; gradient = -A*ratio = 1.5."""
    loss, clipped, r, grad = _policy_case(1.5, -1.0)
    close(loss, [1.5], atol=1e-12)
    assert clipped.tolist() == [False]
    close(grad, [1.5], atol=1e-12)


def test_policy_loss_ratio_one_inside_range():
    """Ratio 1 (first minibatch): loss = -A, nothing clipped, full gradient -A."""
    loss, clipped, r, grad = _policy_case(1.0, 2.0)
    close(r, [1.0], atol=0)
    close(loss, [-2.0], atol=1e-12)
    assert clipped.tolist() == [False]
    close(grad, [-2.0], atol=1e-12)


def test_policy_loss_elementwise_batch():
    """Batched [B, T] input gives the same per-token results as the scalar cases."""
    old = torch.zeros(2, 2, dtype=F64)
    new = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.0]], dtype=F64))
    adv = torch.tensor([[1.0, 1.0], [-1.0, 3.0]], dtype=F64)
    loss, clipped, _ = clipped_policy_loss(new, old, adv, 0.2)
    close(loss, [[-1.2, -0.5], [0.8, -3.0]], atol=1e-12)
    assert clipped.tolist() == [[True, False], [True, False]]


# ---------------------------------------------------------------------------------------------
# clipped_value_loss (detail 28)
# ---------------------------------------------------------------------------------------------


def _value_case(v: float, v_old: float, ret: float):
    values = torch.tensor([v], dtype=F64, requires_grad=True)
    loss, clipped = clipped_value_loss(
        values, torch.tensor([v_old], dtype=F64), torch.tensor([ret], dtype=F64), 0.2
    )
    loss.sum().backward()
    return loss.detach(), clipped, values.grad


def test_value_loss_spec_example_clipped():
    """V_old=1, v=1.5, R=2: vclip=1.2, losses .25 vs .64 -> .5*.64 = .32, clipped, zero grad."""
    loss, clipped, grad = _value_case(1.5, 1.0, 2.0)
    close(loss, [0.32], atol=1e-12)
    assert clipped.tolist() == [True]
    close(grad, [0.0], atol=0)


def test_value_loss_unclipped_branch_larger():
    """V_old=1, v=.5, R=2: vclip=.8, losses 2.25 vs 1.44 -> 1.125, not clipped, grad v-R = -1.5."""
    loss, clipped, grad = _value_case(0.5, 1.0, 2.0)
    close(loss, [1.125], atol=1e-12)
    assert clipped.tolist() == [False]
    close(grad, [-1.5], atol=1e-12)


def test_value_loss_inside_range():
    """V_old=1, v=1.1, R=2: within the clip range, loss .5*.81 = .405, not clipped, grad -0.9."""
    loss, clipped, grad = _value_case(1.1, 1.0, 2.0)
    close(loss, [0.405], atol=1e-12)
    assert clipped.tolist() == [False]
    close(grad, [-0.9], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bradley_terry_loss (detail 34)
# ---------------------------------------------------------------------------------------------


def test_bradley_terry_spec_value():
    """r_c=1, r_r=0: log(1 + e^-1) = log(1.3678794) = 0.3132617."""
    loss = bradley_terry_loss(torch.tensor([1.0], dtype=F64), torch.tensor([0.0], dtype=F64))
    close(loss, 0.3132617, atol=1e-7)


def test_bradley_terry_mean_over_pairs():
    """Mean over pairs: (log(1+e^-1) + log(1+e^1)) / 2 = (0.3132617 + 1.3132617) / 2 = 0.8132617."""
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    close(loss, 0.8132617, atol=1e-7)


def test_bradley_terry_shift_invariant():
    """Adding the same constant to both scores leaves the loss unchanged."""
    gen = torch.Generator().manual_seed(9)
    chosen = torch.randn(16, generator=gen, dtype=F64)
    rejected = torch.randn(16, generator=gen, dtype=F64)
    base = bradley_terry_loss(chosen, rejected)
    for shift in (-7.5, 3.0, 100.0):
        torch.testing.assert_close(bradley_terry_loss(chosen + shift, rejected + shift), base, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# token_logprobs (details 6, 26, 29)
# ---------------------------------------------------------------------------------------------


def _logits_and_tokens(seed: int = 10, batch: int = 3, width: int = 5, vocab: int = 17):
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(batch, width, vocab, generator=gen)
    tokens = torch.randint(0, vocab, (batch, width), generator=gen)
    return logits, tokens


def _reference(logits, tokens, temperature):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax(chunk_size, temperature):
    """Equals log_softmax(logits / temperature).gather(tokens), and entropy = -(p*logp).sum(-1)."""
    logits, tokens = _logits_and_tokens()
    logp, entropy = token_logprobs(logits, tokens, temperature, chunk_size=chunk_size, with_entropy=True)
    ref_logp, ref_entropy = _reference(logits, tokens, temperature)
    assert logp.shape == tokens.shape and logp.dtype == torch.float32
    assert entropy.shape == tokens.shape and entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=1e-6)
    # Entropy is computed as logsumexp(l) - sum(p * l): in float32 that difference of O(10)
    # numbers carries ~1e-6 absolute rounding error (measured 1.3e-6 against float64), so the
    # entropy gets atol 1e-5. The float64 check below pins the formula itself tightly.
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)


def test_token_logprobs_float64_input_exact_formula():
    """float64 logits are computed in float32 (documented); against a float64 truth the error
    stays at float32 rounding level."""
    logits, tokens = _logits_and_tokens(seed=15)
    logits = logits.double()
    logp, entropy = token_logprobs(logits, tokens, 0.7, chunk_size=2, with_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    truth_all = torch.log_softmax(logits / 0.7, dim=-1)
    truth_logp = truth_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    truth_entropy = -(truth_all.exp() * truth_all).sum(-1)
    torch.testing.assert_close(logp.double(), truth_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), truth_entropy, atol=1e-5, rtol=0)


def test_token_logprobs_without_entropy_returns_none():
    """with_entropy=False returns (logprobs, None)."""
    logits, tokens = _logits_and_tokens()
    logp, entropy = token_logprobs(logits, tokens)
    assert entropy is None
    assert logp.shape == tokens.shape


def test_token_logprobs_independent_of_chunk_size():
    """Chunk sizes 1, 3 and 1000 give the same logprobs and entropies."""
    logits, tokens = _logits_and_tokens(seed=11, batch=4, width=7, vocab=23)
    results = [token_logprobs(logits, tokens, 0.9, chunk_size=c, with_entropy=True) for c in (1, 3, 1000)]
    for logp, entropy in results[1:]:
        torch.testing.assert_close(logp, results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(entropy, results[0][1], atol=1e-6, rtol=1e-6)


def test_token_logprobs_temperature_changes_result():
    """Temperature is applied: tau=0.5 differs from tau=1 and matches log_softmax(2*logits)."""
    logits, tokens = _logits_and_tokens(seed=12)
    hot, _ = token_logprobs(logits, tokens, 0.5)
    cold, _ = token_logprobs(logits, tokens, 1.0)
    assert not torch.allclose(hot, cold)
    ref, _ = _reference(2.0 * logits, tokens, 1.0)
    torch.testing.assert_close(hot, ref, atol=1e-6, rtol=1e-6)


def test_token_logprobs_uniform_logits_hand_values():
    """Uniform logits over V=4: every logprob is log(1/4) = -1.3862944, entropy log 4 = 1.3862944."""
    logits = torch.zeros(1, 2, 4)
    logp, entropy = token_logprobs(logits, torch.tensor([[0, 3]]), with_entropy=True)
    close(logp, [[-1.3862944, -1.3862944]], atol=1e-6)
    close(entropy, [[1.3862944, 1.3862944]], atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_token_logprobs_gradient_matches_unchunked(chunk_size):
    """Backward works and the gradient wrt logits equals the unchunked reference's gradient."""
    logits, tokens = _logits_and_tokens(seed=13)
    gen = torch.Generator().manual_seed(14)
    w_logp = torch.randn(tokens.shape, generator=gen)
    w_ent = torch.randn(tokens.shape, generator=gen)

    leaf = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(leaf, tokens, 0.8, chunk_size=chunk_size, with_entropy=True, entropy_grad=True)
    ((logp * w_logp).sum() + (entropy * w_ent).sum()).backward()

    ref_leaf = logits.clone().requires_grad_(True)
    ref_logp, ref_entropy = _reference(ref_leaf, tokens, 0.8)
    ((ref_logp * w_logp).sum() + (ref_entropy * w_ent).sum()).backward()

    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert leaf.grad.abs().sum() > 0
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-5, rtol=1e-5)


def test_token_logprobs_entropy_carries_no_graph_unless_asked():
    """Without an entropy bonus the entropy is a metric: no softmax is kept for backward."""
    logits, tokens = _logits_and_tokens(seed=13)
    leaf = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(leaf, tokens, 0.8, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad


# ---------------------------------------------------------------------------------------------
# AdaptiveKLController (detail 21)
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_error_clipped_up():
    """kl=12, target 6: error 1 clipped to .2 -> .1 * (1 + .2*100/10000) = .1 * 1.002 = .1002."""
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 100)
    assert ctl.value == pytest.approx(0.1002, abs=1e-12)


def test_adaptive_kl_error_clipped_down():
    """kl=0, target 6: error -1 clipped to -.2 -> .1 * (1 - .002) = .0998."""
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(0.0, 100)
    assert ctl.value == pytest.approx(0.0998, abs=1e-12)


def test_adaptive_kl_error_inside_clip_range():
    """kl=6.6, target 6: error .1 (unclipped) -> .1 * (1 + .1*100/10000) = .1 * 1.001 = .1001."""
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(6.6, 100)
    assert ctl.value == pytest.approx(0.1001, abs=1e-12)


def test_adaptive_kl_on_target_unchanged():
    """kl == target leaves the coefficient unchanged."""
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(6.0, 100)
    assert ctl.value == pytest.approx(0.1, abs=1e-15)


def test_adaptive_kl_updates_compound():
    """Two clipped-up updates compound: .1 * 1.002 * 1.002 = .1004004."""
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 100)
    ctl.update(50.0, 100)
    assert ctl.value == pytest.approx(0.1004004, abs=1e-12)


def test_adaptive_kl_state_dict_round_trip():
    """state_dict / load_state_dict restore value, target and horizon; later updates agree."""
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 100)
    state = ctl.state_dict()
    assert state == {"value": pytest.approx(0.1002, abs=1e-12), "target": 6.0, "horizon": 10000}

    other = AdaptiveKLController(0.7, 1.0, 5)
    other.load_state_dict(state)
    assert (other.value, other.target, other.horizon) == (ctl.value, ctl.target, ctl.horizon)
    ctl.update(3.0, 64)
    other.update(3.0, 64)
    assert other.value == ctl.value


# ---------------------------------------------------------------------------------------------
# head_logprobs: the output layer in blocks of rows and vocabulary, with its own backward pass
# ---------------------------------------------------------------------------------------------


def _head_inputs(seed: int = 3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 8, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(11, 8, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(11, generator=gen, dtype=dtype).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    return hidden, weight, bias, tokens


@pytest.mark.parametrize("block_columns", [None, 4])
@pytest.mark.parametrize("keep_probs", [True, False])
def test_head_logprobs_gradients_pass_gradcheck(monkeypatch, keep_probs, block_columns):
    """Both backward modes (reuse the forward's probabilities / recompute them per block) give
    the analytical gradient of log softmax(h W^T + b)/tau at the tokens, for h, W and b, with
    whole rows or three blocks across the 11-entry vocabulary."""
    import tether.ops.logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "KEEP_PROBS_BYTES", 1 << 40 if keep_probs else 0)
    hidden, weight, bias, tokens = _head_inputs()
    assert torch.autograd.gradcheck(
        lambda h, w, b: head_logprobs(h, w, b, tokens, 0.7, max_chunk_rows=4, block_columns=block_columns)[0],
        (hidden, weight, bias),
    )


@pytest.mark.parametrize("block_columns", [None, 4])
@pytest.mark.parametrize("keep_probs", [True, False])
def test_head_logprobs_entropy_gradient_passes_gradcheck(monkeypatch, keep_probs, block_columns):
    """With ``entropy_grad`` a loss of logprobs and entropy gets the analytical gradient in
    both backward modes, for h, W and b, with whole rows or vocabulary blocks."""
    import tether.ops.logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "KEEP_PROBS_BYTES", 1 << 40 if keep_probs else 0)
    hidden, weight, bias, tokens = _head_inputs()
    mix = torch.randn(tokens.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss(h, w, b):
        logp, entropy = head_logprobs(
            h, w, b, tokens, 0.7, max_chunk_rows=4, with_entropy=True, entropy_grad=True, block_columns=block_columns
        )
        return logp + mix * entropy

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))


@pytest.mark.parametrize("entropy_bonus", [0.0, 0.3])
@pytest.mark.parametrize("chunk_rows, block_columns", [(1, None), (4, None), (1000, None), (4, 3), (1000, 5)])
@pytest.mark.parametrize("bias_shift", [0.0, 40.0, -40.0])
def test_head_logprobs_equals_token_logprobs_with_gradients(chunk_rows, block_columns, entropy_bonus, bias_shift):
    """Same logprobs, entropy and gradients as materialising the logits (fp32, 1e-5); with an
    entropy bonus the entropy's gradient too, without one the entropy carries no graph. A bias
    that climbs (or falls) by 40 across the vocabulary makes every later block raise the
    running max (or none do): the softmax must be rebased exactly either way."""
    hidden, weight, bias, tokens = (t.detach().float() if t.is_floating_point() else t for t in _head_inputs(4))
    bias = bias + torch.linspace(0, bias_shift, bias.numel())
    upstream = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))
    entropy_grad = entropy_bonus != 0
    results = []
    for fused in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if fused:
            logp, entropy = head_logprobs(
                h, w, b, tokens, 0.8, max_chunk_rows=chunk_rows, with_entropy=True, entropy_grad=entropy_grad,
                block_columns=block_columns,
            )
        else:
            logp, entropy = token_logprobs(
                h @ w.t() + b, tokens, 0.8, chunk_size=chunk_rows, with_entropy=True, entropy_grad=entropy_grad
            )
        loss = logp * upstream - entropy_bonus * entropy if entropy_grad else logp * upstream
        loss.sum().backward()
        results.append((logp, entropy, h.grad, w.grad, b.grad))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert results[0][1].requires_grad == entropy_grad


def test_head_logprobs_without_bias_and_without_gradients():
    hidden, weight, _, tokens = (t.detach() for t in _head_inputs(5))
    with torch.no_grad():
        logp, entropy = head_logprobs(hidden, weight, None, tokens, 1.0)
    expected, _ = token_logprobs(hidden @ weight.t(), tokens)
    torch.testing.assert_close(logp, expected.double(), atol=1e-6, rtol=0)
    assert entropy is None


def test_head_logprobs_of_no_rows_give_a_zero_weight_gradient():
    """The weight gradient is written by the row blocks, not zero-filled first: with no rows
    it must still come back as zeros, not as whatever memory it was given."""
    weight = torch.randn(1300, 8, requires_grad=True)
    hidden = torch.randn(1, 0, 8, requires_grad=True)
    stale = torch.full((1300, 8), 7.0)  # freed memory of the gradient's size, likely handed out again
    del stale
    logp, _ = head_logprobs(hidden, weight, None, torch.zeros(1, 0, dtype=torch.long), 0.7)
    logp.sum().backward()
    assert logp.shape == (1, 0)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_head_logprobs_under_bf16_autocast_runs_the_product_in_bf16():
    """Under autocast the product is bf16 like the model's own output layer would be: equal to
    log_softmax of the bf16 logits, and clearly different from the fp32 answer."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 64, 256, generator=gen)
    weight = torch.randn(512, 256, generator=gen) / 16
    tokens = torch.randint(0, 512, (2, 64), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = head_logprobs(hidden, weight, None, tokens, 0.7)
        bf16_logits = torch.nn.functional.linear(hidden, weight)
    assert bf16_logits.dtype == torch.bfloat16 and logp.dtype == torch.float32
    expected, _ = token_logprobs(bf16_logits, tokens, 0.7)
    exact, _ = token_logprobs(hidden @ weight.t(), tokens, 0.7)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
    assert (logp - exact).abs().max() > 1e-3


def test_head_blocks_split_the_vocabulary_on_cpu_only():
    """On CPU a block is 2048 vocabulary entries wide (its logits stay near the core); on an
    accelerator it is whole rows, at most CHUNK_ELEMENTS logits and the given rows."""
    from tether.ops.logprobs import CHUNK_ELEMENTS, head_blocks

    assert head_blocks(4500, torch.device("cpu"), 1024) == (1024, 2048)
    assert head_blocks(128000, torch.device("cpu"), 16384) == (CHUNK_ELEMENTS // 2048, 2048)
    assert head_blocks(300, torch.device("cpu"), 64) == (64, 300)
    assert head_blocks(128000, torch.device("cuda"), 1024) == (CHUNK_ELEMENTS // 128000, 128000)
    assert head_blocks(8192, torch.device("cuda"), 1024) == (1024, 8192)


@pytest.mark.parametrize("autocast", [False, True])
def test_head_logprobs_default_blocks_equal_materialised_logits(autocast):
    """A 4500-entry vocabulary on CPU runs as blocks of 2048, 2048 and 404 entries: logprobs,
    entropy and the gradients of h and W equal those through the materialised logits, in fp32
    (1e-5) and under bf16 autocast (the products in bf16 both ways, so to bf16's precision)."""
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 9, 32, generator=gen)
    weight = torch.randn(4500, 32, generator=gen) / 4
    tokens = torch.randint(0, 4500, (2, 9), generator=gen)
    tokens[0, :4] = torch.tensor([0, 2047, 2048, 4499])  # first and last entries of the blocks
    upstream = torch.randn(2, 9, generator=gen)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                logp, entropy = head_logprobs(h, w, None, tokens, 0.7, with_entropy=True)
            else:
                logp, entropy = token_logprobs(torch.nn.functional.linear(h, w), tokens, 0.7, with_entropy=True)
        (logp * upstream).sum().backward()
        results.append((logp, entropy, h.grad, w.grad))
    tolerance = 2e-2 if autocast else 1e-5
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain.to(fused.dtype), atol=tolerance, rtol=tolerance)
