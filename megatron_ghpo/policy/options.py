"""Option records for :class:`~megatron_ghpo.policy.policy.MegatronPolicy` (one per concern).

Each is a small ``kw_only`` dataclass whose ``__post_init__`` names the bad field, its value and
the fix. :mod:`megatron_ghpo.policy.from_config` fills them from the project's config tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ghpo.algo.losses import LOSS_TYPES


@dataclass(kw_only=True)
class ParallelOptions:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None = plain 1F1B."""
    sequence_parallel: bool = False
    """GPU with Transformer Engine only."""
    expert_model_parallel_size: int = 1
    """MoE models: ranks the experts of a layer are split over."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallelism inside an expert; None = the TP size."""
    seed: int = 42
    timeout_s: float = 1800.0
    """Collective timeout: a stalled rank fails the job after this long."""


@dataclass(kw_only=True)
class ModelOptions:
    bf16: bool = False
    """BF16 parameters with FP32 master weights in the optimizer; False = FP32 throughout."""
    transformer_impl: str = "auto"
    """``auto`` | ``local`` | ``transformer_engine``."""
    fp8: str | None = None
    """``None`` | ``hybrid`` | ``e4m3`` (Transformer Engine on a GPU with compute capability ≥ 8.9)."""
    fp8_recipe: str = "delayed"
    recompute: bool = False
    """Full activation recomputation, one layer per checkpoint."""
    make_vocab_size_divisible_by: int = 128

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass(kw_only=True)
class BatchingOptions:
    micro_batch_size: int = 1
    """Sequences per micro-batch when padding (each micro-batch padded to its longest sequence)."""
    max_tokens_per_micro_batch: int | None = None
    """Set to pack sequences into rows of at most this many tokens (one row per micro-batch)."""
    pad_token_id: int = 0
    """Filler id for padding positions (never attended by real tokens, never in the loss)."""
    group_by_length: bool = False
    """Padding only: fill micro-batches with the sequences sorted by length (less padding)."""
    share_prompts: bool = False
    """Rows of one prompt and several of its completions, which attend to it (local layer
    spec; see ``megatron_ghpo.policy.batching``). Same log-probs, loss and gradients as padding."""
    shared_row_tokens: int | None = 256
    """With ``share_prompts``: at most this many tokens per row (a row always holds one completion);
    a group longer than that takes several rows, each with the prompt. None: one row per group."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 2:
            raise ValueError(f"max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}: must be >= 2 or null")
        if self.shared_row_tokens is not None and self.shared_row_tokens < 2:
            raise ValueError(f"shared_row_tokens={self.shared_row_tokens}: must be >= 2 or null")
        if self.share_prompts and self.max_tokens_per_micro_batch is not None:
            raise ValueError("share_prompts and max_tokens_per_micro_batch (sequence packing) exclude each other; set one")


@dataclass(kw_only=True)
class AlgorithmOptions:
    loss_type: str = "bnpo"
    """``bnpo`` | ``grpo`` | ``dr_grpo`` | ``dapo`` (see ``megatron_ghpo.algo.losses``)."""
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    """KL coefficient; > 0 keeps a frozen reference model (the initial weights)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout; training log-probs use the same one."""
    max_completion_length: int | None = None
    """Needed by ``dr_grpo``."""
    loss_unit_size: int | None = None
    """``bnpo``'s normalisation unit: this many consecutive completions of a replica's step, in sample
    order (the config's ``per_device_train_batch_size``, the reference's micro-batch); None = one unit
    per replica. Independent of the micro-batch layout (``megatron_ghpo.algo.losses``)."""
    compute_entropy: bool = True
    """Report the policy entropy over completion tokens (one extra pass over the logits)."""

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: must be >= 0")
        if self.loss_unit_size is not None and self.loss_unit_size < 1:
            raise ValueError(f"loss_unit_size={self.loss_unit_size}: must be >= 1 or None")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its normaliser)")
