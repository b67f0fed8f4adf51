"""Tensor layouts: how one Megatron parameter's TP shard corresponds to pieces of HF tensors.

Every layout answers one question, in both directions at once: for TP rank ``r`` of ``tp``, which
view of the rank's local Megatron tensor holds which view of the full Hugging Face tensor(s)?
:func:`shard_pairs` returns ``(local_view, hf_view)`` pairs; exporting copies ``hf_view <- local_view``
for every rank's shard, importing copies ``local_view <- hf_view``. Both are plain ``copy_`` calls
on strided views, so neither direction allocates anything beyond the tensors it writes.

Layouts (``h`` = hidden size, ``d`` = head dim, ``nq`` query heads, ``ng`` query groups = KV heads,
``q = nq / ng`` query heads per group, ``f`` = FFN size, ``V`` = vocabulary, ``Vp`` = padded vocab):

``replicated``  norm weights: every rank holds the full tensor; HF ``[h]``.
``column``      split on dim 0: local ``[n / tp, ...]``, HF ``[n, ...]``.
``row``         split on dim 1: local ``[m, n / tp]``, HF ``[m, n]``.
``vocab``       split on dim 0 with padding: local ``[Vp / tp, h]``, HF ``[V, h]``; rows ``>= V``
                exist only in Megatron (zero on import, dropped on export).
``qkv``         Megatron's fused ``linear_qkv`` (weight ``[ng (q + 2) d, h]`` or bias ``[ng (q + 2) d]``)
                interleaved per query group: for each group ``g`` the rows are the ``q`` query heads
                of the group, then the group's key head, then its value head. TP splits whole groups.
                HF: ``q_proj [nq d, ...]``, ``k_proj [ng d, ...]``, ``v_proj [ng d, ...]``; query head
                ``i`` belongs to group ``i // q`` (the grouping of HF's ``repeat_kv``).
``gate_up``     Megatron's fused ``linear_fc1`` ``[2 f / tp, h]`` per rank = ``[gate_r; up_r]`` (each TP
                shard holds its own slice of both); HF ``gate_proj [f, h]``, ``up_proj [f, h]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUTS = ("replicated", "column", "row", "vocab", "qkv", "gate_up")
"""Layout names a mapping rule may use."""

TP_PARTITION_DIM = {"replicated": None, "column": 0, "row": 1, "vocab": 0, "qkv": 0, "gate_up": 0}
"""Megatron's ``partition_dim`` for each layout (None: not TP-partitioned)."""

HF_TENSOR_COUNT = {"replicated": 1, "column": 1, "row": 1, "vocab": 1, "qkv": 3, "gate_up": 2}
"""How many HF tensors one Megatron parameter of each layout maps to."""


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The model sizes the layouts need (taken from the HF config)."""

    num_heads: int
    """Query heads ``nq``."""
    num_query_groups: int
    """Key/value heads ``ng`` (``== nq`` for MHA)."""
    head_dim: int
    """``d``."""
    vocab_size: int
    """Unpadded vocabulary ``V`` (the HF embedding's rows)."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
                f"{self.num_query_groups}: grouped-query attention needs whole groups"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def hf_shapes(layout: str, local_shape: tuple[int, ...], tp: int, dims: ModelDims) -> list[tuple[int, ...]]:
    """Shapes of the HF tensor(s) a Megatron parameter with ``local_shape`` per TP rank maps to."""
    _check_layout(layout)
    shape = tuple(local_shape)
    if layout == "replicated":
        return [shape]
    if layout in ("column", "gate_up"):
        full = (shape[0] * tp, *shape[1:])
        return [full] if layout == "column" else [(full[0] // 2, *shape[1:])] * 2
    if layout == "row":
        return [(shape[0], shape[1] * tp, *shape[2:])]
    if layout == "vocab":
        return [(dims.vocab_size, *shape[1:])]
    rows_per_group = (dims.heads_per_group + 2) * dims.head_dim  # qkv
    groups = shape[0] * tp // rows_per_group
    if groups != dims.num_query_groups or shape[0] % rows_per_group != 0:
        raise ValueError(
            f"fused QKV of local shape {shape} at TP={tp} does not hold {dims.num_query_groups} query groups of "
            f"({dims.heads_per_group} query + 1 key + 1 value) heads x head_dim {dims.head_dim}"
        )
    rest = shape[1:]
    return [
        (dims.num_heads * dims.head_dim, *rest),
        (dims.num_query_groups * dims.head_dim, *rest),
        (dims.num_query_groups * dims.head_dim, *rest),
    ]


def shard_pairs(
    layout: str, local: torch.Tensor, hf: list[torch.Tensor], rank: int, tp: int, dims: ModelDims
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(local_view, hf_view)`` pairs of equal shape covering TP rank ``rank``'s shard.

    ``local``: the rank's Megatron tensor (or a tensor of the same shape, e.g. a received copy).
    ``hf``: the full HF tensor(s), shapes as :func:`hf_shapes`. For ``vocab`` the padding rows of
    ``local`` are not covered (see :func:`padding_view`). Views only: nothing is copied here.
    """
    _check_layout(layout)
    expected = hf_shapes(layout, tuple(local.shape), tp, dims)
    got = [tuple(t.shape) for t in hf]
    if got != expected:
        raise ValueError(f"{layout} layout at TP={tp}: HF tensors have shapes {got}, expected {expected}")
    if not 0 <= rank < tp:
        raise ValueError(f"TP rank {rank} outside [0, {tp})")
    n = local.shape[0]
    if layout == "replicated":
        return [(local, hf[0])]
    if layout == "column":
        return [(local, hf[0].narrow(0, rank * n, n))]
    if layout == "row":
        m = local.shape[1]
        return [(local, hf[0].narrow(1, rank * m, m))]
    if layout == "vocab":
        valid = max(0, min(n, dims.vocab_size - rank * n))
        if valid == 0:
            return []
        return [(local.narrow(0, 0, valid), hf[0].narrow(0, rank * n, valid))]
    if layout == "gate_up":
        half = n // 2
        return [
            (local.narrow(0, 0, half), hf[0].narrow(0, rank * half, half)),
            (local.narrow(0, half, half), hf[1].narrow(0, rank * half, half)),
        ]
    # qkv: local rows = [group][q heads | k | v][head_dim]
    q, d, rest = dims.heads_per_group, dims.head_dim, tuple(local.shape[1:])
    groups = n // ((q + 2) * d)
    grouped = local.view(groups, q + 2, d, *rest)
    first = rank * groups
    hq = hf[0].view(dims.num_query_groups, q, d, *rest).narrow(0, first, groups)
    hk = hf[1].view(dims.num_query_groups, d, *rest).narrow(0, first, groups)
    hv = hf[2].view(dims.num_query_groups, d, *rest).narrow(0, first, groups)
    return [(grouped[:, :q], hq), (grouped[:, q], hk), (grouped[:, q + 1], hv)]


def padding_view(layout: str, local: torch.Tensor, rank: int, tp: int, dims: ModelDims) -> torch.Tensor | None:
    """The rows of ``local`` that exist only in Megatron (vocabulary padding), or None."""
    if layout != "vocab":
        return None
    n = local.shape[0]
    valid = max(0, min(n, dims.vocab_size - rank * n))
    return local.narrow(0, valid, n - valid) if valid < n else None


def padded_rows(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (Megatron's padded vocabulary)."""
    if multiple < 1:
        raise ValueError(f"padding multiple must be >= 1, got {multiple}")
    return int(math.ceil(vocab_size / multiple) * multiple)
