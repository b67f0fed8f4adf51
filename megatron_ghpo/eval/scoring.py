"""Scoring evaluation completions with the project's accuracy reward, in the verifier process pool.

The worker function :func:`score_with_answer` is the accuracy reward of
:mod:`megatron_ghpo.rewards.math_tasks` (same gold parser, same completion extraction, same
``verify``) that also returns the extracted answer text for the per-sample report. It runs in a
:class:`~megatron_ghpo.rewards.pool.VerifierPool` worker, so each completion gets a hard wall-clock
timeout; a timeout, error or crash scores as wrong and is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SCORE_REF = "megatron_ghpo.eval.scoring:score_with_answer"
EVAL_PRELOAD = ("megatron_ghpo.rewards.math_tasks", "megatron_ghpo.eval.scoring")
"""Modules a verifier pool made for evaluation imports once in its helper (``VerifierPool(preload=...)``)."""


@dataclass(frozen=True)
class ScoredAnswer:
    """Outcome of scoring one completion against one gold."""

    correct: bool | None
    """None when the gold answer does not parse (the problem is excluded from metrics)."""
    extracted: str | None
    """Extracted answer text (math-verify's string form), None when nothing was extracted."""
    status: str = "ok"
    """``ok`` | ``timeout`` | ``error`` | ``crashed``; anything but ``ok`` has ``correct=False``."""


def score_with_answer(gold: str, completion: str) -> tuple[float | None, str | None]:
    """``(accuracy reward, extracted answer)`` for one completion (runs inside a verifier worker).

    The reward is exactly :func:`megatron_ghpo.rewards.math_tasks.score_accuracy`'s.
    """
    from math_verify import verify

    from megatron_ghpo.rewards import math_tasks

    gold_parsed = math_tasks.parse_gold(gold)
    answer = math_tasks.parse_answer(completion)
    extracted = str(answer[-1]) if answer else None
    if not gold_parsed:
        return None, extracted
    return (1.0 if verify(list(gold_parsed), answer) else 0.0), extracted


def check_gold(gold: str, raw: str | None = None) -> dict[str, bool | None]:
    """Check one gold through the accuracy reward (runs in-process or as a verifier-pool task).

    Returns ``parsed`` (the gold parser reads it), ``text_only`` (read only as a string, not as a
    math object), ``self_ok`` (a completion boxing the parsed gold's LaTeX scores 1.0) and ``raw_ok``
    (a completion boxing ``raw``, the gold exactly as the file writes it, scores 1.0; None when
    ``raw`` is not given).
    """
    from megatron_ghpo.rewards import math_tasks

    parsed = math_tasks.parse_gold(gold)
    if not parsed:
        return {
            "parsed": False,
            "text_only": False,
            "self_ok": False,
            "raw_ok": False if raw is not None else None,
        }
    canonical = score_with_answer(gold, f"The final answer is $\\boxed{{{parsed[-1]}}}$.")[0]
    as_written = (
        None if raw is None else score_with_answer(gold, f"The final answer is $\\boxed{{{raw}}}$.")[0]
    )
    return {
        "parsed": True,
        "text_only": all(isinstance(x, str) for x in parsed),
        "self_ok": canonical == 1.0,
        "raw_ok": None if raw is None else as_written == 1.0,
    }


class PoolScorer:
    """Scores (gold, completion) pairs in a verifier pool; thread-safe (the pool's ``map`` is).

    Args:
        pool: the pool to use; None uses the process-wide default pool of the rewards package.
    """

    thread_safe = True
    """``score`` may run in a background thread (the evaluation overlaps it with generation)."""

    def __init__(self, pool: Any | None = None) -> None:
        if pool is None:
            from megatron_ghpo.rewards import get_default_pool

            pool = get_default_pool()
        self.pool = pool

    def score(self, golds: Sequence[str], completions: Sequence[str]) -> list[ScoredAnswer]:
        """One :class:`ScoredAnswer` per pair, in order."""
        if len(golds) != len(completions):
            raise ValueError(f"score: {len(golds)} golds but {len(completions)} completions")
        results = self.pool.map(SCORE_REF, list(zip(golds, completions)))
        out = []
        for r in results:
            if r.ok:
                reward, extracted = r.value
                out.append(ScoredAnswer(None if reward is None else reward > 0, extracted))
            else:
                out.append(ScoredAnswer(False, None, r.status))
        return out


class SerialScorer:
    """Scores in the calling process, one pair after another, with no timeout.

    For trusted inputs only (tests on known texts, a serial baseline in benchmarks): model output
    can make the verifier run for a very long time, which only :class:`PoolScorer` bounds.
    Must be called from the main thread (math-verify's own timeout uses ``signal.alarm``).
    """

    thread_safe = False

    def score(self, golds: Sequence[str], completions: Sequence[str]) -> list[ScoredAnswer]:
        """One :class:`ScoredAnswer` per pair, in order."""
        if len(golds) != len(completions):
            raise ValueError(f"score: {len(golds)} golds but {len(completions)} completions")
        out = []
        for gold, text in zip(golds, completions):
            reward, extracted = score_with_answer(gold, text)
            out.append(ScoredAnswer(None if reward is None else reward > 0, extracted))
        return out
