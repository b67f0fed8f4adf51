"""Megatron-Core on a machine without CUDA: every workaround in one place.

Megatron-Core 0.16.1 (the version validated here, ``VALIDATED_MEGATRON_CORE``) assumes CUDA in a
handful of places. Without CUDA each of them raises (the error is named next to each patch below).
:func:`apply_cpu_compat` neutralises them, and only when ``torch.cuda.is_available()`` is False:
on a GPU machine nothing is touched.

Five kinds of patches, all scoped to Megatron-Core (nothing in ``torch`` itself is replaced):

* **Module-level ``torch`` shim.** For each Megatron module listed in :data:`SHIMMED_MODULES`, the
  module's global name ``torch`` is replaced by :class:`CpuTorch`, a proxy that forwards every
  attribute to the real ``torch`` except that tensor factories map ``device="cuda"`` / device
  indices to the CPU, and ``torch.cuda.*`` calls the module makes map to their CPU meaning
  (``current_device()`` -> ``cpu``, ``synchronize()`` -> no-op, RNG state -> the CPU generator,
  streams -> no-op objects). Only that module's view of ``torch`` changes.
* **RNG tracker state functions.** ``tensor_parallel.random._get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` are replaced by CPU-generator versions (the originals read
  ``torch.cuda.default_generators`` and defer the set through ``torch.cuda._lazy_call``, which
  without CUDA queues the call forever: the tracker would silently never switch state).
* **Tensor-method checks around named Megatron functions.** ``param.type() == 'torch.cuda.FloatTensor'``
  checks and ``tensor.cuda()`` calls live on tensors, not on ``torch``: the functions that make them
  are wrapped so that, *while they run*, ``Tensor.type()`` reports the CUDA type name and
  ``Tensor.cuda()`` returns the tensor unchanged. Training is single-threaded per rank, so the
  temporary override is not observed by other code.
* **Replaced functions** (:data:`RNG_FUNCTIONS`, :data:`REPLACED_FUNCTIONS`): a Megatron function
  whose whole job is CUDA-specific gets a CPU version, bound in its module and where it is imported
  by name.
* **Names missing without Transformer Engine.** A Megatron module that imports a TE function in a
  ``try`` block and then tests the name for ``None`` without defining it in the ``except`` branch
  gets that name defined as ``None`` (:data:`MISSING_TE_NAMES`), so its plain-PyTorch fallback runs.
  This is not CUDA-specific (a GPU machine without TE has the same bug), so
  :func:`define_missing_te_names` is also called by the model provider for MoE models.

Each patch records the source text ("needle") of the CUDA call it neutralises;
:func:`stale_patches` returns the patches whose needle is gone from the installed Megatron-Core, so a
test fails when an upgrade makes a patch unnecessary or wrong.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.policy._cpu_torch import CpuCuda, CpuTorch, tensor_overrides

__all__ = [
    "CpuCuda", "CpuTorch", "apply_cpu_compat", "cuda_available", "define_missing_te_names", "is_applied", "stale_patches",
]  # fmt: skip

logger = get_logger(__name__)

VALIDATED_MEGATRON_CORE = "0.16.1"
"""The Megatron-Core release these patches were written and tested against (pinned in pyproject)."""

_APPLIED = False


# ---------------------------------------------------------------------------------------------
# Patch registry.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShimmedModule:
    """A Megatron module whose global ``torch`` is replaced by :class:`CpuTorch`."""

    module: str
    needles: tuple[str, ...]
    """Source fragments of the CUDA calls this shim neutralises (each must still be in the module)."""
    error: str
    """What happens without the shim."""


SHIMMED_MODULES: tuple[ShimmedModule, ...] = (
    ShimmedModule(
        "megatron.core.tensor_parallel.random",
        ("torch.cuda.get_rng_state()", "torch.cuda.manual_seed(seed)"),
        "CudaRNGStatesTracker.add / model_parallel_cuda_manual_seed: "
        "AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        ("device=torch.cuda.current_device()",),
        "RotaryEmbedding.get_emb -> torch.cuda.current_device(): AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.transformer.utils",
        ('torch.ones(sq, sq, device="cuda")',),
        "get_default_causal_mask: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.pipeline_parallel.schedules",
        ('total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")',),
        "every forward_backward schedule (PP=1 too): AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.pipeline_parallel.p2p_communication",
        ("torch.cuda.synchronize()", "device=torch.cuda.current_device()"),
        "PP>1 send/recv shape exchange and the post-batch synchronize: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.layers",
        ("device=torch.cuda.current_device()",),
        "parameters created with use_cpu_initialization=False and TP all-gathers: "
        "AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.tensor_parallel.mappings",
        ("device=torch.cuda.current_device()",),
        "TP gather along the first/last dim: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.distributed.param_and_grad_buffer",
        ("device=torch.cuda.current_device()",),
        "DistributedDataParallel grad buffers: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.distributed.distributed_data_parallel",
        ("torch.cuda.synchronize()",),
        "DDP buffer offload/reload synchronize: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.optimizer.optimizer",
        ("device='cuda'", "device=torch.cuda.current_device()"),
        "Float16 optimizer found_inf/_scale_one buffers, FP32Optimizer._scale, "
        "ChainedOptimizer.get_loss_scale: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.optimizer.clip_grads",
        ("device='cuda'",),
        "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 buffers: "
        "AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.optimizer.grad_scaler",
        ("device='cuda'",),
        "ConstantGradScaler/DynamicGradScaler (fp16 loss scaling): AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.optimizer.distrib_optimizer",
        ("device=torch.cuda.current_device()",),
        "DistributedOptimizer state (de)serialisation buffers: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        ("torch.cuda.synchronize()",),
        "dist_checkpointing.save -> FileSystemWriterAsync.preload_tensors: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        ("device=torch.cuda.current_device()", "device='cuda'"),
        "dist_checkpointing.save failure broadcast / plan-reuse check: AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.transformer.moe.token_dispatcher",
        ("MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()", "torch.cuda.stream(self.cuda_dtoh_stream)"),
        "MoE alltoall token dispatcher (its device-to-host side stream): RuntimeError: torch.cuda.Stream requires CUDA support",
    ),
    ShimmedModule(
        "megatron.core.transformer.moe.router",
        ("self.weight.data = self.weight.data.to(device=torch.cuda.current_device())",),
        "TopKRouter.gating moves a CPU router weight to torch.cuda.current_device(): "
        "AssertionError: Torch not compiled with CUDA enabled",
    ),
    ShimmedModule(
        "megatron.core.utils",
        ('l2_cuda = torch.tensor([float(l2_reduced)], dtype=torch.float, device="cuda")',),
        "local_multi_tensor_l2_norm (the grad-norm fallback without apex): "
        "AssertionError: Torch not compiled with CUDA enabled",
    ),
)


@dataclass(frozen=True)
class MissingName:
    """A module-level name a Megatron module uses but leaves undefined when Transformer Engine is absent."""

    module: str
    name: str
    needles: tuple[str, ...]
    """Source fragments that use the name (each must still be in the module)."""
    error: str


MISSING_TE_NAMES: tuple[MissingName, ...] = (
    MissingName(
        "megatron.core.transformer.moe.moe_utils",
        "te_general_gemm",
        ("if te_general_gemm is not None and router_dtype != torch.float64:",
         "if te_general_gemm is not None and ctx.router_dtype != torch.float64:"),
        "MoE router (RouterGatingLinearFunction.forward / backward) without Transformer Engine: "
        "NameError: name 'te_general_gemm' is not defined",
    ),
)


def define_missing_te_names() -> list[str]:
    """Define each :data:`MISSING_TE_NAMES` entry as ``None`` where the module lacks it. Idempotent.

    Returns the ``module.name`` entries it defined (empty with Transformer Engine installed: the
    module then imported the real function).
    """
    defined = []
    for spec in MISSING_TE_NAMES:
        module = importlib.import_module(spec.module)
        if not hasattr(module, spec.name):
            setattr(module, spec.name, None)
            defined.append(f"{spec.module}.{spec.name}")
    return defined


@dataclass(frozen=True)
class WrappedFunction:
    """A Megatron function run with CPU tensors reporting CUDA type names / ``.cuda()`` as a no-op."""

    module: str
    qualname: str
    needles: tuple[str, ...]
    error: str
    type_names: bool = False
    """While it runs, ``Tensor.type()`` (no argument) returns ``torch.cuda.*`` names for CPU tensors."""
    cuda_noop: bool = False
    """While it runs, ``Tensor.cuda()`` returns the tensor itself."""


WRAPPED_FUNCTIONS: tuple[WrappedFunction, ...] = (
    WrappedFunction(
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
        ("weight.data = weight.data.cuda()",),
        "tied embeddings with PP>1: AssertionError: Torch not compiled with CUDA enabled",
        cuda_noop=True,
    ),
    WrappedFunction(
        "megatron.core.optimizer.clip_grads",
        "clip_grad_by_total_norm_fp32",
        ("assert param.grad.type() == 'torch.cuda.FloatTensor'",),
        "grad clipping: bare AssertionError",
        type_names=True,
    ),
    WrappedFunction(
        "megatron.core.optimizer.optimizer",
        "Float16OptimizerWithFloat16Params.__init__",
        ("param.type() == 'torch.cuda.FloatTensor'",),
        "bf16 without the distributed optimizer: TypeError: Wrapped parameters must be one of "
        "torch.cuda.FloatTensor, torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor",
        type_names=True,
    ),
    WrappedFunction(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
        ("model_param.type() == 'torch.cuda.FloatTensor'",),
        "distributed optimizer: TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...",
        type_names=True,
    ),
    WrappedFunction(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.__init__",
        ("param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",),
        "distributed optimizer with bf16 params: main_param bookkeeping skipped (wrong fp32 master copies)",
        type_names=True,
    ),
)


def _resolve(module: Any, qualname: str) -> tuple[Any, str, Any]:
    owner = module
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1], inspect.getattr_static(owner, parts[-1])


def _wrap(spec: WrappedFunction) -> None:
    module = importlib.import_module(spec.module)
    owner, attr, original = _resolve(module, spec.qualname)
    # Keep the descriptor kind: staticmethod / classmethod / plain function.
    kind = type(original) if isinstance(original, (staticmethod, classmethod)) else None
    fn = original.__func__ if kind is not None else original

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with tensor_overrides(type_names=spec.type_names, cuda_noop=spec.cuda_noop):
            return fn(*args, **kwargs)

    wrapper.__megatron_ghpo_cpu_compat__ = True  # type: ignore[attr-defined]
    setattr(owner, attr, kind(wrapper) if kind is not None else wrapper)
    if owner is module:
        # Rebind names imported elsewhere with ``from module import fn`` (e.g. optimizer.py imports
        # clip_grad_by_total_norm_fp32 by name).
        for other in _MEGATRON_MODULES_BINDING.get(f"{spec.module}.{spec.qualname}", ()):
            setattr(importlib.import_module(other), attr, wrapper)


_MEGATRON_MODULES_BINDING: dict[str, tuple[str, ...]] = {
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32": ("megatron.core.optimizer.optimizer",),
}


# ---------------------------------------------------------------------------------------------
# RNG tracker state on the CPU generator.
# ---------------------------------------------------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU stand-in for ``tensor_parallel.random._get_cuda_rng_state`` (graph-safe states are CUDA-only)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """CPU stand-in for ``tensor_parallel.random._set_cuda_rng_state``: applies the state now."""
    torch.set_rng_state(new_state)


RNG_FUNCTIONS: dict[str, tuple[Callable[..., Any], str]] = {
    # name in megatron.core.tensor_parallel.random -> (replacement, needle in the original)
    "_get_cuda_rng_state": (_cpu_get_rng_state, "return torch.cuda.random.get_rng_state(device=device)"),
    "_set_cuda_rng_state": (_cpu_set_rng_state, "_lazy_call(cb)"),
}


# ---------------------------------------------------------------------------------------------
# MoE alltoall split sizes on the CPU.
# ---------------------------------------------------------------------------------------------


def _cpu_maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU stand-in for ``moe_utils.maybe_move_tensor_to_cpu``.

    The original converts only CUDA tensors (``tensor.is_cuda``) to host values (NumPy with
    ``as_numpy``). On the CPU the alltoall dispatcher's split sizes therefore stay tensors, and
    ``all_to_all_single`` rejects them (``TypeError: all_to_all_single(): incompatible function
    arguments``) as soon as EP > 1. Here CPU tensors get the same conversion; ``record_stream`` is
    a CUDA caching-allocator matter and has nothing to do.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


REPLACED_FUNCTIONS: dict[str, tuple[Callable[..., Any], str, tuple[str, ...]]] = {
    # "module.name" -> (replacement, needle in the original, modules that import it by name)
    "megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu": (
        _cpu_maybe_move_tensor_to_cpu,
        "if torch.is_tensor(tensor) and tensor.is_cuda:",
        ("megatron.core.transformer.moe.token_dispatcher",),
    ),
}


def _replace_functions() -> None:
    for target, (replacement, _needle, binders) in REPLACED_FUNCTIONS.items():
        module_name, name = target.rsplit(".", 1)
        for where in (module_name, *binders):
            setattr(importlib.import_module(where), name, replacement)


# ---------------------------------------------------------------------------------------------
# Distributed-optimizer checkpoints with torch's Adam (no apex / Transformer Engine, as on CPU).
# ---------------------------------------------------------------------------------------------

ADAM_STEP_NEEDLE = 'dst_tensors = {"param": main_param, **optim_state}'
_ADAM_FIX_APPLIED = False


def apply_torch_adam_checkpoint_fix() -> None:
    """Let the distributed optimizer load checkpoints into torch ``Adam`` state. Idempotent.

    Replaces nothing CUDA-specific: without apex/TE, Megatron-Core 0.16.1 falls back to
    ``torch.optim.Adam``, whose state holds a per-parameter ``step``, and
    ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies *every* state key from
    the loaded tensors; the fully reshardable format stores ``step`` in the param groups instead,
    so the load fails with ``KeyError: 'step'``. The wrapper keeps the current ``step`` for that
    copy; ``policy.checkpoint`` then restores the saved step from the param groups.
    """
    global _ADAM_FIX_APPLIED
    if _ADAM_FIX_APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 and "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    set_states.__megatron_ghpo_cpu_compat__ = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _ADAM_FIX_APPLIED = True


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    """True when torch sees a usable CUDA device (the patches are then never applied)."""
    return torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Neutralise Megatron-Core's CUDA assumptions when CUDA is absent. Idempotent.

    Returns True when the patches are (now or already) active, False on a CUDA machine.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if cuda_available():
        return False
    import megatron.core  # noqa: F401  (fail here, clearly, if Megatron-Core is missing)

    version = megatron_core_version()
    if version != VALIDATED_MEGATRON_CORE:
        logger.warning(
            "megatron-core %s is installed; the CPU compatibility patches were validated on %s "
            "(run tests/unit/test_cpu_compat.py to check them)",
            version,
            VALIDATED_MEGATRON_CORE,
        )
    proxy = CpuTorch()
    for spec in SHIMMED_MODULES:
        module = importlib.import_module(spec.module)
        module.torch = proxy  # type: ignore[attr-defined]
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    for name, (replacement, _needle) in RNG_FUNCTIONS.items():
        setattr(random_mod, name, replacement)
    for wrapped in WRAPPED_FUNCTIONS:
        _wrap(wrapped)
    define_missing_te_names()
    _replace_functions()
    apply_torch_adam_checkpoint_fix()
    _APPLIED = True
    logger.debug("Megatron-Core CPU compatibility patches applied (%d modules)", len(SHIMMED_MODULES))
    return True


def is_applied() -> bool:
    """Whether :func:`apply_cpu_compat` has patched this process."""
    return _APPLIED


def megatron_core_version() -> str:
    """Installed Megatron-Core version string."""
    from importlib.metadata import version

    return version("megatron-core")


def stale_patches() -> list[str]:
    """Patches whose target no longer holds the CUDA call they neutralise (read from the source files).

    Reads the installed source files (not the live, possibly patched objects), so it gives the same
    answer before and after :func:`apply_cpu_compat`. An empty list means every patch still has work
    to do; a missing function is reported too.
    """
    problems: list[str] = []

    def source_of(module_name: str, qualname: str | None = None) -> str:
        # Read the file, not the live objects: the live objects are the patched ones.
        spec_ = importlib.util.find_spec(module_name)
        if spec_ is None or spec_.origin is None:
            raise ModuleNotFoundError(f"cannot locate the source of {module_name}")
        text = Path(spec_.origin).read_text()
        if qualname is None:
            return text
        nodes: list[ast.AST] = [ast.parse(text)]
        for part in qualname.split("."):
            found = [
                n
                for parent in nodes
                for n in ast.iter_child_nodes(parent)
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part
            ]
            if not found:
                return ""
            nodes = found
        return "\n".join(ast.get_source_segment(text, n) or "" for n in nodes)

    for spec in SHIMMED_MODULES:
        text = source_of(spec.module)
        problems += [f"{spec.module}: no longer contains {n!r}" for n in spec.needles if n not in text]
    for name, (_replacement, needle) in RNG_FUNCTIONS.items():
        text = source_of("megatron.core.tensor_parallel.random", name)
        if needle not in text:
            problems.append(f"megatron.core.tensor_parallel.random.{name}: no longer contains {needle!r}")
    for target, (_replacement, needle, binders) in REPLACED_FUNCTIONS.items():
        module_name, name = target.rsplit(".", 1)
        if needle not in source_of(module_name, name):
            problems.append(f"{target}: no longer contains {needle!r}")
        problems += [f"{b}: no longer imports {name}" for b in binders if f"{name}" not in source_of(b)]
    text = source_of("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._set_main_param_and_optimizer_states")
    if ADAM_STEP_NEEDLE not in text:
        problems.append(f"DistributedOptimizer._set_main_param_and_optimizer_states: no longer contains {ADAM_STEP_NEEDLE!r}")
    for missing in MISSING_TE_NAMES:
        text = source_of(missing.module)
        problems += [f"{missing.module}: no longer contains {n!r}" for n in missing.needles if n not in text]
        if f"{missing.name} = None" in text:
            problems.append(f"{missing.module}: now defines {missing.name} = None itself (the patch is unnecessary)")
    for wrapped in WRAPPED_FUNCTIONS:
        text = source_of(wrapped.module, wrapped.qualname)
        problems += [f"{wrapped.module}.{wrapped.qualname}: no longer contains {n!r}" for n in wrapped.needles if n not in text]
    return problems
