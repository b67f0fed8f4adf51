"""math-verify scoring functions: run inside verifier workers (and serially by benchmarks).

The accuracy semantics follow the reference (``../shared/docs/ghpo-algorithm.md`` §4):

* gold: ``parse(gold, extraction_mode="first_match")`` with math-verify's default targets
  (LaTeX, then plain expressions); an empty parse means "unparseable gold" -> reward None;
* completion: ``parse(text, [LatexExtractionConfig(NormalizationConfig(nits=False,
  malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True),
  boxed_match_priority=0, try_extract_without_anchor=False)], extraction_mode="first_match")``
  over the whole completion text;
* reward 1.0 iff ``verify(gold, answer)`` (defaults: float_rounding 6, strict), else 0.0.

Parsed golds are cached per gold string (one entry per problem) in each worker process.
Nothing here imports math-verify at module import time except through :func:`warm_up`, so the
parent process can import this module cheaply.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

GOLD_CACHE_SIZE = 8192
"""Parsed golds kept per process (an LRU keyed by the gold text)."""

_QUIET = ("latex2sympy2_extended", "math_verify")


@lru_cache(maxsize=1)
def _mv() -> Any:
    import math_verify

    for name in _QUIET:  # per-call deprecation and timeout warnings would flood the logs
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return math_verify


@lru_cache(maxsize=1)
def answer_extraction_config() -> list:
    """The completion-side extraction targets of the reference accuracy reward."""
    from latex2sympy2_extended import NormalizationConfig

    mv = _mv()
    return [
        mv.LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False,
                malformed_operators=False,
                basic_latex=True,
                equations=True,
                boxed="all",
                units=True,
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]


@lru_cache(maxsize=GOLD_CACHE_SIZE)
def parse_gold(gold: str) -> tuple:
    """Parsed gold (empty tuple when unparseable); cached per gold text."""
    return tuple(_mv().parse(gold, extraction_mode="first_match"))


def parse_answer(text: str) -> list:
    """Parsed final answer of a completion (first match, boxed first, LaTeX anchors only)."""
    return _mv().parse(text, answer_extraction_config(), extraction_mode="first_match")


def score_accuracy(gold: str, completion: str) -> float | None:
    """1.0 if the completion's answer verifies against the gold, 0.0 if not, None for unparseable gold."""
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return None
    return 1.0 if _mv().verify(list(gold_parsed), parse_answer(completion)) else 0.0


def score_accuracy_uncached(gold: str, completion: str) -> float | None:
    """:func:`score_accuracy` without the gold cache: what the reference does per completion."""
    gold_parsed = _mv().parse(gold, extraction_mode="first_match")
    if not gold_parsed:
        return None
    return 1.0 if _mv().verify(gold_parsed, parse_answer(completion)) else 0.0


def _targets(names: list[str], latex_kwargs: dict[str, Any]) -> list:
    mv = _mv()
    latex_kwargs = dict(latex_kwargs)
    if isinstance(latex_kwargs.get("normalization_config"), dict):
        from latex2sympy2_extended import NormalizationConfig

        latex_kwargs["normalization_config"] = NormalizationConfig(**latex_kwargs["normalization_config"])
    out = []
    for name in names:
        if name == "latex":
            out.append(mv.LatexExtractionConfig(**latex_kwargs))
        elif name == "expr":
            out.append(mv.ExprExtractionConfig())
        elif name == "answer":
            out.extend(answer_extraction_config())
        else:
            raise ValueError(f"unknown extraction target {name!r}; expected 'latex', 'expr' or 'answer'")
    return out


