"""Reward functions with the TRL / open-r1 signature ``fn(completions, **columns) -> list[float | None]``.

``completions`` is either a list of strings or a list of conversations (``[[{"role": "assistant",
"content": "..."}]]``, the form TRL passes for chat datasets). ``columns`` are the dataset row's
fields, one list entry per completion (``solution`` is the gold answer), plus ``completion_ids`` (token
ids per completion) when the caller has them. Every function accepts and ignores unknown columns.

Functions that verify answers (``accuracy``, ``cosine``, ``length``) run math-verify in a
:class:`~megatron_ghpo.rewards.pool.VerifierPool` (``pool=`` keyword, else the process-wide default
pool), so they never hang and never raise on model output: a timeout or a worker failure scores as
"not correct" (0.0 for accuracy) and is counted by the pool.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from megatron_ghpo.rewards.default_pool import get_default_pool
from megatron_ghpo.rewards.pool import VerifierPool
from megatron_ghpo.rewards.pool_types import TaskResult

Completions = Sequence[str] | Sequence[Sequence[dict[str, Any]]]
RewardFunc = Callable[..., list[float | None]]

ACCURACY_TASK = "megatron_ghpo.rewards.math_tasks:score_accuracy"
"""Worker task of the accuracy reward: ``score_accuracy(gold, completion) -> float | None``."""

FORMAT_PATTERN = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)
REASONING_STEPS_PATTERN = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")


def completion_texts(completions: Completions) -> list[str]:
    """Plain text of each completion (the first message's ``content`` for conversations)."""
    texts = []
    for i, c in enumerate(completions):
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, (list, tuple)) and c and isinstance(c[0], dict) and "content" in c[0]:
            texts.append(str(c[0]["content"]))
        else:
            raise TypeError(
                f"completion {i} is {type(c).__name__}: expected a str or a conversation "
                "[{'role': 'assistant', 'content': str}]"
            )
    return texts


def _column(columns: dict[str, Any], name: str, n: int, reward: str) -> list[Any]:
    values = columns.get(name)
    if values is None:
        raise KeyError(
            f"reward {reward!r} needs the column {name!r} (the gold answer); the row has {sorted(columns)}"
        )
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} entries for {n} completions")
    return values


def verify_correctness(
    golds: Sequence[Any], texts: Sequence[str], pool: VerifierPool | None
) -> list[float | None]:
    """Accuracy of each completion against its gold via the pool (timeouts/failures -> 0.0)."""
    pool = pool if pool is not None else get_default_pool()
    gold_texts = [str(g) for g in golds]
    results: list[TaskResult] = pool.map(ACCURACY_TASK, list(zip(gold_texts, texts)), affinity=gold_texts)
    out: list[float | None] = []
    for r in results:
        if r.ok:
            out.append(None if r.value is None else float(r.value))
        else:
            out.append(0.0)
    return out


