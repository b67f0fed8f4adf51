"""Evaluation task registry: which file, which columns, how the gold answer is read, how to sample.

Seven benchmark files ship in ``megatron_ghpo/resources/eval/`` (see the README there for their
sources). GPQA-Diamond is registered but has no bundled file: pass its location with
``TaskSpec.path`` (CLI: ``--task-path gpqa_diamond=FILE``). Any local JSONL/JSON/CSV/Parquet file
becomes a task through :func:`parse_custom_task` (``name=...,path=...,problem=...,answer=...``).

Sampling defaults follow the seed's lighteval command (``temperature=0.01, top_p=0.95,
max_new_tokens=8192``); AIME is reported as avg@32 (32 samples per problem, pass@1 = their mean).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from importlib import resources

from megatron_ghpo.eval.answers import ANSWER_FORMATS

SEED_TEMPERATURE = 0.01
SEED_TOP_P = 0.95
SEED_MAX_NEW_TOKENS = 8192
AIME_SAMPLES = 32


@dataclass(kw_only=True, frozen=True)
class TaskSpec:
    """One evaluation task: its rows, their schema and its default sampling."""

    name: str
    """Task name used in metric keys (``eval/<name>/pass@1``) and output file names."""
    path: str | None = None
    """Local file (.jsonl, .json, .csv, .parquet); None means the bundled ``resource`` file."""
    resource: str | None = None
    """File name under ``megatron_ghpo/resources/eval/`` when ``path`` is None."""
    problem_field: str = "problem"
    """Column holding the problem text."""
    answer_field: str = "answer"
    """Column holding the gold answer (read according to ``answer_format``)."""
    answer_format: str = "text"
    """One of :data:`megatron_ghpo.eval.answers.ANSWER_FORMATS`, or ``multiple_choice``."""
    distractor_fields: tuple[str, ...] = ()
    """For ``multiple_choice``: columns with the wrong options (the right one is ``answer_field``)."""
    id_field: str | None = None
    """Column giving a stable row id; None uses the row index."""
    samples: int = 1
    """Completions per problem (K); pass@1 is their mean correctness."""
    temperature: float = SEED_TEMPERATURE
    top_p: float = SEED_TOP_P
    max_new_tokens: int = SEED_MAX_NEW_TOKENS
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ,="):
            raise ValueError(
                f"TaskSpec.name={self.name!r}: use a non-empty name without '/', '\\', ' ', ',', '='"
            )
        formats = (*ANSWER_FORMATS, "multiple_choice")
        if self.answer_format not in formats:
            raise ValueError(
                f"TaskSpec({self.name}).answer_format={self.answer_format!r}: expected one of {formats}"
            )
        if self.answer_format == "multiple_choice" and not self.distractor_fields:
            raise ValueError(
                f"TaskSpec({self.name}): answer_format='multiple_choice' needs distractor_fields"
            )
        if self.path is None and self.resource is None:
            raise ValueError(
                f"TaskSpec({self.name}): set path= to the task's file (no bundled file for this task)"
            )
        if self.samples < 1:
            raise ValueError(f"TaskSpec({self.name}).samples={self.samples}: must be >= 1")
        if not 0.0 <= self.temperature:
            raise ValueError(f"TaskSpec({self.name}).temperature={self.temperature}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"TaskSpec({self.name}).top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"TaskSpec({self.name}).max_new_tokens={self.max_new_tokens}: must be >= 1")

    def file(self) -> str:
        """Path of the task's data file (the bundled resource when ``path`` is unset)."""
        if self.path is not None:
            return self.path
        return str(resources.files("megatron_ghpo") / "resources" / "eval" / self.resource)


_BUILTIN = [
    TaskSpec(
        name="aime24",
        resource="aime24_test.jsonl",
        id_field="id",
        samples=AIME_SAMPLES,
        description="AIME 2024 I+II (30), integer answers; avg@32",
    ),
    TaskSpec(
        name="aime25",
        resource="aime25_test.jsonl",
        samples=AIME_SAMPLES,
        description="AIME 2025 I+II (30), integer answers; avg@32",
    ),
    TaskSpec(
        name="amc23",
        resource="amc23_test.jsonl",
        id_field="id",
        answer_format="number",
        description="AMC 2023 (40); gold stored as a float",
    ),
    TaskSpec(
        name="math500",
        resource="math500_test.jsonl",
        id_field="unique_id",
        description="MATH-500 (500), PRM800K test split",
    ),
    TaskSpec(
        name="minerva",
        resource="minerva_math_test.jsonl",
        id_field="idx",
        answer_field="solution",
        answer_format="last_boxed",
        description="Minerva OCW (272); gold = last \\boxed{} of solution",
    ),
    TaskSpec(
        name="olympiadbench",
        resource="olympiadbench_test.jsonl",
        id_field="id",
        problem_field="question",
        answer_field="final_answer",
        answer_format="first_of_list",
        description="OlympiadBench OE_TO_maths_en_COMP (675); gold = final_answer[0]",
    ),
    TaskSpec(
        name="gsm8k",
        resource="gsm8k_test.jsonl",
        id_field="idx",
        problem_field="question",
        answer_format="gsm8k",
        description="GSM8K test (1319); gold after '####'",
    ),
]

