"""Check every evaluation task file: rows load, every gold answer parses, a perfect answer scores 1.

For each task this prints: rows; golds the accuracy reward's gold parser cannot read ("unparsed",
reward None, the problem is left out of metrics); golds read only as plain text, not as a math
object ("text only": they still score, by string comparison); golds for which the completion
``The final answer is $\\boxed{<parsed gold>}$.`` (the gold in the parser's normalised LaTeX) does
NOT score 1.0 with the evaluation scorer ("self-check fails"); and golds for which the same
completion with the gold written exactly as in the file does not score 1.0 ("raw form fails":
the completion-side extraction, faithful to the reference reward, does not repair brace-less
``\\frac43`` or ``11\\sqrt2``, so a model writing those forms is marked wrong).
Checks run in the verifier process pool, as evaluation scoring does.

    python tools/check_eval_tasks.py [--tasks aime24,math500,...] [--show 5] [--workers 2] [--json OUT]
        [--graded tests/fixtures/verifier/qwen25math_math_cot_100_graded.jsonl]

Final line: ``unparsed_total=<n> self_check_failures=<n> raw_form_failures=<n> rows=<n>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CATEGORIES = (("unparsed", "unparsed"), ("text only", "text_only"), ("self-check fails", "self_fail"),
              ("raw form fails", "raw_fail"))  # fmt: skip


def check_task(name: str, pool) -> tuple[dict, dict[str, list]]:
    """Counts per category for one task, and the offending problems per category."""
    from megatron_ghpo.eval import get_task, load_task

    problems = load_task(get_task(name))
    results = pool.map("megatron_ghpo.eval.scoring:check_gold",
                       [(p.answer, str(p.columns["eval_gold"])) for p in problems])  # fmt: skip
    bad: dict[str, list] = {key: [] for _, key in CATEGORIES}
    for p, r in zip(problems, results):
        if not r.ok:
            raise RuntimeError(f"{p.uid}: checking the gold failed ({r.status}: {r.message})")
        v = r.value
        for key, hit in (
            ("unparsed", not v["parsed"]),
            ("text_only", v["text_only"]),
            ("self_fail", v["parsed"] and not v["self_ok"]),
            ("raw_fail", v["parsed"] and not v["raw_ok"]),
        ):
            if hit:
                bad[key].append(p)
    return {"task": name, "rows": len(problems), **{k: len(v) for k, v in bad.items()}}, bad


def graded_agreement(path: str, pool) -> tuple[dict[tuple[bool, bool], int], list[tuple[str, str, str]]]:
    """Evaluation verdicts on recorded responses vs their labels (Qwen2.5-Math graded file schema:
    ``gt``, ``response[8]``, ``score[8]``): confusion counts ``(ours, label) -> n`` and the disagreements."""
    from megatron_ghpo.eval.answers import gold_for_reward
    from megatron_ghpo.eval.scoring import PoolScorer

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    golds = [gold_for_reward(r["gt"]) for r in rows for _ in r["response"]]
    texts = [t for r in rows for t in r["response"]]
    labels = [bool(s) for r in rows for s in r["score"]]
    verdicts = PoolScorer(pool).score(golds, texts)
    confusion: dict[tuple[bool, bool], int] = {}
    disagree = []
    for v, label, gold in zip(verdicts, labels, golds):
        ours = v.correct is True
        confusion[(ours, label)] = confusion.get((ours, label), 0) + 1
        if ours != label:
            disagree.append((gold, str(v.extracted), "label " + str(label)))
    return confusion, disagree


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from megatron_ghpo.eval import task_names
    from megatron_ghpo.rewards import VerifierPool

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = ",".join(n for n in task_names() if n != "gpqa_diamond")
    parser.add_argument("--tasks", default=default, help=f"comma-separated tasks (default: {default})")
    parser.add_argument("--show", type=int, default=5, help="examples printed per category (stderr)")
    parser.add_argument("--workers", type=int, default=2, help="verifier pool processes")
    parser.add_argument("--json", help="also write the counts as JSON to this file")
    parser.add_argument("--graded", help="also score recorded graded responses (e.g. the Qwen2.5-Math "
                        "qwen25math_math_cot_100_graded.jsonl) and report agreement with their labels")  # fmt: skip
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    with VerifierPool(num_workers=args.workers, timeout_s=30.0) as pool:
        for name in (n.strip() for n in args.tasks.split(",") if n.strip()):
            counts, bad = check_task(name, pool)
            rows.append(counts)
            for label, key in CATEGORIES:
                for p in bad[key][: args.show]:
                    print(f"  {name} {label}: {p.uid}: {p.columns['eval_gold']!r}", file=sys.stderr)
        if args.graded:
            confusion, disagree = graded_agreement(args.graded, pool)
    table = Table(title="Evaluation task files: gold answers through the accuracy reward")
    for col in ("task", "rows", *(label for label, _ in CATEGORIES)):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        table.add_row(r["task"], str(r["rows"]), *(str(r[key]) for _, key in CATEGORIES))
    Console(width=120).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.graded:
        total = sum(confusion.values())
        agree = confusion.get((True, True), 0) + confusion.get((False, False), 0)
        print(f"graded responses: ours/label TT={confusion.get((True, True), 0)} FF={confusion.get((False, False), 0)} "
              f"TF={confusion.get((True, False), 0)} FT={confusion.get((False, True), 0)}; agreement {agree}/{total}")  # fmt: skip
        for gold, extracted, label in disagree:
            print(f"  disagreement: gold {gold!r}, extracted {extracted!r}, {label}")
    print(f"checked in {time.perf_counter() - t0:.1f} s")
    print(
        f"unparsed_total={sum(r['unparsed'] for r in rows)} self_check_failures={sum(r['self_fail'] for r in rows)} "
        f"raw_form_failures={sum(r['raw_fail'] for r in rows)} rows={sum(r['rows'] for r in rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
