"""``megatron-ghpo plan``: per-GPU memory and step time of GHPO/GRPO layouts, ranked, on H100s by default.

Defaults follow the GHPO recipe (``examples/qwen2.5-math-7b/ghpo.yaml``): 8 completions per prompt,
2048-token prompts and completions, 8 sequences per micro-batch, bf16, full recompute (gradient
checkpointing), vLLM colocated at 0.75 GPU memory utilisation, 112 prompts (896 completions) per
optimizer step.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ghpo.plan.layouts import GIB, Plan, RunSpec, enumerate_layouts, plan_layout
from megatron_ghpo.plan.shapes import load_model_config, preset_names, total_params
from megatron_ghpo.plan.timing import Efficiency, Hardware, Workload


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _number(low: float, *, inclusive: bool, high: float | None = None):
    """An argparse type: a float ``> low`` (``>= low`` when ``inclusive``), at most ``high``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (v < low if inclusive else v <= low) or (high is not None and v > high):
            bounds = f"{'[' if inclusive else '('}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {v:g}")
        return v

    return parse


_positive_float = _number(0.0, inclusive=False)
_fraction = _number(0.0, inclusive=False, high=1.0)
_nonneg_float = _number(0.0, inclusive=True)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="per-GPU memory and step time of parallel layouts (no GPU needed)",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help=f"preset ({', '.join(preset_names())}) or path to an HF config.json")
    g = p.add_argument_group("cluster and layout (unset TP/PP/DP/EP: every valid value is tried)")
    g.add_argument("--nodes", type=_positive_int, default=1)
    g.add_argument("--gpus-per-node", type=_positive_int, default=8)
    for flag in ("tp", "pp", "dp", "ep"):
        g.add_argument(f"--{flag}", type=_positive_int, default=None, help=f"fix the {flag.upper()} size")
    g.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (TE)")
    b = p.add_argument_group("batch (the recipe's per-step numbers)")
    b.add_argument("--prompts-per-step", type=_positive_int, default=112, help="prompts per optimizer step")
    b.add_argument("--num-generations", type=_positive_int, default=8, help="completions per prompt (G)")
    b.add_argument("--max-prompt-length", type=_positive_int, default=2048, help="memory is sized for this")
    b.add_argument("--max-completion-length", type=_positive_int, default=2048, help="memory and decode steps")
    b.add_argument("--mean-prompt-length", type=_positive_float, default=None, help="for time (default: the max)")
    b.add_argument("--mean-completion-length", type=_positive_float, default=None, help="for time (default: the max)")
    b.add_argument("--micro-batch", type=_positive_int, default=8, help="sequences per micro-batch")
    b.add_argument("--hinted-fraction", type=_nonneg_float, default=0.0,
                   help="GHPO: share of groups generated again with a hint in the same step")
    t = p.add_argument_group("training")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--recompute", choices=("none", "selective", "full"), default="full")
    t.add_argument("--no-entropy", action="store_true", help="the loss does not compute the policy entropy")
    t.add_argument("--kl", action="store_true", help="beta > 0: a frozen reference model and its forward pass")
    r = p.add_argument_group("rollout engine")
    r.add_argument("--rollout", choices=("colocated", "none"), default="colocated",
                   help="vLLM inside the training GPUs, or elsewhere (server mode: not on these GPUs)")
    r.add_argument("--vllm-gpu-memory-utilization", type=_fraction, default=0.75)
    r.add_argument("--vllm-sleep", action="store_true", help="engine sleeps (frees KV, offloads weights) while training")
    r.add_argument("--rollout-tp", type=_positive_int, default=1, help="tensor parallel size of each engine")
    r.add_argument("--vllm-workspace-gib", type=_nonneg_float, default=2.0, help="vLLM activations, CUDA graphs")
    h = p.add_argument_group("hardware and efficiency")
    h.add_argument("--gpu-memory-gib", type=_positive_float, default=80.0)
    h.add_argument("--gpu-tflops", type=_positive_float, default=989.0, help="dense bf16 peak per GPU")
    h.add_argument("--hbm-tbps", type=_positive_float, default=3.35)
    h.add_argument("--nvlink-gbps", type=_positive_float, default=450.0, help="GB/s per GPU, one direction")
    h.add_argument("--ib-gbps", type=_positive_float, default=50.0, help="GB/s per GPU")
    h.add_argument("--mfu", type=_fraction, default=0.35, help="model FLOPs utilisation of training and prefill")
    h.add_argument("--hbm-efficiency", type=_fraction, default=0.7, help="share of HBM bandwidth decode reaches")
    h.add_argument("--overhead-gib", type=_nonneg_float, default=4.0, help="CUDA context, NCCL, fragmentation")
    p.add_argument("--top", type=_positive_int, default=12, help="rows of each table")
    p.set_defaults(func=run_plan)
    return p


