"""GHPO vs GRPO step time at equal prompts per step, on the tiny CPU setup (same seed, same data).

Runs `megatron-ghpo train` (TP=2 over 2 gloo ranks) from the same model folder and dataset with
`examples/tiny-cpu/grpo.yaml` and with `ghpo.yaml` in both retry modes (``hint_retry: same_step``, the
reference's in-step ladder, and ``next_step``), 16 prompts x G=8 per step, cycling through the three
``--repeats`` times (the trajectories repeat exactly; the timings of each step are averaged over the
repeats, so a slow drift of the machine's speed hits every column alike), and compares the mean step
time over the steps after the first (which pays one-time compilation).

Training runs for several epochs over a subset of the RL set (``--problems``, ``--epochs``), as the
seed recipe does (5 epochs): the first epoch shows the cold ladder (every difficult group climbs from
the unhinted stage), later epochs the steady state, where the difficulty memory starts a problem
that needed a hint last time at the hint that worked (``hint_start: memory``). The table has one
block per epoch and the whole run. The ratio only means something at a difficult fraction like
the paper's (40-60% of groups all wrong on the first pass): GRPO's column shows the fraction of the
problems themselves (GHPO's first-pass fraction drops once the memory hints known-hard problems).

    python tools/benchmarks/ghpo_step.py --model outputs/demo/sft/hf --data outputs/demo/data/rl_train.jsonl

Without --model/--data it uses the CPU demo's SFT model and RL set (run `make demo` first).
Last line: ghpo_over_grpo_step_time=X (whole run, steps 2..N) for the retry mode ghpo.yaml configures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS_PER_STEP = 16  # examples/tiny-cpu/{ghpo,grpo}.yaml: 32 x 4 sequences / G=8 per step


RUNS = {  # column -> (config in examples/tiny-cpu, overrides of that column)
    "GRPO": ("grpo", []),
    "GHPO same_step": ("ghpo", ["hint_retry=same_step"]),
    "GHPO next_step": ("ghpo", ["hint_retry=next_step"]),
}


def run(config: str, args: argparse.Namespace, data: Path, steps: int, out: Path, overrides: list[str]) -> list[dict]:
    from megatron_ghpo.train.metrics import read_metrics

    cmd = [
        sys.executable, "-m", "megatron_ghpo.cli", "train",
        "--config", str(ROOT / "examples/tiny-cpu" / f"{config}.yaml"),
        "--set", f"model_name_or_path={args.model}",
        "--set", f"dataset_name={data}",
        "--set", f"output_dir={out}",
        "--set", f"max_steps={steps}",
        "--set", "save_strategy=no",
        "--set", "overwrite_output_dir=true",
        "--set", f"seed={args.seed}",
        *[a for kv in overrides for a in ("--set", kv)],
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "MEGATRON_GHPO_NO_PROGRESS": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3600, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{out.name} run failed (exit {r.returncode}); see {out.with_suffix('.log')}")
    return read_metrics(out / "metrics.jsonl")


def average_runs(runs: list[list[dict]]) -> list[dict]:
    """Per-step means over repeated runs of one method (same seed: the same trajectory, other timings)."""
    steps = min(len(r) for r in runs)
    out = []
    for i in range(steps):
        keys = set.intersection(*(set(r[i]) for r in runs))
        out.append({k: statistics.fmean(r[i][k] for r in runs) for k in keys
                    if all(isinstance(r[i][k], (int, float)) for r in runs)})
    return out


def mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else float("nan")


KEYS = [
    "ghpo/difficult_frac_stage0",
    "ghpo/generation_passes",
    "ghpo/generated_groups",
    "ghpo/memory_started_groups",
    "ghpo/hinted_groups",
    "ghpo/unsolved_after_ladder",
    "ghpo/deferred_groups",
    "ghpo/retried_groups",
    "train/num_sequences",
    "train/num_tokens",
    "perf/input_tokens",
    "perf/padded_tokens",
    "perf/rollout_s",
    "perf/generate_s",
    "perf/score_s",
    "perf/train_s",
    "perf/sync_s",
    "perf/step_s",
]


def block(title: str, results: dict[str, list[dict]]) -> dict[str, float]:
    """Print one table block; returns each GHPO column's step-time ratio to GRPO."""
    print(f"{title:34s}" + "".join(f"{c:>16s}" for c in results))
    for k in KEYS:
        print(f"  {k:32s}" + "".join(f"{mean(rows, k):16.3f}" for rows in results.values()))
    base = mean(results["GRPO"], "perf/step_s")
    ratios = {c: mean(rows, "perf/step_s") / base for c, rows in results.items() if c != "GRPO"}
    print(f"  {'step time ratio to GRPO':32s}{'':16s}" + "".join(f"{r:16.3f}" for r in ratios.values()))
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "outputs/demo/sft/hf"))
    ap.add_argument("--data", default=str(ROOT / "outputs/demo/data/rl_train.jsonl"))
    ap.add_argument("--problems", type=int, default=64, help="RL problems used (the first N rows)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs over the problems (the seed recipe trains 5)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per column, cycling through the columns so slow drifts of the machine hit all alike")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (repeatable)")
    args = ap.parse_args()
    for p in (args.model, args.data):
        if not Path(p).exists():
            sys.exit(f"{p} does not exist: run `make demo` first or pass --model/--data")
    if args.problems < PROMPTS_PER_STEP or args.problems % PROMPTS_PER_STEP:
        sys.exit(f"--problems must be a positive multiple of {PROMPTS_PER_STEP} (prompts per step)")
    tmp = Path(tempfile.mkdtemp(prefix="ghpo_step_"))
    rows = Path(args.data).read_text().splitlines()[: args.problems]
    if len(rows) < args.problems:
        sys.exit(f"{args.data} has {len(rows)} rows, fewer than --problems {args.problems}")
    data = tmp / "problems.jsonl"
    data.write_text("\n".join(rows) + "\n")
    per_epoch = args.problems // PROMPTS_PER_STEP
    steps = per_epoch * args.epochs
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")
    runs: dict[str, list[list[dict]]] = {c: [] for c in RUNS}
    for rep in range(args.repeats):
        for c, (config, own) in RUNS.items():
            out = tmp / f"{c.lower().replace(' ', '_')}{rep}"
            runs[c].append(run(config, args, data, steps, out, [*args.overrides, *own]))
    for c, rs in runs.items():
        if any([r.get("train/loss") for r in x] != [r.get("train/loss") for r in rs[0]] for x in rs[1:]):
            print(f"note: the {c} runs did not repeat the same trajectory (losses differ)")
    results = {c: average_runs(rs) for c, rs in runs.items()}
    print(f"{PROMPTS_PER_STEP} prompts x G=8 per step (the same config for all but hint_retry), {args.problems} "
          f"problems, {args.epochs} epochs = {steps} steps, seed {args.seed}, {args.repeats} alternating run(s) per "
          f"column averaged per step; step 1 excluded; overrides {args.overrides or 'none'}; runs under {tmp}")
    for e in range(args.epochs):
        lo, hi = max(1, e * per_epoch), (e + 1) * per_epoch
        block(f"epoch {e + 1} (steps {lo + 1}..{hi})", {c: rows[lo:hi] for c, rows in results.items()})
    ratios = block(f"whole run (steps 2..{steps})", {c: rows[1:] for c, rows in results.items()})
    default = f"GHPO {configured_retry(args.overrides)}"
    (tmp / "summary.json").write_text(json.dumps({"ratios": ratios, "configured": default, "steps": steps}))
    print(f"the GHPO config (examples/tiny-cpu/ghpo.yaml{' with overrides' if args.overrides else ''}) uses "
          f"{default.split()[1]}")
    print(f"ghpo_over_grpo_step_time={ratios[default]:.3f}")
    return 0


def configured_retry(overrides: list[str]) -> str:
    """``hint_retry`` of examples/tiny-cpu/ghpo.yaml after ``overrides``."""
    from megatron_ghpo.config_loader import load_config

    return load_config(ROOT / "examples/tiny-cpu/ghpo.yaml", overrides).ghpo.hint_retry


if __name__ == "__main__":
    sys.exit(main())
