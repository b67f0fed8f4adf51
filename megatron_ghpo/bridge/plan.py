"""The transfer plan: every Megatron parameter of a TP x PP (x VPP, x EP) model, mapped to HF names.

Each rank maps the parameters it holds through the architecture's table; the entries of all
pipeline stages are exchanged once over the pipeline group (a few KB of metadata), so every rank
knows the full, identically ordered list and can take part in the collectives of tensors it does
not own. Order: virtual-pipeline chunk, then pipeline stage, then parameter order, which is the
ascending global layer order.

A routed expert's parameter (MoE) becomes one entry per expert-parallel rank: local expert ``i``
of EP rank ``r`` is global expert ``r x experts_per_rank + i`` (Megatron's ``SequentialMLP``
numbering). Every rank derives all of them from its own local experts, which have the same names
and shapes on every EP rank; the entry's ``ep_owner`` says which EP rank holds the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_ghpo.bridge.layout import TP_PARTITION_DIM, ModelDims, hf_shapes
from megatron_ghpo.bridge.mapping import ArchSpec, arch_for, dims_from_hf, experts_per_rank, hf_names, is_tied, local_expert
from megatron_ghpo.policy.hf_arch import load_hf_config


@dataclass(frozen=True, kw_only=True)
class PlanEntry:
    """One Megatron parameter and the HF tensor(s) it maps to."""

    stage: int
    """Pipeline rank holding it."""
    chunk: int
    """Virtual-pipeline chunk index on that rank (0 without a virtual pipeline)."""
    name: str
    """Parameter name inside its chunk (local layer index)."""
    layout: str
    local_shape: tuple[int, ...]
    """Shape on each TP rank."""
    dtype: torch.dtype
    hf_names: tuple[str, ...]
    """Empty when the parameter is not exported (the tied output layer on the last stage)."""
    hf_shapes: tuple[tuple[int, ...], ...]
    ep_owner: int | None = None
    """For a routed expert's parameter: the expert-parallel rank holding it (its layout then splits
    over the expert tensor-parallel group); None for every other parameter."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """All entries of the model (every stage), plus the context the layouts need."""

    entries: tuple[PlanEntry, ...]
    dims: ModelDims
    arch: ArchSpec
    tp: int
    tied: bool
    ep: int = 1
    """Expert-parallel size."""
    etp: int = 1
    """Expert tensor-parallel size (the TP size of expert entries' layouts)."""

    def local(self, stage: int, ep_rank: int | None = None) -> list[PlanEntry]:
        """Entries of ``stage``; with ``ep_rank``, only the experts that EP rank holds."""
        return [e for e in self.entries if e.stage == stage and (ep_rank is None or e.ep_owner in (None, ep_rank))]

    def shard_size(self, e: PlanEntry) -> int:
        """How many ranks split ``e`` by its layout: ETP for expert entries, TP otherwise."""
        return self.etp if e.ep_owner is not None else self.tp

    @property
    def has_experts(self) -> bool:
        return any(e.ep_owner is not None for e in self.entries)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    seen = 0
    while not isinstance(chunk, LanguageModule):
        inner = getattr(chunk, "module", None)
        if inner is None or seen > 8:
            raise TypeError(f"model chunk of type {type(chunk).__name__} does not wrap a Megatron LanguageModule (GPTModel)")
        chunk, seen = inner, seen + 1
    return chunk


def _global_layer(model: torch.nn.Module, local_index: int) -> int:
    layers = model.decoder.layers
    if local_index >= len(layers):
        raise IndexError(f"decoder.layers.{local_index} does not exist (this chunk has {len(layers)} layers)")
    return int(layers[local_index].layer_number) - 1


def local_parameters(model_chunks: list[torch.nn.Module]) -> dict[tuple[int, str], torch.nn.Parameter]:
    """``(chunk index, parameter name) -> parameter`` of this rank's chunks."""
    return {(c, n): p for c, chunk in enumerate(model_chunks) for n, p in unwrap(chunk).named_parameters()}


def _local_entries(
    model_chunks: list[torch.nn.Module], hf_config: Any, stage: int, tp: int, for_import: bool, ep: int = 1, etp: int = 1
) -> list[PlanEntry]:
    arch, dims, tied = arch_for(hf_config), dims_from_hf(hf_config), is_tied(hf_config)
    per_rank = experts_per_rank(hf_config, ep)
    entries: list[PlanEntry] = []
    for c, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        if bool(getattr(model, "share_embeddings_and_output_weights", tied)) != tied:
            raise ValueError(
                f"HF config has tie_word_embeddings={tied} but the Megatron model has "
                f"share_embeddings_and_output_weights={model.share_embeddings_and_output_weights}: build the model from this config"
            )
        for name, param in model.named_parameters():
            rule, local_layer = arch.match(name)
            layer = None if local_layer is None else _global_layer(model, local_layer)
            partitioned = bool(getattr(param, "tensor_model_parallel", False))
            expected_dim = TP_PARTITION_DIM[rule.layout]
            if partitioned != (expected_dim is not None) or (partitioned and param.partition_dim != expected_dim):
                raise ValueError(
                    f"{name}: the bridge table says layout {rule.layout!r} (TP partition dim {expected_dim}) but the "
                    f"parameter has tensor_model_parallel={partitioned}, partition_dim={getattr(param, 'partition_dim', None)}"
                )
            if not rule.expert:
                names = hf_names(rule, layer, tied=tied, for_import=for_import)
                shapes = hf_shapes(rule.layout, tuple(param.shape), tp, dims) if names else []
                entries.append(
                    PlanEntry(
                        stage=stage, chunk=c, name=name, layout=rule.layout, local_shape=tuple(param.shape),
                        dtype=param.dtype, hf_names=names, hf_shapes=tuple(shapes),
                    )
                )
                continue
            index = local_expert(name)
            if index is None or not 0 <= index < per_rank:
                raise ValueError(f"{name}: local expert index outside the {per_rank} experts per expert-parallel rank")
            shapes = hf_shapes(rule.layout, tuple(param.shape), etp, dims)
            for owner in range(ep):
                names = hf_names(rule, layer, tied=tied, for_import=for_import, expert=owner * per_rank + index)
                entries.append(
                    PlanEntry(
                        stage=stage, chunk=c, name=name, layout=rule.layout, local_shape=tuple(param.shape),
                        dtype=param.dtype, hf_names=names, hf_shapes=tuple(shapes), ep_owner=owner,
                    )
                )
    return entries


def build_plan(model_chunks: list[torch.nn.Module], hf_config: Any, *, for_import: bool = False) -> Plan:
    """The full plan; a collective over the pipeline group when PP > 1 (call on every rank).

    Raises when a parameter has no rule, when an HF name would be produced twice, or when a
    parameter's TP partitioning disagrees with its table layout.
    """
    from megatron.core import parallel_state as ps

    tp, pp, stage = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    hf_config = load_hf_config(hf_config)
    mine = _local_entries(model_chunks, hf_config, stage, tp, for_import, ep, etp)
    if pp > 1:
        gathered: list[list[PlanEntry] | None] = [None] * pp
        torch.distributed.all_gather_object(gathered, mine, group=ps.get_pipeline_model_parallel_group())
        everything = [e for part in gathered for e in (part or [])]
    else:
        everything = mine
    everything.sort(key=lambda e: (e.chunk, e.stage))  # stable: keeps parameter order within a chunk
    seen: dict[str, str] = {}
    for e in everything:
        for n in e.hf_names:
            where = f"stage {e.stage} chunk {e.chunk} {e.name}"
            if n in seen and not for_import:
                raise ValueError(f"HF tensor {n!r} would be produced twice: by {seen[n]} and by {where}")
            seen.setdefault(n, where)
    return Plan(
        entries=tuple(everything), dims=dims_from_hf(hf_config), arch=arch_for(hf_config), tp=tp,
        tied=is_tied(hf_config), ep=ep, etp=etp,
    )  # fmt: skip
