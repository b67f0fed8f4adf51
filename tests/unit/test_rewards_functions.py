"""Reward functions: hand-checked values (open-r1 / TRL test semantics), registry and errors."""

import math

import pytest

from megatron_ghpo.rewards import (
    VerifierPool,
    accuracy_reward,
    completion_texts,
    format_reward,
    get_cosine_scaled_reward,
    get_reward_funcs,
    get_soft_overlong_punishment,
    len_reward,
    reasoning_steps_reward,
    tag_count_reward,
)
from megatron_ghpo.rewards.registry import reward_name

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(2, timeout_s=10.0, warm_up=False) as p:
        yield p


def conv(text):
    return [{"role": "assistant", "content": text}]


def test_completion_texts_accepts_strings_and_conversations():
    assert completion_texts(["a", conv("b")]) == ["a", "b"]
    with pytest.raises(TypeError, match="completion 1 is int"):
        completion_texts(["a", 3])


def test_format_reward():
    good = "<think>\nsome reasoning\n</think>\n<answer>\n42\n</answer>"
    multiline = "<think>\nline 1\nline 2\n</think>\n<answer>\nx\ny\n</answer>"
    bad = [
        "<think>\nreasoning\n</think>\n42",  # no answer tags
        "<answer>\n42\n</answer>\n<think>\nr\n</think>",  # reordered
        "<think>reasoning</think><answer>42</answer>",  # no newlines
    ]
    assert format_reward([good, multiline, *bad]) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert format_reward([conv(good)]) == [1.0]


def test_tag_count_reward_quarter_per_tag():
    assert tag_count_reward(["<think>\nx\n</think>\n<answer>\ny\n</answer>"]) == [1.0]
    assert tag_count_reward(["<think>\nx"]) == [0.25]
    assert tag_count_reward(["<think>\nx\n</think>\n"]) == [0.5]
    assert tag_count_reward(["<think>\n<think>\n"]) == [0.0]  # twice does not count
    assert tag_count_reward(["nothing"]) == [0.0]


def test_reasoning_steps_reward():
    texts = [
        "Step 1: a\nStep 2: b\nStep 3: c",
        "First, we do this.\nSecond, we do that.\nFinally, we conclude.",
        "Step 1: Only step",
        "First, we do this.\nFinally, we conclude.",
        "Just plain text without any clear steps",
    ]
    got = reasoning_steps_reward(texts)
    assert got[:2] == [1.0, 1.0]
    assert got[2] == pytest.approx(1 / 3) and got[3] == pytest.approx(2 / 3) and got[4] == 0.0


def test_soft_overlong_punishment_matches_dapo_formula():
    fn = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    ids = [[1] * 50, [1] * 80, [1] * 90, [1] * 100, [1] * 110]
    assert fn(["x"] * 5, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(KeyError, match="completion_ids"):
        fn(["x"])
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(10, 20)


def test_accuracy_reward_reference_cases(pool):
    comps = [
        r"\boxed{\frac{63}{400}}",
        r"\boxed{\frac{64}{400}}",
        r"\boxed{3}",
        "The answer is $\\boxed{0.5}$",
        r"\boxed{42}",
        "no box, 1/2",
    ]
    sols = [r"\frac{63}{400}", r"\frac{63}{400}", "6", "$\\frac{1}{2}$", "forty two", "$\\frac{1}{2}$"]
    assert accuracy_reward(comps, sols, pool=pool) == [1.0, 0.0, 0.0, 1.0, None, 0.0]
    assert accuracy_reward([conv(r"\boxed{\frac{63}{400}}")], [r"\frac{63}{400}"], pool=pool) == [1.0]
    with pytest.raises(ValueError, match="2 entries for 1 completions"):
        accuracy_reward(["x"], ["1", "2"], pool=pool)


def test_cosine_scaled_reward_open_r1_values(pool):
    fn = get_cosine_scaled_reward(-1.0, -0.5, 0.5, 1.0, max_len=100)
    right, wrong, gold = r"\boxed{\frac{63}{400}}", r"\boxed{\frac{64}{400}}", r"\frac{63}{400}"
    comps = [right, right + " " * 58, wrong, wrong + " " * 58]  # lengths 22 and 80
    got = fn(comps, [gold] * 4, pool=pool)
    assert got == pytest.approx([0.943, 0.547, -0.942, -0.547], abs=1e-3)
    # hand formula for the first: 0.5 + 0.25 * (1 + cos(pi * 22 / 100))
    assert got[0] == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 0.22)))
    assert fn([right], ["forty two"], pool=pool) == [None]


def test_len_reward_kimi(pool):
    gold = "$\\frac{1}{2}$"
    assert len_reward([r"\boxed{1/2}", r"\boxed{1/2}"], [gold] * 2, pool=pool) == [0.0, 0.0]
    comps = [
        r"\boxed{0.5}",
        r"\boxed{0.5} padding padding",
        r"\boxed{7} wrong",
        r"\boxed{7} much longer wrong answer",
    ]
    got = len_reward(comps, [gold] * 4, pool=pool)
    assert got[0] == 0.5  # shortest correct
    assert got[1] < got[0]  # shorter is better among correct
    assert got[2] <= 0 and got[3] <= 0 and got[3] < got[2] + 1e-12
    # an unparseable gold counts as correct
    assert len_reward(["a", "abc"], ["forty two"] * 2, pool=pool) == [0.5, -0.5]


def test_registry_names_options_and_dotted_paths():
    funcs = get_reward_funcs(["accuracy", "format", "tag_count", "reasoning_steps", "cosine", "length"])
    assert [reward_name(f) for f in funcs] == [
        "accuracy",
        "format",
        "tag_count",
        "reasoning_steps",
        "cosine",
        "length",
    ]
    (soft,) = get_reward_funcs(["soft_overlong"], max_completion_len=10, soft_punish_cache=5)
    assert soft(["x"], completion_ids=[[0] * 8]) == [-0.6]
    (custom,) = get_reward_funcs(["megatron_ghpo.rewards.functions:format_reward"])
    assert custom is format_reward
    (custom2,) = get_reward_funcs(["megatron_ghpo.rewards.functions.tag_count_reward"])
    assert custom2 is tag_count_reward


@pytest.mark.parametrize(
    "names, options, match",
    [
        (["acuracy"], {}, "unknown reward function 'acuracy'; did you mean 'accuracy'"),
        (["formt"], {}, "did you mean 'format'"),
        (["nosuch.module:fn"], {}, "cannot import module 'nosuch.module'"),
        (["megatron_ghpo.rewards.functions:nope"], {}, "has no attribute 'nope'"),
        (["soft_overlong"], {}, "needs max_completion_len and soft_punish_cache"),
        (["accuracy"], {"cosine_maxlen": 3}, "did you mean 'cosine_max_len'"),
    ],
)
def test_registry_errors_name_the_problem(names, options, match):
    with pytest.raises(ValueError, match=match):
        get_reward_funcs(names, **options)


def test_registry_rejects_a_bare_string():
    with pytest.raises(TypeError, match=r"write \['accuracy'\]"):
        get_reward_funcs("accuracy")
