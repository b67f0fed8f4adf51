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
        self.pending: dict[str, bool] = {}
        """vLLM request id -> whether sampled-token log-probs were requested."""
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
        from megatron_ghpo.rollout.vllm_convert import to_vllm_sampling

        for k, (rid, row, seed) in enumerate(zip(rids, rows, seeds, strict=True)):
            self._add(rid, row, to_vllm_sampling(sampling, seed=seed), sampling.logprobs, rids[:k])

    def add_scoring(self, rids: list[str], rows: list[list[int]]) -> None:
        from megatron_ghpo.rollout.vllm_convert import scoring_params

        for k, (rid, row) in enumerate(zip(rids, rows, strict=True)):
            self._add(rid, row, scoring_params(), False, rids[:k])

    def _add(self, rid: str, row: list[int], params: Any, want_logprobs: bool, added: list[str]) -> None:
        from vllm.inputs import tokens_input

        try:
            self._llm.llm_engine.add_request(rid, tokens_input(row), params)
        except Exception:
            if added:  # leave no half-added batch behind
                self._llm.llm_engine.abort_request(added)
                for r in added:
                    self.pending.pop(r, None)
            raise
        self.pending[rid] = want_logprobs

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
            want = self.pending.pop(rid)
            if rid.startswith(SCORE):
                self.scores[rid] = prompt_scores(out)
            else:
                self.finished[rid] = completions_from_output(out, want_logprobs=want)

    def clear(self) -> None:
        self.pending.clear()
        self.finished.clear()
        self.scores.clear()
