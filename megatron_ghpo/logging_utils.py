"""Rank-aware logging and the one progress-bar helper for long CLI work."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_CONFIGURED = False


def get_rank() -> int:
    """Global rank from torch.distributed when initialised, else from the launcher's env, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # torch is a core dependency; this only guards odd environments
        pass
    return int(os.environ.get("RANK", "0"))


def configure_logging(level: str | int = "INFO") -> None:
    """Install one stderr handler on the package logger; rank prefix when the world has >1 rank."""
    global _CONFIGURED
    logger = logging.getLogger("megatron_ghpo")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    logger.setLevel(level)
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank{get_rank()}] " if world > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """Logger under the package namespace (``megatron_ghpo.<name>``)."""
    if not name.startswith("megatron_ghpo"):
        name = f"megatron_ghpo.{name}"
    return logging.getLogger(name)


def log_rank0(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """Log only on global rank 0."""
    if get_rank() == 0:
        logger.log(level, msg, *args)


def progress(items: Iterable[T], *, desc: str, total: int | None = None, rank0_only: bool = True) -> Iterator[T]:
    """A rich progress bar over ``items`` on rank 0 (plain iteration elsewhere or when disabled).

    Set ``MEGATRON_GHPO_NO_PROGRESS=1`` to turn bars off (e.g. in CI logs).
    """
    if (rank0_only and get_rank() != 0) or os.environ.get("MEGATRON_GHPO_NO_PROGRESS") == "1":
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=desc, total=total, transient=True)
