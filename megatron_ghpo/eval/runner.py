"""`run_evaluation`: generate K completions per problem with a rollout engine, score, aggregate.

Generation and scoring overlap: while the engine generates chunk i+1 of a task's prompts, the
verifier pool scores chunk i (scoring runs in a background thread that only waits on the pool).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from megatron_ghpo.eval.aggregate import summarize_task
from megatron_ghpo.eval.loader import load_task
from megatron_ghpo.eval.report import EvalReport, SampleRecord, TaskReport, write_report
from megatron_ghpo.eval.scoring import PoolScorer, ScoredAnswer
from megatron_ghpo.eval.tasks import TaskSpec
from megatron_ghpo.logging_utils import get_logger, log_rank0, progress
from megatron_ghpo.records import Completion, Problem, Prompt
from megatron_ghpo.rollout.base import RolloutEngine, SamplingParams

logger = get_logger(__name__)


class Renderer(Protocol):
    """What evaluation needs from the prompt renderer (``megatron_ghpo.data.PromptRenderer``)."""

    def render(self, problem: Problem) -> Prompt: ...


class Scorer(Protocol):
    """Scores completions against golds (``megatron_ghpo.eval.scoring.PoolScorer``). A scorer with a
    true ``thread_safe`` attribute is called from a background thread, overlapping generation."""

    def score(self, golds: Sequence[str], completions: Sequence[str]) -> list[ScoredAnswer]: ...


@dataclass(kw_only=True, frozen=True)
class SamplingOverrides:
    """Settings that replace every task's defaults when not None."""

    samples: int | None = None
    """Completions per problem (K)."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = -1
    """-1 disables top-k (the seed's evaluation does not use it)."""
    max_new_tokens: int | None = None
    seed: int | None = 0
    """Sampling seed passed to the engine (None: the engine's own generator)."""

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples={self.samples}: must be >= 1")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    def resolve(self, spec: TaskSpec) -> SamplingParams:
        """The engine sampling parameters of one task (``n`` = K)."""
        return SamplingParams(
            n=self.samples if self.samples is not None else spec.samples,
            temperature=self.temperature if self.temperature is not None else spec.temperature,
            top_p=self.top_p if self.top_p is not None else spec.top_p,
            top_k=self.top_k,
            max_tokens=self.max_new_tokens if self.max_new_tokens is not None else spec.max_new_tokens,
            logprobs=False,
            seed=self.seed,
        )


@dataclass(kw_only=True)
class LoadedTask:
    """A task spec with its problems already read (reused across in-loop evaluations)."""

    spec: TaskSpec
    problems: list[Problem]


def load_tasks(tasks: Sequence[TaskSpec | LoadedTask], *, limit: int | None = None) -> list[LoadedTask]:
    """Read every task's problems (the first ``limit`` per task); already loaded tasks pass through."""
    out = []
    for t in tasks:
        if isinstance(t, LoadedTask):
            out.append(LoadedTask(spec=t.spec, problems=t.problems[:limit] if limit else t.problems))
        else:
            out.append(LoadedTask(spec=t, problems=load_task(t, limit=limit)))
    return out


def _check_completions(outputs: list[list[Completion]], n_prompts: int, n: int, task: str) -> None:
    if len(outputs) != n_prompts or any(len(o) != n for o in outputs):
        shape = [len(o) for o in outputs[:4]]
        raise RuntimeError(
            f"task {task}: the engine returned {len(outputs)} prompt results (first sizes {shape}) for "
            f"{n_prompts} prompts x n={n}; the RolloutEngine contract is n completions per prompt, in order"
        )


def _evaluate_task(
    engine: RolloutEngine,
    renderer: Renderer,
    task: LoadedTask,
    sampling: SamplingOverrides,
    scorer: Scorer,
    pass_ks: Sequence[int] | None,
    chunk_size: int,
) -> tuple[TaskReport, list[SampleRecord]]:
    spec, problems = task.spec, task.problems
    params = sampling.resolve(spec)
    prompts = [renderer.render(p) for p in problems]
    truncated_prompts = sum(p.truncated for p in prompts)
    if truncated_prompts:
        logger.warning(
            "task %s: %d of %d prompts were left-truncated to max_prompt_length; raise it",
            spec.name,
            truncated_prompts,
            len(prompts),
        )
    chunks = [range(i, min(i + chunk_size, len(prompts))) for i in range(0, len(prompts), chunk_size)]
    records: list[SampleRecord] = []
    score_time = [0.0]
    gen_s = 0.0

    def score_chunk(idx: range, outputs: list[list[Completion]]) -> list[SampleRecord]:
        t0 = time.perf_counter()
        golds = [problems[i].answer for i in idx for _ in range(params.n)]
        texts = [c.text for out in outputs for c in out]
        results = scorer.score(golds, texts)
        if len(results) != len(texts):
            raise RuntimeError(
                f"task {spec.name}: the scorer returned {len(results)} results for {len(texts)} completions"
            )
        scored = iter(results)
        chunk_records = []
        for i, out in zip(idx, outputs):
            for j, comp in enumerate(out):
                s = next(scored)
                chunk_records.append(SampleRecord(
                    task=spec.name, uid=problems[i].uid, sample_index=j, prompt=prompts[i].text,
                    completion=comp.text, gold=str(problems[i].columns.get("eval_gold", problems[i].answer)),
                    extracted=s.extracted, correct=s.correct, status=s.status,
                    finish_reason=comp.finish_reason, num_tokens=len(comp.token_ids),
                ))  # fmt: skip
        score_time[0] += time.perf_counter() - t0
        return chunk_records

    # A thread-safe scorer (the verifier pool) scores chunk i in a background thread while the engine
    # generates chunk i+1; any other scorer runs inline, in the calling thread.
    overlap = bool(getattr(scorer, "thread_safe", False))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-score") as executor:
        pending: list[Future] = []
        for idx in progress(chunks, desc=f"eval {spec.name}"):
            t0 = time.perf_counter()
            # Seed offset by the chunk start: prompt i always draws from seed + i * n, whatever chunk_size is.
            chunk_params = params
            if params.seed is not None:
                chunk_params = dataclasses.replace(params, seed=params.seed + idx.start * params.n)
            outputs = engine.generate([prompts[i].token_ids for i in idx], chunk_params)
            gen_s += time.perf_counter() - t0
            _check_completions(outputs, len(idx), params.n, spec.name)
            if overlap:
                pending.append(executor.submit(score_chunk, idx, outputs))
            else:
                records.extend(score_chunk(idx, outputs))
        for fut in pending:
            records.extend(fut.result())
    return summarize_task(
        spec, params, problems, records, truncated_prompts, pass_ks, gen_s, score_time[0]
    ), records


def run_evaluation(
    engine: RolloutEngine,
    renderer: Renderer,
    tasks: Sequence[TaskSpec | LoadedTask],
    *,
    samples: int | None = None,
    limit: int | None = None,
    sampling: SamplingOverrides | None = None,
    scorer: Scorer | None = None,
    out_dir: str | Path | None = None,
    pass_ks: Sequence[int] | None = None,
    chunk_size: int = 64,
    model_name: str = "",
) -> EvalReport:
    """Evaluate ``engine`` on ``tasks``; write the report files to ``out_dir`` when given.

    Args:
        engine: any :class:`~megatron_ghpo.rollout.base.RolloutEngine` (vLLM, transformers, live trainer engine).
        renderer: turns a Problem into a Prompt (chat template + system prompt; never a hint).
        tasks: task specs (read here) or already loaded tasks.
        samples: K completions per problem; overrides ``sampling.samples`` and every task's default.
        limit: evaluate only the first ``limit`` problems of each task.
        sampling: temperature / top_p / max_new_tokens / seed overrides (None: each task's defaults).
        scorer: scores completions; default: the accuracy reward in the default verifier pool.
        pass_ks: k values to report (each <= K); default 1, powers of two below K, and K.
        chunk_size: prompts per engine call (scoring of one chunk overlaps generation of the next).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    sampling = sampling or SamplingOverrides()
    if samples is not None:
        sampling = dataclasses.replace(sampling, samples=samples)
    scorer = scorer or PoolScorer()
    t_start = time.perf_counter()
    loaded = load_tasks(tasks, limit=limit)
    reports: list[TaskReport] = []
    all_records: dict[str, list[SampleRecord]] = {}
    for task in loaded:
        report, records = _evaluate_task(engine, renderer, task, sampling, scorer, pass_ks, chunk_size)
        reports.append(report)
        all_records[task.spec.name] = records
        log_rank0(
            logger,
            "eval %s: pass@1 %.4f over %d problems x %d samples (%d unparseable golds)",
            report.name,
            report.pass_at_1,
            report.num_scored,
            report.samples,
            report.unparseable_gold,
        )
    result = EvalReport(tasks=reports, model=model_name, wall_s=time.perf_counter() - t_start)
    if out_dir is not None:
        result.out_dir = str(out_dir)
        write_report(result, out_dir, all_records)
    bad = [t.name for t in reports if math.isnan(t.pass_at_1)]
    if bad:
        logger.warning("tasks with no parseable gold answer (pass@k is NaN): %s", bad)
    return result


def samples_per_second(report: EvalReport) -> float:
    """Completions generated and scored per second of wall time."""
    total = sum(t.num_problems * t.samples for t in report.tasks)
    return total / report.wall_s if report.wall_s > 0 else float("nan")


__all__ = ["LoadedTask", "SamplingOverrides", "load_tasks", "run_evaluation", "samples_per_second"]
