"""The verifier pool's dispatcher: one thread that owns the helper process and every worker.

Everything is non-blocking (``selectors``): task frames are written as the worker's socket accepts
them and results are read as they arrive, so one slow or stuck worker never delays the others'
deadlines. A worker is sent tasks only after it announced itself ready. A task that passes its
deadline gets a ``timeout`` result at once; its worker is SIGKILLed through the helper and replaced.
"""

from __future__ import annotations

import math
import os
import selectors
import socket
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.rewards._helper import HelperError, HelperProcess
from megatron_ghpo.rewards._wire import FrameReader, encode
from megatron_ghpo.rewards.pool_types import PoolClosedError, TaskResult, VerifierPoolError

logger = get_logger(__name__)

PIPELINE_DEPTH = 2
"""Tasks in flight per worker: the next task is already in the worker's socket when it finishes one,
so it never idles for a dispatcher round trip. Only the head task runs; its deadline starts when it
starts (when the previous result arrives), so each task still gets exactly ``timeout_s``."""

MAX_HELPER_RESTARTS = 3
"""Helper restarts tolerated before the pool gives up (pending work then fails with VerifierPoolError)."""


@dataclass(eq=False)
class Task:
    task_id: int
    ref: str
    args: tuple
    future: Future = field(default_factory=Future)
    slot: int | None = None
    dispatched_at: float = 0.0


class TaskQueue:
    """Pending tasks: one shared queue plus one preferred queue per worker slot (affinity)."""

    def __init__(self, slots: int) -> None:
        self.lock = threading.Lock()
        self.closing = False
        self._shared: deque[Task] = deque()
        self._by_slot: list[deque[Task]] = [deque() for _ in range(slots)]
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

    def take(self, slot: int) -> Task | None:
        """Own queue first, then shared work, then steal from the longest other queue."""
        with self.lock:
            if self._by_slot[slot]:
                return self._by_slot[slot].popleft()
            if self._shared:
                return self._shared.popleft()
            longest = max(self._by_slot, key=len)
            return longest.popleft() if longest else None

    def requeue(self, tasks: list[Task]) -> None:
        """Put tasks that never started back at the front of their queues (order kept)."""
        with self.lock:
            for task in reversed(tasks):
                (self._shared if task.slot is None else self._by_slot[task.slot]).appendleft(task)
        self.wake()

    def drain(self) -> list[Task]:
        """Mark closed and return every pending task."""
        with self.lock:
            self.closing = True
            tasks = list(self._shared) + [t for q in self._by_slot for t in q]
            self._shared.clear()
            for q in self._by_slot:
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


@dataclass(eq=False)
class _Worker:
    sock: socket.socket
    spawned_at: float
    pid: int | None = None
    ready: bool = False
    tasks: deque[Task] = field(default_factory=deque)
    """In-flight tasks, in the order sent; the head is running."""
    deadline: float = math.inf
    out: bytearray = field(default_factory=bytearray)
    reader: FrameReader = field(default_factory=FrameReader)
    retired: bool = False


