"""Synthetic multi-step integer arithmetic for the CPU demo (GHPO schema, a tiny character set).

A problem is an expression evaluated left to right, e.g. ``4837+2968+5-3``. Its worked solution has
one line per step and ends with the boxed answer::

    4837+2968=7805
    7805+5=7810
    7810-3=7807
    \\boxed{7807}

The task is built so that a *prefix* of the solution removes the hard part (see
``../shared/docs/demo-notes.md``): the first step is the hard one (multi-digit operands with a
required number of carries, or a multi-digit by one-digit product) and every later step adds or
subtracts one digit without carry or borrow. A hint that reveals the first line leaves only easy
steps, which a model warmed up on easy problems can do; the unhinted model must do the hard step.

With ``later="carry"`` every step adds a ``first_digits``-digit number with a carry instead, so the task
is a chain of one moderately hard step kind and a hint shortens the chain left to the model; with
``line_format="short"`` the lines after the first omit the running value (``+67=590``). With
``later="repeat"`` the problem is ``523+67*9`` (a ``first_digits + 1``-digit start, then the same
``first_digits``-digit number added 9 times; its value is the answer) and every line adds that number
to the previous line's result, so each step needs only the line before it; with short lines the
solution starts with the start value on a line of its own (``523``, ``+67=590``, ``+67=657``, ...), so
the first step is written like every other.

Difficulty = (digits of the first step's operands, carries it needs, number of steps, later steps). Problems are
deterministic in ``seed``; ``split="heldout"`` draws from a fixed set of expressions (selected by a
hash of the expression text) that ``split="train"`` never produces, whatever the seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_ghpo.records import Problem

SYNTHETIC_ALPHABET = "0123456789+-*=\n\\boxed{}"
"""Every character a problem or worked solution can contain."""

SPLITS = ("train", "heldout", "all")
LINE_FORMATS = ("full", "short")
LATER_STEPS = ("easy", "carry", "repeat")


@dataclass(frozen=True, kw_only=True)
class Difficulty:
    """How hard a synthetic problem is."""

    name: str
    """Label stored in the ``difficulty`` column."""
    first_digits: int
    """Digits of the first step's operands (the hard part)."""
    first_op: str = "+"
    """``+`` (both operands ``first_digits`` long) or ``*`` (``first_digits`` × one digit 2–9)."""
    min_carries: int = 0
    """For ``+``: the first step must produce at least this many carries."""
    num_steps: tuple[int, int] = (2, 3)
    """Inclusive range of the number of steps (the first one included)."""
    later: str = "easy"
    """Steps after the first: ``easy`` (add or subtract one digit, no carry or borrow), ``carry``
    (add a ``first_digits``-digit number with at least one carry: every step exercises the hard skill) or
    ``repeat`` (add the first step's second operand again; the problem is written ``a+k*n``)."""
    line_format: str = "full"
    """Solution lines after the first: ``full`` (``523+67=590``) or ``short`` (``+67=590``: the running
    value is the previous line's result, so a line costs fewer tokens). The first line is full, except
    for ``later="repeat"`` with short lines, whose solution starts with a line holding the start value."""

    def __post_init__(self) -> None:
        if self.first_digits < 1:
            raise ValueError(f"Difficulty.first_digits must be >= 1, got {self.first_digits}")
        if self.first_op not in ("+", "*"):
            raise ValueError(f"Difficulty.first_op must be '+' or '*', got {self.first_op!r}")
        if not 0 <= self.min_carries <= self.first_digits:
            raise ValueError(
                f"Difficulty.min_carries must be in [0, first_digits={self.first_digits}], got {self.min_carries}"
            )
        if self.later not in LATER_STEPS:
            raise ValueError(f"Difficulty.later must be one of {LATER_STEPS}, got {self.later!r}")
        if self.line_format not in LINE_FORMATS:
            raise ValueError(f"Difficulty.line_format must be one of {LINE_FORMATS}, got {self.line_format!r}")
        if self.later in ("carry", "repeat") and self.first_op != "+":
            raise ValueError(f"Difficulty.later={self.later!r} needs first_op '+' (products grow past the task's size)")
        lo, hi = self.num_steps
        if not 1 <= lo <= hi:
            raise ValueError(
                f"Difficulty.num_steps must be (lo, hi) with 1 <= lo <= hi, got {self.num_steps}"
            )


DIFFICULTIES = {
    "easy": Difficulty(name="easy", first_digits=1, num_steps=(2, 4)),
    "medium": Difficulty(name="medium", first_digits=2, min_carries=1, num_steps=(2, 4)),
    "hard": Difficulty(name="hard", first_digits=4, min_carries=3, num_steps=(2, 4)),
    "hard_mul": Difficulty(name="hard_mul", first_digits=3, first_op="*", num_steps=(2, 4)),
    "chain": Difficulty(name="chain", first_digits=2, min_carries=1, later="carry", num_steps=(3, 4)),
    "long_chain": Difficulty(name="long_chain", first_digits=2, min_carries=1, later="repeat", line_format="short",
                             num_steps=(9, 12)),
}
"""Presets: ``easy`` (one-digit first step) for warm-up SFT; ``medium`` (one two-digit step with a carry,
then easy steps), ``hard`` / ``hard_mul`` (first steps far beyond a small model); ``chain`` (every step
adds a two-digit number with a carry: a hint that reveals the first lines shortens the chain the model
must get right, and the rest of a hinted solution still exercises the same skill); ``long_chain``
(``523+67*9``: 9-12 steps that each add the same two-digit number to a three- or four-digit running
value, short lines ``+67=657``: a long chain of one moderately hard operation whose inputs are all in
the line before and the prompt)."""


