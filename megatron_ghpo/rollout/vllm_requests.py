"""Request bookkeeping over vLLM's step API: add requests, step the engine, collect finished ones.

Three id namespaces share one vLLM engine: ``u:`` requests from ``submit`` (returned by ``poll``),
``g:`` requests of a blocking ``generate`` and ``s:`` scoring requests. A blocking call steps the
engine until its own requests finish; submitted requests advance meanwhile and wait in
:attr:`RequestBook.finished` for the next ``poll``.
"""

from __future__ import annotations

import itertools
from typing import Any

from megatron_ghpo.records import Completion
from megatron_ghpo.rollout.base import SamplingParams

USER, GEN, SCORE = "u:", "g:", "s:"


class RequestBook:
    """Owns the in-flight and finished requests of one in-process vLLM engine."""

    def __init__(self, llm: Any, rng: Any):
        self._llm = llm
        self._rng = rng  # EngineRng: swapped in around each step
        self._ids = itertools.count()
        self._tokenizer: Any = None
        self.pending: dict[str, tuple[bool, bool]] = {}
        """vLLM request id -> (sampled-token log-probs requested, text to be decoded here)."""
        self.finished: dict[str, list[Completion]] = {}
        self.scores: dict[str, list[float]] = {}

    def new_ids(self, prefix: str, count: int) -> list[str]:
        return [f"{prefix}{next(self._ids)}" for _ in range(count)]

    def user_pending(self) -> bool:
        return any(r.startswith(USER) for r in self.pending)

    def user_finished(self) -> bool:
        return any(r.startswith(USER) for r in self.finished)

    def pop_user_finished(self) -> list[tuple[str, list[Completion]]]:
        rids = [r for r in self.finished if r.startswith(USER)]
        return [(r[len(USER) :], self.finished.pop(r)) for r in rids]

    def add_sampling(
        self, rids: list[str], rows: list[list[int]], sampling: SamplingParams, seeds: list[int | None]
    ) -> None:
        """Add one request per row; if one fails, abort those already added and re-raise."""
        from megatron_ghpo.rollout.vllm_convert import detokenizes_in_engine, to_vllm_sampling

        flags = (sampling.logprobs, not detokenizes_in_engine(sampling))
        for k, (rid, row, seed) in enumerate(zip(rids, rows, seeds, strict=True)):
            self._add(rid, row, to_vllm_sampling(sampling, seed=seed), flags, rids[:k])

    def add_scoring(self, rids: list[str], rows: list[list[int]]) -> None:
        from megatron_ghpo.rollout.vllm_convert import scoring_params

        for k, (rid, row) in enumerate(zip(rids, rows, strict=True)):
            self._add(rid, row, scoring_params(), (False, False), rids[:k])

    def _add(self, rid: str, row: list[int], params: Any, flags: tuple[bool, bool], added: list[str]) -> None:
        from vllm.inputs import tokens_input

        try:
            self._llm.llm_engine.add_request(rid, tokens_input(row), params)
        except Exception:
            if added:  # leave no half-added batch behind
                self._llm.llm_engine.abort_request(added)
                for r in added:
                    self.pending.pop(r, None)
            raise
        self.pending[rid] = flags

    def run_until(self, rids: list[str], sink: dict[str, Any]) -> None:
        """Step until every id in ``rids`` is in ``sink`` (``finished`` or ``scores``)."""
        remaining = {r for r in rids if r not in sink}
        while remaining:
            self.step()
            remaining -= sink.keys()

    def step(self) -> None:
        """One engine step with the engine's private RNG; file away every request that finished."""
        from megatron_ghpo.rollout.vllm_convert import completions_from_output, prompt_scores

        engine = self._llm.llm_engine
        if not engine.has_unfinished_requests():
            raise RuntimeError(f"vLLM has no unfinished requests but {len(self.pending)} are pending here")
        with self._rng.active():
            outputs = engine.step()
        for out in outputs:
            if not out.finished:
                continue
            rid = out.request_id
            want, decode_here = self.pending.pop(rid)
            if rid.startswith(SCORE):
                self.scores[rid] = prompt_scores(out)
            else:
                decode = self._decode if decode_here else None
                self.finished[rid] = completions_from_output(out, want_logprobs=want, decode=decode)

    def _decode(self, rows: list[list[int]]) -> list[str]:
        """Text of finished completions, decoded as vLLM's detokenizer would (special tokens skipped)."""
        if self._tokenizer is None:
            self._tokenizer = self._llm.get_tokenizer()
        return self._tokenizer.batch_decode(rows, skip_special_tokens=True)

    def clear(self) -> None:
        self.pending.clear()
        self.finished.clear()
        self.scores.clear()
