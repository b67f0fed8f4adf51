"""`megatron-ghpo demo`: the CPU main job, GHPO vs GRPO from one SFT warm-up, end to end.

1. Build a tiny Qwen2-shaped model (RoPE, GQA, SwiGLU) and a byte-level BPE tokenizer locally.
2. Write the synthetic task (``megatron_ghpo.data.synthetic``): an SFT set of easy problems (a
   one-digit first step) with shares of the RL kind and of far harder first steps, an RL set of hard
   problems (a two-digit first step with a carry, then easy one-digit steps) and a held-out set of hard
   problems. A hint that reveals the first line of the worked solution removes the hard part.
3. SFT warm-up (``megatron-ghpo sft``, TP=2 over 2 gloo processes; half of the prompts hinted, each
   trained to continue after its hint, and on the far harder problems only the hint's result gets the
   next step right, so the model learns to use a hint), written as a Hugging Face folder.
4. From that folder, one GHPO and one GRPO run per seed with the same seed, steps and prompts per
   step (``megatron-ghpo train``, TP=2), each evaluated without hints on the held-out problems at
   its last step (in-loop evaluation, near-greedy).
5. A side-by-side table, ``summary.json`` and PNG plots.

Every stage is a real subprocess of the `megatron-ghpo` CLI, so the demo runs exactly what users run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_ghpo.logging_utils import get_logger

logger = get_logger("demo")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tiny-cpu"
METHODS = ("ghpo", "grpo")
TASK = "heldout_hard"
MAX_NEW_TOKENS = 64
"""Completion budget of the demo (examples/tiny-cpu/*.yaml's max_completion_length): the longest worked
solution, four steps, is 51 tokens with EOS."""


def _cli(args: list[str], log: Path, timeout_s: float) -> None:
    """Run one `megatron-ghpo` command; its output goes to ``log``; a failure names the log."""
    cmd = [sys.executable, "-m", "megatron_ghpo.cli", *args]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "MEGATRON_GHPO_NO_PROGRESS": "1"}
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`megatron-ghpo {args[0]}` exceeded {timeout_s:.0f} s; see {log}") from None
    if r.returncode != 0:
        tail = "".join(open(log).readlines()[-25:])
        raise RuntimeError(f"`megatron-ghpo {' '.join(args[:1])}` failed (exit {r.returncode}); log {log}:\n{tail}")
    logger.info("%s done in %.0f s (log: %s)", args[0], time.monotonic() - t0, log)


def prepare(out: Path, *, n_rl: int, n_heldout: int, n_sft: int) -> dict[str, Path]:
    from megatron_ghpo.data.synthetic import generate_problems, write_jsonl
    from megatron_ghpo.models.tiny import build_tiny_model

    base = out / "base_model"
    if not (base / "config.json").is_file():
        build_tiny_model(base, arch="qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                         intermediate_size=384, initializer_range=0.02, tie_word_embeddings=True, seed=0)
    data = out / "data"
    # The warm-up: 65% easy problems; 20% of the RL task's kind (some signal for GRPO to start from);
    # 15% whose first step is far beyond the model (4-digit sums with 3 carries, 3-digit products). Half of
    # all prompts are hinted (sft.yaml's sft_hint_fraction) and a hinted target is the text after the hint
    # (sft_hinted_target: continuation), so on those far-too-hard problems only taking the hint's last
    # result gets the next step right: the model learns to build on a hint rather than recompute it (easy
    # problems cannot teach that: it computes their first step itself and ignores the hint).
    medium, copy = max(1, n_sft // 5), max(2, n_sft * 3 // 20)
    sft = (generate_problems(n_sft - medium - copy, seed=1, difficulty="easy")
           + generate_problems(medium, seed=2, difficulty="medium")
           + generate_problems(copy // 2, seed=5, difficulty="hard")
           + generate_problems(copy - copy // 2, seed=6, difficulty="hard_mul"))
    paths = {
        "base": base,
        "sft": write_jsonl(sft, data / "sft.jsonl"),
        "rl": write_jsonl(generate_problems(n_rl, seed=3, difficulty="medium"), data / "rl_train.jsonl"),
        "heldout": write_jsonl(generate_problems(n_heldout, seed=4, difficulty="medium", split="heldout"),
                               data / "heldout_hard.jsonl"),
    }
    return paths


def _last(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return vals[-1] if vals else None


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def summarize(runs: dict[str, dict[int, Path]], sft_acc: float | None, settings: dict) -> dict:
    from megatron_ghpo.train.metrics import read_metrics

    summary: dict = {"settings": settings, "sft_heldout_hard_acc": sft_acc}
    for method, by_seed in runs.items():
        per_seed = {}
        for seed, run_dir in by_seed.items():
            rows = read_metrics(run_dir / "metrics.jsonl")
            per_seed[seed] = {
                "heldout_hard_acc": _last(rows, f"eval/{TASK}/pass@1"),
                "difficult_frac": _mean(rows, "ghpo/difficult_frac_stage0"),
                "acc_unhinted": _mean(rows, "ghpo/acc_unhinted"),
                "generation_passes": _mean(rows, "ghpo/generation_passes"),
                "step_time_s": _mean(rows[1:] or rows, "perf/step_s"),
                "final_reward": _last(rows, "train/reward"),
            }
        accs = [v["heldout_hard_acc"] for v in per_seed.values() if v["heldout_hard_acc"] is not None]
        summary[method] = {
            "heldout_hard_acc": statistics.fmean(accs) if accs else None,
            "heldout_hard_acc_per_seed": accs,
            **{k: statistics.fmean([v[k] for v in per_seed.values() if v[k] is not None] or [float("nan")])
               for k in ("difficult_frac", "acc_unhinted", "generation_passes", "step_time_s")},
            "seeds": per_seed,
        }
    return summary


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = summary["settings"]
    Console().print(f"GHPO vs GRPO on the synthetic task: {s['seeds']} seed(s), {s['rl_steps']} RL steps from one "
                    f"{s['sft_steps']}-step SFT warm-up, {s['heldout']} held-out hard problems (near-greedy, no hints)")
    t = Table()
    t.add_column("")
    for m in METHODS:
        t.add_column(m.upper(), justify="right")
    rows = [("held-out hard acc (no hints)", "heldout_hard_acc", "{:.3f}"),
            ("difficult fraction (first pass)", "difficult_frac", "{:.2f}"),
            ("train acc unhinted (first pass)", "acc_unhinted", "{:.3f}"),
            ("generation passes / step", "generation_passes", "{:.2f}"),
            ("step time (s)", "step_time_s", "{:.2f}")]
    for label, key, fmt in rows:
        t.add_row(label, *[fmt.format(summary[m][key]) if summary[m][key] is not None else "-" for m in METHODS])
    if s["seeds"] > 1:
        t.add_row("held-out acc per seed", *[" ".join(f"{a:.3f}" for a in summary[m]["heldout_hard_acc_per_seed"])
                                             for m in METHODS])
    Console().print(t)
    se = (0.25 / max(s["heldout"], 1)) ** 0.5
    Console().print(f"one evaluation's standard error is at most {se:.3f} ({s['heldout']} problems); "
                    f"a difference of {s['seeds']}-seed means is noise unless it exceeds about "
                    f"{2 * se * (2 / s['seeds']) ** 0.5:.3f} (two standard errors from evaluation alone; "
                    "seed-to-seed variation adds to that)")
    if summary.get("sft_heldout_hard_acc") is not None:
        Console().print(f"SFT warm-up alone: held-out hard acc {summary['sft_heldout_hard_acc']:.3f}")


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    t0 = time.monotonic()
    paths = prepare(out, n_rl=args.rl_problems, n_heldout=args.heldout, n_sft=args.sft_problems)
    logger.info("model and data ready under %s", out)
    sft_dir = out / "sft"
    if not (sft_dir / "hf" / "config.json").is_file() or args.force:
        shutil.rmtree(sft_dir, ignore_errors=True)
        _cli(["sft", "--config", str(EXAMPLES / "sft.yaml"), "--set", f"model_name_or_path={paths['base']}",
              "--set", f"dataset_name={paths['sft']}", "--set", f"output_dir={sft_dir}",
              "--set", f"max_steps={args.sft_steps}", "--set", "overwrite_output_dir=true"], logs / "sft.log", 1800)
    task = f"name={TASK},path={paths['heldout']},problem=problem,answer=solution,format=text"
    sft_acc = None
    if not args.skip_sft_eval:
        eval_out = out / "sft_eval"
        _cli(["eval", "--model", str(sft_dir / "hf"), "--tasks", "", "--custom-task", task, "--samples", "1",
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-prompt-length", "128", "--no-system-prompt",
              "--out", str(eval_out)], logs / "sft_eval.log", 900)
        sft_acc = json.loads((eval_out / "summary.json").read_text())["tasks"][TASK]["pass_at_k"]["pass@1"]
    runs: dict[str, dict[int, Path]] = {m: {} for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:
            run_dir = out / f"{method}_seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            _cli(["train", "--config", str(EXAMPLES / f"{method}.yaml"),
                  "--set", f"model_name_or_path={sft_dir / 'hf'}", "--set", f"dataset_name={paths['rl']}",
                  "--set", f"output_dir={run_dir}", "--set", f"max_steps={args.rl_steps}", "--set", f"seed={42 + seed}",
                  "--set", "overwrite_output_dir=true", "--set", "do_eval=true", "--set", "eval_strategy=steps",
                  "--set", f"eval_steps={args.rl_steps}", "--set", f"eval_tasks=['{task}']",
                  "--set", f"save_steps={args.rl_steps}"], logs / f"{method}_seed{seed}.log", 3600)
            runs[method][seed] = run_dir
    settings = {"seeds": args.seeds, "rl_steps": args.rl_steps, "sft_steps": args.sft_steps,
                "heldout": args.heldout, "rl_problems": args.rl_problems}
    summary = summarize(runs, sft_acc, settings)
    summary["wall_time_s"] = time.monotonic() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from megatron_ghpo.train.plots import plot_runs

    plot_runs({f"{m} seed{s}": d / "metrics.jsonl" for m, by in runs.items() for s, d in by.items()},
              out / "curves.png")
    print_table(summary)
    logger.info("summary: %s; plots: %s; total %.0f s", out / "summary.json", out / "curves.png", summary["wall_time_s"])
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="CPU demo: tiny model, SFT warm-up, GHPO vs GRPO, held-out evaluation")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--seeds", type=int, default=1, help="GHPO/GRPO run pairs (seeds 42, 43, ...)")
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--rl-problems", type=int, default=2000)
    p.add_argument("--sft-problems", type=int, default=8000)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--skip-sft-eval", action="store_true")
    p.add_argument("--force", action="store_true", help="redo the SFT warm-up even if its output exists")
    p.set_defaults(func=run_demo)
