"""Megatron's step contract: ``forward_step -> (output, partial(loss_fn, ...))`` run by
``get_forward_backward_func()`` over micro-batches, and the reduction of what the loss reports.

Loss normalisation (``megatron_ghpo.algo.losses``): every micro-batch returns its part of the step
loss, ``sum_i w_i sum_t l_it m_it`` with per-sequence weights fixed from counts over the whole step
(``MicroBatch.loss_weights``), for every ``loss_type`` and for SFT alike. The loss handed to Megatron
is multiplied by ``num_microbatches × dp`` so the schedule's division by the number of micro-batches
and the DDP gradient averaging over DP ranks cancel: the gradient is that of the sum over
micro-batches and ranks, whatever the micro-batch layout.

Only the last pipeline stage computes losses; its reports are summed over data-parallel ranks and
broadcast to the other stages, so every rank returns the same metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from megatron_ghpo.policy.batching import MicroBatch
from megatron_ghpo.policy.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_ghpo.policy.options import AlgorithmOptions

Mode = Literal["policy", "sft", "logprobs"]

REPORT_KEYS: dict[str, tuple[str, ...]] = {
    "policy": ("loss", "tokens", "entropy_sum", "clipped_sum", "clipped_low_sum", "clipped_high_sum", "ratio_sum", "kl_sum", "sequences",
               "rollout_diff_sum", "rollout_tokens"),
    "sft": ("loss", "tokens", "entropy_sum", "nll_sum", "sequences"),
    "logprobs": (),
}


@dataclass(kw_only=True)
class LossSpec:
    """What ``loss_fn`` computes for every micro-batch of one schedule run."""

    mode: Mode
    algorithm: AlgorithmOptions
    temperature: float
    vocab_size: int
    """The tokenizer's vocabulary; padded ids beyond it get probability 0."""
    loss_scale: float = 1.0
    """``num_microbatches × dp`` when training (see the module docstring)."""
    with_entropy: bool = False


