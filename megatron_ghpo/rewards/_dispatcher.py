"""The verifier pool's dispatcher: one thread that owns the helper process and every worker.

Everything is non-blocking (``selectors``): task frames are written as the worker's socket accepts
them and results are read as they arrive, so one slow or stuck worker never delays the others'
deadlines. A worker is sent tasks only after it announced itself ready. A task that passes its
deadline gets a ``timeout`` result at once; its worker is SIGKILLed through the helper and replaced.
"""

from __future__ import annotations

import math
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.rewards._helper import HelperError, HelperProcess
from megatron_ghpo.rewards._queue import Task, TaskQueue
from megatron_ghpo.rewards._wire import FrameReader, encode
from megatron_ghpo.rewards.pool_types import PoolClosedError, TaskResult, VerifierPoolError

logger = get_logger(__name__)

MAX_BATCH = 8
"""Tasks sent to a worker in one frame, at most. A worker runs its tasks one after another and reports
each result at once; only the head task runs, and its deadline starts when it starts (when the
previous result arrives), so each task still gets exactly ``timeout_s``. Idle workers are served
first and batches are sized ``ceil(queued / open workers)``, so a single small group still spreads
over all workers."""

LOW_WATER = 3
"""A worker gets its next batch while it still has this many tasks to run, so it never idles waiting
for the dispatcher (which handles results in coalesced rounds, see COALESCE_S)."""

COALESCE_S = 0.0005
"""While tasks are in flight, the dispatcher pauses this long after each round of events so several
results are handled per wake-up (a wake-up per result cost the parent ~50 us of CPU each, which on 2
cores is taken from the workers). Workers hold their next tasks already, so they never wait for it."""

MAX_HELPER_RESTARTS = 3
_CTRL = object()  # selector tag of the helper's control socket
"""Helper restarts tolerated before the pool gives up (pending work then fails with VerifierPoolError)."""


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
    writing: bool = False
    """Registered for EVENT_WRITE (unsent task bytes are waiting)."""


