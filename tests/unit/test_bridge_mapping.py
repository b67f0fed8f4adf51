"""Bridge name tables, bucket planning and the export buffer's kept-tensor check (no processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_ghpo.bridge.buckets import ALIGN, Bucket, BucketBuffer, largest_tensor_bytes, plan_buckets
from megatron_ghpo.bridge.layout import ModelDims
from megatron_ghpo.bridge.mapping import ARCHS, arch_for, dims_from_hf, hf_names, is_tied
from megatron_ghpo.bridge.plan import Plan, PlanEntry

pytestmark = pytest.mark.unit

LOCAL_TO_HF = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "output_layer.weight": ("lm_head.weight",),
    "decoder.layers.0.input_layernorm.weight": ("model.layers.7.input_layernorm.weight",),
    "decoder.layers.0.self_attention.linear_qkv.weight": (
        "model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight", "model.layers.7.self_attn.v_proj.weight",
    ),
    "decoder.layers.0.self_attention.linear_qkv.bias": (
        "model.layers.7.self_attn.q_proj.bias", "model.layers.7.self_attn.k_proj.bias", "model.layers.7.self_attn.v_proj.bias",
    ),
    "decoder.layers.0.self_attention.linear_proj.weight": ("model.layers.7.self_attn.o_proj.weight",),
    "decoder.layers.0.pre_mlp_layernorm.weight": ("model.layers.7.post_attention_layernorm.weight",),
    "decoder.layers.0.mlp.linear_fc1.weight": ("model.layers.7.mlp.gate_proj.weight", "model.layers.7.mlp.up_proj.weight"),
    "decoder.layers.0.mlp.linear_fc2.weight": ("model.layers.7.mlp.down_proj.weight",),
}  # fmt: skip
TE_ALIASES = {
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "decoder.layers.0.pre_mlp_layernorm.weight",
}


def _hf(spec, name, *, tied=False, for_import=False, offset=7):
    rule, local = spec.match(name)
    return hf_names(rule, None if local is None else local + offset, tied=tied, for_import=for_import)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_local_and_te_names_map_to_hf(arch):
    spec = ARCHS[arch]
    for name, hf in LOCAL_TO_HF.items():
        assert _hf(spec, name) == hf, name
    for te, local in TE_ALIASES.items():
        assert _hf(spec, te) == _hf(spec, local)
    assert spec.match("decoder.layers.12.mlp.linear_fc2.weight")[1] == 12


def test_tied_output_layer_is_not_exported_but_imported_from_embedding():
    spec = ARCHS["qwen2"]
    assert _hf(spec, "output_layer.weight", tied=True) == ()
    assert _hf(spec, "output_layer.weight", tied=True, for_import=True) == ("model.embed_tokens.weight",)


def test_unknown_names_are_errors_naming_them():
    spec = ARCHS["llama"]
    with pytest.raises(KeyError, match=r"decoder\.layers\.3\.self_attention\.q_layernorm\.weight"):
        spec.match("decoder.layers.3.self_attention.q_layernorm.weight")
    with pytest.raises(KeyError, match="mtp.weight"):
        spec.match("mtp.weight")
    assert spec.is_ignored_hf("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not spec.is_ignored_hf("model.layers.0.self_attn.q_proj.weight")


def test_arch_and_dims_from_hf_config():
    from transformers import LlamaConfig, Qwen2Config

    q = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True)
    assert arch_for(q).name == "qwen2" and is_tied(q)
    assert dims_from_hf(q) == ModelDims(num_heads=4, num_query_groups=2, head_dim=16, vocab_size=500)
    ll = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, vocab_size=77, head_dim=32)
    assert arch_for(ll).name == "llama" and not is_tied(ll) and dims_from_hf(ll).head_dim == 32
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
        arch_for({"model_type": "gpt2"})


def _entry(stage, name, shapes, dtype=torch.float32):
    return PlanEntry(stage=stage, chunk=0, name=name, layout="replicated", local_shape=shapes[0], dtype=dtype,
                     hf_names=tuple(f"{name}.{i}" for i in range(len(shapes))), hf_shapes=tuple(shapes))  # fmt: skip


def _plan(entries):
    dims = ModelDims(num_heads=1, num_query_groups=1, head_dim=1, vocab_size=1)
    return Plan(entries=tuple(entries), dims=dims, arch=ARCHS["qwen2"], tp=1, tied=False)


def test_buckets_respect_budget_and_stages():
    entries = [_entry(0, "a", [(100,)]), _entry(0, "b", [(100,)]), _entry(0, "c", [(1000,)]), _entry(0, "d", [(10,)]),
               _entry(1, "e", [(10,)]), _entry(1, "f", [(20,), (30,)])]  # fmt: skip
    skipped = PlanEntry(stage=1, chunk=0, name="tied", layout="vocab", local_shape=(4, 4), dtype=torch.float32, hf_names=(), hf_shapes=())
    plan = _plan([*entries, skipped])
    buckets = plan_buckets(plan, 1024, None)
    names = [[e.name for e in b.entries] for b in buckets]
    assert names == [["a", "b"], ["c"], ["d"], ["e", "f"]]  # c alone exceeds 1024 B: its own bucket
    assert [b.stage for b in buckets] == [0, 0, 0, 1]
    for b in buckets:
        flat = [(o, e) for e, offs in zip(b.entries, b.offsets) for o in offs]
        assert all(o % ALIGN == 0 for o, _ in flat)
        assert b.nbytes <= 1024 or len(b.entries) == 1
    assert buckets[3].offsets == [[0], [64, 192]]  # e: 40 B -> 64; f.0: 80 B -> 128
    assert largest_tensor_bytes(plan, None) == 4000
    assert largest_tensor_bytes(plan, torch.bfloat16) == 2000
    assert max(b.nbytes for b in plan_buckets(plan, 1024, torch.bfloat16)) <= 2048
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(plan, 0, None)
    assert isinstance(buckets[0], Bucket)


def test_buffer_detects_kept_tensors_except_the_last():
    buf = BucketBuffer.allocate(1024, torch.device("cpu"))
    with pytest.raises(ValueError, match="flat uint8"):
        BucketBuffer(torch.zeros(4))
    views = [buf.hand_out(buf.view(64 * i, (4, 2), torch.float32)) for i in range(3)]
    assert buf.view(64, (4, 2), torch.float32).data_ptr() == buf.t.data_ptr() + 64
    assert buf.kept() == 2  # the first two are still referenced; the last one is allowed
    views.clear()
    first = buf.hand_out(buf.view(0, (2,), torch.bfloat16))
    last = buf.hand_out(buf.view(64, (2,), torch.bfloat16))
    del first
    assert buf.kept() == 0 and last.dtype == torch.bfloat16
