"""Checkpoint folders: atomic publication, retention, and finding the newest complete one.

A checkpoint is written into ``checkpoints/.tmp_step_<N>`` and renamed to ``checkpoints/step_<N>``
only after every rank has finished writing and the ``COMPLETE`` marker exists; ``--resume auto``
never sees a half-written folder, because it only considers ``step_<N>`` folders with the marker.

One job at a time per output folder: global rank 0 holds an exclusive lock on
``<output_dir>/.run.lock`` for the life of its process (:func:`lock_output_dir`). A second job on
the same folder (a ``--resume auto`` while the killed job's ranks still run, two launches with one
``output_dir``) stops at once with a clear error instead of both writing checkpoints, metrics and
the Hugging Face export into one folder. The kernel drops the lock when the holder dies, even by
``kill -9``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from megatron_ghpo.logging_utils import get_logger

logger = get_logger("checkpointing")

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


LOCK_NAME = ".run.lock"
_held: dict[str, IO] = {}
"""Lock files held by this process, by resolved output folder (kept open: closing drops the lock)."""


class OutputDirInUse(FileExistsError):
    """Another running job holds the output folder's lock."""


def lock_output_dir(output_dir: str | Path) -> None:
    """Take the output folder's exclusive job lock for the rest of this process (rank 0 calls it).

    Raises :class:`OutputDirInUse` naming the holder when another live process has it. On file
    systems without ``flock`` the run goes on with a warning (nothing to lock with).
    """
    import fcntl

    root = Path(output_dir).resolve()
    if str(root) in _held:
        return
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / LOCK_NAME, "a+")  # noqa: SIM115 (held open for the life of the process: the lock)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise OutputDirInUse(
            f"output_dir {str(output_dir)!r} is in use by another running job ({holder}); wait for it to "
            f"finish or stop it (every one of its ranks), or choose another output_dir"
        ) from None
    except OSError as exc:
        logger.warning("output_dir %s: no file lock on this file system (%s); make sure one job uses it", root, exc)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held[str(root)] = f


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp_step_{step}"


def final_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step}"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def publish(output_dir: str | Path, step: int, info: dict) -> Path:
    """Mark the temporary folder complete and rename it into place (rank 0 only, after a barrier)."""
    src, dst = tmp_dir(output_dir, step), final_dir(output_dir, step)
    (src / MARKER).write_text(json.dumps(info, indent=2))
    if dst.exists():  # a rerun of the same step after resume: replace the older copy
        shutil.rmtree(dst)
    src.rename(dst)
    return dst


def enforce_limit(output_dir: str | Path, save_total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the limit; also sweep stale temporary folders."""
    root = checkpoint_root(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp_step_"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if save_total_limit is None:
        return removed
    found = complete_checkpoints(output_dir)
    for _, p in found[: max(0, len(found) - save_total_limit)]:
        shutil.rmtree(p)
        removed.append(p)
    return removed


def resolve_resume(output_dir: str | Path, resume: str | None, overwrite_output_dir: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    A fresh run refuses an output folder that already holds checkpoints, unless
    ``overwrite_output_dir`` is set, so another run's work is never silently overwritten.
    """
    if resume is None:
        existing = complete_checkpoints(output_dir)
        if existing and not overwrite_output_dir:
            raise FileExistsError(
                f"output_dir {str(output_dir)!r} already holds {len(existing)} checkpoint(s) (newest: "
                f"{existing[-1][1].name}); pass --resume auto to continue that run, choose another output_dir, "
                f"or set overwrite_output_dir: true to start over"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume!r}: not a complete checkpoint folder (no {MARKER} marker inside)")
    return p
