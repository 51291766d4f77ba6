"""The neutropenia engine's entry points: ``assess`` (FHIR resources -> Assessment) and its JSON extension.

The result types are defined in ``service.model`` and re-exported here; this module is the fixed interface
described in ``notes/assessment-interface.md`` and design.md §3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from service.model import Anc as Anc
from service.model import AncPoint as AncPoint
from service.model import Assessment as Assessment
from service.model import CodedRef as CodedRef
from service.model import DataIssue as DataIssue
from service.model import Fever as Fever
from service.model import Finding as Finding
from service.thresholds import DEFAULT_POLICY as DEFAULT_POLICY
from service.thresholds import ClinicalPolicy as ClinicalPolicy

#: The key of the response extension (design.md §3).
EXTENSION_KEY = "org.neutropenia-cds.assessment"


def assess(
    resources: Iterable[Mapping[str, Any]],
    *,
    now: datetime,
    policy: ClinicalPolicy = DEFAULT_POLICY,
    unavailable: Mapping[str, str] = {},  # noqa: B006 - read only
) -> Assessment:
    """Evaluate a patient's FHIR ``resources`` at ``now`` (tz-aware) under ``policy``; never raises on bad data."""
    now = _utc(now)
    issues = tuple(
        DataIssue("data-unavailable", None, f"{key}: {reason}") for key, reason in sorted(unavailable.items())
    )
    return Assessment(evaluated_at=now, data_issues=issues)


def assessment_extension(assessment: Assessment) -> dict[str, Any]:
    """The value of the ``org.neutropenia-cds.assessment`` response extension (design.md §3); empties omitted."""
    value: dict[str, Any] = {"evaluatedAt": rfc3339(assessment.evaluated_at)}
    if assessment.findings:
        value["findings"] = [finding.value for finding in assessment.findings]
    if assessment.anc is not None:
        anc = assessment.anc
        value["anc"] = _omit_empty(
            {
                "cellsPerMicroliter": _number(anc.cells_per_ul),
                "ctcaeGrade": anc.ctcae_grade,
                "method": anc.method,
                "effective": rfc3339(anc.effective),
                "status": anc.status,
                "stale": anc.stale,
                "sources": list(anc.sources),
            }
        )
    if assessment.fever is not None:
        fever = assessment.fever
        value["fever"] = _omit_empty(
            {
                "maxCelsius": _number(fever.max_celsius),
                "criterion": fever.criterion,
                "effective": rfc3339(fever.effective),
                "sources": list(fever.sources),
            }
        )
    refs = [*assessment.risk_factors, *assessment.medications]
    if refs:
        value["riskFactors"] = [
            _omit_empty({"system": r.system, "code": r.code, "display": r.display, "source": r.source}) for r in refs
        ]
    if assessment.data_issues:
        value["dataIssues"] = [
            _omit_empty({"code": i.code, "source": i.source, "detail": i.detail}) for i in assessment.data_issues
        ]
    return value


def rfc3339(moment: datetime) -> str:
    """``moment`` as an RFC 3339 UTC timestamp with a ``Z`` suffix, to the second."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return moment.astimezone(timezone.utc)


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _omit_empty(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None and v != [] and v != ""}
