"""Rewards: math-verify accuracy in a timeout-enforcing process pool, format and open-r1-style rewards.

Every reward function has the TRL / open-r1 signature ``fn(completions, **columns) -> list[float | None]``.
"""

from megatron_ghpo.rewards.default_pool import close_default_pool, configure_default_pool, get_default_pool
from megatron_ghpo.rewards.functions import (
    accuracy_reward,
    completion_texts,
    format_reward,
    get_cosine_scaled_reward,
    get_soft_overlong_punishment,
    len_reward,
    reasoning_steps_reward,
    tag_count_reward,
)
from megatron_ghpo.rewards.pool import VerifierPool
from megatron_ghpo.rewards.pool_types import PoolClosedError, TaskResult, VerifierCounters, VerifierPoolError
from megatron_ghpo.rewards.registry import REGISTRY, REWARD_OPTIONS, get_reward_funcs, reward_name
from megatron_ghpo.rewards.scorer import RewardScorer

cosine_scaled_reward = get_cosine_scaled_reward()
"""The ``cosine`` reward with open-r1's default bounds (-1/-0.5 wrong, 0.5/1.0 correct, max_len 1000)."""
length_reward = len_reward
soft_overlong_punishment = get_soft_overlong_punishment
"""Factory (TRL's name): ``soft_overlong_punishment(max_completion_len, soft_punish_cache)`` -> reward function."""

__all__ = [
    "REGISTRY",
    "REWARD_OPTIONS",
    "PoolClosedError",
    "RewardScorer",
    "TaskResult",
    "VerifierCounters",
    "VerifierPool",
    "VerifierPoolError",
    "accuracy_reward",
    "close_default_pool",
    "completion_texts",
    "configure_default_pool",
    "cosine_scaled_reward",
    "format_reward",
    "get_cosine_scaled_reward",
    "get_default_pool",
    "get_reward_funcs",
    "get_soft_overlong_punishment",
    "len_reward",
    "length_reward",
    "reasoning_steps_reward",
    "reward_name",
    "soft_overlong_punishment",
    "tag_count_reward",
]
