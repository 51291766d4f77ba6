"""Conditions, medication orders and the Patient: raw FHIR -> the facts the rules read (brief §2, §3.2-3.4).

Each reader classifies by code and status before validating, and returns its facts and at most one data issue;
nothing here raises on bad data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.patient import Patient

from service import timing
from service.codes import CONDITION_DISPLAY, CONDITION_ROLES, Code, ConditionRole
from service.drugs import MedicationRole, medication_display, medication_role
from service.fhir import codes_of, reference, source_of, status_codes
from service.model import CodedRef, DataIssue
from service.thresholds import BIRTH_DATE_TOLERANCE
from service.validation import screen

#: Condition.clinicalStatus codes that count, and verificationStatus codes that exclude (brief §2).
ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
#: Every Condition.clinicalStatus code (R4, a required binding): the ones not active mean the condition is over.
CLINICAL_STATUSES = ACTIVE_CONDITION | {"inactive", "remission", "resolved"}
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
#: MedicationRequest statuses: current orders, and ended orders that count only inside a look-back (DESIGN:
#: a completed or stopped G-CSF/chemotherapy order still marks recent chemotherapy).
CURRENT_MEDICATION = frozenset({"active", "on-hold"})
ENDED_MEDICATION = frozenset({"completed", "stopped"})
#: The other MedicationRequest statuses (R4, a required binding): such an order does not count.
IGNORED_MEDICATION = frozenset({"cancelled", "entered-in-error", "draft", "unknown"})

#: The elements the rules read, by resource type (``service.validation.screen``): an invalid one makes the record
#: unusable, invalid elements elsewhere (display texts, narrative, extensions, meta: ordering copies of one resource
#: reads only valid values, ``service.fhir.deduplicated``) do not.
_IDENTITY = frozenset({"resourceType", "id", "implicitRules", "modifierExtension"})
_ALWAYS_READ = _IDENTITY | {"subject.reference"}
#: A Condition's abatement, read only when it has no clinicalStatus (the status decides otherwise).
CONDITION_ABATEMENT = frozenset({"abatementDateTime", "abatementAge", "abatementPeriod", "abatementRange",
                                 "abatementString"})
CONDITION_READS = _ALWAYS_READ | CONDITION_ABATEMENT | {
    "code.coding.system", "code.coding.code", "clinicalStatus.coding.system", "clinicalStatus.coding.code",
    "verificationStatus.coding.system", "verificationStatus.coding.code",
}
MEDICATION_REQUEST_READS = _ALWAYS_READ | {
    "status", "doNotPerform", "medicationCodeableConcept.coding.system", "medicationCodeableConcept.coding.code",
    "medicationReference.reference", "contained", "authoredOn", "dispenseRequest.validityPeriod",
    "dosageInstruction.timing.event", "dosageInstruction.timing.repeat.boundsPeriod",
}
PATIENT_READS = _IDENTITY | {"birthDate"}


@dataclass(frozen=True)
class ConditionFact:
    """An active, not refuted condition the rules care about."""

    ref: CodedRef
    roles: frozenset[ConditionRole]


@dataclass(frozen=True)
class MedicationFact:
    """A medication order the rules care about; ``last`` is the latest date the order mentions."""

    ref: CodedRef
    role: MedicationRole
    current: bool
    last: datetime | None


def _malformed(resource: Mapping[str, Any], problem: str) -> DataIssue:
    return DataIssue("malformed-resource", source_of(resource), problem)


def condition_fact(r: Mapping[str, Any]) -> tuple[ConditionFact | None, DataIssue | None]:
    """The fact of a Condition with a known code that is active (or has no status and has not abated)."""
    matched = sorted(c for c in codes_of(r.get("code")) if c in CONDITION_ROLES)
    if not matched or status_codes(r.get("verificationStatus")) & EXCLUDED_VERIFICATION:
        return None, None
    clinical = status_codes(r.get("clinicalStatus"))
    if clinical and not clinical & CLINICAL_STATUSES:
        # A status that is no code of its value set says nothing: read as "not active", a leukaemia or a
        # drug-induced neutropenia left the context unseen.
        return None, _malformed(r, "clinicalStatus: not a condition-clinical code")
    if clinical and not clinical & ACTIVE_CONDITION:
        return None, None
    # Validated before abatement is judged: "abatementDateTime": "unknown" dropped a leukaemia without a word. With
    # a clinicalStatus the abatement is not read, so an invalid one is reported but does not drop the condition.
    usable, issue = screen(Condition, r, CONDITION_READS - CONDITION_ABATEMENT if clinical else CONDITION_READS)
    if not usable:
        return None, issue
    # Only without a clinicalStatus is the abatement read: an active one decides, whatever the abatement holds.
    unquoted = None if clinical else _unquoted_abatement(r)
    if unquoted is not None:
        return None, _malformed(r, f"{unquoted}: a JSON number or boolean, not a dateTime string")
    # DESIGN: a condition without clinicalStatus counts unless it has abated (conservative: keeps the context).
    # An abatement sent as null is absent, as every null member is (it dropped the condition unseen). Only R4's
    # abatement[x] names count: STU3's "abatementBoolean": false ("not abated") dropped a leukaemia without a word;
    # R4 has no such element, so it is reported as one not read and the condition keeps its context.
    if not clinical and any(r.get(key) is not None for key in CONDITION_ABATEMENT):
        return None, None
    system, code = matched[0]
    roles = frozenset().union(*(CONDITION_ROLES[c] for c in matched))
    return ConditionFact(CodedRef(system, code, CONDITION_DISPLAY.get((system, code)), source_of(r)), roles), issue


def medication_index(resources: Iterable[Mapping[str, Any]]) -> Mapping[str, frozenset[Code]]:
    """The codes of every Medication resource, by "Medication/id", for ``medicationReference``."""
    return {
        source_of(r): medication_codes(r)
        for r in resources
        if r.get("resourceType") == "Medication" and isinstance(r.get("id"), str)
    }


def medication_codes(medication: Mapping[str, Any]) -> frozenset[Code]:
    """A Medication's own codes and those of its active ingredients.

    EHRs code a Medication as the product given (RxNorm SCD/SBD: "filgrastim 0.6 MG/ML Injectable Solution"),
    which the tables do not list; its ``ingredient`` items name the ingredients (RxNorm IN), which they do.
    """
    codes = set(codes_of(medication.get("code")))
    ingredients = medication.get("ingredient")
    for ingredient in ingredients if isinstance(ingredients, list) else ():
        if isinstance(ingredient, (dict, Mapping)) and ingredient.get("isActive") is not False:
            codes |= codes_of(ingredient.get("itemCodeableConcept"))
    return frozenset(codes)


def medication_facts(
    r: Mapping[str, Any], medications: Mapping[str, frozenset[Code]]
) -> tuple[frozenset[MedicationFact], DataIssue | None]:
    """The facts of a MedicationRequest for a known medicine: one per role (a drug may be a cause and chemo)."""
    status = r.get("status")
    # Surrounding spaces as in one EHR vendor's examples ("entered-in-error "), as for Observation and report
    # statuses (service.extract): an order that does not count is ignored, not reported.
    if isinstance(status, str) and status.strip() in IGNORED_MEDICATION:
        return frozenset(), None
    if r.get("doNotPerform") is True:
        return frozenset(), None
    matched = [(c, role) for c in sorted(_medication_codes(r, medications)) if (role := medication_role(c))]
    if not matched:
        # An order whose medicine is a '#id' matching nothing it contains is broken FHIR, and its medicine, maybe a
        # G-CSF or chemotherapy, unknowable: said, not silently skipped.
        if _unresolved_contained(r):
            return frozenset(), _malformed(r, "medicationReference: its '#id' matches no contained Medication")
        unreadable = _unreadable_medication(r)
        return frozenset(), (_malformed(r, f"{unreadable}; its medicine cannot be known") if unreadable else None)
    if not isinstance(status, str) or status not in CURRENT_MEDICATION | ENDED_MEDICATION:
        # A G-CSF or chemotherapy order without a valid status (it is required) cannot be placed, but dropped
        # without a word it took the high-risk context (R2) away unseen: said, as for any record not readable.
        return frozenset(), _malformed(r, "status: missing" if status is None else "status: not a MedicationRequest "
                                          "status code")
    # Validated before the dates are judged: an ended order whose only date is invalid is reported, not dropped
    # unseen as one without any date.
    usable, issue = screen(MedicationRequest, r, MEDICATION_REQUEST_READS)
    if not usable:
        return frozenset(), issue
    unquoted = _unquoted_date(r)
    if unquoted is not None:
        return frozenset(), _malformed(r, f"{unquoted}: a JSON number or boolean, not a dateTime string")
    last = latest_order_date(r)
    if status in ENDED_MEDICATION and last is None:
        return frozenset(), None  # an ended order without any date cannot be placed in a look-back window
    facts = set()
    for role in {role for _, role in matched}:
        code = next(c for c, rl in matched if rl is role)
        ref = CodedRef(code[0], code[1], medication_display(code), source_of(r))
        facts.add(MedicationFact(ref, role, status in CURRENT_MEDICATION, last))
    return frozenset(facts), issue


def _medication_codes(r: Mapping[str, Any], medications: Mapping[str, frozenset[Code]]) -> frozenset[Code]:
    if r.get("medicationCodeableConcept") is not None:  # null is absent: the order names its medicine by reference
        return codes_of(r["medicationCodeableConcept"])
    target = _medication_target(r)
    if target is not None and target.startswith("#"):
        item = _contained(r, target[1:])
        return frozenset() if item is None else medication_codes(item)
    ref = reference(target)
    return medications.get(ref, frozenset()) if ref else frozenset()


def _medication_target(r: Mapping[str, Any]) -> str | None:
    """The reference of an order's ``medicationReference``, if it has one."""
    medication = r.get("medicationReference")
    target = medication.get("reference") if isinstance(medication, Mapping) else None
    return target if isinstance(target, str) else None


