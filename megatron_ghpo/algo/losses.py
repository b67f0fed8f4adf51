"""Policy-gradient loss math: clipped surrogate, k3 KL, layout-free normalisation, completion masks.

Shapes: ``B`` sequences in one micro-batch, ``T`` completion positions (padded). Every function
here is pure tensor math on whatever device its inputs live on.

How a step's loss is normalised. The step loss is a weighted sum over every completion token of
the optimizer step (all micro-batches, all data-parallel ranks)::

    L = sum_i w_i * sum_t l_it * m_it

with one weight ``w_i`` per sequence, fixed from counts over the **whole step** before any
micro-batch is formed (:func:`sequence_loss_weights`). Which sequences share a micro-batch
(length grouping, packing, shared-prompt rows, micro-batch size) therefore changes neither the
loss nor its gradient. Per ``loss_type``:

* ``bnpo``: ``w_i = 1 / (U * n_u)``: the token mean of each normalisation unit ``u`` (``unit_size``
  consecutive completions of a replica's step, in sample order: the reference's per-device
  micro-batch of ``per_device_train_batch_size`` sequences, one group of G in the seed recipe),
  averaged over the ``U`` units of the step. This is the reference's weighting (per-micro-batch
  token mean, averaged over gradient-accumulation steps and data-parallel ranks) whatever our own
  micro-batch layout is;
* ``grpo``: ``w_i = 1 / (N * n_i)``: each sequence's token mean, averaged over the ``N`` sequences;
* ``dr_grpo``: ``w_i = 1 / (N * max_completion_length)``;
* ``dapo``: ``w_i = 1 / n``: the token mean over the ``n`` completion tokens of the step (also the
  SFT normaliser).

``n_i`` counts the masked completion tokens of sequence ``i`` (clamped to >= 1: a fully masked
sequence or unit contributes 0 but still counts in ``N`` / ``U``, as in the reference's means).
In Megatron terms each micro-batch returns its part of the sum; the loss handed to the schedule is
multiplied by ``num_microbatches * dp`` so that the schedule's division by the number of
micro-batches and the data-parallel gradient averaging cancel, leaving the gradient of ``L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class StepCounts:
    """Counts over a whole optimizer step (summed over data-parallel ranks) that fix the weights."""

    tokens: float
    """Masked completion tokens."""
    sequences: float
    """Sequences (completions)."""
    units: float
    """``bnpo`` normalisation units (see the module docstring)."""

    def as_list(self) -> list[float]:
        return [self.tokens, self.sequences, self.units]


def _units(n: int, unit_size: int | None) -> list[range]:
    """Consecutive index ranges of the normalisation units of ``n`` sequences."""
    if unit_size is not None and unit_size < 1:
        raise ValueError(f"unit_size must be >= 1 or None, got {unit_size}")
    size = n if unit_size is None else unit_size
    return [range(a, min(a + size, n)) for a in range(0, n, max(size, 1))]


def step_counts(token_counts: Sequence[float], *, unit_size: int | None) -> StepCounts:
    """This replica's counts; all-reduce :meth:`StepCounts.as_list` over data-parallel ranks for the step's."""
    return StepCounts(tokens=float(sum(token_counts)), sequences=float(len(token_counts)),
                      units=float(len(_units(len(token_counts), unit_size))))


def sequence_loss_weights(
    token_counts: Sequence[float],
    *,
    loss_type: str,
    totals: StepCounts,
    unit_size: int | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """One weight per sequence (float64 ``[len(token_counts)]``) so that the step loss is
    ``sum_i w_i sum_t l_it m_it`` (module docstring).

    ``token_counts``: masked completion tokens of this replica's sequences, in sample order;
    ``totals``: :class:`StepCounts` of the whole step (all data-parallel ranks); ``unit_size``:
    ``bnpo``'s unit (None: all of this replica's sequences form one unit).
    """
    n = torch.tensor([float(c) for c in token_counts], dtype=torch.float64)
    if bool((n < 0).any()):
        raise ValueError("token_counts must be >= 0")
    if loss_type == "bnpo":
        units = _units(len(n), unit_size)
        if totals.units < len(units):
            raise ValueError(f"totals.units ({totals.units:.0f}) is smaller than this replica's {len(units)} units; "
                             "pass the counts summed over data-parallel ranks")
        w = torch.empty_like(n)
        for u in units:
            w[u.start : u.stop] = 1.0 / (totals.units * n[u.start : u.stop].sum().clamp(min=1.0))
        return w
    if loss_type in ("grpo", "dr_grpo") and totals.sequences < len(n):
        raise ValueError(f"totals.sequences ({totals.sequences:.0f}) is smaller than this replica's {len(n)}; "
                         "pass the counts summed over data-parallel ranks")
    if loss_type == "grpo":
        return 1.0 / (totals.sequences * n.clamp(min=1.0))
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length <= 0:
            raise ValueError(f"loss_type dr_grpo needs max_completion_length > 0, got {max_completion_length!r}")
        return torch.full_like(n, 1.0 / (totals.sequences * max_completion_length))
    if loss_type == "dapo":
        if totals.tokens < float(n.sum()):
            raise ValueError(f"totals.tokens ({totals.tokens:.0f}) is smaller than this replica's {float(n.sum()):.0f} "
                             "masked tokens; pass the counts summed over data-parallel ranks")
        return torch.full_like(n, 1.0 / max(totals.tokens, 1.0))
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check_2d(name: str, t: torch.Tensor, shape: torch.Size | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a [B, T] tensor, got {got}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (same as logprobs)")


def k3_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): ``exp(r - p) - (r - p) - 1`` (≥ 0), shape of inputs."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def per_token_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO-clipped surrogate plus ``beta`` × k3 KL.

    Args:
        logprobs: [B, T] log-probs of the completion tokens under the current policy (with grad).
        old_logprobs: [B, T] log-probs at sampling time; ``None`` means one iteration per
            generation (ρ ≡ 1 numerically, computed as ``exp(logprobs - logprobs.detach())``).
        advantages: [B] one advantage per sequence.
        epsilon: lower clip ε (ρ ≥ 1 − ε).
        epsilon_high: upper clip (ρ ≤ 1 + ε_high); ``None`` uses ``epsilon``.
        beta: KL coefficient; 0 disables the KL term (``ref_logprobs`` is then ignored).
        ref_logprobs: [B, T] reference-model log-probs, required when ``beta > 0``.

    Returns:
        ``(loss, metrics)``: loss [B, T] = ``-min(ρA, clip(ρ, 1-ε, 1+ε_high)A) + β·k3``;
        metrics, each [B, T] and detached: ``ratio``, ``clipped_low`` (ρ < 1−ε and A < 0),
        ``clipped_high`` (ρ > 1+ε_high and A > 0), ``clipped`` (either), and ``kl`` when
        ``ref_logprobs`` is given.
    """
    _check_2d("logprobs", logprobs)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    _check_2d("old_logprobs", old_logprobs, logprobs.shape)
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon < 0 or eps_high < 0:
        raise ValueError(f"epsilon ({epsilon}) and epsilon_high ({eps_high}) must be >= 0")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (reference-model log-probs of the trained tokens)")

    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high) * adv
    loss = -torch.min(surr, surr_clipped)

    metrics: dict[str, torch.Tensor] = {"ratio": ratio.detach()}
    low = (ratio < 1.0 - epsilon) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics["clipped_low"] = low.to(logprobs.dtype)
    metrics["clipped_high"] = high.to(logprobs.dtype)
    metrics["clipped"] = (low | high).to(logprobs.dtype)
    if ref_logprobs is not None:
        _check_2d("ref_logprobs", ref_logprobs, logprobs.shape)
        kl = k3_kl(ref_logprobs, logprobs)
        metrics["kl"] = kl.detach()
        if beta > 0:
            loss = loss + beta * kl
    return loss, metrics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x * mask`` (over ``dim`` or everything)."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (count clamped to ≥ 1, so all-masked → 0)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def weighted_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """This micro-batch's part of the step loss: ``sum_i weights_i * sum_t loss_it * mask_it``.

    ``weights`` [B] come from :func:`sequence_loss_weights` (counts over the whole step), so the
    micro-batch parts add up to the step loss whatever the layout."""
    _check_2d("per_token_loss", per_token_loss)
    _check_2d("mask", mask, per_token_loss.shape)
    if weights.dim() != 1 or weights.shape[0] != per_token_loss.shape[0]:
        raise ValueError(f"weights must be [B]={per_token_loss.shape[0]}, got {tuple(weights.shape)}")
    per_seq = (per_token_loss * mask.to(per_token_loss.dtype)).sum(-1)
    return (per_seq * weights.to(per_token_loss.dtype)).sum()


def _eos_set(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
    return ids


def completion_mask(
    completion_ids: list[list[int]] | torch.Tensor,
    eos_token_id: int | Sequence[int],
    *,
    truncated: list[bool] | None = None,
    mask_truncated_completions: bool = False,
) -> torch.Tensor:
    """0/1 int64 mask [B, T]: 1 up to and including the first EOS of each completion.

    ``completion_ids`` is either ragged lists (padded positions get 0; ``T`` = longest list) or a
    [B, T] tensor (positions after the first EOS get 0; a row without EOS is all 1, so pad a tensor
    with the EOS id or pass lists). ``eos_token_id`` may list several stop ids.

    With ``mask_truncated_completions`` a truncated completion is masked entirely: the flag per row
    comes from ``truncated`` (e.g. ``finish_reason == "length"``) or, when ``truncated`` is None,
    from the row containing no EOS.
    """
    eos = _eos_set(eos_token_id)
    if isinstance(completion_ids, torch.Tensor):
        _check_2d("completion_ids", completion_ids)
        ids = completion_ids
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        rows = [list(r) for r in completion_ids]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), -1, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                valid[i, : len(r)] = True
    b, t = ids.shape
    if b == 0 or t == 0:
        return torch.zeros((b, t), dtype=torch.long, device=ids.device)
    is_eos = torch.isin(ids, torch.tensor(eos, dtype=ids.dtype, device=ids.device)) & valid
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((b,), t, device=ids.device))
    pos = torch.arange(t, device=ids.device).unsqueeze(0)
    mask = (pos <= first.unsqueeze(1)) & valid
    if mask_truncated_completions:
        if truncated is None:
            trunc = ~has_eos
        else:
            if len(truncated) != b:
                raise ValueError(f"truncated has {len(truncated)} entries for {b} completions")
            trunc = torch.tensor([bool(x) for x in truncated], dtype=torch.bool, device=ids.device)
        mask = mask & ~trunc.unsqueeze(1)
    return mask.long()
