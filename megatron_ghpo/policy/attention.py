"""Core attention for the local (non-Transformer-Engine) layer spec on PyTorch's fused SDPA kernel.

Megatron's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores, masks them with a
``masked_fill``, runs a separate softmax and two batched matmuls, repeating the key/value heads for
grouped-query attention. :class:`SDPADotProductAttention` computes the same attention with
``torch.nn.functional.scaled_dot_product_attention`` (grouped heads natively, the boolean mask
given to the kernel): on CPU about half the time of a layer's attention forward and backward at the
demo's shapes, and the same result within float32 rounding. The GPU path uses Transformer Engine's
attention and does not come here.

Megatron's mask convention is kept: ``attention_mask`` is boolean with True = *masked out*; ``None``
with a causal layer means causal. Every query position must be allowed to see itself (true of the
causal, packed and shared-prompt masks this project builds, padding included): a query that may
see nothing would give NaN here where Megatron gives a uniform average, so the diagonal is always
allowed. Features this class does not cover (attention dropout, a softmax offset, sliding windows,
query-key layer scaling) use Megatron's own implementation unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """``DotProductAttention`` with the score/softmax/context steps in one SDPA call."""

    def _sdpa_supported(self) -> bool:
        c = self.config
        dropout = self.attention_dropout.p if self.training else 0.0
        return (
            dropout == 0.0
            and self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
            and not c.apply_query_key_layer_scaling
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        if packed_seq_params is not None or attention_bias is not None or not self._sdpa_supported():
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)  # fmt: skip
        sq, b, heads, hn = query.shape
        sk = key.shape[0]
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask.to(torch.bool)
            if sq == sk:  # see the module docstring: a query always sees itself
                allowed = allowed | torch.eye(sq, dtype=torch.bool, device=allowed.device)
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )  # fmt: skip
        # [b, n, sq, hn] -> [sq, b, n * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
