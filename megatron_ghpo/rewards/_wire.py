"""Length-prefixed pickle frames between the verifier pool and its workers.

A frame is an 8-byte little-endian payload length followed by the pickled payload. The parent
reads and writes non-blocking (:class:`FrameReader` accumulates partial reads); workers use
:class:`BlockingFrameSocket`.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("<Q")


def encode(obj: Any) -> bytes:
    """One frame holding ``obj`` (raises whatever pickling raises, before anything is sent)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Turns a byte stream into decoded frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if len(self._buf) < HEADER.size + n:
                break
            out.append(pickle.loads(bytes(self._buf[HEADER.size : HEADER.size + n])))
            del self._buf[: HEADER.size + n]
        return out


class BlockingFrameSocket:
    """Worker side: blocking reads of whole frames with few ``recv`` calls, and frame writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader()
        self._ready: list[Any] = []
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)

    def recv(self) -> Any:
        """The next frame's object (raises EOFError when the peer has closed)."""
        while not self._ready:
            n = self.sock.recv_into(self._buf)
            if not n:
                raise EOFError("peer closed the connection")
            self._ready = self._reader.feed(self._view[:n])
        return self._ready.pop(0)

    def send(self, obj: Any) -> None:
        self.sock.sendall(encode(obj))
