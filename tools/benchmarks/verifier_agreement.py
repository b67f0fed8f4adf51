"""Agreement of our math-verify scoring with labelled verifier cases, and a confusion matrix on real outputs.

1. ``verifier_cases.jsonl``: every row is re-run through the verifier pool *under its recorded options*
   where those are math-verify options (``math_verify``, ``lighteval_extractive_match`` math rows, the
   TRL and open-r1 accuracy rewards). Rows labelled by other libraries (NeMo-Skills, MARIO, Qwen's
   grader) cannot be re-run as such; they are scored with our accuracy reward (gold as given and gold
   wrapped in ``\\boxed{}``, prediction presented as ``\\boxed{prediction}``) to show how far those
   graders' notion of "equal" is from math-verify's. lighteval letter / non-English rows have no
   math-verify equivalent and are reported as n/a.
2. ``qwen25math_math_cot_100_graded.jsonl``: our accuracy reward on all 800 full responses against the
   file's automatic ``score`` labels: a confusion matrix per gold form.

Usage: ``python tools/benchmarks/verifier_agreement.py [--data-dir DIR] [--workers N] [--timeout S]``.
Prints the tables; the last line is ``math_verify_agreement=X`` (fraction on math_verify rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_ghpo.rewards.pool import VerifierPool

DEFAULT_DATA = ROOT / "tests" / "fixtures" / "verifier"
OPTIONS_TASK = "megatron_ghpo.rewards.math_tasks:verify_with_options"
ACCURACY_TASK = "megatron_ghpo.rewards.math_tasks:score_accuracy"
TRL_LATEX = {
    "boxed_match_priority": 0,
    "try_extract_without_anchor": False,
    "normalization_config": {"units": True},
}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def row_task(row: dict) -> tuple[str, str, tuple] | None:
    """(label, task ref, args) reproducing a row under its recorded options; None = not applicable."""
    v, o = row["verifier"], row["options"]
    gold = "" if row["gold"] is None else str(row["gold"])
    pred = "" if row["prediction"] is None else str(row["prediction"])
    if v == "math_verify":
        if o.get("parse_defaults"):
            spec = {"float_rounding": o.get("float_rounding", 6), "strict": o.get("strict", True)}
        else:
            spec = {
                "gold_targets": o["match_types"], "pred_targets": o["match_types"],
                "latex": {"boxed_match_priority": 0}, "float_rounding": o.get("precision", 6),
                "strict": o.get("strict", True), "allow_set_relation_comp": o.get("allow_set_relation_comp", False),
            }  # fmt: skip
        return v, OPTIONS_TASK, (gold, pred, spec)
    if v == "lighteval_extractive_match":
        if "NativeLetters" in o["match_types"] or o.get("language") != "Language.ENGLISH":
            return None
        spec = {
            "gold_targets": o["match_types"],
            "pred_targets": o["match_types"],
            "float_rounding": o.get("precision", 6),
        }
        return v, OPTIONS_TASK, (gold, pred, spec)
    if v in ("trl_accuracy_reward", "trl_reasoning_accuracy_reward"):
        if v == "trl_reasoning_accuracy_reward":
            delims = o.get("reasoning_delimiters") or ["</think>"]
            cut = max((pred.rfind(d) + len(d) if d in pred else -1) for d in delims)
            if cut < 0:
                return v, OPTIONS_TASK, ("", "", {"none_if_gold_unparsed": True})  # no delimiter -> reward 0
            pred = pred[cut:]
        spec = {
            "pred_targets": ["latex"],
            "pred_mode": "first_match",
            "latex": TRL_LATEX,
            "none_if_gold_unparsed": True,
        }
        return v, OPTIONS_TASK, (gold, pred, spec)
    if v == "open_r1_accuracy_reward":  # exactly our accuracy reward (GHPO's rewards.py)
        return v, ACCURACY_TASK, (gold, pred)
    return None


def agreement_table(rows: list[dict], pool: VerifierPool) -> tuple[str, float]:
    """Per-source agreement table; returns (text, agreement on math_verify rows)."""
    plans = [(r, row_task(r)) for r in rows]
    runnable = [(r, p) for r, p in plans if p is not None]
    by_ref: dict[str, list] = defaultdict(list)
    for r, p in runnable:
        by_ref[p[1]].append((r, p))
    got: dict[int, bool] = {}
    for ref, items in by_ref.items():
        for (r, _), res in zip(items, pool.map(ref, [p[2] for _, p in items])):
            got[id(r)] = bool(
                res.ok and res.value is not None and res.value is not False and res.value != 0.0
            )
    # answer-vs-answer graders: our accuracy reward, prediction boxed; gold bare and gold boxed
    others = [
        r for r in rows if r["verifier"] in ("nemo_skills_math_equal", "mario_eval", "qwen25math_grader")
    ]

    def _s(x):
        return "" if x is None else str(x)

    bare = pool.map(ACCURACY_TASK, [(_s(r["gold"]), "\\boxed{" + _s(r["prediction"]) + "}") for r in others])
    boxed = pool.map(
        ACCURACY_TASK,
        [("\\boxed{" + _s(r["gold"]) + "}", "\\boxed{" + _s(r["prediction"]) + "}") for r in others],
    )
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # agree, total, n/a
    for r, p in plans:
        if p is None and r["verifier"] not in ("nemo_skills_math_equal", "mario_eval", "qwen25math_grader"):
            stats[r["verifier"]][2] += 1
        elif p is not None:
            stats[r["verifier"]][0] += got[id(r)] == bool(r["expected"])
            stats[r["verifier"]][1] += 1
    for r, a, b in zip(others, bare, boxed):
        for tag, res in (("gold as given", a), ("gold boxed", b)):
            key = f"{r['verifier']} [ours, {tag}]"
            stats[key][0] += bool(res.ok and res.value == 1.0) == bool(r["expected"])
            stats[key][1] += 1
    lines = [f"{'source':<52} {'rows':>5} {'agree':>6} {'rate':>8} {'n/a':>5}"]
    for key in sorted(stats):
        agree, total, na = stats[key]
        rate = f"{agree / total:.4f}" if total else "-"
        lines.append(f"{key:<52} {total:>5} {agree:>6} {rate:>8} {na:>5}")
    mv = stats["math_verify"]
    return "\n".join(lines), mv[0] / mv[1]


def confusion_tables(graded: list[dict], pool: VerifierPool) -> str:
    """Our accuracy reward on the 800 responses vs the recorded ``score`` labels."""
    items = [(r, resp, bool(s)) for r in graded for resp, s in zip(r["response"], r["score"])]
    lines = []
    for tag, gold_of in (
        ("gold = answer (bare)", lambda r: r["answer"]),
        ("gold = \\boxed{answer}", lambda r: "\\boxed{" + r["answer"] + "}"),
    ):
        t0 = time.perf_counter()
        res = pool.map(ACCURACY_TASK, [(gold_of(r), resp) for r, resp, _ in items])
        wall = time.perf_counter() - t0
        cm = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        none = timeouts = 0
        for (_, _, label), x in zip(items, res):
            timeouts += x.status == "timeout"
            none += x.ok and x.value is None
            ours = x.ok and x.value == 1.0
            cm[("t" if ours == label else "f") + ("p" if ours else "n")] += 1
        n = len(items)
        lines.append(f"{tag}: {n} responses, {wall:.2f} s, unparseable gold {none}, timeouts {timeouts}")
        lines.append(f"{'':>22} {'label True':>11} {'label False':>12}")
        lines.append(f"{'reward 1.0':>22} {cm['tp']:>11} {cm['fp']:>12}")
        lines.append(f"{'reward 0.0 / None':>22} {cm['fn']:>11} {cm['tn']:>12}")
        lines.append(f"agreement {(cm['tp'] + cm['tn']) / n:.4f}\n")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    cases = read_jsonl(args.data_dir / "verifier_cases.jsonl")
    graded = read_jsonl(args.data_dir / "qwen25math_math_cot_100_graded.jsonl")
    with VerifierPool(args.workers, timeout_s=args.timeout) as pool:
        table, mv_rate = agreement_table(cases, pool)
        print("Agreement with verifier_cases.jsonl (each row under its recorded options)")
        print(table)
        print()
        print("Accuracy reward vs recorded score labels (qwen25math_math_cot_100_graded.jsonl)")
        print(confusion_tables(graded, pool))
    print(f"math_verify_agreement={mv_rate:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
