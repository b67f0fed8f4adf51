"""How a bucket's HF tensors reach the ranks of a model-parallel group.

``collective`` (any backend; the one used with CUDA/NCCL or across hosts). Each rank owns a
bucket buffer. For a TP-partitioned parameter, TP rank ``r`` broadcasts its shard over the TP
group and every rank copies it into the strided destination views of
:func:`~megatron_ghpo.bridge.layout.shard_pairs`. A shard whose destination is one contiguous
run of the buffer in the same dtype is received in place; any other goes through one shard-sized
scratch tensor. (No all-gather: gloo's stages the whole output in a second internal buffer.) With
PP > 1 the owning stage then broadcasts the filled buffer over the pipeline group
(``destination="all"``) or sends it to pipeline rank 0 (``"first"``, TP rank 0 only).

A routed expert's parameter (MoE) is assembled the same way by the ranks of its owning
expert-parallel rank, over the expert tensor-parallel group; that rank then broadcasts the
expert's bytes of the buffer over the expert-parallel group, so every rank of the stage holds it
before the pipeline step. (Expert-parallel groups may span data-parallel replicas: every replica
then exports at the same time, as every rank drives the export anyway.)

``shm`` (CPU ranks of one machine, gloo): one shared-memory buffer; see :mod:`~megatron_ghpo.bridge.shm`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from megatron_ghpo.bridge.buckets import Bucket, BucketBuffer
from megatron_ghpo.bridge.layout import TP_PARTITION_DIM, shard_pairs
from megatron_ghpo.bridge.plan import Plan, PlanEntry
from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

TransportName = Literal["auto", "collective", "shm"]


class Groups:
    """Megatron's TP, PP and model-parallel groups of this rank, with global ranks by group rank."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.tp_group, self.pp_group, self.mp_group = (
            ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(), ps.get_model_parallel_group(),
        )  # fmt: skip
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.pp, self.pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.tp_ranks = torch.distributed.get_process_group_ranks(self.tp_group)
        self.pp_ranks = torch.distributed.get_process_group_ranks(self.pp_group)
        self.mp_ranks = torch.distributed.get_process_group_ranks(self.mp_group)
        self.mp_rank = self.mp_ranks.index(torch.distributed.get_rank())
        self.ep_group, self.etp_group = ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group()
        self.ep, self.ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        self.etp, self.etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        self.ep_ranks = torch.distributed.get_process_group_ranks(self.ep_group)
        self.etp_ranks = torch.distributed.get_process_group_ranks(self.etp_group)

    def shard_group(self, e: PlanEntry) -> tuple[int, int, list[int], Any]:
        """``(size, rank, global ranks, group)`` splitting ``e`` by its layout: ETP for experts, else TP."""
        if e.ep_owner is not None:
            return self.etp, self.etp_rank, self.etp_ranks, self.etp_group
        return self.tp, self.tp_rank, self.tp_ranks, self.tp_group


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def check_param(e: PlanEntry, param: torch.Tensor | None) -> torch.Tensor:
    if param is None or tuple(param.shape) != e.local_shape:
        raise RuntimeError(f"{e.name}: this rank's parameter is missing or has another shape than planned {e.local_shape}")
    return param.detach()


def write_own_shard(e: PlanEntry, local: torch.Tensor, hf: list[torch.Tensor], plan: Plan, shard_rank: int) -> None:
    """Copy this rank's shard of ``e`` into its places in the HF views ``hf`` (cast on the fly).

    ``shard_rank``: the rank in the group splitting ``e`` (TP, or expert TP for expert entries)."""
    rank = shard_rank if TP_PARTITION_DIM[e.layout] is not None else 0
    for loc, dst in shard_pairs(e.layout, local, hf, rank, plan.shard_size(e), plan.dims):
        dst.copy_(loc)


