"""Batched autoregressive sampling with a transformers causal LM, returning sampled-token log-probs.

The per-token log-prob is taken from the distribution the token is drawn from:
``log_softmax(filter(logits / temperature))`` with top-k/top-p filtering, the same quantity the
vLLM engine reports in ``processed_logprobs`` mode; greedy rows report ``log_softmax(logits)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_ghpo.rollout.common import GREEDY_EPS


@dataclass(kw_only=True)
class RowResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_at: int | None = None
    """Character index where a stop string begins in the decoded text (text is cut there)."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and outside the smallest top-p nucleus.

    logits: [B, V] float32, already divided by the temperature. Returns a new [B, V] tensor.
    """
    out = logits.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def choose_tokens(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits: [B, V]. Returns (tokens [B] int64, log-probs [B] float32)."""
    logits = logits.float()
    if temperature < GREEDY_EPS:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logprobs = torch.log_softmax(filter_logits(logits / temperature, top_k, top_p), -1)
    probs = logprobs.exp()
    tokens = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def sample_rows(
    model: torch.nn.Module,
    rows: list[list[int]],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: list[int],
    eos_ids: set[int],
    pad_id: int,
    generators: list[torch.Generator],
    find_stop: Callable[[list[int]], int | None] | None = None,
) -> list[RowResult]:
    """Sample a completion for every row (left-padded batch, KV cache reused between steps).

    rows: B prompt token-id lists. ``max_new_tokens[b]`` caps row b. ``find_stop(tokens)`` returns the
    character index of a stop string in the decoded completion, or None.
    """
    device = next(model.parameters()).device
    batch, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = torch.tensor(row, device=device)
        mask[b, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    results = [RowResult(token_ids=[], logprobs=[], finish_reason="length") for _ in rows]
    active = [n > 0 for n in max_new_tokens]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, next_pos = out.past_key_values, positions[:, -1:] + 1
    while any(active):
        tokens, logprobs = choose_tokens(
            out.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generators=generators
        )
        for b in range(batch):
            if not active[b]:
                continue
            res, tok = results[b], int(tokens[b])
            res.token_ids.append(tok)
            res.logprobs.append(float(logprobs[b]))
            stop_at = find_stop(res.token_ids) if find_stop is not None else None
            if tok in eos_ids or stop_at is not None:
                res.finish_reason, res.stop_at, active[b] = "stop", stop_at, False
            elif len(res.token_ids) >= max_new_tokens[b]:
                active[b] = False
        if not any(active):
            break
        feed = torch.where(torch.tensor(active, device=device), tokens, torch.full_like(tokens, pad_id))
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=-1)
        out = model(
            input_ids=feed[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache, next_pos = out.past_key_values, next_pos + 1
    return results
