"""RoPE at explicit per-token positions for one forward pass of a Megatron ``GPTModel`` chunk.

Megatron-Core's ``GPTModel`` applies rotary embeddings at positions ``0..S-1`` of each row and ignores
``position_ids``. Layouts where a token's position is not its offset in the row (shared-prompt rows:
every completion continues from the end of the prompt) need the angles of their own positions.
:func:`rope_at_positions` makes the chunk's ``RotaryEmbedding`` return, for the duration of one
forward, the table that Megatron itself computes, indexed by the given positions: ``[S, R, 1, D]``
instead of ``[S, 1, 1, D]`` (the rotary application broadcasts over the row dimension either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _rotary_module(model: Any) -> Any:
    """The ``rotary_pos_emb`` module of a (possibly DDP/Float16-wrapped) GPTModel chunk, or None."""
    from megatron.core.utils import get_attr_wrapped_model

    try:
        return get_attr_wrapped_model(model, "rotary_pos_emb", allow_none=False)
    except RuntimeError:  # no wrapper level has it
        return None


@contextmanager
def rope_at_positions(model: Any, position_ids: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the chunk's RoPE uses ``position_ids`` ([R, S] int64); None changes nothing."""
    if position_ids is None:
        yield
        return
    rope = _rotary_module(model)
    if rope is None:
        raise NotImplementedError(
            f"per-token RoPE positions need a GPTModel chunk with rotary embeddings; {type(model).__name__} has none "
            "(use a layout without shared prompts)"
        )
    if "forward" in vars(rope):
        raise RuntimeError("rope_at_positions is already active on this model chunk (nested forward?)")
    own_forward = rope.forward
    seq = position_ids.shape[1]

    def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None) -> torch.Tensor:
        if packed_seq or offset:
            raise NotImplementedError("per-token RoPE positions with packed (THD) sequences or a RoPE offset")
        if max_seq_len != seq:
            raise RuntimeError(
                f"per-token RoPE positions cover {seq} tokens per row but the model asked for {max_seq_len} "
                "(sequence or context parallelism splits the sequence; not supported with shared prompts)"
            )
        table = own_forward(int(position_ids.max()) + 1, 0, False, cp_group)  # [P, 1, 1, D], Megatron's own angles
        return table[:, 0, 0, :][position_ids.t().to(table.device)].unsqueeze(2)  # [S, R, 1, D]

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward
