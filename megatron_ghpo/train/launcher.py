"""Local multi-process launch for CPU machines (what `torchrun --standalone` does, without torchrun).

Each rank runs ``python -m <module> <args>`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
set. When any rank exits non-zero the others are terminated, so one dead rank never leaves the
rest waiting in a collective forever. When the launcher itself dies, even by ``kill -9``, the kernel
kills its ranks (Linux ``PR_SET_PDEATHSIG``): orphaned ranks would otherwise keep training and
writing checkpoints into the output folder that a ``--resume auto`` run is starting from.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from megatron_ghpo.logging_utils import get_logger

logger = get_logger("launcher")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when ``parent_pid`` exits (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


def under_launcher() -> bool:
    """True when this process is already one rank of a launched job (torchrun, srun wrapper, ours)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def spawn_local(module: str, args: list[str], world_size: int, *, timeout_s: float | None = None,
                threads_per_rank: int | None = None, extra_env: dict[str, str] | None = None) -> int:
    """Run ``world_size`` ranks of ``python -m module args`` on this machine; return the job's exit code.

    ``timeout_s`` bounds the whole job (every rank is killed when it passes; exit code 124).
    """
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        env = {**os.environ, **(extra_env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                      preexec_fn=_die_with_parent(os.getpid())))  # noqa: PLW1509 (one prctl call)
    logger.info("launched %d local ranks (port %d, %d thread(s) each)", world_size, port, threads)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def stop_all(sig=signal.SIGTERM) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
        end = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                logger.error("rank %d exited with code %d; stopping the other ranks", rank, code)
                stop_all()
                return code
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                logger.error("job exceeded its %.0f s limit; killing every rank", timeout_s)
                stop_all(signal.SIGKILL)
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all(signal.SIGINT)
        return 130
