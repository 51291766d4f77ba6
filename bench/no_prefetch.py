"""The no-prefetch path: the service fetches all five keys itself from a slow FHIR server, in parallel.

The fixture FHIR server (``neutropenia-cds fhir-server fixtures/``) runs with a delay injected on every request.
The request is the febrile-neutropenia fixture (moved to now) without ``prefetch``, with ``fhirServer`` pointing
at that server. Its total time is compared with the slowest single fetch, each prefetch query timed directly
against the same server: about 1.0 when the fetches run in parallel, about 5 (the number of keys) if serial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.inprocess import check_answer, invoke, local_app
from bench.servers import ROOT, start_fhir_server
from bench.timing import BenchmarkError, RunPlan, repeat
from cds_hooks.registry import fill_template
from cds_hooks.testing.fixtures import to_now
from service.definition import PREFETCH

FIXTURES = ROOT / "fixtures"
FIXTURE = FIXTURES / "patient-view.febrile-neutropenia.request.json"


@dataclass(frozen=True)
class NoPrefetchResult:
    """Median total time of the no-prefetch call and median time of each direct fetch, in seconds."""

    delay_seconds: float
    runs: int
    total_seconds: float
    fetch_seconds: dict[str, float]

    @property
    def slowest_fetch_seconds(self) -> float:
        """The slowest key's median direct fetch time."""
        return max(self.fetch_seconds.values())

    @property
    def ratio(self) -> float:
        """Total time over the slowest single fetch."""
        return self.total_seconds / self.slowest_fetch_seconds

    def to_json(self) -> dict[str, Any]:
        """The figures for results.json (milliseconds)."""
        return {"delay_ms": round(self.delay_seconds * 1000), "runs": self.runs,
                "total_median_ms": round(self.total_seconds * 1000, 1),
                "slowest_fetch_median_ms": round(self.slowest_fetch_seconds * 1000, 1),
                "fetch_median_ms": {key: round(value * 1000, 1) for key, value in self.fetch_seconds.items()},
                "ratio_to_slowest_fetch": round(self.ratio, 3)}


def no_prefetch_request(fhir_server: str) -> dict[str, Any]:
    """The febrile-neutropenia fixture request, moved to now, with no prefetch and ``fhirServer`` set."""
    request: dict[str, Any] = to_now(json.loads(FIXTURE.read_text(encoding="utf-8")))
    request.pop("prefetch", None)
    request["fhirServer"] = fhir_server
    return request


def measure_no_prefetch(work_dir: Path, *, delay_seconds: float, runs: int) -> NoPrefetchResult:
    """Time the no-prefetch call and each key's direct fetch against a fixture server delaying every answer."""
    with start_fhir_server(FIXTURES, work_dir, faults=[f"*:delay={delay_seconds:g}"]) as fhir:
        request = no_prefetch_request(fhir.base_url)
        body = json.dumps(request).encode("utf-8")
        plan = RunPlan(runs, runs, 0.0)
        with local_app(work_dir, "no-prefetch", FHIR_ALLOWED_BASES=fhir.base_url, FHIR_ALLOW_ANONYMOUS=True) as app:
            client = app.test_client()

            def call() -> None:
                check_answer(*invoke(client, body), what="no-prefetch", want_cards=True)

            call()  # warm-up: the fetcher's connection pool and the app's first request
            total = repeat(call, plan)
        fetches = {key: _direct_fetch_seconds(fhir.base_url, template, request["context"], plan)
                   for key, template in PREFETCH.items()}
    return NoPrefetchResult(delay_seconds, total.count, total.median, fetches)


def _direct_fetch_seconds(base_url: str, template: str, context: dict[str, Any], plan: RunPlan) -> float:
    """Median time of one prefetch query sent straight to the FHIR server (warm keep-alive connection)."""
    relative = fill_template(template, context)
    if relative is None:
        raise BenchmarkError(f"prefetch template {template!r} cannot be filled from {context}")
    url = f"{base_url}/{relative}"
    with requests.Session() as session:

        def fetch() -> None:
            response = session.get(url, headers={"Accept": "application/fhir+json"}, timeout=30)
            if response.status_code != 200:
                raise BenchmarkError(f"direct fetch {url}: HTTP {response.status_code}")
            response.json()

        fetch()
        return repeat(fetch, plan).median
