"""Forward-only passes through the pipeline: per-token log-probs for a batch, and full logits.

Both run Megatron's schedule with ``forward_only=True`` (so PP/VPP work unchanged) and broadcast
the result from the last pipeline stage, so every rank returns the same values.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_ghpo.policy.batching import MicroBatch
from megatron_ghpo.policy.step import LossSpec, run_schedule


def pad_for_interleaving(items: list, num_chunks: int) -> list:
    """Megatron's interleaved (virtual pipeline) schedule needs a multiple of PP micro-batches;
    forward-only passes repeat the last one (its results are identical and ignored)."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if num_chunks > 1 and len(items) % pp:
        items = items + [items[-1]] * (pp - len(items) % pp)
    return items


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            t, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=parallel_state.get_pipeline_model_parallel_group()
        )
    return t


@torch.no_grad()
def batch_logprobs(
    model_chunks: list, micro_batches: list[MicroBatch], spec: LossSpec, *, num_samples: int, lengths: list[int], device: torch.device
) -> tuple[list[list[float]], list[list[float]] | None]:
    """Per-sample completion log-probs (and entropies when ``spec.with_entropy``), in sample order.

    ``lengths[i]``: completion length of sample ``i``. Returns python lists (identical on every rank).
    """
    for c in model_chunks:
        c.eval()
    reports = run_schedule(model_chunks, pad_for_interleaving(micro_batches, len(model_chunks)), spec, forward_only=True,
                           device=device)  # fmt: skip
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    fields = 2 if spec.with_entropy else 1
    flat = torch.zeros(fields, offsets[-1], dtype=torch.float32, device=device)
    for mb, rep in zip(micro_batches, reports):
        for row, i in enumerate(mb.sample_index):
            flat[0, offsets[i] : offsets[i + 1]] = rep["logprobs"][row, : lengths[i]]
            if spec.with_entropy:
                flat[1, offsets[i] : offsets[i + 1]] = rep["entropy"][row, : lengths[i]]
    _broadcast_from_last_stage(flat)
    rows = flat.cpu().tolist()
    split = [[r[offsets[i] : offsets[i + 1]] for i in range(num_samples)] for r in rows]
    return split[0], (split[1] if spec.with_entropy else None)


def _gather_logits_fn(vocab_size: int, output: torch.Tensor, non_loss_data: bool = False):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(output)[..., :vocab_size].float()


def _logits_step(device: torch.device, vocab_size: int, data_iterator, model):
    tokens = next(data_iterator).to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None), partial(_gather_logits_fn, vocab_size)


@torch.no_grad()
def full_logits(model_chunks: list, tokens: torch.Tensor, *, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Full-vocabulary logits ``[B, S, vocab_size]`` (fp32, on CPU) of ``tokens`` [B, S], on every rank.

    Gathers the vocabulary over TP — meant for verification (``convert verify``, parity tests),
    not for training.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for c in model_chunks:
        c.eval()
    interleaved = len(model_chunks) > 1
    inputs = pad_for_interleaving([tokens], len(model_chunks))
    iterators = [iter(inputs) for _ in model_chunks]
    store = get_forward_backward_func()(
        forward_step_func=partial(_logits_step, device, vocab_size),
        data_iterator=iterators if interleaved else iterators[0],
        model=model_chunks if interleaved else model_chunks[0],
        num_microbatches=len(inputs),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    out = store[0] if store else torch.zeros(*tokens.shape, vocab_size, device=device)
    return _broadcast_from_last_stage(out.contiguous()).cpu()
