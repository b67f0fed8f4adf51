"""Reward-scoring throughput: serial in-process math-verify vs the verifier pool.

Scores the 800 real responses of ``qwen25math_math_cot_100_graded.jsonl`` (gold = the MATH answer
wrapped in ``\\boxed{}``, as the data loader builds it) with the accuracy reward's exact function:

* ``serial``: math-verify called in one process's main thread, one response after another, the way
  the reference reward does it (parse the gold, parse the completion, verify; no cache);
* ``serial_goldcache``: the accuracy reward's exact worker function in the same loop, with the
  per-problem gold cache the workers have (isolates the parallel speedup);
* ``pool``: ``VerifierPool.map`` over all 800 (``--workers`` workers);
* ``ideal``: the serial work split by problem over ``--workers`` independent processes started at
  once (no pool, no IPC): the parallel ceiling of the machine under its current background load.

Steady state, as in a training run: every mode uses long-lived processes that first do one untimed
round, and every process empties its content caches (parsed golds and answers, sympy's cache) before
each timed round; math-verify's lazily built state (e.g. the LaTeX parser's automaton) stays warm
in all modes alike. Rounds are interleaved across modes so background load affects them alike.

Prints a table (best and median wall over ``--repeats`` rounds, CPU seconds, throughput, p50/p99
latency per response, timeouts) and the machine's CPU pressure. The last line is
``speedup_vs_serial=X`` = best ``serial`` wall / best ``pool`` wall: on a shared machine the best of
several short interleaved rounds is the least disturbed estimate (as ``timeit`` does). The lines
before it give the median-based ratio and ``speedup_vs_serial_goldcache`` (parallelism alone). CPU seconds (pool: parent + workers) show the pool's own overhead
independently of background load.

Usage: ``python tools/benchmarks/rewards.py [--workers N] [--repeats R] [--timeout S]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_ghpo.rewards import math_tasks
from megatron_ghpo.rewards.functions import ACCURACY_TASK
from megatron_ghpo.rewards.pool import VerifierPool

DEFAULT_FILE = ROOT / "tests" / "fixtures" / "verifier" / "qwen25math_math_cot_100_graded.jsonl"
CLEAR = "megatron_ghpo.rewards.math_tasks:clear_caches"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    wall: float
    cpu: float
    latencies: list[float] = field(default_factory=list)
    timeouts: int = 0


def load_items(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [("\\boxed{" + r["answer"] + "}", resp) for r in rows for resp in r["response"]]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _shard_main(path: Path, shard: int, shards: int, cached: bool) -> int:
    """Child process: per line on stdin, empty caches, score its shard, print wall, CPU and latencies."""
    items = load_items(path)
    mine = [it for i, it in enumerate(items) if (i // 8) % shards == shard]  # whole problems per shard
    fn = math_tasks.score_accuracy if cached else math_tasks.score_accuracy_uncached
    math_tasks.warm_up()
    print("ready", flush=True)
    for _ in sys.stdin:
        math_tasks.clear_caches()
        lat = []
        c0, t0 = time.process_time(), time.perf_counter()
        for gold, text in mine:
            s = time.perf_counter()
            fn(gold, text)
            lat.append(time.perf_counter() - s)
        print(json.dumps([time.perf_counter() - t0, time.process_time() - c0, lat]), flush=True)
    return 0


class Processes:
    """``shards`` long-lived scorer processes (1 shard = the serial baseline)."""

    def __init__(self, path: Path, shards: int, *, cached: bool = True) -> None:
        cmd = [sys.executable, __file__, "--file", str(path)] + ([] if cached else ["--nocache"])
        self.procs = [
            subprocess.Popen(
                cmd + ["--shard", f"{k}/{shards}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            for k in range(shards)
        ]
        for p in self.procs:
            assert p.stdout.readline().strip() == "ready"

    def round(self) -> Run:
        for p in self.procs:  # started together
            p.stdin.write("go\n")
            p.stdin.flush()
        out = [json.loads(p.stdout.readline()) for p in self.procs]
        return Run(max(o[0] for o in out), sum(o[1] for o in out), [x for o in out for x in o[2]])

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(timeout=60)


class Pool:
    def __init__(self, items: list[tuple[str, str]], workers: int, timeout: float) -> None:
        self.items, self.affinity = items, [gold for gold, _ in items]
        self.pool = VerifierPool(workers, timeout_s=timeout)

    def round(self) -> Run:
        self.pool.broadcast(CLEAR)
        pids = self.pool.worker_pids()[1:]
        c0 = _self_cpu() + sum(_proc_cpu(p) for p in pids)
        t0 = time.perf_counter()
        res = self.pool.map(ACCURACY_TASK, self.items, affinity=self.affinity)
        wall = time.perf_counter() - t0
        cpu = _self_cpu() + sum(_proc_cpu(p) for p in pids) - c0
        return Run(wall, cpu, [r.elapsed_s for r in res], sum(r.status == "timeout" for r in res))

    def close(self) -> None:
        self.pool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    ap.add_argument("--nocache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shard:
        k, n = map(int, args.shard.split("/"))
        return _shard_main(args.file, k, n, cached=not args.nocache)
    items = load_items(args.file)
    load_before = os.getloadavg()[0]
    modes = {
        "serial": Processes(args.file, 1, cached=False),
        "serial_goldcache": Processes(args.file, 1),
        "pool": Pool(items, args.workers, args.timeout),
        "ideal": Processes(args.file, args.workers),
    }
    runs: dict[str, list[Run]] = {m: [] for m in modes}
    try:
        for m in modes.values():  # untimed first round: steady state from here on
            m.round()
        for _ in range(args.repeats):
            for name, m in modes.items():
                runs[name].append(m.round())
    finally:
        for m in modes.values():
            m.close()

    pressure = (
        Path("/proc/pressure/cpu").read_text().splitlines()[0]
        if Path("/proc/pressure/cpu").exists()
        else "n/a"
    )
    print(
        f"{len(items)} responses, {args.workers} pool workers, {os.cpu_count()} CPUs, {args.repeats} interleaved "
        f"rounds; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; CPU pressure: {pressure}"
    )
    print(
        f"{'mode':<16} {'best s':>7} {'median s':>9} {'cpu s':>6} {'resp/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'timeouts':>8}"
    )
    best, median = {}, {}
    for mode, rs in runs.items():
        rs = sorted(rs, key=lambda r: r.wall)
        b, median[mode] = rs[0], rs[len(rs) // 2].wall
        best[mode] = b.wall
        p50 = f"{percentile(b.latencies, 0.5) * 1e3:>7.2f}" if b.latencies else f"{'-':>7}"
        p99 = f"{percentile(b.latencies, 0.99) * 1e3:>7.2f}" if b.latencies else f"{'-':>7}"
        print(
            f"{mode:<16} {b.wall:>7.3f} {median[mode]:>9.3f} {b.cpu:>6.2f} {len(items) / b.wall:>7.0f} {p50} {p99} "
            f"{b.timeouts:>8}"
        )
    print("best round per mode shown (cpu s, resp/s, latencies from it); pool cpu = parent + workers; pool")
    print(
        f"latency = dispatch to result; ideal = the serial work split over {args.workers} independent processes"
    )
    print("started together, i.e. the parallel ceiling of this machine under its current background load")
    print(f"ideal_over_serial_goldcache={best['serial_goldcache'] / best['ideal']:.2f}")
    print(f"speedup_vs_serial_goldcache={best['serial_goldcache'] / best['pool']:.2f}")
    print(f"speedup_vs_serial_median={median['serial'] / median['pool']:.2f}")
    print(f"speedup_vs_serial={best['serial'] / best['pool']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
