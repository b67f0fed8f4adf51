"""Layouts of the weight bridge: hand-worked small cases, and a property test against an
independent construction of Megatron's fused/sharded layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_ghpo.bridge.layout import ModelDims, hf_shapes, padded_rows, padding_view, shard_pairs

pytestmark = pytest.mark.unit


def to_megatron(layout: str, hf: list[torch.Tensor], local_shape: tuple[int, ...], rank: int, tp: int, dims: ModelDims) -> torch.Tensor:
    local = torch.full(local_shape, float("nan"))
    for loc, h in shard_pairs(layout, local, hf, rank, tp, dims):
        loc.copy_(h)
    pad = padding_view(layout, local, rank, tp, dims)
    if pad is not None:
        pad.zero_()
    return local


def to_hf(layout: str, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
    tp = len(shards)
    hf = [torch.full(s, float("nan")) for s in hf_shapes(layout, tuple(shards[0].shape), tp, dims)]
    for r, shard in enumerate(shards):
        for loc, h in shard_pairs(layout, shard, hf, r, tp, dims):
            h.copy_(loc)
    return hf


def test_qkv_gqa_hand_worked():
    # 4 query heads in 2 groups, head_dim 1, hidden 1: Megatron interleaves [q q k v] per group.
    dims = ModelDims(num_heads=4, num_query_groups=2, head_dim=1, vocab_size=10)
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    full = to_megatron("qkv", [q, k, v], (8, 1), 0, 1, dims)
    assert full.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    r0 = to_megatron("qkv", [q, k, v], (4, 1), 0, 2, dims)
    r1 = to_megatron("qkv", [q, k, v], (4, 1), 1, 2, dims)
    assert r0.flatten().tolist() == [10, 11, 20, 30] and r1.flatten().tolist() == [12, 13, 21, 31]
    back = to_hf("qkv", [r0, r1], dims)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_qkv_mha_bias_hand_worked():
    dims = ModelDims(num_heads=2, num_query_groups=2, head_dim=2, vocab_size=10)
    q, k, v = torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8]), torch.tensor([9.0, 10, 11, 12])
    full = to_megatron("qkv", [q, k, v], (12,), 0, 1, dims)
    assert full.tolist() == [1, 2, 5, 6, 9, 10, 3, 4, 7, 8, 11, 12]


def test_gate_up_per_tp_shard_hand_worked():
    dims = ModelDims(num_heads=1, num_query_groups=1, head_dim=1, vocab_size=10)
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    assert to_megatron("gate_up", [gate, up], (8, 1), 0, 1, dims).flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    r0 = to_megatron("gate_up", [gate, up], (4, 1), 0, 2, dims)
    r1 = to_megatron("gate_up", [gate, up], (4, 1), 1, 2, dims)
    assert r0.flatten().tolist() == [0, 1, 10, 11] and r1.flatten().tolist() == [2, 3, 12, 13]


def test_vocab_padding_added_on_import_and_dropped_on_export():
    dims = ModelDims(num_heads=1, num_query_groups=1, head_dim=1, vocab_size=5)
    emb = torch.arange(10.0).view(5, 2)
    assert padded_rows(5, 4) == 8
    r0 = to_megatron("vocab", [emb], (4, 2), 0, 2, dims)
    r1 = to_megatron("vocab", [emb], (4, 2), 1, 2, dims)
    assert torch.equal(r0, emb[:4])
    assert torch.equal(r1[:1], emb[4:]) and torch.equal(r1[1:], torch.zeros(3, 2))
    assert torch.equal(to_hf("vocab", [r0, r1], dims)[0], emb)
    # A shard made only of padding maps to nothing.
    dims3 = ModelDims(num_heads=1, num_query_groups=1, head_dim=1, vocab_size=3)
    assert shard_pairs("vocab", torch.zeros(4, 2), [torch.zeros(3, 2)], 1, 2, dims3) == []


def test_row_and_column_splits():
    dims = ModelDims(num_heads=1, num_query_groups=1, head_dim=1, vocab_size=10)
    w = torch.arange(12.0).view(3, 4)
    assert torch.equal(to_megatron("row", [w], (3, 2), 1, 2, dims), w[:, 2:])
    assert torch.equal(to_megatron("column", [w], (1, 4), 2, 3, dims), w[2:])
    assert torch.equal(to_megatron("replicated", [w], (3, 4), 1, 2, dims), w)


def test_shape_mismatch_names_shapes():
    dims = ModelDims(num_heads=4, num_query_groups=2, head_dim=1, vocab_size=10)
    with pytest.raises(ValueError, match=r"HF tensors have shapes \[\(5, 1\)\], expected \[\(4, 1\)\]"):
        shard_pairs("column", torch.zeros(2, 1), [torch.zeros(5, 1)], 0, 2, dims)
    with pytest.raises(ValueError, match="does not hold 2 query groups"):
        hf_shapes("qkv", (7, 1), 1, dims)
    with pytest.raises(ValueError, match="unknown layout"):
        hf_shapes("diagonal", (1,), 1, dims)
    with pytest.raises(ValueError, match="not a multiple"):
        ModelDims(num_heads=3, num_query_groups=2, head_dim=1, vocab_size=1)


def reference_megatron_shards(layout, hf, tp, dims, padded_vocab):
    """Megatron's layouts written independently of shard_pairs: fuse, then chunk per TP rank."""
    if layout == "qkv":
        q, k, v = hf
        qpg, d = dims.heads_per_group, dims.head_dim
        groups = [torch.cat([q[g * qpg * d : (g + 1) * qpg * d], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]])
                  for g in range(dims.num_query_groups)]  # fmt: skip
        return list(torch.cat(groups).chunk(tp))
    if layout == "gate_up":
        return [torch.cat([g, u]) for g, u in zip(hf[0].chunk(tp), hf[1].chunk(tp))]
    if layout == "vocab":
        padded = torch.cat([hf[0], torch.zeros(padded_vocab - hf[0].shape[0], *hf[0].shape[1:])])
        return list(padded.chunk(tp))
    if layout == "row":
        return list(hf[0].chunk(tp, dim=1))
    return list(hf[0].chunk(tp))


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(["qkv", "gate_up", "vocab", "row", "column"]),
    groups_per_rank=st.integers(1, 3), qpg=st.integers(1, 3), head_dim=st.integers(1, 3),
    hidden=st.integers(1, 3), tp=st.sampled_from([1, 2, 4]), vocab=st.integers(1, 30), bias=st.booleans(),
)  # fmt: skip
def test_round_trip_matches_independent_megatron_layout(layout, groups_per_rank, qpg, head_dim, hidden, tp, vocab, bias):
    ng = groups_per_rank * tp
    dims = ModelDims(num_heads=ng * qpg, num_query_groups=ng, head_dim=head_dim, vocab_size=vocab)
    rest = () if (bias and layout in ("qkv", "gate_up")) else (hidden,)
    g = torch.Generator().manual_seed(ng * 100 + qpg * 10 + head_dim)
    padded = padded_rows(vocab, 2 * tp)
    local_shape = {
        "qkv": (ng // tp * (qpg + 2) * head_dim, *rest),
        "gate_up": (2 * ng // tp * head_dim, *rest),
        "vocab": (padded // tp, hidden),
        "row": (hidden, ng // tp * head_dim),
        "column": (ng // tp * head_dim, hidden),
    }[layout]
    hf = [torch.randn(s, generator=g) for s in hf_shapes(layout, local_shape, tp, dims)]
    shards = [to_megatron(layout, hf, local_shape, r, tp, dims) for r in range(tp)]
    expected = reference_megatron_shards(layout, hf, tp, dims, padded)
    assert all(torch.equal(a, b) for a, b in zip(shards, expected))
    back = to_hf(layout, shards, dims)
    assert all(torch.equal(a, b) for a, b in zip(back, hf))
