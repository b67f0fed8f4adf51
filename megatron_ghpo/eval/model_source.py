"""Where the evaluated weights come from: an HF folder as is, or a Megatron checkpoint converted
through the weight bridge into a temporary HF folder (removed when the evaluation ends).

The conversion is the bridge's ``megatron_to_hf`` job (the same code as ``megatron-ghpo convert
megatron-to-hf``): one local process loads the checkpoint at TP=1 PP=1 and streams the HF-named
tensors into safetensors, with the HF config and tokenizer from ``CKPT/hf`` (or ``--hf-config``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_ghpo.logging_utils import get_logger

logger = get_logger(__name__)

CONVERT_TIMEOUT_S = 3600.0


def is_hf_folder(path: Path) -> bool:
    """True when ``path`` holds an HF model (``config.json`` and safetensors/bin weights)."""
    return (path / "config.json").is_file() and any(
        any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json")
    )


def is_megatron_checkpoint(path: Path) -> bool:
    """True when ``path`` is a Megatron distributed checkpoint (``metadata.json`` of dist_checkpointing)."""
    return (path / "metadata.json").is_file()


def convert_checkpoint(
    ckpt: Path, out_dir: Path, *, hf_config_dir: str | None, timeout_s: float = CONVERT_TIMEOUT_S
) -> None:
    """Write the HF form of the Megatron checkpoint ``ckpt`` into the empty folder ``out_dir``."""
    from megatron_ghpo.bridge.launch import run_ranks

    args = {
        "ckpt": str(ckpt),
        "out": str(out_dir),
        "tp": 1,
        "pp": 1,
        "dtype": None,
        "hf_config": hf_config_dir,
    }
    run_ranks("megatron_to_hf", args, 1, timeout_s=timeout_s, quiet_rank0=True)


def model_kind(model: str) -> str:
    """``"hf"`` or ``"megatron"`` for the folder ``model``; raises naming what was expected otherwise."""
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {model}: no such folder (pass an HF model folder or a Megatron checkpoint)"
        )
    if is_hf_folder(path):
        return "hf"
    if is_megatron_checkpoint(path):
        return "megatron"
    inner = sorted(
        p.name for p in path.iterdir() if p.is_dir() and (is_megatron_checkpoint(p) or is_hf_folder(p))
    )
    hint = f"; it contains model folders: {', '.join(inner[-5:])} (pass one of them)" if inner else ""
    raise ValueError(
        f"--model {model}: neither an HF folder (config.json + *.safetensors) nor a Megatron checkpoint "
        f"(metadata.json){hint}"
    )


@contextmanager
def hf_model_dir(
    model: str, *, hf_config_dir: str | None = None, work_dir: str | None = None
) -> Iterator[str]:
    """Yield an HF folder for ``model``: the folder itself, or a temporary conversion of a checkpoint.

    ``hf_config_dir``: HF folder with the config and tokenizer of a Megatron checkpoint's model
    (default: ``CKPT/hf``, written by the trainer and by ``convert hf-to-megatron``).
    """
    if model_kind(model) == "hf":
        yield model
        return
    tmp = Path(tempfile.mkdtemp(prefix="megatron_ghpo_eval_hf_", dir=work_dir))
    try:
        logger.info("converting Megatron checkpoint %s to an HF folder in %s", model, tmp)
        convert_checkpoint(Path(model), tmp, hf_config_dir=hf_config_dir)
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
