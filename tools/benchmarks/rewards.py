"""Reward-scoring throughput: serial in-process math-verify vs the verifier pool.

Scores the 800 real responses of ``qwen25math_math_cot_100_graded.jsonl`` (gold = the MATH answer
wrapped in ``\\boxed{}``, as the data loader builds it) with the accuracy reward's exact function:

* ``serial``: ``score_accuracy`` called in this process's main thread, one response after another
  (same per-problem gold cache as the workers; all caches cleared before each repeat);
* ``serial_nocache``: the same without the gold cache (what the reference does per completion);
* ``pool``: ``VerifierPool.map`` over all 800 (a fresh pool per repeat; start-up and a warm-up on
  other golds not timed, like the serial mode's warm-up);
* ``ideal``: the serial work split by problem over ``--workers`` independent processes started at
  once (no pool, no IPC): the parallel ceiling of the machine under its current background load.

Prints a table (best and median wall over ``--repeats`` interleaved runs, throughput, p50/p99 latency
per response, timeouts). The last line is ``speedup_vs_serial=X`` = best serial wall / best pool wall:
on a shared machine the best of several short interleaved runs is the least disturbed estimate (as
``timeit`` does); the median-based ratio is printed on the line before it.

Usage: ``python tools/benchmarks/rewards.py [--workers N] [--repeats R] [--timeout S]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_ghpo.rewards import math_tasks
from megatron_ghpo.rewards.functions import ACCURACY_TASK
from megatron_ghpo.rewards.pool import VerifierPool

DEFAULT_FILE = ROOT / "tests" / "fixtures" / "verifier" / "qwen25math_math_cot_100_graded.jsonl"


def load_items(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [("\\boxed{" + r["answer"] + "}", resp) for r in rows for resp in r["response"]]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run_serial(items: list[tuple[str, str]], cached: bool) -> tuple[float, list[float], int]:
    fn = math_tasks.score_accuracy if cached else math_tasks.score_accuracy_uncached
    math_tasks.clear_caches()  # start as cold as a fresh pool worker
    lat = []
    t0 = time.perf_counter()
    for gold, text in items:
        s = time.perf_counter()
        fn(gold, text)
        lat.append(time.perf_counter() - s)
    return time.perf_counter() - t0, lat, 0


def run_pool(items: list[tuple[str, str]], workers: int, timeout: float) -> tuple[float, list[float], int]:
    warm = [(f"${i}$", f"so $x = \\boxed{{\\frac{{{i}}}{{{i + 1}}}}}$") for i in range(8 * workers)]
    with VerifierPool(workers, timeout_s=timeout) as pool:
        pool.map(ACCURACY_TASK, warm)  # fault in the forked workers' pages; other golds, so no cache help
        t0 = time.perf_counter()
        res = pool.map(ACCURACY_TASK, items, affinity=[gold for gold, _ in items])
        wall = time.perf_counter() - t0
    return wall, [r.elapsed_s for r in res], sum(r.status == "timeout" for r in res)


def _shard_main(path: Path, shard: int, shards: int) -> int:
    """Child of the ``ideal`` mode: warm up, wait for "go" on stdin, score one shard, print its wall."""
    items = load_items(path)
    mine = [it for i, it in enumerate(items) if (i // 8) % shards == shard]  # whole problems per shard
    math_tasks.warm_up()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    for gold, text in mine:
        math_tasks.score_accuracy(gold, text)
    print(f"{time.perf_counter() - t0}", flush=True)
    return 0


def run_ideal(path: Path, shards: int) -> tuple[float, list[float], int]:
    """``shards`` independent processes score disjoint problem shards at once: what the machine allows now."""
    procs = [
        subprocess.Popen([sys.executable, __file__, "--file", str(path), "--shard", f"{k}/{shards}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for k in range(shards)
    ]  # fmt: skip
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    walls = [float(p.stdout.readline()) for p in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.wait(timeout=60)
    return min(wall, max(walls) + 0.01), [], 0


def results_median(results: dict[str, list[tuple[float, list[float], int]]], mode: str) -> float:
    walls = sorted(r[0] for r in results[mode])
    return walls[len(walls) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shard:
        k, n = map(int, args.shard.split("/"))
        return _shard_main(args.file, k, n)
    items = load_items(args.file)
    load_before = os.getloadavg()[0]
    math_tasks.warm_up()  # import math-verify and its grammar before timing, as the pool's helper does

    results: dict[str, list[tuple[float, list[float], int]]] = {
        "serial": [],
        "serial_nocache": [],
        "pool": [],
        "ideal": [],
    }
    for _ in range(args.repeats):  # interleaved so that background load affects every mode alike
        results["serial"].append(run_serial(items, cached=True))
        results["serial_nocache"].append(run_serial(items, cached=False))
        results["pool"].append(run_pool(items, args.workers, args.timeout))
        results["ideal"].append(run_ideal(args.file, args.workers))

    print(
        f"{len(items)} responses, {args.workers} pool workers, {os.cpu_count()} CPUs, {args.repeats} interleaved "
        f"repeats; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        f"{'mode':<16} {'best s':>8} {'median s':>9} {'resp/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'timeouts':>9}"
    )
    best = {}
    for mode, runs in results.items():
        runs = sorted(runs, key=lambda r: r[0])
        wall, lat, timeouts = runs[0]
        best[mode] = wall
        median = runs[len(runs) // 2][0]
        p50 = f"{percentile(lat, 0.5) * 1e3:>8.2f}" if lat else f"{'-':>8}"
        p99 = f"{percentile(lat, 0.99) * 1e3:>8.2f}" if lat else f"{'-':>8}"
        print(f"{mode:<16} {wall:>8.3f} {median:>9.3f} {len(items) / wall:>8.1f} {p50} {p99} {timeouts:>9}")
    print(
        "resp/s and latencies are from each mode's best run; pool latency = dispatch to result (parent clock);"
    )
    print(
        f"ideal = the serial work split over {args.workers} independent processes started together, i.e. the"
    )
    print("parallel ceiling of this machine under its current background load")
    print(
        f"speedup_vs_serial_median={results_median(results, 'serial') / results_median(results, 'pool'):.2f}"
    )
    print(f"speedup_vs_serial={best['serial'] / best['pool']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
