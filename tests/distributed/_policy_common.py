"""Helpers for the policy parity workers: a tiny model, a fixed batch, and TP/PP-aware comparisons.

Reference tensors are TP=1 x PP=1 tensors keyed by global parameter name. A rank of another layout
compares each of its local shards with the matching slice of the reference: layer indices are
mapped through each layer's global ``layer_number``, TP shards sliced along ``partition_dim``
(the fused gate/up ``linear_fc1`` shard holds a slice of each half), and a tied output layer on
the last pipeline stage is compared with the embedding.
"""

from __future__ import annotations

import random

import torch

from megatron_ghpo.records import TrainBatch, TrainSample

VOCAB = 500


def tiny_config(*, layers: int = 2, tied: bool = True) -> dict:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, initializer_range=0.2, max_position_embeddings=256,
        rope_theta=10000.0,
    ).to_dict()  # fmt: skip


def fixed_samples(n: int = 8, seed: int = 0) -> list[TrainSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, c = rng.randint(3, 9), rng.randint(2, 8)
        mask = [1] * c
        if i % 3 == 0:
            mask[-1] = 0  # tokens after the first EOS are masked
        out.append(
            TrainSample(
                prompt_ids=[rng.randrange(VOCAB) for _ in range(p)], completion_ids=[rng.randrange(VOCAB) for _ in range(c)],
                advantage=rng.uniform(-1.5, 1.5), completion_mask=mask,
            )
        )
    return out


def grouped_samples(groups: int = 3, size: int = 4, seed: int = 5) -> list[TrainSample]:
    """``groups`` prompts with ``size`` completions each (GRPO groups), one completion of a single token."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 9))]
        for i in range(size):
            c = 1 if (g, i) == (1, 2) else rng.randint(2, 8)
            out.append(TrainSample(prompt_ids=prompt, completion_ids=[rng.randrange(VOCAB) for _ in range(c)],
                                   advantage=rng.uniform(-1.5, 1.5), completion_mask=[1] * c))
    return out


def with_old_logprobs(samples: list[TrainSample], logprobs: list[list[float]], seed: int = 2) -> list[TrainSample]:
    """Samples whose sampling-time log-probs are the model's plus noise (σ = 0.15), so importance
    ratios differ from 1, some are clipped, and the loss value depends on the model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, lp in zip(samples, logprobs):
        noise = 0.15 * torch.randn(len(lp), generator=g, dtype=torch.float64)
        out.append(TrainSample(**{**s.__dict__, "old_logprobs": (torch.tensor(lp, dtype=torch.float64) + noise).tolist()}))
    return out


def fixed_tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 11), generator=g)


def batch(samples: list[TrainSample]) -> TrainBatch:
    return TrainBatch(samples=samples)


def gather_dp_grads(policy) -> None:
    """Complete every DDP bucket's gradient on every DP rank (the distributed optimizer reduce-scatters)."""
    from megatron.core import parallel_state
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return
    group = parallel_state.get_data_parallel_group()
    rank = parallel_state.get_data_parallel_rank()
    for ddp in policy.chunks:
        for buffer in ddp.buffers:
            for bucket in buffer.buckets:
                shards = shard_buffer(bucket.grad_data, dp)
                gathered = [torch.empty_like(s) for s in shards]
                torch.distributed.all_gather(gathered, shards[rank].contiguous(), group=group)
                for s, g in zip(shards, gathered):
                    s.copy_(g)


def global_items(policy, what: str):
    """Yield ``(global_name, local_param, local_tensor)``; ``what`` is ``grad`` (main_grad) or ``param``."""
    for chunk in policy.model_chunks:
        for name, p in chunk.named_parameters():
            gname = name
            if name.startswith("decoder.layers."):
                local = int(name.split(".")[2])
                glob = chunk.decoder.layers[local].layer_number - 1
                gname = name.replace(f"decoder.layers.{local}.", f"decoder.layers.{glob}.", 1)
            if name == "output_layer.weight" and policy.arch.tie_word_embeddings:
                gname = "embedding.word_embeddings.weight"
            yield gname, p, (p.main_grad if what == "grad" else p.data)


def reference_slice(name: str, p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """The part of the TP=1 tensor ``full`` that this rank's shard ``p`` holds."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return full
    r = parallel_state.get_tensor_model_parallel_rank()
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]], dim=0)
    return full.chunk(tp, dim=p.partition_dim)[r]


def gather_tp_full(policy) -> dict[str, torch.Tensor]:
    """Full TP=1 parameter tensors by global name, assembled from this pipeline stage's TP shards
    (inverse of :func:`reference_slice`; PP=1 only)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p, t in global_items(policy, "param"):
        if tp == 1 or not getattr(p, "tensor_model_parallel", False):
            out[name] = t.detach().clone().float()
            continue
        parts = [torch.empty_like(t) for _ in range(tp)]
        torch.distributed.all_gather(parts, t.contiguous(), group=group)
        if name.endswith("mlp.linear_fc1.weight"):
            halves = [x.chunk(2, dim=0) for x in parts]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0).float()
        else:
            out[name] = torch.cat(parts, dim=p.partition_dim).float()
    return out


def snapshot(policy, what: str) -> dict[str, torch.Tensor]:
    """Full TP=1 tensors by global name (valid only at TP=1 x PP=1)."""
    return {n: t.detach().clone().float() for n, _p, t in global_items(policy, what)}


def max_diff(policy, reference: dict[str, torch.Tensor], what: str) -> float:
    """Max |local shard - reference slice| over this rank's parameters, maxed over all ranks."""
    worst = 0.0
    for name, p, t in global_items(policy, what):
        ref = reference_slice(name, p, reference[name])
        if ref.shape != t.shape:
            raise AssertionError(f"{name}: local {tuple(t.shape)} vs reference slice {tuple(ref.shape)}")
        worst = max(worst, (t.float() - ref).abs().max().item())
    return all_max(worst)


def all_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def list_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b], "log-prob lists differ in shape"
    return max(abs(x - y) for xa, xb in zip(a, b) for x, y in zip(xa, xb))
