"""Machinery behind ``cpu_compat``: a ``torch`` proxy for Megatron modules, scoped tensor overrides.

Generic and inert on its own; ``megatron_ghpo.policy.cpu_compat`` decides where it is applied.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, an index, ``torch.device('cuda')``) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "eye", "linspace",
    "rand", "randn", "randint", "zeros_like", "ones_like", "empty_like", "full_like",
)  # fmt: skip


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        # pin_memory needs an accelerator ("Cannot access accelerator device when none is available").
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: CPU work has already happened when it is recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered, so every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass


class _NoNvtx:
    @staticmethod
    def range_push(*args: Any, **kwargs: Any) -> None:
        pass

    @staticmethod
    def range_pop(*args: Any, **kwargs: Any) -> None:
        pass


class CpuCuda:
    """``torch.cuda`` as seen by a shimmed Megatron module on a CPU-only machine."""

    is_available = staticmethod(lambda: False)
    device_count = staticmethod(lambda: 0)
    current_device = staticmethod(lambda: torch.device("cpu"))
    synchronize = staticmethod(lambda *a, **k: None)
    empty_cache = staticmethod(lambda: None)
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *a, **k: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    current_stream = staticmethod(lambda *a, **k: _NullStream())
    default_stream = staticmethod(lambda *a, **k: _NullStream())
    Stream = _NullStream
    Event = _NullEvent
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    nvtx = _NoNvtx

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class CpuTorch:
    """A proxy of ``torch`` whose CUDA device literals and ``torch.cuda`` calls land on the CPU."""

    def __init__(self) -> None:
        self.cuda = CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<megatron_ghpo CpuTorch proxy of torch>"


_ORIG_TENSOR_TYPE = torch.Tensor.type
_ORIG_TENSOR_CUDA = torch.Tensor.cuda


def _type_with_cuda_names(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    if dtype is None and not kwargs:
        name = _ORIG_TENSOR_TYPE(self)
        if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_noop(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


@contextlib.contextmanager
def tensor_overrides(*, type_names: bool, cuda_noop: bool) -> Iterator[None]:
    saved_type, saved_cuda = torch.Tensor.type, torch.Tensor.cuda
    if type_names:
        torch.Tensor.type = _type_with_cuda_names  # type: ignore[method-assign]
    if cuda_noop:
        torch.Tensor.cuda = _cuda_noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = saved_type, saved_cuda  # type: ignore[method-assign]
