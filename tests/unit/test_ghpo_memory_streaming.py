"""Difficulty memory, streaming, DAPO dynamic sampling and multi-rank call discipline of the sampler."""

from __future__ import annotations

import json

import pytest

from megatron_ghpo.ghpo import DifficultyMemory, GHPOOptions, GHPOSampler, VisitOutcome
from megatron_ghpo.ghpo.sampler import merge_results
from megatron_ghpo.rollout.base import SamplingParams
from tests.unit._ghpo_doubles import (
    NAN,
    NEVER,
    ScriptedEngine,
    ScriptedScore,
    StreamingScriptedEngine,
    ThreadCollective,
    make_render,
    problem,
    run_in_threads,
)

pytestmark = pytest.mark.unit

G = 4
THRESHOLDS = {"A": 0.0, "B": 0.25, "C": 0.5, "D": NEVER, "E": NAN, "F": 0.0, "H": 0.75}


def sampler_for(options, engine=None, thresholds=THRESHOLDS, **kw):
    engine = engine or ScriptedEngine()
    return GHPOSampler(
        engine=engine,
        render=make_render(options),
        score=ScriptedScore(thresholds),
        sampling=SamplingParams(n=G),
        options=options,
        **kw,
    ), engine


# ---------------------------------------------------------------- memory
def test_memory_start_needs_fewer_passes_on_the_second_epoch():
    mem = DifficultyMemory()
    opts = GHPOOptions(hint_start="memory")
    sampler, engine = sampler_for(opts, memory=mem)
    problems = [problem(u) for u in "ABCDE"]
    first = sampler.sample(problems, 0)
    assert first.metrics["ghpo/generation_passes"] == 4 and first.metrics["ghpo/generated_groups"] == 11
    rec = mem.get("C")
    assert (rec.times_seen, rec.times_failed_unhinted, rec.ratio_worked, rec.start_ratio) == (1, 1, 0.5, 0.0)
    assert mem.get("D").unsolved and mem.get("A").times_solved_unhinted == 1
    assert mem.get("E").ratio_worked is None and not mem.get("E").unsolved  # inconclusive: unknown gold

    engine.calls.clear()
    second = sampler.sample(problems, 1)
    # A and E start unhinted; B, C start at the stage that worked; D (failed everywhere) at the top
    assert [g.prompt.hint_ratio for g in second.groups] == [0.0, 0.25, 0.5, 0.75, 0.0]
    assert len(engine.calls) == 1
    assert second.metrics["ghpo/generation_passes"] == 1 and second.metrics["ghpo/generated_groups"] == 5
    assert second.metrics["ghpo/memory_started_groups"] == 3
    assert second.metrics["ghpo/memory_skipped_passes"] == 1 + 2 + 3
    assert second.metrics["ghpo/unsolved_after_ladder"] == 1

    # third epoch: B and C solved at their first try -> probe one stage lower
    engine.calls.clear()
    third = sampler.sample(problems, 2)
    assert [g.prompt.hint_ratio for g in third.groups] == [0.0, 0.25, 0.5, 0.75, 0.0]
    assert engine.calls[0][1].count("beginning part") == 0  # B probed unhinted first
    assert third.metrics["ghpo/generation_passes"] == 2  # B and C climb back one stage each


def test_memory_probes_back_off_while_the_hint_is_still_needed():
    thresholds = {"C": 0.5}
    mem = DifficultyMemory()
    sampler, _ = sampler_for(GHPOOptions(hint_start="memory"), thresholds=thresholds, memory=mem)

    def visit(step: int) -> tuple[float, float]:
        res = sampler.sample([problem("C")], step)
        return mem.get("C").start_ratio, res.metrics["ghpo/generation_passes"]

    starts, passes = zip(*[visit(step) for step in range(11)])
    # cold climb to 0.5; then a probe one stage lower after 1, 2 and 4 first-try solves at 0.5, each
    # failing (one extra pass), so the wait doubles
    assert starts == (0.0, 0.5, 0.25, 0.5, 0.5, 0.25, 0.5, 0.5, 0.5, 0.5, 0.25)
    assert passes == (3, 1, 2, 1, 1, 2, 1, 1, 1, 1, 2)
    assert mem.get("C").probe_after == 8
    # the policy outgrows the hint: the next probe (after 8 first-try solves) succeeds and resets the wait
    thresholds["C"] = 0.0
    starts = [visit(step)[0] for step in range(11, 20)]
    assert starts == [0.5] * 8 + [0.25]
    rec = mem.get("C")
    assert rec.probe_after == 1 and rec.first_try_streak == 1
    assert visit(20) == (0.0, 1) and visit(21) == (0.0, 1)  # probed again at once: unhinted, solved