def _gather_entry(e: PlanEntry, local: torch.Tensor, hf: list[torch.Tensor], plan: Plan, g: Groups) -> None:
    """Collective transport: every rank of the group splitting ``e`` (TP, or expert TP) assembles all
    shards of ``e`` into ``hf``."""
    size, my_rank, ranks, group = g.shard_group(e)
    if TP_PARTITION_DIM[e.layout] is None or size == 1:
        write_own_shard(e, local, hf, plan, my_rank)
        return
    scratch: torch.Tensor | None = None
    for r in range(size):
        mine = r == my_rank
        shard = local if mine else torch.empty(e.local_shape, dtype=e.dtype, device="meta")
        pairs = shard_pairs(e.layout, shard, hf, r, size, plan.dims)
        if not pairs:
            continue
        loc, dst = pairs[0]
        if len(pairs) == 1 and loc.is_contiguous() and dst.is_contiguous() and dst.dtype == e.dtype:
            torch.distributed.broadcast(_as_bytes(loc if mine else dst), ranks[r], group=group)
            if mine:
                dst.copy_(loc)
            continue
        if mine:
            torch.distributed.broadcast(_as_bytes(local.contiguous()), ranks[r], group=group)
            src_pairs = pairs
        else:
            if scratch is None:
                scratch = torch.empty(e.local_shape, dtype=e.dtype, device=local.device)
            torch.distributed.broadcast(_as_bytes(scratch), ranks[r], group=group)
            src_pairs = shard_pairs(e.layout, scratch, hf, r, size, plan.dims)
        for loc, dst in src_pairs:
            dst.copy_(loc)


def entry_bytes_span(views: list[torch.Tensor], buf: torch.Tensor) -> torch.Tensor:
    """The bytes of ``buf`` from the first to the end of the last of ``views`` (one entry's HF tensors,
    laid out back to back in the bucket buffer)."""
    base = buf.untyped_storage().data_ptr() + buf.storage_offset()
    start = views[0].data_ptr() - base
    end = views[-1].data_ptr() + views[-1].numel() * views[-1].element_size() - base
    return buf.narrow(0, start, end - start)


def fill_entry(e: PlanEntry, views: list[torch.Tensor], params: dict, plan: Plan, g: Groups, buf: torch.Tensor) -> None:
    """Collective transport, on the owning stage: ``views`` (in ``buf``) receive the full HF tensors of ``e``.

    Expert entries: the owning expert-parallel rank's ETP group assembles them, then that rank
    broadcasts their bytes over the expert-parallel group."""
    if e.ep_owner is None:
        _gather_entry(e, check_param(e, params.get((e.chunk, e.name))), views, plan, g)
        return
    if g.ep_rank == e.ep_owner:
        _gather_entry(e, check_param(e, params.get((e.chunk, e.name))), views, plan, g)
    if g.ep > 1:
        torch.distributed.broadcast(entry_bytes_span(views, buf), g.ep_ranks[e.ep_owner], group=g.ep_group)


class CollectiveTransport:
    """Per-rank buffer; shards by TP broadcasts, buckets by PP broadcast (see the module docstring)."""

    name = "collective"

    def __init__(
        self, g: Groups, capacity: int, device: torch.device, destination: str, buf: BucketBuffer | None = None
    ) -> None:
        self.g, self.capacity, self.device, self.destination = g, capacity, device, destination
        self.buf = buf

    def fill(self, bucket: Bucket, params: dict, plan: Plan, dtype: torch.dtype | None) -> BucketBuffer:
        g = self.g
        if self.buf is None:
            self.buf = BucketBuffer.allocate(self.capacity, self.device)
        reclaim_handed_out(self.buf)
        if bucket.stage == g.pp_rank:
            for e, views in zip(bucket.entries, self.buf.entry_views(bucket, dtype)):
                fill_entry(e, views, params, plan, g, self.buf.t)
        payload = self.buf.t.narrow(0, 0, bucket.nbytes)
        if g.pp > 1 and self.destination == "all":
            torch.distributed.broadcast(payload, g.pp_ranks[bucket.stage], group=g.pp_group)
        elif g.pp > 1 and bucket.stage != 0 and g.tp_rank == 0:
            if g.pp_rank == bucket.stage:
                torch.distributed.send(payload, g.pp_ranks[0])
            elif g.pp_rank == 0:
                torch.distributed.recv(payload, g.pp_ranks[bucket.stage])
        return self.buf


_WARNED = False


