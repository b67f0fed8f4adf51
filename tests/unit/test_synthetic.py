"""Synthetic arithmetic task: correctness of worked solutions, structure, determinism, splits, schema."""

import re

import pytest

from megatron_ghpo.data import (
    DIFFICULTIES,
    SYNTHETIC_ALPHABET,
    Difficulty,
    generate_problems,
    load_problems,
    write_jsonl,
)
from megatron_ghpo.data.synthetic import carries, is_heldout
from megatron_ghpo.ghpo.hints import hint_prefix

pytestmark = pytest.mark.unit

STEP = re.compile(r"^(\d*)([+\-*])(\d+)=(\d+)$")  # a short line (``+67=590``) has no left operand


def test_carries_by_hand():
    assert carries(4837, 2968) == 3  # 7+8 -> 1, 3+6+1 -> 1, 8+9+1 -> 1, 4+2+1 = 7 no carry
    assert carries(123, 456) == 0 and carries(999, 1) == 3 and carries(0, 0) == 0


@pytest.mark.parametrize("name", sorted(DIFFICULTIES))
def test_worked_solutions_are_correct_and_structured(name):
    d = DIFFICULTIES[name]
    for p in generate_problems(200, seed=3, difficulty=name):
        lines = p.hint.split("\n")
        assert lines[-1] == f"\\boxed{{{p.answer}}}" and p.answer == p.columns["solution"]
        if d.later == "repeat" and d.line_format == "short":  # the start value, then a short first step
            assert lines[0].isdigit() and lines[1].startswith("+")
            lines = [lines[0] + lines[1]] + lines[2:]
        steps = [STEP.match(line) for line in lines[:-1]]
        assert all(steps), p.hint
        lo, hi = d.num_steps
        assert lo <= len(steps) <= hi and p.columns["num_steps"] == len(steps)
        value = None
        for i, m in enumerate(steps):
            if d.line_format == "short" and i > 0:
                assert m[1] == "", lines[i]  # the running value is the previous line's result
                a = value
            else:
                assert m[1] != "", lines[i]
                a = int(m[1])
            op, b, r = m[2], int(m[3]), int(m[4])
            assert r == (a * b if op == "*" else a + b if op == "+" else a - b), lines[i]
            if i == 0:  # the hard first step
                assert op == d.first_op and len(str(a)) == d.first_digits + (d.later == "repeat")
                if op == "+":
                    assert len(str(b)) == d.first_digits and carries(a, b) >= d.min_carries
            elif d.later == "repeat":  # every step adds the first step's second operand again
                assert a == value and op == "+" and b == int(steps[0][3])
            elif d.later == "carry":  # every step adds a first_digits-digit number with a carry
                assert a == value and op == "+" and len(str(b)) == d.first_digits and carries(a, b) >= 1
            else:  # easy steps: one digit, no carry/borrow (only the units digit changes)
                assert a == value and b <= 9 and op in "+-" and r // 10 == a // 10
            value = r
        assert str(value) == p.answer
        # the problem is the expression whose value (left to right; ``a+k*n`` for repeat) is the answer
        if d.later == "repeat":
            assert p.problem == f"{steps[0][1]}+{steps[0][3]}*{len(steps)}"
            assert int(steps[0][1]) + int(steps[0][3]) * len(steps) == int(p.answer)
        else:
            assert p.problem == steps[0][1] + steps[0][2] + steps[0][3] + "".join(m[2] + m[3] for m in steps[1:])
        assert p.columns["difficulty"] == d.name
        assert set(p.problem + p.hint) <= set(SYNTHETIC_ALPHABET)


def test_deterministic_distinct_and_seed_dependent():
    a = generate_problems(300, seed=7, difficulty="hard")
    b = generate_problems(300, seed=7, difficulty="hard")
    c = generate_problems(300, seed=8, difficulty="hard")
    assert [p.problem for p in a] == [p.problem for p in b] and [p.uid for p in a] == [p.uid for p in b]
    assert len({p.problem for p in a}) == 300 and len({p.uid for p in a}) == 300
    assert [p.problem for p in a] != [p.problem for p in c]


