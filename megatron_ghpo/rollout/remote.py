"""RemoteRolloutEngine: the trainer's side of the split layout, a StreamingRolloutEngine that talks to
``megatron-ghpo rollout-server`` over HTTP and pushes weights over a dedicated collective channel.

Failure handling: every HTTP call has a timeout; a refused/reset connection or a timeout raises
:class:`RolloutServerError` naming the server URL (no retry loop after the server was once ready, so
a dead server stops the trainer within ``timeout_s``). Collectives on the weight channel carry the
same timeout.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.records import Completion
from megatron_ghpo.rollout import wire
from megatron_ghpo.rollout.base import SamplingParams
from megatron_ghpo.rollout.weight_channel import WeightChannel, default_backend, iter_buckets

logger = get_logger("rollout.remote")


class RolloutServerError(RuntimeError):
    """The rollout server is unreachable, timed out, or reported a failure."""


class RemoteRolloutEngine:
    """Rollout engine served by a ``rollout-server`` at ``url`` (e.g. ``http://node0:8000``).

    ``timeout_s``: limit of one HTTP call (a whole generate) and of each weight-channel collective.
    ``ready_timeout_s``: how long the constructor waits for the server to come up.
    ``bucket_bytes``: upper bound of one weight bucket. ``push_weights``: False for all but one client
    of a shared server (other data-parallel replicas): their :meth:`load_weights` consumes the
    iterator and waits until the server holds the pushed version. ``shutdown_on_close``: POST /close
    on :meth:`close` (the server of a split job ends with the trainer).
    """

    def __init__(self, url: str, *, timeout_s: float = 600.0, ready_timeout_s: float = 900.0,
                 bucket_bytes: int = 256 << 20, push_weights: bool = True, shutdown_on_close: bool = False,
                 backend: str | None = None, min_model_len: int | None = None) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"rollout_server_url {url!r} must look like http://HOST:PORT")
        self.url, self.host = url.rstrip("/"), parsed.hostname
        self.timeout_s, self.bucket_bytes = timeout_s, bucket_bytes
        self.push_weights, self.shutdown_on_close = push_weights, shutdown_on_close
        self.backend = backend or default_backend()
        self._channel: WeightChannel | None = None
        self._pending: set[str] = set()
        self._closed = False
        self.info = self._wait_ready(ready_timeout_s)
        if min_model_len is not None and int(self.info.get("max_model_len", min_model_len)) < min_model_len:
            raise ValueError(f"rollout server {self.url} serves max_model_len={self.info['max_model_len']} but the "
                             f"trainer needs {min_model_len}: restart it with --max-model-len {min_model_len}")
        self._base_version = int(self.info["weight_version"])
        self._version = 0
        if push_weights:
            self._open_channel()

    # ------------------------------------------------------------------------------------ HTTP
    def _call(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        limit = self.timeout_s if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=limit) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", "")
            except Exception:  # noqa: BLE001 - a non-JSON error body
                msg = exc.reason
            raise RolloutServerError(f"rollout server {self.url}: {method} {path} failed ({exc.code}): {msg}") from exc
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RolloutServerError(
                f"rollout server {self.url} did not answer {method} {path} within {limit:.0f} s ({reason}); "
                "is the server process alive? (check its log on the rollout node)") from exc

    def _wait_ready(self, ready_timeout_s: float) -> dict:
        deadline, last = time.monotonic() + ready_timeout_s, "no answer yet"
        logger.info("waiting up to %.0f s for the rollout server at %s", ready_timeout_s, self.url)
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=min(10.0, ready_timeout_s)) as resp:
                    body = json.loads(resp.read())
                    if body.get("ready"):
                        logger.info("rollout server %s is ready (%s)", self.url, body.get("model"))
                        return body
            except urllib.error.HTTPError as exc:  # 503 while loading; an error field means it failed
                body = json.loads(exc.read() or b"{}")
                if body.get("error"):
                    raise RolloutServerError(f"rollout server {self.url} failed to start: {body['error']}") from exc
                last = "engine still loading"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout server {self.url} not ready after {ready_timeout_s:.0f} s ({last}); start it with "
                    "`megatron-ghpo rollout-server --model DIR --port P` or raise rollout_server_ready_timeout_s")
            time.sleep(0.5)

    def _open_channel(self) -> None:
        reply = self._call("POST", "/init_weight_channel", {"backend": self.backend})
        self._channel = WeightChannel.connect(host=self.host, port=int(reply["port"]), backend=self.backend,
                                              timeout_s=self.timeout_s)

    # -------------------------------------------------------------------------------- protocol
    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        out = self._call("POST", "/generate", {"prompt_token_ids": [list(map(int, r)) for r in prompt_token_ids],
                                               "sampling": wire.sampling_to_json(sampling)})
        return [[wire.completion_from_json(c) for c in cs] for cs in out["completions"]]

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        if request_id in self._pending:
            raise ValueError(f"submit: request_id {request_id!r} is already pending; ids must be unique")
        self._call("POST", "/submit", {"request_id": request_id, "prompt_token_ids": list(map(int, prompt_token_ids)),
                                       "sampling": wire.sampling_to_json(sampling)})
        self._pending.add(request_id)

    def poll(self) -> list[tuple[str, list[Completion]]]:
        out = self._call("POST", "/poll", {})
        done = [(rid, [wire.completion_from_json(c) for c in cs]) for rid, cs in out["finished"]]
        self._pending.difference_update(rid for rid, _ in done)
        return done

    def has_pending(self) -> bool:
        return bool(self._pending)

    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        return self._call("POST", "/score_tokens", {"token_ids": [list(map(int, r)) for r in token_ids_list]})["logprobs"]

    def server_weight_version(self) -> int:
        return int(self._call("GET", "/weight_version")["weight_version"])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named tensors to the server in buckets of at most ``bucket_bytes`` (manifest over
        HTTP, bytes over the channel); returns once the server has loaded them."""
        if not self.push_weights:
            for _ in weights:  # the export is collective on the trainer side: take part, drop the tensors
                pass
            self._version += 1
            self._wait_for_version(self._base_version + self._version)
            return
        if self._channel is None:
            raise RolloutServerError(f"rollout server {self.url}: the weight channel is closed")
        t0, nbytes, nb = time.perf_counter(), 0, 0
        self._call("POST", "/weights/begin", {})
        try:
            for manifest, buf in iter_buckets(weights, self.bucket_bytes, self._channel.device):
                self._call("POST", "/weights/bucket", {"manifest": manifest})
                try:
                    self._channel.broadcast(buf)
                except Exception as exc:
                    raise RolloutServerError(f"rollout server {self.url}: weight broadcast failed ({exc})") from exc
                nbytes, nb = nbytes + buf.numel(), nb + 1
        except BaseException:
            try:  # tell the server, so it stops waiting for buckets
                self._call("POST", "/weights/end", {"abort": True}, timeout=min(self.timeout_s, 30.0))
            except RolloutServerError as exc:
                logger.warning("could not abort the weight update on %s: %s", self.url, exc)
            raise
        reply = self._call("POST", "/weights/end", {"abort": False})
        self._version += 1
        logger.debug("pushed weights v%d (server v%s): %d buckets, %.1f MB in %.3f s", self._version,
                     reply["weight_version"], nb, nbytes / 1e6, time.perf_counter() - t0)

    def _wait_for_version(self, target: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while (v := self.server_weight_version()) < target:
            if time.monotonic() > deadline:
                raise RolloutServerError(f"rollout server {self.url} still holds weight version {v} after "
                                         f"{self.timeout_s:.0f} s; expected {target} from the pushing replica")
            time.sleep(0.05)

    def sleep(self) -> None:
        """No-op: the server's memory is not shared with the trainer."""

    def wake(self) -> None:
        """No-op (see :meth:`sleep`)."""

    def close(self) -> None:
        """Close the weight channel; with ``shutdown_on_close`` also stop the server."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.shutdown_on_close:
            try:
                self._call("POST", "/close", {}, timeout=min(self.timeout_s, 30.0))
            except RolloutServerError as exc:
                logger.warning("could not stop the rollout server: %s", exc)
