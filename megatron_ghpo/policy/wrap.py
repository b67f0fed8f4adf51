"""Turning bare ``GPTModel`` chunks into a trainable policy: DDP wrapper, optimizer, reference copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.policy.optimizer import OptimizerOptions, build_optimizer


def wrap_for_training(chunks: list, options: OptimizerOptions, params_dtype: torch.dtype):
    """``(ddp_chunks, optimizer, scheduler)``.

    Megatron's ``DistributedDataParallel`` owns the gradient buffers (fp32 accumulation) and the
    data-parallel reduction; ``finalize_model_grads`` also all-reduces the tied embedding/output
    gradients between the first and last pipeline stages, which is wrong without it. Parameters
    are broadcast from DP rank 0 so every replica starts identical.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=options.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # non-finite steps are skipped and counted, not raised
    )
    wrapped = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()
    optimizer, scheduler = build_optimizer(wrapped, options, params_dtype=params_dtype)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return wrapped, optimizer, scheduler


def build_reference(hf_config: Any, policy_chunks: list, build_kwargs: dict[str, Any]) -> list:
    """A frozen copy of the policy's current weights (same layout), for KL to the initial model."""
    from megatron_ghpo.policy.model import build_gpt_model

    ref = build_gpt_model(hf_config, **build_kwargs)
    with torch.no_grad():
        for r, p in zip(ref, policy_chunks):
            r.load_state_dict(p.state_dict(), strict=True)
    for r in ref:
        r.requires_grad_(False)
        r.eval()
    return ref


def import_hf_weights(model_chunks: list, hf_dir: str | Path, hf_config: Any) -> None:
    """Copy an HF folder's safetensors into this rank's shards, through the weight bridge's import."""
    try:
        from megatron_ghpo.bridge.hf_load import load_hf_weights
    except ImportError as exc:
        raise NotImplementedError(
            "loading Hugging Face safetensors into the policy needs megatron_ghpo.bridge.hf_load.load_hf_weights"
            f"(model_chunks, hf_dir, hf_config) ({exc}); convert with `megatron-ghpo convert hf-to-megatron` and pass "
            "init_checkpoint instead"
        ) from exc
    load_hf_weights(model_chunks, hf_dir, hf_config)
