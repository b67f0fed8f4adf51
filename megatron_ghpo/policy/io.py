"""Checkpoints, HF export and verification logits of :class:`~megatron_ghpo.policy.policy.MegatronPolicy`.

A mixin: it relies on the policy's ``chunks``, ``model_chunks``, ``optimizer``, ``scheduler``,
``layout``, ``arch``, ``hf_config``, ``vocab_size``, ``model_options``, ``iteration`` and
``skipped_steps``. Every method is collective over all ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class PolicyIO:
    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "hf_config": self.hf_config, "iteration": self.iteration,
                "skipped_steps": self.skipped_steps}  # fmt: skip

    def save_checkpoint(self, ckpt_dir: str | Path, *, optimizer_sharding: str = "dp_reshardable") -> None:
        """Model + optimizer + LR schedule (+ step counters) as a Megatron distributed checkpoint.

        ``optimizer_sharding``: ``dp_reshardable`` (fast; the optimizer state reloads at the same
        TP/PP/VPP) or ``fully_reshardable`` (gathered per DP group; reloads at any TP/PP)."""
        from megatron_ghpo.policy.checkpoint import save_checkpoint

        save_checkpoint(ckpt_dir, self.chunks, metadata=self.checkpoint_metadata(), optimizer=self.optimizer,
                        scheduler=self.scheduler, optimizer_sharding=optimizer_sharding)  # fmt: skip

    def load_checkpoint(self, ckpt_dir: str | Path, *, load_optimizer: bool = True) -> dict[str, Any]:
        """Load a checkpoint saved at any TP/PP (optimizer state: see ``policy.checkpoint``)."""
        from megatron_ghpo.policy.checkpoint import load_checkpoint

        meta = load_checkpoint(ckpt_dir, self.chunks, optimizer=self.optimizer, scheduler=self.scheduler,
                               load_optimizer=load_optimizer)  # fmt: skip
        self.iteration = int(meta.get("iteration", 0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        return meta

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, S, vocab]`` fp32 logits of ``tokens`` [B, S], on every rank (verification only)."""
        from megatron_ghpo.policy.forward import full_logits

        return full_logits(self.chunks, tokens, vocab_size=self.arch.vocab_size, device=self.layout.device)

    def export_hf_weights(self, *, bucket_bytes: int, dtype: torch.dtype | None = None, destination: str = "all"):
        """Iterator of ``(hf_name, tensor)`` through the weight bridge (collective; see ``bridge.export``)."""
        from megatron_ghpo.bridge.export import export_hf_weights

        return export_hf_weights(self.model_chunks, self.hf_config, bucket_bytes=bucket_bytes, dtype=dtype,
                                 destination=destination)  # fmt: skip

    def save_hf(self, out: str | Path, *, tokenizer_dir: str | Path, dtype: torch.dtype | None = None,
                bucket_bytes: int = 256 * 1024**2) -> None:
        """Write the current weights as an HF folder (safetensors + config + tokenizer files of
        ``tokenizer_dir``). Collective; data-parallel replica 0 exports (every replica when the
        experts are split over data-parallel ranks, EP > 1), global rank 0 writes."""
        from megatron_ghpo.bridge.checkpoint import write_hf_folder

        dtype = dtype or self.model_options.params_dtype
        if self.layout.dp_rank == 0 or self.layout.ep > 1:
            tensors = self.export_hf_weights(bucket_bytes=bucket_bytes, dtype=dtype, destination="first")
            if self.layout.rank == 0:
                write_hf_folder(tensors, out, tokenizer_dir, dtype=dtype)
            else:
                for _ in tensors:
                    pass
        torch.distributed.barrier()
