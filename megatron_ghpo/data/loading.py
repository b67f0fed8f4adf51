"""Load problems from local jsonl/json/parquet files, a directory of them, or a Hugging Face dataset.

Two schemas work out of the box (the column names are configurable):

* GHPO: ``problem``, ``solution`` = the gold answer, ``solution_hint`` = the worked solution;
* MATH: ``problem``, ``solution`` = a worked solution whose last ``\\boxed{…}`` is the answer. The
  answer becomes ``\\boxed{<content>}`` and the worked solution becomes the hint.

``answer_from="auto"`` picks per dataset: ``column`` when the hint column exists, else
``last_boxed`` when most answers contain a ``\\boxed``/``\\fbox``, else ``column``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_ghpo.data.answers import boxed_gold
from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Problem

logger = get_logger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ID_COLUMNS = ("uid", "unique_id", "id", "idx")
ANSWER_FROM = ("auto", "column", "last_boxed")
ON_INVALID = ("error", "skip")


class DatasetUnavailableError(RuntimeError):
    """A Hugging Face dataset name was given but the hub cannot be reached."""


Row = tuple[str, int, dict[str, Any]]  # (source label, row index within it, row)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}); fix or remove the line"
                ) from exc
            if not isinstance(row, dict):
                raise ValueError(  # noqa: TRY004 - bad data, reported like every other data error
                    f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object (one row)"
                )
            rows.append(row)
    return rows


def read_json(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); is it JSON Lines (.jsonl)?"
            ) from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of row objects (or {{'data': [...]}})")
    return data


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {DATA_SUFFIXES}")


def _split_files(directory: Path, split: str) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{directory}: no {'/'.join(DATA_SUFFIXES)} files in this directory")

    def for_split(p: Path) -> bool:
        stem = p.stem.lower()
        return (
            stem == split
            or stem.startswith((f"{split}-", f"{split}_", f"{split}."))
            or p.parent.name == split
        )

    chosen = [p for p in files if for_split(p)]
    return chosen or files


def _hub_rows(name: str, split: str) -> list[Row]:
    offline = any(
        os.environ.get(k, "0").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    how = (
        "point data.dataset_name at local files instead: a .jsonl/.json/.parquet file or a directory of them "
        f"(on a machine with network: datasets.load_dataset({name!r}, split={split!r}).to_json('data.jsonl'))"
    )
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        unreachable = offline or any(
            s in text.lower()
            for s in ("offline", "connection", "resolve", "network", "timed out", "couldn't reach")
        )
        if unreachable:
            raise DatasetUnavailableError(
                f"cannot load Hugging Face dataset {name!r}: the hub is unreachable "
                f"({'offline mode is set' if offline else text[:200]}); {how}"
            ) from exc
        raise ValueError(
            f"cannot load Hugging Face dataset {name!r} (split {split!r}): {text[:300]}; {how}"
        ) from exc
    label = name.replace("/", "__")
    return [(label, i, dict(row)) for i, row in enumerate(ds)]


def read_rows(source: str | os.PathLike, *, split: str = "train") -> list[Row]:
    """Raw rows of a file, a directory (files named after ``split`` if any, else all), or a hub dataset."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return [(path.stem, i, r) for i, r in enumerate(_read_file(path))]
    if path.is_dir():
        rows: list[Row] = []
        for f in _split_files(path, split):
            rows.extend((str(f.relative_to(path).with_suffix("")), i, r) for i, r in enumerate(_read_file(f)))
        return rows
    looks_local = (
        text.startswith(("/", ".", "~")) or path.suffix.lower() in DATA_SUFFIXES or text.count("/") > 1
    )
    if looks_local or not text:
        raise FileNotFoundError(
            f"dataset {text!r} not found; set data.dataset_name to an existing {'/'.join(DATA_SUFFIXES)} file, "
            "a directory of them, or a Hugging Face dataset name (org/name)"
        )
    return _hub_rows(text, split)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value if value.strip() else None


def _why(row: dict[str, Any], column: str) -> str:
    if column not in row or row[column] is None:
        return f"column {column!r} is missing"
    value = row[column]
    if isinstance(value, str):
        return f"column {column!r} is empty"
    return f"column {column!r} holds a {type(value).__name__}, expected text"


def _pick_answer_mode(rows: list[Row], answer_column: str, hint_column: str) -> str:
    if any(hint_column in r for _, _, r in rows):
        return "column"
    answers = [r.get(answer_column) for _, _, r in rows if isinstance(r.get(answer_column), str)]
    boxed = sum(("\\boxed" in a or "\\fbox" in a) for a in answers)
    return "last_boxed" if answers and boxed * 2 > len(answers) else "column"


