"""Pending work of the verifier pool: a shared queue, per-worker affinity queues, pinned broadcasts."""

from __future__ import annotations

import os
import threading
import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from megatron_ghpo.rewards.pool_types import PoolClosedError


@dataclass(eq=False)
class Task:
    task_id: int
    ref: str
    args: tuple
    future: Future = field(default_factory=Future)
    slot: int | None = None
    pinned: bool = False
    """Runs on worker slot ``slot`` only (never stolen); used by broadcasts."""
    dispatched_at: float = 0.0


class TaskQueue:
    """Pending tasks: one shared queue plus one preferred queue per worker slot (affinity)."""

    def __init__(self, slots: int) -> None:
        self.lock = threading.Lock()
        self.closing = False
        self._shared: deque[Task] = deque()
        self._by_slot: list[deque[Task]] = [deque() for _ in range(slots)]
        self._pinned: list[deque[Task]] = [deque() for _ in range(slots)]
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def put(self, tasks: list[Task], affinities: list[str | None]) -> None:
        """Queue tasks (one lock acquisition and one wake-up for the whole batch)."""
        for task, key in zip(tasks, affinities):
            if key is not None:
                task.slot = zlib.crc32(key.encode("utf-8", "replace")) % len(self._by_slot)
        with self.lock:
            if self.closing:
                raise PoolClosedError("the verifier pool is closed; create a new one")
            for task in tasks:
                (self._shared if task.slot is None else self._by_slot[task.slot]).append(task)
        self.wake()

    def put_pinned(self, tasks: list[Task]) -> None:
        """One task per slot (``task.slot`` set), each run by that slot's worker only."""
        with self.lock:
            if self.closing:
                raise PoolClosedError("the verifier pool is closed; create a new one")
            for task in tasks:
                task.pinned = True
                self._pinned[task.slot].append(task)
        self.wake()

    def take(self, slot: int) -> Task | None:
        """Pinned work first, then own queue, shared work, and finally steal from the longest queue's end."""
        with self.lock:
            if self._pinned[slot]:
                return self._pinned[slot].popleft()
            if self._by_slot[slot]:
                return self._by_slot[slot].popleft()
            if self._shared:
                return self._shared.popleft()
            longest = max(self._by_slot, key=len)
            # steal from the back: the owner works from the front, so the thief takes whole groups of
            # same-affinity tasks the owner has not reached (its caches then serve the whole group)
            return longest.pop() if longest else None

    def pending(self) -> int:
        """Number of queued tasks (not yet sent to a worker)."""
        return len(self._shared) + sum(map(len, self._by_slot)) + sum(map(len, self._pinned))

    def requeue(self, tasks: list[Task]) -> None:
        """Put tasks that never started back at the front of their queues (order kept)."""
        with self.lock:
            for task in reversed(tasks):
                if task.pinned:
                    self._pinned[task.slot].appendleft(task)
                else:
                    (self._shared if task.slot is None else self._by_slot[task.slot]).appendleft(task)
        self.wake()

    def drain(self) -> list[Task]:
        """Mark closed and return every pending task."""
        with self.lock:
            self.closing = True
            tasks = list(self._shared) + [t for q in self._by_slot + self._pinned for t in q]
            self._shared.clear()
            for q in self._by_slot + self._pinned:
                q.clear()
        return tasks

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass  # pipe full (a wake-up is already pending) or closed

    def clear_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    def close_fds(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
