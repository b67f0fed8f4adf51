"""GHPOOptions: the sampler's own option record (field names match the ``ghpo`` config section)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from megatron_ghpo.ghpo.hints import HINT_SPLITS, HINT_TEMPLATE

RL_TYPES = ("ghpo", "grpo", "grpo_fixed_hint")
CONSISTENCY_MODES = ("fixed", "faithful")
HINT_STARTS = ("ladder", "memory")
HINT_RETRIES = ("same_step", "next_step")


def _ratio_ok(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 < x <= 1.0


@dataclass(kw_only=True)
class GHPOOptions:
    """How the sampler turns a batch of problems into trained groups."""

    rl_type: str = "ghpo"
    """``ghpo`` (hint ladder for difficult groups), ``grpo`` (never hint) or ``grpo_fixed_hint``
    (every prompt hinted at ``hint_ratio``: the paper's GRPO-CL-H baseline)."""
    hint_ladder: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Hint ratios tried in order for groups that stay difficult (strictly increasing, in (0, 1])."""
    hint_ratio: float = 0.5
    """Hint ratio of ``rl_type: grpo_fixed_hint`` (unused by the ladder)."""
    start_hint_step: int = 0
    """Optimizer steps before which every step is plain GRPO (no hints)."""
    hint_template: str = HINT_TEMPLATE
    """Text between the problem and the hint prefix."""
    hint_split: str = "char"
    """``char`` (faithful), ``line`` or ``sentence`` (cut at a boundary, never inside math)."""
    hint_guard: bool = False
    """Never reveal the solution's final ``\\boxed{…}``."""
    hint_prompt_consistency: str = "fixed"
    """``fixed``: a group is trained on the prompt it was sampled from. ``faithful``: the reference's
    defect B1 (hinted groups below the highest ladder stage reached on this rank are trained on
    the unhinted prompt)."""
    hint_start: str = "ladder"
    """``ladder``: every problem starts unhinted. ``memory``: a known-hard problem starts at the
    ladder stage that last worked (needs a DifficultyMemory)."""
    hint_skip_repeats: bool = True
    """Leave out ladder stages whose hint would repeat the previous stage's (a ``line``/``sentence``
    cut that reaches no further boundary, or an empty first hint): such a stage is a plain retry of
    a prompt just found difficult. ``false`` runs every stage, as the reference does."""
    hint_retry: str = "same_step"
    """When a difficult group's hinted regeneration runs. ``same_step`` (the reference): the group
    climbs the ladder within the step, each stage a generation after the previous one is scored, and
    the step trains its hinted version. ``next_step``: the group is set aside (not trained), and its
    next stage is generated in the next step's single generation pass, with that step's weights, and
    trained then, so every step runs exactly one generation pass. A worker whose every group is set
    aside also trains them as sampled, so no step trains an empty batch. Needs
    ``hint_prompt_consistency: fixed`` and no dynamic sampling."""
    streaming: bool = False
    """Queue hinted regenerations as soon as a group is known to be difficult (needs a
    StreamingRolloutEngine)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop zero-reward-variance groups and refill from the dataset."""
    dynamic_sampling_max_rounds: int = 3
    """Refill rounds per step before the batch is completed with dropped (zero-variance) groups."""

    def __post_init__(self) -> None:
        if self.rl_type not in RL_TYPES:
            raise ValueError(f"ghpo.rl_type must be one of {RL_TYPES}, got {self.rl_type!r}")
        ladder = list(self.hint_ladder)
        if not ladder or not all(_ratio_ok(x) for x in ladder):
            raise ValueError(
                f"ghpo.hint_ladder must be a non-empty list of ratios in (0, 1], got {self.hint_ladder!r}"
            )
        if any(b <= a for a, b in itertools.pairwise(ladder)):
            raise ValueError(f"ghpo.hint_ladder must be strictly increasing, got {ladder}")
        self.hint_ladder = [float(x) for x in ladder]
        if not _ratio_ok(self.hint_ratio):
            raise ValueError(f"ghpo.hint_ratio must be in (0, 1], got {self.hint_ratio!r}")
        if (
            isinstance(self.start_hint_step, bool)
            or not isinstance(self.start_hint_step, int)
            or self.start_hint_step < 0
        ):
            raise ValueError(f"ghpo.start_hint_step must be an int >= 0, got {self.start_hint_step!r}")
        if not isinstance(self.hint_template, str):
            raise ValueError(  # noqa: TRY004 - config values are ValueErrors
                f"ghpo.hint_template must be a string, got {type(self.hint_template).__name__}"
            )
        if self.hint_split not in HINT_SPLITS:
            raise ValueError(f"ghpo.hint_split must be one of {HINT_SPLITS}, got {self.hint_split!r}")
        if not isinstance(self.hint_guard, bool):
            raise ValueError(  # noqa: TRY004
                f"ghpo.hint_guard must be true or false, got {self.hint_guard!r}"
            )
        if self.hint_prompt_consistency not in CONSISTENCY_MODES:
            raise ValueError(
                f"ghpo.hint_prompt_consistency must be one of {CONSISTENCY_MODES}, got {self.hint_prompt_consistency!r}"
            )
        if self.hint_start not in HINT_STARTS:
            raise ValueError(f"ghpo.hint_start must be one of {HINT_STARTS}, got {self.hint_start!r}")
        if self.hint_retry not in HINT_RETRIES:
            raise ValueError(f"ghpo.hint_retry must be one of {HINT_RETRIES}, got {self.hint_retry!r}")
        if self.hint_retry == "next_step" and self.hint_prompt_consistency != "fixed":
            raise ValueError(
                "ghpo.hint_retry: next_step trains every group on the prompt it was sampled from; "
                "set hint_prompt_consistency: fixed"
            )
        if self.hint_retry == "next_step" and self.dynamic_sampling:
            raise ValueError("ghpo.hint_retry: next_step cannot be combined with dynamic_sampling; use same_step")
        for name in ("streaming", "dynamic_sampling", "hint_skip_repeats"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(  # noqa: TRY004
                    f"ghpo.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if not isinstance(self.dynamic_sampling_max_rounds, int) or self.dynamic_sampling_max_rounds < 0:
            raise ValueError(
                f"ghpo.dynamic_sampling_max_rounds must be an int >= 0, got {self.dynamic_sampling_max_rounds!r}"
            )

    @property
    def rungs(self) -> list[float]:
        """Hint ratio of every ladder stage: stage 0 is unhinted, stage k is ``hint_ladder[k-1]``."""
        return [0.0, *self.hint_ladder]
