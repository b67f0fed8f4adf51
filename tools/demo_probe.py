"""Probe a model on the demo's synthetic chains: final accuracy, per-step accuracy p, and p**n.

    python tools/demo_probe.py --model outputs/demo/sft/hf --data outputs/demo/data/heldout_chain.jsonl \
        --n 200 --samples 8 --temperature 1.0 --ratios 0,0.25,0.5,0.75

For each hint ratio (0 = no hint) every problem is asked ``--samples`` times (the user turn is the
problem, or the GHPO hinted user turn with a line-cut prefix of the worked solution). A completion is
scored line by line against the worked solution: the number of leading correct lines after the hint
gives the per-step accuracy ``p = correct steps / attempted steps`` (a step is attempted when every
earlier step was right), and the final answer is the value in the completion's ``\\boxed{}``. Prints one
table row per ratio and per chain length, and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

_BOX = re.compile(r"\\boxed\{([^{}]*)\}")


def score(solution: str, shown: str, completion: str, answer: str) -> tuple[int, int, bool]:
    """(leading correct step lines after the hint, step lines (with ``=``) left after the hint, final answer right)."""
    gold = [line for line in solution.split("\n") if not line.startswith("\\boxed")]
    given = len([line for line in shown.split("\n") if line]) if shown else 0
    given = min(given, len(gold))
    remaining = gold[given:]
    lines = completion.strip().split("\n")
    correct = 0  # a gold line without "=" (a start value) is no step: it must match, and counts for the next
    for want, got in zip(remaining, lines):
        if got.strip() != want:
            break
        correct += "=" in want
    boxes = _BOX.findall(completion)
    return correct, sum("=" in line for line in remaining), bool(boxes) and boxes[-1].strip() == answer


def probe(model: str, rows: list[dict], *, ratios: list[float], samples: int, temperature: float,
          max_tokens: int, seed: int) -> list[dict]:
    from transformers import AutoTokenizer

    from megatron_ghpo.ghpo.hints import hint_prefix, hinted_problem
    from megatron_ghpo.rollout.base import SamplingParams
    from megatron_ghpo.rollout.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(model)
    engine = VLLMEngine(model, max_model_len=512, seed=seed, kv_cache_gib=0.5)
    results = []
    try:
        for ratio in ratios:
            users = [r["problem"] if ratio == 0 else hinted_problem(r["problem"], r["solution_hint"], ratio, split="line")
                     for r in rows]
            texts = [tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True, tokenize=False)
                     for u in users]
            ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            t0 = time.monotonic()
            outs = engine.generate(ids, SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens,
                                                       logprobs=False, seed=seed))
            gen_s = time.monotonic() - t0
            by_len: dict[int, list[tuple[int, int, bool]]] = defaultdict(list)
            tokens = []
            for r, group in zip(rows, outs):
                shown = "" if ratio == 0 else hint_prefix(r["solution_hint"], ratio, split="line")
                for c in group:
                    by_len[int(r["num_steps"])].append(score(r["solution_hint"], shown, c.text, r["solution"]))
                    tokens.append(len(c.token_ids))
            for n, scored in sorted(by_len.items()) + [("all", [s for v in by_len.values() for s in v])]:
                correct = sum(c for c, _, _ in scored)
                attempted = sum(min(c + 1, rem) for c, rem, _ in scored)
                p = correct / attempted if attempted else float("nan")
                results.append({
                    "ratio": ratio, "num_steps": n, "completions": len(scored),
                    "acc": statistics.fmean(ok for _, _, ok in scored),
                    "p_step": p,
                    "remaining_steps": statistics.fmean(rem for _, rem, _ in scored),
                    "p_pow_remaining": statistics.fmean(p ** rem for _, rem, _ in scored),
                    **({"mean_tokens": statistics.fmean(tokens), "gen_s": gen_s} if n == "all" else {}),
                })
    finally:
        engine.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--data", required=True, type=Path, help="synthetic JSON Lines (problem, solution, solution_hint, num_steps)")
    ap.add_argument("--n", type=int, default=200, help="first N problems")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ratios", default="0", help="comma-separated hint ratios in [0, 1]; 0 = no hint")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--ratios: expected comma-separated floats, got {args.ratios!r}")
    if not ratios or not all(0.0 <= r <= 1.0 for r in ratios):
        ap.error(f"--ratios: every ratio must be in [0, 1], got {args.ratios!r}")
    if args.samples < 1 or args.n < 1:
        ap.error("--samples and --n must be >= 1")
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][: args.n]
    for i, r in enumerate(rows):
        missing = [k for k in ("problem", "solution", "solution_hint", "num_steps") if k not in r]
        if missing:
            ap.error(f"--data row {i}: missing field(s) {missing}")
    res = probe(args.model, rows, ratios=ratios, samples=args.samples, temperature=args.temperature,
                max_tokens=args.max_tokens, seed=args.seed)
    print(f"{'ratio':>5} {'steps':>5} {'n':>5} {'acc':>6} {'p':>6} {'left':>5} {'p^left':>7} {'tok':>5}")
    for r in res:
        print(f"{r['ratio']:>5} {r['num_steps']!s:>5} {r['completions']:>5} {r['acc']:>6.3f} {r['p_step']:>6.3f} "
              f"{r['remaining_steps']:>5.1f} {r['p_pow_remaining']:>7.3f} {r.get('mean_tokens', float('nan')):>5.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
