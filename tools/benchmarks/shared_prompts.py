"""Train-step time with shared-prompt rows vs padding, on GRPO/GHPO-shaped batches.

A step of 16 prompts x G=8 completions (30-48 tokens) on the CPU demo's model shape (Qwen2, hidden
128, 4 layers) at TP=2 over two gloo processes, as in ``make demo``. Two batch mixes: GRPO-like (every
prompt 23 tokens) and GHPO-like (half of the groups hinted: 55-token prompts, the hint template and
a hint added). Three layouts of the same samples, timed side by side in the same processes
(interleaved, median of ``--steps`` after one warm-up): padding (length-grouped micro-batches of 32
sequences), shared-prompt rows of at most 256 tokens (``share_prompts``, the default row budget: rows
of 4 completions here), and one shared row per group (no row budget). Loss and gradients are the
same in all three (``tests/distributed/test_policy_parity.py``); only the work differs.

Prints a table, then ``shared_over_padded_ghpo_mix=X`` (train-step time, default row budget).
Usage: ``python tools/benchmarks/shared_prompts.py [--steps 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"model_type": "qwen2", "vocab_size": 384, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "initializer_range": 0.02}  # fmt: skip
GROUPS, G, UNHINTED, HINTED = 16, 8, 23, 55
LAYOUTS = {"padded": {}, "shared, rows <= 256 tokens": {"share_prompts": True},
           "shared, one row per group": {"share_prompts": True, "shared_row_tokens": None}}  # fmt: skip


def batch(hinted_groups: int, seed: int):
    import random

    from megatron_ghpo.records import TrainBatch, TrainSample

    rng = random.Random(seed)
    samples = []
    for g in range(GROUPS):
        prompt = [rng.randrange(3, MODEL["vocab_size"]) for _ in range(HINTED if g < hinted_groups else UNHINTED)]
        for _ in range(G):
            c = rng.randint(30, 48)
            samples.append(TrainSample(prompt_ids=prompt, completion_ids=[rng.randrange(3, MODEL["vocab_size"]) for _ in range(c)],
                                       advantage=rng.uniform(-1, 1), completion_mask=[1] * c))  # fmt: skip
    return TrainBatch(samples=samples)


def run_rank(args: dict) -> None:
    import torch

    from megatron_ghpo.policy.optimizer import OptimizerOptions
    from megatron_ghpo.policy.options import AlgorithmOptions, BatchingOptions, ParallelOptions
    from megatron_ghpo.policy.policy import MegatronPolicy

    torch.set_num_threads(1)
    policy = MegatronPolicy(
        MODEL, random_init=True, parallel=ParallelOptions(tensor_model_parallel_size=2, timeout_s=600),
        optimizer=OptimizerOptions(lr=1e-6), algorithm=AlgorithmOptions(compute_entropy=False),
    )  # fmt: skip
    mixes = {"GRPO-like (no hints)": batch(0, 1), "GHPO-like (8 of 16 groups hinted)": batch(GROUPS // 2, 2)}
    options = {name: BatchingOptions(micro_batch_size=32, group_by_length=True, **kw) for name, kw in LAYOUTS.items()}
    times: dict[tuple[str, str], list[float]] = {(m, lay): [] for m in mixes for lay in LAYOUTS}
    tokens: dict[tuple[str, str], tuple[float, float]] = {}
    for rep in range(args["steps"] + 1):
        for m, b in mixes.items():
            for lay in LAYOUTS:
                policy.batching = options[lay]
                t0 = time.perf_counter()
                report = policy.forward_backward(list(b.samples))
                policy.apply_update(report)
                if rep:  # the first round warms up
                    times[(m, lay)].append(time.perf_counter() - t0)
                tokens[(m, lay)] = (report["input_tokens"], report["padded_tokens"])
    if policy.rank == 0:
        rows = [{"mix": m, "layout": lay, "input_tokens": tokens[(m, lay)][0], "padded_tokens": tokens[(m, lay)][1],
                 "seconds": statistics.median(times[(m, lay)])} for m, lay in times]  # fmt: skip
        Path(args["out"]).write_text(json.dumps(rows))
    policy.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per layout (after one warm-up)")
    ns = ap.parse_args()
    from megatron_ghpo.bridge.launch import run_ranks

    out = Path(tempfile.mkdtemp(prefix="bench_shared_prompts_")) / "result.json"
    run_ranks("rank", {"steps": ns.steps, "out": str(out)}, 2, timeout_s=1200, threads_per_rank=1,
              entry=[sys.executable, str(Path(__file__).resolve())], quiet_rank0=True)  # fmt: skip
    rows = json.loads(out.read_text())
    base = {r["mix"]: r["seconds"] for r in rows if r["layout"] == "padded"}
    print(f"{GROUPS} prompts x G={G}, completions of 30-48 tokens, TP=2 (2 gloo processes x 1 thread), median of {ns.steps} steps")
    print(f"{'batch':36s} {'layout':28s} {'input tokens':>12s} {'padded':>8s} {'s/step':>8s} {'vs padded':>9s}")
    for r in rows:
        print(f"{r['mix']:36s} {r['layout']:28s} {r['input_tokens']:12.0f} {r['padded_tokens']:8.0f} {r['seconds']:8.3f} "
              f"{r['seconds'] / base[r['mix']]:9.3f}")  # fmt: skip
    ghpo = next(r for r in rows if r["mix"].startswith("GHPO") and r["layout"] == "shared, rows <= 256 tokens")
    print(f"shared_over_padded_ghpo_mix={ghpo['seconds'] / base[ghpo['mix']]:.3f}")
    return 0


if __name__ == "__main__":  # `shared_prompts.py rank ARGS_JSON` is one rank of the launch above
    sys.exit(run_rank(json.loads(sys.argv[2])) if sys.argv[1:2] == ["rank"] else main())
