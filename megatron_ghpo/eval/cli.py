"""`megatron-ghpo eval`: evaluate an HF folder or a Megatron checkpoint on math benchmarks.

    megatron-ghpo eval --model DIR|CKPT --tasks aime24,math500 [--samples K] [--limit N]
        [--temperature T] [--top-p P] [--max-new-tokens N] [--out DIR] [--engine vllm|hf]

Defaults reproduce the seed's lighteval command: the GHPO system prompt with the model's chat
template, ``temperature=0.01, top_p=0.95, max_new_tokens=8192``, AIME avg@32, one sample elsewhere.
Prompts carry no hint. Prints the results table; writes ``summary.json``, ``results.txt`` and
``samples_<task>.jsonl`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_ghpo.eval.tasks import task_names
from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

SEED_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant that provides well-reasoned and detailed responses. You first think about "
    "the reasoning process as an internal monologue and then provide the user with the answer. Respond in the "
    "following format: <think>\n...\n</think>\n<answer>\n...\n</answer>"
)
"""The system prompt of the seed recipe and of its lighteval evaluation command."""

DEFAULT_TASKS = "aime24,math500,amc23,minerva,olympiadbench"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FILE")
    return key.strip().lower(), value.strip()


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command on the ``megatron-ghpo`` parser; returns it."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on math benchmarks (pass@1, pass@k)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="HF model folder, or a Megatron checkpoint (converted via the bridge)"
    )
    p.add_argument("--hf-config", help="HF folder with the config/tokenizer of a Megatron checkpoint's model")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help=f"comma-separated, from {', '.join(task_names())} (default: {DEFAULT_TASKS})",
    )
    p.add_argument(
        "--task-path",
        action="append",
        default=[],
        type=_key_value,
        metavar="NAME=FILE",
        help="file of a registered task (gpqa_diamond has no bundled file); repeatable",
    )
    p.add_argument(
        "--custom-task",
        action="append",
        default=[],
        metavar="SPEC",
        help="a local file as a task: name=N,path=F,problem=COL,answer=COL[,format=text|number|"
        "first_of_list|last_boxed|gsm8k][,id=COL][,samples=K]; repeatable",
    )
    p.add_argument("--samples", type=int, help="completions per problem K for every task (default: per task)")
    p.add_argument("--limit", type=int, help="first N problems of each task")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: per task, 0.01)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: per task, 0.95)")
    p.add_argument("--max-new-tokens", type=int, help="completion token limit (default: per task, 8192)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--pass-k", help="comma-separated k values to report (default: 1, powers of two below K, K)"
    )
    p.add_argument("--system-prompt", default=SEED_SYSTEM_PROMPT, help="system prompt (default: the seed's)")
    p.add_argument("--no-system-prompt", action="store_true", help="send the problem alone in the user turn")
    p.add_argument("--max-prompt-length", type=int, default=2048, help="prompt tokens kept (left-truncated)")
    p.add_argument("--out", help="output folder (default: eval_results/<model folder name>)")
    p.add_argument(
        "--engine", choices=("vllm", "hf"), default="vllm", help="generation engine (default vllm)"
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32"
    )
    p.add_argument("--max-model-len", type=int, help="engine context (default: max prompt + max new tokens)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    p.add_argument("--scoring-workers", type=int, help="verifier processes (default: CPUs, at most 8)")
    p.add_argument("--scoring-timeout", type=float, default=10.0, help="seconds per completion's scoring")
    p.add_argument("--chunk-size", type=int, default=256, help="prompts per engine call")
    p.set_defaults(func=cmd_eval)
    return p


def _pass_ks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError as exc:
        raise ValueError(f"--pass-k {text!r}: expected comma-separated integers, e.g. 1,4,8") from exc
    if not ks or min(ks) < 1:
        raise ValueError(f"--pass-k {text!r}: every k must be >= 1")
    return ks


def _dtype(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _check_context(model_dir: str, max_model_len: int) -> None:
    from megatron_ghpo.rollout.common import read_model_config

    limit = read_model_config(model_dir).get("max_position_embeddings")
    if limit is not None and max_model_len > int(limit):
        raise ValueError(
            f"the engine context max_model_len={max_model_len} (max prompt + max new tokens) exceeds the model's "
            f"max_position_embeddings={limit}; lower --max-new-tokens / --max-prompt-length or set --max-model-len"
        )


def _build_engine(kind: str, model_dir: str, args: argparse.Namespace, max_model_len: int):
    try:
        from megatron_ghpo.rollout import build_rollout_engine
    except ImportError as exc:
        raise NotImplementedError(
            f"megatron_ghpo.rollout.build_rollout_engine is not available ({exc})"
        ) from exc
    kwargs = {"dtype": _dtype(args.dtype), "max_model_len": max_model_len, "seed": args.seed}
    if kind == "vllm":
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    return build_rollout_engine(kind, model_dir, **kwargs)


def _validated(args: argparse.Namespace):
    """(task specs, sampling overrides, pass@k list) from the arguments; raises on bad input."""
    from megatron_ghpo.eval.model_source import model_kind
    from megatron_ghpo.eval.runner import SamplingOverrides
    from megatron_ghpo.eval.tasks import resolve_tasks

    specs = resolve_tasks(args.tasks, paths=dict(args.task_path), custom=args.custom_task)
    sampling = SamplingOverrides(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: must be >= 1")
    if args.max_prompt_length < 1:
        raise ValueError(f"--max-prompt-length {args.max_prompt_length}: must be >= 1")
    model_kind(args.model)
    return specs, sampling, _pass_ks(args.pass_k)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation the parsed arguments describe; prints the table and a final summary line.

    Returns 2 (after one error line on stderr) for bad arguments, 0 on success.
    """
    try:
        specs, sampling, pass_ks = _validated(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"eval: error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    from rich.console import Console
    from transformers import AutoTokenizer

    from megatron_ghpo.data import PromptRenderer
    from megatron_ghpo.eval.model_source import hf_model_dir
    from megatron_ghpo.eval.report import results_table
    from megatron_ghpo.eval.runner import run_evaluation, samples_per_second
    from megatron_ghpo.eval.scoring import EVAL_PRELOAD, PoolScorer
    from megatron_ghpo.rewards import VerifierPool

    max_new = max(sampling.resolve(s).max_tokens for s in specs)
    max_model_len = args.max_model_len or args.max_prompt_length + max_new
    out = Path(args.out or Path("eval_results") / Path(args.model.rstrip("/")).name)
    t0 = time.perf_counter()
    with hf_model_dir(args.model, hf_config_dir=args.hf_config) as model_dir:
        _check_context(model_dir, max_model_len)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
        system_prompt = None if args.no_system_prompt else args.system_prompt
        renderer = PromptRenderer(
            tokenizer, system_prompt=system_prompt, max_prompt_length=args.max_prompt_length
        )
        engine = _build_engine(args.engine, model_dir, args, max_model_len)
        try:
            pool = VerifierPool(
                num_workers=args.scoring_workers, timeout_s=args.scoring_timeout, preload=EVAL_PRELOAD
            )
            with pool:
                report = run_evaluation(
                    engine, renderer, specs, limit=args.limit, sampling=sampling, scorer=PoolScorer(pool),
                    out_dir=out, pass_ks=pass_ks, chunk_size=args.chunk_size, model_name=args.model,
                )  # fmt: skip
        finally:
            engine.close()
    Console(width=None if sys.stdout.isatty() else 150).print(results_table(report))
    avg = report.average.get("pass@1", float("nan"))
    print(
        f"wrote {out}/summary.json, {out}/results.txt and samples_<task>.jsonl in {time.perf_counter() - t0:.1f} s"
    )
    print(f"avg_pass@1={avg:.4f} samples_per_s={samples_per_second(report):.3f} tasks={len(report.tasks)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m megatron_ghpo.eval.cli ...``)."""
    from megatron_ghpo.logging_utils import configure_logging

    parser = argparse.ArgumentParser(prog="megatron-ghpo")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    configure_logging("INFO")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
