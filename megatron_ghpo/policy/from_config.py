"""Fill the policy's option records from the project config tree (``megatron_ghpo.config.Config``).

Kept apart from the policy so the policy stays testable with plain keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ghpo.policy.optimizer import OptimizerOptions
from megatron_ghpo.policy.options import AlgorithmOptions, BatchingOptions, ModelOptions, ParallelOptions

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}


def optimizer_options(cfg: Any, *, total_steps: int | None) -> OptimizerOptions:
    """Adam and LR-schedule options; ``total_steps`` (optimizer steps of the run) sizes warm-up and decay."""
    o = cfg.optimizer
    style = SCHEDULES[o.lr_scheduler_type]
    decays = style != "constant"
    if total_steps is None and cfg.training.max_steps > 0:
        total_steps = cfg.training.max_steps
    if total_steps is None and (decays or (o.warmup_ratio > 0 and o.warmup_steps == 0)):
        raise ValueError(
            f"lr_scheduler_type={o.lr_scheduler_type!r} / warmup_ratio={o.warmup_ratio} need the run's number of "
            "optimizer steps: pass total_steps= (or set training.max_steps)"
        )
    warmup = o.warmup_steps or (round(o.warmup_ratio * total_steps) if total_steps else 0)
    decay_steps = None
    if decays:
        if total_steps <= warmup:
            raise ValueError(f"{total_steps} optimizer steps leave no room to decay after {warmup} warm-up steps")
        decay_steps = total_steps
    return OptimizerOptions(
        lr=o.learning_rate, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_epsilon, clip_grad=o.max_grad_norm, lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps, lr_decay_style=style, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )  # fmt: skip


def policy_kwargs(cfg: Any, *, total_steps: int | None = None, mode: str = "rl") -> dict[str, Any]:
    """Keyword arguments of :class:`MegatronPolicy` (except the weights source) for ``cfg``."""
    p, m, t, a, r = cfg.parallel, cfg.model, cfg.training, cfg.algorithm, cfg.rollout
    packing = None
    if t.sequence_packing:
        packing = t.per_device_train_batch_size * (cfg.data.max_prompt_length + r.max_completion_length)
    return {
        "parallel": ParallelOptions(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            sequence_parallel=p.sequence_parallel, seed=t.seed,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        ),
        "model": ModelOptions(
            bf16=m.bf16, transformer_impl=m.transformer_impl, fp8=m.fp8, fp8_recipe=m.fp8_recipe,
            recompute=m.gradient_checkpointing, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        ),
        "optimizer": optimizer_options(cfg, total_steps=total_steps),
        "algorithm": AlgorithmOptions(
            loss_type=a.loss_type, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
            beta=a.beta if mode == "rl" else 0.0, temperature=r.temperature,
            max_completion_length=r.max_completion_length, loss_unit_size=t.per_device_train_batch_size,
        ),
        "batching": BatchingOptions(micro_batch_size=t.per_device_train_batch_size, max_tokens_per_micro_batch=packing,
                                    group_by_length=t.group_by_length, share_prompts=t.share_prompts,
                                    shared_row_tokens=t.shared_row_tokens),
    }  # fmt: skip


def weights_source(model_dir: str | Path) -> dict[str, Any]:
    """``source``/``init_checkpoint`` for a model folder: an HF folder, or a checkpoint from ``convert``."""
    from megatron_ghpo.policy.checkpoint import META_FILE, read_checkpoint_metadata

    model_dir = Path(model_dir)
    if (model_dir / META_FILE).is_file():
        return {"source": read_checkpoint_metadata(model_dir)["hf_config"], "init_checkpoint": model_dir}
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds neither config.json (HF model) nor {META_FILE} (Megatron checkpoint)")
    return {"source": str(model_dir)}
