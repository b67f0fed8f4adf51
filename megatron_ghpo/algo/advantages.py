"""Group-relative advantages and DAPO dynamic-sampling helpers.

``rewards`` is always ``[num_groups, G]``: row ``i`` holds the G total rewards of group ``i``.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4
"""Added to the standard deviation before dividing (as the reference does)."""


def normalize_scale_rewards(scale_rewards: str | bool) -> str:
    """Map the config value to one of ``SCALE_REWARDS`` (``True`` → group, ``False`` → none)."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"scale_rewards must be one of {SCALE_REWARDS} (or true/false), got {scale_rewards!r}"
        )
    return scale_rewards


def clean_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards with NaN replaced by 0 (spec §2.5); ±inf is an error naming the group."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    inf = torch.isinf(rewards)
    if bool(inf.any()):
        g = int(inf.any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"reward of group {g} is infinite ({rewards[g].tolist()}); reward functions must be finite"
        )
    return torch.nan_to_num(rewards, nan=0.0)


def reward_moments(rewards: torch.Tensor) -> torch.Tensor:
    """float64 [3] = (count, sum, sum of squares) of the NaN-cleaned rewards; all-reduce (sum) it
    over data-parallel ranks and pass :func:`std_from_moments` of the result as ``batch_std``."""
    r = clean_rewards(rewards).to(torch.float64)
    return torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64), r.sum(), (r * r).sum()])


def std_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std from (count, sum, sum of squares)."""
    n, s, ss = (float(x) for x in moments.tolist())
    if n < 2:
        raise ValueError(f"batch std needs at least 2 rewards, got {n:.0f}")
    var = max((ss - s * s / n) / (n - 1), 0.0)
    return torch.tensor(var**0.5, dtype=torch.float32)


def group_advantages(
    rewards: torch.Tensor,
    scale_rewards: str | bool = "group",
    *,
    batch_std: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages [num_groups, G] = ``r − mean_G(r)``, optionally divided by ``std + 1e-4``.

    * ``group``: std of each group (Bessel-corrected, like ``torch.std``).
    * ``batch``: one std over every reward of the batch (Bessel-corrected): over ``rewards``, or
      ``batch_std`` when given (the global batch's std from all-reduced :func:`reward_moments`).
    * ``none``: no division (Dr. GRPO).

    NaN rewards count as 0. ``G`` must be ≥ 2.
    """
    mode = normalize_scale_rewards(scale_rewards)
    r = clean_rewards(rewards)
    if r.shape[1] < 2:
        raise ValueError(f"group-relative advantages need num_generations >= 2, got G={r.shape[1]}")
    adv = r - r.mean(dim=1, keepdim=True)
    if mode == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + STD_EPS)
    elif mode == "batch":
        std = r.std() if batch_std is None else torch.as_tensor(batch_std, dtype=r.dtype)
        adv = adv / (std + STD_EPS)
    return adv


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Bool [num_groups]: True where all G rewards of the group are equal (NaN counted as 0).

    Such groups have all-zero advantages and teach nothing; DAPO dynamic sampling drops them.
    """
    r = clean_rewards(rewards)
    return (r == r[:, :1]).all(dim=1)


def informative_group_indices(rewards: torch.Tensor) -> list[int]:
    """Indices of groups with non-zero reward variance (the ones dynamic sampling keeps)."""
    return [i for i, z in enumerate(zero_variance_groups(rewards).tolist()) if not z]