def _contained(r: Mapping[str, Any], target_id: str) -> Mapping[str, Any] | None:
    """The resource ``r`` contains with the id ``target_id``, if any."""
    contained = r.get("contained")
    return next((item for item in (contained if isinstance(contained, list) else ())
                 if isinstance(item, Mapping) and item.get("id") == target_id), None)


def _unreadable_medication(r: Mapping[str, Any]) -> str | None:
    """What makes an order's medication[x] (required, 1..1) unreadable, or None when it can be read.

    Only broken FHIR counts: a coding with only text, or a Reference with only a display, is valid and simply names
    no medicine the rules know. A broken one may hide a G-CSF or chemotherapy, like a '#id' that matches nothing.
    """
    if r.get("medicationCodeableConcept") is not None and r.get("medicationReference") is not None:
        # medication[x] is one choice: with both, which one names the medicine is unknowable (the concept, read
        # first, named nothing known while the reference may name a G-CSF or chemotherapy).
        return "medication[x]: both medicationCodeableConcept and medicationReference"
    if r.get("medicationCodeableConcept") is not None:
        concept = r["medicationCodeableConcept"]
        # A member sent as null is absent, as everywhere ("coding": null beside a text, "system": null).
        codings = concept.get("coding") if isinstance(concept, Mapping) else ""
        if not isinstance(codings, (list, type(None))) or not all(
                isinstance(c, Mapping) and all(isinstance(c.get(k), (str, type(None))) for k in ("system", "code"))
                for c in codings or ()):
            return "medicationCodeableConcept: not a CodeableConcept"
        return None
    if r.get("medicationReference") is not None:
        target = r["medicationReference"]
        if not isinstance(target, Mapping) or not isinstance(target.get("reference"), (str, type(None))):
            return "medicationReference: not a Reference"
        named = target.get("reference")
        if named is not None and not named.startswith("#") and not (reference(named) or "").startswith("Medication/"):
            # "x", "", a Substance: the Medication index and the reference following read "Medication/<id>" only.
            return "medicationReference: names no Medication ('Medication/<id>' or '#<id>')"
        return None
    return "medication[x]: missing"