def verify_with_options(gold: str, prediction: str, spec: dict[str, Any]) -> bool | None:
    """``verify(parse(gold, ...), parse(prediction, ...), ...)`` under explicit math-verify options.

    ``spec`` keys (all optional): ``gold_targets`` / ``pred_targets`` (lists of ``"latex"``,
    ``"expr"``, ``"answer"``; None = math-verify's defaults), ``latex`` (kwargs of
    ``LatexExtractionConfig``, e.g. ``{"boxed_match_priority": 0}``; a ``normalization_config`` given
    as a dict is passed to ``NormalizationConfig``), ``gold_mode`` / ``pred_mode``
    (``extraction_mode``), ``float_rounding``, ``strict``, ``allow_set_relation_comp``,
    ``none_if_gold_unparsed`` (return None instead of comparing when the gold parses to nothing).
    """
    mv = _mv()
    latex_kwargs = dict(spec.get("latex") or {})
    gold_kwargs: dict[str, Any] = {"extraction_mode": spec.get("gold_mode", "any_match")}
    pred_kwargs: dict[str, Any] = {"extraction_mode": spec.get("pred_mode", "any_match")}
    if spec.get("gold_targets") is not None:
        gold_kwargs["extraction_config"] = _targets(spec["gold_targets"], latex_kwargs)
    if spec.get("pred_targets") is not None:
        pred_kwargs["extraction_config"] = _targets(spec["pred_targets"], latex_kwargs)
    gold_parsed = mv.parse(gold, **gold_kwargs)
    if not gold_parsed and spec.get("none_if_gold_unparsed"):
        return None
    pred_parsed = mv.parse(prediction, **pred_kwargs)
    return bool(
        mv.verify(
            gold_parsed,
            pred_parsed,
            float_rounding=spec.get("float_rounding", 6),
            strict=spec.get("strict", True),
            allow_set_relation_comp=spec.get("allow_set_relation_comp", False),
        )
    )


def clear_caches() -> None:
    """Empty the gold cache and math-verify's parsed-expression caches (for fair benchmarks)."""
    parse_gold.cache_clear()
    from math_verify import parser
    from sympy.core.cache import clear_cache

    clear_cache()

    for name in ("parse_latex_cached", "parse_expr_cached", "extract_latex"):
        fn = getattr(parser, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()


def echo(value: Any) -> Any:
    """Return ``value`` unchanged (pool self-test and overhead measurement)."""
    return value


def sleep_for(seconds: float) -> int:
    """Sleep ``seconds`` and return the worker's pid (timeout and scheduling tests)."""
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


_WARM_ANSWERS = (
    "42", "-7", "0.25", "3.14", "10,000", "1{,}000", "2.5 \\times 10^{3}", "\\frac{3}{4}", "-\\dfrac{5}{12}",
    "\\tfrac12", "7/8", "2\\sqrt{3}", "\\frac{\\sqrt{5}}{2}", "\\sqrt[3]{2}", "3\\pi", "\\frac{\\pi}{6}",
    "e^{2}", "\\log_2 5", "\\ln 3", "\\sin 30^\\circ", "45^\\circ", "25\\%", "\\$18.50", "3+4i",
    "x^2+2x+1", "(x-1)(x+2)", "y = 2x + 3", "x > 5", "-2 \\le x < 3", "(2, 3)", "[0, 1)",
    "(-\\infty, -5) \\cup (7, \\infty)", "\\{1, 2, 3\\}", "(1, -2, 3)", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
    "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", "\\text{(C)}", "\\text{Evelyn}", "12 \\text{ cm}^2", "\\binom{10}{3}",
    "5!", "2^{10}", "\\infty", "a = 3, b = -2", "\\frac{x+1}{x-1}", "1 - \\frac{1}{e}", "4:30 \\text{ p.m.}",
    "\\left( 3, \\frac{\\pi}{2} \\right)", "0.\\overline{3}", "\\sum_{k=1}^{n} k", "\\mathbf{(B)}", "-\\frac{\\sqrt{2}}{2}",
)  # fmt: skip
"""Typical final answers: scoring them once warms math-verify's lazy state (the LaTeX parser's DFA,
lazily imported sympy modules, compiled patterns), which forked workers then share copy-on-write."""


def warm_up(full: bool = True) -> None:
    """Import math-verify and (``full``) score a spread of typical answers so forked workers start warm.

    A cold process spent ~1.7x the CPU of a warm one on the 800 graded responses (0.58 s vs 0.33 s;
    0.35 s after this warm-up). Caches keyed by content are emptied afterwards, so the warm-up gives
    no answer-specific head start. Costs ~1.1 s of CPU once per pool (in the helper process).
    """
    score_accuracy("$\\frac{1}{2}$", "The answer is $\\boxed{0.5}$.")
    for i, ans in enumerate(_WARM_ANSWERS if full else ()):
        wrong = _WARM_ANSWERS[(i + 1) % len(_WARM_ANSWERS)]
        score_accuracy(
            "\\boxed{" + ans + "}",
            f"We compute step by step: $x = {ans}$. So the answer is $\\boxed{{{ans}}}$.",
        )
        score_accuracy(
            "$" + ans + "$", f"Hence \\[ y = {wrong} \\] and the final answer is \\boxed{{{wrong}}}."
        )
    clear_caches()
