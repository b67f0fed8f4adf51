"""Difficulty memory: what each problem needed the last time it was seen.

Per problem (keyed by ``Problem.uid``): times seen, times solved / failed without a hint, the hint
ratio that last worked, where its last ladder started and whether it stayed unsolved. The record
is small, JSON-friendly and travels in checkpoints via :meth:`DifficultyMemory.state_dict`.

Start rule for ``hint_start: memory`` (ladder stages: 0 = unhinted, k = ``hint_ladder[k-1]``):

* unknown problem, or solved unhinted last time → stage 0;
* unsolved at every stage tried last time → the top stage (lower ones are known to fail);
* solved at stage w after starting below it → start at w (skips the passes known to fail);
* solved at stage w on its first try → start one stage lower (w − 1), a *probe*, so a problem the
  policy has outgrown drifts back towards unhinted training instead of keeping its hint forever;
* probes back off: a probe that fails (the problem had to climb back to w) doubles the number of
  consecutive first-try solves at w required before the next probe (1, 2, 4, …); a probe that
  succeeds resets it to 1. A problem that keeps needing its hint is probed ever more rarely, so its
  visits stop paying a failed generation pass every other time.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, fields
from typing import Any

STATE_VERSION = 1


@dataclass(kw_only=True)
class ProblemRecord:
    """What is known about one problem."""

    times_seen: int = 0
    times_solved_unhinted: int = 0
    """Visits whose unhinted pass had at least one correct completion."""
    times_failed_unhinted: int = 0
    """Visits whose unhinted pass was difficult (all accuracy ≤ 0)."""
    ratio_worked: float | None = None
    """Hint ratio at which the last conclusive visit was solved (0.0 = unhinted); None if unsolved."""
    start_ratio: float = 0.0
    """Hint ratio where the last conclusive visit started."""
    unsolved: bool = False
    """True when the last conclusive visit failed at every stage it tried."""
    first_try_streak: int = 0
    """Consecutive conclusive visits solved at the stage they started from."""
    probe_after: int = 1
    """First-try solves in a row needed before the next probe one stage lower (doubles after a failed probe)."""
    last_step: int = -1


@dataclass(kw_only=True, frozen=True)
class VisitOutcome:
    """The result of one problem's trip through the ladder in one step."""

    uid: str
    step: int
    start_ratio: float
    solved_ratio: float | None
    """Ratio of the first stage with a correct completion; None when every stage tried failed."""
    unhinted_solved: bool | None
    """Outcome of the unhinted pass; None when no unhinted pass ran."""
    conclusive: bool = True
    """False when some accuracy was unknown (None/NaN): only ``times_seen`` is updated."""


def rung_of(ratio: float, rungs: list[float]) -> int:
    """Index of the largest stage ratio ≤ ``ratio`` in ``rungs`` (ascending, ``rungs[0] == 0``)."""
    return max(0, bisect.bisect_right(rungs, ratio + 1e-12) - 1)


class DifficultyMemory:
    """Per-problem difficulty records, updated after every step and saved in checkpoints."""

    def __init__(self) -> None:
        self._records: dict[str, ProblemRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, uid: str) -> bool:
        return uid in self._records

    def get(self, uid: str) -> ProblemRecord | None:
        return self._records.get(uid)

    def start_rung(self, uid: str, rungs: list[float]) -> int:
        """Ladder stage to start ``uid`` at under ``hint_start: memory`` (see the module docstring)."""
        rec = self._records.get(uid)
        if rec is None:
            return 0
        top = len(rungs) - 1
        if rec.unsolved:
            return top
        if rec.ratio_worked is None or rec.ratio_worked == 0.0:
            return 0
        worked = rung_of(rec.ratio_worked, rungs)
        started = rung_of(rec.start_ratio, rungs)
        if worked == started and rec.first_try_streak >= rec.probe_after:
            return max(worked - 1, 0)
        return worked

    def update(self, outcome: VisitOutcome) -> None:
        """Fold one visit into the problem's record."""
        rec = self._records.setdefault(outcome.uid, ProblemRecord())
        rec.times_seen += 1
        rec.last_step = max(rec.last_step, outcome.step)
        if outcome.unhinted_solved is True:
            rec.times_solved_unhinted += 1
        elif outcome.unhinted_solved is False:
            rec.times_failed_unhinted += 1
        if not outcome.conclusive:
            return
        probe = rec.ratio_worked is not None and outcome.start_ratio < rec.ratio_worked - 1e-12
        first_try = outcome.solved_ratio is not None and abs(outcome.solved_ratio - outcome.start_ratio) <= 1e-12
        if probe:
            rec.probe_after = 1 if first_try else 2 * rec.probe_after
        rec.first_try_streak = rec.first_try_streak + 1 if first_try and not probe else int(first_try)
        rec.start_ratio = outcome.start_ratio
        rec.ratio_worked = outcome.solved_ratio
        rec.unsolved = outcome.solved_ratio is None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot: ``{"version": 1, "records": {uid: {...}}}``."""
        return {
            "version": STATE_VERSION,
            "records": {uid: asdict(r) for uid, r in sorted(self._records.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the records with a snapshot from :meth:`state_dict`."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "records" not in state:
            raise ValueError(
                f"difficulty memory state must be {{'version': {STATE_VERSION}, 'records': ...}}, "
                f"got keys {sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        names = {f.name for f in fields(ProblemRecord)}
        records: dict[str, ProblemRecord] = {}
        for uid, raw in state["records"].items():
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"difficulty memory record {uid!r} has unknown fields {sorted(unknown)}")
            records[str(uid)] = ProblemRecord(**raw)
        self._records = records
