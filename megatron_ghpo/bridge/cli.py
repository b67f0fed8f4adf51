"""``megatron-ghpo convert ...``: HF <-> Megatron checkpoint conversion and verification.

``convert hf-to-megatron --hf-dir IN --out CKPT``
    HF safetensors folder -> Megatron distributed checkpoint (+ HF config/tokenizer in ``CKPT/hf``).
``convert megatron-to-hf --ckpt CKPT --out OUT [--tp N --pp M] [--ep E --etp T]``
    loads CKPT at TP=N x PP=M on N*M local processes and writes OUT through the live export path
    (the same code that feeds the rollout engine). OUT loads with ``from_pretrained`` and vLLM.
    Mixture-of-experts models may also be loaded with their experts split over E expert-parallel
    ranks, each expert over T ranks (default T = N); the job then has M x lcm(N, E x T) ranks.
``convert verify --hf-dir D --ckpt C [--tp N --pp M] [--ep E --etp T]``
    loads C at that layout and prints ``max_abs_logit_diff=X`` against the HF model on random tokens.

Every command spawns its ranks itself (CPU, gloo) and stops them after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from megatron_ghpo.bridge.checkpoint import DTYPE_NAMES


def _size(text: str) -> int:
    """``256MiB``, ``5GB``, ``1048576`` -> bytes."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            break
    else:
        number, mult = t, 1
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256MiB, 5GB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"folder {text} does not exist")
    return text


