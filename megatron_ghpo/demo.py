"""`megatron-ghpo demo`: the CPU main job, GHPO vs GRPO from one SFT warm-up, end to end.

1. Build a tiny Qwen2-shaped model (RoPE, GQA, SwiGLU) and a byte-level BPE tokenizer locally.
2. Write the synthetic task (``megatron_ghpo.data.synthetic``, preset ``long_chain``): ``523+67*9``,
   a start value and a two-digit number added to it again and again; the worked solution has one short
   line per addition (``523+67=590``, ``+67=657``, ...). One step kind, chains of different lengths: an
   SFT set of 2-12 steps, an RL set of long chains (9-12 steps: with a per-step accuracy p of the
   warm-up, an unhinted sample solves one with probability about p**n, so most GRPO groups are all
   wrong) and held-out problems of 3-12 steps. A hint (the first lines of the worked solution) leaves a
   shorter remaining chain of the same step kind.
3. SFT warm-up (``megatron-ghpo sft``, TP=2 over 2 gloo processes; half of the prompts hinted, each
   trained to continue after its hint), written as a Hugging Face folder.
4. From that folder, one GHPO and one GRPO run per seed with the same seed, steps and prompts per
   step (``megatron-ghpo train``, TP=2), each evaluated without hints on the held-out problems at
   its last step (in-loop evaluation, near-greedy).
5. A side-by-side table with GHPO - GRPO and its 95% interval (paired by seed, plus the binomial
   evaluation error), ``summary.json`` and PNG plots.

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
TASK = "heldout_chain"
SFT_CHAIN = (2, 12)
"""Chain lengths (steps, inclusive) of the SFT warm-up's problems."""
RL_CHAIN = (9, 12)
"""Chain lengths of the RL training problems (long: few unhinted samples solve them)."""
HELDOUT_CHAIN = (3, 12)
"""Chain lengths of the held-out problems (a spread, so the evaluation measures the per-step skill)."""
MAX_NEW_TOKENS = 128
"""Completion budget of the demo: the longest worked solution (12 steps, four-digit values) is 124 tokens with EOS."""
MAX_PROMPT = 192
"""Prompt budget: a 12-step problem hinted with 75% of its solution is about 150 tokens."""


LENGTH_SETS = {"max_prompt_length": MAX_PROMPT, "max_completion_length": MAX_NEW_TOKENS}
RL_SETS: dict = {"learning_rate": 1.0e-4}
"""Settings of the demo's RL runs on top of examples/tiny-cpu/{ghpo,grpo}.yaml (the same for both)."""


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


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


def task_difficulties() -> dict[str, "Difficulty"]:
    """The demo task's three problem sets, all of one step kind (``long_chain``: add the problem's
    two-digit number to the running value, one short line per step), differing in chain length."""
    from dataclasses import replace

    from megatron_ghpo.data.synthetic import DIFFICULTIES

    base = DIFFICULTIES["long_chain"]
    return {
        "sft": replace(base, name="chain_sft", num_steps=SFT_CHAIN),
        "rl": replace(base, name="chain_rl", num_steps=RL_CHAIN),
        "heldout": replace(base, name="chain_heldout", num_steps=HELDOUT_CHAIN),
    }


