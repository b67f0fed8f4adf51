"""Evaluation throughput on CPU: completions generated and scored per second.

Runs :func:`megatron_ghpo.eval.run_evaluation` on the first ``--limit`` MATH-500 problems with
``--samples`` completions each, twice on the same engine: scoring in the verifier pool overlapped
with generation (the evaluation path) and scoring serially in the main thread after each chunk.
The model is ``--model DIR`` (e.g. the demo checkpoint's HF folder) or, by default, a tiny random
Qwen2 built locally. Random models rarely stop early, so completions run to ``--max-new-tokens``.

    python tools/benchmarks/eval.py [--model DIR] [--engine vllm|hf] [--limit 16] [--samples 4]
        [--max-new-tokens 64] [--chunk-size 8] [--workers 2]

Prints a table; the last line is ``eval_samples_per_s=<pool run> overlap_speedup=<serial / pool wall>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("MEGATRON_GHPO_NO_PROGRESS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="HF model folder (default: a tiny random Qwen2 built in a temp folder)"
    )
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--task", default="math500")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--chunk-size", type=int, default=8, help="prompts per engine call")
    parser.add_argument("--workers", type=int, default=2, help="verifier pool processes")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from megatron_ghpo.data import PromptRenderer
    from megatron_ghpo.eval import (
        PoolScorer,
        SamplingOverrides,
        SerialScorer,
        get_task,
        load_task,
        run_evaluation,
    )
    from megatron_ghpo.eval.cli import SEED_SYSTEM_PROMPT
    from megatron_ghpo.eval.scoring import EVAL_PRELOAD
    from megatron_ghpo.rewards import VerifierPool
    from megatron_ghpo.rollout import build_rollout_engine

    tmp = tempfile.TemporaryDirectory(prefix="eval_bench_")
    model = args.model
    if model is None:
        from megatron_ghpo.models.tiny import build_tiny_model

        model = build_tiny_model(Path(tmp.name) / "tiny", hidden_size=64, num_heads=2, num_kv_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(model)
    renderer = PromptRenderer(tokenizer, system_prompt=SEED_SYSTEM_PROMPT, max_prompt_length=1024)
    task = load_task(get_task(args.task), limit=args.limit)
    from megatron_ghpo.eval.runner import LoadedTask

    tasks = [LoadedTask(spec=get_task(args.task), problems=task)]
    sampling = SamplingOverrides(
        samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature
    )
    engine = build_rollout_engine(
        args.engine, model, dtype="float32", max_model_len=1024 + args.max_new_tokens, seed=0
    )
    rows = []
    try:
        with VerifierPool(num_workers=args.workers, timeout_s=10.0, preload=EVAL_PRELOAD) as pool:
            run_evaluation(engine, renderer, [LoadedTask(spec=tasks[0].spec, problems=task[:2])], sampling=sampling,
                           scorer=PoolScorer(pool))  # warm-up (compiles, caches)  # fmt: skip
            for label, scorer in (("pool, overlapped", PoolScorer(pool)), ("serial, inline", SerialScorer())):
                t0 = time.perf_counter()
                report = run_evaluation(engine, renderer, tasks, sampling=sampling, scorer=scorer,
                                        chunk_size=args.chunk_size)  # fmt: skip
                wall = time.perf_counter() - t0
                t = report.tasks[0]
                n = t.num_problems * t.samples
                rows.append((label, n, t.mean_completion_tokens * n, t.generate_s, t.score_s, wall))
    finally:
        engine.close()
        tmp.cleanup()

    table = Table(title=f"Evaluation throughput ({args.engine} engine, {args.task} x{args.limit}, K={args.samples}, "
                        f"max_new_tokens={args.max_new_tokens}, CPU)")  # fmt: skip
    for col in (
        "scoring",
        "completions",
        "tokens",
        "generate s",
        "score s",
        "wall s",
        "completions/s",
        "tokens/s",
    ):
        table.add_column(col, justify="left" if col == "scoring" else "right")
    for label, n, tokens, gen_s, score_s, wall in rows:
        table.add_row(label, str(n), f"{tokens:.0f}", f"{gen_s:.2f}", f"{score_s:.2f}", f"{wall:.2f}",
                      f"{n / wall:.1f}", f"{tokens / wall:.0f}")  # fmt: skip
    Console(width=150).print(table)
    pool_wall, serial_wall = rows[0][5], rows[1][5]
    print(f"eval_samples_per_s={rows[0][1] / pool_wall:.2f} overlap_speedup={serial_wall / pool_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
