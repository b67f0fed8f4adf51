"""GHPO vs GRPO step time at equal prompts per step, on the tiny CPU setup (same seed, same data).

Runs `megatron-ghpo train` twice (TP=2 over 2 gloo ranks) from the same model folder and dataset,
once with `rl_type: ghpo` and once with `rl_type: grpo`, and compares the mean step time over the
steps after the first (which pays one-time compilation). The ratio only means something at a
difficult fraction like the paper's (40-60% of groups all wrong on the first pass): the table
prints the fraction each run saw, so check it.

    python tools/benchmarks/ghpo_step.py --model outputs/demo/sft/hf --data outputs/demo/data/rl_train.jsonl

Without --model/--data it uses the CPU demo's SFT model and RL set (run `make demo` first).
Last line: ghpo_over_grpo_step_time=X
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(method: str, args: argparse.Namespace, out: Path) -> list[dict]:
    from megatron_ghpo.train.metrics import read_metrics

    cmd = [
        sys.executable,
        "-m",
        "megatron_ghpo.cli",
        "train",
        "--config",
        str(ROOT / "examples/tiny-cpu" / f"{method}.yaml"),
        "--set",
        f"model_name_or_path={args.model}",
        "--set",
        f"dataset_name={args.data}",
        "--set",
        f"output_dir={out}",
        "--set",
        f"max_steps={args.steps}",
        "--set",
        "save_strategy=no",
        "--set",
        "overwrite_output_dir=true",
        "--set",
        f"seed={args.seed}",
    ]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "MEGATRON_GHPO_NO_PROGRESS": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3600, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{method} run failed (exit {r.returncode}); see {out.with_suffix('.log')}")
    return read_metrics(out / "metrics.jsonl")


def mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "outputs/demo/sft/hf"))
    ap.add_argument("--data", default=str(ROOT / "outputs/demo/data/rl_train.jsonl"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    for p in (args.model, args.data):
        if not Path(p).exists():
            sys.exit(f"{p} does not exist: run `make demo` first or pass --model/--data")
    tmp = Path(tempfile.mkdtemp(prefix="ghpo_step_"))
    results = {m: run(m, args, tmp / m)[1:] for m in ("grpo", "ghpo")}
    keys = [
        "ghpo/difficult_frac_stage0",
        "ghpo/generation_passes",
        "ghpo/regenerated_groups",
        "perf/rollout_s",
        "perf/train_s",
        "perf/sync_s",
        "perf/step_s",
    ]
    print(f"{'metric (mean over steps 2..N)':34s} {'GRPO':>10s} {'GHPO':>10s}")
    for k in keys:
        print(f"{k:34s} {mean(results['grpo'], k):10.3f} {mean(results['ghpo'], k):10.3f}")
    ratio = mean(results["ghpo"], "perf/step_s") / mean(results["grpo"], "perf/step_s")
    print(f"prompts per step: equal (same config); steps: {args.steps}; runs under {tmp}")
    print(f"ghpo_over_grpo_step_time={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
