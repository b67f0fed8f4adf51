"""Declarative Megatron <-> Hugging Face name tables, one per architecture family.

A :class:`Rule` names one Megatron parameter (with its Transformer Engine spelling, when the TE
layer spec fuses a norm into the following linear layer), the HF tensor(s) it corresponds to and
the :mod:`~megatron_ghpo.bridge.layout` that relates them. Layer rules are relative to one decoder
layer (``decoder.layers.<i>.``); ``{layer}`` in an HF name is the *global* layer index (the pipeline
offset, and the virtual-pipeline chunk offset, already applied).

Expert rules (mixture of experts) name a parameter of one *local* expert,
``mlp.experts.local_experts.{expert}.<...>``; ``{expert}`` in their HF names is the *global* expert
index (expert-parallel rank x experts per rank + local index). Their layouts split over the
expert tensor-parallel group instead of the TP group.

The tables are the single source of truth for live weight sync and offline conversion. A Megatron
parameter no rule matches, or an HF tensor no rule produces, is an error that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megatron_ghpo.bridge.layout import LAYOUTS, ModelDims
from megatron_ghpo.policy.hf_arch import hf_arch, load_hf_config


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it holds."""

    megatron: str
    """Name under the model (global rules) or under ``decoder.layers.<i>.`` (layer rules), local spec."""
    hf: tuple[str, ...]
    """HF names; ``{layer}`` is replaced by the global layer index."""
    layout: str
    """One of :data:`~megatron_ghpo.bridge.layout.LAYOUTS`."""
    te_names: tuple[str, ...] = ()
    """The same parameter's name under the Transformer Engine layer spec."""
    tied_hf: tuple[str, ...] | None = None
    """With tied embeddings: not exported (HF has no such tensor); imported from these HF names."""
    expert: bool = False
    """A parameter of one routed expert (``{expert}`` in both names; sharded over EP and ETP)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"rule {self.megatron}: unknown layout {self.layout!r}; expected one of {LAYOUTS}")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.megatron, *self.te_names)


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """The name table of one HF architecture family."""

    name: str
    hf_model_types: tuple[str, ...]
    """``config.model_type`` values this table serves."""
    model_rules: tuple[Rule, ...]
    layer_rules: tuple[Rule, ...]
    hf_ignored: tuple[str, ...] = (r".*\.rotary_emb\.inv_freq$",)
    """Regexes of HF tensors that carry no weights (buffers some checkpoints store); skipped on import."""

    def match(self, megatron_name: str) -> tuple[Rule, int | None]:
        """The rule for a Megatron parameter name and its *local* layer index (None outside layers).

        Raises ``KeyError`` naming the parameter when no rule matches.
        """
        m = _LAYER_RE.match(megatron_name)
        if m:
            index, rel = int(m.group(1)), _EXPERT_RE.sub(r"\1{expert}\3", m.group(2))
            for rule in self.layer_rules:
                if rel in rule.names:
                    return rule, index
        else:
            for rule in self.model_rules:
                if megatron_name in rule.names:
                    return rule, None
        known = sorted({n for r in self.model_rules for n in r.names} | {f"decoder.layers.<i>.{n}" for r in self.layer_rules for n in r.names})
        raise KeyError(
            f"Megatron parameter {megatron_name!r} has no rule in the {self.name} bridge table; "
            f"known names: {known}. Add a Rule to megatron_ghpo/bridge/mapping.py if the model really has it."
        )

    def is_ignored_hf(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.hf_ignored)


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def local_expert(megatron_name: str) -> int | None:
    """The local expert index in ``...mlp.experts.local_experts.<e>.<...>``, or None."""
    m = _LAYER_RE.match(megatron_name)
    e = _EXPERT_RE.match(m.group(2)) if m else None
    return int(e.group(2)) if e else None


def hf_names(
    rule: Rule, layer: int | None, *, tied: bool, for_import: bool, expert: int | None = None
) -> tuple[str, ...]:
    """HF names of ``rule`` at global ``layer`` (and global ``expert`` for expert rules); ``()`` when
    the tensor is not exported (tied lm_head)."""
    names = rule.hf
    if tied and rule.tied_hf is not None:
        if not for_import:
            return ()
        names = rule.tied_hf
    if rule.expert and expert is None:
        raise ValueError(f"rule {rule.megatron} is an expert rule: pass the global expert index")
    if layer is None:
        return names
    return tuple(n.format(layer=layer, expert=expert) for n in names)


def _layer(rel: str, hf: str | tuple[str, ...], layout: str, te: tuple[str, ...] = (), *, expert: bool = False) -> Rule:
    hf_t = (hf,) if isinstance(hf, str) else hf
    return Rule(
        megatron=rel, hf=tuple(f"model.layers.{{layer}}.{h}" for h in hf_t), layout=layout, te_names=te, expert=expert
    )


_EMBED = Rule(megatron="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",), layout="vocab")
_FINAL_NORM = Rule(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",), layout="replicated")
_LM_HEAD = Rule(
    megatron="output_layer.weight", hf=("lm_head.weight",), layout="vocab", tied_hf=("model.embed_tokens.weight",)
)

_DECODER_LAYER = (
    _layer("input_layernorm.weight", "input_layernorm.weight", "replicated", ("self_attention.linear_qkv.layer_norm_weight",)),
    _layer(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    _layer("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    _layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "row"),
    _layer("self_attention.linear_proj.bias", "self_attn.o_proj.bias", "replicated"),
    _layer(
        "pre_mlp_layernorm.weight", "post_attention_layernorm.weight", "replicated", ("mlp.linear_fc1.layer_norm_weight",)
    ),
    _layer("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    _layer("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), "gate_up"),
    _layer("mlp.linear_fc2.weight", "mlp.down_proj.weight", "row"),
    _layer("mlp.linear_fc2.bias", "mlp.down_proj.bias", "replicated"),
)
"""Llama and Qwen2 share the decoder layout; they differ in which biases exist (Qwen2: QKV bias
always; Llama: ``attention_bias`` adds QKV and o_proj biases, ``mlp_bias`` the MLP biases). A rule
applies only to parameters the built Megatron model has, so one table serves every variant."""

_QK_NORM = (
    _layer("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", "replicated"),
    _layer("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", "replicated"),
)
"""Qwen3's RMSNorm over each query / key head (weight ``[head_dim]``, shared by all heads)."""

