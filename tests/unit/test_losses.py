"""Clipped surrogate, k3 KL, every loss aggregation and the completion mask, against hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ghpo.algo import (
    LOSS_TYPES,
    StepCounts,
    completion_mask,
    k3_kl,
    masked_mean,
    per_token_policy_loss,
    sequence_loss_weights,
    step_counts,
    weighted_loss,
)

pytestmark = pytest.mark.unit

# ratios ρ row 0: [1.0, 1.5, 0.5]   row 1: [1.0, 1.1, 0.7] ; advantages [2, -1] ; ε = 0.2
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.1, 0.7]], dtype=torch.float64)
ADV = torch.tensor([2.0, -1.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
# row 0 (A=2):  ρA = [2, 3, 1], clip(ρ)A = [2, 2.4, 1.6] -> min [2, 2.4, 1] -> loss [-2, -2.4, -1]
# row 1 (A=-1): ρA = [-1, -1.1, -0.7], clip(ρ)A = [-1, -1.1, -0.8] -> min [-1, -1.1, -0.8] -> loss [1, 1.1, 0.8]
LOSS = torch.tensor([[-2.0, -2.4, -1.0], [1.0, 1.1, 0.8]], dtype=torch.float64)


def _loss(**kw):
    logp = torch.log(RATIOS)
    old = torch.zeros_like(logp)
    return per_token_policy_loss(logp, old, ADV, **kw)


def test_clipped_surrogate_hand_values():
    loss, m = _loss(epsilon=0.2)
    torch.testing.assert_close(loss, LOSS)
    # ρ=1.5 > 1.2 with A>0 is clipped high; ρ=0.7 < 0.8 with A<0 is clipped low; ρ=0.5 with A>0 is not
    torch.testing.assert_close(m["clipped_high"], torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(m["clipped_low"], torch.tensor([[0, 0, 0], [0, 0, 1]], dtype=torch.float64))
    torch.testing.assert_close(m["clipped"], m["clipped_high"] + m["clipped_low"])
    assert "kl" not in m


def test_epsilon_high_widens_upper_clip_only():
    loss, m = _loss(epsilon=0.2, epsilon_high=0.6)
    expected = LOSS.clone()
    expected[0, 1] = -3.0  # clip(1.5, 0.8, 1.6) = 1.5 -> min(3, 3) = 3
    torch.testing.assert_close(loss, expected)
    assert m["clipped_high"].sum() == 0 and m["clipped_low"].sum() == 1


def test_k3_kl_hand_values_and_beta():
    # ref = old = 0, so k3 = exp(-log ρ) + log ρ - 1 = 1/ρ + ln ρ - 1
    k = k3_kl(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.log(torch.tensor([[1.0, 1.5, 0.5]], dtype=torch.float64)),
    )
    torch.testing.assert_close(
        k, torch.tensor([[0.0, 1 / 1.5 + math.log(1.5) - 1, 2 + math.log(0.5) - 1]], dtype=torch.float64)
    )
    assert abs(k[0, 1].item() - 0.0721318) < 1e-6 and abs(k[0, 2].item() - 0.3068528) < 1e-6
    loss, m = _loss(epsilon=0.2, beta=0.1, ref_logprobs=torch.zeros(2, 3, dtype=torch.float64))
    kl_row1 = [0.0, 1 / 1.1 + math.log(1.1) - 1, 1 / 0.7 + math.log(0.7) - 1]
    expected = LOSS + 0.1 * torch.tensor([[0.0, 0.0721318, 0.3068528], kl_row1], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, atol=1e-7, rtol=0)
    assert m["kl"].shape == (2, 3) and bool((m["kl"] >= 0).all())


def test_beta_requires_ref_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss(beta=0.1)


def _step_loss(loss, mask, loss_type, *, unit_size=None, max_completion_length=None, parts=((0, 2),)):
    """The step loss of LOSS/MASK as the sum of its micro-batch parts (row ranges ``parts``)."""
    counts = mask.sum(-1).tolist()
    w = sequence_loss_weights(counts, loss_type=loss_type, totals=step_counts(counts, unit_size=unit_size),
                              unit_size=unit_size, max_completion_length=max_completion_length)
    return sum(weighted_loss(loss[a:b], mask[a:b], w[a:b]) for a, b in parts)


def test_normalisations_hand_values():
    # sum(l*m) = -2 - 2.4 + 1 + 1.1 + 0.8 = -1.5 over 5 tokens; per-sequence sums -4.4 (2 tokens), 2.9 (3)
    assert _step_loss(LOSS, MASK, "bnpo").item() == pytest.approx(-0.3)  # one unit: the token mean
    # units of one sequence each: the mean of the sequences' token means (the reference with one
    # sequence per micro-batch)
    assert _step_loss(LOSS, MASK, "bnpo", unit_size=1).item() == pytest.approx((-2.2 + 2.9 / 3) / 2)
    assert _step_loss(LOSS, MASK, "grpo").item() == pytest.approx((-2.2 + 2.9 / 3) / 2)
    assert _step_loss(LOSS, MASK, "dr_grpo", max_completion_length=4).item() == pytest.approx(-1.5 / 8)
    assert _step_loss(LOSS, MASK, "dapo").item() == pytest.approx(-0.3)
    assert set(LOSS_TYPES) == {"bnpo", "grpo", "dr_grpo", "dapo"}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step_loss_does_not_depend_on_the_micro_batch_split(loss_type):
    """One micro-batch of both rows, or one per row: the same step loss (weights fixed over the step)."""
    kw = {"unit_size": 1, "max_completion_length": 4}
    whole = _step_loss(LOSS, MASK, loss_type, **kw)
    split = _step_loss(LOSS, MASK, loss_type, parts=((0, 1), (1, 2)), **kw)
    assert whole.item() == pytest.approx(split.item())


def test_bnpo_units_are_consecutive_runs_and_count_empty_units():
    # 4 sequences, units of 2: unit 0 = rows 0-1 (3 tokens), unit 1 = rows 2-3 (all masked)
    counts = [1, 2, 0, 0]
    w = sequence_loss_weights(counts, loss_type="bnpo", totals=step_counts(counts, unit_size=2), unit_size=2)
    torch.testing.assert_close(w, torch.tensor([1 / 6, 1 / 6, 1.0 / 2, 1.0 / 2], dtype=torch.float64))
    assert step_counts(counts, unit_size=3) == StepCounts(tokens=3.0, sequences=4.0, units=2.0)
    # counts summed over two data-parallel ranks: this rank's unit is one of four
    w = sequence_loss_weights([2, 2], loss_type="bnpo", totals=StepCounts(tokens=9, sequences=8, units=4), unit_size=2)
    torch.testing.assert_close(w, torch.full((2,), 1 / 16, dtype=torch.float64))


def test_normalisation_errors():
    one = step_counts([2, 3], unit_size=None)
    with pytest.raises(ValueError, match="max_completion_length"):
        sequence_loss_weights([2, 3], loss_type="dr_grpo", totals=one)
    with pytest.raises(ValueError, match="smaller than"):
        sequence_loss_weights([2, 3], loss_type="dapo", totals=StepCounts(tokens=3, sequences=2, units=1))
    with pytest.raises(ValueError, match="smaller than"):
        sequence_loss_weights([2, 3], loss_type="grpo", totals=StepCounts(tokens=5, sequences=1, units=1))
    with pytest.raises(ValueError, match="smaller than"):
        sequence_loss_weights([2, 3], loss_type="bnpo", totals=one, unit_size=1)
    with pytest.raises(ValueError, match="loss_type"):
        sequence_loss_weights([2, 3], loss_type="sum", totals=one)
    with pytest.raises(ValueError, match="unit_size"):
        step_counts([2, 3], unit_size=0)
    with pytest.raises(ValueError, match="shape"):
        weighted_loss(LOSS, MASK[:, :2], torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        weighted_loss(LOSS, MASK, torch.ones(3))


def test_gradient_of_on_policy_surrogate_is_minus_advantage():
    """With old = None (ρ ≡ 1) d loss / d logp = -A·m / sum(m) for bnpo."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.1]], dtype=torch.float64, requires_grad=True)
    loss, _ = per_token_policy_loss(logp, None, ADV)
    torch.testing.assert_close(loss.detach(), -ADV.unsqueeze(1).expand(2, 3))
    counts = MASK.sum(-1).tolist()
    w = sequence_loss_weights(counts, loss_type="bnpo", totals=step_counts(counts, unit_size=None))
    weighted_loss(loss, MASK, w).backward()
    expected = -ADV.unsqueeze(1) * MASK / 5
    torch.testing.assert_close(logp.grad, expected)


