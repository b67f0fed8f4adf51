"""Bridge name tables, bucket planning and the export buffer's kept-tensor check (no processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_ghpo.bridge.buckets import (
    ALIGN,
    Bucket,
    BucketBuffer,
    bucket_capacity,
    largest_tensor_bytes,
    plan_buckets,
)
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


def test_buckets_pack_to_capacity_one_stage_each():
    entries = [_entry(0, "a", [(100,)]), _entry(0, "b", [(100,)]), _entry(0, "c", [(900,)]), _entry(0, "d", [(10,)]),
               _entry(1, "e", [(10,)]), _entry(1, "f", [(20,), (30,)])]  # fmt: skip
    skipped = PlanEntry(stage=1, chunk=0, name="tied", layout="vocab", local_shape=(4, 4), dtype=torch.float32, hf_names=(), hf_shapes=())
    plan = _plan([*entries, skipped])
    # c (3600 B -> 3648 aligned) exceeds bucket_bytes=1024: the buffer holds 3648 B, and buckets are packed up to that.
    assert bucket_capacity(plan, 1024, None) == 3648
    buckets = plan_buckets(plan, 1024, None)
    assert [[e.name for e in b.entries] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert [b.stage for b in buckets] == [0, 0, 0, 1]
    assert buckets[3].offsets == [[0], [64, 192]]  # e: 40 B -> 64; f.0: 80 B -> 128
    for b in buckets:
        assert all(o % ALIGN == 0 for offs in b.offsets for o in offs) and b.nbytes <= 3648
    # 448 + 448 + 3648 > 4096, so c starts a bucket that d (64 B) still fits in.
    assert [[e.name for e in b.entries] for b in plan_buckets(plan, 4096, None)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [[e.name for e in b.entries] for b in plan_buckets(plan, 64, None)] == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert largest_tensor_bytes(plan, None) == 3600 and largest_tensor_bytes(plan, torch.bfloat16) == 1800
    # Yield order: plan order, smallest tensor last (the one a consumer's loop variable still holds).
    assert [n for n, *_ in buckets[3].yield_order(None)] == ["f.0", "f.1", "e.0"]
    assert [n for n, *_ in plan_buckets(plan, 4096, None)[0].yield_order(None)] == ["b.0", "a.0"]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(plan, 0, None)
    assert isinstance(buckets[0], Bucket)


def test_buffer_reclaims_tensors_the_consumer_keeps():
    buf = BucketBuffer.allocate(1024, torch.device("cpu"))
    with pytest.raises(ValueError, match="flat uint8"):
        BucketBuffer(torch.zeros(4))
    with pytest.raises(ValueError, match="does not fit"):
        buf.view(1020, (2,), torch.float32)
    a = buf.hand_out(buf.view(0, (4, 2), torch.float32))
    b = buf.hand_out(buf.view(64, (3,), torch.bfloat16))
    dropped = buf.hand_out(buf.view(128, (4,), torch.float32))
    assert a.data_ptr() == buf.t.data_ptr() and b.data_ptr() == buf.t.data_ptr() + 64 and a._base is None
    a.copy_(torch.arange(8.0).view(4, 2))
    b.fill_(1.5)
    del dropped
    assert buf.reclaim() == 32 + 6  # a and b are alive: moved to private copies
    buf.t.fill_(0)  # the next bucket overwrites the buffer
    assert torch.equal(a, torch.arange(8.0).view(4, 2)) and torch.equal(b, torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert buf.reclaim() == 0
