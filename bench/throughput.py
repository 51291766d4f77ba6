"""HTTP throughput under gunicorn on loopback: the service beside the do-nothing app, same settings, same body."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.inprocess import INVOKE_PATH, check_answer
from bench.load import LoadResult, run_load
from bench.servers import NULL_APP, SERVICE_APP, Server, start_gunicorn
from bench.timing import BenchmarkError


@dataclass(frozen=True)
class LoadPlan:
    """How to load each server: generator, connections, warm-up and measured seconds, per-request timeout."""

    loader: str
    workers: int
    connections: int
    warmup_seconds: float
    seconds: float
    timeout_seconds: float = 60.0


@dataclass(frozen=True)
class ThroughputResult:
    """One tier's load run against the service and against the do-nothing app."""

    tier: str
    service: LoadResult
    null: LoadResult

    @property
    def ratio(self) -> float:
        """The service's throughput as a fraction of the do-nothing app's."""
        return self.service.requests_per_second / self.null.requests_per_second

    def to_json(self) -> dict[str, Any]:
        """The figures for results.json."""
        return {"tier": self.tier, "service": self.service.to_json(), "do_nothing": self.null.to_json(),
                "throughput_ratio": round(self.ratio, 3)}


def measure_throughput(tier: str, body_file: Path, work_dir: Path, plan: LoadPlan) -> ThroughputResult:
    """Load the service, then the do-nothing app, each under its own gunicorn with ``plan``."""
    service = _load_app(SERVICE_APP, f"service-{tier}", body_file, work_dir, plan, want_cards=True)
    null = _load_app(NULL_APP, f"do-nothing-{tier}", body_file, work_dir, plan, want_cards=False)
    return ThroughputResult(tier, service, null)


def _load_app(app: str, name: str, body_file: Path, work_dir: Path, plan: LoadPlan, *,
              want_cards: bool) -> LoadResult:
    with start_gunicorn(app, work_dir, workers=plan.workers, name=name) as server:
        url = server.base_url + INVOKE_PATH
        _check_one(server, url, body_file.read_bytes(), name, want_cards=want_cards)
        if plan.warmup_seconds > 0:
            _checked(run_load(plan.loader, url, body_file, connections=plan.connections,
                              seconds=plan.warmup_seconds, timeout=plan.timeout_seconds), server, f"{name} warm-up")
        result = _checked(run_load(plan.loader, url, body_file, connections=plan.connections, seconds=plan.seconds,
                                   timeout=plan.timeout_seconds), server, name)
        _check_one(server, url, body_file.read_bytes(), f"{name} (after the load)", want_cards=want_cards)
        return result


def _check_one(server: Server, url: str, body: bytes, what: str, *, want_cards: bool) -> None:
    try:
        response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    except requests.RequestException as error:
        raise BenchmarkError(f"{what}: {error}\n{server.log_tail()}") from error
    check_answer(response.status_code, response.content, what=what, want_cards=want_cards)


def _checked(result: LoadResult, server: Server, what: str) -> LoadResult:
    if result.failed:
        raise BenchmarkError(f"{what}: {result.failed} request(s) failed under load {result.errors}\n"
                             f"{server.log_tail()}")
    return result
