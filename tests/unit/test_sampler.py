"""GHPOSampler driven through scripted outcomes: exact prompts, ladder stop, NaN, modes, batches."""

from __future__ import annotations

import pytest
import torch

from megatron_ghpo.ghpo import HINT_TEMPLATE, GHPOOptions, GHPOSampler, build_train_batch, group_rewards
from megatron_ghpo.rollout.base import SamplingParams
from tests.unit._ghpo_doubles import (
    NAN,
    NEVER,
    ScriptedEngine,
    ScriptedScore,
    StreamingScriptedEngine,
    encode,
    make_render,
    problem,
)

pytestmark = pytest.mark.unit

G = 4
HINT = "abcdefghijklmnopqrst"  # 20 chars: 0.25 -> 5, 0.5 -> 10, 0.75 -> 15
# A solved unhinted, B at 0.25, C at 0.5, D never, E has an unparseable gold (None accuracy)
THRESHOLDS = {"A": 0.0, "B": 0.25, "C": 0.5, "D": NEVER, "E": NAN}


def user(uid: str, ratio: float) -> str:
    if ratio == 0:
        return f"Problem {uid}?"
    return f"Problem {uid}?" + HINT_TEMPLATE + HINT[: round(len(HINT) * ratio)]


def full(uid: str, ratio: float) -> str:
    return f"<sys>S</sys><user>{user(uid, ratio)}</user><assistant>"


def make(options: GHPOOptions, thresholds=THRESHOLDS, engine=None, **kw):
    engine = engine or ScriptedEngine()
    calls: list[bool] = []

    def any_global(flag: bool) -> bool:
        calls.append(flag)
        return flag

    sampler = GHPOSampler(
        engine=engine,
        render=make_render(options),
        score=ScriptedScore(thresholds),
        sampling=SamplingParams(n=G),
        options=options,
        any_global=kw.pop("any_global", any_global),
        **kw,
    )
    return sampler, engine, calls


def run(options: GHPOOptions, uids="ABCDE", step=0, **kw):
    sampler, engine, calls = make(options, **kw)
    res = sampler.sample([problem(u) for u in uids], step)
    return res, engine, calls


def test_fixed_mode_exact_prompts_passes_and_metrics():
    res, engine, calls = run(GHPOOptions())
    assert engine.calls == [
        [full(u, 0) for u in "ABCDE"],
        [full("B", 0.25), full("C", 0.25), full("D", 0.25)],
        [full("C", 0.5), full("D", 0.5)],
        [full("D", 0.75)],
    ]
    assert calls == [True, True, True]  # K = 3 stage decisions, all needed
    trained = {g.prompt.problem.uid: g for g in res.groups}
    assert [g.prompt.problem.uid for g in res.groups] == list("ABCDE")
    expected_ratio = {"A": 0.0, "B": 0.25, "C": 0.5, "D": 0.75, "E": 0.0}
    for uid, g in trained.items():
        assert g.trained_prompt is g.prompt
        assert g.trained_prompt.user_text == user(uid, expected_ratio[uid])
        assert g.prompt.token_ids == encode(full(uid, expected_ratio[uid]))
    assert [g.stage for g in res.groups] == [0, 1, 2, 3, 0]
    m = res.metrics
    assert m["ghpo/difficult_frac_stage0"] == pytest.approx(3 / 5)
    assert m["ghpo/difficult_frac_stage1"] == pytest.approx(2 / 5)
    assert m["ghpo/difficult_frac_stage2"] == pytest.approx(1 / 5)
    assert m["ghpo/difficult_frac_stage3"] == pytest.approx(1 / 5)
    assert m["ghpo/unsolved_after_ladder"] == 1
    assert m["ghpo/hinted_groups"] == 3
    assert m["ghpo/generation_passes"] == 4
    assert m["ghpo/generated_groups"] == 11 and m["ghpo/regenerated_groups"] == 6
    assert m["ghpo/nan_accuracy_groups"] == 1
    # first pass: A has 1 correct of 4; B, C, D 0 of 4; E unknown -> 1/16
    assert m["ghpo/acc_unhinted"] == pytest.approx(1 / 16)
    # trained: A 1/4, B 1/4, C 1/4, D 0/4, E unknown -> 3/16
    assert m["train/acc"] == pytest.approx(3 / 16)
    assert m["ghpo/hint_ratio/0"] == pytest.approx(2 / 5)
    assert (
        m["ghpo/hint_ratio/0.25"]
        == m["ghpo/hint_ratio/0.5"]
        == m["ghpo/hint_ratio/0.75"]
        == pytest.approx(1 / 5)
    )
    assert m["test/score_calls"] == 4


