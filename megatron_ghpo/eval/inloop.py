"""Evaluation during training: every ``eval_steps`` the trainer calls an :class:`InLoopEvaluator`
with its live rollout engine (which holds the current policy weights) and logs the metrics it
returns (``eval/<task>/pass@1`` and ``eval/avg/pass@1``) into metrics.jsonl and wandb.

Tasks are read once at construction. With several data-parallel ranks, each rank evaluates its own
slice of every task (``shard=(rank, world)``) and ``all_reduce`` sums the per-task totals, so
every rank returns the same numbers for the whole task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_ghpo.eval.runner import (
    LoadedTask,
    Renderer,
    SamplingOverrides,
    Scorer,
    load_tasks,
    run_evaluation,
)
from megatron_ghpo.eval.tasks import TaskSpec, resolve_tasks
from megatron_ghpo.rollout.base import RolloutEngine


class InLoopEvaluator:
    """Runs a fixed evaluation on the trainer's engine and returns flat metrics.

    Args:
        renderer: the trainer's prompt renderer (same system prompt and chat template as training).
        tasks: registered task names (``["math500"]``), task specs, or loaded tasks (e.g. held-out
            problems already in memory: ``LoadedTask(spec=..., problems=[...])``).
        samples: K completions per problem (pass@1 = mean correctness over the K).
        limit: first ``limit`` problems per task (None = all); keep it small, it runs every ``eval_steps``.
        sampling: temperature / top_p / max_new_tokens / seed (None: each task's defaults).
        scorer: scorer (default: accuracy reward in the default verifier pool).
        out_root: when given, each evaluation's files go to ``out_root/step_<step>/``.
        shard: ``(rank, world)``: this rank evaluates problems ``rank::world`` of each task. With an
            engine that spans all ranks (vLLM ``external_launcher``: every rank must make identical
            calls) keep the default ``(0, 1)`` on every rank.
        all_reduce: sums a list of floats over the ranks (required when ``world > 1``).
    """

    def __init__(
        self,
        renderer: Renderer,
        tasks: Sequence[str | TaskSpec | LoadedTask],
        *,
        samples: int = 1,
        limit: int | None = None,
        sampling: SamplingOverrides | None = None,
        scorer: Scorer | None = None,
        out_root: str | Path | None = None,
        shard: tuple[int, int] = (0, 1),
        all_reduce: Callable[[list[float]], list[float]] | None = None,
    ) -> None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard={shard}: need 0 <= rank < world")
        if world > 1 and all_reduce is None:
            raise ValueError(f"shard={shard}: several ranks need all_reduce to combine their slices")
        names = [t for t in tasks if isinstance(t, str)]
        specs: list[TaskSpec | LoadedTask] = list(resolve_tasks(names)) if names else []
        specs += [t for t in tasks if not isinstance(t, str)]
        loaded = load_tasks(specs, limit=limit)
        self.tasks = [LoadedTask(spec=t.spec, problems=t.problems[rank::world]) for t in loaded]
        self.renderer, self.samples, self.sampling, self.scorer = renderer, samples, sampling, scorer
        self.out_root = Path(out_root) if out_root is not None else None
        self.world, self.all_reduce = world, all_reduce

    @staticmethod
    def due(step: int, eval_steps: int) -> bool:
        """True on optimizer steps ``eval_steps, 2*eval_steps, ...`` (never at step 0)."""
        return eval_steps > 0 and step > 0 and step % eval_steps == 0

    def __call__(self, engine: RolloutEngine, step: int) -> dict[str, float]:
        """Evaluate ``engine`` now; returns ``{"eval/<task>/pass@1": ..., "eval/avg/pass@1": ...}``."""
        out_dir = None if self.out_root is None else self.out_root / f"step_{step}"
        runnable = [t for t in self.tasks if t.problems]
        report = run_evaluation(
            engine, self.renderer, runnable, samples=self.samples, sampling=self.sampling,
            scorer=self.scorer, out_dir=out_dir, pass_ks=[1],
        )  # fmt: skip
        by_name = {t.name: t for t in report.tasks}
        totals: list[float] = []
        for task in self.tasks:  # per task: sum of per-problem pass@1, number of scored problems
            t = by_name.get(task.spec.name)
            totals += [t.pass_at_1 * t.num_scored, float(t.num_scored)] if t and t.num_scored else [0.0, 0.0]
        if self.world > 1:
            totals = self.all_reduce(totals)
        metrics: dict[str, float] = {}
        for i, task in enumerate(self.tasks):
            total, count = totals[2 * i], totals[2 * i + 1]
            metrics[f"eval/{task.spec.name}/pass@1"] = total / count if count else float("nan")
        scored = [v for v in metrics.values() if not math.isnan(v)]
        metrics["eval/avg/pass@1"] = sum(scored) / len(scored) if scored else float("nan")
        return metrics
