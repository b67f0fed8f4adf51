"""Translation between the project's records and vLLM's request/output objects.

Imported only by :mod:`megatron_ghpo.rollout.vllm_engine` after vLLM itself has been imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from megatron_ghpo.records import Completion
from megatron_ghpo.rollout.base import SamplingParams

FINISH_REASONS = ("stop", "length")


def detokenizes_in_engine(sampling: SamplingParams) -> bool:
    """Whether vLLM must detokenize while it generates: only stop strings need the running text.
    Otherwise the text is decoded once per finished completion (:func:`completions_from_output`),
    which spares vLLM's per-token incremental detokenizer (a sizeable share of a CPU decode step)."""
    return bool(sampling.stop)


def to_vllm_sampling(sampling: SamplingParams, *, seed: int | None) -> Any:
    """vLLM ``SamplingParams`` for one prompt: final output only, sampled-token log-probs only."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=max(0, sampling.top_k),  # vLLM: 0 disables top-k
        max_tokens=sampling.max_tokens,
        seed=seed,
        stop=list(sampling.stop) or None,
        logprobs=0 if sampling.logprobs else None,  # 0 = only the sampled token's log-prob
        flat_logprobs=True,
        detokenize=detokenizes_in_engine(sampling),
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def scoring_params() -> Any:
    """vLLM ``SamplingParams`` that only scores the prompt: log-prob of each given token, one greedy
    token generated (vLLM needs at least one), prefix cache not read (vLLM's rule for prompt log-probs)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1,
        temperature=0.0,
        max_tokens=1,
        prompt_logprobs=0,
        flat_logprobs=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _position_logprob(logprobs: Any, position: int, token_id: int) -> float:
    """Log-prob of ``token_id`` at ``position`` from vLLM's per-position container (flat or dicts)."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: parallel primitive lists
        for j in range(logprobs.start_indices[position], logprobs.end_indices[position]):
            if logprobs.token_ids[j] == token_id:
                return float(logprobs.logprobs[j])
    else:
        entry = logprobs[position]
        if entry is not None and token_id in entry:
            return float(entry[token_id].logprob)
    raise RuntimeError(f"vLLM returned no log-prob for token {token_id} at position {position}")


def token_logprobs(logprobs: Any, token_ids: Sequence[int], offset: int = 0) -> list[float]:
    """Log-probs of ``token_ids[i]`` found at container position ``offset + i``."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs although they were requested")
    return [_position_logprob(logprobs, offset + i, t) for i, t in enumerate(token_ids)]


def completions_from_output(
    output: Any, *, want_logprobs: bool, decode: Callable[[list[list[int]]], list[str]] | None = None
) -> list[Completion]:
    """Convert a finished vLLM ``RequestOutput`` into completions in sample order.

    ``decode``: batch decoder (special tokens skipped, as vLLM's detokenizer does) for requests that
    vLLM did not detokenize; None keeps vLLM's text."""
    samples = sorted(output.outputs, key=lambda c: c.index)
    texts = decode([list(c.token_ids) for c in samples]) if decode is not None else [c.text for c in samples]
    completions = []
    for sample, text in zip(samples, texts, strict=True):
        if sample.finish_reason not in FINISH_REASONS:
            raise RuntimeError(
                f"rollout request {output.request_id!r} ended with finish_reason={sample.finish_reason!r} "
                "(expected stop or length): it was aborted or failed inside vLLM"
            )
        token_ids = list(sample.token_ids)
        completions.append(
            Completion(
                token_ids=token_ids,
                text=text,
                logprobs=token_logprobs(sample.logprobs, token_ids) if want_logprobs else None,
                finish_reason=sample.finish_reason,
            )
        )
    return completions


def prompt_scores(output: Any) -> list[float]:
    """Log-probs of prompt tokens 1..L-1 given their prefixes, from a scoring request's output."""
    prompt = list(output.prompt_token_ids)
    # position 0 has no log-prob (nothing precedes the first token)
    return token_logprobs(output.prompt_logprobs, prompt[1:], offset=1)
