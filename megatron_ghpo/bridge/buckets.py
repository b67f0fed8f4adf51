"""Bucket planning and the reusable bucket buffer of the weight export (pure; no collectives).

A bucket is a run of consecutive plan entries of one pipeline stage whose HF tensors, laid out
back to back (each aligned to :data:`ALIGN` bytes) in the output dtype, fit in ``bucket_bytes``;
a parameter whose HF tensors alone exceed it gets a bucket of its own.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from megatron_ghpo.bridge.plan import Plan, PlanEntry

ALIGN = 64
"""Byte alignment of each tensor inside a bucket buffer."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


@dataclass(kw_only=True)
class Bucket:
    """Consecutive plan entries of one stage, with each HF tensor's byte offset in the buffer."""

    stage: int
    entries: list[PlanEntry] = field(default_factory=list)
    offsets: list[list[int]] = field(default_factory=list)
    nbytes: int = 0


def out_dtype(entry: PlanEntry, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else entry.dtype


def entry_bytes(entry: PlanEntry, dtype: torch.dtype | None) -> int:
    """Bytes of the HF tensors of ``entry`` in a bucket buffer (aligned)."""
    return sum(_aligned(_nbytes(s, out_dtype(entry, dtype))) for s in entry.hf_shapes)


def plan_buckets(plan: Plan, bucket_bytes: int, dtype: torch.dtype | None) -> list[Bucket]:
    """Greedy packing in plan order; a bucket never spans two stages and never splits a parameter."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    for e in plan.entries:
        if not e.hf_names:
            continue
        size = entry_bytes(e, dtype)
        cur = buckets[-1] if buckets else None
        if cur is None or cur.stage != e.stage or (cur.entries and cur.nbytes + size > bucket_bytes):
            cur = Bucket(stage=e.stage)
            buckets.append(cur)
        offs = []
        for s in e.hf_shapes:
            offs.append(cur.nbytes)
            cur.nbytes += _aligned(_nbytes(s, out_dtype(e, dtype)))
        cur.entries.append(e)
        cur.offsets.append(offs)
    return buckets


def largest_tensor_bytes(plan: Plan, dtype: torch.dtype | None) -> int:
    """Bytes of the largest exported parameter (all its HF tensors together) in the output dtype."""
    sizes = (sum(_nbytes(s, out_dtype(e, dtype)) for s in e.hf_shapes) for e in plan.entries if e.hf_names)
    return max(sizes, default=0)


class BucketBuffer:
    """A reusable bucket buffer over a flat ``uint8`` tensor, tracking the tensors handed to the
    consumer through weak references (to tell whether it may be overwritten)."""

    def __init__(self, t: torch.Tensor) -> None:
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(f"a bucket buffer is a flat uint8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        self.t = t
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._handed: list[weakref.ref] = []

    @classmethod
    def allocate(cls, nbytes: int, device: torch.device) -> BucketBuffer:
        return cls(torch.empty(_aligned(nbytes), dtype=torch.uint8, device=device))

    def entry_views(self, bucket: Bucket, dtype: torch.dtype | None) -> list[list[torch.Tensor]]:
        """For each entry of ``bucket``, views of its HF tensors in this buffer."""
        return [
            [self.view(o, s, out_dtype(e, dtype)) for o, s in zip(offs, e.hf_shapes)]
            for e, offs in zip(bucket.entries, bucket.offsets)
        ]

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A ``shape``/``dtype`` tensor at byte ``offset`` of the buffer."""
        if dtype not in self._typed:
            self._typed[dtype] = self.t.view(dtype)
        numel = _nbytes(shape, dtype) // dtype.itemsize
        return self._typed[dtype].narrow(0, offset // dtype.itemsize, numel).view(shape)

    def hand_out(self, t: torch.Tensor) -> torch.Tensor:
        self._handed.append(weakref.ref(t))
        return t

    def released(self) -> bool:
        """True when no tensor handed out is alive any more (strict: the last one counts too)."""
        alive = any(r() is not None for r in self._handed)
        if not alive:
            self._handed.clear()
        return not alive

    def kept(self) -> int:
        """Tensors of the last bucket the consumer still holds, not counting the last one handed out
        (normally still bound to the consumer's loop variable). Resets the tracking."""
        alive = sum(r() is not None for r in self._handed[:-1])
        self._handed.clear()
        return alive
