"""Pure tensor maths for RLHF; imports only torch."""

from tether.ops.logprobs import token_logprobs
from tether.ops.losses import bradley_terry_loss, clipped_policy_loss, clipped_value_loss
from tether.ops.masks import (
    ended_on_stop,
    first_true_indices,
    lengths_to_mask,
    position_ids_from_mask,
    response_lengths,
    truncate_response,
)
from tether.ops.rewards import AdaptiveKLController, gae, kl_estimate, shape_rewards
from tether.ops.stats import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "ended_on_stop",
    "first_true_indices",
    "gae",
    "kl_estimate",
    "lengths_to_mask",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "position_ids_from_mask",
    "response_lengths",
    "shape_rewards",
    "token_logprobs",
    "truncate_response",
]
