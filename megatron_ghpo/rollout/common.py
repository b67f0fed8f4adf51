"""Input checks and small helpers shared by the rollout engines (no GPU library imported here)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_ghpo.rollout.base import SamplingParams

GREEDY_EPS = 1e-5
"""Temperatures below this sample greedily (the value vLLM uses)."""


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """Return the ``config.json`` of an HF model folder, with clear errors for a wrong folder."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"rollout model folder {str(path)!r} does not exist: pass a Hugging Face model folder "
            "(config.json + *.safetensors), e.g. one written by `megatron-ghpo convert`"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"rollout model folder {str(path)!r} has no config.json, so it is not a Hugging Face model "
            "folder; convert a Megatron checkpoint to HF first (`megatron-ghpo convert`) or point at the "
            "folder that holds config.json"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc}); rewrite it with save_pretrained") from exc
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"rollout model folder {str(path)!r} holds no *.safetensors weights; save the model with "
            "`save_pretrained(..., safe_serialization=True)`"
        )
    return config


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    """Names of every tensor stored in the folder's safetensors files (headers only, no data read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def head_dim(config: dict[str, Any]) -> int:
    """Attention head size of an HF decoder config (``head_dim`` if set, else hidden / heads)."""
    explicit = config.get("head_dim")
    if explicit:
        return int(explicit)
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def validate_sampling(sampling: SamplingParams) -> None:
    """Raise ValueError naming the field when a sampling setting is out of range."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(
            f"sampling must be megatron_ghpo.rollout.SamplingParams, got {type(sampling).__name__}"
        )
    if sampling.n < 1:
        raise ValueError(f"SamplingParams.n={sampling.n}: must be >= 1 completions per prompt")
    if sampling.temperature < 0:
        raise ValueError(f"SamplingParams.temperature={sampling.temperature}: must be >= 0 (0 = greedy)")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"SamplingParams.top_p={sampling.top_p}: must be in (0, 1] (1.0 disables top-p)")
    if sampling.top_k == 0 or sampling.top_k < -1:
        raise ValueError(f"SamplingParams.top_k={sampling.top_k}: use -1 to disable top-k, or a value >= 1")
    if sampling.max_tokens < 1:
        raise ValueError(f"SamplingParams.max_tokens={sampling.max_tokens}: must be >= 1")
    if any(not isinstance(s, str) or not s for s in sampling.stop):
        raise ValueError(f"SamplingParams.stop={sampling.stop!r}: every stop string must be a non-empty str")


def validate_token_rows(
    rows: Sequence[Sequence[int]], *, vocab_size: int, max_len: int, what: str = "prompt", min_len: int = 1
) -> list[list[int]]:
    """Check token-id rows (type, length ``min_len..max_len``, ids in ``[0, vocab_size)``); return plain lists.

    Errors name the row index and the fix, so a bad prompt is found without reading engine internals.
    """
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"{what} token ids must be a list of lists of int, got {type(rows).__name__}")
    out: list[list[int]] = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(
                f"{what} {i}: expected a list of token ids, got {type(row).__name__} (tokenize first)"
            )
        ids = [int(t) for t in row]
        if len(ids) < min_len:
            raise ValueError(f"{what} {i} has {len(ids)} tokens: at least {min_len} required")
        if len(ids) > max_len:
            raise ValueError(
                f"{what} {i} has {len(ids)} tokens, more than the engine allows ({max_len}, from max_model_len); "
                "left-truncate prompts to max_prompt_length or raise max_model_len"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"{what} {i} holds token id {bad[0]} outside the model vocabulary [0, {vocab_size}): "
                "tokenize with the model's own tokenizer"
            )
        out.append(ids)
    return out


def completion_seed(seed: int | None, prompt_index: int, n: int) -> int | None:
    """Seed of prompt ``prompt_index``'s first completion in a seeded ``generate`` call.

    Completion ``j`` of that prompt uses ``seed + prompt_index * n + j`` (vLLM adds ``j`` itself for
    ``n > 1``), so every completion of the call draws from its own stream and equal prompts in one
    batch still get different samples.
    """
    return None if seed is None else seed + prompt_index * n


def is_greedy(sampling: SamplingParams) -> bool:
    return sampling.temperature < GREEDY_EPS
