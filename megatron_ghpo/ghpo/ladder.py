"""One round of the hint ladder over a list of problems, batched or streaming.

A round takes problems, gives each a *slot* (its current ladder stage and latest group), generates
every slot at its start stage (pass 0), then moves difficult slots one stage up per pass until no
slot on any data-parallel rank needs another pass or the top stage is reached.

Multi-rank contract (deterministic and deadlock-free): ``any_global(flag)`` is an all-reduce
("is the flag true on any rank?") and every rank makes the same sequence of calls:

* batched: before pass p (p = 1..K) every rank calls ``any_global(this rank has a slot that needs
  pass p)``; all ranks stop at the same p because they see the same result. A rank with nothing
  to regenerate still takes part in the call and skips the engine call.
* single pass (``RoundContext.single_pass``, the ``next_step`` retry mode): no calls at all.
* streaming: each rank decides per group locally (a difficult group is resubmitted as soon as it
  is scored — the global decision could only ever regenerate a rank's *own* difficult groups, so
  deciding locally trains exactly the same groups); afterwards every rank makes exactly K calls
  ``any_global(this rank ran pass p)``, p = 1..K, which only count global generation passes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from megatron_ghpo.call_metrics import combine_call_metrics
from megatron_ghpo.ghpo.difficulty import check_scored, is_difficult, is_solved
from megatron_ghpo.records import Completion, Group, Problem, Prompt
from megatron_ghpo.rollout.base import RolloutEngine, SamplingParams, StreamingRolloutEngine


@dataclass(kw_only=True)
class Slot:
    """One problem's progress through the ladder in one round."""

    index: int
    problem: Problem
    start_rung: int
    rung: int
    group: Group | None = None
    unhinted_prompt: Prompt | None = None
    unhinted_group: Group | None = None
    """The pass-0 unhinted group (for ``ghpo/acc_unhinted``), when stage 0 was sampled."""
    solved_rung: int | None = None
    generated: list[int] = field(default_factory=list)
    """Stages this slot was sampled at, in order (over steps, for a retry carried to the next step)."""
    generated_before: int = 0
    """Entries of ``generated`` from earlier steps (``hint_retry: next_step``; 0 otherwise)."""
    unhinted_solved: bool | None = None
    """Outcome of the unhinted group: True solved, False difficult, None not sampled or unknown."""
    path: list[int] | None = None
    """Stages this slot may visit, ascending from ``start_rung`` (None: every stage from ``start_rung``
    to the top). The sampler leaves out stages whose hint would repeat the previous one's."""

    def last_rung(self, top: int) -> int:
        """The highest stage this slot can reach."""
        return self.path[-1] if self.path else top


@dataclass(kw_only=True)
class RoundContext:
    """What a round needs from the sampler."""

    engine: RolloutEngine
    render: Callable[[Problem, float], Prompt]
    score: Callable[[list[Group]], dict[str, float]]
    sampling: SamplingParams
    rungs: list[float]
    """Ratio of every stage (``rungs[0]`` is the first stage's ratio; the ladder is ``rungs[1:]``)."""
    climb: bool
    """True when difficult groups move up the ladder (GHPO); False for a single pass."""
    any_global: Callable[[bool], bool]
    step: int
    round_index: int
    score_metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of the round's scorer calls and engine time, combined over calls (``call_metrics``)."""
    single_pass: bool = False
    """One generation pass, no regeneration within the round (``hint_retry: next_step``: the sampler
    carries difficult slots to the next step instead); no ``any_global`` calls are made."""

    @property
    def top(self) -> int:
        return len(self.rungs) - 1


def request_sampling(sampling: SamplingParams, slot: Slot) -> SamplingParams:
    """Per-request sampling for streamed requests: with a step seed set, each (problem, stage) gets its
    own seed derived from it, so samples do not depend on the order requests finish in and two
    streamed prompts never share a random stream."""
    if sampling.seed is None:
        return sampling
    digest = hashlib.sha256(f"{sampling.seed}:{slot.problem.uid}:{slot.rung}".encode()).digest()
    return replace(sampling, seed=int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)


def _prompt_for(ctx: RoundContext, slot: Slot) -> Prompt:
    ratio = ctx.rungs[slot.rung]
    prompt = ctx.render(slot.problem, ratio)
    if not isinstance(prompt, Prompt):
        raise TypeError(
            f"render must return a Prompt, got {type(prompt).__name__} for problem {slot.problem.uid!r}"
        )
    if abs(prompt.hint_ratio - ratio) > 1e-9:
        raise ValueError(
            f"render returned hint_ratio={prompt.hint_ratio} for ratio {ratio} (problem {slot.problem.uid!r}); "
            "set Prompt.hint_ratio to the ratio it was asked for"
        )
    if ratio == 0.0 and slot.unhinted_prompt is None:
        slot.unhinted_prompt = prompt
    return prompt


def _check_completions(ctx: RoundContext, uid: str, comps: list[Completion]) -> None:
    if len(comps) != ctx.sampling.n:
        raise RuntimeError(
            f"engine returned {len(comps)} completions for problem {uid!r}, expected {ctx.sampling.n}"
        )


