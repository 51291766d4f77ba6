"""HTTP load: POST one body over keep-alive connections for a fixed time; throughput and latency percentiles.

wrk (Debian package ``wrk``) is used when it is installed, with ``wrk_post.lua`` for the body; otherwise a Python
generator with one thread and one persistent ``http.client`` connection per simulated client. The Python
generator needs far more CPU per request than wrk and shares the machine with the server, so its throughput
figures are lower; both servers compared in a run are loaded by the same generator.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.timing import BenchmarkError, percentile

WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
RESULT_MARK = "BENCH_RESULT "


@dataclass(frozen=True)
class LoadResult:
    """What a load run measured: completed requests, their rate and latency, and every kind of failure."""

    loader: str
    seconds: float
    requests: int
    p50_seconds: float
    p99_seconds: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds

    @property
    def failed(self) -> int:
        """Requests that did not end in a 2xx/3xx answer (socket errors, timeouts, other statuses)."""
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        """The figures for results.json (milliseconds)."""
        return {"loader": self.loader, "seconds": round(self.seconds, 2), "requests": self.requests,
                "requests_per_second": round(self.requests_per_second, 1),
                "p50_ms": round(self.p50_seconds * 1000, 2), "p99_ms": round(self.p99_seconds * 1000, 2),
                "errors": self.errors}


def wrk_available() -> bool:
    """True when a ``wrk`` executable is on PATH."""
    return shutil.which("wrk") is not None


def wrk_version() -> str | None:
    """wrk's version line, if wrk is installed."""
    if not wrk_available():
        return None
    output = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    text = (output.stdout or output.stderr).strip()
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer" -> "wrk debian/4.1.0-3+b2"
    return text.splitlines()[0].split(" [")[0] if text else "wrk"


def run_load(loader: str, url: str, body_file: Path, *, connections: int, seconds: float,
             timeout: float) -> LoadResult:
    """Load ``url`` with ``loader`` ("wrk" or "python") for ``seconds`` over ``connections`` connections."""
    if loader == "wrk":
        return run_wrk(url, body_file, connections=connections, seconds=seconds, timeout=timeout)
    if loader == "python":
        return run_python_load(url, body_file.read_bytes(), connections=connections, seconds=seconds,
                               timeout=timeout)
    raise ValueError(f"unknown loader {loader!r}")


def run_wrk(url: str, body_file: Path, *, connections: int, seconds: float, timeout: float) -> LoadResult:
    """One wrk run (one thread: the other core is left to the server) and its summary line."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(round(seconds), 1)}s", f"--timeout={timeout:g}s",
               "-s", str(WRK_SCRIPT), url]
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, "BENCH_BODY_FILE": str(body_file)})
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if completed.returncode != 0 or not lines:
        raise BenchmarkError(f"wrk failed ({completed.returncode}): {completed.stderr.strip() or completed.stdout}")
    summary = json.loads(lines[-1][len(RESULT_MARK):])
    errors = {name: int(summary[name]) for name in ("connect", "read", "write", "timeout", "status")
              if summary[name]}
    return LoadResult("wrk", summary["duration_us"] / 1e6, int(summary["requests"]), summary["p50_us"] / 1e6,
                      summary["p99_us"] / 1e6, errors)


def run_python_load(url: str, body: bytes, *, connections: int, seconds: float, timeout: float) -> LoadResult:
    """A closed-loop load: ``connections`` threads, each POSTing ``body`` back to back on its own connection."""
    parts = urlsplit(url)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(connections + 1)
    stop_at: list[float] = []

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
        mine: list[float] = []
        failures: dict[str, int] = {}
        start.wait()
        while time.perf_counter() < stop_at[0]:
            begin = time.perf_counter()
            try:
                connection.request("POST", parts.path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                kind = None if 200 <= response.status < 400 else "status"
            except TimeoutError:
                kind = "timeout"
            except (OSError, http.client.HTTPException):
                kind = "read"
            if kind is None:
                mine.append(time.perf_counter() - begin)
            else:
                failures[kind] = failures.get(kind, 0) + 1
                connection.close()
        connection.close()
        with lock:
            latencies.extend(mine)
            for kind, count in failures.items():
                errors[kind] = errors.get(kind, 0) + count

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at.append(began + seconds)
    start.wait()
    for thread in threads:
        thread.join(seconds + timeout + 5)
    elapsed = time.perf_counter() - began
    if not latencies:
        raise BenchmarkError(f"the Python load generator completed no request on {url} ({errors})")
    return LoadResult("python", elapsed, len(latencies), percentile(latencies, 50), percentile(latencies, 99),
                      errors)
