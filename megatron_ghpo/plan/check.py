"""Predicted vs measured, on CPU: launch :mod:`megatron_ghpo.plan.measure` ranks, predict the same cases.

Used by ``tests/distributed/test_plan_measured.py`` and ``tools/benchmarks/plan_vs_measured.py``.
Predictions use the ``local`` layer-spec profile and the gloo gradient copy (what runs here).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ghpo.plan.activations import ActivationOptions
from megatron_ghpo.plan.predict import predict_rank

STATIC_KEYS = ("param_numel", "param_bytes", "grad_bytes", "optimizer_bytes")
QWEN25_05B = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
}  # fmt: skip
"""Qwen2.5-0.5B's shapes (the bundled preset's numbers)."""
TINY = {
    "model_type": "qwen2", "vocab_size": 384, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
}  # fmt: skip
"""The shapes of ``megatron_ghpo.models.tiny.build_tiny_model``'s defaults (384-token tokenizer)."""


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    hf_config: dict[str, Any]
    bf16: bool = True
    distributed_optimizer: bool = True
    recompute: str = "none"
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    prompt_length: int = 16
    completion_length: int = 16

    def measure_kwargs(self, tp: int) -> dict[str, Any]:
        return {"hf_config": self.hf_config, "tp": tp, "bf16": self.bf16, "distributed_optimizer": self.distributed_optimizer,
                "recompute": self.recompute == "full", "micro_batch_size": self.micro_batch_size,
                "num_micro_batches": self.num_micro_batches, "prompt_length": self.prompt_length,
                "completion_length": self.completion_length}  # fmt: skip


def with_layers(config: dict[str, Any], layers: int) -> dict[str, Any]:
    return {**config, "num_hidden_layers": layers}


@dataclass(frozen=True, kw_only=True)
class Row:
    case: str
    tp: int
    rank: int
    key: str
    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.predicted / self.measured if self.measured else float("inf")


def run_cases(cases: list[Case], *, tp: int, timeout_s: float = 600.0, work_dir: Path | None = None) -> list[Row]:
    """Measure ``cases`` on ``tp`` local ranks (one launch) and pair every number with its prediction."""
    from megatron_ghpo.train.launcher import spawn_local

    work = Path(work_dir or tempfile.mkdtemp(prefix="plan_check_"))
    spec = work / f"cases_tp{tp}.json"
    spec.write_text(json.dumps([c.measure_kwargs(tp) for c in cases]))
    out = work / f"out_tp{tp}"
    rc = spawn_local("megatron_ghpo.plan.measure", [str(spec), str(out)], tp, timeout_s=timeout_s, threads_per_rank=max(1, 2 // tp),
                     extra_env={"PYTHONWARNINGS": "ignore"})  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"measurement launch at TP={tp} exited with {rc} (timeout {timeout_s:.0f}s gives 124)")
    rows: list[Row] = []
    for rank in range(tp):
        measured = json.loads((out / f"rank{rank}.json").read_text())
        for case, m in zip(cases, measured):
            pred = predict_rank(
                case.hf_config, tp=tp, bf16=case.bf16, distributed_optimizer=case.distributed_optimizer,
                micro_batch_size=case.micro_batch_size, num_micro_batches=case.num_micro_batches,
                prompt_length=case.prompt_length, completion_length=case.completion_length,
                activations=ActivationOptions(impl="local", recompute=case.recompute, bf16=case.bf16, gloo_grad_copy=True),
            )  # fmt: skip
            for key in (*STATIC_KEYS, "activation_peak_bytes"):
                rows.append(Row(case=case.name, tp=tp, rank=rank, key=key, predicted=pred.value(key), measured=m[key]))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A plain-text table (the benchmark prints it with rich)."""
    lines = [f"{'case':34s} {'TP':>2s} {'rank':>4s} {'quantity':22s} {'predicted':>14s} {'measured':>14s} {'pred/meas':>9s}"]
    for r in rows:
        lines.append(f"{r.case:34s} {r.tp:2d} {r.rank:4d} {r.key:22s} {r.predicted:14,d} {r.measured:14,d} {r.ratio:9.1%}")
    return "\n".join(lines)
