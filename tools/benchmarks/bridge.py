"""Weight-bridge export throughput vs a plain memory copy of the same bytes, on this machine.

Builds a randomly initialised Qwen2-style model of a few hundred MB (bf16) at TP=2 and at PP=2
(two local ranks each, gloo, one thread per rank), streams the full HF state dict to every rank
through :func:`megatron_ghpo.bridge.export.export_hf_weights` (the live weight-sync path), and in
the same processes times ``dst.copy_(src)`` of the same number of bytes (one thread, warm
destination). The export runs as the per-step weight sync does, with ``keep_buffer=True``: the
first call allocates the bucket buffer ("1st call" column), later calls reuse it (the "export"
column is the best of ``--repeats`` of those). Reports GB/s, the peak extra resident memory
during the exports, and the bucket size; the last line is ``ratio_vs_memcpy=X`` (export GB/s /
memcpy GB/s of the same rank, worst rank over the layouts).

    python tools/benchmarks/bridge.py [--hidden 1024 --layers 8 --vocab 32000 --bucket-mib 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def hf_config(args: argparse.Namespace) -> dict:
    return {
        "model_type": "qwen2", "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu",
    }  # fmt: skip


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rank_main(args: dict) -> None:
    """One rank: build, export ``repeats`` times (first is warm-up), memcpy the same bytes, report."""
    import torch

    from megatron_ghpo.bridge.export import export_hf_weights, largest_tensor_bytes
    from megatron_ghpo.bridge.plan import build_plan
    from megatron_ghpo.policy.model import build_gpt_model
    from megatron_ghpo.policy.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel(tensor_model_parallel_size=args["tp"], pipeline_model_parallel_size=args["pp"])
    cfg = args["config"]
    chunks = build_gpt_model(cfg, params_dtype=torch.bfloat16, transformer_impl="local")
    plan = build_plan(chunks, cfg)
    bucket = args["bucket_bytes"]
    nbytes = 2 * sum(math.prod(shape) for e in plan.entries for shape in e.hf_shapes)  # bf16 output
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm destination pages, as the kept bucket buffer is after the first export
    export_s, copy_s, peaks = [], [], []
    for i in range(args["repeats"] + 1):  # export and memcpy interleaved: both see the same machine load
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        torch.distributed.barrier()
        t0 = time.perf_counter()
        got = 0
        for _name, t in export_hf_weights(chunks, cfg, bucket_bytes=bucket, dtype=torch.bfloat16, plan=plan,
                                          keep_buffer=True, transport=args["transport"]):  # fmt: skip
            got += t.numel() * t.element_size()
        export_s.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM") - base)
        del t
        if got != nbytes:
            raise RuntimeError(f"exported {got} bytes, planned {nbytes}")
        if i:
            t0 = time.perf_counter()
            dst.copy_(src)
            copy_s.append(time.perf_counter() - t0)
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    report = {
        "rank": torch.distributed.get_rank(), "tp": args["tp"], "pp": args["pp"], "bytes": nbytes,
        "cold_s": export_s[0], "export_s": min(export_s[1:]), "copy_s": min(copy_s), "peak_extra": max(peaks),
        "largest": largest_tensor_bytes(plan, torch.bfloat16), "bucket_bytes": bucket, "model_bytes_this_rank": model_bytes,
    }  # fmt: skip
    Path(args["out"], f"tp{args['tp']}_pp{args['pp']}_rank{report['rank']}.json").write_text(
        json.dumps(report)
    )
    destroy_parallel()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bucket-mib", type=float, default=64.0)
    p.add_argument("--repeats", type=int, default=3, help="timed exports per layout (after one warm-up)")
    p.add_argument("--layouts", default="2x1,1x2", help="TPxPP list, e.g. 2x1,1x2,2x2")
    p.add_argument(
        "--transport",
        choices=["auto", "collective", "shm"],
        default="auto",
        help="bucket transport (auto: shared memory for CPU ranks of one machine)",
    )
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()

    from megatron_ghpo.bridge.launch import run_ranks

    cfg = hf_config(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridge_bench_") as out:
        for layout in args.layouts.split(","):
            tp, pp = (int(x) for x in layout.lower().split("x"))
            task = {"tp": tp, "pp": pp, "config": cfg, "bucket_bytes": int(args.bucket_mib * 2**20),
                    "repeats": args.repeats, "out": out, "transport": args.transport}  # fmt: skip
            run_ranks("bench", task, tp * pp, timeout_s=args.timeout, entry=[sys.executable, __file__, "--rank"],
                      quiet_rank0=True, extra_env={"MALLOC_MMAP_THRESHOLD_": "65536", "MEGATRON_GHPO_NO_PROGRESS": "1"})  # fmt: skip
            for f in sorted(Path(out).glob(f"tp{tp}_pp{pp}_rank*.json")):
                rows.append(json.loads(f.read_text()))
    mib = 2**20
    print(f"model: qwen2-style hidden={args.hidden} layers={args.layers} ffn={args.ffn} vocab={args.vocab} bf16, "
          f"{rows[0]['bytes'] / mib:.0f} MiB exported to every rank; transport={args.transport}; 1 thread per rank, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    head = (f"{'layout':8} {'rank':>4} {'export GB/s':>11} {'(1st call)':>10} {'memcpy GB/s':>11} {'ratio':>6} "
            f"{'peak extra MiB':>14} {'bucket MiB':>10} {'largest MiB':>11} {'model/rank MiB':>14}")  # fmt: skip
    print(head)
    print("-" * len(head))
    ratios = []
    for r in rows:
        exp_gbs, cp_gbs = r["bytes"] / r["export_s"] / 1e9, r["bytes"] / r["copy_s"] / 1e9
        ratios.append(exp_gbs / cp_gbs)
        name = f"TP{r['tp']}PP{r['pp']}"
        print(f"{name:8} {r['rank']:>4} {exp_gbs:>11.2f} {r['bytes'] / r['cold_s'] / 1e9:>10.2f} "
              f"{cp_gbs:>11.2f} {ratios[-1]:>6.2f} "
              f"{r['peak_extra'] / mib:>14.1f} {r['bucket_bytes'] / mib:>10.1f} {r['largest'] / mib:>11.1f} "
              f"{r['model_bytes_this_rank'] / mib:>14.1f}")  # fmt: skip
    print(f"ratio_vs_memcpy={min(ratios):.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--rank":
        rank_main(json.loads(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
