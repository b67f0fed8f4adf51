"""The process-wide default verifier pool used by reward functions called without ``pool=``."""

from __future__ import annotations

import threading
from typing import Any

from megatron_ghpo.rewards.pool import VerifierPool

_DEFAULT_LOCK = threading.Lock()
_DEFAULT_POOL: VerifierPool | None = None
_DEFAULT_OPTIONS: dict[str, Any] = {}


def configure_default_pool(**options: Any) -> None:
    """Set the options (``num_workers``, ``timeout_s``, ``memory_limit_mb``) of the default pool.

    A running default pool with other options is closed; the next :func:`get_default_pool` starts one.
    """
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        if options != _DEFAULT_OPTIONS and _DEFAULT_POOL is not None:
            _DEFAULT_POOL.close()
            _DEFAULT_POOL = None
        _DEFAULT_OPTIONS.clear()
        _DEFAULT_OPTIONS.update(options)


def get_default_pool() -> VerifierPool:
    """The process-wide pool used by reward functions called without ``pool=`` (started lazily)."""
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        pool = _DEFAULT_POOL
        if pool is None or pool.closed or not pool.usable_here:
            pool = _DEFAULT_POOL = VerifierPool(**_DEFAULT_OPTIONS)
        return pool


def close_default_pool() -> None:
    """Close the default pool if one is running."""
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        if _DEFAULT_POOL is not None:
            _DEFAULT_POOL.close()
            _DEFAULT_POOL = None