def _uids(rows: list[Row], id_column: str | None) -> list[str]:
    if id_column == "auto":
        present = [c for c in ID_COLUMNS if rows and all(c in r and r[c] is not None for _, _, r in rows)]
        id_column = present[0] if present else None
    if id_column is not None:
        missing = [(lab, i) for lab, i, r in rows if r.get(id_column) is None]
        if missing:
            lab, i = missing[0]
            raise ValueError(
                f"{lab}: row {i} has no {id_column!r} (data.id_column); {len(missing)} rows lack it"
            )
        ids = [str(r[id_column]) for _, _, r in rows]
        if len(set(ids)) == len(ids):
            return ids
        logger.warning("id column %r has duplicate values; using <file>:<row> as problem ids", id_column)
    return [f"{lab}:{i}" for lab, i, _ in rows]


def load_problems(
    source: str | os.PathLike,
    *,
    prompt_column: str = "problem",
    answer_column: str = "solution",
    hint_column: str = "solution_hint",
    split: str = "train",
    answer_from: str = "auto",
    on_invalid: str = "error",
    limit: int | None = None,
    id_column: str | None = "auto",
) -> list[Problem]:
    """Problems of a dataset, normalised through the column mapping.

    Args:
        source: a .jsonl/.json/.parquet file, a directory of them, or a Hugging Face dataset name.
        answer_from: ``column`` (the answer column is the gold answer), ``last_boxed`` (it is a worked
            solution: gold = ``\\boxed{<its last box>}``, hint = the solution unless a hint column
            exists), or ``auto`` (see the module docstring).
        on_invalid: a row with a missing/empty prompt or answer (or no box in ``last_boxed`` mode) is an
            error naming file, row and column (``error``) or is skipped and counted (``skip``).
        limit: keep the first ``limit`` valid problems.
        id_column: column holding a stable id; ``auto`` takes the first of uid/unique_id/id/idx present in
            every row, else ``<file stem>:<row index>``; None always uses the latter.
    """
    if answer_from not in ANSWER_FROM:
        raise ValueError(f"answer_from must be one of {ANSWER_FROM}, got {answer_from!r}")
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    rows = read_rows(source, split=split)
    if not rows:
        raise ValueError(f"dataset {os.fspath(source)!r} has no rows")
    columns = sorted({k for _, _, r in rows for k in r})
    for role, col in (("prompt", prompt_column), ("answer", answer_column)):
        if col not in columns:
            raise ValueError(
                f"dataset {os.fspath(source)!r} has no {role} column {col!r}; its columns are {columns} "
                f"(set data.{'dataset_prompt_column' if role == 'prompt' else 'answer_column'})"
            )
    mode = _pick_answer_mode(rows, answer_column, hint_column) if answer_from == "auto" else answer_from
    if answer_from == "auto":
        logger.info("dataset %s: answers read as %r (answer_from=auto)", os.fspath(source), mode)
    uids = _uids(rows, id_column)
    problems: list[Problem] = []
    skipped: list[str] = []
    for (label, index, row), uid in zip(rows, uids):
        problem = _text(row.get(prompt_column))
        raw_answer = _text(row.get(answer_column))
        hint = _text(row.get(hint_column))
        bad = None
        if problem is None:
            bad = _why(row, prompt_column)
        elif raw_answer is None:
            bad = _why(row, answer_column)
        answer = raw_answer
        if bad is None and mode == "last_boxed":
            answer = boxed_gold(raw_answer)
            if answer is None:
                bad = f"column {answer_column!r} has no \\boxed{{...}} answer (answer_from=last_boxed)"
            elif hint is None:
                hint = raw_answer
        if bad is not None:
            skipped.append(f"{label}: row {index}: {bad}")
            continue
        problems.append(Problem(uid=uid, problem=problem, answer=answer, hint=hint, columns=dict(row)))
        if limit is not None and len(problems) >= limit:
            break
    if skipped and on_invalid == "error":
        more = f" ({len(skipped)} invalid rows in all; first shown)" if len(skipped) > 1 else ""
        raise ValueError(f"{skipped[0]}{more}; fix the rows or set data.on_invalid: skip")
    if skipped:
        logger.warning(
            "dataset %s: skipped %d invalid rows (first: %s)", os.fspath(source), len(skipped), skipped[0]
        )
    if not problems:
        raise ValueError(f"dataset {os.fspath(source)!r}: no valid rows ({len(skipped)} skipped as invalid)")
    return problems
