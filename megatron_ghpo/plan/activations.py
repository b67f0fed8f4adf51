"""Activation and transient memory of one training step, per rank: a walk through the step's events.

Shapes of one micro-batch: ``b`` sequences of ``S = prompt + completion - 1`` input tokens
(``T = b·S`` tokens), ``N = b·completion`` scoring positions, padded vocabulary slice
``V' = V_padded / TP``; ``p`` bytes per activation element (2 for bf16, 4 for fp32).

Saved for backward per layer and token (what autograd keeps; counted from the modules the project
builds, see :func:`layer_bytes_per_token`), then the events of a step, each "what is live now":

1. forward loss of the last micro-batch in flight: every stored layer, the ``[b, S, V']`` logits,
   the ``[N, V']`` selected rows, the fp32 softmax that vocab-parallel cross entropy saves, and
   the entropy's fp32 temporaries (:mod:`megatron_ghpo.policy.step`, ``policy.logprobs``);
2. start of backward: the logits gradient, scattered back to ``[T, V']``, and the output layer's
   weight gradient (a full ``[V', h]`` tensor: the project runs without gradient-accumulation
   fusion); tied embeddings keep it alive until the embedding's gradient is added to it;
3. each layer's backward (with full recompute: that layer recomputed), its largest weight gradient;
4. the embedding's dense ``[V', h]`` gradient;
5. on gloo (CPU) the gradient reduce-scatter/all-reduce copies the whole fp32 gradient buffer.

Implementation profiles: ``local`` (Megatron's PyTorch layer spec on CPU, measured against the real
model by ``tools/benchmarks/plan_vs_measured.py``) and ``te`` (Transformer Engine on GPUs: fused
norm+linear, fused SwiGLU; not measured here). CPU ``Tensor.add_`` of a bf16 gradient into the
fp32 ``main_grad`` makes an fp32 copy first (``cpu_mixed_add_copy``); CUDA does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_ghpo.policy.hf_arch import HFArch

Recompute = Literal["none", "selective", "full"]
Impl = Literal["local", "te"]
ENTROPY_TEMP_BYTES = 21
"""Bytes per ``[N, V']`` element the entropy's temporaries hold at once (fp32 ``z - max``, ``exp``,
``e·z``, ``zeros_like``, ``where``: 5 × 4, plus the 1-byte ``isfinite`` mask)."""


@dataclass(frozen=True, kw_only=True)
class MicroBatchShape:
    micro_batch: int
    prompt_length: int
    completion_length: int

    @property
    def seq(self) -> int:
        return self.prompt_length + self.completion_length - 1

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq

    @property
    def scored(self) -> int:
        return self.micro_batch * self.completion_length


@dataclass(frozen=True, kw_only=True)
class ActivationOptions:
    impl: Impl = "te"
    recompute: Recompute = "full"
    bf16: bool = True
    sequence_parallel: bool = False
    compute_entropy: bool = True
    gloo_grad_copy: bool = False
    """CPU/gloo: the gradient collective clones the fp32 gradient buffer."""

    @property
    def p(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def cpu_mixed_add_copy(self) -> bool:
        return self.impl == "local" and self.bf16


@dataclass(frozen=True, kw_only=True)
class Peak:
    """The largest event of a step on one rank and what it holds."""

    bytes: int
    event: str
    parts: dict[str, int] = field(default_factory=dict)


def _attn_bytes(a: HFArch, t: int, p: int, recompute: Recompute) -> int:
    ad, gd = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    # rotated q and k (new tensors), the qkv projection's output (v is a view of it), attention output
    saved = p * (ad + gd + (ad + 2 * gd) + ad) // t
    lse = 4 * a.num_heads // t  # softmax log-sum-exp, fp32 per head
    return saved + (0 if recompute == "selective" else lse)


def _mlp_bytes(a: HFArch, layer: int, t: int, p: int, impl: Impl) -> int:
    """Saved MLP activations per token: dense SwiGLU, or the token's top-k experts (MoE)."""
    if a.moe is not None and a.moe.layer_pattern[layer] == 1:
        m = a.moe
        f = m.ffn_hidden_size // t
        # router logits/probs (fp32), permuted tokens before and after the all-to-all, per expert fc1/act/fc2 inputs
        per_copy = 2 * p * a.hidden_size + (4 if impl == "te" else 5) * p * f + (p * f if impl == "local" else 0)
        return 2 * 4 * m.num_experts + m.topk * per_copy
    f = a.intermediate_size // t
    return p * (3 if impl == "te" else 5) * f


def layer_bytes_per_token(a: HFArch, layer: int, *, tp: int, o: ActivationOptions) -> int:
    """Bytes one layer keeps for backward per input token (no recompute / selective)."""
    p, h = o.p, a.hidden_size
    if o.impl == "local":
        # torch RMSNorm with fp32 weights: fp32 input copy, fp32 normalised input, fp32 rstd (x2 norms);
        # the qkv and fc1 linears save their (dtype-cast) inputs
        norms = 2 * (8 * h + 4) + 2 * p * h
    else:
        # TE LayerNormLinear: norm input and norm output (dtype), rstd fp32 (x2)
        norms = 2 * (2 * p * h + 4)
        if o.sequence_parallel:
            norms //= tp
    return norms + _attn_bytes(a, tp, p, o.recompute) + _mlp_bytes(a, layer, tp, p, o.impl)


def _rope_bytes(a: HFArch, mb: MicroBatchShape, p: int) -> int:
    """cos/sin tables saved by the rotary application of q and k ([S, 1, 1, d], per layer)."""
    return 4 * mb.seq * a.head_dim * p


def _largest_weight_grad(a: HFArch, t: int) -> int:
    """Elements of the largest per-layer weight (its gradient is materialised in backward)."""
    if a.moe is not None:
        ffn = max(a.intermediate_size if 0 in a.moe.layer_pattern else 0, a.moe.ffn_hidden_size)
    else:
        ffn = a.intermediate_size
    return max(2 * ffn // t * a.hidden_size, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim // t * a.hidden_size)


def _mlp_backward_bytes(a: HFArch, mb: MicroBatchShape, t: int, p: int) -> int:
    """Gradients live at once in the SwiGLU backward: of the fc2 input, then of both halves of fc1's
    output (3 tensors of ``[T, ffn/TP]``; MoE: of the token's top-k expert copies)."""
    ffn = a.intermediate_size if a.moe is None else max(a.intermediate_size, a.moe.topk * a.moe.ffn_hidden_size)
    return 3 * mb.tokens * max(ffn // t, a.hidden_size) * p


def step_peak(
    a: HFArch,
    mb: MicroBatchShape,
    *,
    tp: int,
    pp: int,
    pp_rank: int,
    num_micro_batches: int,
    padded_vocab: int,
    grad_buffer_bytes: int,
    o: ActivationOptions,
) -> Peak:
    """Peak transient bytes (above parameters, gradient buffers and optimizer state) of one step."""
    p, h, t = o.p, a.hidden_size, tp
    per_stage = a.num_layers // pp
    layers = range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
    first, last = pp_rank == 0, pp_rank == pp - 1
    in_flight = min(pp - pp_rank, num_micro_batches)
    full = o.recompute == "full"
    layer_saved = [mb.tokens * layer_bytes_per_token(a, i, tp=t, o=o) + _rope_bytes(a, mb, p) for i in layers]
    ckpt = mb.tokens * h * p // (t if o.sequence_parallel else 1)  # a full-recompute checkpoint keeps the layer input
    stored_one = len(layers) * ckpt if full else sum(layer_saved)
    head = 0
    if last:
        head = mb.tokens * ((8 * h + 4) if o.impl == "local" else (p * h + 4)) + mb.tokens * p * h
    stored_one += head  # final norm and the output layer's input (freed before the layers' backward)
    stored = in_flight * stored_one
    vocab = padded_vocab // t
    events: list[Peak] = []
    if last:
        logits, rows, n = mb.tokens * vocab * p, mb.scored * vocab * p, mb.scored * vocab
        loss = logits + rows + 4 * n + (ENTROPY_TEMP_BYTES * n if o.compute_entropy else 4 * n)
        events.append(Peak(bytes=stored + loss, event="forward: loss over the logits",
                           parts={"stored activations": stored, "logits": logits, "loss/entropy temporaries": loss - logits}))
        events.append(Peak(bytes=stored + 2 * logits, event="forward: logits transposed",
                           parts={"stored activations": stored, "logits": 2 * logits}))
    tied_held = vocab * h * p if (a.tie_word_embeddings and first and last) else 0
    if last:
        wgrad = vocab * h * p
        bwd = stored + 2 * mb.tokens * vocab * p + wgrad
        events.append(Peak(bytes=bwd, event="backward: output layer", parts={"stored activations": stored,
                           "logits gradients": 2 * mb.tokens * vocab * p, "output weight gradient": wgrad}))
        if not tied_held and o.cpu_mixed_add_copy:
            events.append(Peak(bytes=stored + wgrad + 4 * vocab * h, event="backward: output gradient into fp32 buffer",
                               parts={"stored activations": stored, "output weight gradient (+fp32 copy)": wgrad + 4 * vocab * h}))
    # layer backwards, last layer first: the stored activations shrink as each layer finishes
    remaining = stored - head
    wmax = _largest_weight_grad(a, t)
    layer_transient = _mlp_backward_bytes(a, mb, t, p) + wmax * (p + (4 if o.cpu_mixed_add_copy else 0))
    for i in reversed(range(len(layers))):
        live = remaining + tied_held + layer_transient + (layer_saved[i] if full else 0)
        events.append(Peak(bytes=live, event=f"backward: layer {layers[i]}", parts={
            "stored activations": remaining, "layer recompute": layer_saved[i] if full else 0,
            "layer gradients": layer_transient, "held output weight gradient": tied_held}))
        remaining -= ckpt if full else layer_saved[i]
    remaining = max(remaining, 0)
    if first:
        emb = vocab * h * p
        add_copy = 4 * vocab * h if o.cpu_mixed_add_copy else 0
        live = remaining + max(tied_held + emb, max(tied_held, emb) + add_copy)
        events.append(Peak(bytes=live, event="backward: embedding gradient", parts={
            "stored activations": remaining, "embedding gradient": live - remaining}))
    if o.gloo_grad_copy:
        events.append(Peak(bytes=grad_buffer_bytes, event="gradient all-reduce (gloo copy)",
                           parts={"gradient buffer copy": grad_buffer_bytes}))
    return max(events, key=lambda e: e.bytes)