def test_memory_state_dict_round_trip_and_errors():
    mem = DifficultyMemory()
    mem.update(VisitOutcome(uid="x", step=3, start_ratio=0.0, solved_ratio=0.5, unhinted_solved=False))
    mem.update(VisitOutcome(uid="y", step=3, start_ratio=0.0, solved_ratio=None, unhinted_solved=False))
    state = json.loads(json.dumps(mem.state_dict()))  # checkpoints may store it as JSON
    other = DifficultyMemory()
    other.load_state_dict(state)
    rungs = [0.0, 0.25, 0.5, 0.75]
    assert other.state_dict() == mem.state_dict() and len(other) == 2
    assert (
        other.start_rung("x", rungs) == 2
        and other.start_rung("y", rungs) == 3
        and other.start_rung("z", rungs) == 0
    )
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({"records": {}})
    with pytest.raises(ValueError, match="unknown fields"):
        other.load_state_dict({"version": 1, "records": {"x": {"bogus": 1}}})


# ---------------------------------------------------------------- streaming
def test_streaming_trains_the_same_groups_and_resubmits_early():
    opts = GHPOOptions(streaming=True)
    calls: list[bool] = []
    engine = StreamingScriptedEngine()
    sampler, _ = sampler_for(opts, engine=engine, any_global=lambda f: calls.append(f) or f)
    res = sampler.sample([problem(u) for u in "ABCDE"], 0)
    batched, _ = sampler_for(GHPOOptions())
    ref = batched.sample([problem(u) for u in "ABCDE"], 0)
    assert [g.prompt.text for g in res.groups] == [g.prompt.text for g in ref.groups]
    assert [g.stage for g in res.groups] == [0, 1, 2, 3, 0]
    # D's 0.25 regeneration is queued before A's unhinted result comes back (no full second pass)
    log = engine.log
    assert log.index("submit s0.r0.g3.k1") < log.index("done s0.r0.g0.k0")
    assert len(engine.calls) == 11  # 5 first-pass + 3 + 2 + 1 regenerations, one request each
    assert calls == [True, True, True]  # exactly K accounting all-reduces
    assert res.metrics["ghpo/generation_passes"] == 4
    for key in ("ghpo/difficult_frac_stage1", "ghpo/unsolved_after_ladder", "train/acc", "ghpo/acc_unhinted"):
        assert res.metrics[key] == ref.metrics[key], key


# ---------------------------------------------------------------- dynamic sampling
def test_dynamic_sampling_drops_zero_variance_groups_and_refills():
    fresh = iter([problem("F"), problem("H"), problem("A2")])
    asked: list[int] = []

    def refill(n):
        asked.append(n)
        return [next(fresh) for _ in range(n)]

    thresholds = dict(THRESHOLDS, A2=0.0)
    opts = GHPOOptions(dynamic_sampling=True)
    sampler, _ = sampler_for(opts, thresholds=thresholds, refill=refill)
    res = sampler.sample([problem(u) for u in "ABDE"], 0)
    # D (all wrong after the ladder) and E (unknown gold, rewards all 0) are zero-variance -> dropped
    assert [g.prompt.problem.uid for g in res.groups] == ["A", "B", "F", "H"]
    assert asked == [2]
    assert res.groups[3].prompt.hint_ratio == 0.75  # refilled problems go through the ladder too
    assert res.metrics["dapo/dropped_groups"] == 2 and res.metrics["dapo/refill_rounds"] == 1
    assert res.metrics["dapo/filler_groups"] == 0


