"""Servers the benchmark starts on loopback: gunicorn (the service or the do-nothing app) and the fixture FHIR server.

gunicorn always runs with the repository's ``gunicorn.conf.py``, so the service and the do-nothing app share the
worker class, thread count and limits; only the WSGI app differs. Every server is a child process that Linux
stops if the benchmark dies, and its output goes to a log file in the run's work directory.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.timing import BenchmarkError
from cds_hooks.testing.processes import child_pids, die_with_parent, free_port, stop
from service.config import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
SERVICE_APP = "service.app:create_app()"
NULL_APP = "bench.null_app:app"


def default_workers() -> int:
    """The service's default worker count (``CDS_WORKERS``)."""
    return int(next(option.default for option in OPTIONS if option.name == "WORKERS"))


def gunicorn_threads() -> int:
    """The ``threads`` setting of ``gunicorn.conf.py`` (gunicorn's default, 1, if it sets none)."""
    for node in ast.parse(GUNICORN_CONF.read_text()).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "threads" for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int)):
            return node.value.value
    return 1


@dataclass
class Server:
    """A server process we started, answering at ``base_url``; its output is in ``log_path``."""

    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def worker_pids(self) -> list[int]:
        """The pids of the process's children (gunicorn's workers)."""
        return child_pids(self.process.pid)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's output."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        stop(self.process)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def gunicorn_env(work_dir: Path, port: int, workers: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark gunicorn: local settings (auth off, SQLite in ``work_dir``), default log level."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
            "CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{work_dir}/gunicorn-{port}.sqlite3",
            "CDS_BIND": f"127.0.0.1:{port}", "CDS_WORKERS": str(workers), **(extra or {})}


def start_gunicorn(app: str, work_dir: Path, *, workers: int, name: str) -> Server:
    """Start ``gunicorn -c gunicorn.conf.py APP`` on a free port and wait until every worker answers /healthz."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("gunicorn")), "-c", str(GUNICORN_CONF), app]
    server = _spawn(name, command, gunicorn_env(work_dir, port, workers), f"http://127.0.0.1:{port}", work_dir)
    _wait_until(server, f"{server.base_url}/healthz", lambda: len(server.worker_pids()) >= workers)
    return server


def start_fhir_server(fixtures: Path, work_dir: Path, *, faults: Sequence[str] = ()) -> Server:
    """Start ``neutropenia-cds fhir-server FIXTURES`` with ``--fault`` specs on a free port; wait for /metadata."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("neutropenia-cds")), "fhir-server", str(fixtures),
               "--port", str(port), "--quiet", *[arg for spec in faults for arg in ("--fault", spec)]]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    server = _spawn("fhir-server", command, env, f"http://127.0.0.1:{port}", work_dir)
    _wait_until(server, f"{server.base_url}/metadata", lambda: True)
    return server


def _spawn(name: str, command: list[str], env: Mapping[str, str], base_url: str, work_dir: Path) -> Server:
    log_path = work_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)
    return Server(name, base_url, process, log_path)


def _wait_until(server: Server, url: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for ``url`` to answer 200 and ``ready()`` to be true; stop the server and raise if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchmarkError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(url, timeout=5).status_code == 200 and ready():
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.1)
    server.stop()
    raise BenchmarkError(f"{server.name} did not answer {url} within {timeout:.0f} s:\n{server.log_tail()}")