def _unresolved_contained(r: Mapping[str, Any]) -> bool:
    """Whether ``r`` names its medicine by a contained '#id' that none of its contained resources has."""
    target = None if r.get("medicationCodeableConcept") is not None else _medication_target(r)
    return target is not None and target.startswith("#") and _contained(r, target[1:]) is None


def _unquoted_abatement(r: Mapping[str, Any]) -> str | None:
    """Where a Condition's abatement date is not a JSON string, or None.

    fhir.resources' lax validation takes a number for a dateTime (seconds since 1970), so ``"abatementDateTime": 0``
    passed and a leukaemia without clinicalStatus was read as abated: the chemotherapy context dropped unseen.
    """
    period = r.get("abatementPeriod")
    times: list[tuple[str, Any, bool]] = [("abatementDateTime", r.get("abatementDateTime"), False)]
    if isinstance(period, Mapping):
        times.append(("abatementPeriod", period, True))
    return _first_unquoted(times)


def _unquoted_date(r: Mapping[str, Any]) -> str | None:
    """Where a date :func:`latest_order_date` reads is not a JSON string, or None.

    fhir.resources' lax validation takes a number for a dateTime (seconds since 1970: ``"authoredOn": 0`` passes),
    but only strings are dates here: a completed G-CSF order so dated was dropped as one without any date, unseen.
    """
    return _first_unquoted(_order_times(r))


