"""Model shapes and the parameters one rank holds, in the order Megatron-Core creates them.

Pure Python. :func:`rank_params` lists the parameters of one (TP, PP, EP) rank of the project's
``GPTModel`` (:mod:`megatron_ghpo.policy.model`) exactly as ``named_parameters()`` yields them:
shapes, dtypes and the two flags Megatron's DDP groups them by (expert-parallel, shared
embedding). The order matters: the distributed optimizer pads every parameter's start in the
gradient buffer, walking the parameters in reverse.

Layer specs: ``local`` (Megatron's PyTorch modules, the CPU path; its RMSNorm weights are fp32
whatever the model dtype) and ``te`` (Transformer Engine: norms fused into the following linear
layer, in the model dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from megatron_ghpo.policy.hf_arch import HFArch, hf_arch

Spec = Literal["local", "te"]
PRESET_PACKAGE = "megatron_ghpo.resources"
PRESET_DIR = "model_configs"


def preset_names() -> list[str]:
    """Names of the bundled HF configs (``qwen2.5-7b``, ...)."""
    folder = resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_model_config(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """``(label, HF config dict)`` of a preset name or a path to a ``config.json`` (or a model folder)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        return path.parent.name if path.name == "config.json" else path.stem, json.loads(path.read_text())
    key = name_or_path.lower()
    if key in preset_names():
        text = resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR).joinpath(f"{key}.json").read_text()
        return key, {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    raise ValueError(
        f"--model {name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor an existing "
        "config.json / model folder"
    )


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the smallest multiple of ``divisible_by × tp`` ≥ ``vocab_size``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One parameter of one rank."""

    name: str
    shape: tuple[int, ...]
    bytes_per_element: int
    expert_parallel: bool = False
    """Megatron's ``allreduce=False``: an expert weight with EP > 1 (own buffers, expert-DP group)."""
    shared_embedding: bool = False
    """The tied word embedding / output weight when PP > 1 (its own bucket with the distributed optimizer)."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    """Where a rank sits: sizes and its pipeline stage."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_rank: int = 0


def _layer_params(a: HFArch, layer: int, t: int, ep: int, p: int, norm_bytes: int, spec: Spec) -> list[ParamSpec]:
    pre = f"decoder.layers.{layer}"
    qkv_out = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim // t
    out: list[ParamSpec] = []
    if spec == "local":
        out.append(ParamSpec(name=f"{pre}.input_layernorm.weight", shape=(a.hidden_size,), bytes_per_element=norm_bytes))
        out.append(ParamSpec(name=f"{pre}.self_attention.linear_proj.weight", shape=(a.hidden_size, a.num_heads * a.head_dim // t), bytes_per_element=p))
        out.append(ParamSpec(name=f"{pre}.self_attention.linear_qkv.weight", shape=(qkv_out, a.hidden_size), bytes_per_element=p))
    else:  # TE: the norm lives inside the fused LayerNormLinear
        out.append(ParamSpec(name=f"{pre}.self_attention.linear_proj.weight", shape=(a.hidden_size, a.num_heads * a.head_dim // t), bytes_per_element=p))
        out.append(ParamSpec(name=f"{pre}.self_attention.linear_qkv.layer_norm_weight", shape=(a.hidden_size,), bytes_per_element=p))
        out.append(ParamSpec(name=f"{pre}.self_attention.linear_qkv.weight", shape=(qkv_out, a.hidden_size), bytes_per_element=p))
    if a.qkv_bias:
        out.append(ParamSpec(name=f"{pre}.self_attention.linear_qkv.bias", shape=(qkv_out,), bytes_per_element=p))
    if a.qk_layernorm:
        for which in ("q", "k"):
            out.append(ParamSpec(name=f"{pre}.self_attention.{which}_layernorm.weight", shape=(a.head_dim,), bytes_per_element=norm_bytes))
    moe = a.moe is not None and a.moe.layer_pattern[layer] == 1
    if spec == "local" or moe:
        out.append(ParamSpec(name=f"{pre}.pre_mlp_layernorm.weight", shape=(a.hidden_size,), bytes_per_element=norm_bytes))
    if moe:
        m = a.moe
        out.append(ParamSpec(name=f"{pre}.mlp.router.weight", shape=(m.num_experts, a.hidden_size), bytes_per_element=p))
        ffn = m.ffn_hidden_size // t  # expert tensor-parallel size = TP (Megatron's default)
        for e in range(m.num_experts // ep):
            base = f"{pre}.mlp.experts.local_experts.{e}"
            out.append(ParamSpec(name=f"{base}.linear_fc1.weight", shape=(2 * ffn, a.hidden_size), bytes_per_element=p, expert_parallel=ep > 1))
            out.append(ParamSpec(name=f"{base}.linear_fc2.weight", shape=(a.hidden_size, ffn), bytes_per_element=p, expert_parallel=ep > 1))
        return out
    if spec == "te":
        out.append(ParamSpec(name=f"{pre}.mlp.linear_fc1.layer_norm_weight", shape=(a.hidden_size,), bytes_per_element=p))
    out.append(ParamSpec(name=f"{pre}.mlp.linear_fc1.weight", shape=(2 * a.intermediate_size // t, a.hidden_size), bytes_per_element=p))
    out.append(ParamSpec(name=f"{pre}.mlp.linear_fc2.weight", shape=(a.hidden_size, a.intermediate_size // t), bytes_per_element=p))
    return out


def check_layout(a: HFArch, *, tp: int, pp: int, ep: int = 1) -> list[str]:
    """Every reason this model cannot take TP/PP/EP (empty when it can)."""
    problems = []
    if a.num_heads % tp:
        problems.append(f"num_attention_heads {a.num_heads} not divisible by TP {tp}")
    if a.num_kv_heads % tp:
        problems.append(f"num_key_value_heads {a.num_kv_heads} not divisible by TP {tp}")
    if a.intermediate_size % tp:
        problems.append(f"intermediate_size {a.intermediate_size} not divisible by TP {tp}")
    if a.num_layers % pp:
        problems.append(f"num_hidden_layers {a.num_layers} not divisible by PP {pp}")
    if a.moe is None and ep > 1:
        problems.append(f"EP {ep} needs a mixture-of-experts model")
    if a.moe is not None:
        if a.moe.num_experts % ep:
            problems.append(f"num_experts {a.moe.num_experts} not divisible by EP {ep}")
        if a.moe.ffn_hidden_size % tp:
            problems.append(f"moe_intermediate_size {a.moe.ffn_hidden_size} not divisible by TP {tp}")
    return problems


def rank_params(
    arch: HFArch | dict[str, Any],
    layout: RankLayout,
    *,
    bf16: bool = True,
    spec: Spec = "te",
    make_vocab_size_divisible_by: int = 128,
) -> list[ParamSpec]:
    """Parameters of the rank at ``layout`` (its pipeline stage ``pp_rank``), in ``named_parameters`` order."""
    a = arch if isinstance(arch, HFArch) else hf_arch(arch)
    problems = check_layout(a, tp=layout.tp, pp=layout.pp, ep=layout.ep)
    if problems:
        raise ValueError("; ".join(problems))
    t, p = layout.tp, 2 if bf16 else 4
    norm_bytes = 4 if spec == "local" else p
    vocab = padded_vocab(a.vocab_size, make_vocab_size_divisible_by, t)
    first, last = layout.pp_rank == 0, layout.pp_rank == layout.pp - 1
    shared = a.tie_word_embeddings and layout.pp > 1
    out: list[ParamSpec] = []
    if first:
        out.append(ParamSpec(name="embedding.word_embeddings.weight", shape=(vocab // t, a.hidden_size), bytes_per_element=p,
                             shared_embedding=shared))  # fmt: skip
    per_stage = a.num_layers // layout.pp
    for local in range(per_stage):
        layer = layout.pp_rank * per_stage + local
        for ps in _layer_params(a, layer, t, layout.ep, p, norm_bytes, spec):
            out.append(ParamSpec(**{**ps.__dict__, "name": ps.name.replace(f"layers.{layer}.", f"layers.{local}.")}))
    if last:
        out.append(ParamSpec(name="decoder.final_layernorm.weight", shape=(a.hidden_size,), bytes_per_element=norm_bytes))
        if not a.tie_word_embeddings or not first:
            out.append(ParamSpec(name="output_layer.weight", shape=(vocab // t, a.hidden_size), bytes_per_element=p,
                                 shared_embedding=shared))  # fmt: skip
    return out


def total_params(arch: HFArch) -> int:
    """Parameters of the whole (unsharded, unpadded-vocabulary) model, as the HF checkpoint counts them."""
    a = arch
    per = _layer_counts(a)
    emb = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    return emb + a.hidden_size + sum(per)


def active_params(arch: HFArch) -> int:
    """Parameters one token passes through (MoE: only its top-k experts); embeddings excluded."""
    a = arch
    total = 0
    for layer in range(a.num_layers):
        moe = a.moe is not None and a.moe.layer_pattern[layer] == 1
        total += _attn_params(a) + 2 * a.hidden_size
        if moe:
            total += a.moe.num_experts * a.hidden_size + a.moe.topk * 3 * a.hidden_size * a.moe.ffn_hidden_size
        else:
            total += 3 * a.hidden_size * a.intermediate_size
    return total + a.vocab_size * a.hidden_size  # the output layer's matmul


def _attn_params(a: HFArch) -> int:
    qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    n = qkv * a.hidden_size + a.num_heads * a.head_dim * a.hidden_size
    n += qkv if a.qkv_bias else 0
    n += 2 * a.head_dim if a.qk_layernorm else 0
    return n


def _layer_counts(a: HFArch) -> list[int]:
    out = []
    for layer in range(a.num_layers):
        moe = a.moe is not None and a.moe.layer_pattern[layer] == 1
        mlp = (a.moe.num_experts * (3 * a.hidden_size * a.moe.ffn_hidden_size + 0) + a.moe.num_experts * a.hidden_size
               if moe else 3 * a.hidden_size * a.intermediate_size)  # fmt: skip
        out.append(_attn_params(a) + 2 * a.hidden_size + mlp)
    return out
