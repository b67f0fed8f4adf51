"""VerifierPool: hard timeouts from outside the worker, crash/error isolation, threads, no leaked processes.

These tests start worker processes (a helper + 2 workers, ~0.5 s each start); every wait is bounded.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

from megatron_ghpo.rewards import PoolClosedError, VerifierPool
from megatron_ghpo.rewards.default_pool import close_default_pool, configure_default_pool, get_default_pool

pytestmark = pytest.mark.unit

SLEEP = "megatron_ghpo.rewards.math_tasks:sleep_for"
ECHO = "megatron_ghpo.rewards.math_tasks:echo"
ACC = "megatron_ghpo.rewards.math_tasks:score_accuracy"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def pool():
    """For outcome and ordering checks: a budget no honest task gets near, even on a loaded machine."""
    with VerifierPool(2, timeout_s=20.0, warm_up=False) as p:
        yield p


@pytest.fixture(scope="module")
def short_pool():
    """For timeout checks (sleeping tasks are far past it; echo tasks far below)."""
    with VerifierPool(2, timeout_s=1.0, warm_up=False) as p:
        yield p


def test_timeout_is_enforced_from_outside_and_worker_replaced(short_pool):
    pool = short_pool
    before = set(pool.worker_pids())
    t0 = time.monotonic()
    res = pool.map(SLEEP, [(30,), (0.01,), (30,)])
    wall = time.monotonic() - t0
    assert [r.status for r in res] == ["timeout", "ok", "timeout"]
    assert all(r.elapsed_s < 1.0 + 1.0 for r in res), [r.elapsed_s for r in res]
    assert wall < 5.0
    time.sleep(0.3)  # the dispatcher replaces killed workers right after reporting the timeout
    killed = before - set(pool.worker_pids())
    assert len(killed) == 2 and wait_gone(killed) == []
    assert [r.value for r in pool.map(ECHO, [(1,), (2,), (3,)])] == [1, 2, 3]  # replacements work


def test_errors_and_crashes_are_results_not_exceptions(pool):
    res = (
        pool.map("os:_exit", [(3,)]) + pool.map("nonexistent.module:f", [()]) + pool.map("math:sqrt", [(-1,)])
    )
    assert [r.status for r in res] == ["crashed", "error", "error"]
    assert "ModuleNotFoundError" in res[1].message and "ValueError" in res[2].message
    unpicklable = pool.map(ECHO, [(lambda: 1,)])
    assert unpicklable[0].status == "error" and "cannot send" in unpicklable[0].message
    returns_unpicklable = pool.map("threading:Lock", [()])
    assert returns_unpicklable[0].status == "error" and "unpicklable result" in returns_unpicklable[0].message
    assert pool.map(ACC, [("$2$", "$\\boxed{2}$")])[0].value == 1.0


def test_memory_limit_turns_a_memory_bomb_into_an_error():
    with VerifierPool(1, timeout_s=10.0, memory_limit_mb=512, warm_up=False) as p:
        (r,) = p.map("builtins:bytearray", [(2 * 1024**3,)])
        assert r.status == "error" and "MemoryError" in r.message
        assert p.map(ECHO, [("still fine",)])[0].value == "still fine"


def test_concurrent_callers_from_threads_get_their_own_results_and_counters(short_pool):
    pool = short_pool
    out, errors = {}, []

    def work(k):
        try:
            before = pool.thread_counters()
            res = pool.map(ECHO, [(f"{k}-{i}",) for i in range(50)]) + pool.map(SLEEP, [(30,)] * (k % 2))
            out[k] = ([r.value for r in res[:50]], (pool.thread_counters() - before).timeouts)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for k in range(4):
        assert out[k][0] == [f"{k}-{i}" for i in range(50)]
        assert out[k][1] == k % 2


def test_affinity_prefers_one_worker_but_idle_workers_steal(pool):
    deadline = time.monotonic() + 10
    while len(pool.worker_pids()) < 3 and time.monotonic() < deadline:  # helper + 2 started workers
        time.sleep(0.05)
    res = pool.map(SLEEP, [(0.2,)] * 8, affinity=["same-gold"] * 8)
    assert all(r.ok for r in res)
    assert len({r.value for r in res}) == 2  # the idle worker stole from the preferred worker's queue
    with pytest.raises(ValueError, match="affinity has 1 keys for 2 tasks"):
        pool.map(ECHO, [(1,), (2,)], affinity=["x"])


def test_broadcast_runs_once_in_every_worker(pool):
    deadline = time.monotonic() + 10
    while len(pool.worker_pids()) < 3 and time.monotonic() < deadline:  # helper + 2 started workers
        time.sleep(0.05)
    res = pool.broadcast("os:getpid")
    assert sorted(r.value for r in res) == sorted(pool.worker_pids()[1:])
    assert all(r.ok for r in pool.broadcast("megatron_ghpo.rewards.math_tasks:clear_caches"))


def test_large_payloads_do_not_stall_other_workers(pool):
    """A 20 MB task is written as its worker reads it; a concurrent small task is not held up."""
    big = "7" * 20_000_000
    futs = [pool.submit(ECHO, (big,)), pool.submit(ECHO, ("small",))]
    results = [f.result(timeout=30) for f in futs]
    assert results[0].ok and len(results[0].value) == len(big) and results[1].value == "small"


def test_pool_recovers_when_its_helper_process_is_killed():
    with VerifierPool(2, timeout_s=5.0, warm_up=False) as p:
        helper, *workers = p.worker_pids()
        os.kill(helper, 9)  # the workers die with it (PR_SET_PDEATHSIG)
        assert wait_gone([helper, *workers]) == []
        res = p.map(ECHO, [(i,) for i in range(6)])
        assert [r.value for r in res if r.ok] == [i for i, r in enumerate(res) if r.ok]
        assert sum(r.ok for r in res) >= 4  # tasks sent to already-dead workers may report "crashed"
        assert p.map(ECHO, [("after",)])[0].value == "after"
        assert helper not in p.worker_pids()


def test_close_stops_every_process_and_rejects_new_work():
    p = VerifierPool(2, timeout_s=0.3, warm_up=False)
    pids = set(p.worker_pids())
    p.map(SLEEP, [(30,)])  # one kill + respawn
    time.sleep(0.2)
    pids |= set(p.worker_pids())
    assert len(pids) >= 4
    p.close()
    assert wait_gone(pids) == []
    with pytest.raises(PoolClosedError):
        p.map(ECHO, [(1,)])
    p.close()  # idempotent


def test_processes_die_with_a_killed_parent(tmp_path):
    """A trainer killed with SIGKILL (no atexit, no close) leaves no verifier process behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "from megatron_ghpo.rewards import VerifierPool\n"
        "p = VerifierPool(2, timeout_s=30, warm_up=False)\n"
        "f = p.submit('megatron_ghpo.rewards.math_tasks:sleep_for', (60,))\n"
        "time.sleep(0.3)\n"
        "print(' '.join(map(str, p.worker_pids())), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    pids = [int(x) for x in proc.stdout.split()]
    assert len(pids) == 3, proc.stderr
    assert wait_gone(pids) == []


def test_default_pool_is_shared_and_reconfigurable():
    try:
        configure_default_pool(num_workers=1, timeout_s=2.0, warm_up=False)
        a = get_default_pool()
        assert a is get_default_pool() and a.num_workers == 1
        configure_default_pool(num_workers=1, timeout_s=3.0, warm_up=False)
        assert a.closed
        b = get_default_pool()
        assert b is not a and b.timeout_s == 3.0
    finally:
        close_default_pool()
        configure_default_pool()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_workers": 0}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"worker_nice": -1}, "worker_nice"),
        ({"memory_limit_mb": -5}, "memory_limit_mb"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VerifierPool(**kwargs)
