"""GHPO vs GRPO step time at equal prompts per step, on the tiny CPU setup (same seed, same data).

Runs `megatron-ghpo train` (TP=2 over 2 gloo ranks) from the same model folder and dataset with
`examples/tiny-cpu/ghpo.yaml` and with `grpo.yaml` (16 prompts x G=8 per step), alternating the two
``--repeats`` times (the trajectories repeat exactly; the timings of each step are averaged over the
repeats, so a slow drift of the machine's speed hits both methods alike), and compares the mean step
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
Last line: ghpo_over_grpo_step_time=X (whole run, steps 2..N).
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


def run(method: str, args: argparse.Namespace, data: Path, steps: int, out: Path, overrides: list[str]) -> list[dict]:
    from megatron_ghpo.train.metrics import read_metrics

    cmd = [
        sys.executable, "-m", "megatron_ghpo.cli", "train",
        "--config", str(ROOT / "examples/tiny-cpu" / f"{method}.yaml"),
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
        sys.exit(f"{method} run failed (exit {r.returncode}); see {out.with_suffix('.log')}")
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


def block(title: str, grpo: list[dict], ghpo: list[dict]) -> float:
    print(f"{title:34s} {'GRPO':>10s} {'GHPO':>10s}")
    for k in KEYS:
        print(f"  {k:32s} {mean(grpo, k):10.3f} {mean(ghpo, k):10.3f}")
    ratio = mean(ghpo, "perf/step_s") / mean(grpo, "perf/step_s")
    print(f"  {'step time ratio GHPO/GRPO':32s} {ratio:21.3f}")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "outputs/demo/sft/hf"))
    ap.add_argument("--data", default=str(ROOT / "outputs/demo/data/rl_train.jsonl"))
    ap.add_argument("--problems", type=int, default=64, help="RL problems used (the first N rows)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs over the problems (the seed recipe trains 5)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per method, alternating GRPO and GHPO so slow drifts of the machine hit both alike")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both runs (repeatable)")
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
    runs: dict[str, list[list[dict]]] = {"grpo": [], "ghpo": []}
    for rep in range(args.repeats):
        for m in runs:
            runs[m].append(run(m, args, data, steps, tmp / f"{m}{rep}", args.overrides))
    for m, rs in runs.items():
        if any([r.get("train/loss") for r in x] != [r.get("train/loss") for r in rs[0]] for x in rs[1:]):
            print(f"note: the {m} runs did not repeat the same trajectory (losses differ)")
    results = {m: average_runs(rs) for m, rs in runs.items()}
    print(f"{PROMPTS_PER_STEP} prompts x G=8 per step (same config for both), {args.problems} problems, "
          f"{args.epochs} epochs = {steps} steps, seed {args.seed}, {args.repeats} alternating run(s) per method "
          f"averaged per step; step 1 excluded; overrides {args.overrides or 'none'}; runs under {tmp}")
    for e in range(args.epochs):
        lo, hi = max(1, e * per_epoch), (e + 1) * per_epoch
        block(f"epoch {e + 1} (steps {lo + 1}..{hi})", results["grpo"][lo:hi], results["ghpo"][lo:hi])
    ratio = block(f"whole run (steps 2..{steps})", results["grpo"][1:], results["ghpo"][1:])
    (tmp / "summary.json").write_text(json.dumps({"ghpo_over_grpo_step_time": ratio, "steps": steps}))
    print(f"ghpo_over_grpo_step_time={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
