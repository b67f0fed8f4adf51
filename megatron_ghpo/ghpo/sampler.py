"""GHPOSampler: problems in, trained groups out (GHPO ladder, GRPO, fixed-hint GRPO, DAPO filter).

Pure logic: the sampler talks to a RolloutEngine and to injected callables, never to torch.distributed
directly, so a single process, a test double and a multi-rank run share one code path.

* ``render(problem, ratio) -> Prompt``: the chat-templated prompt whose user turn is
  ``hinted_user_text(problem, ratio, options)`` (ratio 0 = unhinted); must set ``hint_ratio``.
* ``score(groups) -> metrics``: fills ``group.rewards`` / ``group.accuracy`` in place; its metrics
  are combined over the step's calls by :func:`megatron_ghpo.call_metrics.combine_call_metrics`
  (counts summed; a mean reported with its ``<key>:n`` count averaged over all calls' items).
* ``any_global(flag) -> bool``: all-reduce "true on any data-parallel rank" (identity on one rank).
  Call pattern: see :mod:`megatron_ghpo.ghpo.ladder`; every rank makes the same calls.
* ``refill(n) -> problems``: up to n fresh problems for DAPO dynamic sampling.
* ``gather_objects(obj) -> [obj of rank 0, rank 1, …]``: all-gather used to keep the difficulty
  memory identical on every rank (one call per round when a memory is given; omit on one rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_ghpo.call_metrics import combine_call_metrics, finished
from megatron_ghpo.ghpo.difficulty import is_difficult
from megatron_ghpo.ghpo.hints import hint_prefix
from megatron_ghpo.ghpo.ladder import RoundContext, Slot, needs_next, next_stage, run_batched, run_streaming
from megatron_ghpo.ghpo.memory import DifficultyMemory, VisitOutcome
from megatron_ghpo.ghpo.metrics import StepStats
from megatron_ghpo.ghpo.options import GHPOOptions
from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Group, Problem, Prompt
from megatron_ghpo.rollout.base import RolloutEngine, SamplingParams, StreamingRolloutEngine

logger = get_logger(__name__)


CARRY_VERSION = 1


def _identity(flag: bool) -> bool:
    return flag


@dataclass(kw_only=True)
class SampleResult:
    """The groups to train on (same count as the problems asked for) and the step's metrics.

    ``stats`` and ``call_metrics`` are what ``metrics`` was computed from; :func:`merge_results`
    combines the results of several rollout workers that sampled shares of one batch."""

    groups: list[Group]
    metrics: dict[str, float]
    stats: StepStats | None = None
    call_metrics: dict[str, float] = field(default_factory=dict)


def merge_results(parts: list[SampleResult]) -> SampleResult:
    """One result from the results of workers that sampled consecutive shares of one step's problems
    (same step, same collective ladder decisions): groups in worker order, counters summed,
    generation passes as run (the same on every worker), scorer means averaged over all items,
    wall times (``perf/*``) those of the slowest worker (the one that held up the step). Not for dynamic sampling (its refill rounds are
    per-worker decisions)."""
    if not parts:
        raise ValueError("merge_results needs at least one worker's result")
    if any(p.stats is None for p in parts):
        raise ValueError("merge_results needs each worker's StepStats (SampleResult.stats)")
    stats = parts[0].stats.merged([p.stats for p in parts[1:]])  # type: ignore[union-attr]
    groups = [g for p in parts for g in p.groups]
    calls: dict[str, float] = {}
    for p in parts:
        combine_call_metrics(calls, {k: v for k, v in p.call_metrics.items() if not k.startswith("perf/")})
    times = [{k: float(v) for k, v in p.call_metrics.items() if k.startswith("perf/")} for p in parts]
    slowest = max(times, key=lambda t: sum(t.values()))
    metrics = stats.finish(groups, {})
    metrics.update(finished(calls))
    metrics.update(slowest)
    return SampleResult(groups=groups, metrics=metrics, stats=stats, call_metrics={**calls, **slowest})


def _zero_variance(group: Group) -> bool:
    vals = [
        0.0 if (r is None or (isinstance(r, float) and math.isnan(r))) else float(r) for r in group.rewards
    ]
    return len(set(vals)) <= 1


class GHPOSampler:
    """Runs one optimizer step's sampling: generation, scoring, the hint ladder, DAPO filtering."""

    def __init__(
        self,
        *,
        engine: RolloutEngine,
        render: Callable[[Problem, float], Prompt],
        score: Callable[[list[Group]], dict[str, float]],
        sampling: SamplingParams,
        options: GHPOOptions,
        any_global: Callable[[bool], bool] = _identity,
        memory: DifficultyMemory | None = None,
        refill: Callable[[int], list[Problem]] | None = None,
        gather_objects: Callable[[Any], list[Any]] | None = None,
    ) -> None:
        if sampling.n < 2:
            raise ValueError(
                f"num_generations (SamplingParams.n) must be >= 2 for group-relative training, got {sampling.n}"
            )
        if options.streaming and not isinstance(engine, StreamingRolloutEngine):
            raise TypeError(
                f"ghpo.streaming is true but the rollout engine {type(engine).__name__} has no submit/poll/has_pending; "
                "use a streaming engine or set ghpo.streaming: false"
            )
        if options.hint_start == "memory" and memory is None:
            raise ValueError("ghpo.hint_start: memory needs a DifficultyMemory (pass memory=...)")
        if options.dynamic_sampling and refill is None:
            raise ValueError(
                "ghpo.dynamic_sampling needs a refill callable that draws fresh problems from the dataset"
            )
        self.engine = engine
        self.render = render
        self.score = score
        self.sampling = sampling
        self.options = options
        self.any_global = any_global
        self.memory = memory
        self.refill = refill
        self.gather_objects = gather_objects
        self._carry: list[Slot] = []
        """Difficult slots set aside for a hinted retry in the next step (``hint_retry: next_step``)."""

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state that outlives a step: the retries set aside for the next step."""
        return {
            "version": CARRY_VERSION,
            "carry": [
                {"problem": asdict(s.problem), "start_rung": s.start_rung, "rung": s.rung, "path": s.path,
                 "generated": list(s.generated), "unhinted_solved": s.unhinted_solved}
                for s in self._carry
            ],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (e.g. from a checkpoint): the next step samples these retries."""
        if not isinstance(state, dict) or state.get("version") != CARRY_VERSION or not isinstance(state.get("carry"), list):
            raise ValueError(
                f"sampler state must be {{'version': {CARRY_VERSION}, 'carry': [...]}}, got "
                f"{sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        carry = []
        for i, d in enumerate(state["carry"]):
            try:
                carry.append(Slot(index=i, problem=Problem(**d["problem"]), start_rung=int(d["start_rung"]),
                                  rung=int(d["rung"]), path=d["path"], generated=list(d["generated"]),
                                  generated_before=len(d["generated"]), unhinted_solved=d["unhinted_solved"]))  # fmt: skip
            except (KeyError, TypeError) as exc:
                raise ValueError(f"sampler state: carried retry {i} is malformed ({exc})") from None
        self._carry = carry

    @property
    def pending_retries(self) -> int:
        """Retries set aside for the next step on this worker."""
        return len(self._carry)

    # ---------------------------------------------------------------- mode
    def _mode(self, step: int) -> tuple[list[float], bool]:
        """(stage ratios, climb) for this step."""
        o = self.options
        hints_on = step >= o.start_hint_step
        if o.rl_type == "ghpo" and hints_on:
            return o.rungs, True
        if o.rl_type == "grpo_fixed_hint" and hints_on:
            return [0.0, o.hint_ratio], False
        return [0.0], False

    def _start_rung(self, problem: Problem, rungs: list[float], climb: bool) -> int:
        if problem.hint is None:
            return 0
        if not climb:
            return len(rungs) - 1  # fixed hint (1) or plain GRPO (0)
        if self.options.hint_start == "memory":
            assert self.memory is not None
            return self.memory.start_rung(problem.uid, rungs)
        return 0

    def _distinct_path(self, problem: Problem, rungs: list[float], start: int) -> list[int]:
        """Stages from ``start`` up whose hint differs from the previous kept stage's (stage 0 and an
        empty hint count as the same "no hint"): a stage that would show the same hint again is a
        plain retry of a prompt just found difficult, so it is left out. A start stage whose hint is
        empty starts unhinted instead."""
        o = self.options
        assert problem.hint is not None

        def prefix(k: int) -> str:
            return hint_prefix(problem.hint, rungs[k], split=o.hint_split, guard=o.hint_guard) if k else ""

        if start > 0 and not prefix(start):
            start = 0
        path, last = [start], prefix(start)
        for k in range(start + 1, len(rungs)):
            cur = prefix(k)
            if cur != last:
                path.append(k)
                last = cur
        return path

    # ---------------------------------------------------------------- rounds
    def _run_round(
        self, problems: list[Problem], step: int, index: int, stats: StepStats, score_metrics: dict,
        carried: list[Slot] | None = None,
    ) -> tuple[list[Slot], list[Slot]]:
        """Sample ``problems`` (and the slots ``carried`` over from the previous step, first) through
        the ladder; returns (finished slots, slots set aside for the next step)."""
        rungs, climb = self._mode(step)
        slots = list(carried or [])
        for i, slot in enumerate(slots):
            slot.index = i  # request ids: unique within the round
        for i, p in enumerate(problems):
            if not isinstance(p, Problem):
                raise TypeError(
                    f"problem {i} is a {type(p).__name__}, expected megatron_ghpo.records.Problem"
                )
            start = self._start_rung(p, rungs, climb)
            path = None
            if climb and p.hint is not None and self.options.hint_skip_repeats:
                path = self._distinct_path(p, rungs, start)
                start = path[0]
            slots.append(Slot(index=len(slots), problem=p, start_rung=start, rung=start, path=path))
        deferring = climb and self.options.hint_retry == "next_step"
        ctx = RoundContext(
            engine=self.engine,
            render=self.render,
            score=self.score,
            sampling=self.sampling,
            rungs=rungs,
            climb=climb,
            any_global=self.any_global,
            step=step,
            round_index=index,
            score_metrics=score_metrics,
            single_pass=deferring,
        )
        run = run_streaming if self.options.streaming else run_batched
        passes = run(ctx, slots)
        finished: list[Slot] = []
        later: list[Slot] = []
        for s in slots:
            (later if deferring and needs_next(ctx, s) else finished).append(s)
        self._assign_train_prompts(slots, climb)
        stats.add_round(
            slots, passes, top=len(rungs) - 1, climb=climb, from_memory=self.options.hint_start == "memory"
        )
        stats.deferred += len(later)
        self._remember(finished, rungs, climb, step)
        for s in later:  # the next step samples their next stage
            next_stage(ctx, s)
            s.generated_before = len(s.generated)
        return finished, later

    def _assign_train_prompts(self, slots: list[Slot], climb: bool) -> None:
        faithful = climb and self.options.hint_prompt_consistency == "faithful"
        top_local = max((s.rung for s in slots), default=0)
        for s in slots:
            assert s.group is not None
            if faithful and 0 < s.rung < top_local:
                # Defect B1, reproduced: the last local ladder stage rebuilt every prompt that was not
                # difficult at that stage from the unhinted row.
                s.group.train_prompt = s.unhinted_prompt or self.render(s.problem, 0.0)
            else:
                s.group.train_prompt = s.group.prompt

    def _remember(self, slots: list[Slot], rungs: list[float], climb: bool, step: int) -> None:
        if self.memory is None:
            return
        outcomes = []
        for s in slots:
            assert s.group is not None
            conclusive = climb and (
                s.solved_rung is not None or (is_difficult(s.group) and s.problem.hint is not None)
            )
            outcomes.append(
                VisitOutcome(
                    uid=s.problem.uid,
                    step=step,
                    start_ratio=rungs[s.start_rung],
                    solved_ratio=rungs[s.solved_rung] if s.solved_rung is not None else None,
                    unhinted_solved=s.unhinted_solved,
                    conclusive=conclusive,
                )
            )
        per_rank = self.gather_objects(outcomes) if self.gather_objects is not None else [outcomes]
        for rank_outcomes in per_rank:
            for outcome in rank_outcomes:
                self.memory.update(outcome)

    # ---------------------------------------------------------------- step
    def sample(self, problems: list[Problem], step: int) -> SampleResult:
        """Sample, score and (per the options) hint one step's problems on this rank."""
        rungs, _ = self._mode(step)
        stats = StepStats(rungs=rungs, num_stages=len(rungs))
        score_metrics: dict[str, float] = {}
        carried, self._carry = self._carry, []
        slots, later = self._run_round(list(problems), step, 0, stats, score_metrics, carried)
        self._carry = later
        groups = [s.group for s in slots]
        if not groups and later:
            # nothing finished on this worker: train the set-aside groups as sampled too (their retries
            # still run next step), so no step trains an empty batch
            groups = [s.group for s in later]
        extra: dict[str, float] = {}
        if self.options.dynamic_sampling:
            groups, extra = self._dynamic_sampling(groups, len(problems), step, stats, score_metrics)
        metrics = stats.finish(groups, extra)
        metrics.update(finished(score_metrics))
        return SampleResult(groups=groups, metrics=metrics, stats=stats, call_metrics=score_metrics)

    def _dynamic_sampling(
        self, groups: list[Group], target: int, step: int, stats: StepStats, score_metrics: dict
    ) -> tuple[list[Group], dict[str, float]]:
        """Drop zero-variance groups and refill; complete a short batch with dropped groups.

        Every rank makes the same ``any_global`` calls: one per refill round (plus the ladder's).
        """
        kept = [g for g in groups if not _zero_variance(g)]
        dropped = [g for g in groups if _zero_variance(g)]
        rounds = 0
        while rounds < self.options.dynamic_sampling_max_rounds:
            missing = target - len(kept)
            if not self.any_global(missing > 0):
                break
            rounds += 1
            fresh = list(self.refill(missing)) if missing > 0 else []  # type: ignore[misc]
            if len(fresh) > missing:
                raise ValueError(f"refill returned {len(fresh)} problems when {missing} were asked for")
            slots, _ = self._run_round(fresh, step, rounds, stats, score_metrics)
            for s in slots:
                (dropped if _zero_variance(s.group) else kept).append(s.group)
        filler = dropped[: max(0, target - len(kept))]
        if filler:
            logger.debug("dynamic sampling completed the batch with %d zero-variance groups", len(filler))
        extra = {
            "dapo/dropped_groups": float(len(dropped)),
            "dapo/refill_rounds": float(rounds),
            "dapo/filler_groups": float(len(filler)),
        }
        return kept + filler, extra
