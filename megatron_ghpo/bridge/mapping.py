"""Declarative Megatron <-> Hugging Face name tables, one per architecture family.

A :class:`Rule` names one Megatron parameter (with its Transformer Engine spelling, when the TE
layer spec fuses a norm into the following linear layer), the HF tensor(s) it corresponds to and
the :mod:`~megatron_ghpo.bridge.layout` that relates them. Layer rules are relative to one decoder
layer (``decoder.layers.<i>.``); ``{layer}`` in an HF name is the *global* layer index (the pipeline
offset, and the virtual-pipeline chunk offset, already applied).

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
            index, rel = int(m.group(1)), m.group(2)
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


def hf_names(rule: Rule, layer: int | None, *, tied: bool, for_import: bool) -> tuple[str, ...]:
    """HF names of ``rule`` at global ``layer``; ``()`` when the tensor is not exported (tied lm_head)."""
    names = rule.hf
    if tied and rule.tied_hf is not None:
        if not for_import:
            return ()
        names = rule.tied_hf
    if layer is None:
        return names
    return tuple(n.format(layer=layer) for n in names)


def _layer(rel: str, hf: str | tuple[str, ...], layout: str, te: tuple[str, ...] = ()) -> Rule:
    hf_t = (hf,) if isinstance(hf, str) else hf
    return Rule(megatron=rel, hf=tuple(f"model.layers.{{layer}}.{h}" for h in hf_t), layout=layout, te_names=te)


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

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        name="llama", hf_model_types=("llama",), model_rules=(_EMBED, _FINAL_NORM, _LM_HEAD), layer_rules=_DECODER_LAYER
    ),
    "qwen2": ArchSpec(
        name="qwen2", hf_model_types=("qwen2",), model_rules=(_EMBED, _FINAL_NORM, _LM_HEAD), layer_rules=_DECODER_LAYER
    ),
}


def arch_for(hf_config: Any) -> ArchSpec:
    """The table for an HF config (folder, ``config.json`` path, ``PretrainedConfig`` or dict)."""
    model_type = load_hf_config(hf_config).get("model_type")
    for spec in ARCHS.values():
        if model_type in spec.hf_model_types:
            return spec
    supported = sorted(t for s in ARCHS.values() for t in s.hf_model_types)
    raise NotImplementedError(f"the weight bridge has no table for HF model_type {model_type!r}; supported: {supported}")


def dims_from_hf(hf_config: Any) -> ModelDims:
    """:class:`ModelDims` from an HF config, read as the model provider reads it."""
    arch = hf_arch(hf_config)
    return ModelDims(
        num_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, head_dim=arch.head_dim, vocab_size=arch.vocab_size
    )


def is_tied(hf_config: Any) -> bool:
    """Whether the HF model ties ``lm_head`` to the input embedding (then HF stores no ``lm_head``)."""
    return hf_arch(hf_config).tie_word_embeddings
