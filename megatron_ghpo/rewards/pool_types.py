"""Result and counter types of the verifier pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class VerifierPoolError(RuntimeError):
    """The pool itself failed (could not start, or its dispatcher stopped); not a scoring outcome."""


class PoolClosedError(VerifierPoolError):
    """Work was submitted to, or was pending in, a pool that has been closed."""


@dataclass(frozen=True)
class TaskResult:
    """Outcome of one task."""

    status: str
    """``ok`` | ``timeout`` | ``error`` (the task raised) | ``crashed`` (the worker died)."""
    value: Any = None
    """The task's return value when ``status == "ok"``, else None."""
    elapsed_s: float = 0.0
    """Wall-clock seconds from dispatch to a worker until the result (measured in this process)."""
    message: str = ""
    """Error text for ``error``/``crashed``."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class VerifierCounters:
    """Task outcome counts."""

    tasks: int = 0
    timeouts: int = 0
    errors: int = 0
    crashes: int = 0

    def add(self, result: TaskResult) -> None:
        self.tasks += 1
        self.timeouts += result.status == "timeout"
        self.errors += result.status == "error"
        self.crashes += result.status == "crashed"

    def copy(self) -> VerifierCounters:
        return VerifierCounters(
            tasks=self.tasks, timeouts=self.timeouts, errors=self.errors, crashes=self.crashes
        )

    def __sub__(self, other: VerifierCounters) -> VerifierCounters:
        return VerifierCounters(
            tasks=self.tasks - other.tasks,
            timeouts=self.timeouts - other.timeouts,
            errors=self.errors - other.errors,
            crashes=self.crashes - other.crashes,
        )
