"""≥500 hostile completions scored from a non-main thread: bounded time, no exception, no leaked process.

Takes ~15-30 s on 2 cores (a third or more of the inputs hit the 0.3 s timeout; 6 workers let stuck
tasks wait out their wall-clock deadlines side by side). ``tools/benchmarks/hostile_rewards.py``
prints the same statistics per input family.
"""

import collections
import threading
import time

import pytest

from megatron_ghpo.records import Completion, Group, Problem, Prompt
from megatron_ghpo.rewards import RewardScorer, VerifierPool, accuracy_reward
from megatron_ghpo.rewards.functions import ACCURACY_TASK
from megatron_ghpo.rewards.hostile import hostile_completions

pytestmark = pytest.mark.unit

TIMEOUT = 0.3
WORKERS = 6  # more workers than cores: stuck tasks wait out their (wall-clock) deadlines side by side


def wait_gone(pids, timeout=10.0):
    """Pids still alive (zombies count as dead) after waiting up to ``timeout`` seconds."""

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def make_group(answer, texts):
    problem = Problem(uid="hostile", problem="q", answer=answer, columns={})
    prompt = Prompt(problem=problem, user_text="q", text="q", token_ids=[1])
    return Group(prompt=prompt, completions=[Completion(token_ids=[1], text=t) for t in texts])


GOLDS = [
    "$3$",
    "$\\frac{1}{2}$",
    "\\boxed{x^2+1}",
    "$\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}$",
    "\\boxed{(0, 12)}",
]


def cpu_stall_us() -> int | None:
    """Cumulative microseconds in which some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def test_hostile_completions_are_scored_in_bounded_time_from_a_thread():
    comps = hostile_completions(520, seed=0)
    assert len(comps) >= 500
    golds = [GOLDS[i % len(GOLDS)] for i in range(len(comps))]
    out: dict = {}

    def work():
        try:
            with VerifierPool(WORKERS, timeout_s=TIMEOUT, warm_up=False) as pool:
                out["pids"] = set(pool.worker_pids())
                t0 = time.monotonic()
                out["results"] = pool.map(ACCURACY_TASK, list(zip(golds, comps)), affinity=golds)
                out["wall"] = time.monotonic() - t0
                # the reward function and the scorer on top of the same pool, still off the main thread
                t0 = time.monotonic()
                out["rewards"] = accuracy_reward(comps[:60], golds[:60], pool=pool)
                out["reward_wall"] = time.monotonic() - t0
                group = make_group("$3$", comps[:16])
                out["metrics"] = RewardScorer([accuracy_reward], pool=pool).score_groups([group])
                out["group_accuracy"] = group.accuracy
                time.sleep(0.3)
                out["pids"] |= set(pool.worker_pids())
        except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
            out["error"] = exc

    thread = threading.Thread(target=work, name="not-main")
    stall0, t0 = cpu_stall_us(), time.monotonic()
    thread.start()
    thread.join(240)
    stall1, elapsed = cpu_stall_us(), time.monotonic() - t0
    pressure = (stall1 - stall0) / 1e6 / elapsed if stall0 is not None and stall1 is not None else 0.0
    assert not thread.is_alive(), "scoring hung"
    assert "error" not in out, repr(out.get("error"))
    results = out["results"]
    statuses = collections.Counter(r.status for r in results)
    worst = max(r.elapsed_s for r in results)
    print(
        f"\nhostile: n={len(results)} {dict(statuses)} max_latency={worst:.3f}s wall={out['wall']:.1f}s "
        f"cpu_pressure={pressure:.2f}"
    )
    # The 1 s margin assumes this process gets a CPU when its deadline thread wakes. When other
    # processes keep runnable tasks waiting for a CPU most of the time (PSI "some" > 80%), wake-ups
    # were measured up to ~2 s late on 2 cores, so the margin widens; a hang still fails either way.
    margin = 1.0 if pressure < 0.8 else 3.0
    assert worst <= TIMEOUT + margin, f"worst latency {worst:.3f}s at CPU pressure {pressure:.2f}"
    assert set(statuses) <= {"ok", "timeout", "error", "crashed"} and statuses["timeout"] > 0
    assert all(r.value in (0.0, 1.0, None) for r in results if r.ok)
    assert all(v in (0.0, 1.0, None) for v in out["rewards"])
    assert out["reward_wall"] <= (60 / WORKERS + 1) * (TIMEOUT + margin)
    assert out["metrics"]["reward/timeouts"] >= 1 and len(out["group_accuracy"]) == 16
    assert len(out["pids"]) > WORKERS + 1  # helper + workers + replacements of killed ones
    assert wait_gone(out["pids"]) == []
