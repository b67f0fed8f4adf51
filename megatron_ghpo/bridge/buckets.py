"""Bucket planning and the reusable bucket buffer of the weight export (pure; no collectives).

The buffer holds ``capacity = max(bucket_bytes, largest parameter's HF tensors)`` bytes. A bucket
is a run of consecutive plan entries of one pipeline stage whose HF tensors, laid out back to
back (each aligned to :data:`ALIGN` bytes) in the output dtype, fit in the capacity; a parameter
is never split.

Tensors handed to the consumer are plain (non-view) tensors on the buffer's storage. Before the
buffer is refilled, :meth:`BucketBuffer.reclaim` moves every handed-out tensor that is still alive
onto a private copy of its data (``Tensor.set_``), so a consumer that keeps tensors never sees
them overwritten. A consumer iterating normally holds only the tensor bound to its loop variable;
each bucket is yielded smallest tensor last, so that copy is a norm weight or a bias.
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

    def yield_order(self, dtype: torch.dtype | None) -> list[tuple[str, int, tuple[int, ...], torch.dtype]]:
        """``(hf_name, offset, shape, dtype)`` of every tensor, plan order but the smallest last."""
        items = [
            (n, o, s, out_dtype(e, dtype))
            for e, offs in zip(self.entries, self.offsets)
            for n, o, s in zip(e.hf_names, offs, e.hf_shapes)
        ]
        smallest = min(range(len(items)), key=lambda i: _nbytes(items[i][2], items[i][3]))
        return items[:smallest] + items[smallest + 1 :] + [items[smallest]]


def out_dtype(entry: PlanEntry, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else entry.dtype


def entry_bytes(entry: PlanEntry, dtype: torch.dtype | None) -> int:
    """Bytes of the HF tensors of ``entry`` in a bucket buffer (aligned)."""
    return sum(_aligned(_nbytes(s, out_dtype(entry, dtype))) for s in entry.hf_shapes)


def bucket_capacity(plan: Plan, bucket_bytes: int, dtype: torch.dtype | None) -> int:
    """The buffer size: ``bucket_bytes``, or the largest parameter's aligned HF tensors if larger."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    return max([_aligned(bucket_bytes)] + [entry_bytes(e, dtype) for e in plan.entries if e.hf_names])


def plan_buckets(plan: Plan, bucket_bytes: int, dtype: torch.dtype | None) -> list[Bucket]:
    """Greedy packing in plan order up to :func:`bucket_capacity`; one stage per bucket."""
    capacity = bucket_capacity(plan, bucket_bytes, dtype)
    buckets: list[Bucket] = []
    for e in plan.entries:
        if not e.hf_names:
            continue
        size = entry_bytes(e, dtype)
        cur = buckets[-1] if buckets else None
        if cur is None or cur.stage != e.stage or cur.nbytes + size > capacity:
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
    """A reusable bucket buffer over a flat ``uint8`` tensor (see the module docstring)."""

    def __init__(self, t: torch.Tensor) -> None:
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(f"a bucket buffer is a flat uint8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        self.t = t
        self._handed: list[weakref.ref] = []

    @classmethod
    def allocate(cls, nbytes: int, device: torch.device) -> BucketBuffer:
        return cls(torch.empty(_aligned(nbytes), dtype=torch.uint8, device=device))

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape``/``dtype`` tensor on the buffer's storage at byte ``offset``.

        Not an autograd view (no ``_base``), so :meth:`reclaim` can move it to private storage.
        """
        if offset % dtype.itemsize or offset + _nbytes(shape, dtype) > self.t.numel():
            raise ValueError(f"{dtype} tensor {shape} at byte {offset} does not fit the {self.t.numel()}-byte buffer")
        storage = self.t.untyped_storage()
        base = self.t.storage_offset() + offset
        return torch.empty(0, dtype=dtype, device=self.t.device).set_(storage, base // dtype.itemsize, shape)

    def entry_views(self, bucket: Bucket, dtype: torch.dtype | None) -> list[list[torch.Tensor]]:
        """For each entry of ``bucket``, tensors on the buffer for its HF tensors."""
        return [
            [self.view(o, s, out_dtype(e, dtype)) for o, s in zip(offs, e.hf_shapes)]
            for e, offs in zip(bucket.entries, bucket.offsets)
        ]

    def hand_out(self, t: torch.Tensor) -> torch.Tensor:
        """Register ``t`` as given to the consumer (weakly) and return it."""
        self._handed.append(weakref.ref(t))
        return t

    def reclaim(self) -> int:
        """Move every handed-out tensor still alive onto a private copy; return the bytes copied."""
        copied = 0
        for ref in self._handed:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() == self.t.untyped_storage().data_ptr():
                t.set_(t.clone())
                copied += t.numel() * t.element_size()
        self._handed.clear()
        return copied
