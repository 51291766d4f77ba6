"""Start the real service under gunicorn on loopback for black-box tests, and stop it afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cds_hooks.testing.processes import child_pids, die_with_parent, free_port, stop

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class GunicornServer:
    """A running gunicorn with the service; its combined output goes to ``log_path``."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def log(self) -> str:
        """Everything gunicorn and the app have written so far."""
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The pids of the gunicorn workers (children of the arbiter)."""
        return child_pids(self.process.pid)

    def stop(self) -> None:
        """Stop gracefully, then kill if it lingers."""
        stop(self.process)


def start_gunicorn(env: Mapping[str, str], log_path: Path, *, timeout: float = 30.0) -> GunicornServer:
    """Start ``gunicorn -c gunicorn.conf.py service.app:create_app()`` with ``env`` and wait for /healthz."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
                "CDS_BIND": f"127.0.0.1:{port}", "CDS_WORKERS": "2",
                # "{base_url}" in a value (e.g. CDS_PUBLIC_BASE_URL) becomes this server's URL.
                **{name: value.replace("{base_url}", base_url) for name, value in env.items()}}
    gunicorn = Path(sys.executable).with_name("gunicorn")
    log_file = log_path.open("wb")
    process = subprocess.Popen([str(gunicorn), "-c", "gunicorn.conf.py", "service.app:create_app()"],
                               cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                               preexec_fn=die_with_parent)
    log_file.close()
    server = GunicornServer(base_url, process, log_path, full_env)
    try:
        _wait_healthy(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_healthy(server: GunicornServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {server.process.returncode}:\n{server.log()}")
        try:
            if requests.get(server.base_url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet, or the workers are still booting
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not become healthy in {timeout} s:\n{server.log()}")


@pytest.fixture
def gunicorn_factory(tmp_path: Path) -> Iterator[object]:
    """A function ``start(env) -> GunicornServer``; every server it started is stopped at teardown."""
    started: list[GunicornServer] = []

    def start(env: Mapping[str, str]) -> GunicornServer:
        server = start_gunicorn(env, tmp_path / f"gunicorn-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
