"""`megatron-ghpo rollout-server`: a rollout engine (vLLM) behind a small HTTP API, for the split layout
(one node generates, N nodes train).

Endpoints (JSON bodies; errors are ``{"error": msg}`` with 400 bad input, 409 wrong state, 500 failure):

- ``GET /health``: 200 ``{"ready": true, ...}`` once the engine is up, 503 while it loads or if it failed.
- ``GET /weight_version``: ``{"weight_version": v}``.
- ``POST /generate`` ``{"prompt_token_ids": [[...]], "sampling": {SamplingParams fields}}`` ->
  ``{"completions": [[{token_ids, text, logprobs, finish_reason}, ...], ...]}``.
- ``POST /submit`` ``{"request_id", "prompt_token_ids": [...], "sampling"}``; ``POST /poll`` ->
  ``{"finished": [[request_id, [completion, ...]], ...]}`` (streaming generation).
- ``POST /score_tokens`` ``{"token_ids": [[...]]}`` -> ``{"logprobs": [[...]]}`` (temperature 1).
- ``POST /init_weight_channel`` ``{"backend": "gloo"|"nccl"}`` -> ``{"port": p}``: the trainer then joins
  a two-party process group through the TCP store on ``p`` (see :mod:`.weight_channel`).
- ``POST /weights/begin``, ``POST /weights/bucket`` ``{"manifest": [...]}`` (the tensors follow over
  the channel), ``POST /weights/end`` ``{"abort": bool}`` -> ``{"weight_version": v}``.
- ``POST /close``: stop the server.

The engine lives on the main thread; HTTP handler threads hand it jobs through a queue, so requests
from several clients (one per data-parallel trainer replica) are served one at a time.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from megatron_ghpo.logging_utils import get_logger
from megatron_ghpo.rollout import wire
from megatron_ghpo.rollout.weight_channel import WeightChannel, bucket_size, unpack_bucket

logger = get_logger("rollout.server")

_END, _ABORT = object(), object()


class StateError(RuntimeError):
    """A request that the server's current state does not allow (HTTP 409)."""


