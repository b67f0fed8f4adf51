"""Qwen3 and Qwen3-MoE: HF config reading, the Megatron config fields, expert name rules (no processes)."""

from __future__ import annotations

import pytest

from megatron_ghpo.bridge.mapping import ARCHS, arch_for, experts_per_rank, hf_names, local_expert
from megatron_ghpo.policy.hf_arch import hf_arch

pytestmark = pytest.mark.unit

QWEN3 = {
    "model_type": "qwen3", "vocab_size": 500, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "layer_types": ["full_attention"] * 2,
}  # fmt: skip
MOE = {
    **QWEN3, "model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1],
    "router_aux_loss_coef": 0.001, "layer_types": ["full_attention"] * 4,
}  # fmt: skip


def test_qwen3_reads_qk_norm_and_explicit_head_dim():
    a = hf_arch(QWEN3)
    assert a.qk_layernorm and a.head_dim == 24 and a.num_heads * a.head_dim != a.hidden_size
    assert not a.qkv_bias and a.moe is None and a.rope_theta == 1e6


def test_qwen3_moe_layer_pattern_and_router_fields():
    m = hf_arch(MOE).moe
    assert (m.num_experts, m.topk, m.ffn_hidden_size, m.norm_topk_prob) == (8, 2, 32, True)
    assert m.layer_pattern == (1, 0, 1, 1)
    # decoder_sparse_step=2: layers 1 and 3 are MoE (transformers: (i + 1) % step == 0), 1 is dense-only
    assert hf_arch({**MOE, "decoder_sparse_step": 2}).moe.layer_pattern == (0, 0, 0, 1)
    # transformers >= 5 writes num_local_experts
    legacy = {k: v for k, v in MOE.items() if k != "num_experts"} | {"num_local_experts": 8}
    assert hf_arch(legacy).moe.num_experts == 8
    # no MoE layer left: a dense model
    assert hf_arch({**MOE, "mlp_only_layers": [0, 1, 2, 3]}).moe is None


@pytest.mark.parametrize(
    "change,error,field",
    [
        ({"num_experts_per_tok": 9}, ValueError, "num_experts_per_tok"),
        ({}, ValueError, "moe_intermediate_size"),
        ({"mlp_only_layers": [4]}, ValueError, "mlp_only_layers"),
        ({"decoder_sparse_step": 0}, ValueError, "decoder_sparse_step"),
        ({"shared_expert_intermediate_size": 64}, NotImplementedError, "shared_expert_intermediate_size"),
        ({"attention_bias": True}, NotImplementedError, "attention_bias"),
        ({"layer_types": ["full_attention", "sliding_attention"] * 2}, NotImplementedError, "sliding_attention"),
        ({"use_sliding_window": True, "sliding_window": 16}, NotImplementedError, "use_sliding_window"),
    ],
)
def test_qwen3_moe_refusals_name_the_field(change, error, field):
    cfg = {**MOE, **change}
    if field == "moe_intermediate_size":
        del cfg["moe_intermediate_size"]
    with pytest.raises(error, match=field):
        hf_arch(cfg)


def test_moe_kwargs_match_transformers_router_semantics():
    from megatron_ghpo.policy.model import moe_kwargs

    m = hf_arch(MOE).moe
    kw = moe_kwargs(m, ep=2, etp=1)
    # renormalised top-k == softmax over the chosen logits == Megatron's top-k-then-softmax
    assert kw["moe_router_pre_softmax"] is False and kw["moe_router_score_function"] == "softmax"
    assert moe_kwargs(hf_arch({**MOE, "norm_topk_prob": False}).moe, ep=1, etp=1)["moe_router_pre_softmax"] is True
    assert kw["moe_layer_freq"] == [1, 0, 1, 1] and kw["num_moe_experts"] == 8 and kw["moe_router_topk"] == 2
    assert kw["moe_ffn_hidden_size"] == 32 and kw["moe_grouped_gemm"] is False
    assert (kw["expert_model_parallel_size"], kw["expert_tensor_parallel_size"]) == (2, 1)
    assert kw["moe_expert_capacity_factor"] is None and kw["moe_router_load_balancing_type"] == "aux_loss"
    assert moe_kwargs(hf_arch({**MOE, "router_aux_loss_coef": 0.0}).moe, ep=1, etp=1)["moe_router_load_balancing_type"] == "none"


