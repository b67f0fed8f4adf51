"""The verifier pool's helper process ("zygote") and its worker loop.

Run as ``python -m megatron_ghpo.rewards._zygote <ctrl_fd> <parent_pid> <memory_limit_mb> <nice>
<preload,...> <warm_up 0|1>`` by :class:`megatron_ghpo.rewards._helper.HelperProcess`; never imported
otherwise. Each preload module may define ``warm_up(full: bool)`` (or ``warm_up()``, called only for a
full warm-up), run once before any fork.

Why a zygote: a scoring worker that exceeds its wall-clock budget is killed with SIGKILL and must be
replaced quickly. Starting a fresh interpreter and importing sympy/math-verify costs ~0.4 s; forking
a warm single-threaded process costs a few milliseconds. The zygote imports the task modules once,
then forks one worker per request. It is started as a plain subprocess (not ``multiprocessing``), so
the trainer's ``__main__`` module is never re-imported in it.

Control protocol (AF_UNIX SOCK_SEQPACKET, one message per command, no replies except at start):

* zygote -> parent at start: ``b"R"`` (ready) or ``b"E" + message`` (failed to start);
* ``b"S"`` with one attached fd (the worker's end of a socketpair): fork a worker on it. If the fork
  fails, the fd is closed, which the parent sees as the worker's connection closing;
* ``b"K" + pid`` (8 bytes): SIGKILL that worker if it is still an unreaped child (corpses are reaped
  with ``WNOHANG`` on later commands, so a pid cannot be reused by another process before its kill);
* EOF -> SIGKILL every live worker, reap them, exit.

Worker protocol (frames of :mod:`megatron_ghpo.rewards._wire` over the socketpair): the worker first
sends ``("ready", pid)``; then it receives batches ``[(task_id, "module:function", args), ...]``, runs
them in order and replies after each with ``(task_id, status, value, elapsed_s, finished_at)``, status
``"ok"`` or ``"error"`` (value = the error text), ``finished_at`` = ``time.monotonic()`` (system-wide
on Linux, so the parent knows exactly when the next task started). EOF -> exit.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import inspect
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from megatron_ghpo.rewards._wire import BlockingFrameSocket, encode

_PR_SET_PDEATHSIG = 1
_QUIET_LOGGERS = ("latex2sympy2_extended", "math_verify")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no-op where prctl is missing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def resolve(ref: str, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (cached)."""
    fn = cache.get(ref)
    if fn is None:
        module_name, _, attr = ref.partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        cache[ref] = fn
    return fn


def _limit_resources(memory_limit_mb: int, nice: int) -> None:
    if memory_limit_mb > 0:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass


def _worker_loop(sock: socket.socket, memory_limit_mb: int, nice: int) -> None:
    _limit_resources(memory_limit_mb, nice)
    cache: dict[str, Callable[..., Any]] = {}
    conn = BlockingFrameSocket(sock)
    try:
        conn.send(("ready", os.getpid()))
    except OSError:
        return
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        for task_id, ref, args in batch:
            t0 = time.perf_counter()
            try:
                value = resolve(ref, cache)(*args)
                status = "ok"
            except BaseException as exc:  # noqa: BLE001 - untrusted input: report every failure, never die
                value, status = f"{type(exc).__name__}: {exc}"[:2000], "error"
            elapsed = time.perf_counter() - t0
            try:
                frame = encode((task_id, status, value, elapsed, time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - an unpicklable result is the task's failure
                frame = encode(
                    (
                        task_id,
                        "error",
                        f"unpicklable result: {type(exc).__name__}: {exc}"[:2000],
                        elapsed,
                        time.monotonic(),
                    )
                )
            try:
                sock.sendall(frame)  # at once: the parent times the next task from this result
            except OSError:
                return


def _reap(live: set[int]) -> None:
    while live:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            live.clear()
            return
        if pid == 0:
            return
        live.discard(pid)


def _kill(pid: int, live: set[int], *, wait_for_exit: bool) -> None:
    if pid in live:  # still our unreaped child: the pid cannot belong to another process
        try:
            os.kill(pid, signal.SIGKILL)
            if wait_for_exit:
                os.waitpid(pid, 0)
                live.discard(pid)
        except (ProcessLookupError, ChildProcessError):
            live.discard(pid)


def _fork_worker(
    ctrl: socket.socket, fds: list[int], memory_limit_mb: int, nice: int, live: set[int]
) -> None:
    try:
        pid = os.fork()
    except OSError:
        for fd in fds:
            os.close(fd)  # the parent sees the connection close and retries later
        return
    if pid == 0:  # worker
        code = 0
        try:
            ctrl.close()
            for extra in fds[1:]:
                os.close(extra)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _die_with_parent()
            _worker_loop(socket.socket(fileno=fds[0]), memory_limit_mb, nice)
        except BaseException:  # noqa: BLE001 - a worker must never fall back into the zygote loop
            code = 1
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    live.add(pid)


def _serve(ctrl: socket.socket, memory_limit_mb: int, nice: int) -> None:
    live: set[int] = set()
    try:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(ctrl, 64, 4)
            except OSError:
                break
            if not msg:
                break
            _reap(live)
            if msg[:1] == b"S" and fds:
                _fork_worker(ctrl, fds, memory_limit_mb, nice, live)
                continue
            for fd in fds:
                os.close(fd)
            if msg[:1] == b"K" and len(msg) == 9:
                _kill(struct.unpack("<q", msg[1:])[0], live, wait_for_exit=False)
    finally:
        for pid in list(live):
            _kill(pid, live, wait_for_exit=True)


def main(argv: list[str]) -> int:
    ctrl_fd, parent_pid, memory_limit_mb, nice = (int(a) for a in argv[:4])
    preload = [m for m in (argv[4] if len(argv) > 4 else "").split(",") if m]
    run_warm_up = argv[5] != "0" if len(argv) > 5 else True
    _die_with_parent()
    ctrl = socket.socket(fileno=ctrl_fd)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer; it closes the pool
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        for module in preload:
            mod = importlib.import_module(module)
            warm = getattr(mod, "warm_up", None)
            if not callable(warm):
                continue
            if "full" in inspect.signature(warm).parameters:
                warm(full=run_warm_up)
            elif run_warm_up:
                warm()
    except BaseException as exc:  # noqa: BLE001 - report the failure to the parent instead of dying silently
        ctrl.send(b"E" + f"{type(exc).__name__}: {exc}".encode()[:4000])
        return 1
    gc.collect()
    gc.freeze()  # forked workers then never scan (and copy-on-write) the preloaded objects' pages
    ctrl.send(b"R")
    _serve(ctrl, memory_limit_mb, nice)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
