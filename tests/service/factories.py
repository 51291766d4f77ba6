"""Small factories for FHIR R4 test resources (plain dicts, as they arrive in a CDS Hooks prefetch).

Every factory returns a fresh ``dict`` that validates against ``fhir.resources.R4B``; keyword arguments override or
add fields. Times are RFC 3339 strings; :func:`ago` builds them relative to :data:`NOW`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"

#: The evaluation time used throughout the tests.
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)

# Common codes, for readable tests.
ANC_AUTOMATED = "751-8"
ANC_MANUAL = "753-4"
WBC = "6690-2"
NEUTROPHILS_PCT = "770-8"
SEGS_PCT = "769-0"
BANDS_PCT = "764-1"
SEGS_ABS = "30451-9"
BANDS_ABS = "26507-4"
NEUTROPHIL_FRACTION = "71676-1"
BODY_TEMPERATURE = "8310-5"
ORAL_TEMPERATURE = "8331-1"
VITAL_SIGNS_PANEL = "85353-1"

#: A value as tests like to write it: 0.4, 400, "0.4" or Decimal("0.4") (sent as a JSON number).
Number = float | int | str | Decimal

_ids = itertools.count(1)


def _next_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def rfc3339(moment: datetime) -> str:
    """``moment`` as a FHIR dateTime string in UTC."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(*, days: float = 0, hours: float = 0, minutes: float = 0, now: datetime = NOW) -> str:
    """The FHIR dateTime that lies the given time before ``now`` (negative values: after it)."""
    return rfc3339(now - timedelta(days=days, hours=hours, minutes=minutes))


def coding(code: str, system: str = LOINC, display: str | None = None) -> dict[str, Any]:
    """A Coding."""
    result: dict[str, Any] = {"system": system, "code": code}
    if display is not None:
        result["display"] = display
    return result


def concept(code: str, system: str = LOINC, display: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with one coding."""
    return {"coding": [coding(code, system, display)]}


def quantity(
    value: Number,
    unit: str | None,
    *,
    ucum: bool = True,
    comparator: str | None = None,
) -> dict[str, Any]:
    """A Quantity; ``ucum=False`` puts the unit in ``unit`` only (printed form, no UCUM code)."""
    result: dict[str, Any] = {"value": float(value) if isinstance(value, (str, Decimal)) else value}
    if unit is not None:
        result["unit"] = unit
        if ucum:
            result.update(system=UCUM, code=unit)
    if comparator is not None:
        result["comparator"] = comparator
    return result


def observation(
    code: str | None,
    value: Number | None = None,
    unit: str | None = None,
    effective: str | None = None,
    *,
    status: str = "final",
    id: str | None = None,
    system: str = LOINC,
    ucum: bool = True,
    comparator: str | None = None,
    specimen: str | None = None,
    reference_low: float | None = None,
    components: Iterable[Mapping[str, Any]] = (),
    effective_key: str = "effectiveDateTime",
    **extra: Any,
) -> dict[str, Any]:
    """An Observation with a valueQuantity (omitted when ``value`` is None); ``effective`` defaults to NOW."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": id or _next_id("obs"),
        "status": status,
        "code": concept(code, system) if code is not None else {"text": "panel"},
        "subject": {"reference": "Patient/p1"},
    }
    when = effective if effective is not None else rfc3339(NOW)
    if effective_key == "effectivePeriod":
        resource["effectivePeriod"] = {"start": when, "end": when}
    elif effective_key:
        resource[effective_key] = when
    if value is not None:
        resource["valueQuantity"] = quantity(value, unit, ucum=ucum, comparator=comparator)
    if specimen is not None:
        resource["specimen"] = {"reference": specimen}
    if reference_low is not None:
        resource["referenceRange"] = [{"low": quantity(reference_low, unit, ucum=ucum)}]
    if components:
        resource["component"] = list(components)
    resource.update(extra)
    return resource


def component(
    code: str, value: Number, unit: str, *, system: str = LOINC, comparator: str | None = None
) -> dict[str, Any]:
    """An Observation.component with a valueQuantity."""
    return {"code": concept(code, system), "valueQuantity": quantity(value, unit, comparator=comparator)}


def anc(value: Number | None, unit: str | None = "/uL", effective: str | None = None, **kw: Any) -> dict[str, Any]:
    """A measured ANC Observation (LOINC 751-8 unless ``code`` is given)."""
    code = kw.pop("code", ANC_AUTOMATED)
    return observation(code, value, unit, effective, **kw)


def wbc(value: Number | None, unit: str | None = "10*3/uL", effective: str | None = None, **kw: Any) -> dict[str, Any]:
    """A leukocyte count Observation (LOINC 6690-2)."""
    return observation(kw.pop("code", WBC), value, unit, effective, **kw)


def percent(code: str, value: Number | None, effective: str | None = None, **kw: Any) -> dict[str, Any]:
    """A "/100 leukocytes" Observation in %."""
    return observation(code, value, kw.pop("unit", "%"), effective, **kw)


def temperature(
    value: Number | None, unit: str | None = "Cel", effective: str | None = None, **kw: Any
) -> dict[str, Any]:
    """A body temperature Observation (LOINC 8310-5 unless ``code`` is given)."""
    return observation(kw.pop("code", BODY_TEMPERATURE), value, unit, effective, **kw)


def vital_signs_panel(
    components: Iterable[Mapping[str, Any]], effective: str | None = None, **kw: Any
) -> dict[str, Any]:
    """A vital-signs panel Observation (85353-1) carrying its values as components."""
    return observation(VITAL_SIGNS_PANEL, None, None, effective, components=components, **kw)


def condition(
    code: str,
    system: str = SNOMED,
    *,
    clinical: str | None = "active",
    verification: str | None = "confirmed",
    id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Condition with the given clinical and verification status (None leaves the element out)."""
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": id or _next_id("cond"),
        "code": concept(code, system),
        "subject": {"reference": "Patient/p1"},
    }
    if clinical is not None:
        resource["clinicalStatus"] = concept(clinical, "http://terminology.hl7.org/CodeSystem/condition-clinical")
    if verification is not None:
        resource["verificationStatus"] = concept(
            verification, "http://terminology.hl7.org/CodeSystem/condition-ver-status"
        )
    resource.update(extra)
    return resource


def medication_request(
    code: str,
    system: str = RXNORM,
    *,
    status: str = "active",
    authored: str | None = None,
    id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A MedicationRequest coded with ``medicationCodeableConcept``; ``authored`` defaults to NOW."""
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": id or _next_id("med"),
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": concept(code, system),
        "subject": {"reference": "Patient/p1"},
        "authoredOn": authored if authored is not None else rfc3339(NOW),
    }
    resource.update(extra)
    return resource


def patient(birth_date: str | None = "1970-01-01", *, id: str = "p1", **extra: Any) -> dict[str, Any]:
    """A Patient with a birth date."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": id}
    if birth_date is not None:
        resource["birthDate"] = birth_date
    resource.update(extra)
    return resource


def diagnostic_report(
    results: Iterable[Mapping[str, Any]], *, id: str | None = None, status: str = "final"
) -> dict[str, Any]:
    """A DiagnosticReport whose ``result`` references the given Observations."""
    return {
        "resourceType": "DiagnosticReport",
        "id": id or _next_id("report"),
        "status": status,
        "code": concept("57021-8"),
        "result": [{"reference": f"Observation/{r['id']}"} for r in results],
    }


def bundle(resources: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A searchset Bundle of ``resources``."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": dict(r)} for r in resources],
    }