class Dispatcher:
    """Runs in the pool's thread (:meth:`run`); all process management happens in that thread."""

    def __init__(self, queue: TaskQueue, *, num_workers: int, timeout_s: float, memory_limit_mb: int,
                 worker_nice: int, preload: tuple[str, ...], start_timeout_s: float) -> None:  # fmt: skip
        self.queue = queue
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._helper_args = {"memory_limit_mb": memory_limit_mb, "nice": worker_nice, "preload": preload}
        self.helper: HelperProcess | None = None
        self.slots: list[_Worker | None] = [None] * num_workers
        self._respawn_at = [0.0] * num_workers
        self._failed_starts = [0] * num_workers
        self._restarts = 0
        self._sel = selectors.DefaultSelector()
        self._rbuf = bytearray(1 << 18)  # one receive buffer, reused (no allocation per read)
        self._rview = memoryview(self._rbuf)
        self.started = threading.Event()
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        try:
            self._sel.register(self.queue.wake_r, selectors.EVENT_READ, None)
            self.helper = HelperProcess(start_timeout_s=self.start_timeout_s, **self._helper_args)
            for slot in range(len(self.slots)):
                self._spawn(slot)
            deadline = time.monotonic() + self.start_timeout_s
            while not all(w is not None and w.ready for w in self.slots):
                if time.monotonic() > deadline:
                    raise VerifierPoolError(f"verifier workers did not start within {self.start_timeout_s} s")
                self._poll(max(0.0, deadline - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self.fatal = exc
            self.started.set()
            self._shutdown()
            return
        self.started.set()
        try:
            while not self.queue.closing:
                now = time.monotonic()
                self._respawn_due(now)
                self._assign(now)
                self._poll(self._next_timeout(now))
                self._expire(time.monotonic())
        except BaseException as exc:
            self.fatal = exc
            logger.exception("verifier pool dispatcher failed")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        pending = self.queue.drain()
        pending += [t for w in self.slots if w is not None for t in w.tasks]
        err: Exception = PoolClosedError("the verifier pool was closed while this task was pending")
        if self.fatal is not None:
            err = VerifierPoolError(f"verifier pool dispatcher stopped: {self.fatal!r}")
        for task in pending:
            if not task.future.done():
                task.future.set_exception(err)
        for w in self.slots:
            if w is not None:
                self._retire(w, kill=False)
        if self.helper is not None:
            self.helper.stop()  # kills and reaps every worker
        self._sel.close()
        self.queue.close_fds()

    def pids(self) -> list[int]:
        helper = self.helper
        return ([helper.pid] if helper is not None else []) + [
            w.pid for w in list(self.slots) if w is not None and w.pid is not None
        ]

    # ------------------------------------------------------------------ event loop
    def _next_timeout(self, now: float) -> float | None:
        times = []
        for slot, w in enumerate(self.slots):
            if w is None:
                times.append(self._respawn_at[slot])
            elif w.tasks:
                times.append(w.deadline)
            elif not w.ready:
                times.append(w.spawned_at + self.start_timeout_s)
        return max(0.0, min(times) - now) if times else None

    def _poll(self, timeout: float | None) -> None:
        for key, mask in self._sel.select(timeout):
            w = key.data
            if w is None:
                self.queue.clear_wake()
                continue
            if w.retired:
                continue
            if mask & selectors.EVENT_WRITE:
                self._flush(w)
            if mask & selectors.EVENT_READ and not w.retired:
                self._read(w)

    def _assign(self, now: float) -> None:
        for slot, w in enumerate(self.slots):
            while w is not None and w.ready and not w.retired and len(w.tasks) < PIPELINE_DEPTH:
                task = self.queue.take(slot)
                if task is None:
                    break
                try:
                    frame = encode((task.task_id, task.ref, task.args))
                except Exception as exc:  # noqa: BLE001 - unpicklable arguments: the task fails, the worker is fine
                    task.future.set_result(
                        TaskResult("error", message=f"cannot send task arguments: {exc!r}")
                    )
                    continue
                w.tasks.append(task)
                if len(w.tasks) == 1:
                    task.dispatched_at, w.deadline = now, now + self.timeout_s
                w.out += frame
                self._flush(w)

    def _flush(self, w: _Worker) -> None:
        try:
            sent = w.sock.send(w.out) if w.out else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._died(w, f"connection lost while sending: {exc!r}")
            return
        del w.out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if w.out else 0)
        if self._sel.get_key(w.sock).events != events:
            self._sel.modify(w.sock, events, w)

    def _read(self, w: _Worker) -> None:
        try:
            n = w.sock.recv_into(self._rbuf)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if not n:
            self._died(w, "worker exited")
            return
        try:
            frames = w.reader.feed(self._rview[:n])
        except Exception as exc:  # noqa: BLE001 - a corrupt stream means a broken worker
            self._died(w, f"unreadable reply: {exc!r}")
            return
        for frame in frames:
            if frame[0] == "ready":
                w.pid, w.ready = frame[1], True
                self._failed_starts[self.slots.index(w)] = 0
                continue
            task_id, status, value, _ = frame
            if not w.tasks or task_id != w.tasks[0].task_id:
                self._died(w, "protocol error: reply for a task it was not given")
                return
            task = w.tasks.popleft()
            now = time.monotonic()
            elapsed = now - task.dispatched_at
            result = TaskResult("ok", value=value, elapsed_s=elapsed) if status == "ok" else TaskResult(
                "error", elapsed_s=elapsed, message=str(value))  # fmt: skip
            w.deadline = math.inf
            if w.tasks:  # the next one starts now
                w.tasks[0].dispatched_at, w.deadline = now, now + self.timeout_s
            task.future.set_result(result)

    def _expire(self, now: float) -> None:
        for slot, w in enumerate(self.slots):
            if w is None:
                continue
            if w.tasks and w.deadline <= now:
                self._end_tasks(w, TaskResult("timeout", elapsed_s=now - w.tasks[0].dispatched_at))
                self._retire(w, kill=True)
                self._spawn(slot)
            elif not w.ready and now - w.spawned_at >= self.start_timeout_s:
                self._died(w, f"did not start within {self.start_timeout_s} s")

    def _end_tasks(self, w: _Worker, head_result: TaskResult) -> None:
        """The running task gets ``head_result``; tasks queued behind it never started: requeue them."""
        head = w.tasks.popleft()
        rest = list(w.tasks)
        w.tasks.clear()
        w.deadline = math.inf
        if rest:
            self.queue.requeue(rest)
        head.future.set_result(head_result)

    # ------------------------------------------------------------------ processes
    def _died(self, w: _Worker, reason: str) -> None:
        slot = self.slots.index(w)
        if w.tasks:
            elapsed = time.monotonic() - w.tasks[0].dispatched_at
            self._end_tasks(w, TaskResult("crashed", elapsed_s=elapsed, message=f"worker died: {reason}"))
        self._retire(w, kill=True)
        if w.ready:
            self._spawn(slot)
            return
        self._failed_starts[slot] += 1  # never became ready: back off, and check the helper
        logger.warning("verifier worker failed to start (%s)", reason)
        if self.helper is None or not self.helper.alive() or self._failed_starts[slot] >= 3:
            self._restart_helper(f"workers fail to start ({reason})")
            return
        self.slots[slot] = None
        self._respawn_at[slot] = time.monotonic() + min(5.0, 0.05 * 2 ** self._failed_starts[slot])

    def _spawn(self, slot: int) -> None:
        assert self.helper is not None
        try:
            sock = self.helper.spawn()
        except HelperError as exc:
            self._restart_helper(str(exc))
            return
        sock.setblocking(False)
        w = _Worker(sock, spawned_at=time.monotonic())
        self._sel.register(sock, selectors.EVENT_READ, w)
        self.slots[slot] = w

    def _respawn_due(self, now: float) -> None:
        for slot, w in enumerate(self.slots):
            if w is None and self._respawn_at[slot] <= now:
                self._spawn(slot)

    def _retire(self, w: _Worker, *, kill: bool) -> None:
        if w.retired:
            return
        w.retired = True
        try:
            self._sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        w.sock.close()
        if kill and w.pid is not None and self.helper is not None:
            self.helper.kill(w.pid)

    def _restart_helper(self, reason: str) -> None:
        self._restarts += 1
        if self._restarts > MAX_HELPER_RESTARTS:
            raise VerifierPoolError(f"verifier helper failed {self._restarts} times; last: {reason}")
        logger.warning("verifier helper restarting (%s)", reason)
        for slot, w in enumerate(self.slots):
            if w is not None:
                if w.tasks:
                    elapsed = time.monotonic() - w.tasks[0].dispatched_at
                    msg = f"verifier helper restarted: {reason}"
                    self._end_tasks(w, TaskResult("crashed", elapsed_s=elapsed, message=msg))
                self._retire(w, kill=False)
            self.slots[slot] = None
            self._failed_starts[slot] = 0
        if self.helper is not None:
            self.helper.stop()
        self.helper = HelperProcess(start_timeout_s=self.start_timeout_s, **self._helper_args)
        for slot in range(len(self.slots)):
            self._spawn(slot)
