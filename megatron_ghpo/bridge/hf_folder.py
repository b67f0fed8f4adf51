"""HF model folders: the non-weight files, staged (all-or-nothing) output, streamed safetensors writing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

HF_SIDE_DIR = "hf"
"""Sub-folder of a converted checkpoint holding the HF config and tokenizer files."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")


def copy_hf_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the non-weight files of an HF folder (config, generation config, tokenizer, chat template)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    if "config.json" not in copied:
        raise FileNotFoundError(f"{src} has no config.json: not a Hugging Face model folder")
    return copied


@contextmanager
def staged_output(out: str | Path):
    """Yield a temporary sibling of ``out``; rename it to ``out`` on success, delete it on failure."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty: choose another path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def hf_side_dir(ckpt_dir: str | Path, hf_config_dir: str | Path | None = None) -> Path:
    """Where the HF config/tokenizer files for ``ckpt_dir`` are: ``--hf-config`` or ``CKPT/hf``."""
    side = Path(hf_config_dir) if hf_config_dir is not None else Path(ckpt_dir) / HF_SIDE_DIR
    if not (side / "config.json").is_file():
        raise FileNotFoundError(
            f"no HF config at {side / 'config.json'}: checkpoints written by `convert hf-to-megatron` keep it in "
            f"CKPT/{HF_SIDE_DIR}/; for other checkpoints pass --hf-config pointing at the source HF model folder"
        )
    return side


def write_hf_folder(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out: str | Path,
    side_dir: str | Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
    """Write an HF folder: safetensors shards (+ index when more than one), config and tokenizer.

    ``tensors`` is consumed as a stream (each tensor is copied, so views of a reused export buffer
    are fine); at most one shard is held in memory. Tensors are written in ``dtype``, and
    ``config.json``'s dtype is set to it. Returns the written tensor names in order.
    """
    from safetensors.torch import save_file

    from megatron_ghpo.bridge.hf_load import INDEX_NAME

    names: list[str] = []
    with staged_output(out) as tmp:
        shards: list[tuple[str, list[str]]] = []
        pending: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal pending, size
            if pending:
                fname = f"part-{len(shards):05d}.safetensors"
                save_file(pending, str(tmp / fname), metadata={"format": "pt"})
                shards.append((fname, list(pending)))
                pending, size = {}, 0

        seen: set[str] = set()
        for name, t in tensors:
            if name in seen:
                raise ValueError(f"tensor {name!r} produced twice")
            seen.add(name)
            nbytes = t.numel() * dtype.itemsize
            if pending and size + nbytes > max_shard_bytes:
                flush()
            pending[name] = t.detach().to("cpu", dtype=dtype, copy=True).contiguous()
            size += nbytes
            names.append(name)
        flush()
        if not shards:
            raise ValueError("no tensors to write")
        weight_map = {}
        total = 0
        for i, (fname, keys) in enumerate(shards):
            final = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp / fname, tmp / final)
            total += (tmp / final).stat().st_size
            weight_map.update({k: final for k in keys})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        copy_hf_side_files(side_dir, tmp)
        config = json.loads((tmp / "config.json").read_text())
        dtype_name = str(dtype).removeprefix("torch.")
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return names
