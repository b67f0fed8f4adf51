"""Process-group plumbing for the trainer: rollout leaders, object broadcast, metric reduction.

Layout: each data-parallel replica (a TP x PP model-parallel group) has one *rollout leader*, its
lowest global rank. Only leaders run the rollout engine, the reward pool and the GHPO sampler; the
finished TrainBatch is broadcast to the other ranks of the replica. Leaders of different replicas
form the ``leaders`` group, over which GHPO's "any difficult group anywhere?" decision and the
step metrics are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(kw_only=True)
class TrainerGroups:
    rank: int
    world_size: int
    leader_rank: int
    """Global rank of this replica's rollout leader."""
    replica_group: Any
    """This replica's ranks (None when the replica is a single rank)."""
    leaders_group: Any
    """All leaders (None when there is one replica)."""
    dp_rank: int
    dp_size: int

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader_rank

    @property
    def is_logger(self) -> bool:
        return self.rank == 0


def build_groups(mp_ranks_of_replicas: list[list[int]], rank: int) -> TrainerGroups:
    """``mp_ranks_of_replicas[d]``: the global ranks of DP replica d. Collective: every rank calls it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    replica_group = leaders_group = None
    dp_rank, my_replica = 0, mp_ranks_of_replicas[0]
    for d, ranks in enumerate(mp_ranks_of_replicas):
        if rank in ranks:
            dp_rank, my_replica = d, ranks
    if dist.is_initialized():
        for ranks in mp_ranks_of_replicas:  # new_group is collective over the whole world
            g = dist.new_group(ranks=sorted(ranks)) if len(ranks) > 1 else None
            if rank in ranks:
                replica_group = g
        leaders = [min(r) for r in mp_ranks_of_replicas]
        lg = dist.new_group(ranks=leaders) if len(leaders) > 1 else None
        leaders_group = lg if rank in leaders else None
    return TrainerGroups(rank=rank, world_size=world, leader_rank=min(my_replica), replica_group=replica_group,
                         leaders_group=leaders_group, dp_rank=dp_rank, dp_size=len(mp_ranks_of_replicas))


def broadcast_object(obj: Any, groups: TrainerGroups) -> Any:
    """Send ``obj`` from the replica's leader to the replica's other ranks."""
    if groups.replica_group is None:
        return obj
    box = [obj if groups.is_leader else None]
    dist.broadcast_object_list(box, src=groups.leader_rank, group=groups.replica_group)
    return box[0]


def any_across_leaders(flag: bool, groups: TrainerGroups) -> bool:
    """True if ``flag`` is true on any leader (one all-reduce). Leaders only."""
    if groups.leaders_group is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups.leaders_group)
    return bool(t.item() > 0)


def gather_across_leaders(obj: Any, groups: TrainerGroups) -> list[Any]:
    """All-gather one picklable object from every leader (leaders only), in DP-rank order."""
    if groups.leaders_group is None:
        return [obj]
    out: list[Any] = [None] * groups.dp_size
    dist.all_gather_object(out, obj, group=groups.leaders_group)
    return out


def mean_across_leaders(metrics: dict[str, float], groups: TrainerGroups) -> dict[str, float]:
    """Average numeric metrics over replicas (leaders only); a key missing on a replica is averaged
    over the replicas that have it (e.g. a hint-ratio bucket seen on one rank only)."""
    if groups.leaders_group is None:
        return metrics
    gathered: list[dict[str, float] | None] = [None] * groups.dp_size
    dist.all_gather_object(gathered, metrics, group=groups.leaders_group)
    out: dict[str, float] = {}
    for key in sorted({k for m in gathered for k in m}):
        vals = [float(m[key]) for m in gathered if key in m]
        out[key] = sum(vals) / len(vals)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