_MOE = (
    _layer("mlp.router.weight", "mlp.gate.weight", "replicated"),
    _layer(
        "mlp.experts.local_experts.{expert}.linear_fc1.weight",
        ("mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight"),
        "gate_up",
        expert=True,
    ),
    _layer("mlp.experts.local_experts.{expert}.linear_fc2.weight", "mlp.experts.{expert}.down_proj.weight", "row", expert=True),
)
"""Qwen3-MoE's block: the router (``[num_experts, h]``, replicated) and per-expert SwiGLU MLPs in the
checkpoint layout (one ``gate_proj``/``up_proj``/``down_proj`` per expert). Megatron's local and TE
``SequentialMLP`` experts; grouped-GEMM experts (``moe_grouped_gemm``) have other names and are not
mapped. Dense layers of a mixed layout use the dense MLP rules."""

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        name="llama", hf_model_types=("llama",), model_rules=(_EMBED, _FINAL_NORM, _LM_HEAD), layer_rules=_DECODER_LAYER
    ),
    "qwen2": ArchSpec(
        name="qwen2", hf_model_types=("qwen2",), model_rules=(_EMBED, _FINAL_NORM, _LM_HEAD), layer_rules=_DECODER_LAYER
    ),
    "qwen3": ArchSpec(
        name="qwen3", hf_model_types=("qwen3", "qwen3_moe"), model_rules=(_EMBED, _FINAL_NORM, _LM_HEAD),
        layer_rules=_DECODER_LAYER + _QK_NORM + _MOE,
    ),  # fmt: skip
}


def arch_for(hf_config: Any) -> ArchSpec:
    """The table for an HF config (folder, ``config.json`` path, ``PretrainedConfig`` or dict)."""
    model_type = load_hf_config(hf_config).get("model_type")
    for spec in ARCHS.values():
        if model_type in spec.hf_model_types:
            return spec
    supported = sorted(t for s in ARCHS.values() for t in s.hf_model_types)
    raise NotImplementedError(f"the weight bridge has no table for HF model_type {model_type!r}; supported: {supported}")


def experts_per_rank(hf_config: Any, ep: int) -> int:
    """Routed experts each of ``ep`` expert-parallel ranks holds (0 for a dense model)."""
    moe = hf_arch(hf_config).moe
    if moe is None:
        return 0
    if moe.num_experts % ep:
        raise ValueError(f"expert_model_parallel_size={ep} does not divide num_experts={moe.num_experts}")
    return moe.num_experts // ep


def dims_from_hf(hf_config: Any) -> ModelDims:
    """:class:`ModelDims` from an HF config, read as the model provider reads it."""
    arch = hf_arch(hf_config)
    return ModelDims(
        num_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, head_dim=arch.head_dim, vocab_size=arch.vocab_size
    )


def is_tied(hf_config: Any) -> bool:
    """Whether the HF model ties ``lm_head`` to the input embedding (then HF stores no ``lm_head``)."""
    return hf_arch(hf_config).tie_word_embeddings
