"""Hint construction: exact faithful strings, split modes, guard, property tests, the full MATH file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_ghpo.ghpo import HINT_TEMPLATE, hint_prefix, hinted_problem
from megatron_ghpo.ghpo.hints import guard_limit, math_safe_positions

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MATH_FILE_CANDIDATES = [
    REPO / "megatron_ghpo/resources/train/math_train_l3to5.jsonl",
    Path("/work/shared/data/train/math_train_l3to5.jsonl"),
]


def test_template_is_the_reference_string():
    assert HINT_TEMPLATE == (
        "\n The following text is the beginning part of the answer, which you can refer to for solving the problem:\n"
    )
    assert HINT_TEMPLATE.startswith("\n ") and HINT_TEMPLATE.endswith("problem:\n")


def test_faithful_cut_uses_bankers_rounding():
    # len 10 * 0.25 = 2.5 -> round() gives 2 (banker's), not 3
    assert hinted_problem("P", "abcdefghij", 0.25) == "P" + HINT_TEMPLATE + "ab"
    # len 6 * 0.25 = 1.5 -> 2 ; len 14 * 0.25 = 3.5 -> 4 ; len 2 * 0.75 = 1.5 -> 2
    assert hint_prefix("abcdef", 0.25) == "ab"
    assert hint_prefix("abcdefghijklmn", 0.25) == "abcd"
    assert hint_prefix("ab", 0.75) == "ab"
    assert hint_prefix("abcde", 0.5) == "ab"  # 2.5 -> 2
    assert hint_prefix("abc", 0.5) == "ab"  # 1.5 -> 2
    assert hint_prefix("abc", 0.0) == ""
    assert hint_prefix("abc", 1.0) == "abc"


def test_custom_template():
    assert hinted_problem("Q?", "solution", 0.5, template=" HINT: ") == "Q? HINT: solu"


def test_line_and_sentence_modes_exact():
    sol = "First line.\nWe have $x = 1.5$. So y.\nThus $\\boxed{3}$."
    assert len(sol) == 54
    # 0.5 -> 27 chars, inside "$x = 1.5$": the line cut falls back to the first newline (12)
    assert hint_prefix(sol, 0.5, split="line") == "First line.\n"
    # sentence boundaries: 11 ("line."), 12 (newline), 30 ("1.5$."), 36 ("So y."), 37 (newline)
    # "1.5" is not a boundary (no space after the dot) and lies inside math anyway
    assert hint_prefix(sol, 0.5, split="sentence") == "First line.\n"
    assert hint_prefix(sol, 0.66, split="sentence") == "First line.\nWe have $x = 1.5$. So y."  # 35.64 -> 36
    assert hint_prefix(sol, 0.66, split="line") == "First line.\n"
    assert hint_prefix(sol, 0.7, split="line") == "First line.\nWe have $x = 1.5$. So y.\n"  # 37.8 -> 38
    assert hint_prefix(sol, 1.0, split="line") == sol


def test_split_never_cuts_inside_math_or_groups():
    sol = "Let $a.\nb$ be. Then \\frac{1.\n2}{3} holds.\nEnd."
    for r in [i / 20 for i in range(21)]:
        for split in ("line", "sentence"):
            cut = len(hint_prefix(sol, r, split=split))
            assert math_safe_positions(sol)[cut], (r, split, cut)
            assert cut not in range(5, 12)  # inside $a.\nb$
            assert cut not in range(26, 34)  # inside {1.\n2}


def test_guard_stops_before_final_box():
    sol = "So the answer is $\\boxed{42}$."
    limit = guard_limit(sol)
    assert sol[limit:].startswith("\\boxed{42}")
    assert hint_prefix(sol, 1.0, guard=True) == "So the answer is $"
    assert "\\boxed" not in hint_prefix(sol, 1.0, split="line", guard=True)
    two = "First \\boxed{1} then \\fbox{2} end"
    assert hint_prefix(two, 1.0, guard=True) == "First \\boxed{1} then "
    assert hint_prefix("no box here", 1.0, guard=True) == "no box here"


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="hint ratio"):
        hinted_problem("P", "s", 1.5)
    with pytest.raises(ValueError, match="hint ratio"):
        hinted_problem("P", "s", float("nan"))
    with pytest.raises(TypeError, match="solution_hint"):
        hinted_problem("P", None, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hint_split"):
        hinted_problem("P", "s", 0.5, split="word")


# ---------------------------------------------------------------- property tests
_words = st.text(alphabet="abc xyz.!?\n", min_size=0, max_size=12)
_math_inner = st.text(alphabet="ab .!?\n{}+1", min_size=0, max_size=10).map(
    lambda s: s.replace("{", "").replace("}", "")
)


@st.composite
def solutions(draw):
    """Text from plain/maths/group segments, with the character spans a cut must avoid."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["plain", "math", "group", "display"]))
        if kind == "plain":
            seg = draw(_words).replace("$", "").replace("{", "").replace("}", "").replace("\\", "")
        elif kind == "math":  # non-empty, so "$$" always means display math
            seg = "$" + draw(_math_inner.filter(bool)) + "$"
        elif kind == "display":
            seg = "$$" + draw(_math_inner) + "$$"
        else:
            seg = "\\frac{" + draw(_math_inner) + "}{" + draw(_math_inner) + "}"
        if kind != "plain":
            # a space on each side keeps "$a$" + "$$b$$" from reading as "$a$$$b$$" (ambiguous)
            spans.append((pos + 1, pos + 1 + len(seg)))
            seg = " " + seg + " "
        parts.append(seg)
        pos += len(seg)
    if draw(st.booleans()):
        box = "\\boxed{" + draw(_math_inner) + "}"
        spans.append((pos, pos + len(box)))
        parts.append(box)
    return "".join(parts), spans


