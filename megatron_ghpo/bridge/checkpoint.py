"""Offline conversion: HF folder <-> Megatron distributed checkpoint (model weights only).

Checkpoint folder written by :func:`hf_to_megatron`::

    CKPT/                  the policy's checkpoint format (megatron_ghpo.policy.checkpoint), model only:
                           a Megatron-Core ``dist_checkpointing`` checkpoint saved at TP=1, PP=1 plus
                           ``ghpo_policy.json``. Megatron's global keys
                           (``decoder.layers.self_attention.linear_qkv.weight`` with a leading layer
                           axis, ...) make it loadable at any TP/PP; the model is built with the
                           padded vocabulary it was saved with
    CKPT/hf/               the HF config, generation config and tokenizer files of the source
    CKPT/bridge.json       what was converted: format, model_type, dtype, source, megatron-core version

Both directions write into a temporary sibling folder and rename it at the end: an interrupted
conversion leaves no half-written output, and an existing non-empty output is never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.bridge.hf_folder import (  # noqa: F401  (write_hf_folder re-exported: callers import it from here)
    HF_SIDE_DIR,
    copy_hf_side_files,
    hf_side_dir,
    staged_output,
    write_hf_folder,
)
from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

FORMAT = "megatron_ghpo.bridge/1"
BRIDGE_META = "bridge.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``fp32`` / ``bf16`` / ``fp16`` (or None) to a torch dtype."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def hf_weights_dtype(hf_dir: str | Path) -> torch.dtype:
    """The dtype of the HF weights (the most common one, by tensor count, when they are mixed)."""
    from safetensors import safe_open

    from megatron_ghpo.bridge.hf_load import hf_weight_files

    counts: dict[torch.dtype, int] = {}
    files = hf_weight_files(hf_dir)
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                code = f.get_slice(name).get_dtype()
                if code not in _DTYPES:
                    raise ValueError(f"{path.name}: tensor {name} has dtype {code}; the bridge handles {sorted(_DTYPES)}")
                counts[_DTYPES[code]] = counts.get(_DTYPES[code], 0) + 1
    return max(counts, key=counts.get)


def checkpoint_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """The dtype the checkpoint stores the word embedding in (read from its metadata, no ranks needed)."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a Megatron distributed checkpoint (no metadata.json)")
    md = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    key = "embedding.word_embeddings.weight"
    if key not in md:
        raise KeyError(f"{ckpt_dir} holds no {key}: not a GPT model checkpoint")
    return md[key].properties.dtype


def build_and_load(
    ckpt_dir: str | Path, hf_config: Any, *, dtype: torch.dtype | None = None, transformer_impl: str = "local"
) -> list[torch.nn.Module]:
    """Build this rank's model chunks at the current TP/PP and load the checkpoint's model weights.

    ``dtype`` defaults to the checkpoint's, so the loaded values are the stored ones bit for bit.
    The padded vocabulary is the one the checkpoint was saved with.
    """
    from megatron_ghpo.policy.checkpoint import load_checkpoint, read_checkpoint_metadata
    from megatron_ghpo.policy.model import build_gpt_model

    meta = read_checkpoint_metadata(ckpt_dir)
    chunks = build_gpt_model(
        hf_config,
        params_dtype=dtype or checkpoint_dtype(ckpt_dir),
        transformer_impl=transformer_impl,
        vocab_size=meta["vocab_size"],
        for_training=False,
    )
    load_checkpoint(ckpt_dir, chunks)
    return chunks


def hf_to_megatron(hf_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Convert an HF folder to a Megatron distributed checkpoint (see the module docstring).

    Needs a one-rank parallel state (``init_parallel()``). ``dtype`` defaults to the HF weights'
    dtype, so the checkpoint holds the exact source values. Written with the policy's
    :func:`~megatron_ghpo.policy.checkpoint.save_checkpoint` (model only), so the policy's loader
    reads it as model weights.
    """
    from megatron_ghpo.bridge.hf_load import load_hf_weights
    from megatron_ghpo.bridge.plan import unwrap
    from megatron_ghpo.policy.checkpoint import save_checkpoint
    from megatron_ghpo.policy.cpu_compat import megatron_core_version
    from megatron_ghpo.policy.hf_arch import load_hf_config
    from megatron_ghpo.policy.model import build_gpt_model
    from megatron_ghpo.policy.parallel import get_layout

    layout = get_layout()
    if (layout.tp, layout.pp, layout.world_size) != (1, 1, 1):
        raise RuntimeError(
            f"hf_to_megatron runs on one rank at TP=1 PP=1, got world {layout.world_size} TP={layout.tp} PP={layout.pp}"
        )
    hf_dir = Path(hf_dir)
    dtype = dtype or hf_weights_dtype(hf_dir)
    hf_config = load_hf_config(hf_dir)
    chunks = build_gpt_model(hf_config, params_dtype=dtype, transformer_impl="local", for_training=False)
    load_hf_weights(chunks, hf_dir, hf_config, progress_desc="import")
    with staged_output(out) as tmp:
        save_checkpoint(tmp, chunks, metadata={"vocab_size": unwrap(chunks[0]).vocab_size, "hf_config": hf_config})
        side = copy_hf_side_files(hf_dir, tmp / HF_SIDE_DIR)
        meta = {
            "format": FORMAT,
            "model_type": hf_config.get("model_type"),
            "dtype": str(dtype).removeprefix("torch."),
            "source": str(hf_dir.resolve()),
            "hf_files": side,
            "megatron_core": megatron_core_version(),
        }
        (tmp / BRIDGE_META).write_text(json.dumps(meta, indent=2))
    logger.info("wrote Megatron checkpoint %s from %s (%s)", out, hf_dir, dtype)
    return Path(out)


ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
)  # fmt: skip


def checked_hf_config(ckpt: str, hf_config_dir: str | None) -> tuple[dict[str, Any], Path]:
    """The HF config the checkpoint was built from, and the folder with its config/tokenizer files."""
    from megatron_ghpo.policy.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(ckpt)
    side = hf_side_dir(ckpt, hf_config_dir)
    side_cfg = json.loads((side / "config.json").read_text())
    built = meta["hf_config"]
    differ = {k: (built.get(k), side_cfg.get(k)) for k in ARCH_FIELDS if built.get(k) != side_cfg.get(k)}
    if differ:
        raise ValueError(
            f"{side / 'config.json'} does not describe the model in {ckpt} (checkpoint vs file): {differ}; "
            "pass --hf-config with the source model's folder"
        )
    return built, side
