"""Read a Hugging Face decoder config (Llama, Qwen2, Qwen3, Qwen3-MoE) into the numbers Megatron needs.

Pure Python (no torch, no megatron): usable by the config validator and the bridge alike.
Anything the Megatron model provider cannot reproduce exactly raises ``NotImplementedError``
naming the field, rather than building a model that silently differs from the HF one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")
"""Families with an RMSNorm over each query and key head (``q_norm``/``k_norm``) before RoPE."""


@dataclass(frozen=True, kw_only=True)
class MoEArch:
    """The mixture-of-experts part of a Qwen3-MoE config (routed experts only, no shared expert)."""

    num_experts: int
    topk: int
    """Experts per token (``num_experts_per_tok``)."""
    ffn_hidden_size: int
    """Each expert's SwiGLU width (``moe_intermediate_size``)."""
    norm_topk_prob: bool
    """True: the top-k softmax probabilities are renormalised to sum to 1 (softmax over the chosen
    experts' logits); False: the full softmax's probabilities of the chosen experts are used as is."""
    aux_loss_coeff: float
    """``router_aux_loss_coef``: weight of the load-balancing loss (0 = none)."""
    layer_pattern: tuple[int, ...]
    """Per layer: 1 = MoE block, 0 = dense MLP of width ``intermediate_size`` (from
    ``decoder_sparse_step`` and ``mlp_only_layers``, as transformers decides it)."""


@dataclass(frozen=True, kw_only=True)
class HFArch:
    """The architecture of a Llama/Qwen2/Qwen3-family checkpoint, normalised across transformers versions."""

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
    qk_layernorm: bool = False
    """True for Qwen3 / Qwen3-MoE: RMSNorm (weight ``[head_dim]``) on every query and key head."""
    moe: MoEArch | None = None
    """The experts of a Qwen3-MoE model; None for dense models."""


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
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise NotImplementedError(
            f"{model_type} attention_bias=True (bias on q/k/v and o_proj) is not supported: Megatron's "
            "add_qkv_bias covers q/k/v only, add_bias_linear adds MLP biases too; use a config with attention_bias: false"
        )
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise NotImplementedError("use_sliding_window=True is not supported; only full attention")
    other_layers = sorted({t for t in cfg.get("layer_types") or () if t != "full_attention"})
    if other_layers:
        raise NotImplementedError(f"layer_types {other_layers} are not supported; only 'full_attention' layers")
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
        qk_layernorm=model_type in QK_NORM_MODEL_TYPES,
        moe=_moe(cfg, int(cfg["num_hidden_layers"])) if model_type == "qwen3_moe" else None,
    )


def _moe(cfg: dict[str, Any], num_layers: int) -> MoEArch | None:
    """The MoE part of a Qwen3-MoE config (None when it has no experts: every layer dense)."""
    experts = int(cfg.get("num_experts", cfg.get("num_local_experts")) or 0)
    sparse_step = int(cfg.get("decoder_sparse_step", 1) or 0)
    dense_only = set(cfg.get("mlp_only_layers") or ())
    if experts <= 0:
        return None
    if sparse_step < 1:
        raise ValueError(f"decoder_sparse_step={sparse_step}: must be >= 1 when num_experts > 0")
    bad = sorted(i for i in dense_only if not 0 <= int(i) < num_layers)
    if bad:
        raise ValueError(f"mlp_only_layers {bad} lie outside the {num_layers} layers (0..{num_layers - 1})")
    pattern = tuple(0 if i in dense_only or (i + 1) % sparse_step else 1 for i in range(num_layers))
    if not any(pattern):
        return None
    for key in ("shared_expert_intermediate_size", "n_shared_experts"):
        if cfg.get(key):
            raise NotImplementedError(f"{key}={cfg[key]}: shared experts are not supported (Qwen3-MoE has none)")
    if "moe_intermediate_size" not in cfg:
        raise ValueError("Qwen3-MoE config lacks moe_intermediate_size (each expert's FFN width)")
    topk = int(cfg.get("num_experts_per_tok", 0) or 0)
    if not 1 <= topk <= experts:
        raise ValueError(f"num_experts_per_tok={topk}: must be in [1, num_experts={experts}]")
    return MoEArch(
        num_experts=experts,
        topk=topk,
        ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
        layer_pattern=pattern,
    )
