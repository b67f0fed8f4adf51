"""Adversarial completions for robustness checks of answer verification.

Each generator yields completions that have made math verifiers hang, explode in memory, recurse
without bound or crash: exponent towers, factorials of huge numbers, 100k-character strings, deep
nesting, huge matrices, NUL bytes and unusual unicode. Used by the hostile-input test and benchmark.
"""

from __future__ import annotations

import random


def _towers(rng: random.Random) -> list[str]:
    out = []
    for _ in range(40):
        base = rng.choice(["2", "9", "10", "99", "x", "e", "1.0001", "\\pi"])
        depth = rng.randint(3, 8)
        tower = base
        for _ in range(depth):
            tower = f"{base}^{{{tower}}}"
        out.append(f"The answer is $\\boxed{{{tower}}}$")
    out += [
        "$\\boxed{(10^{10})!}$", "$\\boxed{(10^{100})! - (10^{100})!}$", "$\\boxed{9^{9^{9^{9}}} - 9^{9^{9^{9}}}}$",
        "$\\boxed{10^{10^{10^{10}}} + 1}$", "$\\boxed{\\sum_{k=1}^{10^{12}} k^{k}}$", "$\\boxed{2^{2^{100}} \\bmod 7}$",
        "$\\boxed{\\prod_{n=1}^{10^{9}} n}$", "$\\boxed{e^{e^{e^{e^{e}}}}}$", "$\\boxed{\\binom{10^{18}}{10^{9}}}$",
        "$\\boxed{1000000!}$", "$\\boxed{(2^{64})^{(2^{64})}}$", "$\\boxed{\\int_0^{10^{10}} x^{x^{x}} dx}$",
    ]  # fmt: skip
    return out


def _long_strings(rng: random.Random) -> list[str]:
    n = 100_000
    return [
        "1" * n, "$" * n, "\\" * n, "{" * n, "}" * n, "(" * n, "\\boxed{" * (n // 7), "x+" * (n // 2),
        "$\\boxed{" + "9" * n + "}$", "$\\boxed{" + "1+" * (n // 2) + "1}$", "$" + "x^" * (n // 2) + "2$",
        "\\frac" * (n // 5), "The answer is " + "a" * n, "".join(rng.choice("0123456789+-*/^(){}$\\") for _ in range(n)),
        "$\\boxed{" + "\\sqrt{" * 200 + "2" + "}" * 200 + "}$" + " filler" * (n // 7), "\n" * n, " " * n,
        "$" + "1," * (n // 2) + "1$", "$\\boxed{" + ".".join(["1"] * (n // 2)) + "}$",
    ]  # fmt: skip


def _nesting(rng: random.Random) -> list[str]:
    out = []
    for depth in (50, 200, 1000, 5000, 20000):
        out += [
            "$\\boxed{" + "(" * depth + "1" + ")" * depth + "}$",
            "$\\boxed{" + "\\frac{1}{" * depth + "2" + "}" * depth + "}$",
            "$\\boxed{" + "\\sqrt{" * depth + "2" + "}" * depth + "}$",
            "$\\boxed{" + "{" * depth + "1" + "}" * depth + "}$",
            "$\\boxed{" + "\\left(" * depth + "x" + "\\right)" * depth + "}$",
            "$\\boxed{" + "[" * depth + "1" + "]" * depth + "}$",
            "$\\boxed{" + "-" * depth + "1}$",
            "$\\boxed{" + "(" * depth + "1}$",  # unbalanced
        ]
    return out


def _matrix(rows: int, cols: int, rng: random.Random, symbolic: bool) -> str:
    cells = [
        " & ".join((f"x_{{{r}{c}}}" if symbolic else str(rng.randint(-99, 99))) for c in range(cols))
        for r in range(rows)
    ]
    return "\\begin{pmatrix}" + " \\\\ ".join(cells) + "\\end{pmatrix}"


def _matrices(rng: random.Random) -> list[str]:
    out = []
    for n in (10, 30, 60, 100):
        for symbolic in (False, True):
            m = _matrix(n, n, rng, symbolic)
            out += [
                f"$\\boxed{{{m}}}$",
                f"$\\boxed{{\\det {m}}}$",
                f"$\\boxed{{{m}^{{100}}}}$",
                f"$\\boxed{{{m} {m}}}$",
            ]
    return out


def _nul_and_unicode(rng: random.Random) -> list[str]:
    weird = [
        "\x00", "\x00\x00\x00", "\ufeff", "\u202e", "\u200b", "\U0001f600", "\u0301" * 50, "\ud800", "\udfff",
        "\uffff", "\x1b[31m", "\r", "\x0c", "\x7f", "\u2028", "𝟙𝟚𝟛", "½", "٣", "一二三", "∞", "√2", "≠", "\ufffd",
    ]  # fmt: skip
    out = []
    for w in weird:
        out += [
            f"$\\boxed{{1{w}2}}$", f"{w}$\\boxed{{42}}${w}", f"$\\boxed{{{w}}}$", w * 1000, f"$\\frac{{{w}}}{{{w}}}$",
            f"\\boxed{{{w * 5000}}}",
        ]  # fmt: skip
    return out


def _mixed(rng: random.Random, n: int) -> list[str]:
    pieces = [
        "\\boxed{", "}", "$", "\\frac{", "\\sqrt[", "]", "^{", "_{", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\",
        "\\left(", "\\right)", "9^", "!", "\\infty", "\\cup", "=", "\\approx", "\\text{", "%", "\\%", "\x00", "\u202e",
        "x", "1", "0", ",", ".", "\\int", "\\sum_{k=1}^{", "\\lim", "\\to",
    ]  # fmt: skip
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(5, 400))) for _ in range(n)]


def hostile_cases(n: int = 520, *, seed: int = 0) -> list[tuple[str, str]]:
    """At least ``n`` (family, completion) pairs, deterministic in ``seed``: every fixed family, then random mixes."""
    rng = random.Random(seed)
    families = [
        ("towers", _towers), ("long_strings", _long_strings), ("nesting", _nesting), ("matrices", _matrices),
        ("nul_unicode", _nul_and_unicode),
    ]  # fmt: skip
    out = [(name, text) for name, gen in families for text in gen(rng)]
    if len(out) < n:
        out += [("random_mix", text) for text in _mixed(rng, n - len(out))]
    return out


def hostile_completions(n: int = 520, *, seed: int = 0) -> list[str]:
    """The completions of :func:`hostile_cases`."""
    return [text for _, text in hostile_cases(n, seed=seed)]