def test_faithful_mode_reverts_groups_fixed_before_the_last_stage():
    res, engine, _ = run(GHPOOptions(hint_prompt_consistency="faithful"))
    # same sampling as fixed mode
    assert engine.calls[3] == [full("D", 0.75)]
    train = {g.prompt.problem.uid: g.trained_prompt.user_text for g in res.groups}
    sampled = {g.prompt.problem.uid: g.prompt.user_text for g in res.groups}
    # B (fixed at 0.25) and C (fixed at 0.5) are trained on the unhinted prompt: defect B1
    assert train == {
        "A": user("A", 0),
        "B": user("B", 0),
        "C": user("C", 0),
        "D": user("D", 0.75),
        "E": user("E", 0),
    }
    assert sampled["B"] == user("B", 0.25) and sampled["C"] == user("C", 0.5)
    batch = build_train_batch(res.groups, torch.zeros(5, G), eos_token_id=0)
    b_samples = [s for s in batch.samples if s.group_index == 1]
    assert b_samples[0].prompt_ids == encode(full("B", 0))
    assert all(s.old_logprobs is None for s in b_samples)  # engine log-probs belong to the hinted prompt
    d_samples = [s for s in batch.samples if s.group_index == 3]
    assert d_samples[0].prompt_ids == encode(full("D", 0.75)) and d_samples[0].old_logprobs == [
        -0.1,
        -0.2,
        -0.3,
    ]


def test_faithful_mode_when_the_ladder_stops_early():
    res, engine, calls = run(GHPOOptions(hint_prompt_consistency="faithful"), uids="ABC")
    assert len(engine.calls) == 3 and calls == [True, True, False]
    train = {g.prompt.problem.uid: g.trained_prompt.user_text for g in res.groups}
    # the last stage that ran locally is 0.5: C keeps its hint, B reverts
    assert train == {"A": user("A", 0), "B": user("B", 0), "C": user("C", 0.5)}


def test_ladder_stops_when_nothing_is_difficult():
    res, engine, calls = run(GHPOOptions(), uids="AE")
    assert len(engine.calls) == 1 and calls == [False]
    assert res.metrics["ghpo/generation_passes"] == 1
    assert res.metrics["ghpo/difficult_frac_stage0"] == 0.0
    assert res.metrics["ghpo/hinted_groups"] == 0


def test_nan_and_partially_unknown_groups_are_never_hinted():
    thresholds = dict(THRESHOLDS, A=NAN)
    res, engine, _ = run(GHPOOptions(), uids="AE", thresholds=thresholds)
    assert len(engine.calls) == 1
    assert res.metrics["ghpo/nan_accuracy_groups"] == 2
    assert "ghpo/acc_unhinted" not in res.metrics and "train/acc" not in res.metrics

    def partly_unknown(groups):
        for g in groups:
            g.accuracy = [None, 0.0, 0.0, 0.0]
            g.rewards = [0.0] * 4
        return {}

    sampler = GHPOSampler(
        engine=ScriptedEngine(),
        render=make_render(GHPOOptions()),
        score=partly_unknown,
        sampling=SamplingParams(n=G),
        options=GHPOOptions(),
    )
    out = sampler.sample([problem("X")], 0)
    assert out.groups[0].prompt.hint_ratio == 0.0 and out.metrics["ghpo/generation_passes"] == 1


