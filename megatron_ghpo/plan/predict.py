"""Per-rank predictions in the form :mod:`megatron_ghpo.plan.measure` reads them back (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_ghpo.plan.activations import ActivationOptions, MicroBatchShape, Peak, step_peak
from megatron_ghpo.plan.buffers import StaticBytes, grad_buffer_bytes, static_bytes
from megatron_ghpo.plan.shapes import RankLayout, padded_vocab, rank_params
from megatron_ghpo.policy.hf_arch import HFArch, hf_arch


@dataclass(frozen=True, kw_only=True)
class PredictedRank:
    """The prediction of one rank: its static bytes and the step's transient peak (with what it holds)."""

    static: StaticBytes
    peak: Peak

    def value(self, key: str) -> int:
        """``param_numel``, ``param_bytes``, ``grad_bytes``, ``optimizer_bytes`` or ``activation_peak_bytes``."""
        return self.peak.bytes if key == "activation_peak_bytes" else getattr(self.static, key)


def predict_rank(
    hf_config: HFArch | dict[str, Any],
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    ep: int = 1,
    pp_rank: int = 0,
    dp_rank: int = 0,
    bf16: bool = True,
    distributed_optimizer: bool = True,
    micro_batch_size: int = 1,
    num_micro_batches: int = 1,
    prompt_length: int = 16,
    completion_length: int = 16,
    activations: ActivationOptions | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> PredictedRank:
    """Static bytes and the step's transient peak of one rank (``activations.impl`` picks the layer spec)."""
    a = hf_config if isinstance(hf_config, HFArch) else hf_arch(hf_config)
    o = activations or ActivationOptions(bf16=bf16)
    if o.bf16 != bf16:
        raise ValueError(f"activations.bf16={o.bf16} disagrees with bf16={bf16}")
    params = rank_params(a, RankLayout(tp=tp, pp=pp, ep=ep, pp_rank=pp_rank), bf16=bf16, spec=o.impl,
                         make_vocab_size_divisible_by=make_vocab_size_divisible_by)  # fmt: skip
    expert_dp = tp * dp // (tp * ep) if ep > 1 else dp
    static = static_bytes([params], dp=dp, expert_dp=expert_dp, distributed_optimizer=distributed_optimizer, dp_rank=dp_rank)
    grads = grad_buffer_bytes([params], dp=dp, expert_dp=expert_dp, distributed_optimizer=distributed_optimizer)
    mb = MicroBatchShape(micro_batch=micro_batch_size, prompt_length=prompt_length, completion_length=completion_length)
    peak = step_peak(a, mb, tp=tp, pp=pp, pp_rank=pp_rank, num_micro_batches=num_micro_batches,
                     padded_vocab=padded_vocab(a.vocab_size, make_vocab_size_divisible_by, tp),
                     grad_buffer_bytes=grads, o=o)  # fmt: skip
    return PredictedRank(static=static, peak=peak)
