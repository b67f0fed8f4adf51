"""Parent side of the verifier helper process (see :mod:`megatron_ghpo.rewards._zygote`)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence


class HelperError(RuntimeError):
    """The helper process could not be started or stopped answering."""


class HelperProcess:
    """A warm process that forks verifier workers on request; all calls come from one thread.

    ``spawn()`` never waits for the helper: it returns the parent's end of a fresh socketpair at
    once; the worker announces itself on it with ``("ready", pid)`` when it has started. ``kill()``
    does not wait either.
    """

    def __init__(
        self, *, memory_limit_mb: int, nice: int, preload: Sequence[str], start_timeout_s: float
    ) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            sys.executable, "-m", "megatron_ghpo.rewards._zygote",
            str(child_sock.fileno()), str(os.getpid()), str(memory_limit_mb), str(nice), ",".join(preload),
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
        self.ctrl.settimeout(30.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self) -> socket.socket:
        """Ask for one more worker; returns the parent's end of its connection."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.ctrl, [b"S"], [child_sock.fileno()])
        except OSError as exc:
            parent_sock.close()
            raise HelperError(f"verifier helper is gone (exit code {self.proc.poll()}): {exc!r}") from exc
        finally:
            child_sock.close()
        return parent_sock

    def kill(self, pid: int) -> None:
        """SIGKILL one of the helper's workers (asynchronous; a no-op if it already exited)."""
        try:
            self.ctrl.send(b"K" + struct.pack("<q", pid))
        except OSError:
            pass  # helper gone: its workers die with it (PR_SET_PDEATHSIG)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the control socket (the helper kills and reaps every worker, then exits) and reap it."""
        try:
            self.ctrl.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