def test_other_rank_keeps_the_ladder_running():
    """A rank without difficult groups still takes part in every stage decision, calling no engine."""
    answers = iter([True, True, False])
    res, engine, _ = run(GHPOOptions(), uids="A", any_global=lambda flag: next(answers))
    assert len(engine.calls) == 1
    assert res.metrics["ghpo/generation_passes"] == 3  # global passes: 0, 0.25, 0.5
    assert list(answers) == []  # exactly three stage decisions were taken


def test_start_hint_step_and_rl_types():
    res, engine, calls = run(GHPOOptions(start_hint_step=5), step=4)
    assert len(engine.calls) == 1 and calls == []  # plain GRPO step: no stage decisions at all
    assert all(g.prompt.hint_ratio == 0 for g in res.groups)
    assert res.metrics["ghpo/difficult_frac_stage0"] == pytest.approx(3 / 5)
    res, engine, calls = run(GHPOOptions(start_hint_step=5), step=5)
    assert len(engine.calls) == 4
    res, engine, calls = run(GHPOOptions(rl_type="grpo"))
    assert len(engine.calls) == 1 and calls == [] and res.metrics["ghpo/hinted_groups"] == 0
    res, engine, calls = run(GHPOOptions(rl_type="grpo_fixed_hint", hint_ratio=0.5))
    assert engine.calls == [[full(u, 0.5) for u in "ABCDE"]] and calls == []
    assert res.metrics["ghpo/hinted_groups"] == 5 and res.metrics["ghpo/hint_ratio/0.5"] == 1.0
    assert "ghpo/acc_unhinted" not in res.metrics  # no unhinted sample (defect B8 kept apart)


def test_problems_without_hint_are_not_regenerated():
    sampler, engine, _ = make(GHPOOptions(), thresholds={"Z": NEVER})
    res = sampler.sample([problem("Z", hint=None)], 0)
    assert len(engine.calls) == 1 and res.metrics["ghpo/unhintable_groups"] == 1
    assert res.metrics["ghpo/unsolved_after_ladder"] == 0


def test_split_and_guard_options_reach_the_prompt():
    opts = GHPOOptions(hint_split="line", hint_guard=True, hint_ladder=[1.0])
    sampler, _, _ = make(opts, thresholds={"Q": 1.0})
    p = problem("Q", hint="Step one.\nStep two $x$.\nSo \\boxed{7}.")
    res = sampler.sample([p], 0)
    assert res.groups[0].prompt.user_text == "Problem Q?" + HINT_TEMPLATE + "Step one.\nStep two $x$.\n"


LINES = "12+34=46\n46+5=51\n51"  # 19 chars, line cuts: 0.25 -> "", 0.5 and 0.75 -> line 1


def line_user(uid: str, prefix: str | None) -> str:
    return f"Problem {uid}?" if prefix is None else f"Problem {uid}?" + HINT_TEMPLATE + prefix


@pytest.mark.parametrize("streaming", [False, True])
def test_stages_repeating_the_previous_hint_are_skipped(streaming):
    opts = GHPOOptions(hint_split="line", streaming=streaming)
    engine = StreamingScriptedEngine() if streaming else None
    sampler, engine, _ = make(opts, thresholds={"L": NEVER, "M": 0.5}, engine=engine)
    res = sampler.sample([problem("L", hint=LINES), problem("M", hint=LINES)], 0)
    seen = [p for call in engine.calls for p in call]
    first = "12+34=46\n"
    # stage 1 (empty hint) and stage 3 (same line as stage 2) are left out: 2 passes, not 4
    expected = [full_text(line_user(u, None)) for u in "LM"] + [full_text(line_user(u, first)) for u in "LM"]
    assert sorted(seen) == sorted(expected) and len(seen) == 4
    assert [g.stage for g in res.groups] == [2, 2]
    m = res.metrics
    assert m["ghpo/repeat_stages_skipped"] == 4
    assert m["ghpo/unsolved_after_ladder"] == 1  # L failed at the last stage of its path
    assert m["ghpo/generation_passes"] == 2


