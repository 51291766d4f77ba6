"""In-process service time: the whole request path through the Flask app, beside ``json.loads`` of the same body.

The app is the one gunicorn serves (`service.app.create_app`) with local settings: authentication disabled and
the feedback store in SQLite under the run's work directory. Its log stays at the default level (INFO, one JSON
line per request) but goes to a file instead of the terminal, so logging costs what it costs in production.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from bench.timing import BenchmarkError, RunPlan, Samples, repeat
from service import validation
from service.app import create_app
from service.definition import SERVICE_ID

INVOKE_PATH = f"/cds-services/{SERVICE_ID}"


@contextlib.contextmanager
def local_app(work_dir: Path, name: str = "inprocess", **overrides: Any) -> Iterator[Flask]:
    """The service app with local settings (auth off, SQLite in ``work_dir``), its log in ``work_dir/<name>.log``."""
    log_path = work_dir / f"{name}.log"
    config = {"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{work_dir}/{name}.sqlite3", **overrides}
    with log_path.open("a", encoding="utf-8") as log:
        with contextlib.redirect_stderr(log):
            # The app's log handler keeps the stream it finds at creation: this file, open while the app lives.
            app = create_app(config, environ={})
        try:
            yield app
        finally:
            app.extensions["neutropenia_cds"]["store"].dispose()
            root = logging.getLogger()
            for handler in list(root.handlers):
                if getattr(handler, "stream", None) is log:
                    root.removeHandler(handler)


def invoke(client: FlaskClient, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` to the service; its status and raw response body."""
    response = client.post(INVOKE_PATH, data=body, content_type="application/json")
    return response.status_code, response.get_data()


def check_answer(status: int, raw: bytes, *, what: str, want_cards: bool) -> dict[str, Any]:
    """The parsed response; BenchmarkError unless it is a 200 (with cards when ``want_cards``)."""
    if status != 200:
        raise BenchmarkError(f"{what}: HTTP {status}: {raw[:500].decode('utf-8', 'replace')}")
    answer: dict[str, Any] = json.loads(raw)
    if want_cards and not answer.get("cards"):
        raise BenchmarkError(f"{what}: a 200 without cards; the payload should give febrile neutropenia")
    return answer


@dataclass(frozen=True)
class InProcessResult:
    """Service time and ``json.loads`` time of one tier's request body."""

    tier: str
    resources: int
    body_bytes: int
    service: Samples
    json_loads: Samples

    @property
    def ratio(self) -> float:
        """Median service time over median ``json.loads`` time."""
        return self.service.median / self.json_loads.median

    @property
    def per_resource_seconds(self) -> float:
        """Median service time divided by the number of resources in the request."""
        return self.service.median / self.resources

    def to_json(self) -> dict[str, Any]:
        """The figures for results.json (milliseconds)."""
        return {"tier": self.tier, "resources": self.resources, "body_bytes": self.body_bytes,
                "runs": self.service.count, "service_median_ms": _ms(self.service.median),
                "service_p95_ms": _ms(self.service.p95), "json_loads_runs": self.json_loads.count,
                "json_loads_median_ms": _ms(self.json_loads.median), "ratio_to_json_loads": round(self.ratio, 2),
                "service_us_per_resource": round(self.per_resource_seconds * 1e6, 2)}


def measure_tier(app: Flask, tier: str, resources: int, body: bytes, plan: RunPlan, *,
                 seen_before: bool = False) -> InProcessResult:
    """Time the service on ``body`` as ``plan`` says, after one warm-up call, checking every answer.

    By default every run starts with the validation memo (service/validation.py) emptied, so every resource
    is validated as if the service saw it for the first time: the worst case, which the targets are judged
    on. ``seen_before`` keeps the memo, as when the same chart is opened again.
    """
    client = app.test_client()
    check_answer(*invoke(client, body), what=f"{tier} (warm-up)", want_cards=True)

    def call() -> None:
        if not seen_before:
            validation.MEMO.clear()
        status, raw = invoke(client, body)
        if status != 200:
            check_answer(status, raw, what=tier, want_cards=False)

    service = repeat(call, plan)
    check_answer(*invoke(client, body), what=f"{tier} (after the runs)", want_cards=True)
    loads = repeat(lambda: json.loads(body), RunPlan(min(plan.min_runs, 10), plan.max_runs, plan.budget_seconds / 4))
    return InProcessResult(tier, resources, len(body), service, loads)


def growth(smaller: InProcessResult, larger: InProcessResult) -> float:
    """How per-resource time changes from ``smaller`` to ``larger``: 1.0 is linear, above 1 is worse."""
    return larger.per_resource_seconds / smaller.per_resource_seconds


def summarize(results: Mapping[str, InProcessResult],
              seen_before: Mapping[str, InProcessResult] | None = None) -> dict[str, Any]:
    """The in-process figures of every tier (first sight, and seen before when measured), and the heavy-to-extreme
    growth when both were measured."""
    summary: dict[str, Any] = {"tiers": [result.to_json() for result in results.values()]}
    if seen_before:
        summary["tiers_seen_before"] = [result.to_json() for result in seen_before.values()]
    if "heavy" in results and "extreme" in results:
        summary["growth_heavy_to_extreme"] = round(growth(results["heavy"], results["extreme"]), 3)
    return summary


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
