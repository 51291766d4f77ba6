"""Child processes for local tools and tests (servers on loopback): a free port, dying with the parent, stopping.

Linux-specific where it must be: a child asks the kernel for SIGTERM when its parent dies, so a server started by
a test run, the benchmark or the demo never outlives it, even when that parent is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """For ``preexec_fn``: in the child, ask Linux for SIGTERM when the parent dies (nothing elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own clean-up is all there is


def child_pids(pid: int) -> list[int]:
    """The pids of the children of process ``pid`` (gunicorn's workers under its arbiter); [] when it is gone."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in children.read_text().split()]
    except OSError:
        return []


def stop(process: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
    """SIGTERM ``process``, then SIGKILL if it is still running after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
