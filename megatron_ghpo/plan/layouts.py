"""One planned layout: per-GPU memory in the train and rollout phases, fit check, step time; and the
enumeration of every valid (TP, PP, DP, EP) for a GPU count."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ghpo.plan.activations import ActivationOptions, MicroBatchShape, Peak, step_peak
from megatron_ghpo.plan.buffers import StaticBytes, grad_buffer_bytes, static_bytes
from megatron_ghpo.plan.shapes import RankLayout, check_layout, padded_vocab, rank_params
from megatron_ghpo.plan.timing import Efficiency, Hardware, StepTime, Workload, estimate, kv_bytes_per_token
from megatron_ghpo.policy.hf_arch import HFArch

GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything but the layout: the batch, the engine and the options the memory depends on."""

    workload: Workload
    micro_batch: int
    max_prompt_length: int
    max_completion_length: int
    bf16: bool = True
    distributed_optimizer: bool = True
    recompute: str = "full"
    sequence_parallel: bool = False
    compute_entropy: bool = True
    colocated: bool = True
    sleep_mode: bool = False
    vllm_gpu_memory_utilization: float = 0.75
    vllm_workspace_gib: float = 2.0
    rollout_tp: int = 1
    overhead_gib: float = 4.0
    """CUDA context, NCCL buffers and allocator fragmentation per GPU."""
    make_vocab_size_divisible_by: int = 128


