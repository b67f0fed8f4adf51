"""Import: HF safetensors (one file or sharded, with or without an index) into a live sharded model.

Each rank reads only the HF tensors of the parameters it holds (one parameter's tensors at a
time) and copies its TP slice into them through the same layout views the export uses, so the
two directions cannot disagree. Vocabulary padding rows are zeroed. Every HF tensor must be
consumed by some rank and every Megatron parameter must find its HF tensors: anything else is an
error naming the tensor. Routed experts (MoE): each expert-parallel rank reads only its own
experts, and splits them over the expert tensor-parallel group.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.bridge.layout import TP_PARTITION_DIM, padding_view, shard_pairs
from megatron_ghpo.bridge.plan import Plan, build_plan, local_parameters
from megatron_ghpo.logging_utils import get_logger, progress

logger = get_logger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def hf_weight_files(hf_dir: str | Path) -> dict[str, Path]:
    """``HF tensor name -> safetensors file`` for a model folder.

    Uses ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file of the
    folder. Raises ``FileNotFoundError`` (naming the folder) when there are no safetensors, and
    ``ValueError`` when a tensor appears in two files.
    """
    from safetensors import safe_open

    root = Path(hf_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"HF model folder {root} does not exist")
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' entries")
        files = {name: root / fname for name, fname in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(f"{index} refers to missing shard files: {absent}")
        return files
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {others}: re-save the model with save_pretrained(safe_serialization=True))" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {root}{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                if name in files:
                    raise ValueError(f"HF tensor {name!r} is in both {files[name].name} and {shard.name}")
                files[name] = shard
    return files


def check_hf_names(plan: Plan, files: dict[str, Path], hf_dir: str | Path) -> None:
    """Every planned HF name present, every HF tensor planned (or ignorable); errors name them."""
    expected = {n for e in plan.entries for n in e.hf_names}
    missing = sorted(expected - files.keys())
    if missing:
        raise KeyError(f"HF checkpoint {hf_dir} lacks tensors the Megatron model needs: {missing}")
    ignorable = {"lm_head.weight"} if plan.tied else set()
    unexpected = sorted(n for n in files if n not in expected and n not in ignorable and not plan.arch.is_ignored_hf(n))
    if unexpected:
        raise KeyError(
            f"HF checkpoint {hf_dir} has tensors no rule of the {plan.arch.name} bridge table maps: {unexpected}. "
            "Either the model was built from another config, or the table needs a Rule for them."
        )


def load_hf_weights(
    model_chunks: list[torch.nn.Module],
    hf_dir: str | Path,
    hf_config: Any = None,
    *,
    plan: Plan | None = None,
    progress_desc: str | None = None,
) -> None:
    """Copy the HF weights of ``hf_dir`` into this rank's chunks (call on every rank).

    ``hf_config`` defaults to ``hf_dir``'s ``config.json``. Values are cast to each parameter's
    dtype by ``copy_`` (bit-exact when the dtypes agree). ``progress_desc``: show a progress bar
    (rank 0) with this label.
    """
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    hf_config = hf_config if hf_config is not None else hf_dir
    plan = plan if plan is not None else build_plan(model_chunks, hf_config, for_import=True)
    files = hf_weight_files(hf_dir)
    check_hf_names(plan, files, hf_dir)
    tp_rank, stage = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    params = local_parameters(model_chunks)
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles: dict[Path, Any] = {}

        def read(name: str) -> torch.Tensor:
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name)

        entries = plan.local(stage, ep_rank)  # routed experts: only those this expert-parallel rank holds
        for e in progress(entries, desc=progress_desc) if progress_desc else entries:
            param = params[(e.chunk, e.name)]
            hf = [read(n) for n in e.hf_names]
            size = plan.shard_size(e)
            rank = (etp_rank if e.ep_owner is not None else tp_rank) if TP_PARTITION_DIM[e.layout] is not None else 0
            try:
                pairs = shard_pairs(e.layout, param, hf, rank, size, plan.dims)
            except ValueError as exc:
                raise ValueError(f"HF tensors {list(e.hf_names)} do not fit Megatron {e.name}: {exc}") from exc
            for local_view, hf_view in pairs:
                local_view.copy_(hf_view)
            pad = padding_view(e.layout, param, rank, size, plan.dims)
            if pad is not None:
                pad.zero_()
            del hf, pairs
    logger.debug("loaded HF weights from %s into stage %d (TP rank %d)", hf_dir, stage, tp_rank)
