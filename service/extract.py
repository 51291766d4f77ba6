"""Raw FHIR R4 resources -> frozen facts the rules read (design.md §4, brief §2 "FHIR handling").

Cheap first: each raw dict is classified by ``resourceType`` and code, and by status and time where that decides
it, before anything is validated. Only the resources that can matter (ANC-related labs, temperatures in the
window, risk-factor conditions, relevant medication orders, the Patient) are validated with the
``fhir.resources.R4B`` models. A relevant resource that fails validation becomes a ``malformed-resource`` data
issue and is not used; nothing here raises on bad data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from service import timing
from service.codes import (
    CONDITION_DISPLAY,
    CONDITION_ROLES,
    LAB_ROLES,
    OBSERVATION_CODES,
    TEMPERATURE,
    Code,
    ConditionRole,
    LabRole,
    MedicationRole,
    canonical,
    medication_display,
    medication_role,
)
from service.model import CodedRef, DataIssue
from service.thresholds import DEFAULT_POLICY, ClinicalPolicy
from service.units import celsius, count_per_ul, percent

#: Observation.status -> whether the result is preliminary; statuses not listed are not used (brief §2).
USED_STATUSES: Mapping[str, bool] = {"final": False, "amended": False, "corrected": False, "preliminary": True}
IGNORED_STATUSES = frozenset({"registered", "cancelled", "entered-in-error", "unknown"})
#: Condition.clinicalStatus codes that count, and verificationStatus codes that exclude (brief §2).
ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
#: MedicationRequest statuses: current orders, and ended orders that count only inside a look-back (DESIGN).
CURRENT_MEDICATION = frozenset({"active", "on-hold"})
ENDED_MEDICATION = frozenset({"completed", "stopped"})
COUNT_ROLES = frozenset({LabRole.ANC, LabRole.SEGS_ABS, LabRole.BANDS_ABS, LabRole.WBC})
_UPPER_BOUND, _LOWER_BOUND = frozenset({"<", "<="}), frozenset({">", ">="})
_MAX_BUNDLE_DEPTH = 4
_MAX_EXPONENT = 30


@dataclass(frozen=True)
class LabResult:
    """One ANC-related result: counts in cells/uL, shares in percent; ``value`` None when uninterpretable."""

    source: str
    role: LabRole
    code: Code
    value: Decimal | None
    comparator: str | None  # "<" (value is an upper bound), ">" (a lower bound) or None
    effective: datetime
    latest: datetime
    status: str
    specimen: str | None = None
    reference_low: Decimal | None = None  # lab's lower limit of normal, cells/uL (ANC codes only)
    problem: str | None = None  # why ``value`` could not be interpreted

    @property
    def preliminary(self) -> bool:
        """Whether the result is preliminary."""
        return USED_STATUSES.get(self.status, False)


@dataclass(frozen=True)
class Temperature:
    """One body temperature reading in degrees Celsius, rounded to 2 decimals."""

    source: str
    celsius: Decimal
    effective: datetime
    latest: datetime
    status: str

    @property
    def preliminary(self) -> bool:
        """Whether the reading is preliminary."""
        return USED_STATUSES.get(self.status, False)

    @property
    def precise(self) -> bool:
        """Whether the reading is timed to an instant (only those can form a sustained run)."""
        return self.effective == self.latest


@dataclass(frozen=True)
class ConditionFact:
    """An active, not refuted condition the rules care about."""

    ref: CodedRef
    roles: frozenset[ConditionRole]


@dataclass(frozen=True)
class MedicationFact:
    """A medication order the rules care about; ``last`` is its latest known date (ended orders only)."""

    ref: CodedRef
    role: MedicationRole
    current: bool
    last: datetime | None


@dataclass(frozen=True)
class Facts:
    """Everything extracted from one request's resources."""

    labs: tuple[LabResult, ...] = ()
    temperatures: tuple[Temperature, ...] = ()
    conditions: tuple[ConditionFact, ...] = ()
    medications: tuple[MedicationFact, ...] = ()
    birth_date: date | None = None
    links: tuple[frozenset[str], ...] = ()  # results reported together (DiagnosticReport.result, hasMember)
    issues: tuple[DataIssue, ...] = ()
    #: Lab Observations older than the ANC currency window, not yet validated: see :func:`older_labs`.
    deferred: tuple[tuple[Mapping[str, Any], timing.Timing], ...] = ()


