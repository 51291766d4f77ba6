"""The benchmark (``make bench``) works: its payloads are requests the service answers, and a quick run reports.

No timing is asserted here; ``make bench`` is where the figures come from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from bench.payloads import PATIENT_ID, TIERS, Tier, build_request, request_body
from bench.report import TARGETS, format_report, judge_targets

ROOT = Path(__file__).resolve().parents[1]
INVOKE = "/cds-services/neutropenia-patient-view"
EXTENSION = "org.neutropenia-cds.assessment"
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)


def _resource_types(request: dict[str, Any]) -> Counter[str]:
    types: Counter[str] = Counter()
    for value in request["prefetch"].values():
        entries = value.get("entry", []) if value["resourceType"] == "Bundle" else [{"resource": value}]
        types.update(entry["resource"]["resourceType"] for entry in entries)
    return types


@pytest.mark.parametrize("tier", [TIERS["typical"], TIERS["heavy"].resized(400)], ids=["typical", "heavy-400"])
def test_bench_payload_is_answered_with_febrile_neutropenia(client: FlaskClient, tier: Tier) -> None:
    request = build_request(tier)
    response = client.post(INVOKE, data=request_body(request), content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["cards"][0]["indicator"] == "critical"
    assert "febrile-neutropenia" in body["extension"][EXTENSION]["findings"]


def test_bench_payload_has_the_tier_counts_and_keys() -> None:
    tier = TIERS["typical"]
    request = build_request(tier, now=NOW)
    assert set(request["prefetch"]) == {"patient", "labs", "vitals", "conditions", "medications"}
    assert _resource_types(request) == Counter({"Patient": 1, "Observation": 132, "Condition": 15,
                                                "MedicationRequest": 10})
    assert len(request["prefetch"]["labs"]["entry"]) == tier.lab_results == 60
    assert len(request["prefetch"]["vitals"]["entry"]) == tier.temperatures == 72
    assert request["context"]["patientId"] == PATIENT_ID
    assert TIERS["heavy"].observations == 5000 and TIERS["extreme"].observations == 20000


def test_bench_payload_is_deterministic_for_a_seed() -> None:
    tier = TIERS["typical"]
    assert request_body(build_request(tier, now=NOW)) == request_body(build_request(tier, now=NOW))
    assert request_body(build_request(tier, now=NOW)) != request_body(build_request(tier, now=NOW, seed=1))


def test_bench_report_marks_unmeasured_targets() -> None:
    results = {"machine": {"date": "2025-03-10T12:00:00Z", "cpu_model": "cpu", "usable_cpus": 2, "cpu_count": 2,
                           "memory_total_mb": 1000, "python": "3.11", "platform": "linux", "commit": "abc",
                           "loader": "python", "loader_version": None},
               "no_prefetch": {"delay_ms": 300, "runs": 1, "total_median_ms": 330.0, "slowest_fetch_median_ms": 300.0,
                               "fetch_median_ms": {"labs": 300.0}, "ratio_to_slowest_fetch": 1.1}}
    verdicts = {t["target"]: t["met"] for t in judge_targets(results)}
    assert len(verdicts) == len(TARGETS)
    assert verdicts["no-prefetch: total <= 1.3x slowest single fetch"] is True
    assert sum(met is None for met in verdicts.values()) == len(TARGETS) - 1
    assert "not measured" in format_report(results)


@pytest.mark.gunicorn
def test_bench_quick_run_writes_results_and_prints_the_table(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    completed = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--loader", "python",
                                "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(output.read_text())
    assert {"machine", "settings", "in_process", "http", "memory", "no_prefetch", "targets"} <= set(results)
    assert [row["tier"] for row in results["in_process"]["tiers"]] == ["typical", "heavy", "extreme"]
    assert [row["tier"] for row in results["in_process"]["tiers_seen_before"]] == ["typical", "heavy", "extreme"]
    assert results["http"][0]["service"]["errors"] == {} and results["http"][0]["service"]["requests"] > 0
    assert len(results["targets"]) == len(TARGETS)
    for heading in ("In-process service time", "HTTP under gunicorn", "Peak resident memory", "No-prefetch path",
                    "Targets"):
        assert heading in completed.stdout
