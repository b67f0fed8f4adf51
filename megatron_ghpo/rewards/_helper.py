"""Parent side of the verifier helper process (see :mod:`megatron_ghpo.rewards._zygote`)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Sequence


class HelperError(RuntimeError):
    """The helper process could not be started or stopped answering."""


class HelperProcess:
    """A warm process that forks verifier workers on request; all calls come from one thread.

    Nothing here ever blocks the caller: commands go into a queue that :meth:`flush` writes as far
    as the control socket accepts (a Unix datagram/seqpacket socket holds only
    ``net.unix.max_dgram_qlen`` unread messages, 10 by default, and a busy helper may lag); the caller
    calls ``flush()`` again when :attr:`ctrl` is writable while :attr:`wants_write`. ``spawn()`` returns
    the parent's end of a fresh socketpair at once; the worker announces itself on it with
    ``("ready", pid)`` when it has started.
    """

    def __init__(
        self,
        *,
        memory_limit_mb: int,
        nice: int,
        preload: Sequence[str],
        warm_up: bool,
        start_timeout_s: float,
    ) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            sys.executable, "-m", "megatron_ghpo.rewards._zygote",
            str(child_sock.fileno()), str(os.getpid()), str(memory_limit_mb), str(nice), ",".join(preload), "1" if warm_up else "0",
        ]  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                cmd, pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL, env=env
            )
        finally:
            child_sock.close()
        self.ctrl = parent_sock
        self.ctrl.settimeout(start_timeout_s)
        try:
            reply = self.ctrl.recv(8192)
        except OSError as exc:
            self.stop()
            raise HelperError(f"verifier helper process did not report ready: {exc!r}") from exc
        if reply[:1] != b"R":
            detail = reply[1:].decode(errors="replace") if reply else f"exited with code {self.proc.poll()}"
            self.stop()
            raise HelperError(f"verifier helper failed to start ({detail}); preload={list(preload)}")
        self.ctrl.setblocking(False)
        self._outbox: deque[tuple[bytes, socket.socket | None]] = deque()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def wants_write(self) -> bool:
        """Commands are waiting for room in the control socket."""
        return bool(self._outbox)

    def spawn(self) -> socket.socket:
        """Ask for one more worker; returns the parent's end of its connection."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._outbox.append((b"S", child_sock))  # the worker's end stays open here until sent
        self.flush()
        return parent_sock

    def kill(self, pid: int) -> None:
        """SIGKILL one of the helper's workers (a no-op if it already exited)."""
        self._outbox.append((b"K" + struct.pack("<q", pid), None))
        self.flush()

    def flush(self) -> None:
        """Send queued commands until the socket is full; HelperError if the helper is gone."""
        while self._outbox:
            msg, child = self._outbox[0]
            try:
                if child is not None:
                    socket.send_fds(self.ctrl, [msg], [child.fileno()])
                else:
                    self.ctrl.send(msg)
            except BlockingIOError:
                return
            except OSError as exc:
                raise HelperError(f"verifier helper is gone (exit code {self.proc.poll()}): {exc!r}") from exc
            self._outbox.popleft()
            if child is not None:
                child.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the control socket (the helper kills and reaps every worker, then exits) and reap it."""
        for _, child in self._outbox if hasattr(self, "_outbox") else ():
            if child is not None:
                child.close()
        try:
            self.ctrl.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