def _specs(args: argparse.Namespace) -> tuple[RunSpec, Hardware, Efficiency]:
    if args.mean_prompt_length is not None and args.mean_prompt_length > args.max_prompt_length:
        raise ValueError(f"--mean-prompt-length {args.mean_prompt_length:g} exceeds --max-prompt-length {args.max_prompt_length}")
    if args.mean_completion_length is not None and args.mean_completion_length > args.max_completion_length:
        raise ValueError(f"--mean-completion-length {args.mean_completion_length:g} exceeds "
                         f"--max-completion-length {args.max_completion_length}")  # fmt: skip
    w = Workload(prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                 mean_prompt_length=args.mean_prompt_length or args.max_prompt_length,
                 mean_completion_length=args.mean_completion_length or args.max_completion_length,
                 max_completion_length=args.max_completion_length, hinted_fraction=args.hinted_fraction, kl=args.kl)  # fmt: skip
    run = RunSpec(workload=w, micro_batch=args.micro_batch, max_prompt_length=args.max_prompt_length,
                  max_completion_length=args.max_completion_length, bf16=args.bf16,
                  distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
                  sequence_parallel=args.sequence_parallel, compute_entropy=not args.no_entropy,
                  colocated=args.rollout == "colocated", sleep_mode=args.vllm_sleep,
                  vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                  vllm_workspace_gib=args.vllm_workspace_gib, rollout_tp=args.rollout_tp,
                  overhead_gib=args.overhead_gib)  # fmt: skip
    hw = Hardware(memory_gib=args.gpu_memory_gib, bf16_tflops=args.gpu_tflops, hbm_tbps=args.hbm_tbps,
                  nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps, gpus_per_node=args.gpus_per_node)  # fmt: skip
    return run, hw, Efficiency(mfu=args.mfu, hbm_efficiency=args.hbm_efficiency)


def rank_plans(plans: list[Plan]) -> list[Plan]:
    """Fitting layouts by estimated step time, then by memory."""
    return sorted((p for p in plans if p.fits), key=lambda p: (p.time.total_s, p.need_bytes))


def make_plans(args: argparse.Namespace):
    from megatron_ghpo.policy.hf_arch import hf_arch

    label, config = load_model_config(args.model)
    try:
        arch = hf_arch(config)
    except NotImplementedError as exc:
        raise ValueError(f"--model {args.model}: {exc}") from None
    run, hw, eff = _specs(args)
    gpus = args.nodes * args.gpus_per_node
    if args.tp and args.tp > args.gpus_per_node:
        raise ValueError(f"--tp {args.tp} spans more than one node (--gpus-per-node {args.gpus_per_node})")
    given = [(f, getattr(args, f)) for f in ("tp", "pp", "dp") if getattr(args, f)]
    product = 1
    for _, v in given:
        product *= v
    if gpus % product or (len(given) == 3 and product != gpus):
        sizes = " x ".join(f"--{f} {v}" for f, v in given)
        raise ValueError(f"{sizes} = {product} does not fit --nodes {args.nodes} x --gpus-per-node "
                         f"{args.gpus_per_node} = {gpus} GPUs")  # fmt: skip
    if args.ep and arch.moe is None and args.ep > 1:
        raise ValueError(f"--ep {args.ep}: {label} is a dense model (no experts)")
    layouts = enumerate_layouts(arch, gpus, args.gpus_per_node, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep)
    plans = [plan_layout(arch, run, hw, eff, tp=t, pp=p, dp=d, ep=e) for t, p, d, e in layouts]
    return label, arch, run, hw, eff, plans


