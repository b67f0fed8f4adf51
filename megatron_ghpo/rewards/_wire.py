"""Length-prefixed pickle frames between the verifier pool and its workers.

A frame is an 8-byte little-endian payload length followed by the pickled payload. The parent
reads and writes non-blocking (:class:`FrameReader` accumulates partial reads); workers use the
blocking helpers.
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


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> Any:
    """Blocking read of one frame (raises EOFError when the peer has closed)."""
    (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return pickle.loads(_recv_exact(sock, n))
