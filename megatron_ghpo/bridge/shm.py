"""Shared-memory transport of the weight export: CPU ranks of one machine (gloo).

The model-parallel group maps one bucket buffer in ``/dev/shm`` (created by its first rank,
unlinked as soon as every rank has mapped it, so nothing outlives the processes). The owning stage's TP ranks each copy *their own shard* straight into the shared
buffer (replicated tensors: TP rank 0), a barrier publishes it, and every rank reads the same
physical pages: no bytes cross a socket and no rank copies more than its shard. Before the buffer
is refilled, each rank copies out the tensors its consumer still holds and a barrier makes sure
every rank is done reading.

Routed experts (MoE) need every expert shard inside the group: expert tensor-parallel x
expert-parallel size must divide the TP size (:func:`experts_inside_tp`); then the ranks with TP
rank below ``EP x ETP`` hold each (expert-parallel rank, expert-TP rank) pair exactly once and
write their experts' shards.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch

from megatron_ghpo.bridge.buckets import Bucket, BucketBuffer
from megatron_ghpo.bridge.layout import TP_PARTITION_DIM
from megatron_ghpo.bridge.plan import Plan
from megatron_ghpo.bridge.transport import Groups, check_param, reclaim_handed_out, write_own_shard
from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

SHM_DIR = "/dev/shm"


def map_shared(g: Groups, nbytes: int) -> torch.Tensor | None:
    """Map one ``nbytes`` file of /dev/shm on every rank of the group (collective); None if any rank can't."""
    path = None
    if g.mp_rank == 0:
        try:
            if os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize >= 2 * nbytes:
                fd, path = tempfile.mkstemp(prefix="megatron_ghpo_bridge_", dir=SHM_DIR)
                os.ftruncate(fd, nbytes)
                os.close(fd)
        except OSError as exc:
            logger.info("no shared-memory bucket (%s): using the collective transport", exc)
            path = None
    box = [path]
    torch.distributed.broadcast_object_list(box, src=g.mp_ranks[0], group=g.mp_group)
    path = box[0]
    t = None
    if path is not None:
        try:
            t = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            logger.info("cannot map %s (%s): using the collective transport", path, exc)
    ok = torch.tensor([int(t is not None)])
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=g.mp_group)
    if path is not None and g.mp_rank == 0:
        os.unlink(path)  # every rank has mapped it (or given up): the pages live as long as the mappings
    return t if ok.item() else None


def experts_inside_tp(g: Groups) -> bool:
    """Whether the TP group of each stage holds every routed expert's shards (``EP x ETP`` divides TP).

    Megatron numbers a stage's ranks ``etp + ETP (ep + EP edp)`` on the expert grid and
    ``tp + TP dp`` on the dense one, so with ``EP x ETP`` dividing TP, TP rank ``t`` is expert rank
    ``(t mod ETP, t div ETP mod EP)``."""
    return g.tp % (g.ep * g.etp) == 0


def same_machine(g: Groups) -> bool:
    """Whether every rank of the model-parallel group runs on this machine (same kernel boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            me = (socket.gethostname(), f.read().strip())
    except OSError:
        me = (socket.gethostname(), f"unknown-boot-id-pid-{os.getpid()}")  # never equal: no sharing
    everyone: list = [None] * len(g.mp_ranks)
    torch.distributed.all_gather_object(everyone, me, group=g.mp_group)
    return all(x == me for x in everyone)


class SharedMemoryTransport:
    """One buffer in /dev/shm per model-parallel group; each rank writes only its shard."""

    name = "shm"

    def __init__(self, g: Groups, buf: BucketBuffer) -> None:
        self.g, self.buf = g, buf
        self.first = True

    def fill(self, bucket: Bucket, params: dict, plan: Plan, dtype: torch.dtype | None) -> BucketBuffer:
        g = self.g
        reclaim_handed_out(self.buf)
        if not self.first:  # every rank is done reading the previous bucket
            torch.distributed.barrier(group=g.mp_group)
        self.first = False
        if bucket.stage == g.pp_rank:
            for e, views in zip(bucket.entries, self.buf.entry_views(bucket, dtype)):
                if e.ep_owner is not None:  # a routed expert: its owner's expert-TP ranks write their shards
                    if g.ep_rank == e.ep_owner and g.tp_rank < g.ep * g.etp:
                        write_own_shard(e, check_param(e, params.get((e.chunk, e.name))), views, plan, g.etp_rank)
                elif TP_PARTITION_DIM[e.layout] is not None or g.tp_rank == 0:
                    write_own_shard(e, check_param(e, params.get((e.chunk, e.name))), views, plan, g.tp_rank)
        torch.distributed.barrier(group=g.mp_group)
        return self.buf
