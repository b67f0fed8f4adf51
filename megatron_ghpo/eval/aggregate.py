"""Per-task metrics from scored sample records: pass@k (unbiased), avg@K spread, lengths, failures."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from megatron_ghpo.eval.passk import default_ks, mean_pass_at_k
from megatron_ghpo.eval.report import SampleRecord, TaskReport
from megatron_ghpo.eval.tasks import TaskSpec
from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Problem
from megatron_ghpo.rollout.base import SamplingParams

logger = get_logger(__name__)


def summarize_task(
    spec: TaskSpec,
    params: SamplingParams,
    problems: list[Problem],
    records: list[SampleRecord],
    truncated_prompts: int,
    pass_ks: Sequence[int] | None,
    gen_s: float,
    score_s: float,
) -> TaskReport:
    """Metrics of one task from its records (one per problem x sample). A problem with any record whose
    ``correct`` is None (unparseable gold) is left out of every pass@k and counted in ``unparseable_gold``."""
    n = params.n
    by_uid: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_uid.setdefault(r.uid, []).append(r)
    counts, per_index = [], [[] for _ in range(n)]
    unparseable = 0
    for p in problems:
        rs = by_uid[p.uid]
        if any(r.correct is None for r in rs):
            unparseable += 1
            continue
        counts.append((n, sum(bool(r.correct) for r in rs)))
        for r in rs:
            per_index[r.sample_index].append(float(bool(r.correct)))
    too_big = sorted(k for k in pass_ks or () if k > n)
    if too_big:
        logger.warning(
            "task %s: pass@k for k=%s not reported: only %d samples per problem (raise --samples)",
            spec.name,
            too_big,
            n,
        )
    ks = sorted({k for k in (pass_ks or default_ks(n)) if k <= n} | {1})
    run_acc = [sum(v) / len(v) for v in per_index if v]
    return TaskReport(
        name=spec.name, num_problems=len(problems), num_scored=len(counts), unparseable_gold=unparseable,
        samples=n, pass_at_k={k: mean_pass_at_k(counts, k) for k in ks},
        pass_at_1_std=statistics.stdev(run_acc) if len(run_acc) > 1 else 0.0,
        mean_completion_tokens=sum(r.num_tokens for r in records) / max(1, len(records)),
        truncated_fraction=sum(r.finish_reason == "length" for r in records) / max(1, len(records)),
        truncated_prompts=truncated_prompts, scoring_failures=sum(r.status != "ok" for r in records),
        sampling={"n": n, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                  "max_new_tokens": params.max_tokens, "seed": params.seed},
        generate_s=gen_s, score_s=score_s,
    )  # fmt: skip