def _table(title: str, plans: list[Plan], run: RunSpec, gpus: int, *, rejected: bool):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in ("#", "TP", "PP", "DP", "EP", "µb/DP"):
        table.add_column(col, justify="right")
    if rejected:
        table.add_column("why not", overflow="fold")
        for i, p in enumerate(plans, 1):
            table.add_row(str(i), str(p.tp), str(p.pp), str(p.dp), str(p.ep), str(p.num_micro_batches or "-"), "; ".join(p.problems))
        return table
    for col in ("params", "grads", "optim", "activ", "vLLM", "peak GiB", "rollout s", "train s", "refit s", "step s", "tok/s/GPU"):
        table.add_column(col, justify="right")
    for i, p in enumerate(plans, 1):
        s, t = p.static, p.time
        tps = run.workload.tokens / t.total_s / gpus
        table.add_row(str(i), str(p.tp), str(p.pp), str(p.dp), str(p.ep), str(p.num_micro_batches),
                      f"{s.param_bytes / GIB:.1f}", f"{s.grad_bytes / GIB:.1f}", f"{s.optimizer_bytes / GIB:.1f}",
                      f"{p.peak.bytes / GIB:.1f}", f"{p.vllm_bytes / GIB:.1f}", f"{p.need_bytes / GIB:.1f}",
                      f"{t.rollout_s:.1f}", f"{t.train_s:.1f}", f"{t.refit_s:.2f}", f"{t.total_s:.1f}", f"{tps:,.0f}")  # fmt: skip
    return table


def run_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        label, arch, run, hw, eff, plans = make_plans(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gpus = args.nodes * args.gpus_per_node
    console = Console(width=200)
    w = run.workload
    console.print(
        f"[bold]{label}[/bold]: {total_params(arch) / 1e9:.2f}B parameters, {arch.num_layers} layers, hidden "
        f"{arch.hidden_size}, vocab {arch.vocab_size}{', MoE ' + str(arch.moe.num_experts) + 'x top-' + str(arch.moe.topk) if arch.moe else ''}; "
        f"{gpus} x {hw.name if hw.memory_gib == 80 else f'{hw.memory_gib:g} GiB GPU'}\n"
        f"step: {w.prompts_per_step} prompts x {w.num_generations} = {w.prompts_per_step * w.num_generations} completions"
        f"{f' (+{w.hinted_fraction:.0%} hinted)' if w.hinted_fraction else ''}, prompt <= {run.max_prompt_length} "
        f"(mean {w.mean_prompt_length:g}), completion <= {run.max_completion_length} (mean {w.mean_completion_length:g}), "
        f"micro batch {run.micro_batch}, recompute {run.recompute}, {'bf16' if run.bf16 else 'fp32'}, "
        f"{'distributed optimizer' if run.distributed_optimizer else 'replicated optimizer'}, "
        f"vLLM {'colocated at ' + format(run.vllm_gpu_memory_utilization, 'g') + (' (sleeps while training)' if run.sleep_mode else '') if run.colocated else 'not on these GPUs'}, "
        f"MFU {eff.mfu:g}, HBM efficiency {eff.hbm_efficiency:g}")  # fmt: skip
    ranked = rank_plans(plans)
    bad = [p for p in plans if not p.fits]
    if ranked:
        console.print(_table(f"layouts that fit, fastest first ({len(ranked)} of {len(plans)})", ranked[: args.top], run, gpus, rejected=False))
    if bad:
        bad.sort(key=lambda p: (p.need_bytes == 0, p.need_bytes))
        console.print(_table(f"rejected ({len(bad)} of {len(plans)})", bad[: args.top], run, gpus, rejected=True))
    if not plans:
        print("error: no TP x PP x DP layout of this model divides the GPU count", file=sys.stderr)
        return 2
    console.print("GiB per GPU, worst pipeline stage; 'activ' = largest transient of a training step; 'peak' = max of "
                  "the train and rollout phases incl. overhead. Estimates, not measurements (see megatron_ghpo/plan).")
    return 0 if ranked else 1