def completion_logprobs(
    output: torch.Tensor, mb: MicroBatch, *, temperature: float, vocab_size: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[n, T]`` log-probs (with grad) and optional entropy of the completion tokens.

    ``output``: [R, S, V/TP] vocabulary-parallel logits of the micro-batch's rows. Only the N
    scoring positions are selected before the softmax: ``[N, V/TP]``, never ``[R·S, V]``.
    """
    flat = output.reshape(-1, output.shape[-1])
    rows = flat.index_select(0, mb.flat_index[mb.valid])
    lp_valid = vocab_parallel_logprobs(rows, mb.targets[mb.valid], temperature=temperature, vocab_size=vocab_size)
    where = mb.valid.nonzero(as_tuple=True)
    logprobs = torch.zeros(mb.valid.shape, dtype=lp_valid.dtype, device=lp_valid.device).index_put(where, lp_valid)
    entropy = None
    if with_entropy:
        ent_valid = vocab_parallel_entropy(rows.detach(), temperature=temperature, vocab_size=vocab_size)
        entropy = torch.zeros(mb.valid.shape, dtype=ent_valid.dtype, device=ent_valid.device).index_put(where, ent_valid)
    return logprobs, entropy


def loss_fn(spec: LossSpec, mb: MicroBatch, output: torch.Tensor):
    """Megatron loss function: ``(loss_for_backward, report)``; report values are detached sums."""
    from megatron_ghpo.algo.losses import per_token_policy_loss, weighted_loss

    logprobs, entropy = completion_logprobs(
        output, mb, temperature=spec.temperature, vocab_size=spec.vocab_size, with_entropy=spec.with_entropy
    )
    if spec.mode == "logprobs":
        report = {"logprobs": logprobs.detach()}
        if entropy is not None:
            report["entropy"] = entropy
        return output.new_zeros(()), report
    mask = mb.loss_mask
    if mb.loss_weights is None:
        raise ValueError("a training micro-batch needs loss_weights (make_micro_batches(..., loss_weights=...))")
    tokens = mask.sum()
    report: dict[str, torch.Tensor] = {"tokens": tokens, "sequences": torch.tensor(float(mb.num_sequences))}
    report["entropy_sum"] = (entropy * mask).sum() if entropy is not None else torch.zeros(())
    if spec.mode == "sft":
        loss = weighted_loss(-logprobs, mask, mb.loss_weights)
        report["nll_sum"] = -(logprobs.detach() * mask).sum()
    else:
        a = spec.algorithm
        per_token, metrics = per_token_policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
            beta=a.beta, ref_logprobs=mb.ref_logprobs,
        )  # fmt: skip
        loss = weighted_loss(per_token, mask, mb.loss_weights)
        for key in ("clipped", "clipped_low", "clipped_high", "ratio", "kl"):
            report[f"{key}_sum"] = (metrics[key] * mask).sum() if key in metrics else torch.zeros(())
        if mb.rollout_logprobs is not None:  # train/inference mismatch on the very tokens trained
            seen = mask * mb.rollout_present.unsqueeze(1)
            report["rollout_diff_sum"] = ((logprobs.detach() - mb.rollout_logprobs).abs() * seen).sum()
            report["rollout_tokens"] = seen.sum()
        else:
            report["rollout_diff_sum"] = report["rollout_tokens"] = torch.zeros(())
    report["loss"] = loss.detach().clone()
    return loss * spec.loss_scale, {k: v.detach().float().cpu() for k, v in report.items()}


def forward_step(spec: LossSpec, device: torch.device, data_iterator: Iterator[MicroBatch], model):
    """Megatron forward step: run the chunk on the next micro-batch, defer the loss."""
    from megatron_ghpo.policy.rope import rope_at_positions

    mb = next(data_iterator).to(device)
    with rope_at_positions(model, mb.position_ids if mb.rope_positions else None):
        output = model(mb.tokens, mb.position_ids, mb.attention_mask)
    return output, partial(loss_fn, spec, mb)


def run_schedule(
    model_chunks: list, micro_batches: list[MicroBatch], spec: LossSpec, *, forward_only: bool, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Run Megatron's pipeline schedule; returns the loss reports (last stage only, else [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("no micro-batches to run")
    fb = get_forward_backward_func()
    interleaved = len(model_chunks) > 1
    iterators = [iter(micro_batches) for _ in model_chunks]
    seq_length = max(mb.tokens.shape[1] for mb in micro_batches)
    rows = max(mb.tokens.shape[0] for mb in micro_batches)
    store = fb(
        forward_step_func=partial(forward_step, spec, device),
        data_iterator=iterators if interleaved else iterators[0],
        model=model_chunks if interleaved else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=rows,
        forward_only=forward_only,
    )
    return list(store or [])


def reduce_reports(reports: list[dict[str, torch.Tensor]], mode: Mode, *, device: torch.device) -> dict[str, float]:
    """Sum reports over micro-batches and DP ranks (``loss`` becomes the step loss); broadcast from
    the last PP stage to all ranks."""
    from megatron.core import parallel_state

    keys = REPORT_KEYS[mode]
    vec = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for r in reports:
        vec += torch.stack([r[k].double() for k in keys]).to(device)
    torch.distributed.all_reduce(vec, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            vec,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return dict(zip(keys, vec.tolist()))


def step_metrics(
    r: dict[str, float], *, mode: str, grad_norm: float, updated: bool, seconds: float, skipped_steps: int,
    algorithm: AlgorithmOptions,
) -> dict[str, float]:
    """The trainer-facing metrics of one step (``train/...``, ``perf/...``) from the reduced report."""
    tokens = max(r["tokens"], 1.0)
    out = {
        "train/loss": r["loss"],
        "train/grad_norm": grad_norm,
        "train/update_skipped": 0.0 if updated else 1.0,
        "train/skipped_steps": float(skipped_steps),
        "train/num_tokens": r["tokens"],
        "train/num_sequences": r["sequences"],
        "perf/train_step_s": seconds,
    }
    for key in ("input_tokens", "padded_tokens"):  # model input of this replica (prompts and padding included)
        if key in r:
            out[f"perf/{key}"] = r[key]
    if algorithm.compute_entropy:
        out["train/entropy"] = r["entropy_sum"] / tokens
    if mode == "sft":
        out["train/nll"] = r["nll_sum"] / tokens
    else:
        out["train/clip_ratio"] = r["clipped_sum"] / tokens
        out["train/clip_ratio_low"] = r["clipped_low_sum"] / tokens
        out["train/clip_ratio_high"] = r["clipped_high_sum"] / tokens
        out["train/ratio_mean"] = r["ratio_sum"] / tokens
        if algorithm.beta > 0:
            out["train/kl"] = r["kl_sum"] / tokens
        if r.get("rollout_tokens", 0.0) > 0:
            out["rollout/logprob_diff"] = r["rollout_diff_sum"] / r["rollout_tokens"]
    return out
