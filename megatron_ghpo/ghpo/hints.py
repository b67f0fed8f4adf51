"""Hint construction: the user turn of a hinted prompt.

Faithful mode (``split="char"``, ``guard=False``) reproduces the reference construction byte for
byte::

    problem + HINT_TEMPLATE + solution_hint[:round(len(solution_hint) * ratio)]

with Python's ``round`` (banker's rounding). The other modes are improvements:

* ``split="line"`` / ``split="sentence"``: the hint ends at the last line (sentence) boundary at or
  before the faithful cut, and never inside inline/display math (``$…$``, ``$$…$$``, ``\\(…\\)``,
  ``\\[…\\]``), a brace group ``{…}`` or a ``\\begin{…}…\\end{…}`` environment.
* ``guard=True``: the hint stops before the solution's final ``\\boxed``/``\\fbox`` so the gold answer
  is never revealed in its boxed form (the cut is ``min(faithful cut, start of the final box)``).
"""

from __future__ import annotations

import math
import re

HINT_TEMPLATE = "\n The following text is the beginning part of the answer, which you can refer to for solving the problem:\n"
"""Text between the problem and the hint prefix (newline, one space, sentence, colon, newline)."""

HINT_SPLITS = ("char", "line", "sentence")

_FINAL_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"hint ratio must be a float in [0, 1], got {ratio!r} ({type(ratio).__name__})")
    if not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"hint ratio must be a finite float in [0, 1], got {ratio!r}; fix hint_ladder / hint_ratio"
        )
    return float(ratio)


def faithful_cut(length: int, ratio: float) -> int:
    """Number of leading characters the reference reveals: ``round(length * ratio)`` (banker's)."""
    return round(length * _check_ratio(ratio))


def guard_limit(solution_hint: str) -> int:
    """Index where the final ``\\boxed``/``\\fbox`` starts (``len`` when the text has none)."""
    last = None
    for m in _FINAL_BOX.finditer(solution_hint):
        last = m
    return last.start() if last is not None else len(solution_hint)


def math_safe_positions(text: str) -> list[bool]:
    """``safe[p]`` is True iff cutting ``text[:p]`` ends outside math, brace groups and environments.

    Returns a list of ``len(text) + 1`` booleans. Escapes (``\\$``, ``\\{``, ``\\}``, ``\\\\``) are
    literals, never delimiters, and a cut is never placed between a backslash and its next character.
    Unbalanced text stays "inside" from the unmatched opener to the end.
    """
    n = len(text)
    safe = [False] * (n + 1)
    math_mode: str | None = None  # "$", "$$", "\\(", "\\["
    depth = 0
    env = 0
    i = 0
    safe[0] = True
    while i < n:
        c = text[i]
        step = 1
        if c == "\\" and i + 1 < n:
            nxt = text[i + 1]
            step = 2
            if nxt in "([" and math_mode is None:
                math_mode = "\\" + nxt
            elif (nxt == ")" and math_mode == "\\(") or (nxt == "]" and math_mode == "\\["):
                math_mode = None
            elif text.startswith("begin{", i + 1):
                env += 1
            elif text.startswith("end{", i + 1):
                env = max(0, env - 1)
        elif c == "$":
            if i + 1 < n and text[i + 1] == "$" and math_mode in (None, "$$"):
                math_mode = "$$" if math_mode is None else None
                step = 2
            elif math_mode is None:
                math_mode = "$"
            elif math_mode == "$":
                math_mode = None
        elif c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        i += step
        safe[i] = math_mode is None and depth == 0 and env == 0
    return safe


def _boundaries(text: str, split: str) -> list[int]:
    """Candidate cut positions for ``split`` (ascending), always including 0 and ``len(text)``."""
    cuts = {0, len(text)}
    for i, c in enumerate(text):
        if c == "\n":
            cuts.add(i + 1)
    if split == "sentence":
        for m in _SENTENCE_END.finditer(text):
            cuts.add(m.end())
    return sorted(cuts)


def hint_prefix(solution_hint: str, ratio: float, *, split: str = "char", guard: bool = False) -> str:
    """The revealed prefix of ``solution_hint`` for ``ratio`` (always a prefix, monotone in ratio)."""
    if not isinstance(solution_hint, str):
        raise TypeError(
            f"solution_hint must be a str (the worked solution), got {type(solution_hint).__name__}; "
            "rows without a hint column cannot be hinted (check data.hint_column)"
        )
    if split not in HINT_SPLITS:
        raise ValueError(f"hint_split must be one of {HINT_SPLITS}, got {split!r}")
    target = faithful_cut(len(solution_hint), ratio)
    if guard:
        target = min(target, guard_limit(solution_hint))
    if split == "char":
        return solution_hint[:target]
    safe = math_safe_positions(solution_hint)
    best = 0
    for p in _boundaries(solution_hint, split):
        if p > target:
            break
        if safe[p] or p == 0:
            best = p
    return solution_hint[:best]


def hinted_problem(
    problem: str,
    solution_hint: str,
    ratio: float,
    *,
    template: str = HINT_TEMPLATE,
    split: str = "char",
    guard: bool = False,
) -> str:
    """The hinted user turn: ``problem + template + hint_prefix(solution_hint, ratio)``.

    With the defaults this is byte-identical to the reference:
    ``problem + HINT_TEMPLATE + solution_hint[:round(len(solution_hint) * ratio)]``.
    """
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    if not isinstance(template, str):
        raise TypeError(f"hint_template must be a str, got {type(template).__name__}")
    return problem + template + hint_prefix(solution_hint, ratio, split=split, guard=guard)