def _layout(args: argparse.Namespace) -> tuple[dict, int]:
    """The layout arguments of a task, and its number of ranks: ``PP x lcm(TP, EP x ETP)`` (the
    data-parallel replicas the expert grid needs, when ``EP x ETP`` exceeds TP)."""
    import math

    etp = args.tp if args.etp is None else args.etp
    world = args.pp * math.lcm(args.tp, args.ep * etp)
    return {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": etp}, world


def _layout_text(lay: dict) -> str:
    text = f"TP={lay['tp']} PP={lay['pp']}"
    return text + (f" EP={lay['ep']} ETP={lay['etp']}" if lay["ep"] > 1 or lay["etp"] != lay["tp"] else "")


def _run(task: str, task_args: dict, world_size: int, timeout: float) -> bool:
    """Run the ranks; on failure print the reason (with the failing rank's log) and return False."""
    from megatron_ghpo.bridge.launch import run_ranks

    try:
        run_ranks(task, task_args, world_size, timeout_s=timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def _new_output(path: str) -> str | None:
    """An error message when ``path`` exists and is not an empty folder (nothing is overwritten)."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        return f"error: output {p} already exists and is not empty: choose another --out or remove it first"
    return None


def _check_checkpoint(ckpt: str, hf_config: str | None, args: argparse.Namespace) -> str | None:
    """An error message when ``ckpt`` is not a readable checkpoint with a matching HF config, or when
    the expert-parallel sizes do not fit its model (checked before any rank starts)."""
    from megatron_ghpo.bridge.checkpoint import checked_hf_config
    from megatron_ghpo.policy.hf_arch import hf_arch
    from megatron_ghpo.policy.model import check_expert_sizes

    try:
        config, _ = checked_hf_config(ckpt, hf_config)
        lay, _world = _layout(args)
        check_expert_sizes(hf_arch(config).moe, ep=lay["ep"], etp=lay["etp"])
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as exc:
        return f"error: {exc}"
    return None


def cmd_hf_to_megatron(args: argparse.Namespace) -> int:
    if not (Path(args.hf_dir) / "config.json").is_file():
        print(f"error: {args.hf_dir} has no config.json: not a Hugging Face model folder", file=sys.stderr)
        return 1
    if problem := _new_output(args.out):
        print(problem, file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    if not _run("hf_to_megatron", {"hf_dir": args.hf_dir, "out": args.out, "dtype": args.dtype}, 1, args.timeout):
        return 1
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_megatron_to_hf(args: argparse.Namespace) -> int:
    if problem := _new_output(args.out) or _check_checkpoint(args.ckpt, args.hf_config, args):
        print(problem, file=sys.stderr)
        return 1
    lay, world = _layout(args)
    task_args = {
        "ckpt": args.ckpt, "out": args.out, **lay, "dtype": args.dtype,
        "hf_config": args.hf_config, "bucket_bytes": args.bucket_bytes, "max_shard_bytes": args.max_shard_size,
    }  # fmt: skip
    t0 = time.perf_counter()
    if not _run("megatron_to_hf", task_args, world, args.timeout):
        return 1
    print(f"wrote {args.out} (loaded at {_layout_text(lay)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if problem := _check_checkpoint(args.ckpt, args.hf_dir, args):
        print(problem, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="megatron_ghpo_verify_") as tmp:
        result = Path(tmp) / "result.json"
        lay, world = _layout(args)
        task_args = {
            "hf_dir": args.hf_dir, "ckpt": args.ckpt, **lay, "batch": args.batch,
            "seq_len": args.seq_len, "seed": args.seed, "result": str(result),
        }  # fmt: skip
        if not _run("verify", task_args, world, args.timeout):
            return 1
        report = json.loads(result.read_text())
    diff = report["max_abs_logit_diff"]
    print(f"{_layout_text(lay)} batch={args.batch} seq_len={args.seq_len} max_abs_logit={report['max_abs_logit']:.4g}")
    print(f"max_abs_logit_diff={diff:.6g}")
    if args.tol is not None and not diff <= args.tol:
        print(f"FAILED: max_abs_logit_diff {diff:.6g} > --tol {args.tol:g}")
        return 1
    return 0


def _expert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=_positive, default=1,
                        help="expert-parallel size (mixture-of-experts models; must divide num_experts; default 1)")
    parser.add_argument("--etp", type=_positive, default=None,
                        help="expert tensor-parallel size (mixture-of-experts models; default: --tp)")  # fmt: skip


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``convert`` (with ``hf-to-megatron``, ``megatron-to-hf``, ``verify``) to a CLI's subparsers."""
    convert = subparsers.add_parser("convert", help="HF <-> Megatron checkpoint conversion", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = convert.add_subparsers(dest="convert_command", required=True)
    dtypes = sorted(DTYPE_NAMES)

    h2m = sub.add_parser("hf-to-megatron", help="HF folder -> Megatron distributed checkpoint")
    h2m.add_argument("--hf-dir", required=True, type=_existing_dir, help="HF model folder (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="new checkpoint folder (must not exist or be empty)")
    h2m.add_argument("--dtype", choices=dtypes, help="stored dtype (default: the HF weights' dtype)")
    h2m.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is stopped")
    h2m.set_defaults(func=cmd_hf_to_megatron)

    m2h = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF folder (through the live export path)")
    m2h.add_argument("--ckpt", required=True, type=_existing_dir, help="Megatron checkpoint folder")
    m2h.add_argument("--out", required=True, help="new HF folder (must not exist or be empty)")
    m2h.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size to load at (default 1)")
    m2h.add_argument("--pp", type=_positive, default=1, help="pipeline-parallel size to load at (default 1)")
    _expert_arguments(m2h)
    m2h.add_argument("--dtype", choices=dtypes, help="output dtype (default: the checkpoint's)")
    m2h.add_argument("--hf-config", type=_existing_dir,
                     help="HF folder with config/tokenizer files (default: CKPT/hf, written by hf-to-megatron)")  # fmt: skip
    m2h.add_argument("--bucket-bytes", type=_size, default=256 * 1024**2, help="export bucket size (default 256MiB)")
    m2h.add_argument("--max-shard-size", type=_size, default=5 * 1024**3, help="safetensors shard size (default 5GiB)")
    m2h.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is stopped")
    m2h.set_defaults(func=cmd_megatron_to_hf)

    ver = sub.add_parser("verify", help="logits of CKPT loaded at TP x PP vs the HF model")
    ver.add_argument("--hf-dir", required=True, type=_existing_dir, help="HF model folder to compare against")
    ver.add_argument("--ckpt", required=True, type=_existing_dir, help="Megatron checkpoint folder")
    ver.add_argument("--tp", type=_positive, default=1)
    ver.add_argument("--pp", type=_positive, default=1)
    _expert_arguments(ver)
    ver.add_argument("--batch", type=_positive, default=2)
    ver.add_argument("--seq-len", type=_positive, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--tol", type=float, help="exit with status 1 when max_abs_logit_diff exceeds this")
    ver.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is stopped")
    ver.set_defaults(func=cmd_verify)
    return convert


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m megatron_ghpo.bridge.cli convert ...``)."""
    from megatron_ghpo.logging_utils import configure_logging

    parser = argparse.ArgumentParser(prog="megatron-ghpo")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    configure_logging("INFO")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