def test_skip_repeats_off_runs_every_stage_like_the_reference():
    opts = GHPOOptions(hint_split="line", hint_skip_repeats=False)
    sampler, engine, _ = make(opts, thresholds={"L": NEVER})
    res = sampler.sample([problem("L", hint=LINES)], 0)
    assert [[p for p in call] for call in engine.calls] == [
        [full_text(line_user("L", None))],
        [full_text(line_user("L", ""))],
        [full_text(line_user("L", "12+34=46\n"))],
        [full_text(line_user("L", "12+34=46\n"))],
    ]
    assert res.groups[0].stage == 3 and res.metrics["ghpo/repeat_stages_skipped"] == 0


def test_memory_start_at_an_empty_hint_starts_unhinted():
    from megatron_ghpo.ghpo.memory import DifficultyMemory, VisitOutcome

    memory = DifficultyMemory()
    # solved at 0.5 on its first try there -> the memory starts it one stage lower, at 0.25 (an empty line cut)
    memory.update(VisitOutcome(uid="L", step=0, start_ratio=0.5, solved_ratio=0.5, unhinted_solved=None))
    assert memory.start_rung("L", [0.0, 0.25, 0.5, 0.75]) == 1
    opts = GHPOOptions(hint_split="line", hint_start="memory")
    sampler, engine, _ = make(opts, thresholds={"L": 0.0}, memory=memory)
    res = sampler.sample([problem("L", hint=LINES)], 1)
    assert engine.calls == [[full_text(line_user("L", None))]]
    assert res.groups[0].stage == 0


def full_text(user_text: str) -> str:
    return f"<sys>S</sys><user>{user_text}</user><assistant>"


def test_build_train_batch_masks_advantages_group_by_group():
    res, _, _ = run(GHPOOptions(), uids="AB")
    rewards = group_rewards(res.groups)
    assert rewards.shape == (2, G)
    adv = torch.arange(8, dtype=torch.float32).view(2, G)
    batch = build_train_batch(res.groups, adv, eos_token_id=0)
    assert len(batch) == 8 and [s.group_index for s in batch.samples] == [0] * G + [1] * G  # consecutive groups
    s = batch.samples[5]
    assert (s.group_index, s.advantage, s.completion_ids, s.completion_mask) == (
        1,
        5.0,
        [11, 11, 0],
        [1, 1, 1],
    )
    assert s.prompt_ids == encode(full("B", 0.25))
    with pytest.raises(ValueError, match="num_groups"):
        build_train_batch(res.groups, torch.zeros(3, G), eos_token_id=0)


def test_bad_wiring_is_a_clear_error():
    with pytest.raises(TypeError, match="streaming"):
        make(GHPOOptions(streaming=True))
    with pytest.raises(ValueError, match="DifficultyMemory"):
        make(GHPOOptions(hint_start="memory"))
    with pytest.raises(ValueError, match="refill"):
        make(GHPOOptions(dynamic_sampling=True))
    with pytest.raises(ValueError, match="hint_ladder"):
        GHPOOptions(hint_ladder=[0.5, 0.25])
    with pytest.raises(ValueError, match="rl_type"):
        GHPOOptions(rl_type="ppo")

    sampler, _, _ = make(GHPOOptions())
    sampler.score = lambda groups: {}
    with pytest.raises(ValueError, match="score left group"):
        sampler.sample([problem("A")], 0)

    sampler, _, _ = make(GHPOOptions())
    good = sampler.render
    sampler.render = lambda p, r: good(p, 0.0)
    with pytest.raises(ValueError, match="hint_ratio"):
        sampler.sample([problem("D")], 0)
