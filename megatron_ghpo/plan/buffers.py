"""Parameter, gradient and optimizer bytes of one rank, as Megatron-Core 0.16 allocates them.

Mirrors the project's wrapping (:mod:`megatron_ghpo.policy.wrap`): Megatron ``DistributedDataParallel``
with ``grad_reduce_in_fp32=True`` and ``overlap_grad_reduce=False`` (one bucket per buffer, except
the tied embedding's own bucket under PP with the distributed optimizer), one buffer per
(parameter dtype, fp32 gradient) pair, expert-parallel weights in their own buffers over the
expert data-parallel group; ``get_megatron_optimizer`` with Adam.

* Distributed optimizer: each parameter starts at a multiple of 64 elements and each bucket ends at
  a multiple of ``lcm(dp, 128)`` (``_ParamAndGradBuffer``); parameters are remapped into a param
  buffer of that padded size; every DP rank owns ``bucket / dp`` consecutive elements of each
  bucket and keeps, for the parameter pieces inside its range, an fp32 master copy (16-bit
  parameters only; fp32 parameters are updated in place), Adam ``exp_avg`` and ``exp_avg_sq`` (fp32)
  and a 4-byte ``step`` per piece.
* Without it: no padding, full fp32 master copies of 16-bit parameters, full Adam state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ghpo.plan.shapes import ParamSpec

ADAM_STATES = 2
"""``exp_avg`` and ``exp_avg_sq``, fp32, one element per master element."""
STEP_BYTES = 4
"""torch Adam's per-parameter ``step`` (a float32 scalar tensor)."""


@dataclass(frozen=True, kw_only=True)
class Bucket:
    numel: int
    """Padded elements of the bucket."""
    params: tuple[tuple[ParamSpec, int, int], ...]
    """``(param, start, end)`` offsets inside the bucket."""


@dataclass(frozen=True, kw_only=True)
class Buffer:
    bytes_per_element: int
    """Parameter dtype size."""
    expert_parallel: bool
    dp: int
    """Size of the data-parallel group that shards it (expert DP for expert buffers)."""
    buckets: tuple[Bucket, ...]

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)


def build_buffers(params: list[ParamSpec], *, dp: int, expert_dp: int, distributed_optimizer: bool) -> list[Buffer]:
    """Megatron's ``_ParamAndGradBuffer`` layout for one model chunk's parameters."""
    groups: dict[tuple[bool, int], list[ParamSpec]] = {}
    for p in params:  # dense buffers first, then expert-parallel ones, each by dtype in first-seen order
        groups.setdefault((p.expert_parallel, p.bytes_per_element), []).append(p)
    ordered = [k for k in groups if not k[0]] + [k for k in groups if k[0]]
    return [_buffer(groups[k], k[1], k[0], expert_dp if k[0] else dp, distributed_optimizer) for k in ordered]


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def _buffer(params: list[ParamSpec], nbytes: int, expert: bool, dp: int, dist: bool) -> Buffer:
    end_divisor = math.lcm(dp, 128) if dist else 1
    buckets: list[Bucket] = []
    current: list[tuple[ParamSpec, int, int]] = []
    bucket_start = index = 0

    def close(end: int) -> int:
        nonlocal bucket_start, current
        padded = _pad(end, end_divisor)
        buckets.append(Bucket(numel=padded - bucket_start, params=tuple((p, s - bucket_start, e - bucket_start) for p, s, e in current)))
        bucket_start, current = padded, []
        return padded

    for p in reversed(params):  # Megatron walks parameters in reverse (backward order)
        if dist:
            index = _pad(index, 64)
        own_bucket = p.shared_embedding and dist
        if own_bucket and current:
            index = close(index)
        current.append((p, index, index + p.numel))
        index += p.numel
        if own_bucket:
            index = close(index)
    if current:
        close(index)
    return Buffer(bytes_per_element=nbytes, expert_parallel=expert, dp=dp, buckets=tuple(buckets))


@dataclass(frozen=True, kw_only=True)
class StaticBytes:
    """Bytes one rank holds for the model and its optimizer, whatever the batch."""

    param_numel: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    master_bytes: int
    """Of ``optimizer_bytes``: fp32 master copies."""
    adam_bytes: int
    """Of ``optimizer_bytes``: Adam moments and steps."""

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def static_bytes(
    chunks: list[list[ParamSpec]], *, dp: int, expert_dp: int, distributed_optimizer: bool, dp_rank: int = 0
) -> StaticBytes:
    """Parameter storage, fp32 gradient buffers and Adam state of DP rank ``dp_rank``'s model chunks."""
    param_bytes = grad_bytes = master = adam = numel = 0
    for params in chunks:
        numel += sum(p.numel for p in params)
        buffers = build_buffers(params, dp=dp, expert_dp=expert_dp, distributed_optimizer=distributed_optimizer)
        for buf in buffers:
            grad_bytes += 4 * buf.numel
            if distributed_optimizer:
                param_bytes += buf.bytes_per_element * buf.numel
            else:
                param_bytes += sum(buf.bytes_per_element * p.numel for b in buf.buckets for p, _, _ in b.params)
            for bucket in buf.buckets:
                rank = dp_rank % buf.dp
                lo, hi = (rank * bucket.numel // buf.dp, (rank + 1) * bucket.numel // buf.dp) if distributed_optimizer else (0, bucket.numel)
                for p, start, end in bucket.params:
                    owned = max(0, min(end, hi) - max(start, lo))
                    if owned == 0:
                        continue
                    if buf.bytes_per_element < 4:
                        master += 4 * owned
                    adam += ADAM_STATES * 4 * owned + STEP_BYTES
    return StaticBytes(param_numel=numel, param_bytes=param_bytes, grad_bytes=grad_bytes,
                       optimizer_bytes=master + adam, master_bytes=master, adam_bytes=adam)  # fmt: skip


def grad_buffer_bytes(chunks: list[list[ParamSpec]], *, dp: int, expert_dp: int, distributed_optimizer: bool) -> int:
    """fp32 gradient buffer bytes (what one all-reduce / reduce-scatter of the step moves per rank)."""
    return sum(4 * b.numel for params in chunks
               for b in build_buffers(params, dp=dp, expert_dp=expert_dp, distributed_optimizer=distributed_optimizer))  # fmt: skip
