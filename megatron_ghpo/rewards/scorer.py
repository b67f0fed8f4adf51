"""Scores groups of completions with several weighted reward functions."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

from megatron_ghpo.call_metrics import MEAN_COUNT
from megatron_ghpo.records import Group
from megatron_ghpo.rewards.default_pool import get_default_pool
from megatron_ghpo.rewards.functions import RewardFunc
from megatron_ghpo.rewards.pool import VerifierPool
from megatron_ghpo.rewards.pool_types import VerifierCounters
from megatron_ghpo.rewards.registry import reward_name

ACCURACY = "accuracy"
RESERVED_COLUMNS = ("solution", "prompts", "completion_ids")
"""Columns the scorer sets itself: ``solution`` = ``Problem.answer`` (the gold answer, even where the
row's own ``solution`` column holds a worked solution), ``prompts`` = the prompt text the completion was
sampled from, ``completion_ids`` = its token ids."""


def _clean(value: Any, name: str, index: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise TypeError(
                f"reward {name!r} returned {value!r} ({type(value).__name__}) for completion {index}; "
                "a reward function must return a list of float or None"
            ) from None
    value = float(value)
    return None if math.isnan(value) else value


class RewardScorer:
    """Weighted sum of reward functions over groups of completions.

    Args:
        funcs: reward functions (``fn(completions, **columns) -> list[float | None]``), e.g. from
            :func:`~megatron_ghpo.rewards.registry.get_reward_funcs`.
        weights: one weight per function (default 1.0 each).
        pool: verifier pool handed to functions that take a ``pool`` keyword (default: the
            process-wide pool, started only if such a function is configured).

    ``score_groups`` may be called repeatedly, with any number of groups (the streaming GHPO sampler
    scores one group at a time) and from any thread.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunc],
        weights: Sequence[float] | None = None,
        *,
        pool: VerifierPool | None = None,
    ) -> None:
        if not funcs:
            raise ValueError(
                "no reward functions configured; set rewards.reward_funcs (e.g. [accuracy, format])"
            )
        self.funcs = list(funcs)
        self.names = [reward_name(f) for f in self.funcs]
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward functions {dupes} appear more than once in rewards.reward_funcs")
        if weights is None:
            weights = [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ValueError(
                f"rewards.reward_weights has {len(weights)} entries for {len(self.funcs)} reward functions "
                f"{self.names}; give one weight per function"
            )
        for w, n in zip(weights, self.names):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"reward weight for {n!r} must be a finite number, got {w!r}")
        self.weights = [float(w) for w in weights]
        self.pool = pool
        self._takes_pool = [self._accepts_pool(f) for f in self.funcs]

    @staticmethod
    def _accepts_pool(fn: RewardFunc) -> bool:
        try:
            return "pool" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return False

    @property
    def has_accuracy(self) -> bool:
        return ACCURACY in self.names

    def score_groups(self, groups: Sequence[Group]) -> dict[str, float]:
        """Fill ``rewards``, ``accuracy`` and ``reward_components`` of every group; return metrics.

        Metrics: ``reward/<name>`` (mean over non-None values, NaN when all are None),
        ``reward/total``, each with its count under ``<key>:n`` (:data:`MEAN_COUNT`, so a caller
        combines several calls into one mean: :func:`megatron_ghpo.ghpo.metrics.combine_call_metrics`), and ``reward/timeouts`` / ``reward/verifier_errors`` (verifier-pool task
        outcomes of this call; 0 when no configured function uses the pool).
        """
        texts: list[str] = []
        rows: list[dict[str, Any]] = []
        for g in groups:
            base = dict(g.prompt.problem.columns)
            base.update(solution=g.prompt.problem.answer, prompts=g.prompt.text)
            for c in g.completions:
                texts.append(c.text)
                rows.append({**base, "completion_ids": c.token_ids})
        metrics: dict[str, float] = {}
        if not texts:
            return metrics
        keys = sorted({k for r in rows for k in r})
        columns = {k: [r.get(k) for r in rows] for k in keys}
        pool = self.pool
        if pool is None and any(self._takes_pool):
            pool = get_default_pool()
        before = pool.thread_counters() if pool is not None else VerifierCounters()

        components: dict[str, list[float | None]] = {}
        for fn, name, takes_pool in zip(self.funcs, self.names, self._takes_pool):
            kwargs = dict(columns)
            if takes_pool:
                kwargs["pool"] = pool
            try:
                out = fn(texts, **kwargs)
            except Exception as exc:
                raise RuntimeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
            if out is None or len(out) != len(texts):
                got = "None" if out is None else f"{len(out)} values"
                raise ValueError(f"reward function {name!r} returned {got} for {len(texts)} completions")
            components[name] = [_clean(v, name, i) for i, v in enumerate(out)]

        totals = []
        for i in range(len(texts)):
            totals.append(
                sum(
                    w * components[n][i]
                    for n, w in zip(self.names, self.weights)
                    if components[n][i] is not None
                )
            )

        start = 0
        for g in groups:
            end = start + g.size
            g.rewards = [float(t) for t in totals[start:end]]
            g.reward_components = {n: vals[start:end] for n, vals in components.items()}
            g.accuracy = list(components[ACCURACY][start:end]) if ACCURACY in components else [None] * g.size
            start = end

        for name, vals in components.items():
            present = [v for v in vals if v is not None]
            metrics[f"reward/{name}"] = sum(present) / len(present) if present else float("nan")
            metrics[f"reward/{name}{MEAN_COUNT}"] = float(len(present))
        metrics["reward/total"] = sum(totals) / len(totals)
        metrics[f"reward/total{MEAN_COUNT}"] = float(len(totals))
        delta = (pool.thread_counters() if pool is not None else VerifierCounters()) - before
        metrics["reward/timeouts"] = float(delta.timeouts)
        metrics["reward/verifier_errors"] = float(delta.errors + delta.crashes)
        return metrics
