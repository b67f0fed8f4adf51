"""Group-relative advantages in every scale mode, NaN handling, DAPO zero-variance detection."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ghpo.algo import (
    group_advantages,
    informative_group_indices,
    reward_moments,
    std_from_moments,
    zero_variance_groups,
)

pytestmark = pytest.mark.unit

R = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])


def test_group_scaling_hand_values():
    a = group_advantages(R, "group")
    # group 0: mean 0.25, unbiased var = (0.75² + 3·0.25²)/3 = 0.25 -> std 0.5
    torch.testing.assert_close(a[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)
    # group 1: mean 0.5, var = 4·0.25/3 -> std sqrt(1/3)
    torch.testing.assert_close(a[1], torch.tensor([0.5, 0.5, -0.5, -0.5]) / (math.sqrt(1 / 3) + 1e-4))
    # group 2: all equal -> zero advantages (0 / 1e-4)
    torch.testing.assert_close(a[2], torch.zeros(4))


def test_batch_scaling_uses_one_std_over_all_rewards():
    a = group_advantages(R, "batch")
    vals = R.flatten().tolist()
    mean = sum(vals) / 12  # 5/12
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 11)
    # squared deviations: 3·(7/12)² + 5·(5/12)² + 4·(1/12)² = 23/12 -> var = 23/132
    assert std == pytest.approx(math.sqrt(23 / 132), abs=1e-12)
    torch.testing.assert_close(a[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    torch.testing.assert_close(a[1], torch.tensor([0.5, 0.5, -0.5, -0.5]) / (std + 1e-4))


def test_batch_std_from_all_reduced_moments_matches_single_process():
    # two "ranks" hold one half each; summing their moments reproduces the full-batch std
    m = reward_moments(R[:2]) + reward_moments(R[2:])
    std = std_from_moments(m)
    assert std.item() == pytest.approx(R.flatten().std().item(), rel=1e-6)
    torch.testing.assert_close(
        group_advantages(R[:2], "batch", batch_std=std), group_advantages(R, "batch")[:2]
    )


def test_no_scaling_and_bool_aliases():
    torch.testing.assert_close(group_advantages(R, "none")[1], torch.tensor([0.5, 0.5, -0.5, -0.5]))
    torch.testing.assert_close(group_advantages(R, True), group_advantages(R, "group"))
    torch.testing.assert_close(group_advantages(R, False), group_advantages(R, "none"))


def test_nan_rewards_count_as_zero():
    r = torch.tensor([[float("nan"), 1.0, 0.0, 1.0]])
    a = group_advantages(r, "group")
    torch.testing.assert_close(a, torch.tensor([[-0.5, 0.5, -0.5, 0.5]]) / (math.sqrt(1 / 3) + 1e-4))
    assert not torch.isnan(a).any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(R, "std")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(R[:, :1], "group")
    with pytest.raises(ValueError, match="infinite"):
        group_advantages(torch.tensor([[1.0, float("inf")]]), "group")
    with pytest.raises(ValueError, match=r"\[num_groups, G\]"):
        group_advantages(torch.ones(4), "group")


def test_zero_variance_groups():
    r = torch.tensor([[1.0, 1.0], [0.0, float("nan")], [0.0, 1.0]])
    assert zero_variance_groups(r).tolist() == [True, True, False]
    assert informative_group_indices(r) == [2]
