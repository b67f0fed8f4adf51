"""Process groups for the policy: TP x PP x DP (x EP for MoE) over gloo (CPU) or NCCL (CUDA), checked once.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). A single process started without a launcher gets a one-rank group on a free
local port, so tools and tests can use the same code path at TP=PP=1.

Rank order is Megatron's ``tp-cp-ep-dp-pp``: the TP ranks of a model replica are adjacent, then
data-parallel replicas, then pipeline stages.

Mixture-of-experts layers use a second grid over the same ranks of a pipeline stage:
``ETP x EP x EDP = TP x DP`` (expert tensor-parallel, expert-parallel and expert data-parallel
sizes, ETP fastest). EP ranks hold disjoint sets of experts; attention and every dense weight stay
on the TP x DP grid. With ``ETP x EP`` dividing TP the experts of a model replica lie inside its
TP group; otherwise expert-parallel groups span data-parallel replicas.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import socket
from dataclasses import dataclass

import torch

from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
"""Collective timeout: a rank that stops answering fails the job instead of hanging it."""

_OWNS_PROCESS_GROUP = False
_LAYOUT: ParallelLayout | None = None


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Where this rank sits in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size (``world_size / (tp * pp)``)."""
    vpp: int | None
    """Virtual pipeline (interleaved) chunks per pipeline rank, or None."""
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1
    """Expert-parallel size (MoE: experts split over this many ranks)."""
    etp: int = 1
    """Expert tensor-parallel size (each expert's MLP split over this many ranks)."""
    ep_rank: int = 0
    etp_rank: int = 0
    sequence_parallel: bool
    backend: str
    """``gloo`` or ``nccl``."""
    device: torch.device
    """Where this rank's tensors live (``cpu`` or ``cuda:LOCAL_RANK``)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def model_chunks_per_rank(self) -> int:
        return self.vpp or 1


def check_parallel_sizes(
    world_size: int,
    tp: int,
    pp: int,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    num_layers: int | None = None,
    *,
    vpp: int | None = None,
) -> int:
    """Validate a TP x PP layout for ``world_size`` ranks (and a model, when its sizes are given).

    Needs no ``torch.distributed``. Returns the data-parallel size. Raises ``ValueError`` listing
    every violated rule with all the numbers involved.
    """
    problems: list[str] = []
    for name, value in (("world_size", world_size), ("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if problems:
        raise ValueError("invalid parallel sizes: " + "; ".join(problems))
    if world_size % (tp * pp) != 0:
        problems.append(
            f"world size {world_size} is not divisible by tensor_model_parallel_size {tp} x "
            f"pipeline_model_parallel_size {pp} = {tp * pp} (data-parallel size would be "
            f"{world_size / (tp * pp):.3g}); launch a multiple of {tp * pp} processes or change TP/PP"
        )
    if num_heads is not None and num_heads % tp != 0:
        problems.append(f"num_attention_heads {num_heads} is not divisible by tensor_model_parallel_size {tp}")
    if num_kv_heads is not None and num_kv_heads % tp != 0:
        problems.append(
            f"num_key_value_heads {num_kv_heads} is not divisible by tensor_model_parallel_size {tp} "
            f"(each TP rank needs whole query groups); use a TP size dividing {num_kv_heads}"
        )
    if vpp is not None:
        if vpp < 1:
            problems.append(f"virtual_pipeline_model_parallel_size must be >= 1 or null, got {vpp}")
        elif vpp > 1 and pp < 2:
            problems.append(
                f"virtual_pipeline_model_parallel_size {vpp} needs pipeline_model_parallel_size > 1, got {pp}"
            )
    if num_layers is not None:
        stages = pp * (vpp or 1)
        if num_layers % stages != 0:
            problems.append(
                f"num_hidden_layers {num_layers} is not divisible by pipeline_model_parallel_size {pp}"
                + (f" x virtual_pipeline_model_parallel_size {vpp} = {stages}" if vpp else "")
            )
    if problems:
        raise ValueError(f"invalid parallel layout for world size {world_size}: " + "; ".join(problems))
    return world_size // (tp * pp)


def check_expert_parallel_sizes(world_size: int, tp: int, pp: int, ep: int, etp: int) -> None:
    """Validate the expert grid: ``ETP x EP`` must divide the ranks of one pipeline stage (``TP x DP``).

    Raises ``ValueError`` naming the fields and every number.
    """
    for name, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_stage = world_size // pp
    if per_stage % (ep * etp):
        raise ValueError(
            f"expert_tensor_parallel_size {etp} x expert_model_parallel_size {ep} = {ep * etp} does not divide the "
            f"{per_stage} ranks of a pipeline stage (world size {world_size} / pipeline_model_parallel_size {pp}; "
            f"tensor_model_parallel_size {tp} x data-parallel size {per_stage // tp}); choose EP x ETP dividing {per_stage}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    global _OWNS_PROCESS_GROUP
    if torch.distributed.is_initialized():
        actual = torch.distributed.get_backend()
        if actual != backend:
            logger.info("torch.distributed already initialised with backend %s (requested %s)", actual, backend)
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {missing} are not: launch with torchrun")
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    else:
        torch.distributed.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )
    _OWNS_PROCESS_GROUP = True


def init_parallel(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int | None = None,
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
    seed: int = 42,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelLayout:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups.

    ``backend=None`` picks ``nccl`` when CUDA is available, else ``gloo``. Without CUDA the
    Megatron-Core CPU compatibility patches are applied first. Seeds Python, NumPy and torch with
    ``seed`` on every rank, and Megatron's model-parallel RNG tracker (TP-rank-specific dropout
    streams). Calling it again with the same sizes returns the existing layout (``None`` for the
    expert sizes accepts whatever the existing layout has).

    ``expert_model_parallel_size`` (default 1) and ``expert_tensor_parallel_size`` (default: the TP
    size, as in Megatron) shape the expert grid of MoE models (see the module docstring).
    """
    global _LAYOUT
    from megatron.core import parallel_state

    from megatron_ghpo.policy.cpu_compat import apply_cpu_compat, cuda_available

    tp, pp, vpp = tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size
    if vpp == 1:
        vpp = None
    has_cuda = cuda_available()
    backend = backend or ("nccl" if has_cuda else "gloo")
    if backend == "nccl" and not has_cuda:
        raise ValueError("backend 'nccl' needs CUDA, which is not available here; use backend 'gloo' (or leave it unset)")
    if sequence_parallel:
        if not has_cuda:
            raise ValueError(
                "sequence_parallel=True needs CUDA and Transformer Engine (Megatron's local layer spec "
                "cannot shard LayerNorm/RMSNorm over the sequence); set parallel.sequence_parallel: false on CPU"
            )
        if tp < 2:
            raise ValueError(f"sequence_parallel=True needs tensor_model_parallel_size > 1, got {tp}")
    if _LAYOUT is not None:
        ep_differs = expert_model_parallel_size not in (None, _LAYOUT.ep)
        etp_differs = expert_tensor_parallel_size not in (None, _LAYOUT.etp)
        if (_LAYOUT.tp, _LAYOUT.pp, _LAYOUT.vpp, _LAYOUT.sequence_parallel) != (tp, pp, vpp, sequence_parallel) or ep_differs or etp_differs:
            raise RuntimeError(
                f"parallel state already initialised as TP={_LAYOUT.tp} PP={_LAYOUT.pp} VPP={_LAYOUT.vpp} "
                f"SP={_LAYOUT.sequence_parallel} EP={_LAYOUT.ep} ETP={_LAYOUT.etp}; call destroy_parallel() before "
                f"TP={tp} PP={pp} VPP={vpp} SP={sequence_parallel} EP={expert_model_parallel_size} ETP={expert_tensor_parallel_size}"
            )
        return _LAYOUT
    ep = 1 if expert_model_parallel_size is None else expert_model_parallel_size
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size

    world_size = int(os.environ.get("WORLD_SIZE", "1")) if not torch.distributed.is_initialized() else torch.distributed.get_world_size()
    check_parallel_sizes(world_size, tp, pp, vpp=vpp)
    check_expert_parallel_sizes(world_size, tp, pp, ep, etp)
    if not has_cuda:
        apply_cpu_compat()
    device = torch.device("cpu")
    if has_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)

    _init_process_group(backend, datetime.timedelta(seconds=timeout_s))
    world_size = torch.distributed.get_world_size()
    dp = check_parallel_sizes(world_size, tp, pp, vpp=vpp)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    _seed_everything(seed)
    _LAYOUT = ParallelLayout(
        world_size=world_size,
        rank=torch.distributed.get_rank(),
        tp=tp,
        pp=pp,
        dp=dp,
        vpp=vpp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep=ep,
        etp=etp,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
        sequence_parallel=sequence_parallel,
        backend=torch.distributed.get_backend(),
        device=device,
    )
    logger.debug("parallel layout: %s", _LAYOUT)
    return _LAYOUT


def _seed_everything(seed: int) -> None:
    from megatron.core import tensor_parallel

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for the policy itself
        pass
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def get_layout() -> ParallelLayout:
    """The layout set by :func:`init_parallel` (raises if it was not called)."""
    if _LAYOUT is None:
        raise RuntimeError("parallel state is not initialised: call megatron_ghpo.policy.parallel.init_parallel() first")
    return _LAYOUT


def is_initialized() -> bool:
    return _LAYOUT is not None


def destroy_parallel(*, destroy_process_group: bool = True) -> None:
    """Tear down Megatron's groups, and the default process group if :func:`init_parallel` created it
    (unless ``destroy_process_group=False``: then a later :func:`init_parallel` reuses it)."""
    global _LAYOUT, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _LAYOUT = None
    if not destroy_process_group:
        return
    if _OWNS_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