def accuracy_reward(
    completions: Completions, solution: Sequence[str], *, pool: VerifierPool | None = None, **columns: Any
) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold (math-verify), 0.0 if not, None if the gold
    cannot be parsed (such rewards are excluded from sums and means, and never make a group difficult)."""
    texts = completion_texts(completions)
    golds = _column({"solution": solution}, "solution", len(texts), "accuracy")
    return verify_correctness(golds, texts, pool)


accuracy_reward.reward_name = "accuracy"  # type: ignore[attr-defined]


def format_reward(completions: Completions, **columns: Any) -> list[float]:
    """1.0 iff the completion is ``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>`` (DOTALL, MULTILINE)."""
    return [1.0 if FORMAT_PATTERN.match(t) else 0.0 for t in completion_texts(completions)]


format_reward.reward_name = "format"  # type: ignore[attr-defined]


def tag_count_reward(completions: Completions, **columns: Any) -> list[float]:
    """0.25 for each of ``<think>\\n``, ``\\n</think>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` appearing exactly once."""
    tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    return [sum(0.25 for tag in tags if t.count(tag) == 1) for t in completion_texts(completions)]


tag_count_reward.reward_name = "tag_count"  # type: ignore[attr-defined]


def reasoning_steps_reward(completions: Completions, **columns: Any) -> list[float]:
    """``min(1, markers / 3)`` where markers are ``Step N:``, ``N.`` at a line start, bullets, First/Next/…"""
    return [min(1.0, len(REASONING_STEPS_PATTERN.findall(t)) / 3) for t in completion_texts(completions)]


reasoning_steps_reward.reward_name = "reasoning_steps"  # type: ignore[attr-defined]


def len_reward(
    completions: Completions, solution: Sequence[str], *, pool: VerifierPool | None = None, **columns: Any
) -> list[float]:
    """Kimi-1.5 length reward within the group of completions passed together.

    With ``λ = 0.5 - (len - min_len) / (max_len - min_len)`` (character lengths): a correct answer
    gets λ, a wrong one ``min(0, λ)``; all-equal lengths give 0. An unparseable gold counts as correct.
    """
    texts = completion_texts(completions)
    golds = _column({"solution": solution}, "solution", len(texts), "length")
    correct = [c is None or c > 0 for c in verify_correctness(golds, texts, pool)]
    lengths = [len(t) for t in texts]
    lo, hi = min(lengths, default=0), max(lengths, default=0)
    if hi == lo:
        return [0.0] * len(texts)
    out = []
    for length, ok in zip(lengths, correct):
        lam = 0.5 - (length - lo) / (hi - lo)
        out.append(float(lam if ok else min(0.0, lam)))
    return out


len_reward.reward_name = "length"  # type: ignore[attr-defined]


def get_cosine_scaled_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
) -> RewardFunc:
    """Cosine length-scaled correctness reward (open-r1's ``cosine``).

    ``progress = min(len / max_len, 1)`` (characters); correct answers get
    ``min_c + (max_c - min_c) * (1 + cos(π·progress)) / 2`` (short is better); wrong answers get the
    same formula with ``max_w, min_w`` swapped (long wrong answers are penalised less). None when the
    gold is unparseable.
    """
    if max_len <= 0:
        raise ValueError(f"cosine reward: max_len must be > 0, got {max_len}")

    def cosine_scaled_reward(
        completions: Completions, solution: Sequence[str], *, pool: VerifierPool | None = None, **columns: Any
    ) -> list[float | None]:
        texts = completion_texts(completions)
        golds = _column({"solution": solution}, "solution", len(texts), "cosine")
        out: list[float | None] = []
        for text, acc in zip(texts, verify_correctness(golds, texts, pool)):
            if acc is None:
                out.append(None)
                continue
            cosine = math.cos(min(len(text) / max_len, 1.0) * math.pi)
            lo, hi = (min_value_correct, max_value_correct) if acc > 0 else (max_value_wrong, min_value_wrong)
            out.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
        return out

    cosine_scaled_reward.reward_name = "cosine"  # type: ignore[attr-defined]
    return cosine_scaled_reward


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> RewardFunc:
    """DAPO's soft overlong punishment on completion *token* counts (needs the ``completion_ids`` column).

    0 up to ``max_completion_len - soft_punish_cache`` tokens, then linearly down to -1 at
    ``max_completion_len``, and -1 beyond.
    """
    if soft_punish_cache < 0 or soft_punish_cache > max_completion_len:
        raise ValueError(
            f"soft_overlong: need 0 <= soft_punish_cache ({soft_punish_cache}) <= max_completion_len ({max_completion_len})"
        )

    def soft_overlong_punishment(completions: Completions, *, completion_ids: Sequence[Sequence[int]] | None = None,
                                 **columns: Any) -> list[float]:  # fmt: skip
        if completion_ids is None:
            raise KeyError(
                "reward 'soft_overlong' needs the completion_ids column (token ids per completion)"
            )
        start = max_completion_len - soft_punish_cache
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= start:
                out.append(0.0)
            elif n <= max_completion_len:
                out.append((start - n) / soft_punish_cache)
            else:
                out.append(-1.0)
        return out

    soft_overlong_punishment.reward_name = "soft_overlong"  # type: ignore[attr-defined]
    return soft_overlong_punishment