GPQA_DIAMOND = TaskSpec(
    name="gpqa_diamond",
    path="",
    problem_field="Question",
    answer_field="Correct Answer",
    answer_format="multiple_choice",
    distractor_fields=("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
    id_field="Record ID",
    description="GPQA-Diamond (198), user-provided file; options shuffled per row, gold = letter",
)
"""GPQA-Diamond with the columns of the official CSV; ``path`` must be replaced by the user's file."""

TASKS: dict[str, TaskSpec] = {t.name: t for t in _BUILTIN} | {GPQA_DIAMOND.name: GPQA_DIAMOND}
ALIASES = {
    "math_500": "math500",
    "minerva_math": "minerva",
    "olympiad_bench": "olympiadbench",
    "olympiadbench_math_en": "olympiadbench",
    "gpqa:diamond": "gpqa_diamond",
    "gpqa": "gpqa_diamond",
}


def get_task(name: str, *, path: str | None = None, **overrides) -> TaskSpec:
    """Registered task by name (or alias), optionally with another file and field overrides."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        close = difflib.get_close_matches(key, [*TASKS, *ALIASES], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown evaluation task {name!r}.{hint} Registered: {', '.join(sorted(TASKS))}; "
            "a local file is a custom task: name=NAME,path=FILE,problem=COL,answer=COL[,format=...]"
        )
    spec = TASKS[key]
    if path is not None:
        overrides["path"] = path
    if key == GPQA_DIAMOND.name and not overrides.get("path"):
        raise ValueError(
            "task gpqa_diamond has no bundled file: pass its CSV/JSONL with --task-path gpqa_diamond=FILE "
            "(columns 'Question', 'Correct Answer', 'Incorrect Answer 1..3')"
        )
    return dataclasses.replace(spec, **overrides) if overrides else spec


_CUSTOM_KEYS = {
    "name": "name",
    "path": "path",
    "problem": "problem_field",
    "answer": "answer_field",
    "format": "answer_format",
    "id": "id_field",
    "samples": "samples",
    "temperature": "temperature",
    "top_p": "top_p",
    "max_new_tokens": "max_new_tokens",
    "distractors": "distractor_fields",
}


def parse_custom_task(text: str) -> TaskSpec:
    """A task from ``name=NAME,path=FILE[,problem=COL][,answer=COL][,format=FMT][,id=COL][,samples=K]...``.

    ``distractors`` takes ``|``-separated column names (multiple choice). Sampling keys default to
    the seed's settings.
    """
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"custom task {text!r}: item {part!r} is not key=value")
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in _CUSTOM_KEYS:
            close = difflib.get_close_matches(key, list(_CUSTOM_KEYS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"custom task {text!r}: unknown key {key!r}.{hint} Keys: {', '.join(_CUSTOM_KEYS)}"
            )
        field_name = _CUSTOM_KEYS[key]
        value = value.strip()
        if field_name in ("samples", "max_new_tokens"):
            values[field_name] = int(value)
        elif field_name in ("temperature", "top_p"):
            values[field_name] = float(value)
        elif field_name == "distractor_fields":
            values[field_name] = tuple(v.strip() for v in value.split("|") if v.strip())
        else:
            values[field_name] = value
    for required in ("name", "path"):
        if required not in values:
            raise ValueError(
                f"custom task {text!r}: missing {required}=... (e.g. name=mytask,path=/data/x.jsonl)"
            )
    return TaskSpec(**values)


def resolve_tasks(
    names: str | list[str],
    *,
    paths: dict[str, str] | None = None,
    custom: list[str] | None = None,
) -> list[TaskSpec]:
    """Task specs for comma-separated registered names plus custom task strings, in order, deduplicated."""
    if isinstance(names, str):
        names = [n for n in (x.strip() for x in names.split(",")) if n]
    paths = {ALIASES.get(k.strip().lower(), k.strip().lower()): v for k, v in (paths or {}).items()}
    specs = [get_task(n, path=paths.pop(ALIASES.get(n.lower(), n.lower()), None)) for n in names]
    if paths:
        raise ValueError(f"--task-path given for tasks not requested: {sorted(paths)}; add them to --tasks")
    specs += [parse_custom_task(c) for c in custom or []]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"task {spec.name!r} requested twice; each task name must be unique")
        seen.add(spec.name)
    if not specs:
        raise ValueError("no evaluation task requested: pass --tasks (e.g. aime24,math500) or --custom-task")
    return specs


def task_names() -> list[str]:
    """Registered task names (GPQA-Diamond included; it needs a user file)."""
    return sorted(TASKS)


__all__ = [
    "AIME_SAMPLES",
    "ALIASES",
    "GPQA_DIAMOND",
    "SEED_MAX_NEW_TOKENS",
    "SEED_TEMPERATURE",
    "SEED_TOP_P",
    "TASKS",
    "TaskSpec",
    "get_task",
    "parse_custom_task",
    "resolve_tasks",
    "task_names",
]
