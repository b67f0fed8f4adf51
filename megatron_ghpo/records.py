"""Typed records passed between the stages of one optimizer step.

These are the only cross-stage contract: data -> prompts -> rollout -> rewards -> GHPO sampler
-> advantages -> policy. No stage hands another a loose dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class Problem:
    """One dataset row, normalised through the column mapping."""

    uid: str
    """Stable identifier (file + row index, or a dataset-provided id); keys the difficulty memory."""
    problem: str
    """User-facing problem text (the prompt column)."""
    answer: str
    """Gold answer text fed to the accuracy reward (may be a worked solution with a final \\boxed{})."""
    hint: str | None = None
    """Full worked solution used to build hints; None when the row has none."""
    columns: dict[str, Any] = field(default_factory=dict)
    """Every original column of the row, passed through to reward functions unchanged."""


@dataclass(kw_only=True)
class Prompt:
    """A problem rendered for the rollout engine, possibly with a hint."""

    problem: Problem
    user_text: str
    """The user turn (problem, plus hint template and hint prefix when hinted)."""
    text: str
    """The full prompt after the chat template (``add_generation_prompt=True``)."""
    token_ids: list[int]
    """Prompt token ids after left truncation to ``max_prompt_length``."""
    hint_ratio: float = 0.0
    """Fraction of the worked solution revealed in the user turn (0.0 = unhinted)."""
    truncated: bool = False
    """True when the prompt was left-truncated to fit ``max_prompt_length``."""


@dataclass(kw_only=True)
class Completion:
    """One sampled completion."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    """Per-token log-probs of ``token_ids`` under the engine's sampling distribution."""
    finish_reason: str = "stop"
    """``stop`` (EOS or stop string) or ``length`` (hit ``max_completion_length``)."""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(kw_only=True)
class Group:
    """G completions of one prompt with their rewards: the unit GHPO replaces as a whole."""

    prompt: Prompt
    completions: list[Completion]
    rewards: list[float] = field(default_factory=list)
    """Weighted total reward per completion (None rewards excluded from the sum)."""
    accuracy: list[float | None] = field(default_factory=list)
    """Accuracy reward per completion; None when the gold answer could not be parsed."""
    reward_components: dict[str, list[float | None]] = field(default_factory=dict)
    """Raw per-function rewards, by reward name."""
    stage: int = 0
    """Hint-ladder stage of these completions: 0 = unhinted, k = ``hint_ladder[k-1]``."""
    train_prompt: Prompt | None = None
    """Prompt the policy is trained on (differs from ``prompt`` only in faithful mode, defect B1)."""

    @property
    def size(self) -> int:
        return len(self.completions)

    @property
    def trained_prompt(self) -> Prompt:
        return self.train_prompt if self.train_prompt is not None else self.prompt


@dataclass(kw_only=True)
class TrainSample:
    """One (prompt, completion) sequence ready for the policy."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    completion_mask: list[int]
    """1 for completion tokens that count in the loss (up to and including the first EOS)."""
    old_logprobs: list[float] | None = None
    """Behaviour log-probs for the importance ratio; None = on-policy (ratio = 1, the reference's)."""
    rollout_logprobs: list[float] | None = None
    """The rollout engine's log-probs of ``completion_ids`` (for ``rollout/logprob_diff``)."""
    ref_logprobs: list[float] | None = None
    """Reference-model log-probs of ``completion_ids`` (only when ``beta > 0``)."""
    group_index: int = 0


@dataclass(kw_only=True)
class TrainBatch:
    """Everything one optimizer step trains on, on one data-parallel rank."""

    samples: list[TrainSample]
    """In sample order: ``bnpo``'s normalisation units are consecutive runs of it (the policy derives
    every loss normaliser from this list, summed over data-parallel ranks)."""

    def __len__(self) -> int:
        return len(self.samples)