def test_heldout_split_is_disjoint_from_train_across_seeds():
    train = {p.problem for s in range(3) for p in generate_problems(500, seed=s, difficulty="hard")}
    held = generate_problems(300, seed=99, difficulty="hard", split="heldout")
    assert all(is_heldout(p.problem, 0.1) for p in held) and all(
        p.columns["split"] == "heldout" for p in held
    )
    assert not train & {p.problem for p in held}
    mixed = generate_problems(400, seed=0, difficulty="hard", split="all")
    frac = sum(p.columns["split"] == "heldout" for p in mixed) / 400
    assert 0.04 < frac < 0.18  # ~10% of expressions are held out


def test_a_line_hint_reveals_the_hard_first_step():
    for p in generate_problems(50, seed=1, difficulty="hard"):
        first = p.hint.split("\n")[0] + "\n"
        ratio = len(first) / len(p.hint)
        assert hint_prefix(p.hint, min(1.0, ratio + 0.01), split="line") == first
        assert hint_prefix(p.hint, max(0.0, ratio - 0.05), split="line") == ""


def test_jsonl_round_trip_in_the_ghpo_schema(tmp_path):
    probs = generate_problems(20, seed=0, difficulty="medium")
    path = write_jsonl(probs, tmp_path / "syn.jsonl")
    loaded = load_problems(path)
    assert [(p.uid, p.problem, p.answer, p.hint) for p in loaded] == [
        (p.uid, p.problem, p.answer, p.hint) for p in probs
    ]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown difficulty 'impossible'"):
        generate_problems(1, seed=0, difficulty="impossible")
    with pytest.raises(ValueError, match="split must be one of"):
        generate_problems(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="min_carries"):
        Difficulty(name="x", first_digits=2, min_carries=3)
    with pytest.raises(ValueError, match="later must be one of"):
        Difficulty(name="x", first_digits=2, later="twice")
    with pytest.raises(ValueError, match="needs first_op"):
        Difficulty(name="x", first_digits=2, first_op="*", later="repeat")
    with pytest.raises(ValueError, match="line_format must be one of"):
        Difficulty(name="x", first_digits=2, line_format="terse")
    with pytest.raises(ValueError, match="problem space is too small"):
        generate_problems(101, seed=0, difficulty=Difficulty(name="tiny", first_digits=1, num_steps=(1, 1)))


def test_golds_verify_under_the_accuracy_reward():
    from megatron_ghpo.rewards import VerifierPool, accuracy_reward

    probs = generate_problems(40, seed=0, difficulty="hard_mul")
    with VerifierPool(1, timeout_s=10.0, warm_up=False) as pool:
        right = accuracy_reward([p.hint for p in probs], [p.answer for p in probs], pool=pool)
        wrong = accuracy_reward(
            [f"\\boxed{{{int(p.answer) + 1}}}" for p in probs], [p.answer for p in probs], pool=pool
        )
    assert right == [1.0] * 40 and wrong == [0.0] * 40


def test_long_chain_lines_are_short_and_a_line_hint_shortens_the_chain():
    d = DIFFICULTIES["long_chain"]
    assert d.later == "repeat" and d.line_format == "short" and d.num_steps[0] >= 8
    for p in generate_problems(50, seed=2, difficulty="long_chain"):
        lines = p.hint.split("\n")
        assert re.fullmatch(r"\d{3}", lines[0]) and all(re.fullmatch(r"\+\d\d=\d+", x) for x in lines[1:-1])
        k = lines[1][1:3]
        assert k[1] != "0" and all(x.startswith(f"+{k}=") for x in lines[1:-1])
        assert p.problem == f"{lines[0]}+{k}*{len(lines) - 2}" and p.columns["num_steps"] == len(lines) - 2
        for ratio in (0.25, 0.5, 0.75):  # the hint ends at a line boundary and leaves a shorter chain
            shown = hint_prefix(p.hint, ratio, split="line")
            assert p.hint.startswith(shown) and (shown == "" or shown.endswith("\n"))
            left = len(lines) - 1 - shown.count("\n")
            assert 0 < left < len(lines) - 1 or shown == ""
        assert hint_prefix(p.hint, 0.5, split="line").count("\n") >= (len(lines) - 1) // 2 - 1