def test_completion_mask_lists_and_tensor():
    ids = [[5, 0, 7, 0], [1, 2], [3, 3, 3]]
    torch.testing.assert_close(
        completion_mask(ids, 0), torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    )
    # no EOS in rows 1 and 2 -> truncated when not told otherwise
    torch.testing.assert_close(
        completion_mask(ids, 0, mask_truncated_completions=True),
        torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
    )
    torch.testing.assert_close(
        completion_mask(ids, 0, truncated=[False, False, True], mask_truncated_completions=True),
        torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]),
    )
    # several stop ids; the first one that occurs ends the completion
    torch.testing.assert_close(completion_mask([[4, 9, 0, 1]], [0, 9]), torch.tensor([[1, 1, 0, 0]]))
    t = torch.tensor([[7, 7, 0, 0], [0, 1, 1, 1]])
    torch.testing.assert_close(completion_mask(t, 0), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    assert completion_mask([], 0).shape == (0, 0)
    with pytest.raises(ValueError, match="eos_token_id"):
        completion_mask(ids, [])


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert masked_mean(x, MASK).item() == pytest.approx((1 + 2 + 4 + 5 + 6) / 5)
    torch.testing.assert_close(masked_mean(x, MASK, dim=1), torch.tensor([1.5, 5.0]))
    assert masked_mean(x, torch.zeros_like(MASK)).item() == 0.0
