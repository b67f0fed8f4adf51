"""Read an evaluation task's file into :class:`~megatron_ghpo.records.Problem` rows.

Each Problem carries ``answer`` = the gold wrapped in ``\\boxed{}`` (what the accuracy reward
parses), ``hint=None`` (evaluation never shows hints), and ``columns`` = the original row plus
``eval_task`` (task name) and ``eval_gold`` (the bare gold answer text, for reports).
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from pathlib import Path
from typing import Any

from megatron_ghpo.data.loading import read_json, read_jsonl, read_parquet
from megatron_ghpo.eval.answers import GoldAnswerError, extract_gold, gold_for_reward
from megatron_ghpo.eval.tasks import TaskSpec
from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Problem

logger = get_logger(__name__)

LETTERS = "ABCDEFGHIJ"

_BROKEN_ESCAPE = re.compile(
    r"\x0c(?=rac)|\t(?=riangle|imes|ext|heta|frac)|\x08(?=oxed|eta|inom|egin|igl|igr)|\r(?=ight|angle)"
)
_ESCAPE_LETTER = {"\x0c": "\\f", "\t": "\\t", "\x08": "\\b", "\r": "\\r"}


def repair_escapes(text: str) -> tuple[str, int]:
    """Undo JSON-escape accidents in LaTeX: a form feed before ``rac`` was ``\\frac``, a TAB before
    ``riangle`` was ``\\triangle``, and so on (AIME25 rows 18, 19, 27 carry these). Only control
    characters directly followed by the rest of a LaTeX command name are touched; a TAB before
    Asymptote's ``return`` stays. Returns the text and the number of repairs."""
    return _BROKEN_ESCAPE.subn(lambda m: _ESCAPE_LETTER[m.group(0)], text)


MC_INSTRUCTION = "Answer with the letter of the correct option inside \\boxed{}."


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (list of objects), .csv or .parquet file, in file order."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"evaluation file {p} does not exist (check --task-path / path=)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(p)
    if suffix == ".json":
        return read_json(p)
    if suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        return read_parquet(p)
    raise ValueError(f"{p}: unsupported extension {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _row_id(spec: TaskSpec, row: dict[str, Any], index: int) -> str:
    if spec.id_field is None or row.get(spec.id_field) in (None, ""):
        return str(index)
    return str(row[spec.id_field])


def _multiple_choice(spec: TaskSpec, row: dict[str, Any], uid: str) -> tuple[str, str]:
    """(problem text with lettered options, gold letter); option order is a fixed shuffle per uid."""
    options = [str(row[spec.answer_field]).strip()] + [str(row[f]).strip() for f in spec.distractor_fields]
    order = list(range(len(options)))
    random.Random(int(hashlib.sha256(uid.encode()).hexdigest()[:16], 16)).shuffle(order)
    lines = [f"{LETTERS[pos]}) {options[i]}" for pos, i in enumerate(order)]
    gold = LETTERS[order.index(0)]
    text = f"{str(row[spec.problem_field]).strip()}\n\n" + "\n".join(lines) + f"\n\n{MC_INSTRUCTION}"
    return text, gold


def load_task(spec: TaskSpec, *, limit: int | None = None) -> list[Problem]:
    """The task's problems in file order (the first ``limit`` rows when given).

    Raises ValueError naming the file, row and column when a row lacks a column or its gold answer
    cannot be read in ``spec.answer_format``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: must be >= 1 (or None for every row)")
    path = spec.file()
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: task {spec.name} has no rows")
    needed = [spec.problem_field, spec.answer_field, *spec.distractor_fields]
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ValueError(
            f"{path}: task {spec.name} needs column(s) {missing} but the first row has {sorted(rows[0])}; "
            "set problem=/answer= in the custom task (or the TaskSpec fields) to the right columns"
        )
    problems: list[Problem] = []
    repairs = 0
    for index, row in enumerate(rows[:limit] if limit else rows):
        uid = f"{spec.name}/{_row_id(spec, row, index)}"
        for column in needed:
            if column not in row:
                raise ValueError(f"{path}: row {index} (uid {uid}) has no column {column!r}; fix the row")
        try:
            if spec.answer_format == "multiple_choice":
                text, gold = _multiple_choice(spec, row, uid)
            else:
                text = row[spec.problem_field]
                gold = extract_gold(row[spec.answer_field], spec.answer_format)
        except GoldAnswerError as exc:
            raise ValueError(
                f"{path}: row {index} (uid {uid}) column {spec.answer_field!r}: {exc}; "
                f"fix the row or choose another format= (one of text, number, first_of_list, last_boxed, gsm8k)"
            ) from exc
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{path}: row {index} (uid {uid}) column {spec.problem_field!r} is empty or not text"
            )
        text, fixed = repair_escapes(text)
        repairs += fixed
        columns = dict(row) | {"eval_task": spec.name, "eval_gold": gold}
        problems.append(
            Problem(uid=uid, problem=text, answer=gold_for_reward(gold), hint=None, columns=columns)
        )
    if repairs:
        logger.info("task %s: repaired %d JSON-escape accidents in problem texts (e.g. form feed + 'rac' -> \\frac)",
                    spec.name, repairs)  # fmt: skip
    if len({p.uid for p in problems}) != len(problems):
        raise ValueError(
            f"{path}: column {spec.id_field!r} has duplicate ids in task {spec.name}; set id= to a unique column"
        )
    return problems
