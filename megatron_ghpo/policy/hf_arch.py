"""Read a Hugging Face decoder config (Llama, Qwen2) into the few numbers Megatron needs.

Pure Python (no torch, no megatron): usable by the config validator and the bridge alike.
Anything the Megatron model provider cannot reproduce exactly raises ``NotImplementedError``
naming the field, rather than building a model that silently differs from the HF one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True, kw_only=True)
class HFArch:
    """The architecture of a Llama/Qwen2-family checkpoint, normalised across transformers versions."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """True for Qwen2 (biases on q, k, v projections only)."""
    initializer_range: float
    llama3_rope_factor: float | None = None
    """Llama-3.1 style RoPE frequency scaling factor, or None."""


def load_hf_config(source: Any) -> dict[str, Any]:
    """A plain dict from an HF folder, a ``config.json`` path, a ``PretrainedConfig`` or a dict."""
    if isinstance(source, dict):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path} (expected a model folder holding config.json)")
    with path.open() as f:
        return json.load(f)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    return float(theta), merged


def hf_arch(hf_config: Any) -> HFArch:
    """Normalise ``hf_config`` (see :func:`load_hf_config`); raise on anything unsupported."""
    cfg = load_hf_config(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported by the Megatron model provider; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
    if missing:
        raise ValueError(f"Hugging Face config lacks required fields {missing}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"hidden_act {act!r}: only 'silu' (SwiGLU MLP) is supported")
    if cfg.get("mlp_bias"):
        raise NotImplementedError("mlp_bias=True is not supported (Megatron has no MLP-only bias)")
    if model_type == "llama" and cfg.get("attention_bias"):
        raise NotImplementedError("Llama attention_bias=True (bias on q/k/v and o) is not supported")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise NotImplementedError("use_sliding_window=True is not supported; only full attention")
    theta, rope = _rope(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    llama3_factor = None
    if rope_type == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        wrong = {k: rope.get(k) for k, v in fixed.items() if float(rope.get(k, v)) != v}
        if wrong:
            raise NotImplementedError(f"llama3 rope scaling with {wrong}: Megatron supports only {fixed}")
        llama3_factor = float(rope.get("factor", 8.0))
    elif rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // heads
    return HFArch(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        llama3_rope_factor=llama3_factor,
    )
