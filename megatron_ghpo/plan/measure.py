"""Measure what the planner predicts, on the real Megatron policy of this process's rank.

Builds :class:`~megatron_ghpo.policy.policy.MegatronPolicy` (random weights, the project's own model
provider, DDP wrapper and Megatron optimizer), then reads back:

* parameter numel and bytes: the storages the parameters live in (with the distributed optimizer,
  Megatron's DDP remaps every parameter into one contiguous, padded buffer per dtype);
* gradient bytes: the DDP gradient buffers (``grad_data``, fp32 accumulation) of dense and expert
  parameters;
* optimizer bytes: every tensor the Megatron optimizer owns after one real step (fp32 master
  copies or their distributed-optimizer shards, Adam ``exp_avg``/``exp_avg_sq``, per-tensor
  ``step``), storages shared with the model's parameter or gradient buffers not counted;
* the activation peak: the most CPU memory held above the pre-step level during one
  ``forward_backward`` (all micro-batches of a step), from PyTorch's profiler memory events.

How the peak is measured: ``torch.profiler.profile(profile_memory=True)`` makes the CPU allocator
report every allocation and free, each with the allocator's running total of bytes allocated
while profiling. The peak of that running total is the peak of memory allocated *during* the
profiled call and still live at that moment, independent of the glibc heap (RSS would include
freed-but-retained pages and miss untouched ones). Frees of blocks allocated before profiling are
not reported, so the figure never undercounts.

Imports ``megatron_ghpo.policy`` (hence ``megatron.core``) only inside functions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class MeasuredRank:
    """What one rank of a real policy holds (bytes unless named otherwise)."""

    rank: int
    param_numel: int
    """Elements of this rank's parameters (sum of ``numel``)."""
    param_bytes: int
    """Bytes of the storages the parameters live in (padding of the DDP parameter buffer included)."""
    grad_bytes: int
    """Bytes of the DDP gradient buffers."""
    optimizer_bytes: int
    """Bytes of the optimizer's own tensors after one step."""
    activation_peak_bytes: int
    """Peak memory allocated during one ``forward_backward`` above the level before it."""


def _storage_key(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def _unique_storage_bytes(tensors, exclude: set[int] = frozenset()) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        ptr, nbytes = _storage_key(t)
        if ptr in exclude or ptr == 0:
            continue
        seen[ptr] = nbytes
    return sum(seen.values())


def static_bytes(policy: Any) -> dict[str, int]:
    """Parameter, gradient-buffer and optimizer bytes of a built (and stepped) policy."""
    import torch

    params = [p for c in policy.chunks for p in c.parameters()]
    param_ptrs = {_storage_key(p)[0] for p in params}
    grad_buffers = [b.grad_data for c in policy.chunks for b in (*c.buffers, *c.expert_parallel_buffers)]
    grad_ptrs = {_storage_key(g)[0] for g in grad_buffers}
    owned: list[torch.Tensor] = []
    leaves = getattr(policy.optimizer, "chained_optimizers", None) or [policy.optimizer]
    for leaf in leaves:
        inner = leaf.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                owned.append(p)
                owned.extend(v for v in inner.state.get(p, {}).values() if isinstance(v, torch.Tensor))
    return {
        "param_numel": sum(p.numel() for p in params),
        "param_bytes": _unique_storage_bytes(params),
        "grad_bytes": _unique_storage_bytes(grad_buffers),
        "optimizer_bytes": _unique_storage_bytes(owned, exclude=param_ptrs | grad_ptrs),
    }


def peak_allocated_during(fn) -> tuple[Any, int]:
    """``(fn(), peak bytes allocated while it ran and live at the peak)`` from profiler memory events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return result, peak


def synthetic_batch(*, num_sequences: int, prompt_length: int, completion_length: int, vocab_size: int, seed: int = 0):
    """A ``TrainBatch`` of equal-length random sequences (identical on every rank for the same seed)."""
    from megatron_ghpo.records import TrainBatch, TrainSample

    rng = random.Random(seed)
    samples = [
        TrainSample(
            prompt_ids=[rng.randrange(vocab_size) for _ in range(prompt_length)],
            completion_ids=[rng.randrange(vocab_size) for _ in range(completion_length)],
            advantage=rng.uniform(-1.0, 1.0),
            completion_mask=[1] * completion_length,
        )
        for _ in range(num_sequences)
    ]
    return TrainBatch(samples=samples)


def measure_rank(
    hf_config: dict[str, Any],
    *,
    tp: int = 1,
    pp: int = 1,
    bf16: bool = True,
    distributed_optimizer: bool = True,
    recompute: bool = False,
    micro_batch_size: int = 1,
    num_micro_batches: int = 1,
    prompt_length: int = 16,
    completion_length: int = 16,
    compute_entropy: bool = True,
    keep_process_group: bool = False,
) -> MeasuredRank:
    """Build the policy at this layout (on the ranks already launched), step once, then measure.

    Every rank of the launch calls this together. The first ``train_step`` allocates the Adam
    state; the profiled second step's ``forward_backward`` gives the activation peak.
    """
    import torch

    from megatron_ghpo.policy.optimizer import OptimizerOptions
    from megatron_ghpo.policy.options import AlgorithmOptions, BatchingOptions, ModelOptions, ParallelOptions
    from megatron_ghpo.policy.policy import MegatronPolicy

    policy = MegatronPolicy(
        hf_config,
        parallel=ParallelOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        model=ModelOptions(bf16=bf16, transformer_impl="local", recompute=recompute),
        optimizer=OptimizerOptions(use_distributed_optimizer=distributed_optimizer),
        algorithm=AlgorithmOptions(compute_entropy=compute_entropy),
        batching=BatchingOptions(micro_batch_size=micro_batch_size),
        random_init=True,
    )
    try:
        batch = synthetic_batch(
            num_sequences=micro_batch_size * num_micro_batches * policy.layout.dp,
            prompt_length=prompt_length,
            completion_length=completion_length,
            vocab_size=policy.arch.vocab_size,
        )
        share = batch.samples[policy.layout.dp_rank :: policy.layout.dp]
        from megatron_ghpo.records import TrainBatch

        mine = TrainBatch(samples=share)
        policy.train_step(mine)
        static = static_bytes(policy)
        torch.distributed.barrier()
        _, peak = peak_allocated_during(lambda: policy.forward_backward(list(mine.samples)))
        policy.optimizer.zero_grad()
        return MeasuredRank(rank=policy.rank, activation_peak_bytes=peak, **static)
    finally:
        policy.close(destroy_process_group=not keep_process_group)


def main(argv: list[str] | None = None) -> int:
    """One rank of a measurement launch: ``python -m megatron_ghpo.plan.measure SPEC_JSON OUT_DIR``.

    ``SPEC_JSON`` is a list of cases, each ``hf_config`` plus :func:`measure_rank`'s keyword
    arguments, measured one after the other in the same processes; each rank writes
    ``OUT_DIR/rank<r>.json``: a list of :class:`MeasuredRank` fields, one per case.
    """
    import argparse
    import json
    import os
    from pathlib import Path

    import torch

    parser = argparse.ArgumentParser(prog="python -m megatron_ghpo.plan.measure")
    parser.add_argument("spec_json", type=Path, help="list of cases (hf_config + measure_rank keywords)")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    cases = json.loads(args.spec_json.read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = []
    for i, case in enumerate(cases):
        case = dict(case)
        results.append(measure_rank(case.pop("hf_config"), keep_process_group=i < len(cases) - 1, **case))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{results[0].rank}.json").write_text(json.dumps([r.__dict__ for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