def test_transformer_config_from_hf_for_both_families():
    from megatron_ghpo.policy.model import transformer_config_from_hf

    dense = transformer_config_from_hf(QWEN3, tp=2)
    assert dense.qk_layernorm and dense.kv_channels == 24 and dense.num_moe_experts is None
    moe = transformer_config_from_hf(MOE, ep=4, etp=1)
    assert moe.num_moe_experts == 8 and moe.expert_model_parallel_size == 4 and moe.moe_layer_freq == [1, 0, 1, 1]


@pytest.mark.parametrize(
    "cfg,kwargs,match",
    [
        (QWEN3, {"ep": 2}, "needs a mixture-of-experts model"),
        (MOE, {"ep": 3}, "does not divide num_experts=8"),
        (MOE, {"ep": 0}, "expert_model_parallel_size must be a positive integer"),
        (MOE, {"etp": 0}, "expert_tensor_parallel_size must be a positive integer"),
    ],
)
def test_expert_sizes_are_checked_against_the_model(cfg, kwargs, match):
    from megatron_ghpo.policy.model import transformer_config_from_hf

    with pytest.raises(ValueError, match=match):
        transformer_config_from_hf(cfg, **kwargs)


def test_moe_training_at_tp2_without_sequence_parallel_is_refused_on_the_local_path():
    from megatron_ghpo.policy.model import transformer_config_from_hf

    with pytest.raises(NotImplementedError, match="tensor_model_parallel_size=2 needs sequence_parallel"):
        transformer_config_from_hf(MOE, tp=2)
    assert transformer_config_from_hf(MOE, tp=2, for_training=False).expert_tensor_parallel_size == 2
    assert transformer_config_from_hf(QWEN3, tp=2).num_moe_experts is None  # dense models: no such limit


def test_expert_grid_must_divide_a_pipeline_stage():
    from megatron_ghpo.policy.parallel import check_expert_parallel_sizes

    check_expert_parallel_sizes(4, 2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"expert_tensor_parallel_size 2 x expert_model_parallel_size 2 = 4 does not divide the 2"):
        check_expert_parallel_sizes(4, 2, 2, 2, 2)


def test_expert_rules_map_local_to_global_expert_names():
    spec = arch_for(MOE)
    assert spec is ARCHS["qwen3"] and arch_for(QWEN3) is spec
    name = "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight"
    rule, layer = spec.match(name)
    assert rule.expert and rule.layout == "gate_up" and layer == 3 and local_expert(name) == 1
    per_rank = experts_per_rank(MOE, 4)
    assert per_rank == 2
    got = hf_names(rule, 5, tied=False, for_import=False, expert=3 * per_rank + 1)
    assert got == ("model.layers.5.mlp.experts.7.gate_proj.weight", "model.layers.5.mlp.experts.7.up_proj.weight")
    down, _ = spec.match("decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight")
    assert down.layout == "row" and hf_names(down, 0, tied=False, for_import=False, expert=0) == (
        "model.layers.0.mlp.experts.0.down_proj.weight",
    )
    router, _ = spec.match("decoder.layers.0.mlp.router.weight")
    assert router.layout == "replicated" and hf_names(router, 2, tied=False, for_import=False) == ("model.layers.2.mlp.gate.weight",)
    qn, _ = spec.match("decoder.layers.0.self_attention.q_layernorm.weight")
    assert hf_names(qn, 1, tied=False, for_import=False) == ("model.layers.1.self_attn.q_norm.weight",)
    with pytest.raises(ValueError, match="expert rule"):
        hf_names(rule, 0, tied=False, for_import=False)
    assert local_expert("decoder.layers.0.mlp.linear_fc1.weight") is None
    assert experts_per_rank(QWEN3, 1) == 0
    with pytest.raises(ValueError, match="does not divide num_experts=8"):
        experts_per_rank(MOE, 3)
