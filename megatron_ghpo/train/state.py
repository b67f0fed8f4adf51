"""Trainer state beside the policy checkpoint: step (= data position), weight version, GHPO
difficulty memory (each rollout leader keeps its own), and the RNG states of every rank (one file per rank)."""

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


def save_trainer_state(ckpt_dir: Path, *, step: int, weight_version: int, memory: dict | None, rank: int) -> None:
    state = {"step": step, "weight_version": weight_version, "rng": _rng_state(), "memory": memory}
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