def test_dynamic_sampling_fills_with_dropped_groups_when_data_runs_out():
    opts = GHPOOptions(dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    sampler, _ = sampler_for(opts, refill=lambda n: [])
    res = sampler.sample([problem(u) for u in "ADE"], 0)
    assert [g.prompt.problem.uid for g in res.groups] == ["A", "D", "E"]
    assert res.metrics["dapo/refill_rounds"] == 2 and res.metrics["dapo/filler_groups"] == 2


# ---------------------------------------------------------------- two "ranks" on threads
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_two_ranks_make_matching_collective_calls(streaming, dynamic):
    """Ranks with different difficulty profiles finish without deadlock and agree on passes."""
    coll = ThreadCollective(world=2)
    problems = {0: [problem(u) for u in "AAE"], 1: [problem(u) for u in "BCD"]}
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        engine = StreamingScriptedEngine() if streaming else ScriptedEngine()
        opts = GHPOOptions(streaming=streaming, dynamic_sampling=dynamic, hint_start="memory")
        sampler, _ = sampler_for(
            opts,
            engine=engine,
            any_global=coll.any_global(rank),
            memory=DifficultyMemory(),
            gather_objects=coll.gather(rank),
            refill=lambda n: [problem("F") for _ in range(n)],
        )
        results[rank] = (sampler.sample(problems[rank], 0), sampler.memory)

    run_in_threads(rank_main, 2)
    assert coll.calls[0] == coll.calls[1]
    r0, m0 = results[0]
    r1, m1 = results[1]
    assert r0.metrics["ghpo/generation_passes"] == r1.metrics["ghpo/generation_passes"] >= 4
    assert len(r0.groups) == len(r1.groups) == 3
    assert m0.state_dict() == m1.state_dict() and "D" in m0 and "A" in m1  # memory shared by all ranks


@pytest.mark.parametrize("streaming", [False, True])
def test_shares_sampled_by_two_workers_merge_into_the_single_worker_result(streaming):
    """Rollout on every rank: each worker samples a consecutive share of the batch (collective ladder
    decisions, shared memory); the leader's merge gives the groups and metrics of one worker
    sampling the whole batch. Two steps, so the memory start takes part."""
    uids = "ABCDEH"
    shares = {0: uids[:3], 1: uids[3:]}
    opts = GHPOOptions(streaming=streaming, hint_start="memory")

    def make_sampler(**kw):
        engine = StreamingScriptedEngine() if streaming else ScriptedEngine()
        return sampler_for(opts, engine=engine, memory=DifficultyMemory(), **kw)[0]

    single = make_sampler()
    expected = [single.sample([problem(u) for u in uids], step) for step in range(2)]

    coll = ThreadCollective(world=2)
    parts: dict[tuple[int, int], object] = {}

    def worker(rank: int) -> None:
        sampler = make_sampler(any_global=coll.any_global(rank), gather_objects=coll.gather(rank))
        for step in range(2):
            parts[(step, rank)] = sampler.sample([problem(u) for u in shares[rank]], step)

    run_in_threads(worker, 2)
    for step in range(2):
        merged = merge_results([parts[(step, 0)], parts[(step, 1)]])
        want = expected[step]
        assert [(g.prompt.text, g.stage) for g in merged.groups] == [(g.prompt.text, g.stage) for g in want.groups]
        drop = {k for k in want.metrics if k.startswith("perf/")} | {"test/score_calls"}  # one scorer per worker
        assert merged.metrics["test/score_calls"] >= want.metrics["test/score_calls"]
        assert {k: v for k, v in merged.metrics.items() if k not in drop} == pytest.approx(
            {k: v for k, v in want.metrics.items() if k not in drop}, nan_ok=True
        )
    assert expected[1].metrics["ghpo/memory_started_groups"] > 0
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])
