"""Step-time estimate of one GHPO/GRPO step: rollout, training, weight refit, gradient sync.

Stated assumptions (every number is a flag of ``megatron-ghpo plan``):

* training: ``6 · active params · tokens`` plus causal attention ``6 · 2 · L · S̄ · a·d`` per token
  (forward + backward), one extra forward with full recompute, one forward for reference
  log-probs when KL is on; run at ``mfu`` of the GPUs' dense bf16 peak; the 1F1B pipeline bubble
  ``(PP-1)/(M+PP-1)`` added on top;
* rollout decode is memory-bandwidth bound: each decoding step of an engine reads its weight shard
  once, and every active sequence reads its KV cache, at ``hbm_efficiency`` of the HBM bandwidth;
  an engine decodes until its longest completion ends (``max completion`` steps, once per wave
  when its KV cache holds only part of its sequences), sequences read KV for their mean length; a compute floor (``2 · active params`` per generated token at ``mfu``)
  applies when that is slower; prefill is compute bound at ``mfu``;
* tensor parallelism: two all-reduces of the ``[tokens, hidden]`` bf16 activations per layer in
  the forward, two in the backward (and two more in a full-recompute forward), ring cost
  ``2·(TP-1)/TP`` of the bytes over NVLink, not overlapped with compute;
* refit: every engine receives the full bf16 weights each step; the part held by other training
  ranks crosses NVLink when the model-parallel group fits in a node, InfiniBand otherwise;
* gradient sync: a ring all-reduce (or reduce-scatter + all-gather of parameters with the
  distributed optimizer) of the fp32 gradient buffer over the DP group.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ghpo.plan.shapes import active_params, total_params
from megatron_ghpo.policy.hf_arch import HFArch


@dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str = "H100-SXM-80GB"
    memory_gib: float = 80.0
    bf16_tflops: float = 989.0
    """Dense bf16 peak (H100 SXM)."""
    hbm_tbps: float = 3.35
    nvlink_gbps: float = 450.0
    """Per-GPU unidirectional NVLink bandwidth (GB/s)."""
    ib_gbps: float = 50.0
    """Per-GPU InfiniBand bandwidth (GB/s; 400 Gb/s NDR per GPU)."""
    gpus_per_node: int = 8


@dataclass(frozen=True, kw_only=True)
class Workload:
    prompts_per_step: int
    num_generations: int
    mean_prompt_length: float
    mean_completion_length: float
    max_completion_length: int
    hinted_fraction: float = 0.0
    """GHPO: share of groups generated a second time with a hint in the same step."""
    kl: bool = False

    @property
    def sequences(self) -> float:
        return self.prompts_per_step * self.num_generations * (1.0 + self.hinted_fraction)

    @property
    def tokens(self) -> float:
        return self.sequences * (self.mean_prompt_length + self.mean_completion_length)


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    mfu: float = 0.35
    hbm_efficiency: float = 0.7


@dataclass(frozen=True, kw_only=True)
class StepTime:
    rollout_s: float
    prefill_s: float
    decode_s: float
    train_s: float
    refit_s: float
    grad_sync_s: float
    train_flops: float

    @property
    def total_s(self) -> float:
        return self.rollout_s + self.train_s + self.refit_s + self.grad_sync_s


def kv_bytes_per_token(a: HFArch, bytes_per_element: int = 2) -> int:
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * bytes_per_element


def train_flops(a: HFArch, w: Workload, *, recompute_full: bool) -> float:
    """Model FLOPs of one step's training (forward + backward, + recompute / reference forwards)."""
    seq = w.mean_prompt_length + w.mean_completion_length
    per_token_fwd = 2 * active_params(a) + 2 * 2 * a.num_layers * (seq / 2) * a.num_heads * a.head_dim
    passes = 3 + (1 if recompute_full else 0) + (1 if w.kl else 0)
    return passes * per_token_fwd * w.tokens


def estimate(
    a: HFArch,
    w: Workload,
    *,
    tp: int,
    pp: int,
    dp: int,
    num_micro_batches: int,
    rollout_tp: int,
    recompute_full: bool,
    grad_bytes_per_rank: int,
    distributed_optimizer: bool,
    hw: Hardware,
    eff: Efficiency,
    decode_waves: int = 1,
) -> StepTime:
    """``decode_waves``: rounds an engine needs when its KV cache cannot hold all its sequences at once
    (each round reads the weights for its own longest completion)."""
    gpus = tp * pp * dp
    peak = hw.bf16_tflops * 1e12 * eff.mfu
    flops = train_flops(a, w, recompute_full=recompute_full)
    bubble = (pp - 1) / (num_micro_batches + pp - 1) if pp > 1 else 0.0
    train_s = flops / (gpus * peak) / (1.0 - bubble)
    if tp > 1:
        replica_tokens = w.tokens / dp
        all_reduces = (4 + (2 if recompute_full else 0)) * a.num_layers / pp
        tp_bytes = all_reduces * replica_tokens * a.hidden_size * 2 * 2 * (tp - 1) / tp
        train_s += tp_bytes / (hw.nvlink_gbps * 1e9)
    # rollout: gpus / rollout_tp engines share the sequences
    engines = gpus // rollout_tp
    seqs = w.sequences / engines
    weights = 2 * total_params(a) / rollout_tp
    kv_tok = kv_bytes_per_token(a) / rollout_tp
    bw = hw.hbm_tbps * 1e12 * eff.hbm_efficiency
    c, pl = w.mean_completion_length, w.mean_prompt_length
    kv_reads = seqs * kv_tok * (c * pl + c * c / 2)
    mem_s = (decode_waves * w.max_completion_length * weights + kv_reads) / bw
    compute_s = 2 * active_params(a) * seqs * c / rollout_tp / peak
    decode_s = max(mem_s, compute_s)
    prefill_s = 2 * active_params(a) * seqs * pl / rollout_tp / peak
    # refit: each GPU's engine needs (1 - 1/(tp·pp)) of the weights from other ranks
    model_group = tp * pp
    refit_bytes = 2 * total_params(a) / rollout_tp * (1 - 1 / model_group) if model_group > 1 else 0.0
    link = hw.nvlink_gbps if model_group <= hw.gpus_per_node else hw.ib_gbps
    refit_s = refit_bytes / (link * 1e9)
    # gradient sync over DP (ring: 2·(dp-1)/dp of the buffer)
    dp_link = hw.nvlink_gbps if gpus <= hw.gpus_per_node else hw.ib_gbps
    sync_bytes = 2 * (dp - 1) / dp * grad_bytes_per_rank if dp > 1 else 0.0
    if distributed_optimizer and dp > 1:  # reduce-scatter fp32 grads + all-gather 16-bit params
        sync_bytes = (dp - 1) / dp * grad_bytes_per_rank * (1 + 0.5)
    grad_s = sync_bytes / (dp_link * 1e9)
    return StepTime(rollout_s=prefill_s + decode_s, prefill_s=prefill_s, decode_s=decode_s, train_s=train_s,
                    refit_s=refit_s, grad_sync_s=grad_s, train_flops=flops)  # fmt: skip