@dataclass(kw_only=True)
class Plan:
    tp: int
    pp: int
    dp: int
    ep: int
    problems: list[str] = field(default_factory=list)
    static: StaticBytes | None = None
    peak: Peak | None = None
    stage: int = 0
    """Pipeline stage of the worst rank."""
    vllm_bytes: int = 0
    kv_capacity_bytes: int = 0
    kv_needed_bytes: int = 0
    train_phase_bytes: int = 0
    rollout_phase_bytes: int = 0
    time: StepTime | None = None
    num_micro_batches: int = 0

    @property
    def need_bytes(self) -> int:
        return max(self.train_phase_bytes, self.rollout_phase_bytes)

    @property
    def fits(self) -> bool:
        return not self.problems


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def plan_layout(a: HFArch, run: RunSpec, hw: Hardware, eff: Efficiency, *, tp: int, pp: int, dp: int, ep: int = 1) -> Plan:
    """Memory and time of one layout; ``Plan.problems`` says why it is invalid or does not fit."""
    plan = Plan(tp=tp, pp=pp, dp=dp, ep=ep)
    plan.problems = check_layout(a, tp=tp, pp=pp, ep=ep)
    if ep > 1 and dp % ep:
        plan.problems.append(f"EP {ep} must divide DP {dp} (expert grid EP x TP inside TP x DP)")
    completions = run.workload.prompts_per_step * run.workload.num_generations
    if completions % (dp * run.micro_batch):
        plan.problems.append(
            f"{completions} completions per step are not divisible by DP {dp} x micro batch {run.micro_batch}")
    if run.colocated and (tp * pp * dp) % run.rollout_tp:
        plan.problems.append(f"rollout TP {run.rollout_tp} does not divide the {tp * pp * dp} GPUs")
    if plan.problems:
        return plan
    plan.num_micro_batches = completions // (dp * run.micro_batch)
    o = ActivationOptions(impl="te", recompute=run.recompute, bf16=run.bf16, sequence_parallel=run.sequence_parallel,
                          compute_entropy=run.compute_entropy)  # fmt: skip
    mb = MicroBatchShape(micro_batch=run.micro_batch, prompt_length=run.max_prompt_length,
                         completion_length=run.max_completion_length)  # fmt: skip
    vocab = padded_vocab(a.vocab_size, run.make_vocab_size_divisible_by, tp)
    expert_dp = dp // ep if ep > 1 else dp
    worst = None
    for stage in range(pp):
        params = rank_params(a, RankLayout(tp=tp, pp=pp, ep=ep, pp_rank=stage), bf16=run.bf16, spec="te",
                             make_vocab_size_divisible_by=run.make_vocab_size_divisible_by)  # fmt: skip
        st = static_bytes([params], dp=dp, expert_dp=expert_dp, distributed_optimizer=run.distributed_optimizer)
        grads = grad_buffer_bytes([params], dp=dp, expert_dp=expert_dp, distributed_optimizer=run.distributed_optimizer)
        pk = step_peak(a, mb, tp=tp, pp=pp, pp_rank=stage, num_micro_batches=plan.num_micro_batches,
                       padded_vocab=vocab, grad_buffer_bytes=grads, o=o)  # fmt: skip
        if worst is None or st.total + pk.bytes > worst[0].total + worst[1].bytes:
            worst = (st, pk, stage, grads)
    plan.static, plan.peak, plan.stage, grads = worst
    overhead = int(run.overhead_gib * GIB)
    w = run.workload
    reference = plan.static.param_bytes if w.kl else 0  # frozen reference copy of this rank's weights
    base = plan.static.total + overhead + reference
    if run.colocated:
        plan.vllm_bytes = int(run.vllm_gpu_memory_utilization * hw.memory_gib * GIB)
        engine_weights = 2 * _total(a) // run.rollout_tp
        plan.kv_capacity_bytes = plan.vllm_bytes - engine_weights - int(run.vllm_workspace_gib * GIB)
        engines = (tp * pp * dp) // run.rollout_tp
        per_seq = (run.max_prompt_length + run.max_completion_length) * kv_bytes_per_token(a) // run.rollout_tp
        # paged KV: sequences hold their actual length, so the mean lengths decide how many decode at once
        mean_seq = (w.mean_prompt_length + w.mean_completion_length) * kv_bytes_per_token(a) / run.rollout_tp
        plan.kv_needed_bytes = int(-(-w.sequences // engines) * mean_seq)
        if plan.kv_capacity_bytes < per_seq:
            plan.problems.append(
                f"vLLM gets {_gib(plan.vllm_bytes)} GiB (utilization {run.vllm_gpu_memory_utilization}) but needs "
                f"{_gib(engine_weights)} GiB weights + {run.vllm_workspace_gib} GiB workspace + "
                f"{_gib(per_seq)} GiB KV for one sequence: raise --rollout-tp or the utilization")
    plan.rollout_phase_bytes = base + plan.vllm_bytes
    plan.train_phase_bytes = base + plan.peak.bytes + (0 if run.sleep_mode else plan.vllm_bytes)
    limit = int(hw.memory_gib * GIB)
    if plan.need_bytes > limit:
        phase = "train" if plan.train_phase_bytes >= plan.rollout_phase_bytes else "rollout"
        s = plan.static
        parts = [f"optimizer {_gib(s.optimizer_bytes)} GiB", f"grads {_gib(s.grad_bytes)}", f"params {_gib(s.param_bytes)}"]
        if phase == "train":
            parts.append(f"activations {_gib(plan.peak.bytes)} ({plan.peak.event})")
        if phase == "rollout" or not run.sleep_mode:
            parts.append(f"vLLM {_gib(plan.vllm_bytes)}")
        parts.append(f"overhead {run.overhead_gib:g}")
        plan.problems.append(f"needs {plan.need_bytes / GIB:.2f} GiB > {hw.memory_gib:g} GiB ({phase} phase, stage "
                             f"{plan.stage}): " + ", ".join(parts))  # fmt: skip
    waves = 1
    if run.colocated and plan.kv_capacity_bytes > 0:
        waves = max(1, -(-plan.kv_needed_bytes // plan.kv_capacity_bytes))
    plan.time = estimate(a, w, tp=tp, pp=pp, dp=dp, num_micro_batches=plan.num_micro_batches,
                         rollout_tp=run.rollout_tp, recompute_full=run.recompute == "full",
                         grad_bytes_per_rank=grads, distributed_optimizer=run.distributed_optimizer,
                         hw=hw, eff=eff, decode_waves=waves)  # fmt: skip
    return plan


def _total(a: HFArch) -> int:
    from megatron_ghpo.plan.shapes import total_params

    return total_params(a)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(a: HFArch, gpus: int, gpus_per_node: int, *, tp: int | None = None, pp: int | None = None,
                      dp: int | None = None, ep: int | None = None) -> list[tuple[int, int, int, int]]:
    """Every (TP, PP, DP, EP) with TP x PP x DP = ``gpus``, TP within a node, the given sizes fixed."""
    out = []
    for t in ([tp] if tp else [d for d in _divisors(gpus) if d <= gpus_per_node]):
        for p in ([pp] if pp else _divisors(gpus // t) if gpus % t == 0 else []):
            if t * p == 0 or gpus % (t * p):
                continue
            d = gpus // (t * p)
            if dp and d != dp:
                continue
            eps = [ep] if ep else ([e for e in _divisors(d) if a.moe and a.moe.num_experts % e == 0] if a.moe else [1])
            out.extend((t, p, d, e) for e in eps)
    return out