def extract(
    resources: Iterable[Any], *, now: datetime, policy: ClinicalPolicy = DEFAULT_POLICY
) -> Facts:
    """Reduce raw FHIR resources (dicts, Bundles allowed) to ``Facts`` as seen at ``now``.

    Lab results older than the ANC currency window are only classified and timed, not validated: they matter
    only when no current ANC exists, and :func:`older_labs` reads them then, newest first.
    """
    flat = list(_deduplicated(_flatten(resources, 0)))
    collector = _Collector(now, policy, _medication_codes(flat), defer_before=now - policy.anc_current_window)
    for resource in flat:
        collector.add(resource)
    return collector.facts()


def older_labs(
    facts: Facts, *, now: datetime, policy: ClinicalPolicy = DEFAULT_POLICY
) -> Iterator[Facts]:
    """The deferred lab results of ``facts``, validated and extracted slab by slab, newest slab first.

    A slab holds the results within one ANC currency window of the newest result not yet read, so the caller can
    stop as soon as a slab yields an ANC.
    """
    remaining = sorted(facts.deferred, key=lambda item: (item[1].latest, _source(item[0])), reverse=True)
    while remaining:
        edge = remaining[0][1].latest - policy.anc_current_window
        size = next((n for n, item in enumerate(remaining) if item[1].latest <= edge), len(remaining))
        collector = _Collector(now, policy, {}, defer_before=None)
        for resource, _ in remaining[:size]:
            collector.add(resource)
        remaining = remaining[size:]
        yield collector.facts()


def _flatten(resources: Iterable[Any], depth: int) -> Iterator[Mapping[str, Any]]:
    for item in resources if isinstance(resources, Iterable) else ():
        if not isinstance(item, Mapping):
            continue
        if item.get("resourceType") == "Bundle" and depth < _MAX_BUNDLE_DEPTH:
            entries = item.get("entry")
            inner = [e.get("resource") for e in entries if isinstance(e, Mapping)] if isinstance(entries, list) else []
            yield from _flatten(inner, depth + 1)
        else:
            yield item


def _version(resource: Mapping[str, Any]) -> tuple[int, float | None]:
    meta = resource.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    version = meta.get("versionId")
    number = int(version) if isinstance(version, str) and version.isdigit() and len(version) < 19 else -1
    updated = timing.parse(meta.get("lastUpdated"))
    return number, None if updated is None else updated.effective.timestamp()