def carries(a: int, b: int) -> int:
    """Number of carries when adding ``a + b`` column by column (non-negative integers)."""
    count = carry = 0
    while a or b:
        carry = 1 if a % 10 + b % 10 + carry >= 10 else 0
        count += carry
        a, b = a // 10, b // 10
    return count


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _first_step(rng: random.Random, d: Difficulty) -> tuple[int, str, int]:
    if d.first_op == "*":
        return _operand(rng, d.first_digits), "*", rng.randint(2, 9)
    for _ in range(10_000):
        a = _operand(rng, d.first_digits + (d.later == "repeat"))
        b = _operand(rng, d.first_digits)
        if d.later == "repeat" and b % 10 == 0:  # a multiple of ten never carries out of the units
            continue
        if carries(a, b) >= d.min_carries:
            return a, "+", b
    raise ValueError(
        f"difficulty {d.name!r}: cannot find {d.first_digits}-digit operands with {d.min_carries} carries"
    )


def _easy_step(rng: random.Random, value: int) -> tuple[str, int]:
    """One-digit + or - that changes only the units digit (no carry, no borrow)."""
    units = value % 10
    ops = [op for op, room in (("+", 9 - units), ("-", units)) if room >= 1]
    op = rng.choice(ops)
    return op, rng.randint(1, 9 - units if op == "+" else units)


def _carry_step(rng: random.Random, value: int, digits: int) -> tuple[str, int] | None:
    """Add a ``digits``-digit number that makes at least one carry (None when none can, e.g. 200 + 2 digits)."""
    options = [k for k in range(10 ** (digits - 1) if digits > 1 else 0, 10**digits) if carries(value, k) >= 1]
    return ("+", rng.choice(options)) if options else None


def make_problem(rng: random.Random, difficulty: Difficulty) -> tuple[str, list[str], int]:
    """(expression, solution lines without the box, answer) of one random problem."""
    while True:
        built = _try_problem(rng, difficulty)
        if built is not None:
            return built


def _try_problem(rng: random.Random, difficulty: Difficulty) -> tuple[str, list[str], int] | None:
    a, op, b = _first_step(rng, difficulty)
    value = a * b if op == "*" else a + b
    expr = f"{a}{op}{b}"
    lines = [f"{expr}={value}"]
    n = rng.randint(*difficulty.num_steps)
    if difficulty.later == "repeat":
        expr = f"{a}+{b}*{n}"  # its value: a, then b added n times
        if difficulty.line_format == "short":  # the start value on a line of its own: every step alike
            lines = [str(a), f"+{b}={value}"]
    for _ in range(n - 1):
        if difficulty.later == "repeat":
            op, k = "+", b
        elif difficulty.later == "carry":
            step = _carry_step(rng, value, difficulty.first_digits)
            if step is None:
                return None
            op, k = step
        else:
            op, k = _easy_step(rng, value)
        new = value + k if op == "+" else value - k
        if difficulty.later != "repeat":
            expr += f"{op}{k}"
        lines.append(f"{value if difficulty.line_format == 'full' else ''}{op}{k}={new}")
        value = new
    return expr, lines, value


def is_heldout(expr: str, heldout_fraction: float) -> bool:
    """Whether an expression belongs to the held-out split (a fixed hash of its text)."""
    h = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big")
    return h / 2**64 < heldout_fraction


def generate_problems(
    n: int,
    *,
    seed: int,
    difficulty: str | Difficulty = "hard",
    split: str = "train",
    heldout_fraction: float = 0.1,
) -> list[Problem]:
    """``n`` distinct problems of one difficulty and split, deterministic in ``seed``.

    Each Problem has ``answer`` = the final value, ``hint`` = the worked solution, and ``columns``
    in the GHPO schema (``problem``, ``solution`` = answer, ``solution_hint`` = worked solution) plus
    ``difficulty``, ``num_steps`` and ``split``.
    """
    d = DIFFICULTIES.get(difficulty) if isinstance(difficulty, str) else difficulty
    if d is None:
        raise ValueError(
            f"unknown difficulty {difficulty!r}; presets: {sorted(DIFFICULTIES)} or pass a Difficulty"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{seed}:{d.name}")
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(
                f"only {len(out)} distinct {split} problems of difficulty {d.name!r} found for n={n}; "
                "the difficulty's problem space is too small (raise first_digits or num_steps)"
            )
        expr, lines, value = make_problem(rng, d)
        if expr in seen or (split != "all" and is_heldout(expr, heldout_fraction) != (split == "heldout")):
            continue
        seen.add(expr)
        worked = "\n".join(lines) + f"\n\\boxed{{{value}}}"
        row = {
            "problem": expr,
            "solution": str(value),
            "solution_hint": worked,
            "difficulty": d.name,
            "num_steps": sum("=" in line for line in lines),
            "split": "heldout" if is_heldout(expr, heldout_fraction) else "train",
        }
        uid = f"syn-{d.name}-{hashlib.sha1(expr.encode()).hexdigest()[:12]}"
        out.append(Problem(uid=uid, problem=expr, answer=str(value), hint=worked, columns=row))
    return out


def write_jsonl(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as GHPO-schema JSON Lines (their ``columns``, plus ``uid``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"uid": p.uid, **p.columns}) + "\n" for p in problems)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write synthetic arithmetic problems as GHPO-schema JSON Lines.")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", default="hard", choices=sorted(DIFFICULTIES))
    ap.add_argument("--split", default="train", choices=SPLITS)
    args = ap.parse_args(argv)
    write_jsonl(
        generate_problems(args.n, seed=args.seed, difficulty=args.difficulty, split=args.split), args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
