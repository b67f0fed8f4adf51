"""The RolloutEngine protocol: the only thing the sampler and trainer know about generation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from megatron_ghpo.records import Completion


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    """Sampling settings for one generate call (defaults match the reference sampler)."""

    n: int = 1
    """Completions per prompt (``num_generations`` for training)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    max_tokens: int = 256
    """Maximum completion length in tokens (``max_completion_length``)."""
    logprobs: bool = True
    """Return per-token log-probs of the sampled tokens."""
    seed: int | None = None
    """Seed for reproducible sampling; None leaves the engine's generator alone."""
    stop: tuple[str, ...] = ()


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions and receives new weights from the policy."""

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt, in prompt order."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors in place; resets the prefix cache and bumps the weight version."""
        ...

    @property
    def weight_version(self) -> int:
        """Number of weight loads since start (0 = the weights the engine was started with)."""
        ...

    def sleep(self) -> None:
        """Free KV cache (and weights where supported) while the policy trains; no-op where unsupported."""
        ...

    def wake(self) -> None:
        """Undo :meth:`sleep`."""
        ...

    def close(self) -> None:
        """Release every resource the engine holds."""
        ...


@runtime_checkable
class StreamingRolloutEngine(RolloutEngine, Protocol):
    """An engine that accepts requests while it runs and hands back groups as they finish.

    The GHPO sampler uses this to queue a hinted regeneration as soon as a group is known to be
    difficult, instead of waiting for the whole batch's pass to end.
    """

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Queue one prompt for ``sampling.n`` completions under a caller-chosen unique id."""
        ...

    def poll(self) -> list[tuple[str, list[Completion]]]:
        """Advance generation until at least one queued request has finished (or none is pending);
        return every finished ``(request_id, completions)`` pair not returned before."""
        ...

    def has_pending(self) -> bool:
        """True while a submitted request has not been returned by :meth:`poll`."""
        ...
