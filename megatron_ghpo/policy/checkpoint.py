"""Megatron distributed checkpoints of the policy: model (+ optimizer + LR schedule), any TP/PP.

Layout of a checkpoint folder::

    metadata.json, common.pt, *.distcp    Megatron dist_checkpointing (torch_dist format)
    ghpo_policy.json                      our metadata: vocabulary, HF config, layout, step, ...

Model tensors are stored by their global (unsharded) names, so a checkpoint saved at one TP/PP/VPP
loads at any other with identical weights. Distributed-optimizer state (Megatron's default
``fully_sharded_model_space`` format cannot serialise its flattened shards) is saved either as
``dp_reshardable`` (default: no gather, reloads at the same TP/PP/VPP; elsewhere load the model
and schedule with ``load_optimizer=False``) or as ``fully_reshardable`` (gathered per data-parallel
group over gloo: reloads at any TP/PP). The non-distributed optimizer's state reshards freely.

Every rank must call :func:`save_checkpoint` / :func:`load_checkpoint` (collectives). A script
that saves must guard its entry point with ``if __name__ == "__main__":`` — the checkpoint writer
starts a spawn-context ``multiprocessing`` manager that re-imports ``__main__``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.policy.optim_state import materialize_optimizer_state, restore_adam_steps

logger = get_logger(__name__)

META_FILE = "ghpo_policy.json"
FORMAT_VERSION = 1
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
"""Distributed-optimizer state formats: ``dp_reshardable`` (per-rank buckets; fast, no gather; reloads
at the same TP/PP/VPP) or ``fully_reshardable`` (gathered per DP group over gloo; reloads at any layout)."""


def _optimizer_metadata(sharding: str) -> dict[str, Any]:
    if sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {OPTIMIZER_SHARDINGS}, got {sharding!r}")
    # The memory-efficient exchange gathers over the gloo data-parallel group with CPU tensors.
    return {"distrib_optim_sharding_type": sharding, "distrib_optim_fully_reshardable_mem_efficient": True}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _model_sharded(model_chunks: list) -> dict[str, Any]:
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    """Our metadata of a checkpoint folder (no torch.distributed needed)."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        what = "a Megatron checkpoint written by megatron-ghpo" if (Path(ckpt_dir) / "metadata.json").is_file() else "a checkpoint"
        raise FileNotFoundError(f"{ckpt_dir} is not {what}: {META_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return meta


def save_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list,
    *,
    metadata: dict[str, Any],
    optimizer=None,
    scheduler=None,
    optimizer_sharding: str = "dp_reshardable",
) -> None:
    """Save model chunks (and optimizer/scheduler when given) to an empty or new ``ckpt_dir``.

    ``metadata`` (JSON-serialisable) must hold ``vocab_size`` (padded, as built) and
    ``hf_config``; the layout, Megatron-Core version and what was saved are added here.
    """
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_ghpo.policy.cpu_compat import megatron_core_version

    missing = [k for k in ("vocab_size", "hf_config") if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    ckpt_dir = Path(ckpt_dir)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise FileExistsError(f"checkpoint folder {ckpt_dir} is not empty; save to a new folder")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    sharded = _model_sharded(model_chunks)
    if optimizer is not None:
        materialize_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=False, metadata=_optimizer_metadata(optimizer_sharding)
        )
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(sharded, str(ckpt_dir))
    meta = dict(metadata)
    meta.update(
        format_version=FORMAT_VERSION,
        megatron_core=megatron_core_version(),
        has_optimizer=optimizer is not None,
        has_scheduler=scheduler is not None,
        optimizer_sharding=optimizer_sharding if optimizer is not None else None,
        layout={
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "vpp": len(model_chunks) if len(model_chunks) > 1 else None,
            "dp": parallel_state.get_data_parallel_world_size(),
        },
    )
    if rank == 0:
        tmp = ckpt_dir / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(ckpt_dir / META_FILE)
    torch.distributed.barrier()
    logger.debug("saved checkpoint %s", ckpt_dir)


def _same_layout(saved: dict[str, Any], model_chunks: list) -> tuple[bool, str]:
    from megatron.core import parallel_state

    now = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": len(model_chunks) if len(model_chunks) > 1 else None,
    }
    was = {k: saved.get(k) for k in now}
    return was == now, f"saved at TP={was['tp']} PP={was['pp']} VPP={was['vpp']}, loading at TP={now['tp']} PP={now['pp']} VPP={now['vpp']}"


def load_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list,
    *,
    optimizer=None,
    scheduler=None,
    load_optimizer: bool = True,
) -> dict[str, Any]:
    """Load into ``model_chunks`` (any TP/PP) and, when given and saved, optimizer and scheduler.

    Returns the checkpoint's metadata. Raises when the optimizer state cannot be resharded to this
    layout (pass ``load_optimizer=False`` to take only the model and the schedule).
    """
    from megatron.core import dist_checkpointing

    meta = read_checkpoint_metadata(ckpt_dir)
    built_vocab = _unwrap(model_chunks[0]).vocab_size
    if meta["vocab_size"] != built_vocab:
        raise ValueError(
            f"{ckpt_dir} holds a vocabulary of {meta['vocab_size']} rows but the model was built with {built_vocab}; "
            f"build it with vocab_size={meta['vocab_size']}"
        )
    want_optimizer = optimizer is not None and load_optimizer
    if want_optimizer and not meta.get("has_optimizer"):
        raise ValueError(f"{ckpt_dir} holds no optimizer state; pass load_optimizer=False to load the model only")
    sharding = meta.get("optimizer_sharding") or "dp_reshardable"
    if want_optimizer and sharding == "dp_reshardable":
        same, where = _same_layout(meta["layout"], model_chunks)
        if not same and getattr(optimizer.config, "use_distributed_optimizer", False):
            raise ValueError(
                f"{ckpt_dir}: distributed-optimizer state saved as 'dp_reshardable' reloads only at the layout it was "
                f"saved with ({where}); pass load_optimizer=False to load the model and LR schedule, or save with "
                "optimizer_sharding='fully_reshardable'"
            )
    sharded = _model_sharded(model_chunks)
    if want_optimizer:
        materialize_optimizer_state(optimizer)  # a fresh optimizer has no state to load into yet
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_optimizer_metadata(sharding)
        )
    if scheduler is not None and meta.get("has_scheduler"):
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    with torch.no_grad():
        state = dist_checkpointing.load(sharded, str(ckpt_dir))
        for i, chunk in enumerate(model_chunks):
            _unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
        if want_optimizer:
            optimizer.load_state_dict(state["optimizer"])
            restore_adam_steps(optimizer, state["optimizer"])
        elif optimizer is not None:
            optimizer.reload_model_params()
    if scheduler is not None and "opt_param_scheduler" in state:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    logger.debug("loaded checkpoint %s", ckpt_dir)
    return meta
