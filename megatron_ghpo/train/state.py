"""Trainer state beside the policy checkpoint: step (= data position), weight version, GHPO
difficulty memory (each rollout leader keeps its own), the GHPO retries each rollout worker carries to
the next step (``hint_retry: next_step``), and the RNG states of every rank (one file per rank)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_trainer_state(ckpt_dir: Path, *, step: int, weight_version: int, memory: dict | None, rank: int,
                       sampler: dict | None = None) -> None:
    """``sampler``: this rollout worker's :meth:`GHPOSampler.state_dict` (retries carried to the next step)."""
    state = {"step": step, "weight_version": weight_version, "rng": _rng_state(), "memory": memory, "sampler": sampler}
    torch.save(state, Path(ckpt_dir) / f"trainer_state_rank{rank}.pt")


def load_trainer_state(ckpt_dir: Path, *, rank: int) -> dict[str, Any]:
    path = Path(ckpt_dir) / f"trainer_state_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by a run with fewer ranks; resume with the same "
            f"world size (the policy weights themselves reshard, see `megatron-ghpo convert`)"
        )
    state = torch.load(path, weights_only=False)
    _set_rng_state(state["rng"])
    return state


def replace_hf_folder(policy, target: Path, tokenizer_dir: str, rank: int) -> None:
    """Write the policy as an HF folder at ``target`` (collective), replacing an older one atomically:
    the new folder is written beside it and swapped in only when complete."""
    import shutil

    from megatron_ghpo.train.dist_utils import barrier

    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)
    barrier()
    policy.save_hf(staging, tokenizer_dir=tokenizer_dir)
    barrier()
    if rank == 0:
        old = target.with_name(target.name + ".old")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
