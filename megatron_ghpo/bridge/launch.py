"""Spawn the local ranks of a conversion on this machine (CPU, gloo), with a timeout.

Each rank is ``python -m megatron_ghpo.bridge.worker TASK ARGS_JSON`` with the environment
``torchrun`` would give it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free port) and one compute thread. Rank 0 writes to this terminal (progress
bar, logs); the other ranks' output goes to log files that are shown when a rank fails. A rank
that fails, or a run that exceeds ``timeout_s``, stops every rank and raises with the logs' tails:
a deadlock fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(this rank wrote to the terminal: see its output above)"


def run_ranks(
    task: str,
    args: dict[str, Any],
    world_size: int,
    *,
    timeout_s: float = 1800.0,
    threads_per_rank: int = 1,
    entry: list[str] | None = None,
    quiet_rank0: bool = False,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Run ``task`` on ``world_size`` local ranks; return when all exit 0, else raise ``RuntimeError``.

    ``entry``: the command before ``TASK ARGS_JSON`` (default ``python -m megatron_ghpo.bridge.worker``).
    ``quiet_rank0``: send rank 0's output to its log file too. ``extra_env``: added to each rank's environment.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix=f"megatron_ghpo_{task}_"))
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads_per_rank),
                MEGATRON_GHPO_THREADS_PER_RANK=str(threads_per_rank),
            )
            env.update(extra_env or {})
            log = log_dir / f"rank{rank}.log"
            logs.append(log)
            to_log = rank != 0 or quiet_rank0
            out = open(log, "w") if to_log else None  # noqa: SIM115 (closed with the process below)
            cmd = [*(entry or [sys.executable, "-m", "megatron_ghpo.bridge.worker"]), task, json.dumps(args)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if to_log else None))
            if out is not None:
                out.close()
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                r = failed[0]
                raise RuntimeError(
                    f"{task}: rank {r} of {world_size} exited with code {codes[r]}; its log ({logs[r]}):\n{_tail(logs[r])}"
                )
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                tails = "\n".join(f"--- rank {r} ---\n{_tail(logs[r])}" for r in running if r != 0 or quiet_rank0)
                raise TimeoutError(f"{task}: ranks {running} still running after {timeout_s:.0f} s (deadlock?)\n{tails}")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
