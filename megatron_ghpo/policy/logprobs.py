"""Log-probs and entropy of chosen tokens from vocabulary-parallel logits (no vocabulary gather).

Each tensor-parallel rank holds logits for a contiguous slice of the (padded) vocabulary:
``[N, V/TP]``. Log-softmax needs the global max and sum over the vocabulary; both are single
all-reduces of ``[N]`` tensors over the TP group, so the ``[N, V]`` logits are never assembled.

Sampling temperature ``τ`` is applied exactly as the rollout engine samples: logits / τ before the
softmax. Vocabulary padding rows (ids ≥ the tokenizer's ``vocab_size``) are excluded from the
softmax, because the rollout engine's distribution has no such tokens.
"""

from __future__ import annotations

import torch


def _tp_info(tp_group) -> tuple[int, int]:
    from megatron.core import parallel_state

    if tp_group is None:
        return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    return torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


def prepare_vocab_parallel_logits(
    logits: torch.Tensor, *, temperature: float, vocab_size: int | None, tp_group=None
) -> torch.Tensor:
    """``logits / temperature`` in fp32 with padded-vocabulary columns set to ``-inf``.

    ``logits``: [N, V/TP] this rank's vocabulary slice. Returns a new [N, V/TP] tensor (with grad
    when ``logits`` has one).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rank, _world = _tp_info(tp_group)
    out = logits.float()
    out = out / temperature if temperature != 1.0 else out.clone()
    if vocab_size is not None:
        part = logits.shape[-1]
        start = rank * part
        if start + part > vocab_size:
            ids = torch.arange(start, start + part, device=logits.device)
            out = out.masked_fill(ids >= vocab_size, float("-inf"))
    return out


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Differentiable ``log softmax(logits / τ)[target]`` over the TP-sharded vocabulary.

    Args:
        logits: [N, V/TP] this rank's slice of the logits at the N predicting positions.
        targets: [N] global token ids (< ``vocab_size``).
        temperature: sampling temperature τ.
        vocab_size: the tokenizer's vocabulary size; ids at or above it are padding and get
            probability 0. ``None`` keeps every column.

    Returns:
        [N] fp32 log-probs, identical on every TP rank. Backward flows into ``logits`` through
        Megatron-Core's vocab-parallel cross entropy.
    """
    from megatron.core import tensor_parallel

    prepared = prepare_vocab_parallel_logits(logits, temperature=temperature, vocab_size=vocab_size)
    # vocab_parallel_cross_entropy modifies its input in place; ``prepared`` is our own copy.
    return -tensor_parallel.vocab_parallel_cross_entropy(prepared, targets)


@torch.no_grad()
def vocab_parallel_entropy(
    logits: torch.Tensor, *, temperature: float = 1.0, vocab_size: int | None = None, tp_group=None
) -> torch.Tensor:
    """Entropy of ``softmax(logits / τ)`` per position, over the TP-sharded vocabulary (no grad).

    ``H = log Z − Σ p·z`` with ``z = logits/τ − max``; one MAX and one SUM all-reduce of [N, 2].
    Returns [N] fp32, identical on every TP rank.
    """
    from megatron.core import parallel_state

    group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
    z = prepare_vocab_parallel_logits(logits, temperature=temperature, vocab_size=vocab_size, tp_group=tp_group)
    zmax = z.max(dim=-1).values
    torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)
    z = z - zmax.unsqueeze(-1)
    e = torch.exp(z)
    finite = torch.isfinite(z)
    sums = torch.stack([e.sum(-1), torch.where(finite, e * z, torch.zeros_like(z)).sum(-1)], dim=-1)
    torch.distributed.all_reduce(sums, group=group)
    sum_e, sum_ez = sums.unbind(-1)
    return torch.log(sum_e) - sum_ez / sum_e
