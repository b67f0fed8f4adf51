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
    LOSS_TYPES,
    StepCounts,
    completion_mask,
    k3_kl,
    masked_mean,
    masked_sum,
    per_token_policy_loss,
    sequence_loss_weights,
    step_counts,
    weighted_loss,
)

__all__ = [
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "StepCounts",
    "completion_mask",
    "group_advantages",
    "informative_group_indices",
    "k3_kl",
    "masked_mean",
    "masked_sum",
    "normalize_scale_rewards",
    "per_token_policy_loss",
    "reward_moments",
    "sequence_loss_weights",
    "std_from_moments",
    "step_counts",
    "weighted_loss",
    "zero_variance_groups",
]
