"""Evaluation on math benchmarks: task registry, pass@k, `run_evaluation`, in-loop evaluation, CLI.

Names are imported lazily (PEP 562), so a verifier worker importing
``megatron_ghpo.eval.scoring`` does not pull in torch through the runner. Importing this package
pulls in no GPU library; engines are built by the CLI (or passed in).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InLoopEvaluator": "inloop",
    "load_task": "loader", "read_rows": "loader",
    "default_ks": "passk", "mean_pass_at_k": "passk", "pass_at_k": "passk",
    "EvalReport": "report", "SampleRecord": "report", "TaskReport": "report", "results_table": "report",
    "LoadedTask": "runner", "SamplingOverrides": "runner", "load_tasks": "runner", "run_evaluation": "runner",
    "samples_per_second": "runner",
    "PoolScorer": "scoring", "ScoredAnswer": "scoring", "SerialScorer": "scoring",
    "TASKS": "tasks", "TaskSpec": "tasks", "get_task": "tasks", "parse_custom_task": "tasks",
    "resolve_tasks": "tasks", "task_names": "tasks",
}  # fmt: skip

__all__ = [
    "TASKS",
    "EvalReport",
    "InLoopEvaluator",
    "LoadedTask",
    "PoolScorer",
    "SampleRecord",
    "SamplingOverrides",
    "ScoredAnswer",
    "SerialScorer",
    "TaskReport",
    "TaskSpec",
    "default_ks",
    "get_task",
    "load_task",
    "load_tasks",
    "mean_pass_at_k",
    "parse_custom_task",
    "pass_at_k",
    "read_rows",
    "resolve_tasks",
    "results_table",
    "run_evaluation",
    "samples_per_second",
    "task_names",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_ghpo.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"megatron_ghpo.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
