"""Train-step throughput of the Megatron policy.

CPU (always): tokens/s of ``MegatronPolicy.train_step`` for a ~12M-parameter Qwen2-style model at
TP=1 (one process, two threads) and TP=2 (two gloo processes, one thread each), same global batch.
GPU (when CUDA is present): tokens/s and MFU of a ~1.1B Llama-style model with the Transformer
Engine layer spec in BF16, and in FP8 (hybrid, delayed scaling) on GPUs of compute capability ≥ 8.9.

Prints a table, then ``tp2_over_tp1_tokens_per_s=X`` (CPU) as the last line, or
``mfu_bf16=X`` when a GPU ran. Usage: ``python tools/benchmarks/train_step.py [--steps 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CPU_MODEL = {"model_type": "qwen2", "vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
                 "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 1024,
                 "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "initializer_range": 0.02}  # fmt: skip
GPU_MODEL = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False, "max_position_embeddings": 4096,
                 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "initializer_range": 0.02}  # fmt: skip
# Dense peak TFLOP/s (no sparsity) by device-name fragment: (BF16, FP8).
PEAK_TFLOPS = {"H100": (989.4, 1978.9), "H200": (989.4, 1978.9), "A100": (312.0, None)}


def matmul_flops_per_token(m: dict, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 x matmul parameters + 12 x layers x hidden x seq (attention)."""
    h, f, L, v = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    head = h // m["num_attention_heads"]
    qkv = h * (h + 2 * m["num_key_value_heads"] * head)
    per_layer = qkv + h * h + 3 * h * f
    return 6.0 * (L * per_layer + h * v) + 12.0 * L * h * seq_len


def run_rank(args: dict) -> None:
    """One rank: build the policy, run warm-up + timed train steps, rank 0 writes the result."""
    import random

    import torch

    from megatron_ghpo.policy.optimizer import OptimizerOptions
    from megatron_ghpo.policy.options import AlgorithmOptions, BatchingOptions, ModelOptions, ParallelOptions
    from megatron_ghpo.policy.policy import MegatronPolicy
    from megatron_ghpo.records import TrainBatch, TrainSample

    torch.set_num_threads(args["threads"])
    m = args["model"]
    policy = MegatronPolicy(
        m, random_init=True,
        parallel=ParallelOptions(tensor_model_parallel_size=args["tp"], timeout_s=600),
        model=ModelOptions(bf16=args["bf16"], fp8=args["fp8"], transformer_impl=args["impl"]),
        optimizer=OptimizerOptions(lr=1e-5),
        algorithm=AlgorithmOptions(compute_entropy=False),
        batching=BatchingOptions(micro_batch_size=args["micro_batch"]),
    )  # fmt: skip
    rng = random.Random(0)
    p, c = args["prompt"], args["completion"]
    samples = [
        TrainSample(prompt_ids=[rng.randrange(m["vocab_size"]) for _ in range(p)],
                    completion_ids=[rng.randrange(m["vocab_size"]) for _ in range(c)],
                    advantage=rng.uniform(-1, 1), completion_mask=[1] * c)
        for _ in range(args["sequences"])
    ]  # fmt: skip
    batch = TrainBatch(samples=samples)
    policy.train_step(batch)  # warm-up (allocations, kernel selection)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args["steps"]):
        metrics = policy.train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args["steps"]
    n_params = sum(q.numel() for chunk in policy.model_chunks for q in chunk.parameters())
    if policy.layout.rank == 0:
        tokens = args["sequences"] * (p + c - 1) * policy.layout.dp
        out = {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "params_rank0": n_params,
               "loss": metrics["train/loss"], "tokens_per_step": tokens}  # fmt: skip
        Path(args["out"]).write_text(json.dumps(out))
    policy.close()


def launch(name: str, *, world: int, threads: int, **kw) -> dict:
    from megatron_ghpo.bridge.launch import run_ranks

    out = Path(tempfile.mkdtemp(prefix="bench_train_step_")) / "result.json"
    args = dict(kw, threads=threads, out=str(out))
    run_ranks("rank", args, world, timeout_s=580, threads_per_rank=threads, entry=[sys.executable, str(Path(__file__).resolve())],
              quiet_rank0=True)  # fmt: skip
    result = json.loads(out.read_text())
    result["name"] = name
    return result


def cpu_rows(steps: int) -> list[dict]:
    common = {"model": CPU_MODEL, "bf16": False, "fp8": None, "impl": "local", "sequences": 16, "prompt": 64, "completion": 65,
                  "micro_batch": 4, "steps": steps}  # fmt: skip
    return [
        launch("cpu TP=1 (1 proc x 2 threads)", world=1, threads=2, tp=1, **common),
        launch("cpu TP=2 (2 procs x 1 thread)", world=2, threads=1, tp=2, **common),
    ]


def gpu_rows(steps: int) -> list[dict]:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), (None, None))  # unknown GPU: no MFU
    seq = 1024
    common = {"model": GPU_MODEL, "impl": "transformer_engine", "tp": 1, "sequences": 32, "prompt": 256, "completion": seq - 256 + 1,
                  "micro_batch": 4, "steps": steps}  # fmt: skip
    rows = [launch(f"{name} TE BF16", world=1, threads=8, bf16=True, fp8=None, **common)]
    if torch.cuda.get_device_capability() >= (8, 9):
        rows.append(launch(f"{name} TE FP8 hybrid", world=1, threads=8, bf16=True, fp8="hybrid", **common))
    flops = matmul_flops_per_token(GPU_MODEL, seq)
    for row in rows:
        row["tflops"] = flops * row["tokens_per_s"] / 1e12
        # MFU against the dense BF16 peak for both rows (the usual convention for FP8 training too).
        row["mfu"] = row["tflops"] / peak[0] if peak[0] else None
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--steps", type=int, default=3, help="timed train steps per configuration (after one warm-up)"
    )
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU rows (when CUDA is present)")
    ns = ap.parse_args()
    import torch

    rows = [] if ns.skip_cpu else cpu_rows(ns.steps)
    if torch.cuda.is_available():
        rows += gpu_rows(ns.steps)
    print(
        f"{'configuration':40s} {'params/rank0':>13s} {'tokens/step':>11s} {'s/step':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}"
    )
    for r in rows:
        tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"{r['name']:40s} {r['params_rank0'] / 1e6:12.1f}M {r['tokens_per_step']:11d} {r['seconds_per_step']:8.3f} "
              f"{r['tokens_per_s']:10.0f} {tf:>8s} {mfu:>6s}")  # fmt: skip
    gpu = [r for r in rows if r.get("mfu")]
    if gpu:
        print(f"mfu_bf16={gpu[0]['mfu']:.4f}")
    else:
        print(f"tp2_over_tp1_tokens_per_s={rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "rank":
        run_rank(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
