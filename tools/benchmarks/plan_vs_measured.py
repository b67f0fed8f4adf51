"""The planner's per-rank predictions against the real Megatron policy, on CPU (gloo).

For every case the real ``MegatronPolicy`` is built at TP=1 and TP=2 (random weights, the project's
model provider, DDP and Megatron optimizer), stepped once, and one ``forward_backward`` is profiled
(``megatron_ghpo.plan.measure``: PyTorch profiler memory events, peak of memory allocated during
the call). Parameter, gradient-buffer and optimizer bytes must be equal to the prediction; the
activation peak is shown as predicted / measured. Cases: the tiny test model's shapes and
Qwen2.5-0.5B's shapes (hidden 896, vocabulary 151,936) with fewer layers, recompute none and full.

Prints a table, then ``static_exact=<n>/<n>`` and ``activation_worst_error=<x>%`` as the last lines.
Usage: ``python tools/benchmarks/plan_vs_measured.py [--quick]`` (about 3 minutes; ``--quick``: 1).
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_ghpo.plan.check import QWEN25_05B, STATIC_KEYS, TINY, Case, run_cases, with_layers


def cases(quick: bool) -> list[Case]:
    out = [
        Case(name="tiny none", hf_config=TINY, micro_batch_size=4, prompt_length=256, completion_length=256),
        Case(name="tiny full", hf_config=TINY, recompute="full", micro_batch_size=4, prompt_length=256, completion_length=256),
        Case(name="0.5b-shape 2L none", hf_config=with_layers(QWEN25_05B, 2), micro_batch_size=2, prompt_length=64,
             completion_length=64),
    ]  # fmt: skip
    if not quick:
        out += [
            Case(name="0.5b-shape 4L full", hf_config=with_layers(QWEN25_05B, 4), recompute="full", micro_batch_size=2,
                 prompt_length=128, completion_length=128),
            Case(name="0.5b-shape 2L fp32 replicated-opt", hf_config=with_layers(QWEN25_05B, 2), bf16=False,
                 distributed_optimizer=False, micro_batch_size=1, prompt_length=64, completion_length=64),
        ]  # fmt: skip
    return out


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three cases instead of five")
    args = ap.parse_args()
    rows = []
    for tp in (1, 2):
        t0 = time.perf_counter()
        rows += run_cases(cases(args.quick), tp=tp, timeout_s=900)
        print(f"TP={tp}: measured in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    table = Table(title="megatron-ghpo plan: predicted vs measured per rank (CPU, local layer spec, gloo)")
    for col in ("case", "TP", "rank", "quantity", "predicted", "measured", "pred/meas"):
        table.add_column(col, justify="left" if col in ("case", "quantity") else "right")
    for r in rows:
        mark = "" if r.key not in STATIC_KEYS else (" =" if r.predicted == r.measured else " ≠")
        table.add_row(r.case, str(r.tp), str(r.rank), r.key, f"{r.predicted:,}", f"{r.measured:,}", f"{r.ratio:.1%}{mark}")
    Console(width=140).print(table)
    static = [r for r in rows if r.key in STATIC_KEYS]
    exact = sum(r.predicted == r.measured for r in static)
    worst = max(abs(r.ratio - 1) for r in rows if r.key == "activation_peak_bytes")
    print(f"static_exact={exact}/{len(static)}")
    print(f"activation_worst_error={worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
