"""Hostile completions through the accuracy reward's verifier pool, scored from a non-main thread.

Prints per family: count, outcomes (ok / timeout / error / crashed) and the worst dispatch-to-result
latency, then whether any verifier process outlived the pool. Last line:
``hostile_max_latency_over_timeout_s=X`` (worst latency minus the timeout; the bound is 1 s).

Usage: ``python tools/benchmarks/hostile_rewards.py [--n 520] [--workers 4] [--timeout 0.3]``
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_ghpo.rewards.functions import ACCURACY_TASK
from megatron_ghpo.rewards.hostile import hostile_cases
from megatron_ghpo.rewards.pool import VerifierPool

GOLDS = [
    "$3$",
    "$\\frac{1}{2}$",
    "\\boxed{x^2+1}",
    "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$",
    "\\boxed{(0, 12)}",
]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cpu_stall_us() -> int | None:
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=520)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=0.3)
    args = ap.parse_args()
    cases = hostile_cases(args.n)
    golds = [GOLDS[i % len(GOLDS)] for i in range(len(cases))]
    out: dict = {}

    def work() -> None:
        try:
            with VerifierPool(args.workers, timeout_s=args.timeout) as pool:
                pids = set(pool.worker_pids())
                t0 = time.monotonic()
                out["results"] = pool.map(
                    ACCURACY_TASK, [(g, t) for g, (_, t) in zip(golds, cases)], affinity=golds
                )
                out["wall"] = time.monotonic() - t0
                time.sleep(0.3)
                out["pids"] = pids | set(pool.worker_pids())
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = repr(exc)

    thread = threading.Thread(target=work, name="scorer")
    stall0, t0 = _cpu_stall_us(), time.monotonic()
    thread.start()
    thread.join()
    stall1, elapsed = _cpu_stall_us(), time.monotonic() - t0
    pressure = "n/a" if stall0 is None or stall1 is None else f"{(stall1 - stall0) / 1e6 / elapsed:.2f}"
    if "error" in out:
        print(f"exception escaped: {out['error']}")
        return 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in out["pids"]):
        time.sleep(0.05)
    leaked = [p for p in out["pids"] if _alive(p)]
    fams: dict[str, list] = collections.defaultdict(list)
    for (fam, text), r in zip(cases, out["results"]):
        fams[fam].append((r, len(text)))
    print(
        f"{len(cases)} hostile completions, {args.workers} workers, timeout {args.timeout} s, scored off the main thread"
    )
    print(
        f"{'family':<14} {'n':>4} {'max chars':>9} {'ok':>4} {'timeout':>8} {'error':>6} {'crashed':>8} {'max lat s':>10}"
    )
    for fam, items in fams.items():
        c = collections.Counter(r.status for r, _ in items)
        worst = max(r.elapsed_s for r, _ in items)
        print(
            f"{fam:<14} {len(items):>4} {max(n for _, n in items):>9} {c['ok']:>4} {c['timeout']:>8} {c['error']:>6} "
            f"{c['crashed']:>8} {worst:>10.3f}"
        )
    worst = max(r.elapsed_s for r in out["results"])
    print(
        f"wall {out['wall']:.1f} s; CPU pressure (share of time some runnable task waited for a CPU) {pressure}; "
        f"processes checked {len(out['pids'])}, left alive after close: {len(leaked)}"
    )
    print(f"hostile_max_latency_over_timeout_s={worst - args.timeout:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
