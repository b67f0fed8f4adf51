"""Live export: HF-named full tensors from a TP x PP (x VPP) sharded Megatron model, in buckets.

This is what feeds the rollout engine after every optimizer step (``reload_weights``), and what
``convert megatron-to-hf`` writes to disk.

* **Plan** (:mod:`~megatron_ghpo.bridge.plan`): every parameter of every stage mapped to its HF
  names through the architecture's table; exchanged once over the pipeline group.
* **Buckets** (:mod:`~megatron_ghpo.bridge.buckets`): runs of parameters of one stage whose HF
  tensors fit in ``bucket_bytes``, laid out back to back in one buffer, in the output dtype.
* **Transport** (:mod:`~megatron_ghpo.bridge.transport`): how a bucket's tensors reach the ranks —
  TP shards assembled and the bucket passed along the pipeline by collectives, or, for CPU ranks on
  one machine, one shared-memory buffer each rank writes its shard into. The layout work (QKV
  de-interleaving per query group, gate/up split per TP shard, vocabulary padding dropped, dtype
  cast) happens in the single copy of each shard into its strided destination views.

``destination="all"``: every rank of the model-parallel group yields every tensor (each rank can
feed its colocated engine, or its share of an engine spanning the ranks). ``"first"``: only the
first rank of the group (TP 0, PP 0) yields (e.g. to write files); the others drive the
collectives and yield nothing. Data-parallel replicas export independently.

The yielded tensors live in the bucket buffer, which is reused for the next bucket (vLLM's
``load_weights`` copies each tensor into its parameters and drops it). Before a refill, any
yielded tensor the consumer still holds is moved onto a private copy of its data
(:meth:`~megatron_ghpo.bridge.buckets.BucketBuffer.reclaim`), so kept tensors are never
overwritten; a normal loop holds only its loop variable, and each bucket yields its smallest
tensor last. (Views the consumer derived from a yielded tensor are not tracked: copy those.)

Extra memory per rank: one bucket buffer of ``max(bucket_bytes, largest parameter's HF
tensors)`` (shared by the ranks of a machine with ``shm``), plus, with the collective transport,
one TP shard in the model dtype while a parameter is assembled (not for shards received in
place), plus whatever the consumer keeps. Never a copy of the model.

Every rank of the model-parallel group must drive the iterator to the end, in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch

from megatron_ghpo.bridge.buckets import bucket_capacity, largest_tensor_bytes, plan_buckets  # noqa: F401  (re-exported)
from megatron_ghpo.bridge.plan import Plan, build_plan, local_parameters
from megatron_ghpo.bridge.transport import Groups, TransportName, make_transport

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024

Destination = Literal["all", "first"]


def _device_of(model_chunks: list[torch.nn.Module]) -> torch.device:
    for chunk in model_chunks:
        for p in chunk.parameters():
            return p.device
    return torch.device("cpu")


def export_hf_weight_buckets(
    model_chunks: list[torch.nn.Module],
    hf_config: Any,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    destination: Destination = "all",
    transport: TransportName = "auto",
    keep_buffer: bool = False,
    plan: Plan | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of ``(hf_name, full_tensor)``, one list per bucket (see the module docstring).

    ``model_chunks``: this rank's chunks (``build_gpt_model`` output, DDP-wrapped or not).
    ``hf_config``: the HF config the model was built from (folder, dict or ``PretrainedConfig``).
    ``dtype``: output dtype (None keeps each parameter's). ``destination``: ``"all"`` or ``"first"``.
    ``transport``: ``"auto"`` (shared memory for CPU ranks of one machine, else collectives),
    ``"collective"`` or ``"shm"``. ``keep_buffer``: keep the bucket buffer for the next export (saves
    allocating and page-faulting it every optimizer step, costs one bucket of memory in between;
    ``megatron_ghpo.bridge.transport.release_kept_buffers()`` frees it). ``plan``: a plan from
    :func:`~megatron_ghpo.bridge.plan.build_plan` to reuse (building one is a collective). Tensors
    are valid until the next bucket.
    """
    if destination not in ("all", "first"):
        raise ValueError(f"destination must be 'all' or 'first', got {destination!r}")
    plan = plan if plan is not None else build_plan(model_chunks, hf_config)
    g = Groups()
    buckets = plan_buckets(plan, bucket_bytes, dtype)
    if not buckets:
        return
    params = local_parameters(model_chunks)
    capacity = bucket_capacity(plan, bucket_bytes, dtype)
    mover = make_transport(transport, g, capacity, _device_of(model_chunks), destination, keep_buffer=keep_buffer)
    receives = destination == "all" or (g.tp_rank == 0 and g.pp_rank == 0)
    with torch.no_grad():
        for bucket in buckets:
            buf = mover.fill(bucket, params, plan, dtype)
            if not receives:
                continue
            out = [(n, buf.hand_out(buf.view(o, s, dt))) for n, o, s, dt in bucket.yield_order(dtype)]
            yield out
            out.clear()
            del buf


def export_hf_weights(
    model_chunks: list[torch.nn.Module],
    hf_config: Any,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    destination: Destination = "all",
    transport: TransportName = "auto",
    keep_buffer: bool = False,
    plan: Plan | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` one at a time; same arguments as :func:`export_hf_weight_buckets`.

    Each HF state-dict key of the model appears exactly once (no ``lm_head.weight`` when tied);
    vocabulary padding is removed. This is what the rollout engine's ``reload_weights`` consumes.
    """
    for bucket in export_hf_weight_buckets(
        model_chunks, hf_config, bucket_bytes=bucket_bytes, dtype=dtype, destination=destination,
        transport=transport, keep_buffer=keep_buffer, plan=plan,
    ):  # fmt: skip
        while bucket:
            yield bucket.pop(0)