class RolloutServer:
    """Serves one engine built by ``engine_factory()`` on ``host:port`` (port 0 = any free port)."""

    def __init__(self, engine_factory: Callable[[], Any], *, host: str, port: int, channel_timeout_s: float = 600.0,
                 description: dict[str, Any] | None = None) -> None:
        self._factory = engine_factory
        self.host, self.channel_timeout_s = host, channel_timeout_s
        self.description = dict(description or {})
        self.engine: Any = None
        self.error: str | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._channel: WeightChannel | None = None
        self._channel_box: dict | None = None
        self._buckets: queue.Queue | None = None
        self._update: Future | None = None
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]

    # ------------------------------------------------------------------------------- main thread
    def serve_forever(self) -> None:
        """Start HTTP (health answers 503 while the engine loads), build the engine, run jobs until closed."""
        threading.Thread(target=self._httpd.serve_forever, name="rollout-http", daemon=True).start()
        logger.info("rollout server listening on http://%s:%d (loading the engine)", self.host, self.port)
        try:
            self.engine = self._factory()
        except BaseException as exc:
            self.error = f"engine failed to start: {type(exc).__name__}: {exc}"
            logger.error("%s", self.error)
            self._httpd.shutdown()
            raise
        logger.info("rollout server ready on http://%s:%d", self.host, self.port)
        try:
            while True:
                fn, fut = self._jobs.get()
                if fn is None:
                    break
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the request
                        fut.set_exception(exc)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._channel is not None:
            self._channel.close()
        if self.engine is not None:
            self.engine.close()
        logger.info("rollout server stopped")

    # ---------------------------------------------------------------------------- handler side
    def run_job(self, fn: Callable[[], Any]) -> Any:
        if self.engine is None:
            raise StateError(self.error or "the engine is still loading: wait for GET /health to return 200")
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut.result()

    def stop(self) -> None:
        self._jobs.put((None, None))

    def health(self) -> tuple[int, dict]:
        ready = self.engine is not None and self.error is None
        body = {"ready": ready, "error": self.error, **self.description}
        if ready:
            body["weight_version"] = self.engine.weight_version
        return (200 if ready else 503), body

    def init_channel(self, backend: str) -> dict:
        with self._lock:
            if self._update is not None and not self._update.done():
                raise StateError("a weight update is in progress; finish it before re-initialising the channel")
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            _, box = WeightChannel.serve(bind_host=self.host, port=0, backend=backend,
                                         timeout_s=self.channel_timeout_s)
            self._channel_box = box
            return {"port": box["port"], "backend": backend}

    def _ready_channel(self) -> WeightChannel:
        box = self._channel_box
        if box is None:
            raise StateError("no weight channel: POST /init_weight_channel first")
        if "error" in box:
            raise RuntimeError(f"weight channel setup failed: {box['error']}")
        if "channel" not in box:
            raise StateError("the trainer has not joined the weight channel yet")
        self._channel = box["channel"]
        return self._channel

    def begin_update(self) -> dict:
        with self._lock:
            if self._update is not None and not self._update.done():
                raise StateError("a weight update is already in progress")
            channel = self._ready_channel()
            self._buckets = queue.Queue()
            self._update = Future()
            self._jobs.put((lambda: self._load(channel, self._buckets), self._update))
        return {}

    def add_bucket(self, manifest: Any) -> dict:
        if not isinstance(manifest, list) or not all(isinstance(e, dict) for e in manifest):
            raise ValueError("'manifest' must be a list of {name, dtype, shape, offset, nbytes} objects")
        if self._update is None or self._update.done():
            raise StateError("no weight update in progress: POST /weights/begin first")
        self._buckets.put(manifest)
        return {}

    def end_update(self, abort: bool) -> dict:
        if self._update is None:
            raise StateError("no weight update in progress: POST /weights/begin first")
        self._buckets.put(_ABORT if abort else _END)
        self._update.result(timeout=self.channel_timeout_s)
        return {"weight_version": self.engine.weight_version}

    def _load(self, channel: WeightChannel, buckets: queue.Queue) -> None:
        """Main thread: feed the engine lazily from received buckets; on failure drain the rest so the
        trainer's broadcasts complete, then report the failure."""

        def next_item() -> Any:
            try:
                return buckets.get(timeout=self.channel_timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no weight bucket from the trainer within {self.channel_timeout_s:.0f} s") from None

        def receive(manifest: list[dict]) -> torch.Tensor:
            buf = torch.empty(bucket_size(manifest), dtype=torch.uint8, device=channel.device)
            channel.broadcast(buf)
            return buf

        def stream():
            while True:
                item = next_item()
                if item is _END:
                    return
                if item is _ABORT:
                    raise RuntimeError("the trainer aborted the weight update")
                yield from unpack_bucket(item, receive(item))

        try:
            self.engine.load_weights(stream())
        except BaseException:
            while (item := next_item()) not in (_END, _ABORT):
                receive(item)
            raise


def _handler_for(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    def generate(b: dict) -> dict:
        rows, sampling = wire.token_rows(b, "prompt_token_ids"), wire.sampling_from_json(b.get("sampling", {}))
        out = server.run_job(lambda: server.engine.generate(rows, sampling))
        return {"completions": [[wire.completion_to_json(c) for c in cs] for cs in out]}

    def submit(b: dict) -> dict:
        (row,) = wire.token_rows({"p": [b.get("prompt_token_ids")]}, "p")
        sampling = wire.sampling_from_json(b.get("sampling", {}))
        server.run_job(lambda: server.engine.submit(b.get("request_id"), row, sampling))
        return {}

    def poll(b: dict) -> dict:
        done = server.run_job(server.engine.poll)
        return {"finished": [[rid, [wire.completion_to_json(c) for c in cs]] for rid, cs in done]}

    def score(b: dict) -> dict:
        rows = wire.token_rows(b, "token_ids")
        return {"logprobs": server.run_job(lambda: server.engine.score_tokens(rows))}

    def close(b: dict) -> dict:
        server.stop()
        return {"closing": True}

    post = {
        "/generate": generate, "/submit": submit, "/poll": poll, "/score_tokens": score,
        "/init_weight_channel": lambda b: server.init_channel(str(b.get("backend", "gloo"))),
        "/weights/begin": lambda b: server.begin_update(),
        "/weights/bucket": lambda b: server.add_bucket(b.get("manifest")),
        "/weights/end": lambda b: server.end_update(bool(b.get("abort", False))),
        "/close": close,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(*server.health())
            elif self.path == "/weight_version":
                if server.engine is None:
                    self._send(503, {"error": server.error or "the engine is still loading"})
                else:
                    self._send(200, {"weight_version": server.engine.weight_version})
            else:
                self._send(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self) -> None:
            fn = post.get(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            if fn is None:
                self._send(404, {"error": f"no such endpoint: POST {self.path}"})
                return
            try:
                body = json.loads(raw or b"{}")
                self._send(200, fn(body))
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": f"{type(exc).__name__}: {exc}"})
            except StateError as exc:
                self._send(409, {"error": str(exc)})
            except Exception as exc:
                logger.exception("POST %s failed", self.path)
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    return Handler


# ------------------------------------------------------------------------------------------- CLI
def add_rollout_server_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``megatron-ghpo rollout-server``."""
    p = subparsers.add_parser("rollout-server", help="serve a rollout engine over HTTP (split layout)")
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the engine")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="must match the trainer's engine dtype (bf16 -> bfloat16)")
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + completion tokens (+1 for scoring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache GiB on CPU (default 1)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--channel-timeout-s", type=float, default=600.0,
                   help="timeout of every weight-channel collective and of a stalled weight update")
    p.set_defaults(func=cmd_rollout_server)
    return p


def cmd_rollout_server(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model!r} is not a Hugging Face model folder (no config.json)")
    if args.tp != 1:
        raise NotImplementedError(
            "rollout-server --tp > 1 (one vLLM engine spanning several GPUs) is not implemented: the "
            "in-process engine is single-rank; serve with --tp 1 (a 7B model fits one H100)")
    from megatron_ghpo.rollout.factory import build_rollout_engine

    opts: dict[str, Any] = {"dtype": args.dtype, "max_model_len": args.max_model_len, "seed": args.seed}
    if args.engine == "vllm":
        opts.update(gpu_memory_utilization=args.gpu_memory_utilization, colocate="none",
                    enable_prefix_caching=not args.no_prefix_caching,
                    kv_cache_gib=None if torch.cuda.is_available() else (args.kv_cache_gb or 1.0))
    server = RolloutServer(lambda: build_rollout_engine(args.engine, args.model, **opts), host=args.host,
                           port=args.port, channel_timeout_s=args.channel_timeout_s,
                           description={"model": args.model, "engine": args.engine, "dtype": args.dtype,
                                        "max_model_len": args.max_model_len})
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_ghpo.rollout.server ...`` (same options as ``megatron-ghpo rollout-server``)."""
    import os

    from megatron_ghpo.logging_utils import configure_logging

    parser = argparse.ArgumentParser(prog="megatron-ghpo")
    add_rollout_server_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rollout-server", *(argv if argv is not None else __import__("sys").argv[1:])])
    configure_logging(os.environ.get("MEGATRON_GHPO_LOG_LEVEL", "INFO"))
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