def _first_unquoted(times: Iterable[tuple[str, Any, bool]]) -> str | None:
    """The path of the first time (or Period start or end) given as (path, raw value, whether it is a Period) that
    is not a JSON string, or None."""
    for path, value, is_period in times:
        ends = [(f"{path}.{end}", value.get(end)) for end in ("start", "end")] if is_period else [(path, value)]
        for where, item in ends:
            if item is not None and not isinstance(item, str):
                return where
    return None


def _order_times(r: Mapping[str, Any]) -> list[tuple[str, Any, bool]]:
    """Every time an order mentions, as (path, raw value, whether it is a Period): authoredOn, the validity period,
    dosage events and bounds. Periods are given only when they are objects."""
    found: list[tuple[str, Any, bool]] = [("authoredOn", r.get("authoredOn"), False)]
    dispense = r.get("dispenseRequest")
    validity = dispense.get("validityPeriod") if isinstance(dispense, Mapping) else None
    if isinstance(validity, Mapping):
        found.append(("dispenseRequest.validityPeriod", validity, True))
    dosages = r.get("dosageInstruction")
    for n, dosage in enumerate(dosages if isinstance(dosages, list) else ()):
        when = dosage.get("timing") if isinstance(dosage, Mapping) else None
        if not isinstance(when, Mapping):
            continue
        events = when.get("event")
        found += [(f"dosageInstruction[{n}].timing.event[{i}]", e, False)
                  for i, e in enumerate(events if isinstance(events, list) else ())]
        repeat = when.get("repeat")
        bounds = repeat.get("boundsPeriod") if isinstance(repeat, Mapping) else None
        if isinstance(bounds, Mapping):
            found.append((f"dosageInstruction[{n}].timing.repeat.boundsPeriod", bounds, True))
    return found


def latest_order_date(r: Mapping[str, Any]) -> datetime | None:
    """The latest date an order mentions: authoredOn, validity period end, dosage bounds or events."""
    candidates = [timing.period(value) if is_period else timing.parse(value) for _, value, is_period in _order_times(r)]
    found = [c.latest for c in candidates if c is not None]
    return max(found) if found else None


#: Why a birthDate that is present cannot give the age (the rules then use the adult cut-offs, brief §1.5).
AGE_UNKNOWN = "age unknown, adult ANC cut-offs used"


def birth(r: Mapping[str, Any], *, today: date) -> tuple[tuple[str, date] | None, DataIssue | None]:
    """The (source, birth date) of a Patient with a usable birthDate, as of ``today`` (the evaluation date, UTC).

    A Patient without a birthDate gives neither (the age is simply unknown); one whose birthDate is not a valid
    FHIR date, or lies in the future beyond ``BIRTH_DATE_TOLERANCE``, gives a ``malformed-resource`` issue, so a
    newborn is never graded on adult cut-offs without a word.
    """
    if r.get("birthDate") is None:
        return None, None
    born = timing.birth_date(r["birthDate"])
    if born is None:
        return None, _malformed(r, f"birthDate: not a valid date; {AGE_UNKNOWN}")
    if born > today + BIRTH_DATE_TOLERANCE:
        return None, _malformed(r, f"birthDate: after the evaluation date; {AGE_UNKNOWN}")
    usable, issue = screen(Patient, r, PATIENT_READS)
    if not usable:
        return None, issue
    return (source_of(r), born), issue