class Dispatcher:
    """Runs in the pool's thread (:meth:`run`); all process management happens in that thread."""

    def __init__(self, queue: TaskQueue, *, num_workers: int, timeout_s: float, start_timeout_s: float,
                 **helper_args: object) -> None:  # fmt: skip
        self.queue = queue
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._helper_args = helper_args  # memory_limit_mb, nice, preload, warm_up (see HelperProcess)
        self.helper: HelperProcess | None = None
        self.slots: list[_Worker | None] = [None] * num_workers
        self._respawn_at = [0.0] * num_workers
        self._failed_starts = [0] * num_workers
        self._restarts = 0
        self._sel = selectors.DefaultSelector()
        self._rbuf = bytearray(1 << 18)  # one receive buffer, reused (no allocation per read)
        self._rview = memoryview(self._rbuf)
        self._earliest = math.inf
        self.started = threading.Event()
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        try:
            self._sel.register(self.queue.wake_r, selectors.EVENT_READ, None)
            self._start_helper()
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
                if None in self.slots:
                    self._respawn_due(now)
                self._assign(now)
                self._watch_helper()
                timeout = self._next_timeout(now)
                self._poll(timeout)
                if timeout is not None and self._earliest - time.monotonic() > COALESCE_S:
                    time.sleep(COALESCE_S)
                now = time.monotonic()
                if now >= self._earliest:
                    self._expire(now)
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
        """Seconds until the earliest deadline, start timeout or respawn (None: nothing pending)."""
        earliest = math.inf
        for slot, w in enumerate(self.slots):
            if w is None:
                earliest = min(earliest, self._respawn_at[slot])
            elif w.tasks:
                earliest = min(earliest, w.deadline)
            elif not w.ready:
                earliest = min(earliest, w.spawned_at + self.start_timeout_s)
        self._earliest = earliest
        return None if earliest == math.inf else max(0.0, earliest - now)

    def _poll(self, timeout: float | None) -> None:
        for key, mask in self._sel.select(timeout):
            w = key.data
            if w is None:
                self.queue.clear_wake()
                continue
            if w is _CTRL:
                self._on_helper_event(mask)
                continue
            if w.retired:
                continue
            if mask & selectors.EVENT_WRITE:
                self._flush(w)
            if mask & selectors.EVENT_READ and not w.retired:
                self._read(w)

    def _assign(self, now: float) -> None:
        queued = self.queue.pending()
        if not queued:
            return
        # a worker whose running task is already slow may be stuck: queue nothing more behind it
        slow = min(0.05, self.timeout_s / 10)
        open_slots = [
            slot
            for slot, w in enumerate(self.slots)
            if w is not None and w.ready and not w.retired and len(w.tasks) <= LOW_WATER
            and (not w.tasks or now - w.tasks[0].dispatched_at < slow)
        ]  # fmt: skip
        open_slots.sort(key=lambda slot: len(self.slots[slot].tasks))  # idle workers first
        for i, slot in enumerate(open_slots):
            w = self.slots[slot]
            size = min(MAX_BATCH, -(-queued // (len(open_slots) - i)))
            batch: list[Task] = []
            while len(batch) < size:
                task = self.queue.take(slot)
                if task is None:
                    break
                batch.append(task)
            try:
                frame = encode([(t.task_id, t.ref, t.args) for t in batch])
            except Exception:  # noqa: BLE001 - unpicklable arguments: find the bad tasks, send the rest
                batch = self._drop_unpicklable(batch)
                frame = encode([(t.task_id, t.ref, t.args) for t in batch])
            if batch:
                if not w.tasks:
                    batch[0].dispatched_at, w.deadline = now, now + self.timeout_s
                w.tasks.extend(batch)
                w.out += frame
                self._flush(w)
            queued = self.queue.pending()
            if not queued:
                return

    @staticmethod
    def _drop_unpicklable(batch: list[Task]) -> list[Task]:
        keep = []
        for t in batch:
            try:
                encode((t.task_id, t.ref, t.args))
            except Exception as exc:  # noqa: BLE001 - the task fails, the worker is fine
                t.future.set_result(TaskResult("error", message=f"cannot send task arguments: {exc!r}"))
            else:
                keep.append(t)
        return keep

    def _flush(self, w: _Worker) -> None:
        try:
            sent = w.sock.send(w.out) if w.out else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._died(w, f"connection lost while sending: {exc!r}")
            return
        del w.out[:sent]
        if bool(w.out) != w.writing:
            w.writing = bool(w.out)
            self._sel.modify(w.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if w.writing else 0), w)

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
            task_id, status, value, _, finished_at = frame
            if not w.tasks or task_id != w.tasks[0].task_id:
                self._died(w, "protocol error: reply for a task it was not given")
                return
            task = w.tasks.popleft()
            elapsed = time.monotonic() - task.dispatched_at
            result = TaskResult("ok", value=value, elapsed_s=elapsed) if status == "ok" else TaskResult(
                "error", elapsed_s=elapsed, message=str(value))  # fmt: skip
            w.deadline = math.inf
            if w.tasks:  # the next one started when this one finished (CLOCK_MONOTONIC is system-wide)
                start = min(finished_at, time.monotonic())
                w.tasks[0].dispatched_at, w.deadline = start, start + self.timeout_s
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
            try:
                self.helper.kill(w.pid)
            except HelperError:
                pass  # the helper is gone, its workers with it; noticed on its control socket

    def _start_helper(self) -> None:
        if self.helper is not None:
            try:
                self._sel.unregister(self.helper.ctrl)
            except (KeyError, ValueError):
                pass
            self.helper.stop()
            self.helper = None
        self.helper = HelperProcess(start_timeout_s=self.start_timeout_s, **self._helper_args)
        self._sel.register(self.helper.ctrl, selectors.EVENT_READ, _CTRL)
        self._ctrl_writing = False

    def _watch_helper(self) -> None:
        """Watch the control socket for writability only while commands are queued."""
        if self.helper is None or self.helper.wants_write == self._ctrl_writing:
            return
        self._ctrl_writing = self.helper.wants_write
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._ctrl_writing else 0)
        self._sel.modify(self.helper.ctrl, events, _CTRL)

    def _on_helper_event(self, mask: int) -> None:
        assert self.helper is not None
        try:
            # the helper never writes after its start: readable means it exited
            if mask & selectors.EVENT_READ and not self.helper.ctrl.recv(64):
                raise HelperError(f"verifier helper exited (code {self.helper.proc.poll()})")
            if mask & selectors.EVENT_WRITE:
                self.helper.flush()
        except BlockingIOError:
            return
        except (HelperError, OSError) as exc:
            self._restart_helper(str(exc))

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
        self._start_helper()
        for slot in range(len(self.slots)):
            self._spawn(slot)
