"""A process pool for untrusted scoring work, with a hard per-task wall-clock timeout.

Model output is untrusted: a completion can make sympy run for hours or allocate without bound.
math-verify's own timeout uses ``signal.alarm``, which only works in a process's main thread. So
every task runs in a separate worker process, and the timeout is enforced from *outside*: a
dispatcher thread in this process watches each task's deadline and SIGKILLs a worker that overruns,
then forks a replacement from a warm helper process (see :mod:`megatron_ghpo.rewards._dispatcher`
and :mod:`megatron_ghpo.rewards._zygote`).

Guarantees of :meth:`VerifierPool.map` (callable from any thread, concurrently):

* each task's result arrives within ``timeout_s`` of the moment it starts in a worker, plus the
  dispatcher thread's wake-up delay (milliseconds normally; measured up to ~2 s only on a 2-core
  machine where other processes kept the CPUs saturated); a task that overruns gets
  ``status="timeout"`` and its worker is SIGKILLed and replaced;
* nothing a task does escapes as an exception: failures become ``status="error"`` (the task raised)
  or ``status="crashed"`` (the worker died, e.g. a C-level crash or the memory limit);
* no process outlives the pool: :meth:`VerifierPool.close`, the context manager and an ``atexit``
  hook stop the helper and its workers, and both die with their parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, wait
from typing import Any, Self

from megatron_ghpo.rewards._dispatcher import Dispatcher
from megatron_ghpo.rewards._queue import Task, TaskQueue
from megatron_ghpo.rewards.pool_types import PoolClosedError, TaskResult, VerifierCounters, VerifierPoolError

DEFAULT_PRELOAD = ("megatron_ghpo.rewards.math_tasks",)
"""Modules the helper imports (and warms up via their ``warm_up()``) before forking workers."""

_LIVE_POOLS: weakref.WeakSet[VerifierPool] = weakref.WeakSet()


class VerifierPool:
    """Worker processes that run ``"module:function"`` tasks under a hard per-task timeout.

    Args:
        num_workers: worker processes (default: the number of CPUs, at most 8).
        timeout_s: wall-clock budget per task, counted from its dispatch to a worker.
        memory_limit_mb: address-space limit of each worker (``RLIMIT_AS``); 0 disables it.
        worker_nice: niceness added to workers (0 = unchanged). The default 10 keeps the trainer, and
            this pool's dispatcher thread that enforces the deadlines, ahead of CPU-bound workers: on
            a loaded 2-core machine, deadline handling was late by up to ~1 s at 0 and by ~20 ms at 10.
        preload: modules imported once in the helper process before workers are forked.
        warm_up: run each preload module's ``warm_up(full=True)`` there (~1 s of CPU once; workers
            then start as fast as a long-running process); False calls ``warm_up(full=False)``, which
            only imports math-verify (short-lived pools, tests).
        start_timeout_s: how long to wait for the helper and a worker to come up.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        *,
        memory_limit_mb: int = 1024,
        worker_nice: int = 10,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        warm_up: bool = True,
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_workers is None:
            num_workers = max(1, min(8, os.cpu_count() or 1))
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}; fix rewards.num_workers")
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not (0 < timeout_s < math.inf)
        ):
            raise ValueError(
                f"timeout_s must be a finite number > 0, got {timeout_s!r}; fix rewards.timeout_s"
            )
        if not isinstance(memory_limit_mb, int) or memory_limit_mb < 0:
            raise ValueError(f"memory_limit_mb must be an int >= 0 (0 = no limit), got {memory_limit_mb!r}")
        if not isinstance(worker_nice, int) or not 0 <= worker_nice <= 19:
            raise ValueError(f"worker_nice must be an int in [0, 19], got {worker_nice!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.counters = VerifierCounters()
        """Outcome counts over every task this pool finished (all threads)."""
        self._pid = os.getpid()
        self._ids = itertools.count()
        self._counter_lock = threading.Lock()
        self._local = threading.local()
        self._queue = TaskQueue(num_workers)
        self._dispatcher = Dispatcher(
            self._queue,
            num_workers=num_workers,
            timeout_s=self.timeout_s,
            memory_limit_mb=memory_limit_mb,
            nice=worker_nice,
            preload=tuple(preload),
            warm_up=warm_up,
            start_timeout_s=start_timeout_s,
        )
        self._thread = threading.Thread(target=self._dispatcher.run, name="verifier-pool", daemon=True)
        self._thread.start()
        if not self._dispatcher.started.wait(start_timeout_s + 10):
            self.close()
            raise VerifierPoolError(f"verifier pool did not start within {start_timeout_s} s")
        if self._dispatcher.fatal is not None:
            err = self._dispatcher.fatal
            self.close()
            raise VerifierPoolError(f"verifier pool failed to start: {err}") from err
        _LIVE_POOLS.add(self)

    # ----------------------------------------------------------------- public API
    def submit(self, ref: str, args: Iterable[Any], *, affinity: str | None = None) -> Future:
        """Queue ``ref(*args)`` (``ref`` = ``"package.module:function"``); the future yields a TaskResult.

        Tasks with the same ``affinity`` key (e.g. the gold answer) prefer the same worker, so its
        per-process caches (parsed gold, parsed answers) are hit; an idle worker still takes work
        queued for a busy one.
        """
        return self._submit_many(ref, [args], [affinity])[0]

    def _submit_many(self, ref: str, arg_list: list[Iterable[Any]], keys: list[str | None]) -> list[Future]:
        self._check_usable()
        tasks = [Task(next(self._ids), ref, tuple(args)) for args in arg_list]
        self._queue.put(tasks, keys)
        return [t.future for t in tasks]

    def map(
        self, ref: str, arg_tuples: Iterable[Iterable[Any]], *, affinity: Sequence[str | None] | None = None
    ) -> list[TaskResult]:
        """Run ``ref(*args)`` for each args tuple; results in input order. Never raises for a task's failure.

        ``affinity``: one key per task (see :meth:`submit`), or None.
        """
        arg_list = list(arg_tuples)
        keys = list(affinity) if affinity is not None else [None] * len(arg_list)
        if len(keys) != len(arg_list):
            raise ValueError(f"affinity has {len(keys)} keys for {len(arg_list)} tasks")
        results = self._gather(self._submit_many(ref, arg_list, keys))
        mine = self._thread_counters()
        with self._counter_lock:
            for r in results:
                mine.add(r)
                self.counters.add(r)
        return results

    def broadcast(self, ref: str, args: Iterable[Any] = ()) -> list[TaskResult]:
        """Run ``ref(*args)`` once in every worker slot (e.g. to clear per-process caches).

        A slot whose worker is replaced meanwhile runs it in the replacement. Results are not
        counted in :attr:`counters`.
        """
        self._check_usable()
        tasks = [Task(next(self._ids), ref, tuple(args), slot=slot) for slot in range(self.num_workers)]
        self._queue.put_pinned(tasks)
        return self._gather([t.future for t in tasks])

    def _gather(self, futures: list[Future]) -> list[TaskResult]:
        while wait(futures, timeout=1.0).not_done:  # one wake-up when all are done, not one per task
            if not self._thread.is_alive():
                raise VerifierPoolError(f"verifier pool dispatcher stopped: {self._dispatcher.fatal!r}")
        return [fut.result() for fut in futures]

    def thread_counters(self) -> VerifierCounters:
        """A copy of the outcome counts of tasks mapped from the calling thread (for per-call deltas)."""
        return self._thread_counters().copy()

    def worker_pids(self) -> list[int]:
        """Process ids of the helper and of the workers that have started (for leak checks)."""
        return self._dispatcher.pids()

    @property
    def closed(self) -> bool:
        return self._queue.closing

    @property
    def usable_here(self) -> bool:
        """False when this object was inherited through fork (its processes belong to the parent)."""
        return os.getpid() == self._pid

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the helper and every worker; pending work fails with PoolClosedError. Idempotent."""
        with self._queue.lock:
            self._queue.closing = True
        self._queue.wake()
        if threading.current_thread() is not self._thread and os.getpid() == self._pid:
            self._thread.join(timeout_s)
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals
    def _thread_counters(self) -> VerifierCounters:
        counters = getattr(self._local, "counters", None)
        if counters is None:
            counters = self._local.counters = VerifierCounters()
        return counters

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise VerifierPoolError(
                f"this verifier pool belongs to process {self._pid}, not {os.getpid()} (it was inherited "
                "through fork); create a new VerifierPool in this process"
            )
        if self._dispatcher.fatal is not None:
            raise VerifierPoolError(f"verifier pool dispatcher stopped: {self._dispatcher.fatal!r}")
        if self._queue.closing:
            raise PoolClosedError("the verifier pool is closed; create a new one")


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close(timeout_s=10.0)
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit
            pass
