"""The Megatron-Core policy: everything in the package that imports ``megatron.core``.

Modules (imported lazily, so importing this package stays cheap):

* ``cpu_compat`` — Megatron-Core's CUDA assumptions neutralised on CPU-only machines;
* ``parallel`` — TP x PP x DP process groups (gloo / NCCL), size checks;
* ``hf_arch`` / ``model`` — HF config -> ``TransformerConfig`` -> ``GPTModel`` chunks;
* ``logprobs`` — log-probs and entropy from vocabulary-parallel logits;
* ``batching`` / ``step`` / ``forward`` — micro-batches, Megatron's step contract, forward-only passes;
* ``optimizer`` / ``wrap`` / ``checkpoint`` — Megatron optimizer and schedule, DDP, distributed checkpoints;
* ``policy`` — :class:`MegatronPolicy`, the trainer's handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_ghpo.policy.policy import MegatronPolicy

__all__ = ["MegatronPolicy"]


def __getattr__(name: str):
    if name == "MegatronPolicy":
        from megatron_ghpo.policy.policy import MegatronPolicy

        return MegatronPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
