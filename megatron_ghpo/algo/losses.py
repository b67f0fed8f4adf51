"""Policy-gradient loss math: clipped surrogate, k3 KL, aggregation, completion masks.

Shapes: ``B`` sequences in one micro-batch, ``T`` completion positions (padded). Every function
here is pure tensor math on whatever device its inputs live on.

How a step's loss is assembled from micro-batches (``LOSS_REDUCTION``):

* ``bnpo`` / ``grpo`` / ``dr_grpo`` -> ``"mean"``: each micro-batch value is already normalised
  within the micro-batch; the optimizer-step loss is the **mean** over the gradient-accumulation
  micro-batches and over the data-parallel ranks (the reference averages them the same way). In
  Megatron terms: return the value as is, let the schedule divide by ``num_microbatches`` and let
  the data-parallel gradient reduction average over ranks.
* ``dapo`` -> ``"sum"``: each micro-batch value is ``sum(l*m) / global_tokens`` where
  ``global_tokens`` counts the masked completion tokens of the whole global batch (all micro-batches
  on all DP ranks); the step loss is the **sum** over micro-batches and ranks, i.e. exactly the
  token mean over the global batch. In Megatron terms: undo the schedule's division by
  ``num_microbatches`` (multiply by it) and sum, not average, gradients over DP (multiply by the
  DP size when the gradient reduction averages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "dapo")

LOSS_REDUCTION: dict[str, str] = {
    "bnpo": "mean",
    "grpo": "mean",
    "dr_grpo": "mean",
    "dapo": "sum",
}
"""How per-micro-batch values of :func:`aggregate_loss` combine into the step loss across
gradient-accumulation micro-batches and data-parallel ranks (see the module docstring)."""


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


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    max_completion_length: int | None = None,
    global_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss of ONE micro-batch from per-token losses [B, T] and a 0/1 mask [B, T].

    * ``bnpo``: ``sum(l·m) / sum(m)`` over this micro-batch (count clamped to ≥ 1).
    * ``grpo``: mean over sequences of each sequence's masked token mean.
    * ``dr_grpo``: ``sum(l·m) / (B · max_completion_length)``.
    * ``dapo``: ``sum(l·m) / global_tokens`` (masked completion tokens of the whole global batch,
      all micro-batches and DP ranks; 0 only when every token is masked, giving a zero loss).

    Combine micro-batch values per ``LOSS_REDUCTION[loss_type]``.
    """
    _check_2d("per_token_loss", per_token_loss)
    _check_2d("mask", mask, per_token_loss.shape)
    m = mask.to(per_token_loss.dtype)
    total = (per_token_loss * m).sum()
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        per_seq = (per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean()
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length <= 0:
            raise ValueError(
                f"loss_type dr_grpo needs max_completion_length > 0, got {max_completion_length!r}"
            )
        return total / (per_token_loss.shape[0] * max_completion_length)
    if loss_type == "dapo":
        if global_tokens is None:
            raise ValueError(
                "loss_type dapo needs global_tokens (masked completion tokens of the global batch)"
            )
        g = torch.as_tensor(global_tokens, dtype=per_token_loss.dtype, device=per_token_loss.device)
        if not isinstance(global_tokens, torch.Tensor) and global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {float(g)}")
        # wiring check (a per-micro-batch count passed by mistake); host tensors only, so it never
        # forces a device synchronisation inside the pipeline schedule
        if m.device.type == "cpu" and bool(g < m.sum()):
            raise ValueError(
                f"global_tokens ({float(g):.0f}) is smaller than this micro-batch's masked tokens "
                f"({float(m.sum()):.0f}); pass the count over the whole global batch"
            )
        return total / g.clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


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
