"""``hint_retry: next_step``: difficult groups are retried with their next hint in the next step's one
generation pass, and trained then; the same groups the same-step ladder trains, one step later each."""

from __future__ import annotations

import json

import pytest

from megatron_ghpo.config import ConfigError
from megatron_ghpo.config_loader import load_config
from megatron_ghpo.ghpo import DifficultyMemory, GHPOOptions
from megatron_ghpo.ghpo.sampler import merge_results
from tests.unit._ghpo_doubles import StreamingScriptedEngine, problem
from tests.unit.test_ghpo_memory_streaming import sampler_for as _sampler_for

pytestmark = pytest.mark.unit


def sampler_for(options: GHPOOptions, engine=None, calls: list | None = None, **kw):
    """The shared sampler of the memory/streaming tests (same thresholds), recording ``any_global`` calls."""
    log = [] if calls is None else calls
    return _sampler_for(options, engine=engine, any_global=lambda f: log.append(f) or f, **kw)


def trained(res) -> list[tuple[str, float]]:
    return [(g.prompt.problem.uid, g.prompt.hint_ratio) for g in res.groups]


STEPS = ["ABCDE", "FH", "", "", ""]
"""Fresh problems per step; what each step trains follows from THRESHOLDS."""
EXPECTED = [
    [("A", 0.0), ("E", 0.0)],  # B, C, D all wrong unhinted: set aside
    [("B", 0.25), ("F", 0.0)],  # B solved at 0.25; C, D move to 0.5; H (new) set aside
    [("C", 0.5)],  # D moves to 0.75, H to 0.5
    [("D", 0.75)],  # D unsolved at the top stage: trained as sampled; H moves to 0.75
    [("H", 0.75)],
]


@pytest.mark.parametrize("streaming", [False, True])
def test_each_step_runs_one_pass_and_trains_retries_a_step_later(streaming):
    opts = GHPOOptions(hint_retry="next_step", streaming=streaming)
    calls: list[bool] = []
    sampler, engine = sampler_for(opts, engine=StreamingScriptedEngine() if streaming else None, calls=calls)
    got, metrics = [], []
    for step, uids in enumerate(STEPS):
        engine.calls.clear()
        res = sampler.sample([problem(u) for u in uids], step)
        got.append(trained(res))
        metrics.append(res.metrics)
        assert res.metrics["ghpo/generation_passes"] == 1
        if not streaming:
            assert len(engine.calls) == 1  # one generate call: retries ride in the step's only pass
    assert got == EXPECTED
    assert calls == []  # one pass per step: no ladder all-reduces
    assert [m["ghpo/deferred_groups"] for m in metrics] == [3, 3, 2, 1, 0]
    assert [m["ghpo/retried_groups"] for m in metrics] == [0, 3, 3, 2, 1]
    assert [m["ghpo/generated_groups"] for m in metrics] == [5, 5, 3, 2, 1]
    assert [m["ghpo/unsolved_after_ladder"] for m in metrics] == [0, 0, 0, 1, 0]
    assert metrics[0]["ghpo/difficult_frac_stage0"] == 3 / 5  # of the groups that entered this step
    assert sampler.pending_retries == 0


def test_same_groups_as_the_same_step_ladder():
    same, _ = sampler_for(GHPOOptions())
    ref = {g.prompt.problem.uid: g.prompt.user_text for g in same.sample([problem(u) for u in "ABCDEFH"], 0).groups}
    nxt, _ = sampler_for(GHPOOptions(hint_retry="next_step"))
    seen = {}
    for step in range(5):
        for g in nxt.sample([problem(u) for u in "ABCDEFH"] if step == 0 else [], step).groups:
            seen[g.prompt.problem.uid] = g.prompt.user_text
    assert seen == ref


def test_memory_records_the_whole_climb_when_it_ends():
    mem = DifficultyMemory()
    sampler, _ = sampler_for(GHPOOptions(hint_retry="next_step", hint_start="memory"), memory=mem)
    sampler.sample([problem("C")], 0)
    assert mem.get("C") is None  # set aside, not finished: nothing recorded yet
    sampler.sample([], 1)
    assert mem.get("C") is None
    sampler.sample([], 2)  # solved at 0.5 after starting unhinted two steps earlier
    rec = mem.get("C")
    assert (rec.start_ratio, rec.ratio_worked, rec.times_failed_unhinted) == (0.0, 0.5, 1)
    res = sampler.sample([problem("C")], 3)  # next visit starts where it worked
    assert trained(res) == [("C", 0.5)] and res.metrics["ghpo/memory_started_groups"] == 1


def test_a_worker_never_trains_an_empty_batch():
    sampler, _ = sampler_for(GHPOOptions(hint_retry="next_step"))
    res = sampler.sample([problem("C"), problem("D")], 0)
    assert trained(res) == [("C", 0.0), ("D", 0.0)]  # all set aside: trained as sampled as well
    assert sampler.pending_retries == 2
    assert trained(sampler.sample([], 1)) == [("C", 0.25), ("D", 0.25)]  # the retries still run


def test_retries_survive_a_checkpoint():
    opts = GHPOOptions(hint_retry="next_step")
    a, _ = sampler_for(opts)
    a.sample([problem(u) for u in "ABCD"], 0)
    state = json.loads(json.dumps(a.state_dict()))
    b, _ = sampler_for(opts)
    b.load_state_dict(state)
    assert b.pending_retries == 3
    ra, rb = a.sample([problem("F")], 1), b.sample([problem("F")], 1)
    assert trained(ra) == trained(rb) == [("B", 0.25), ("F", 0.0)]
    def counted(m):
        return {k: v for k, v in m.items() if not k.startswith("perf/")}

    assert counted(ra.metrics) == counted(rb.metrics)
    with pytest.raises(ValueError, match="sampler state"):
        b.load_state_dict({"carry": []})
    with pytest.raises(ValueError, match="malformed"):
        b.load_state_dict({"version": 1, "carry": [{"problem": {"uid": "x"}}]})


def test_workers_merge_their_deferrals():
    opts = GHPOOptions(hint_retry="next_step")
    parts = []
    for uids in ("AB", "CD"):
        s, _ = sampler_for(opts)
        parts.append(s.sample([problem(u) for u in uids], 0))
    merged = merge_results(parts)
    assert merged.metrics["ghpo/deferred_groups"] == 3 and merged.metrics["ghpo/difficult_frac_stage0"] == 3 / 4


def test_bad_combinations_are_errors(tmp_path):
    with pytest.raises(ValueError, match="hint_prompt_consistency"):
        GHPOOptions(hint_retry="next_step", hint_prompt_consistency="faithful")
    with pytest.raises(ValueError, match="dynamic_sampling"):
        GHPOOptions(hint_retry="next_step", dynamic_sampling=True)
    with pytest.raises(ValueError, match="hint_retry"):
        GHPOOptions(hint_retry="later")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hint_retry: next_step\nhint_prompt_consistency: faithful\n")
    with pytest.raises(ConfigError, match="hint_prompt_consistency"):
        load_config(cfg)