def prepare(out: Path, *, n_rl: int, n_heldout: int, n_sft: int) -> dict[str, Path]:
    from megatron_ghpo.data.synthetic import generate_problems, write_jsonl
    from megatron_ghpo.models.tiny import build_tiny_model

    base = out / "base_model"
    if not (base / "config.json").is_file():
        build_tiny_model(base, arch="qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                         intermediate_size=384, initializer_range=0.02, tie_word_embeddings=True, seed=0)
    data = out / "data"
    d = task_difficulties()
    # The warm-up sees chains of every length of the task (so the format and the number of lines are
    # known) for a short while, so the per-step accuracy stays moderate. Half of its prompts are hinted
    # (sft.yaml's sft_hint_fraction) and trained to continue after the hint (sft_hinted_target:
    # continuation), so a hinted RL completion goes on from the hint's last result.
    paths = {
        "base": base,
        "sft": write_jsonl(generate_problems(n_sft, seed=1, difficulty=d["sft"]), data / "sft.jsonl"),
        "rl": write_jsonl(generate_problems(n_rl, seed=3, difficulty=d["rl"]), data / "rl_train.jsonl"),
        "heldout": write_jsonl(generate_problems(n_heldout, seed=4, difficulty=d["heldout"], split="heldout"),
                               data / f"{TASK}.jsonl"),
    }
    return paths


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
"""Student t quantiles t(0.975, df) for df = 1..30."""


def t_quantile_975(df: int) -> float:
    """t(0.975, df): a table for df <= 30, a Cornish-Fisher expansion around the normal quantile above."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(a: list[float], b: list[float], n_eval: int) -> dict:
    """Difference of means ``mean(a) - mean(b)`` of accuracies paired by seed, with 95% intervals.

    ``seed_ci95`` is ``t(0.975, n-1) * sd(a_i - b_i) / sqrt(n)`` (None for one seed); ``eval_se`` is the
    binomial standard error of the difference from evaluation alone (each accuracy measured on ``n_eval``
    problems: ``sqrt(sum_i (a_i(1-a_i) + b_i(1-b_i)) / n_eval) / n``), ``eval_ci95`` is ``1.96 * eval_se``.
    ``ci95`` is the seed interval where there is one, else the evaluation interval (``ci95_excludes_zero``:
    whether it leaves out 0); ``beyond_2se`` tells whether ``|diff|`` exceeds two seed standard errors
    (n >= 2) and two evaluation standard errors (with 3 seeds, t(0.975, 2) = 4.3: a difference can be
    beyond 2 SE while its 95% interval still holds 0).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired accuracies need the same number (>= 1) of seeds, got {len(a)} and {len(b)}")
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1:
        raise ValueError(f"n_eval (held-out problems) must be an int >= 1, got {n_eval!r}")
    for name, xs in (("a", a), ("b", b)):
        bad = [x for x in xs if not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"accuracies ({name}) must be numbers in [0, 1], got {bad}")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    eval_se = (sum(x * (1 - x) + y * (1 - y) for x, y in zip(a, b)) / n_eval) ** 0.5 / n
    out = {"n_seeds": n, "n_eval": n_eval, "diff": mean, "per_seed_diff": diffs, "eval_se": eval_se,
           "eval_ci95": 1.96 * eval_se, "seed_sd": None, "seed_se": None, "t975": None, "seed_ci95": None}
    if n >= 2:
        sd = statistics.stdev(diffs)
        t = t_quantile_975(n - 1)
        out.update(seed_sd=sd, seed_se=sd / n**0.5, t975=t, seed_ci95=t * sd / n**0.5)
    half = out["seed_ci95"] if out["seed_ci95"] is not None else out["eval_ci95"]
    ses = [se for se in (out["seed_se"], eval_se) if se is not None]
    out.update(ci95=half, ci95_low=mean - half, ci95_high=mean + half, ci95_excludes_zero=bool(abs(mean) > half),
               beyond_2se=bool(all(se > 0 for se in ses) and all(abs(mean) > 2 * se for se in ses)))
    return out


def _last(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return vals[-1] if vals else None


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def summarize(runs: dict[str, dict[int, Path]], sft_acc: float | None, settings: dict) -> dict:
    from megatron_ghpo.train.metrics import read_metrics

    summary: dict = {"settings": settings, "sft_heldout_acc": sft_acc}
    for method, by_seed in runs.items():
        per_seed = {}
        for seed, run_dir in by_seed.items():
            rows = read_metrics(run_dir / "metrics.jsonl")
            per_seed[seed] = {
                "heldout_acc": _last(rows, f"eval/{TASK}/pass@1"),
                "difficult_frac": _mean(rows, "ghpo/difficult_frac_stage0"),
                "acc_unhinted": _mean(rows, "ghpo/acc_unhinted"),
                "generation_passes": _mean(rows, "ghpo/generation_passes"),
                "step_time_s": _mean(rows[1:] or rows, "perf/step_s"),
                "train_reward": _mean(rows, "train/reward"),
                "final_reward": _last(rows, "train/reward"),
            }
        accs = [v["heldout_acc"] for v in per_seed.values() if v["heldout_acc"] is not None]
        summary[method] = {
            "heldout_acc": statistics.fmean(accs) if accs else None,
            "heldout_acc_per_seed": accs,
            **{k: statistics.fmean([v[k] for v in per_seed.values() if v[k] is not None] or [float("nan")])
               for k in ("difficult_frac", "acc_unhinted", "train_reward", "generation_passes", "step_time_s")},
            "seeds": per_seed,
        }
    a, b = (summary[m]["heldout_acc_per_seed"] for m in METHODS)
    summary["ghpo_minus_grpo"] = (paired_difference(a, b, settings["heldout"]) if a and len(a) == len(b)
                                  else None)
    return summary


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = summary["settings"]
    con = Console()
    con.print(f"GHPO vs GRPO on the synthetic chains: {s['seeds']} seed(s), {s['rl_steps']} RL steps from one "
              f"{s['sft_steps']}-step SFT warm-up, {s['heldout']} held-out problems of {HELDOUT_CHAIN[0]}-"
              f"{HELDOUT_CHAIN[1]} steps (near-greedy, no hints)")
    t = Table()
    t.add_column("")
    for m in METHODS:
        t.add_column(m.upper(), justify="right")
    t.add_column("GHPO - GRPO (95% CI)", justify="right")
    d = summary.get("ghpo_minus_grpo")
    diff_cell = "-"
    if d is not None:
        diff_cell = f"{d['diff']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]"
    rows = [("held-out acc (no hints)", "heldout_acc", "{:.3f}"),
            ("train reward (mean over steps)", "train_reward", "{:.3f}"),
            ("difficult fraction (first pass)", "difficult_frac", "{:.2f}"),
            ("train acc unhinted (first pass)", "acc_unhinted", "{:.3f}"),
            ("generation passes / step", "generation_passes", "{:.2f}"),
            ("step time (s)", "step_time_s", "{:.2f}")]
    for i, (label, key, fmt) in enumerate(rows):
        t.add_row(label, *[fmt.format(summary[m][key]) if summary[m][key] is not None else "-" for m in METHODS],
                  diff_cell if i == 0 else "")
    if s["seeds"] > 1:
        t.add_row("held-out acc per seed", *[" ".join(f"{a:.3f}" for a in summary[m]["heldout_acc_per_seed"])
                                             for m in METHODS],
                  " ".join(f"{x:+.3f}" for x in d["per_seed_diff"]) if d else "")
    con.print(t)
    if d is not None:
        seed_part = (f"paired over seeds: sd {d['seed_sd']:.3f}, SE {d['seed_se']:.3f}, "
                     f"t(0.975, {d['n_seeds'] - 1}) = {d['t975']:.3f}; " if d["seed_se"] is not None
                     else "one seed: the interval is from evaluation alone; ")
        con.print(f"GHPO - GRPO = {d['diff']:+.3f} +- {d['ci95']:.3f} (95%); {seed_part}binomial evaluation "
                  f"SE of the difference {d['eval_se']:.3f} ({s['heldout']} problems per run); "
                  f"|diff| {'>' if d['beyond_2se'] else 'not >'} 2 standard errors; the 95% interval "
                  f"{'excludes' if d['ci95_excludes_zero'] else 'includes'} 0")
    if summary.get("sft_heldout_acc") is not None:
        w = summary["sft_heldout_acc"]
        change = ", ".join(f"{m.upper()} {summary[m]['heldout_acc'] - w:+.3f}" for m in METHODS
                           if summary[m]["heldout_acc"] is not None)
        con.print(f"SFT warm-up alone: held-out acc {w:.3f} (change after RL: {change})")


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
              "--set", f"max_steps={args.sft_steps}", "--set", "overwrite_output_dir=true", *_sets(LENGTH_SETS)],
             logs / "sft.log", 1800)
    task = f"name={TASK},path={paths['heldout']},problem=problem,answer=solution,format=text"
    sft_acc = None
    if not args.skip_sft_eval:
        eval_out = out / "sft_eval"
        _cli(["eval", "--model", str(sft_dir / "hf"), "--tasks", "", "--custom-task", task, "--samples", "1",
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-prompt-length", str(MAX_PROMPT), "--no-system-prompt",
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
                  "--set", f"save_steps={args.rl_steps}", *_sets(LENGTH_SETS), *_sets(RL_SETS)], logs / f"{method}_seed{seed}.log", 3600)
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
    p.add_argument("--rl-steps", type=int, default=50)
    p.add_argument("--sft-steps", type=int, default=650)
    p.add_argument("--rl-problems", type=int, default=2000)
    p.add_argument("--sft-problems", type=int, default=8000)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--skip-sft-eval", action="store_true")
    p.add_argument("--force", action="store_true", help="redo the SFT warm-up even if its output exists")
    p.set_defaults(func=run_demo)
