"""Difficulty detection and the per-group checks the sampler relies on."""

from __future__ import annotations

import math

from megatron_ghpo.ghpo.hints import hinted_problem
from megatron_ghpo.ghpo.options import GHPOOptions
from megatron_ghpo.records import Group, Problem


def _is_nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def is_difficult(group: Group) -> bool:
    """True iff every one of the G accuracy rewards is ≤ 0.

    A None/NaN accuracy (unparseable gold) never counts as ≤ 0, so a group holding one is never
    difficult — the same outcome as the reference's ``all(acc <= 0)`` on NaN.
    """
    if not group.accuracy:
        raise ValueError(
            f"group of problem {group.prompt.problem.uid!r} has no accuracy rewards; score it first"
        )
    return all((not _is_nan(a)) and a <= 0 for a in group.accuracy)


def is_solved(group: Group) -> bool:
    """True iff some completion has a known accuracy > 0."""
    return any((not _is_nan(a)) and a > 0 for a in group.accuracy)


def has_unknown_accuracy(group: Group) -> bool:
    """True when some accuracy reward is None/NaN (the gold answer could not be parsed)."""
    return any(_is_nan(a) for a in group.accuracy)


def check_scored(group: Group) -> None:
    """Raise unless ``score`` filled one reward and one accuracy value per completion."""
    n = group.size
    uid = group.prompt.problem.uid
    if len(group.rewards) != n or len(group.accuracy) != n:
        raise ValueError(
            f"score left group of problem {uid!r} with {len(group.rewards)} rewards and "
            f"{len(group.accuracy)} accuracy values for {n} completions; it must fill one of each per completion"
        )


def known_accuracies(groups: list[Group]) -> list[float]:
    """Every accuracy value that is not None/NaN, in order."""
    return [float(a) for g in groups for a in g.accuracy if not _is_nan(a)]


def hinted_user_text(problem: Problem, ratio: float, options: GHPOOptions) -> str:
    """The user turn for ``problem`` at ``ratio`` with the options' template, split and guard.

    ``ratio == 0`` returns the problem unchanged. Renderers passed to the sampler call this so the
    hint options live in one place.
    """
    if ratio == 0.0:
        return problem.problem
    if problem.hint is None:
        raise ValueError(
            f"problem {problem.uid!r} has no hint (solution_hint column) but ratio {ratio} was asked"
        )
    return hinted_problem(
        problem.problem,
        problem.hint,
        ratio,
        template=options.hint_template,
        split=options.hint_split,
        guard=options.hint_guard,
    )