def reclaim_handed_out(buf: BucketBuffer) -> None:
    """Copy out the tensors the consumer still holds before the buffer is overwritten (warn once if
    that is more than a small one: the consumer keeps tensors, and pays a copy for each)."""
    global _WARNED
    copied = buf.reclaim()
    if copied > 1 << 20 and not _WARNED:
        _WARNED = True
        logger.warning(
            "the consumer of the weight export keeps exported tensors (%.1f MiB of one bucket): they are copied out "
            "of the reused bucket buffer before it is refilled; copy only what you need and drop the rest",
            copied / 2**20,
        )


_KEPT_BUFFERS: dict[tuple, BucketBuffer] = {}
"""Bucket buffers kept between exports (``keep_buffer=True``), by transport, group, size and device."""


def release_kept_buffers() -> None:
    """Drop the bucket buffers kept between exports (their memory is freed once no tensor views them)."""
    _KEPT_BUFFERS.clear()


def _reusable(key: tuple, g: Groups | None) -> BucketBuffer | None:
    """The kept buffer for ``key``, its handed-out tensors copied out; with ``g`` (a shared buffer)
    only if every rank of the group kept it too (a collective, which also orders the reuse after
    every rank finished reading the previous export)."""
    buf = _KEPT_BUFFERS.get(key)
    if buf is not None:
        reclaim_handed_out(buf)
    if g is not None:
        flag = torch.tensor([int(buf is not None)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=g.mp_group)
        if not flag.item():
            _KEPT_BUFFERS.pop(key, None)
            return None
    return buf


def make_transport(
    name: TransportName, g: Groups, capacity: int, device: torch.device, destination: str, *, keep_buffer: bool = False
) -> Any:
    """``auto``: ``shm`` for CPU ranks of one machine on gloo with more than one rank, else ``collective``.

    ``keep_buffer``: reuse (and keep after the export) the bucket buffer, so repeated exports (one
    per optimizer step) skip allocating and page-faulting it; costs one bucket of memory between
    exports (:func:`release_kept_buffers` frees it).
    """
    if name not in ("auto", "collective", "shm"):
        raise ValueError(f"transport must be 'auto', 'collective' or 'shm', got {name!r}")
    from megatron_ghpo.bridge.shm import SHM_DIR, SharedMemoryTransport, experts_inside_tp, map_shared, same_machine

    shm_key = ("shm", tuple(g.mp_ranks), capacity, str(device))
    use_shm = (
        name != "collective" and len(g.mp_ranks) > 1 and device.type == "cpu"
        and torch.distributed.get_backend(g.mp_group) == "gloo"
    )  # fmt: skip
    if name == "shm" and use_shm and not experts_inside_tp(g):
        raise RuntimeError(
            f"transport='shm' shares one buffer per TP x PP group, but expert_tensor_parallel_size {g.etp} x "
            f"expert_model_parallel_size {g.ep} does not divide tensor_model_parallel_size {g.tp}: some experts live in "
            "other data-parallel replicas; use transport='collective' (or 'auto')"
        )
    use_shm = use_shm and experts_inside_tp(g)
    # Backend, device type and the parallel sizes are the same on every rank of the group, so this
    # branch is taken consistently; the steps inside are collective decisions.

    if use_shm and keep_buffer and (buf := _reusable(shm_key, g)) is not None:
        return SharedMemoryTransport(g, buf)
    if use_shm and same_machine(g):
        t = map_shared(g, capacity)
        if t is not None:
            buf = BucketBuffer(t)
            if keep_buffer:
                _KEPT_BUFFERS[shm_key] = buf
            return SharedMemoryTransport(g, buf)
    if name == "shm" and len(g.mp_ranks) > 1:
        raise RuntimeError(
            "transport='shm' needs CPU tensors, the gloo backend, every rank of the model-parallel group on this "
            f"machine and room in {SHM_DIR}; use transport='collective' (or 'auto')"
        )
    key = ("collective", tuple(g.mp_ranks), capacity, str(device))
    buf = _reusable(key, None) if keep_buffer else None
    if keep_buffer and buf is None:
        buf = _KEPT_BUFFERS[key] = BucketBuffer.allocate(capacity, device)
    return CollectiveTransport(g, capacity, device, destination, buf)
