"""A dedicated two-party process group for weight transfer (trainer's rollout leader -> rollout server),
and the bucket format sent over it.

The group is built from a ``torch.distributed.TCPStore`` and a backend object
(``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL`` on GPUs) directly, so neither side calls
``torch.distributed.init_process_group``: the trainer keeps its own default group untouched.
Rank 0 is the trainer (the broadcast source), rank 1 the server; the server hosts the store.

A bucket is one flat ``uint8`` tensor holding several HF tensors back to back (each starting at a
multiple of :data:`ALIGN` bytes) plus a manifest ``[{name, dtype, shape, offset, nbytes}]`` sent
out of band (over HTTP). Every collective has a timeout, so a dead peer raises instead of hanging.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_ghpo.logging_utils import get_logger

logger = get_logger("rollout.channel")

ALIGN = 16
"""Byte alignment of each tensor inside a bucket (so a slice can be viewed as any dtype)."""
BACKENDS = ("gloo", "nccl")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _make_group(backend: str, store: Any, rank: int, timeout: datetime.timedelta) -> Any:
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("weight channel backend 'nccl' needs a CUDA GPU on both sides; use 'gloo' on CPU")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    raise ValueError(f"weight channel backend {backend!r}: expected one of {BACKENDS}")


class WeightChannel:
    """One end of the two-party group. Build with :meth:`serve` (server, rank 1) or :meth:`connect`
    (trainer, rank 0)."""

    def __init__(self, group: Any, *, rank: int, backend: str, timeout_s: float, store: Any) -> None:
        self.group, self.rank, self.backend, self.timeout_s = group, rank, backend, timeout_s
        self._store = store  # keeps the TCPStore (and its server socket) alive with the group
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @classmethod
    def serve(cls, *, bind_host: str, port: int, backend: str, timeout_s: float) -> tuple[threading.Thread, dict]:
        """Server side: host the store on ``port`` (0 = any free port) and build rank 1 of the group in a
        background thread (construction waits for the trainer). Returns the thread and a dict that
        receives ``channel`` (a :class:`WeightChannel`) or ``error`` (the exception) when it ends, and
        already holds ``port`` (the store's actual port)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(bind_host, port, 2, is_master=True, wait_for_workers=False, timeout=timeout)
        box: dict[str, Any] = {"port": store.port}

        def build() -> None:
            try:
                group = _make_group(backend, store, 1, timeout)
                box["channel"] = cls(group, rank=1, backend=backend, timeout_s=timeout_s, store=store)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                box["error"] = exc

        thread = threading.Thread(target=build, name="weight-channel-init", daemon=True)
        thread.start()
        return thread, box

    @classmethod
    def connect(cls, *, host: str, port: int, backend: str, timeout_s: float) -> WeightChannel:
        """Trainer side: join the server's store as rank 0 (the broadcast source)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(host, port, 2, is_master=False, timeout=timeout)
            group = _make_group(backend, store, 0, timeout)
        except Exception as exc:
            raise RuntimeError(
                f"could not join the rollout server's weight channel at {host}:{port} ({backend}): {exc}; "
                "check that this node can reach the server node on that port"
            ) from exc
        return cls(group, rank=0, backend=backend, timeout_s=timeout_s, store=store)

    def broadcast(self, buf: torch.Tensor) -> None:
        """Send (rank 0) or receive in place (rank 1) one flat buffer; raises on timeout or a dead peer."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)
        self.group.broadcast([buf], opts).wait()

    def close(self) -> None:
        group, self.group = self.group, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except Exception as exc:  # noqa: BLE001 - closing a group whose peer died
                logger.debug("weight channel shutdown: %s", exc)
        self._store = None


# ---------------------------------------------------------------------------------------- buckets
def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def iter_buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 device: torch.device) -> Iterator[tuple[list[dict], torch.Tensor]]:
    """Group ``(hf_name, tensor)`` pairs into flat uint8 buffers of at most ``bucket_bytes`` (a tensor
    larger than that travels alone). Consumes ``weights`` lazily; yields ``(manifest, buffer)``."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes={bucket_bytes} is too small (minimum {ALIGN})")
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> tuple[list[dict], torch.Tensor]:
        manifest, offset = [], 0
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        for name, t in pending:
            nbytes = t.numel() * t.element_size()
            buf[offset:offset + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            manifest.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                             "offset": offset, "nbytes": nbytes})
            offset += _padded(nbytes)
        return manifest, buf

    for name, tensor in weights:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        need = _padded(tensor.numel() * tensor.element_size())
        if pending and size + need > bucket_bytes:
            yield flush()
            pending, size = [], 0
        pending.append((name, tensor.to(device)))
        size += need
    if pending:
        yield flush()


def bucket_size(manifest: list[dict]) -> int:
    """Bytes of the flat buffer a manifest describes."""
    return max((_padded(e["offset"] + e["nbytes"]) for e in manifest), default=0)


def unpack_bucket(manifest: list[dict], buf: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one received bucket (views into ``buf``), in manifest order."""
    for e in manifest:
        dtype = getattr(torch, e["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"weight bucket entry {e['name']!r} has unknown dtype {e['dtype']!r}")
        raw = buf[e["offset"]:e["offset"] + e["nbytes"]]
        yield e["name"], raw.view(dtype).reshape(e["shape"])
