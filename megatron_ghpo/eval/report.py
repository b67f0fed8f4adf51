"""Evaluation results: per-sample records, per-task and averaged metrics, and their files.

Files written by :func:`write_report` into ``out_dir``:

- ``summary.json``: every task's metrics and settings plus the macro average over tasks;
- ``samples_<task>.jsonl``: one line per completion (prompt, completion, gold, extracted answer,
  correct, finish reason, token count, scoring status);
- ``results.txt``: the table :func:`results_table` renders, as plain text.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class SampleRecord:
    """One scored completion."""

    task: str
    uid: str
    sample_index: int
    prompt: str
    completion: str
    gold: str
    extracted: str | None
    """The prediction the scorer extracted from the completion (None when nothing parsed)."""
    correct: bool | None
    """None when the gold answer could not be parsed (the problem is left out of the metrics)."""
    status: str = "ok"
    """Scoring outcome: ``ok`` | ``timeout`` | ``error`` | ``crashed`` (all but ``ok`` count as wrong)."""
    finish_reason: str = "stop"
    num_tokens: int = 0


@dataclass(kw_only=True)
class TaskReport:
    """Metrics of one task."""

    name: str
    num_problems: int
    """Problems evaluated (after ``limit``)."""
    num_scored: int
    """Problems whose gold parsed (the denominator of every pass@k)."""
    unparseable_gold: int
    samples: int
    """Completions per problem (K)."""
    pass_at_k: dict[int, float]
    """Mean over scored problems of the unbiased pass@k, for each reported k (k=1 is avg@K)."""
    pass_at_1_std: float
    """Standard deviation of the per-sample-index accuracy across the K runs (0 when K=1)."""
    mean_completion_tokens: float
    truncated_fraction: float
    """Fraction of completions that hit ``max_new_tokens``."""
    truncated_prompts: int
    scoring_failures: int
    """Completions whose scoring timed out, raised or crashed (scored as wrong)."""
    sampling: dict[str, Any]
    generate_s: float = 0.0
    score_s: float = 0.0

    @property
    def pass_at_1(self) -> float:
        return self.pass_at_k[1]


@dataclass(kw_only=True)
class EvalReport:
    """Every task's report, the macro average over tasks, and where the files went."""

    tasks: list[TaskReport]
    model: str = ""
    out_dir: str | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> dict[str, float]:
        """Unweighted mean over tasks of pass@k, for the k values every task reports (NaN-free tasks)."""
        scored = [t for t in self.tasks if t.num_scored > 0]
        if not scored:
            return {}
        common = set.intersection(*(set(t.pass_at_k) for t in scored))
        return {f"pass@{k}": sum(t.pass_at_k[k] for t in scored) / len(scored) for k in sorted(common)}

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics: ``<prefix>/<task>/pass@<k>`` per task and ``<prefix>/avg/pass@<k>``."""
        out: dict[str, float] = {}
        for t in self.tasks:
            for k, v in t.pass_at_k.items():
                out[f"{prefix}/{t.name}/pass@{k}"] = v
        for key, v in self.average.items():
            out[f"{prefix}/avg/{key}"] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        tasks = {}
        for t in self.tasks:
            d = asdict(t)
            d["pass_at_k"] = {f"pass@{k}": v for k, v in t.pass_at_k.items()}
            tasks[t.name] = d
        return {
            "model": self.model,
            "wall_s": self.wall_s,
            "tasks": tasks,
            "average": self.average,
            **self.extra,
        }


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def results_table(report: EvalReport):
    """A rich Table: one row per task (pass@k in percent) and the macro average."""
    from rich.table import Table

    ks = sorted({k for t in report.tasks for k in t.pass_at_k})
    table = Table(title=f"Evaluation of {report.model}" if report.model else "Evaluation")
    for col in (
        "task",
        "problems",
        "K",
        *(f"pass@{k}" for k in ks),
        "±",
        "no gold",
        "truncated",
        "tokens",
        "failed",
    ):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t in report.tasks:
        table.add_row(
            t.name, str(t.num_problems), str(t.samples),
            *(_fmt(t.pass_at_k.get(k, float("nan"))) for k in ks),
            _fmt(t.pass_at_1_std), str(t.unparseable_gold), f"{100 * t.truncated_fraction:.1f}%",
            f"{t.mean_completion_tokens:.0f}", str(t.scoring_failures),
        )  # fmt: skip
    avg = report.average
    if len(report.tasks) > 1 and avg:
        table.add_row(
            "average", "", "", *(_fmt(avg.get(f"pass@{k}", float("nan"))) for k in ks), "", "", "", "", ""
        )
    return table


def render_text(report: EvalReport, width: int = 140) -> str:
    """The results table as plain text."""
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed below
    console.print(results_table(report))
    text = console.export_text()
    console.file.close()
    return text


def write_samples(path: Path, records: list[SampleRecord]) -> None:
    """One JSON line per record (UTF-8, non-ASCII kept)."""
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")


def write_report(report: EvalReport, out_dir: str | Path, samples: dict[str, list[SampleRecord]]) -> None:
    """Write ``summary.json``, ``results.txt`` and one ``samples_<task>.jsonl`` per task (atomic renames)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in samples.items():
        tmp = out / f".samples_{name}.jsonl.tmp"
        write_samples(tmp, records)
        tmp.replace(out / f"samples_{name}.jsonl")
    for fname, text in (
        ("summary.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False)),
        ("results.txt", render_text(report)),
    ):
        tmp = out / f".{fname}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / fname)
