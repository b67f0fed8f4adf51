"""Megatron optimizer (Adam, optionally distributed), LR schedule, and the guarded update.

The update is skipped — and counted by the caller — when the loss or the global gradient norm is
not finite; the learning-rate schedule then does not advance either, so a skipped step leaves the
model, the optimizer state and the schedule exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

LR_DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass(kw_only=True)
class OptimizerOptions:
    """Adam + warm-up/decay schedule, in optimizer steps."""

    lr: float = 1e-6
    """Peak learning rate (reached at the end of warm-up)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables clipping; the norm is still computed and checked)."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    lr_decay_steps: int | None = None
    """Steps over which the LR decays to ``min_lr`` (the total number of optimizer steps); None = constant after warm-up."""
    lr_decay_style: str = "cosine"
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.lr_warmup_steps:
            raise ValueError(
                f"lr_decay_steps ({self.lr_decay_steps}) must exceed lr_warmup_steps ({self.lr_warmup_steps})"
            )
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")


def build_optimizer(model_chunks: list, options: OptimizerOptions, *, params_dtype: torch.dtype):
    """``(MegatronOptimizer, OptimizerParamScheduler)`` over DDP-wrapped ``model_chunks``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam",
        lr=options.lr,
        min_lr=options.min_lr,
        weight_decay=options.weight_decay,
        adam_beta1=options.adam_beta1,
        adam_beta2=options.adam_beta2,
        adam_eps=options.adam_eps,
        clip_grad=options.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=options.use_distributed_optimizer,
    )
    from megatron.core.optimizer import distrib_optimizer

    from megatron_ghpo.policy.cpu_compat import apply_torch_adam_checkpoint_fix

    if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):  # torch Adam: see the fix's docstring
        apply_torch_adam_checkpoint_fix()
    optimizer = get_megatron_optimizer(config, model_chunks)
    decay_steps = options.lr_decay_steps or (options.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if options.lr_warmup_steps > 0 else options.lr,
        max_lr=options.lr,
        min_lr=options.min_lr,
        lr_warmup_steps=options.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=options.lr_decay_style if options.lr_decay_steps else "constant",
        start_wd=options.weight_decay,
        end_wd=options.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def current_lr(optimizer) -> float:
    """Learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


@torch.no_grad()
def guarded_step(optimizer, scheduler, *, loss_finite: bool, clip_grad: float) -> tuple[bool, float]:
    """Apply one update unless the loss or the gradient norm is non-finite.

    Must be called on every rank (the gradient norm is a collective). Returns
    ``(updated, grad_norm)``; on a skip the gradients are discarded and the schedule stays put.
    """
    from megatron.core.optimizer import clip_grads

    found_inf = bool(optimizer.prepare_grads())
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not loss_finite or not math.isfinite(grad_norm):
        logger.warning(
            "skipping the optimizer update: loss %s, grad norm %s", "finite" if loss_finite else "NOT finite", grad_norm
        )
        optimizer.zero_grad()
        return False, grad_norm
    if clip_grad > 0:
        for leaf in _leaf_optimizers(optimizer):
            params = leaf.get_parameters()
            if params:
                # Looked up on the module at call time so the CPU compatibility wrapper applies.
                clip_grads.clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
    updated = bool(optimizer.step_with_ready_grads())
    if updated:
        scheduler.step(increment=1)
    return updated, grad_norm
