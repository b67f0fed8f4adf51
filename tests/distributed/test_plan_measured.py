"""The planner against the real Megatron policy on CPU (gloo): exact static bytes, activation peak within 20%.

Each launch builds the project's ``MegatronPolicy`` (random weights) for every case in the same
processes, steps once, profiles one ``forward_backward`` (``megatron_ghpo.plan.measure``), and the
planner predicts the same cases with its ``local`` layer-spec profile.
"""

from __future__ import annotations

import pytest

from megatron_ghpo.plan.check import QWEN25_05B, STATIC_KEYS, TINY, Case, format_rows, run_cases, with_layers

pytestmark = pytest.mark.distributed

ACTIVATION_TOLERANCE = 0.20


def _check(rows) -> None:
    table = format_rows(rows)
    for r in rows:
        if r.key in STATIC_KEYS:
            assert r.predicted == r.measured, f"{r.case} TP={r.tp} rank {r.rank} {r.key}: predicted {r.predicted} != measured {r.measured}\n{table}"
        else:
            assert abs(r.ratio - 1) <= ACTIVATION_TOLERANCE, (
                f"{r.case} TP={r.tp} rank {r.rank}: activation peak predicted {r.predicted} vs measured {r.measured} "
                f"({r.ratio:.1%}, tolerance ±{ACTIVATION_TOLERANCE:.0%})\n{table}")


def test_plan_matches_real_model_tp1(tmp_path):
    cases = [
        Case(name="tiny none", hf_config=TINY, micro_batch_size=4, prompt_length=128, completion_length=128),
        Case(name="tiny full-recompute", hf_config=TINY, recompute="full", micro_batch_size=4, prompt_length=128,
             completion_length=128),
        Case(name="tiny fp32 replicated-optimizer", hf_config=TINY, bf16=False, distributed_optimizer=False,
             micro_batch_size=2, prompt_length=64, completion_length=64),
        Case(name="qwen2.5-0.5b-shape 1L", hf_config=with_layers(QWEN25_05B, 1), prompt_length=16, completion_length=16),
    ]  # fmt: skip
    _check(run_cases(cases, tp=1, timeout_s=300, work_dir=tmp_path))


def test_plan_matches_real_model_tp2(tmp_path):
    cases = [
        Case(name="tiny none", hf_config=TINY, micro_batch_size=4, prompt_length=128, completion_length=128),
        Case(name="qwen2.5-0.5b-shape 1L", hf_config=with_layers(QWEN25_05B, 1), prompt_length=16, completion_length=16),
    ]
    _check(run_cases(cases, tp=2, timeout_s=300, work_dir=tmp_path))
