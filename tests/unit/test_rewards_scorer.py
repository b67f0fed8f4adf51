"""RewardScorer: weighted sums with None excluded, accuracy by name, columns, metrics, timeouts."""

import math
import threading

import pytest

from megatron_ghpo.call_metrics import combine_call_metrics, finished
from megatron_ghpo.records import Completion, Group, Problem, Prompt
from megatron_ghpo.rewards import RewardScorer, VerifierPool, accuracy_reward, format_reward, get_reward_funcs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(
        2, timeout_s=20.0, warm_up=False
    ) as p:  # generous: these tests check values, not timeouts
        yield p


@pytest.fixture(scope="module")
def short_pool():
    with VerifierPool(2, timeout_s=0.5, warm_up=False) as p:
        yield p


def make_group(answer, texts, uid="p0", **columns):
    problem = Problem(
        uid=uid, problem="What is 1+1?", answer=answer, hint="1+1=2", columns={"problem": "q", **columns}
    )
    prompt = Prompt(problem=problem, user_text="What is 1+1?", text="<user>What is 1+1?", token_ids=[1, 2, 3])
    return Group(
        prompt=prompt, completions=[Completion(token_ids=[7] * (i + 1), text=t) for i, t in enumerate(texts)]
    )


def half_or_none(completions, **columns):
    return [None if "skip" in c else 0.5 for c in completions]


def test_weighted_sum_excludes_none_and_fills_groups(pool):
    scorer = RewardScorer([accuracy_reward, format_reward, half_or_none], [1.0, 0.5, 2.0], pool=pool)
    fmt = "<think>\nr\n</think>\n<answer>\n\\boxed{2}\n</answer>"
    g1 = make_group("$2$", [fmt, "\\boxed{3} skip", "\\boxed{2}"])
    g2 = make_group("forty two", ["\\boxed{42}", "skip"], uid="p1")
    metrics = scorer.score_groups([g1, g2])
    assert g1.reward_components == {
        "accuracy": [1.0, 0.0, 1.0], "format": [1.0, 0.0, 0.0], "half_or_none": [0.5, None, 0.5],
    }  # fmt: skip
    assert g1.rewards == [1.0 + 0.5 + 1.0, 0.0, 1.0 + 1.0]
    assert g1.accuracy == [1.0, 0.0, 1.0]
    assert g2.accuracy == [None, None]  # unparseable gold: never "difficult"
    assert g2.rewards == [1.0, 0.0]  # None accuracy and None custom reward are left out of the sum
    assert metrics["reward/accuracy"] == pytest.approx(2 / 3)  # mean over the 3 non-None values
    assert metrics["reward/half_or_none"] == 0.5
    assert metrics["reward/total"] == pytest.approx((2.5 + 0 + 2 + 1 + 0) / 5)
    assert metrics["reward/timeouts"] == 0.0
    # scored one group per call (as the streaming ladder does), the combined step metrics are the
    # same means over all completions, and counts add up
    total: dict[str, float] = {}
    for g in (g1, g2):
        combine_call_metrics(total, scorer.score_groups([g]))
    combined = finished(total)
    for key in ("reward/accuracy", "reward/half_or_none", "reward/total", "reward/timeouts"):
        assert combined[key] == pytest.approx(metrics[key]), key
    assert not any(k.endswith(":n") for k in combined)


def test_combined_means_ignore_empty_calls_and_sum_counts():
    total: dict[str, float] = {}
    combine_call_metrics(total, {"m": float("nan"), "m:n": 0.0, "c": 1.0})
    assert math.isnan(finished(total)["m"])
    combine_call_metrics(total, {"m": 1.0, "m:n": 1.0, "c": 2.0})
    combine_call_metrics(total, {"m": 0.25, "m:n": 4.0, "c": 0.0})
    assert finished(total) == {"m": pytest.approx(2.0 / 5.0), "c": 3.0}


def test_accuracy_is_found_by_name_not_position_and_optional(pool):
    g = make_group("$2$", ["\\boxed{2}"])
    RewardScorer([format_reward, accuracy_reward], pool=pool).score_groups([g])
    assert g.accuracy == [1.0]
    g = make_group("$2$", ["\\boxed{2}"])
    metrics = RewardScorer([format_reward], pool=pool).score_groups([g])
    assert g.accuracy == [None] and metrics["reward/timeouts"] == 0.0


def test_columns_reach_reward_functions():
    seen = {}

    def spy(completions, solution, problem, level, prompts, completion_ids, **rest):
        seen.update(solution=solution, problem=problem, level=level, prompts=prompts, ids=completion_ids)
        return [float(len(c)) for c in completions]

    g = make_group("\\boxed{2}", ["ab", "abc"], level="Level 3", solution="worked solution \\boxed{2}")
    RewardScorer([spy]).score_groups([g])
    assert seen["solution"] == ["\\boxed{2}", "\\boxed{2}"]  # the gold answer, not the worked solution column
    assert seen["problem"] == ["q", "q"] and seen["level"] == ["Level 3"] * 2
    assert seen["prompts"] == ["<user>What is 1+1?"] * 2 and seen["ids"] == [[7], [7, 7]]
    assert g.rewards == [2.0, 3.0]


def test_repeated_one_group_calls_from_threads_count_their_own_timeouts(short_pool):
    tower = "$\\boxed{" + "9^{" * 8 + "9" + "}" * 8 + "}$"
    scorer = RewardScorer(get_reward_funcs(["accuracy"]), pool=short_pool)
    results, errors = {}, []

    def run(k):
        try:
            for i in range(3):
                g = make_group("$7$", [tower] * k + ["\\boxed{7}"], uid=f"{k}-{i}")
                m = scorer.score_groups([g])
                results[(k, i)] = (m["reward/timeouts"], g.accuracy)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for (k, _), (timeouts, acc) in results.items():
        assert timeouts == k and acc == [0.0] * k + [1.0]


def test_bad_configuration_and_bad_reward_outputs():
    with pytest.raises(ValueError, match="1 entries for 2 reward functions"):
        RewardScorer([format_reward, half_or_none], [1.0])
    with pytest.raises(ValueError, match="appear more than once"):
        RewardScorer([format_reward, format_reward])
    with pytest.raises(ValueError, match="finite number"):
        RewardScorer([format_reward], [math.nan])
    with pytest.raises(ValueError, match="no reward functions"):
        RewardScorer([])

    def short(completions, **kw):
        return [1.0]

    def text(completions, **kw):
        return ["yes"] * len(completions)

    def boom(completions, **kw):
        raise KeyError("level")

    g = make_group("$2$", ["a", "b"])
    with pytest.raises(ValueError, match="'short' returned 1 values for 2 completions"):
        RewardScorer([short]).score_groups([g])
    with pytest.raises(TypeError, match="'text' returned 'yes'"):
        RewardScorer([text]).score_groups([g])
    with pytest.raises(RuntimeError, match="'boom' raised KeyError"):
        RewardScorer([boom]).score_groups([g])


def test_nan_is_treated_like_none():
    def nan_reward(completions, **kw):
        return [math.nan, 1.0]

    g = make_group("$2$", ["a", "b"])
    m = RewardScorer([nan_reward]).score_groups([g])
    assert g.reward_components["nan_reward"] == [None, 1.0] and g.rewards == [0.0, 1.0]
    assert m["reward/nan_reward"] == 1.0
