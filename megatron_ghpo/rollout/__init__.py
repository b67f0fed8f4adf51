"""Rollout engines: the RolloutEngine protocol, the vLLM engine and a transformers fallback.

Importing this package imports neither vLLM nor transformers; the engines load them when built.
"""

from __future__ import annotations

from typing import Any

from megatron_ghpo.rollout.base import RolloutEngine, SamplingParams, StreamingRolloutEngine
from megatron_ghpo.rollout.factory import ENGINE_KINDS, build_rollout_engine
from megatron_ghpo.rollout.vllm_setup import vllm_available

__all__ = [
    "ENGINE_KINDS",
    "HFEngine",
    "RolloutEngine",
    "SamplingParams",
    "StreamingRolloutEngine",
    "VLLMEngine",
    "build_rollout_engine",
    "vllm_available",
]


def __getattr__(name: str) -> Any:
    if name == "VLLMEngine":
        from megatron_ghpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    if name == "HFEngine":
        from megatron_ghpo.rollout.hf_engine import HFEngine

        return HFEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
