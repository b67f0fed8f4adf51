"""Per-step sampler metrics.

Ladder statistics cover every group the ladder processed in the step (refill rounds included);
training statistics cover the groups returned for training. All values are this rank's; the
trainer averages (fractions, accuracies) or sums (counts) them over data-parallel ranks.

Keys (K = number of ladder ratios):

* ``ghpo/difficult_frac_stage{k}``, k = 0..K: groups found difficult after being sampled at stage k
  (0 = unhinted, k = ``hint_ladder[k-1]``), divided by the groups that entered the ladder.
  Always emitted for every k so curves have no gaps.
* ``ghpo/unsolved_after_ladder``: groups still difficult at the top stage (count).
* ``ghpo/unhintable_groups``: difficult groups whose problem has no hint (count).
* ``ghpo/acc_unhinted``: mean accuracy of completions sampled without a hint in the first pass
  (omitted when no such completion has a known accuracy).
* ``ghpo/generation_passes``: generation passes that ran on any rank, summed over rounds.
* ``ghpo/generated_groups`` / ``ghpo/regenerated_groups``: groups sent to the engine / of which
  hinted regenerations (the cost of the ladder).
* ``ghpo/nan_accuracy_groups``: groups with an unknown (None/NaN) accuracy (never hinted).
* ``ghpo/memory_started_groups`` / ``ghpo/memory_skipped_passes``: groups the difficulty memory
  started above stage 0, and the passes that saved.
* ``ghpo/repeat_stages_skipped``: ladder stages left out of the groups' paths because their hint
  would have repeated the previous stage's (``hint_skip_repeats``).
* ``ghpo/deferred_groups`` / ``ghpo/retried_groups`` (``hint_retry: next_step``): difficult groups set
  aside for a hinted retry in the next step / retries carried over from the previous step and sampled
  in this one (0 with ``same_step``).
* ``ghpo/hinted_groups``: trained groups whose completions were sampled from a hinted prompt.
* ``train/acc``: mean known accuracy of the trained completions (after hints).
* ``ghpo/hint_ratio_mean`` and ``ghpo/hint_ratio/{r}`` for r in {0, ladder…}: the fraction of
  trained groups sampled at each hint ratio (the hint-ratio histogram).
* ``dapo/dropped_groups``, ``dapo/refill_rounds``, ``dapo/filler_groups`` with dynamic sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ghpo.ghpo.difficulty import has_unknown_accuracy, is_difficult, known_accuracies
from megatron_ghpo.ghpo.ladder import Slot
from megatron_ghpo.records import Group


def ratio_key(ratio: float) -> str:
    """Histogram key for a hint ratio: ``ghpo/hint_ratio/0.25``."""
    return f"ghpo/hint_ratio/{ratio:g}"


@dataclass
class StepStats:
    """Counters accumulated over the rounds of one step."""

    rungs: list[float]
    num_stages: int
    entered: int = 0
    difficult_at: list[int] = field(default_factory=list)
    unsolved: int = 0
    unhintable: int = 0
    passes: int = 0
    generated: int = 0
    regenerated: int = 0
    nan_groups: int = 0
    memory_started: int = 0
    memory_skipped: int = 0
    skipped_stages: int = 0
    deferred: int = 0
    retried: int = 0
    unhinted_acc: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.difficult_at = [0] * self.num_stages

    def add_round(self, slots: list[Slot], passes: int, *, top: int, climb: bool, from_memory: bool) -> None:
        """Fold one round's slots into the counters. A slot carried over from an earlier step
        (``generated_before > 0``) counts only what it generated in this round: it entered the
        ladder, and was counted as such, in the step that first sampled it."""
        self.passes += passes
        for s in slots:
            fresh = s.generated_before == 0
            new = len(s.generated) - s.generated_before
            self.generated += new
            self.regenerated += max(0, new - 1) if fresh else new
            if fresh:
                self.entered += 1
                if s.path is not None:
                    self.skipped_stages += self.num_stages - s.start_rung - len(s.path)
                if from_memory and s.start_rung > 0:
                    self.memory_started += 1
                    self.memory_skipped += s.start_rung
                if s.unhinted_group is not None:
                    self.unhinted_acc.extend(known_accuracies([s.unhinted_group]))
            else:
                self.retried += 1
            assert s.group is not None
            if has_unknown_accuracy(s.group):
                self.nan_groups += 1
            difficult = is_difficult(s.group)
            if difficult and s.problem.hint is None:
                self.unhintable += 1
            if difficult and climb and s.rung == s.last_rung(top) and s.problem.hint is not None:
                self.unsolved += 1
            self._count_difficult(s)

    def _count_difficult(self, slot: Slot) -> None:
        # Stages before the last were difficult by construction (that is why the slot climbed); only
        # this round's generations count.
        for k in slot.generated[slot.generated_before : -1]:
            self.difficult_at[k] += 1
        assert slot.group is not None
        if is_difficult(slot.group):
            self.difficult_at[slot.generated[-1]] += 1

    def merged(self, others: list[StepStats]) -> StepStats:
        """These counters plus other workers' for the same step: counts summed, generation passes
        kept (every worker counts the same global passes), unhinted accuracies pooled."""
        out = StepStats(rungs=self.rungs, num_stages=self.num_stages)
        for s in [self, *others]:
            if s.num_stages != self.num_stages or s.passes != self.passes:
                raise ValueError(
                    f"cannot merge step stats of different ladders or passes ({s.num_stages} stages / {s.passes} passes "
                    f"vs {self.num_stages} / {self.passes})"
                )
            for name in ("entered", "unsolved", "unhintable", "generated", "regenerated", "nan_groups",
                         "memory_started", "memory_skipped", "skipped_stages", "deferred", "retried"):  # fmt: skip
                setattr(out, name, getattr(out, name) + getattr(s, name))
            out.difficult_at = [a + b for a, b in zip(out.difficult_at, s.difficult_at)]
            out.unhinted_acc.extend(s.unhinted_acc)
        out.passes = self.passes
        return out

    def finish(self, trained: list[Group], extra: dict[str, float]) -> dict[str, float]:
        """The step's metrics dict (see the module docstring)."""
        m: dict[str, float] = {}
        denom = max(self.entered, 1)
        for k in range(self.num_stages):
            m[f"ghpo/difficult_frac_stage{k}"] = self.difficult_at[k] / denom
        m["ghpo/unsolved_after_ladder"] = float(self.unsolved)
        m["ghpo/unhintable_groups"] = float(self.unhintable)
        if self.unhinted_acc:
            m["ghpo/acc_unhinted"] = sum(self.unhinted_acc) / len(self.unhinted_acc)
        m["ghpo/generation_passes"] = float(self.passes)
        m["ghpo/generated_groups"] = float(self.generated)
        m["ghpo/regenerated_groups"] = float(self.regenerated)
        m["ghpo/nan_accuracy_groups"] = float(self.nan_groups)
        m["ghpo/memory_started_groups"] = float(self.memory_started)
        m["ghpo/memory_skipped_passes"] = float(self.memory_skipped)
        m["ghpo/repeat_stages_skipped"] = float(self.skipped_stages)
        m["ghpo/deferred_groups"] = float(self.deferred)
        m["ghpo/retried_groups"] = float(self.retried)
        m["ghpo/hinted_groups"] = float(sum(1 for g in trained if g.prompt.hint_ratio > 0))
        accs = known_accuracies(trained)
        if accs:
            m["train/acc"] = sum(accs) / len(accs)
        n = max(len(trained), 1)
        for r in self.rungs:
            m[ratio_key(r)] = sum(1 for g in trained if abs(g.prompt.hint_ratio - r) < 1e-9) / n
        m["ghpo/hint_ratio_mean"] = sum(g.prompt.hint_ratio for g in trained) / n
        m.update(extra)
        return m
