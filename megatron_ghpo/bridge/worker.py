"""One rank of a conversion job: ``python -m megatron_ghpo.bridge.worker TASK ARGS_JSON``.

Started by :func:`megatron_ghpo.bridge.launch.run_ranks` (or ``torchrun``) with the usual
``RANK``/``WORLD_SIZE``/``MASTER_*`` environment. Tasks:

``hf_to_megatron``  ``{hf_dir, out, dtype}`` (one rank)
``megatron_to_hf``  ``{ckpt, out, tp, pp, ep, etp, dtype, hf_config, bucket_bytes, max_shard_bytes}``
``verify``          ``{hf_dir, ckpt, tp, pp, ep, etp, batch, seq_len, seed, result}``: writes
                    ``{"max_abs_logit_diff": x, ...}`` to ``result``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from megatron_ghpo.logging_utils import configure_logging, get_logger, progress

logger = get_logger("megatron_ghpo.bridge.worker")



def _init(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> None:
    from megatron_ghpo.policy.parallel import init_parallel

    init_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, backend="gloo" if not torch.cuda.is_available() else None,
    )  # fmt: skip


def task_hf_to_megatron(*, hf_dir: str, out: str, dtype: str | None = None) -> None:
    from megatron_ghpo.bridge.checkpoint import hf_to_megatron, parse_dtype

    _init(1, 1)
    hf_to_megatron(hf_dir, out, dtype=parse_dtype(dtype))


def task_megatron_to_hf(
    *,
    ckpt: str,
    out: str,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    dtype: str | None = None,
    hf_config: str | None = None,
    bucket_bytes: int = 256 * 1024 * 1024,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    from megatron_ghpo.bridge.checkpoint import build_and_load, checked_hf_config, parse_dtype
    from megatron_ghpo.bridge.export import export_hf_weights
    from megatron_ghpo.bridge.hf_folder import write_hf_folder
    from megatron_ghpo.bridge.plan import build_plan

    config, side = checked_hf_config(ckpt, hf_config)
    _init(tp, pp, ep, etp)
    chunks = build_and_load(ckpt, config)
    out_dtype = parse_dtype(dtype) or next(chunks[0].parameters()).dtype
    plan = build_plan(chunks, config)
    stream = export_hf_weights(chunks, config, bucket_bytes=bucket_bytes, dtype=out_dtype, destination="first", plan=plan)
    if torch.distributed.get_rank() == 0:
        total = sum(len(e.hf_names) for e in plan.entries)
        names = write_hf_folder(
            progress(stream, desc="export", total=total), out, side, dtype=out_dtype, max_shard_bytes=max_shard_bytes
        )
        logger.info("wrote %d tensors to %s (TP=%d PP=%d EP=%d, %s)", len(names), out, tp, pp, ep, out_dtype)
    elif plan_receiver():
        # The first rank of another data-parallel replica: present only when the expert grid spans
        # replicas (EP x ETP > TP); it drives the expert broadcasts and drops what it receives.
        for _ in stream:
            pass
    else:
        for _ in stream:  # drives the collectives; only rank 0 receives tensors
            raise RuntimeError("a non-destination rank received an exported tensor")


def plan_receiver() -> bool:
    """Whether this rank is the first of its model-parallel group (TP 0, PP 0): it receives with
    ``destination="first"``."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def task_verify(
    *, hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, batch: int = 2,
    seq_len: int = 32, seed: int = 0, result: str,
) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_ghpo.bridge.checkpoint import build_and_load, checked_hf_config
    from megatron_ghpo.policy.forward import full_logits
    from megatron_ghpo.policy.hf_arch import hf_arch

    config, _ = checked_hf_config(ckpt, hf_dir)
    _init(tp, pp, ep, etp)
    vocab = hf_arch(config).vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    chunks = build_and_load(ckpt, config, dtype=torch.float32)
    ours = full_logits(chunks, tokens, vocab_size=vocab, device=torch.device("cpu"))
    if torch.distributed.get_rank() == 0:
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        hf_model.eval()
        with torch.no_grad():
            ref = hf_model(tokens).logits.float()
        diff = (ours - ref).abs().max().item()
        report = {"max_abs_logit_diff": diff, "max_abs_logit": ref.abs().max().item(), "tp": tp, "pp": pp, "ep": ep,
                  "batch": batch, "seq_len": seq_len, "seed": seed}  # fmt: skip
        Path(result).write_text(json.dumps(report))


TASKS = {"hf_to_megatron": task_hf_to_megatron, "megatron_to_hf": task_megatron_to_hf, "verify": task_verify}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in TASKS:
        sys.stderr.write(f"usage: python -m megatron_ghpo.bridge.worker {{{','.join(TASKS)}}} ARGS_JSON\n")
        return 2
    torch.set_num_threads(int(os.environ.get("MEGATRON_GHPO_THREADS_PER_RANK", "1")))
    configure_logging(os.environ.get("MEGATRON_GHPO_LOG_LEVEL", "INFO"))
    from megatron_ghpo.policy.parallel import destroy_parallel

    try:
        TASKS[argv[0]](**json.loads(argv[1]))
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
