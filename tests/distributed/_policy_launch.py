"""Launch N local ranks of a worker script over gloo, with a hard timeout (no torchrun needed).

Each rank is ``python <script> <args...>`` with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` set and one thread per rank. A rank that fails or a launch that
runs past ``timeout_s`` kills every rank it started and raises with the tail of each rank's log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def launch(script: Path, args: list[str], *, world_size: int, log_dir: Path, timeout_s: float) -> None:
    """Run ``world_size`` ranks of ``script``; raise ``RuntimeError`` with logs on failure or timeout."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    repo = Path(__file__).resolve().parents[2]
    procs: list[tuple[subprocess.Popen, Path]] = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
            PYTHONPATH=str(repo) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
        )  # fmt: skip
        log = log_dir / f"rank{rank}.log"
        with log.open("w") as fh:
            p = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=repo)
        procs.append((p, log))
    deadline = time.monotonic() + timeout_s
    failed: list[str] = []
    try:
        for rank, (p, log) in enumerate(procs):
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                rc = p.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                failed.append(f"rank {rank}: still running after {timeout_s:.0f}s (deadlock?)\n{_tail(log)}")
                break
            if rc != 0:
                failed.append(f"rank {rank}: exit code {rc}\n{_tail(log)}")
                break
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        others = "\n".join(f"--- rank {r} log tail ---\n{_tail(log, 15)}" for r, (_, log) in enumerate(procs))
        raise RuntimeError("distributed launch failed: " + "\n".join(failed) + "\n" + others)
