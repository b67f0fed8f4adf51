"""Process-group plumbing for the trainer: rollout workers, object broadcast, metric reduction.

Layout: each data-parallel replica (a TP x PP model-parallel group) has one *leader*, its lowest
global rank, which builds the replica's TrainBatch and broadcasts it to the replica's other ranks;
leaders of different replicas form the ``leaders`` group (batch-level sums, step metrics).
*Rollout workers* generate, score and run the GHPO sampler: with ``rollout_workers: all`` every rank
(its colocated engine samples a consecutive share of its replica's prompts, and the shares are
gathered on the leader), else the leaders only. GHPO's "any difficult group anywhere?" decision and
the difficulty-memory exchange run over the workers' group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    replica_ranks: list[int] = field(default_factory=list)
    """Global ranks of this replica, ascending (the leader first)."""
    workers_group: Any = None
    """All rollout workers (None when there is one)."""
    all_ranks_roll_out: bool = False
    """True: every rank is a rollout worker; False: the leaders only."""

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader_rank

    @property
    def is_worker(self) -> bool:
        """This rank generates and runs the GHPO sampler."""
        return self.all_ranks_roll_out or self.is_leader

    @property
    def worker_share(self) -> tuple[int, int]:
        """(index, count) of this rank's share of its replica's prompts."""
        if not self.all_ranks_roll_out:
            return 0, 1
        return self.replica_ranks.index(self.rank), len(self.replica_ranks)

    @property
    def is_logger(self) -> bool:
        return self.rank == 0


def build_groups(mp_ranks_of_replicas: list[list[int]], rank: int, *, all_ranks_roll_out: bool = False) -> TrainerGroups:
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
    all_ranks_roll_out = all_ranks_roll_out and world > 1
    workers_group = (dist.group.WORLD if all_ranks_roll_out else leaders_group) if dist.is_initialized() else None
    return TrainerGroups(rank=rank, world_size=world, leader_rank=min(my_replica), replica_group=replica_group,
                         leaders_group=leaders_group, dp_rank=dp_rank, dp_size=len(mp_ranks_of_replicas),
                         replica_ranks=sorted(my_replica), workers_group=workers_group,
                         all_ranks_roll_out=all_ranks_roll_out)


def broadcast_object(obj: Any, groups: TrainerGroups) -> Any:
    """Send ``obj`` from the replica's leader to the replica's other ranks."""
    if groups.replica_group is None:
        return obj
    box = [obj if groups.is_leader else None]
    dist.broadcast_object_list(box, src=groups.leader_rank, group=groups.replica_group)
    return box[0]


def any_across_workers(flag: bool, groups: TrainerGroups) -> bool:
    """True if ``flag`` is true on any rollout worker (one all-reduce). Workers only."""
    if groups.workers_group is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups.workers_group)
    return bool(t.item() > 0)


def gather_across_workers(obj: Any, groups: TrainerGroups) -> list[Any]:
    """All-gather one picklable object from every rollout worker (workers only)."""
    if groups.workers_group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(groups.workers_group)
    dist.all_gather_object(out, obj, group=groups.workers_group)
    return out


def gather_to_leader(obj: Any, groups: TrainerGroups) -> list[Any] | None:
    """Every rank of the replica sends ``obj`` to its leader: the list in replica-rank order on the
    leader, None elsewhere."""
    if groups.replica_group is None:
        return [obj]
    out: list[Any] | None = [None] * len(groups.replica_ranks) if groups.is_leader else None
    dist.gather_object(obj, out, dst=groups.leader_rank, group=groups.replica_group)
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


def replica_barrier(groups: TrainerGroups) -> None:
    """Wait for every rank of this data-parallel replica."""
    if groups.replica_group is not None:
        dist.barrier(group=groups.replica_group)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
