"""Advantages and losses: pure tensor math, shapes documented per function."""

from megatron_ghpo.algo.advantages import (
    SCALE_REWARDS,
    group_advantages,
    informative_group_indices,
    normalize_scale_rewards,
    reward_moments,
    std_from_moments,
    zero_variance_groups,
)
from megatron_ghpo.algo.losses import (
    LOSS_REDUCTION,
    LOSS_TYPES,
    aggregate_loss,
    completion_mask,
    k3_kl,
    masked_mean,
    masked_sum,
    per_token_policy_loss,
)

__all__ = [
    "LOSS_REDUCTION",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "aggregate_loss",
    "completion_mask",
    "group_advantages",
    "informative_group_indices",
    "k3_kl",
    "masked_mean",
    "masked_sum",
    "normalize_scale_rewards",
    "per_token_policy_loss",
    "reward_moments",
    "std_from_moments",
    "zero_variance_groups",
]
