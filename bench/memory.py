"""Peak resident memory of one gunicorn worker serving a tier: VmHWM from /proc after concurrent requests.

Each tier gets its own single-worker gunicorn (same ``gunicorn.conf.py``), so the peak belongs to that tier
alone. The worker first answers one request, then as many at once as it has threads, which is the most a
worker holds in memory at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.inprocess import INVOKE_PATH, check_answer
from bench.servers import SERVICE_APP, start_gunicorn
from bench.timing import BenchmarkError

MB = 1_000_000


@dataclass(frozen=True)
class MemoryResult:
    """A worker's resident memory when idle (after start) and at its peak (after the requests)."""

    tier: str
    concurrent_requests: int
    idle_bytes: int
    peak_bytes: int

    def to_json(self) -> dict[str, Any]:
        """The figures for results.json (MB = 10^6 bytes)."""
        return {"tier": self.tier, "concurrent_requests": self.concurrent_requests,
                "idle_rss_mb": round(self.idle_bytes / MB, 1), "peak_rss_mb": round(self.peak_bytes / MB, 1)}


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/<pid>/status (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            number, unit = value.split()
            if unit != "kB":
                raise BenchmarkError(f"/proc/{pid}/status {field}: unexpected unit {unit!r}")
            return int(number) * 1024
    raise BenchmarkError(f"/proc/{pid}/status has no {field}")


def measure_memory(tier: str, body: bytes, work_dir: Path, *, concurrency: int) -> MemoryResult:
    """Start a one-worker gunicorn, send one request then ``concurrency`` at once, and read the worker's VmHWM."""
    with start_gunicorn(SERVICE_APP, work_dir, workers=1, name=f"memory-{tier}") as server:
        (worker,) = server.worker_pids()
        idle = proc_status_bytes(worker, "VmRSS")
        url = server.base_url + INVOKE_PATH

        def post(_: int) -> None:
            response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=120)
            check_answer(response.status_code, response.content, what=f"memory {tier}", want_cards=True)

        post(0)
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(post, range(concurrency)))
        if server.worker_pids() != [worker]:
            raise BenchmarkError(f"memory {tier}: the worker was replaced during the run\n{server.log_tail()}")
        return MemoryResult(tier, concurrency, idle, proc_status_bytes(worker, "VmHWM"))
