"""GHPO: difficulty detection, hint construction, the hint ladder and the sampler (pure logic)."""

from megatron_ghpo.ghpo.batch import build_train_batch, group_rewards
from megatron_ghpo.ghpo.difficulty import has_unknown_accuracy, hinted_user_text, is_difficult, is_solved
from megatron_ghpo.ghpo.hints import HINT_SPLITS, HINT_TEMPLATE, hint_prefix, hinted_problem
from megatron_ghpo.ghpo.memory import DifficultyMemory, ProblemRecord, VisitOutcome
from megatron_ghpo.ghpo.options import GHPOOptions
from megatron_ghpo.ghpo.sampler import GHPOSampler, SampleResult

__all__ = [
    "HINT_SPLITS",
    "HINT_TEMPLATE",
    "DifficultyMemory",
    "GHPOOptions",
    "GHPOSampler",
    "ProblemRecord",
    "SampleResult",
    "VisitOutcome",
    "build_train_batch",
    "group_rewards",
    "has_unknown_accuracy",
    "hint_prefix",
    "hinted_problem",
    "hinted_user_text",
    "is_difficult",
    "is_solved",
]