ratios = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    sol=solutions(),
    r1=ratios,
    r2=ratios,
    split=st.sampled_from(["char", "line", "sentence"]),
    guard=st.booleans(),
)
def test_hint_is_a_prefix_and_monotone(sol, r1, r2, split, guard):
    text, _ = sol
    lo, hi = sorted((r1, r2))
    a = hint_prefix(text, lo, split=split, guard=guard)
    b = hint_prefix(text, hi, split=split, guard=guard)
    assert text.startswith(a) and text.startswith(b)
    assert b.startswith(a)
    assert len(b) <= round(len(text) * hi)


@settings(max_examples=300, deadline=None)
@given(sol=solutions(), r=ratios, split=st.sampled_from(["line", "sentence"]), guard=st.booleans())
def test_split_modes_never_cut_inside_math(sol, r, split, guard):
    text, spans = sol
    cut = len(hint_prefix(text, r, split=split, guard=guard))
    for start, end in spans:
        assert not (start < cut < end), f"cut {cut} inside {text[start:end]!r} of {text!r}"


@settings(max_examples=300, deadline=None)
@given(sol=solutions(), r=ratios, split=st.sampled_from(["char", "line", "sentence"]))
def test_guard_never_leaks_the_boxed_answer(sol, r, split):
    text, _ = sol
    h = hint_prefix(text, r, split=split, guard=True)
    if "\\boxed" in text:
        assert len(h) <= text.rindex("\\boxed")
        assert h.count("\\boxed") < text.count("\\boxed")


@settings(max_examples=200, deadline=None)
@given(problem=st.text(max_size=20), sol=st.text(max_size=60), r=ratios)
def test_char_mode_equals_reference_expression(problem, sol, r):
    assert hinted_problem(problem, sol, r) == problem + HINT_TEMPLATE + sol[: round(len(sol) * r)]


# ---------------------------------------------------------------- the shared MATH file
def test_faithful_hints_byte_identical_on_math_l3to5():
    path = next((p for p in MATH_FILE_CANDIDATES if p.exists()), None)
    if path is None:
        pytest.skip("math_train_l3to5.jsonl not found in resources/train or /work/shared/data/train")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 5586
    reference_template = "\n The following text is the beginning part of the answer, which you can refer to for solving the problem:\n"
    checked = 0
    for i, row in enumerate(rows):
        for ratio in (0.25, 0.5, 0.75):
            expected = (
                row["problem"] + reference_template + row["solution"][: round(len(row["solution"]) * ratio)]
            )
            got = hinted_problem(row["problem"], row["solution"], ratio)
            assert got.encode("utf-8") == expected.encode("utf-8"), f"row {i} ratio {ratio}"
            checked += 1
    assert checked == 3 * 5586