def _score(ctx: RoundContext, groups: list[Group]) -> None:
    if not groups:
        return
    combine_call_metrics(ctx.score_metrics, ctx.score(groups) or {})
    for g in groups:
        check_scored(g)


def _add_seconds(ctx: RoundContext, started: float) -> None:
    """Wall time spent inside the engine, reported as ``perf/generate_s`` (summed over the step)."""
    combine_call_metrics(ctx.score_metrics, {"perf/generate_s": time.perf_counter() - started})


def _settle(ctx: RoundContext, slot: Slot, group: Group) -> None:
    """Record a scored group on its slot."""
    slot.group = group
    slot.generated.append(slot.rung)
    if slot.rung == 0 and group.prompt.hint_ratio == 0.0:
        slot.unhinted_group = group
        slot.unhinted_solved = True if is_solved(group) else (False if is_difficult(group) else None)
    if slot.solved_rung is None and is_solved(group):
        slot.solved_rung = slot.rung


def next_rung(ctx: RoundContext, slot: Slot) -> int | None:
    """The stage after the slot's current one on its path, or None at the end of the path."""
    if slot.path is None:
        return slot.rung + 1 if slot.rung < ctx.top else None
    return next((k for k in slot.path if k > slot.rung), None)


def needs_next(ctx: RoundContext, slot: Slot) -> bool:
    """True when the slot's group is difficult and a higher stage with a hint is available."""
    return (
        ctx.climb
        and slot.group is not None
        and slot.problem.hint is not None
        and next_rung(ctx, slot) is not None
        and is_difficult(slot.group)
    )


def next_stage(ctx: RoundContext, slot: Slot) -> None:
    """Move the slot to the next stage of its path."""
    nxt = next_rung(ctx, slot)
    assert nxt is not None, "climb past the end of the slot's path"
    slot.rung = nxt


def _make_group(ctx: RoundContext, slot: Slot, prompt: Prompt, comps: list[Completion]) -> Group:
    _check_completions(ctx, slot.problem.uid, comps)
    return Group(prompt=prompt, completions=list(comps), stage=slot.rung)


def run_batched(ctx: RoundContext, slots: list[Slot]) -> int:
    """Batched ladder; returns the number of generation passes that ran on any rank."""
    active = list(slots)
    passes = 0
    for p in range(ctx.top + 1 if ctx.climb and not ctx.single_pass else 1):
        if p > 0:
            active = [s for s in slots if needs_next(ctx, s)]
            if not ctx.any_global(bool(active)):
                break
            for s in active:
                next_stage(ctx, s)
        passes += 1
        if not active:
            continue
        prompts = [_prompt_for(ctx, s) for s in active]
        t0 = time.perf_counter()
        outs = ctx.engine.generate([pr.token_ids for pr in prompts], ctx.sampling)
        _add_seconds(ctx, t0)
        if len(outs) != len(prompts):
            raise RuntimeError(f"engine returned {len(outs)} groups for {len(prompts)} prompts")
        groups = [_make_group(ctx, s, pr, c) for s, pr, c in zip(active, prompts, outs)]
        _score(ctx, groups)
        for s, g in zip(active, groups):
            _settle(ctx, s, g)
    return passes


def run_streaming(ctx: RoundContext, slots: list[Slot]) -> int:
    """Streaming ladder on a StreamingRolloutEngine; returns global generation passes."""
    engine = ctx.engine
    if not isinstance(engine, StreamingRolloutEngine):
        raise TypeError(f"streaming needs a StreamingRolloutEngine, got {type(engine).__name__}")
    if engine.has_pending():
        raise RuntimeError(
            "streaming sampler found requests already pending on the engine; it must own the engine"
        )
    inflight: dict[str, tuple[Slot, Prompt]] = {}

    def submit(slot: Slot) -> None:
        prompt = _prompt_for(ctx, slot)
        rid = f"s{ctx.step}.r{ctx.round_index}.g{slot.index}.k{slot.rung}"
        inflight[rid] = (slot, prompt)
        engine.submit(rid, prompt.token_ids, request_sampling(ctx.sampling, slot))

    for s in slots:
        submit(s)
    while engine.has_pending():
        t0 = time.perf_counter()
        finished = engine.poll()
        _add_seconds(ctx, t0)
        if not finished:
            raise RuntimeError("StreamingRolloutEngine.poll returned nothing while requests are pending")
        batch: list[tuple[Slot, Group]] = []
        for rid, comps in finished:
            if rid not in inflight:
                raise RuntimeError(f"engine returned unknown or repeated request id {rid!r}")
            slot, prompt = inflight.pop(rid)
            batch.append((slot, _make_group(ctx, slot, prompt, comps)))
        _score(ctx, [g for _, g in batch])
        for slot, g in batch:
            _settle(ctx, slot, g)
            if not ctx.single_pass and needs_next(ctx, slot):
                next_stage(ctx, slot)
                submit(slot)
    if inflight:
        raise RuntimeError(f"engine reported no pending work but {len(inflight)} requests never returned")
    passes = 1
    for p in range(1, ctx.top + 1 if ctx.climb and not ctx.single_pass else 1):
        ran_here = any(len(s.generated) > p for s in slots)
        if ctx.any_global(ran_here):
            passes += 1
    return passes