def _deduplicated(resources: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Drop older versions of a resource that arrives more than once (same type and id, older meta)."""
    by_key: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for resource in resources:
        rid, rtype = resource.get("id"), resource.get("resourceType")
        if isinstance(rid, str) and isinstance(rtype, str):
            by_key.setdefault((rtype, rid), []).append(resource)
        else:
            yield resource
    for versions in by_key.values():
        if len(versions) == 1:
            yield versions[0]
            continue
        keys = [_version(v) for v in versions]
        newest = max(keys, key=lambda k: (k[0], k[1] is not None, k[1] or 0.0))
        distinguishable = all(k[0] >= 0 or k[1] is not None for k in keys)
        yield from (v for v, k in zip(versions, keys) if not distinguishable or k == newest)


def reference(value: object) -> str | None:
    """A FHIR reference string reduced to "Type/id" (absolute URLs and ``_history`` dropped)."""
    if not isinstance(value, str):
        return None
    parts = value.strip().split("/_history/")[0].strip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 and parts[-2] and parts[-1] else None


def _source(resource: Mapping[str, Any]) -> str:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid if isinstance(rid, str) and rid else '(no id)'}"


def codes_of(concept: object) -> frozenset[Code]:
    """The (system, code) pairs of a raw CodeableConcept."""
    codings = concept.get("coding") if isinstance(concept, Mapping) else None
    if not isinstance(codings, list):
        return frozenset()
    pairs = (canonical(c.get("system"), c.get("code")) for c in codings if isinstance(c, Mapping))
    return frozenset(p for p in pairs if p is not None)


def _status_codes(concept: object) -> frozenset[str]:
    return frozenset(code for _, code in codes_of(concept))


def decimal(value: object) -> Decimal | None:
    """A finite ``Decimal`` from a JSON number (or numeric string); None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        return None
    # Absurd magnitudes are not numbers a lab or thermometer reports, and would overflow Decimal arithmetic.
    return number if number.is_finite() and abs(number.adjusted()) <= _MAX_EXPONENT else None


def _comparator(quantity: Mapping[str, Any]) -> str | None:
    value = quantity.get("comparator")
    if not isinstance(value, str):
        return None
    return "<" if value in _UPPER_BOUND else ">" if value in _LOWER_BOUND else None


def _validation_error(model: type[Any], resource: Mapping[str, Any]) -> str | None:
    try:
        model.model_validate(resource)
    except Exception as error:  # noqa: BLE001 - untrusted input; pydantic raises several kinds
        errors = getattr(error, "errors", None)
        first = errors()[0] if callable(errors) else None
        if isinstance(first, Mapping):
            where = ".".join(str(part) for part in first.get("loc", ())) or "resource"
            return f"{where}: {first.get('msg', 'invalid')}"[:200]
        return f"invalid {model.__name__}"
    return None


def _medication_codes(resources: Iterable[Mapping[str, Any]]) -> Mapping[str, frozenset[Code]]:
    return {
        _source(r): codes_of(r.get("code"))
        for r in resources
        if r.get("resourceType") == "Medication" and isinstance(r.get("id"), str)
    }


class _Collector:
    """Accumulates facts and issues resource by resource."""

    def __init__(
        self,
        now: datetime,
        policy: ClinicalPolicy,
        medications: Mapping[str, frozenset[Code]],
        *,
        defer_before: datetime | None,
    ) -> None:
        self.now, self.policy, self.medication_codes, self.defer_before = now, policy, medications, defer_before
        self.deferred: list[tuple[Mapping[str, Any], timing.Timing]] = []
        self.labs: set[LabResult] = set()
        self.temperatures: set[Temperature] = set()
        self.conditions: set[ConditionFact] = set()
        self.medications: set[MedicationFact] = set()
        self.births: set[tuple[str, date]] = set()
        self.links: set[frozenset[str]] = set()
        self.issues: set[DataIssue] = set()

    def facts(self) -> Facts:
        """The collected facts, each kind in a fixed order."""
        return Facts(
            labs=tuple(sorted(self.labs, key=repr)),
            temperatures=tuple(sorted(self.temperatures, key=repr)),
            conditions=tuple(sorted(self.conditions, key=repr)),
            medications=tuple(sorted(self.medications, key=repr)),
            birth_date=min(self.births)[1] if self.births else None,
            links=tuple(sorted(self.links, key=sorted)),
            issues=tuple(sorted(self.issues, key=repr)),
            deferred=tuple(self.deferred),
        )

    def issue(self, code: str, source: str | None, detail: str | None) -> None:
        """Record a data issue."""
        self.issues.add(DataIssue(code, source, detail))

    def add(self, resource: Mapping[str, Any]) -> None:
        """Classify one raw resource and extract what the rules need from it."""
        kind = resource.get("resourceType")
        handler = {
            "Observation": self._observation,
            "Condition": self._condition,
            "MedicationRequest": self._medication_request,
            "Patient": self._patient,
            "DiagnosticReport": self._report,
        }.get(kind if isinstance(kind, str) else "")
        if handler is not None:
            handler(resource)

    # -- Observations -------------------------------------------------------------------------------------------

    def _observation(self, r: Mapping[str, Any]) -> None:
        source = _source(r)
        status = r.get("status")
        status = status if isinstance(status, str) else repr(status)
        if status not in IGNORED_STATUSES:
            self._link_members(r)
        parts = [(r, codes_of(r.get("code")) & OBSERVATION_CODES)]
        components = r.get("component")
        if isinstance(components, list):
            parts += [(c, codes_of(c.get("code")) & OBSERVATION_CODES) for c in components if isinstance(c, Mapping)]
        parts = [(holder, codes) for holder, codes in parts if codes]
        if not parts:
            return  # not an observation the rules read
        if status in IGNORED_STATUSES:
            return
        if status not in USED_STATUSES:
            self.issue("malformed-resource", source, f"status: unknown value {status!r}")
            return
        when = timing.observation_timing(r)
        if when is None:
            self.issue("missing-effective-time", source, "no usable effective time or issued date")
            return
        if when.effective > self.now + self.policy.future_tolerance:
            self.issue("future-dated", source, "effective time is in the future; ignored")
            return
        temperature_only = all(codes <= TEMPERATURE for _, codes in parts)
        if temperature_only and when.latest < self.now - self.policy.temperature_window:
            return  # outside the temperature window: never read, so never validated
        if not temperature_only and self.defer_before is not None and when.latest < self.defer_before:
            self.deferred.append((r, when))  # an older lab: read only if no current ANC exists
            return
        problem = _validation_error(Observation, r)
        if problem is not None:
            self.issue("malformed-resource", source, problem)
            return
        for holder, codes in parts:
            self._reading(source, status, r, holder, codes, when)

    def _link_members(self, r: Mapping[str, Any]) -> None:
        members = r.get("hasMember")
        if isinstance(members, list):
            refs = frozenset(ref for m in members if isinstance(m, Mapping) and (ref := reference(m.get("reference"))))
            if len(refs) > 1:
                self.links.add(refs)

    def _reading(
        self,
        source: str,
        status: str,
        r: Mapping[str, Any],
        holder: Mapping[str, Any],
        codes: frozenset[Code],
        when: timing.Timing,
    ) -> None:
        roles = {LAB_ROLES[c] for c in codes if c in LAB_ROLES}
        if len(roles) + bool(codes & TEMPERATURE) > 1:
            self.issue("malformed-resource", source, "code: codings with different meanings")
            return
        value, quantity, problem = _value(holder)
        if value is None and problem is None:
            return  # no value (e.g. dataAbsentReason): nothing to read
        if not roles:
            converted, problem = (None, problem) if value is None else celsius(value, quantity)
            if converted is None:
                self.issue("temperature-uninterpretable", source, problem)
            else:
                self.temperatures.add(Temperature(source, converted, when.effective, when.latest, status))
            return
        role = roles.pop()
        code = min(c for c in codes if c in LAB_ROLES)
        converted = None
        if value is not None and value < 0:
            problem = "negative value"
        elif value is not None:
            convert = count_per_ul if role in COUNT_ROLES else None
            converted, problem = (
                convert(value, quantity) if convert else percent(value, quantity, fraction=role is LabRole.FRACTION)
            )
        specimen = r.get("specimen")
        self.labs.add(
            LabResult(
                source=source,
                role=role,
                code=code,
                value=converted,
                comparator=_comparator(quantity),
                effective=when.effective,
                latest=when.latest,
                status=status,
                specimen=reference(specimen.get("reference")) if isinstance(specimen, Mapping) else None,
                reference_low=_reference_low(holder, quantity) if role is LabRole.ANC else None,
                problem=problem,
            )
        )

    def _report(self, r: Mapping[str, Any]) -> None:
        if r.get("status") in ("entered-in-error", "cancelled"):
            return
        results = r.get("result")
        if isinstance(results, list):
            refs = frozenset(ref for m in results if isinstance(m, Mapping) and (ref := reference(m.get("reference"))))
            if len(refs) > 1:
                self.links.add(refs)

    # -- Conditions, medications, the patient -------------------------------------------------------------------

    def _condition(self, r: Mapping[str, Any]) -> None:
        matched = sorted(c for c in codes_of(r.get("code")) if c in CONDITION_ROLES)
        if not matched or _status_codes(r.get("verificationStatus")) & EXCLUDED_VERIFICATION:
            return
        clinical = _status_codes(r.get("clinicalStatus"))
        abated = any(isinstance(key, str) and key.startswith("abatement") for key in r)
        # DESIGN: a condition without clinicalStatus counts unless it has abated (conservative: keeps context).
        if (clinical and not clinical & ACTIVE_CONDITION) or (not clinical and abated):
            return
        source = _source(r)
        problem = _validation_error(Condition, r)
        if problem is not None:
            self.issue("malformed-resource", source, problem)
            return
        system, code = matched[0]
        roles = frozenset().union(*(CONDITION_ROLES[c] for c in matched))
        ref = CodedRef(system, code, CONDITION_DISPLAY.get((system, code)), source)
        self.conditions.add(ConditionFact(ref, roles))

    def _medication_request(self, r: Mapping[str, Any]) -> None:
        status = r.get("status")
        if not isinstance(status, str) or status not in CURRENT_MEDICATION | ENDED_MEDICATION:
            return
        if r.get("doNotPerform") is True:
            return
        matched = [(c, role) for c in sorted(self._medication_of(r)) if (role := medication_role(c)) is not None]
        if not matched:
            return
        last = _latest_order_date(r)
        if status in ENDED_MEDICATION and last is None:
            return  # an ended order without any date cannot be placed in a look-back window
        source = _source(r)
        problem = _validation_error(MedicationRequest, r)
        if problem is not None:
            self.issue("malformed-resource", source, problem)
            return
        for role in {role for _, role in matched}:
            system, code = next(c for c, rl in matched if rl is role)
            ref = CodedRef(system, code, medication_display((system, code)), source)
            self.medications.add(MedicationFact(ref, role, status in CURRENT_MEDICATION, last))

    def _medication_of(self, r: Mapping[str, Any]) -> frozenset[Code]:
        if "medicationCodeableConcept" in r:
            return codes_of(r["medicationCodeableConcept"])
        medication = r.get("medicationReference")
        target = medication.get("reference") if isinstance(medication, Mapping) else None
        if isinstance(target, str) and target.startswith("#"):
            contained = r.get("contained")
            for item in contained if isinstance(contained, list) else ():
                if isinstance(item, Mapping) and item.get("id") == target[1:]:
                    return codes_of(item.get("code"))
            return frozenset()
        ref = reference(target)
        return self.medication_codes.get(ref, frozenset()) if ref else frozenset()

    def _patient(self, r: Mapping[str, Any]) -> None:
        born = timing.birth_date(r.get("birthDate"))
        if born is None:
            return
        problem = _validation_error(Patient, r)
        if problem is not None:
            self.issue("malformed-resource", _source(r), problem)
            return
        self.births.add((_source(r), born))


def _value(holder: Mapping[str, Any]) -> tuple[Decimal | None, Mapping[str, Any], str | None]:
    """The numeric value and its Quantity; a problem when the value is not a Quantity with a number."""
    quantity = holder.get("valueQuantity")
    if isinstance(quantity, Mapping):
        value = decimal(quantity.get("value"))
        return value, quantity, None if value is not None or "value" not in quantity else "value is not a number"
    if any(isinstance(key, str) and key.startswith("value") for key in holder):
        return None, {}, "value is not a Quantity"
    return None, {}, None


def _reference_low(holder: Mapping[str, Any], quantity: Mapping[str, Any]) -> Decimal | None:
    ranges = holder.get("referenceRange")
    for item in ranges if isinstance(ranges, list) else ():
        low = item.get("low") if isinstance(item, Mapping) else None
        value = decimal(low.get("value")) if isinstance(low, Mapping) else None
        if value is not None and isinstance(low, Mapping):
            unit_source = low if ("code" in low or "unit" in low) else quantity
            converted, _ = count_per_ul(value, unit_source)
            if converted is not None:
                return converted
    return None


def _latest_order_date(r: Mapping[str, Any]) -> datetime | None:
    """The latest date an order mentions: authoredOn, validity period end, dosage bounds or events."""
    candidates = [timing.parse(r.get("authoredOn"))]
    dispense = r.get("dispenseRequest")
    if isinstance(dispense, Mapping):
        candidates.append(timing.period(dispense.get("validityPeriod")))
    dosages = r.get("dosageInstruction")
    for dosage in dosages if isinstance(dosages, list) else ():
        when = dosage.get("timing") if isinstance(dosage, Mapping) else None
        if not isinstance(when, Mapping):
            continue
        events = when.get("event")
        candidates += [timing.parse(e) for e in events] if isinstance(events, list) else []
        repeat = when.get("repeat")
        if isinstance(repeat, Mapping):
            candidates.append(timing.period(repeat.get("boundsPeriod")))
    found = [c.latest for c in candidates if c is not None]
    return max(found) if found else None
