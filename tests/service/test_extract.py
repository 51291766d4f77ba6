"""Extraction: raw FHIR -> facts, with status, time, value and validation handling (brief §2)."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from service.codes import ATC, ConditionRole, LabRole
from service.drugs import MedicationRole
from service.extract import LabResult, Temperature, extract
from service.fhir import MAX_BUNDLE_DEPTH, reference
from service.model import DataIssue
from service.thresholds import DEFAULT_POLICY, ClinicalPolicy
from tests.service.factories import (
    ICD10CM,
    LOINC,
    NEUTROPHILS_PCT,
    NOW,
    RXNORM,
    SNOMED,
    UCUM,
    ago,
    anc,
    bundle,
    component,
    condition,
    diagnostic_report,
    medication_request,
    observation,
    patient,
    percent,
    temperature,
    vital_signs_panel,
    wbc,
)
from tests.service.factories import WBC as WBC_CODE

D = Decimal


def facts(*resources: Any, **kw: Any):  # type: ignore[no-untyped-def]
    return extract(list(resources), now=NOW, **kw)


@pytest.mark.parametrize(
    ("status", "used", "preliminary"),
    [
        ("final", True, False),
        ("amended", True, False),
        ("corrected", True, False),
        ("preliminary", True, True),
        ("registered", False, False),
        ("cancelled", False, False),
        ("entered-in-error", False, False),
        ("unknown", False, False),
    ],
    ids=lambda v: str(v),
)
def test_observation_status(status: str, used: bool, preliminary: bool) -> None:
    found = facts(anc(400, status=status))
    assert bool(found.labs) is used
    assert not found.issues
    if used:
        assert found.labs[0].preliminary is preliminary


def _with_status(resource: dict[str, Any], status: object) -> dict[str, Any]:
    """``resource`` with ``status`` as its status, or without one when it is None."""
    changed = {k: v for k, v in resource.items() if k != "status"}
    return changed if status is None else {**changed, "status": status}


@pytest.mark.parametrize(
    ("status", "problem"),
    [("F", "status: unknown value 'F'"), (None, "status: missing"), (7, "status: unknown value 7")],
    ids=["unknown", "missing", "not-a-string"],
)
def test_unknown_status_value_is_malformed_not_used(status: object, problem: str) -> None:
    found = facts(_with_status(anc(400, id="x"), status))
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "Observation/x", problem),)


@pytest.mark.parametrize(
    ("status", "used", "issues"),
    [("entered-in-error ", False, set()), (" cancelled", False, set()),
     ("final ", False, {"malformed-resource"})],  # used, it is still invalid FHIR in an element the rules read
    ids=["entered-in-error-with-a-space", "cancelled-with-a-space", "final-with-a-space"],
)
def test_status_with_surrounding_spaces_is_read_by_its_code(status: str, used: bool, issues: set[str]) -> None:
    found = facts(anc(400, status=status, id="x"))
    assert bool(found.labs) is used
    assert {i.code for i in found.issues} == issues


@pytest.mark.parametrize(
    ("minutes_ahead", "used"),
    [(0, True), (5, True), (5.5, False), (60 * 24, False)],
    ids=["now", "at-tolerance", "beyond-tolerance", "tomorrow"],
)
def test_future_dated_results_are_ignored(minutes_ahead: float, used: bool) -> None:
    found = facts(anc(400, effective=ago(minutes=-minutes_ahead), id="f"))
    assert bool(found.labs) is used
    assert bool(found.issues) is not used


#: The UTC start of the date "2025-03-11"; the tests below put the future limit (now + tolerance) before it.
TOMORROW_IN_UTC = datetime(2025, 3, 11, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("make", "zone_lead"),
    [(lambda when: anc(400, effective=when, id="f"), False),
     (lambda when: temperature("38.6", "Cel", when, id="f"), True)],
    ids=["anc", "temperature"],
)
@pytest.mark.parametrize(
    ("effective", "ahead", "used"),
    [
        ("2025-03-11", timedelta(hours=13, minutes=59), True),
        ("2025-03-11", timedelta(hours=14), True),
        ("2025-03-11", timedelta(hours=14, minutes=1), False),
        ("2025-03", timedelta(days=1), True),  # March began days before 11 March, which "ahead" counts from
        ("2025-03-11T00:00:00Z", timedelta(0), True),
        ("2025-03-11T00:00:00Z", timedelta(seconds=1), False),
        ("2025-03-11T10:00:00+10:00", timedelta(seconds=1), False),
        ({"start": "2025-03-10T23:00:00Z", "end": "2025-03-11T00:00:00Z"}, timedelta(seconds=1), False),
    ],
    ids=["date-13h59-ahead", "date-14h-ahead", "date-14h01-ahead", "month-begun", "timed-at-limit",
         "timed-1s-past-limit", "timed-in-plus-10-1s-past-limit", "period-1s-past-limit"],
)
def test_date_only_temperatures_may_begin_in_the_earliest_time_zone(
    make: Callable[[str], dict[str, Any]], zone_lead: bool, effective: str | dict[str, str], ahead: timedelta,
    used: bool
) -> None:
    # A date has no zone: "2025-03-11" has begun at UTC+14 from 14 h before its UTC start (service/timing.py).
    # Only temperatures get that lead (more readings can only raise the fever); a lab result dated ahead of UTC
    # would outrank a current timed ANC, so labs stay strict. Instants and Periods of instants are strict for both.
    used = used and (zone_lead or not (isinstance(effective, str) and effective == "2025-03-11"))
    now = TOMORROW_IN_UTC - DEFAULT_POLICY.future_tolerance - ahead
    resource = make("2025-03-11T00:00:00Z")
    resource.pop("effectiveDateTime")
    resource["effectivePeriod" if isinstance(effective, dict) else "effectiveDateTime"] = effective
    found = extract([resource], now=now)
    assert bool(found.labs or found.temperatures) is used
    assert found.issues == (() if used else (DataIssue("future-dated", "Observation/f",
                                                       "effective time is in the future; ignored"),))


@pytest.mark.parametrize(
    ("key", "value", "effective"),
    [
        ("effectiveDateTime", "2025-03-10T08:00:00+01:00", "2025-03-10T07:00:00+00:00"),
        ("effectiveInstant", "2025-03-10T08:00:00Z", "2025-03-10T08:00:00+00:00"),
        ("effectivePeriod", {"start": "2025-03-10T07:00:00Z", "end": "2025-03-10T08:00:00Z"},
         "2025-03-10T08:00:00+00:00"),
        ("issued", "2025-03-10T09:00:00Z", "2025-03-10T09:00:00+00:00"),
        ("effectiveDateTime", "2025-03-09", "2025-03-09T00:00:00+00:00"),
    ],
    ids=["dateTime", "instant", "period", "issued", "date-only"],
)
def test_effective_time_variants(key: str, value: Any, effective: str) -> None:
    resource = anc(400, effective_key="", **{key: value})
    (lab,) = facts(resource).labs
    assert lab.effective.isoformat() == effective


def test_missing_time_is_a_data_issue() -> None:
    found = facts(anc(400, effective_key="", id="t"))
    assert not found.labs and found.issues[0].code == "missing-effective-time"


def test_count_units_are_normalised_to_cells_per_ul() -> None:
    per_ul, si = facts(anc(400, "/uL", id="a"), anc("0.4", "10*9/L", id="b", effective=ago(days=1))).labs
    assert {per_ul.value, si.value} == {D(400), D("400.0")}


def test_missing_unit_keeps_the_result_as_uninterpretable() -> None:
    (lab,) = facts(anc(400, None, id="u")).labs
    assert lab.value is None and lab.problem == "no unit"


@pytest.mark.parametrize(
    ("value_key", "value", "problem"),
    [
        ("valueString", "0.4", "value is not a Quantity"),
        ("valueInteger", 400, "value is not a Quantity"),
        ("valueCodeableConcept", {"text": "low"}, "value is not a Quantity"),
    ],
    ids=["string", "integer", "concept"],
)
def test_value_must_be_a_quantity(value_key: str, value: Any, problem: str) -> None:
    (lab,) = facts(anc(None, **{value_key: value})).labs
    assert lab.value is None and lab.problem == problem


def _quoted(resource: dict[str, Any], value: str) -> dict[str, Any]:
    """``resource`` with its valueQuantity value sent as a JSON string (the factories send numbers)."""
    resource["valueQuantity"]["value"] = value
    return resource


@pytest.mark.parametrize(
    "resource",
    [
        _quoted(anc(0.4, "10*3/uL", id="s"), "0.4"),
        _quoted(wbc(2.0, id="s"), "2.0"),
        _quoted(observation("770-8", 30, "%", id="s"), "30"),
        _quoted(temperature(38.6, id="s"), "38.6"),
        _quoted(temperature(101.5, "[degF]", id="s"), "101.5"),
        _quoted(temperature(36.6, id="s"), "36.6"),
        vital_signs_panel([component("8310-5", 38.6, "Cel") | {"valueQuantity": {"value": "38.6", "unit": "Cel"}}],
                          id="s"),
        anc(1600, id="s", referenceRange=[{"low": {"value": "1800", "unit": "/uL"}}]),
    ],
    ids=["anc", "wbc", "neutrophil-percent", "fever", "fever-fahrenheit", "afebrile", "panel-component",
         "reference-range"],
)
def test_value_sent_as_a_json_string_is_malformed_not_graded(resource: dict[str, Any]) -> None:
    # FHIR JSON decimals are JSON numbers (R4 §2.6.2); fhir.resources' lax mode would read "0.4" as 0.4.
    found = facts(resource)
    assert (found.labs, found.temperatures) == ((), ())
    (issue,) = found.issues
    assert (issue.code, issue.source) == ("malformed-resource", "Observation/s")
    assert issue.detail is not None and "a JSON string, not a number" in issue.detail


def test_no_value_is_ignored() -> None:
    absent = anc(None, dataAbsentReason={"text": "error"})
    assert facts(absent) == facts()


@pytest.mark.parametrize("components", [component("8310-5", 38.6, "Cel"), "38.6", [None], [["x"]]],
                         ids=["object", "string", "null-item", "list-item"])
def test_panel_whose_components_cannot_be_read_is_a_data_issue(components: Any) -> None:
    # A vital-signs panel whose component is not a list of objects (one component written as an object) hid its
    # 38.6 C temperature without a word: febrile neutropenia missed.
    found = facts(vital_signs_panel([], id="v", component=components))
    assert not found.temperatures
    (issue,) = found.issues
    assert (issue.code, issue.source) == ("malformed-resource", "Observation/v")


@pytest.mark.parametrize("components", [None, []], ids=["null", "empty"])
def test_panel_without_components_is_no_issue(components: Any) -> None:
    assert facts(vital_signs_panel([], id="v", component=components)) == facts()


@pytest.mark.parametrize(
    "resource",
    [
        anc(None, id="s", valueQuantity=None),
        anc(None, id="s", valueQuantity={"value": None, "unit": "/uL", "system": UCUM, "code": "/uL"}),
        temperature(None, id="s", valueQuantity=None),
        temperature(None, id="s", valueQuantity={"value": None, "unit": "Cel"}),
        vital_signs_panel([{"code": {"coding": [{"system": LOINC, "code": "8310-5"}]}, "valueQuantity": None}],
                          id="s"),
    ],
    ids=["anc-quantity", "anc-value", "temperature-quantity", "temperature-value", "panel-component"],
)
def test_a_null_value_is_no_value(resource: dict[str, Any]) -> None:
    # "valueQuantity": null or "value": null (serialisers that write every member) is absent, as null members are
    # everywhere: not an uninterpretable ANC (a false card) nor an uninterpretable temperature.
    assert facts(resource) == facts()


def test_negative_count_is_uninterpretable() -> None:
    (lab,) = facts(anc(-5, "/uL")).labs
    assert lab.value is None and lab.problem == "negative value"


@pytest.mark.parametrize("comparator", ["x", "less than", "ad"])  # "ad": R5 only
def test_unknown_comparator_makes_the_value_uninterpretable(comparator: str) -> None:
    # R4 Quantity.comparator is < | <= | >= | > (a required binding the models do not check): "<500" read without
    # its comparator was graded as exactly 500 (moderate, not severe). An unknown one leaves the value unknown.
    (lab,) = facts(anc(500, "/uL", comparator=comparator)).labs
    assert lab.value is None and lab.problem == f"comparator: unknown value {comparator!r}"


def test_comparator_is_kept() -> None:
    (lab,) = facts(anc("0.1", "10*9/L", comparator="<")).labs
    assert (lab.value, lab.comparator) == (D("100.0"), "<")


def test_reference_range_low_is_converted() -> None:
    (lab,) = facts(anc("1.6", "10*9/L", reference_low=1.8)).labs
    assert lab.reference_low == D("1800.0")


def test_vital_signs_panel_components_are_read() -> None:
    panel = vital_signs_panel([component("8310-5", 38.6, "Cel"), component("8867-4", 110, "/min")], id="vs")
    (reading,) = facts(panel).temperatures
    assert (reading.source, reading.celsius) == ("Observation/vs", D("38.60"))


_HEART_RATE = {"code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
               "valueQuantity": {"value": 72, "unit": "/min"}}


@pytest.mark.parametrize(
    ("unread", "issues"),
    [
        pytest.param({**_HEART_RATE, "valueQuantity": {"value": "72", "unit": "/min"}}, set(), id="quoted-value"),
        pytest.param({**_HEART_RATE, "referenceRange": [{"low": {"value": "60"}}]}, set(), id="quoted-range"),
        pytest.param({**_HEART_RATE, "valueQuantity": {"value": 72, "unit": 5}}, {"invalid-unread-elements"},
                     id="invalid-quantity"),
        pytest.param({**_HEART_RATE, "modifierExtension": "x"}, {"invalid-unread-elements"}, id="invalid-modifier"),
        # An item that is no component at all: the error lies at the item itself ("component.0").
        pytest.param("junk", {"invalid-unread-elements"}, id="a-string-item"),
        pytest.param(7, {"invalid-unread-elements"}, id="a-number-item"),
    ],
)
def test_an_invalid_component_the_rules_do_not_read_leaves_the_others_usable(
    unread: Any, issues: set[str]
) -> None:
    # A heart rate sent badly beside the temperature of a vital-signs panel (or a haemoglobin beside the ANC of a
    # blood count panel) made the whole panel unusable: febrile neutropenia became neutropenia-severe.
    panel = vital_signs_panel([unread, component("8310-5", 38.6, "Cel")], id="vs")
    cbc = observation("57021-8", None, None, components=[unread, component("751-8", 0.3, "10*3/uL")], id="cbc")
    found = facts(panel, cbc)
    assert [(t.source, t.celsius) for t in found.temperatures] == [("Observation/vs", D("38.60"))]
    assert [(lab.source, lab.value) for lab in found.labs] == [("Observation/cbc", D("300.0"))]
    assert {issue.code for issue in found.issues} == issues


@pytest.mark.parametrize(
    "read",
    [
        pytest.param({"valueQuantity": {"value": "38.6", "unit": "Cel"}}, id="quoted-value"),
        pytest.param({"valueQuantity": {"value": 38.6, "unit": 5}}, id="invalid-quantity"),
        pytest.param({"modifierExtension": "x"}, id="invalid-modifier"),
    ],
)
def test_an_invalid_component_the_rules_read_still_makes_the_record_unusable(read: dict[str, Any]) -> None:
    panel = vital_signs_panel([_HEART_RATE, component("8310-5", 38.6, "Cel") | read], id="vs")
    found = facts(panel)
    assert found.temperatures == ()
    assert [(i.code, i.source) for i in found.issues] == [("malformed-resource", "Observation/vs")]


def test_temperature_in_fahrenheit_is_converted() -> None:
    (reading,) = facts(temperature(101, "[degF]")).temperatures
    assert reading.celsius == D("38.33")


def test_temperature_without_unit_is_a_data_issue() -> None:
    found = facts(temperature(39, None, id="t"))
    assert not found.temperatures
    assert found.issues == (DataIssue("temperature-uninterpretable", "Observation/t", "no unit"),)


def _temperature_in(where: str, value: str, unit: str, comparator: str) -> dict[str, Any]:
    """A temperature sent with ``comparator``, on its own or as a vital-signs panel's component (id "t")."""
    if where == "panel":
        return vital_signs_panel([component("8310-5", value, unit, comparator=comparator)], ago(minutes=5), id="t")
    return temperature(value, unit, ago(minutes=5), id="t", comparator=comparator)


@pytest.mark.parametrize("where", ["single", "panel"])
@pytest.mark.parametrize("comparator", ["x", "less than", "ad"])  # "ad": R5 only
def test_temperature_with_an_unknown_comparator_is_not_used(where: str, comparator: str) -> None:
    # R4 Quantity.comparator is < | <= | >= | > (a required binding the models do not check): read without it,
    # an upper bound such as "<38.6" became a 38.6 °C fever. As for a count, the value is not known.
    found = facts(_temperature_in(where, "38.6", "Cel", comparator))
    assert found.temperatures == ()
    assert found.issues == (
        DataIssue("temperature-uninterpretable", "Observation/t", f"comparator: unknown value {comparator!r}"),)


#: (comparator, value, unit) -> the reading kept, as (celsius, comparator), or None when it is not used. An upper
#: bound is kept only when it is certainly below 38.0 °C (after conversion and rounding to 2 decimals); a lower
#: bound is kept at its bound.
@pytest.mark.parametrize(
    ("comparator", "value", "unit", "kept"),
    [
        ("<", "37.99", "Cel", ("37.99", "<")),
        ("<", "38.0", "Cel", ("38.00", "<")),
        ("<", "38.01", "Cel", None),
        ("<", "38.6", "Cel", None),
        ("<", "100.4", "[degF]", ("38.00", "<")),
        ("<", "100.41", "[degF]", None),  # 38.0056 rounds to 38.01
        # A strict upper bound just above 38.0 °C leaves it open: rounded half-up it became "<38.00", a reading
        # certainly below 38.0 °C that broke a sustained run the true value (38.00-38.003) may have continued.
        ("<", "38.004", "Cel", None),
        ("<", "100.404", "[degF]", None),  # 38.0022
        ("<", "100.399", "[degF]", ("38.00", "<")),  # 37.9994: the bound is rounded up, never below what was sent
        ("<=", "37.99", "Cel", ("37.99", "<=")),
        ("<=", "38.0", "Cel", None),
        ("<=", "100.39", "[degF]", ("37.99", "<=")),
        ("<=", "100.4", "[degF]", None),
        (">", "38.5", "Cel", ("38.50", ">")),
        (">=", "37.99", "Cel", None),
        (">", "37.99", "Cel", None),
        (">=", "38.0", "Cel", ("38.00", ">=")),
        (">", "101.0", "[degF]", ("38.33", ">")),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("where", ["single", "panel"])
def test_temperature_comparator_is_kept_or_the_bound_reported(
    where: str, comparator: str, value: str, unit: str, kept: tuple[str, str] | None
) -> None:
    found = facts(_temperature_in(where, value, unit, comparator))
    assert [(t.source, t.celsius, t.comparator) for t in found.temperatures] == (
        [] if kept is None else [("Observation/t", D(kept[0]), kept[1])])
    assert [(i.code, i.source) for i in found.issues] == (
        [] if kept is not None else [("temperature-uninterpretable", "Observation/t")])
    if kept is None:
        assert found.issues[0].detail is not None and "not used for the fever rule" in found.issues[0].detail


def test_old_temperatures_are_not_even_validated() -> None:
    old_and_broken = temperature(39, effective=ago(hours=25), implicitRules=123)
    assert facts(old_and_broken) == facts()


def test_malformed_relevant_resource_is_a_data_issue() -> None:
    found = facts(anc(400, id="m", implicitRules=123))
    assert not found.labs
    (issue,) = found.issues
    assert (issue.code, issue.source) == ("malformed-resource", "Observation/m")
    assert issue.detail is not None and issue.detail.startswith("implicitRules")


def _broken(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` made invalid for fhir.resources in an element the rules read (implicitRules is a uri)."""
    return {**resource, "implicitRules": 123}


@pytest.mark.parametrize(
    ("resources", "malformed"),
    [
        ([anc(400, id="a"), _broken(wbc(3.0, id="w")), _broken(percent(NEUTROPHILS_PCT, 13, id="p"))], set()),
        ([_broken(wbc(3.0, id="w")), percent(NEUTROPHILS_PCT, 13, id="p")], {"Observation/w"}),
        ([anc(400, id="a", effective=ago(hours=1)), _broken(wbc(3.0, id="w"))], {"Observation/w"}),
        ([anc(400, "furlongs", id="a"), _broken(wbc(3.0, id="w"))], {"Observation/w"}),
        ([anc(None, id="a"), _broken(wbc(3.0, id="w"))], {"Observation/w"}),
        ([_broken(anc(400, id="a")), _broken(wbc(3.0, id="w"))], {"Observation/a", "Observation/w"}),
        ([anc(400, id="a"), _quoted(wbc(3.0, id="w"), "3.0")], {"Observation/w"}),
        ([observation("57021-8", id="cbc", components=[component(WBC_CODE, 3.0, "10*3/uL"),
                                                       component("751-8", 400, "/uL")]),
          _broken(percent(NEUTROPHILS_PCT, 13, id="p"))], set()),
    ],
    ids=["measured-anc-same-time", "no-anc", "anc-at-another-time", "anc-unit-unknown", "anc-without-value",
         "anc-malformed-too", "quoted-value-still-checked", "measured-anc-in-a-panel-component"],
)
def test_white_cells_and_differential_validated_unless_a_measured_anc_makes_them_unused(
    resources: list[dict[str, Any]], malformed: set[str]
) -> None:
    found = facts(*resources)
    assert {i.source for i in found.issues if i.code == "malformed-resource"} == malformed


def test_white_cells_beside_a_measured_anc_are_still_classified() -> None:
    found = facts(anc(400, id="a"), _broken(wbc(3.0, id="w")))
    assert {(lab.source, lab.role) for lab in found.labs} == {("Observation/a", LabRole.ANC),
                                                             ("Observation/w", LabRole.WBC)}


def test_malformed_irrelevant_resource_is_ignored_silently() -> None:
    assert facts(observation("8867-4", 80, "/min", implicitRules=123), {"resourceType": "Encounter", "x": 1}) == facts()


def test_conflicting_codings_are_malformed() -> None:
    resource = anc(400, id="c")
    resource["code"]["coding"].append({"system": "http://loinc.org", "code": "770-8"})
    found = facts(resource)
    assert not found.labs and found.issues[0].detail == "code: codings with different meanings"


def test_loinc_oid_system_is_accepted() -> None:
    (lab,) = facts(anc(400, system="urn:oid:2.16.840.1.113883.6.1")).labs
    assert lab.role is LabRole.ANC


def test_display_text_is_never_matched() -> None:
    resource = observation(None, 400, "/uL")
    resource["code"] = {"coding": [{"display": "Neutrophils [#/volume] in Blood"}], "text": "ANC"}
    assert facts(resource).labs == ()


@pytest.mark.parametrize(
    ("clinical", "verification", "extra", "counted"),
    [
        ("active", "confirmed", {}, True),
        ("recurrence", "confirmed", {}, True),
        ("relapse", "provisional", {}, True),
        ("active", "unconfirmed", {}, True),
        ("inactive", "confirmed", {}, False),
        ("resolved", "confirmed", {}, False),
        ("remission", "confirmed", {}, False),
        ("active", "refuted", {}, False),
        ("active", "entered-in-error", {}, False),
        (None, None, {}, True),  # DESIGN: no clinicalStatus counts unless abated
        (None, "confirmed", {"abatementDateTime": "2025-01-01"}, False),
    ],
    ids=["active", "recurrence", "relapse", "unconfirmed", "inactive", "resolved", "remission", "refuted", "eie",
         "no-status", "abated"],
)
def test_condition_status(clinical: str | None, verification: str | None, extra: dict[str, Any], counted: bool) -> None:
    found = facts(condition("425229001", clinical=clinical, verification=verification, **extra))
    assert bool(found.conditions) is counted


def test_condition_roles_and_display() -> None:
    (fact,) = facts(condition("D70.1", ICD10CM, id="c1")).conditions
    assert fact.roles == {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}
    assert (fact.ref.code, fact.ref.display, fact.ref.source) == (
        "D70.1", "Agranulocytosis secondary to cancer chemotherapy", "Condition/c1"
    )


def test_irrelevant_condition_is_ignored() -> None:
    assert facts(condition("38341003")) == facts()  # hypertension


@pytest.mark.parametrize(
    ("status", "authored", "expected"),
    [
        ("active", ago(days=400), (True, True)),
        ("on-hold", ago(days=3), (True, True)),
        ("completed", ago(days=3), (True, False)),
        ("stopped", ago(days=3), (True, False)),
        ("cancelled", ago(days=3), (False, False)),
        ("entered-in-error", ago(days=3), (False, False)),
        ("draft", ago(days=3), (False, False)),
    ],
    ids=lambda v: str(v),
)
def test_medication_request_status(status: str, authored: str, expected: tuple[bool, bool]) -> None:
    found = facts(medication_request("338036", status=status, authored=authored))
    assert bool(found.medications) is expected[0]
    if found.medications:
        assert found.medications[0].current is expected[1]


def test_medication_do_not_perform_is_ignored() -> None:
    assert facts(medication_request("3002", doNotPerform=True)).medications == ()


def test_ended_order_without_date_is_ignored() -> None:
    order = medication_request("338036", status="completed")
    del order["authoredOn"]
    assert facts(order).medications == ()


def test_medication_reference_to_contained_and_bundled_medication() -> None:
    contained = medication_request("0", id="r1")
    del contained["medicationCodeableConcept"]
    contained["medicationReference"] = {"reference": "#m"}
    contained["contained"] = [
        {"resourceType": "Medication", "id": "m", "code": {"coding": [{"system": RXNORM, "code": "2626"}]}}
    ]
    referenced = medication_request("0", id="r2")
    del referenced["medicationCodeableConcept"]
    referenced["medicationReference"] = {"reference": "Medication/peg"}
    medication = {"resourceType": "Medication", "id": "peg", "code": {"coding": [{"system": ATC, "code": "L03AA13"}]}}
    roles = {(m.ref.source, m.role) for m in facts(contained, referenced, medication).medications}
    assert roles == {("MedicationRequest/r1", MedicationRole.CAUSE), ("MedicationRequest/r2", MedicationRole.GCSF)}


def test_medication_with_two_roles_gives_two_facts() -> None:
    order = medication_request("121191", id="ritux")  # rituximab: RxNorm cause + ATC antineoplastic
    order["medicationCodeableConcept"]["coding"].append({"system": ATC, "code": "L01XC02"})
    assert {m.role for m in facts(order).medications} == {MedicationRole.CAUSE, MedicationRole.CHEMOTHERAPY}


def test_completed_order_date_from_dosage_bounds() -> None:
    order = medication_request(
        "338036",
        status="completed",
        authored=ago(days=30),
        dosageInstruction=[{"timing": {"repeat": {"boundsPeriod": {"start": ago(days=3), "end": ago(days=2)}}}}],
    )
    (fact,) = facts(order).medications
    assert fact.last is not None and NOW - fact.last == timedelta(days=2)


def test_patient_birth_date() -> None:
    assert facts(patient("2024-12-01")).birth_date is not None
    assert facts(patient(None)).birth_date is None


def test_bundles_are_flattened_and_reports_link_results() -> None:
    a, b = anc(400, id="a"), temperature(38, id="t")
    report = diagnostic_report([a, {"id": "z"}], id="r")
    found = facts(bundle([a, bundle([b]), report]))
    assert (len(found.labs), len(found.temperatures)) == (1, 1)
    assert found.links == (frozenset({"Observation/a", "Observation/z"}),)


def _nested(levels: int, *resources: Any) -> Any:
    """``resources`` inside ``levels`` nested Bundles."""
    for _ in range(levels):
        resources = (bundle(resources),)
    return resources[0]


@pytest.mark.parametrize(
    ("levels", "read"),
    [(1, True), (MAX_BUNDLE_DEPTH - 1, True), (MAX_BUNDLE_DEPTH, True), (MAX_BUNDLE_DEPTH + 1, False), (50, False)],
    ids=["one", "below-limit", "at-limit", "above-limit", "far-above"],
)
def test_bundles_nested_past_the_limit_are_reported_not_lost_silently(levels: int, read: bool) -> None:
    found = facts(_nested(levels, anc(400, id="deep"), temperature(38.6, id="t")))
    assert (len(found.labs), len(found.temperatures)) == ((1, 1) if read else (0, 0))
    if read:
        assert found.issues == ()
    else:
        (issue,) = found.issues
        assert (issue.code, issue.source) == ("malformed-resource", "Bundle/(no id)")
        unread = 2 if levels == MAX_BUNDLE_DEPTH + 1 else 1  # the ANC and the temperature, or the next Bundle
        assert issue.detail == f"Bundle nested over {MAX_BUNDLE_DEPTH} levels deep: {unread} entry(ies) not read"


def test_empty_bundle_past_the_limit_loses_nothing_and_is_not_reported() -> None:
    assert facts(_nested(MAX_BUNDLE_DEPTH, {"resourceType": "Bundle", "type": "searchset"})) == facts()


def test_entered_in_error_report_links_nothing() -> None:
    report = diagnostic_report([{"id": "a"}, {"id": "b"}], status="entered-in-error")
    assert facts(report).links == ()


def test_newer_version_of_the_same_resource_wins() -> None:
    old = anc(400, id="v", meta={"versionId": "1"})
    new = anc(400, id="v", status="entered-in-error", meta={"versionId": "2"})
    assert facts(old, new).labs == ()
    assert len(facts(old, anc(900, id="v", meta={"versionId": "2"})).labs) == 1


def test_same_id_without_versions_keeps_both() -> None:
    found = facts(anc(400, id="v"), anc(400, id="v", status="entered-in-error"))
    assert len(found.labs) == 1
    assert [(i.code, i.source) for i in found.issues] == [("conflicting-duplicates", "Observation/v")]


@pytest.mark.parametrize(
    ("copies", "source"),
    [
        ([anc(3000, id="d"), anc(400, id="d")], "Observation/d"),
        ([temperature(36.6, id="d"), temperature(39.1, id="d")], "Observation/d"),
        ([anc(3000, id="d"), anc(400, id="d", meta={"versionId": "7"})], "Observation/d"),  # one unversioned
        ([anc(400, id="d", meta={"versionId": "7"}), anc(900, id="d", meta={"versionId": "7"})], "Observation/d"),
        ([anc(3000, id="d"), anc(400, id="d", implicitRules=123)], "Observation/d"),  # one copy malformed
        ([condition("425229001", id="d"), condition("425229001", id="d", clinical="resolved")], "Condition/d"),
        ([medication_request("338036", id="d"), medication_request("338036", id="d", authored=ago(days=2))],
         "MedicationRequest/d"),
        ([patient("2025-03-05", id="d"), patient("1970-01-01", id="d")], "Patient/d"),
    ],
    ids=["anc", "temperature", "one-unversioned", "same-version", "one-malformed", "condition", "medication",
         "patient"],
)
def test_conflicting_copies_are_all_used_and_reported(copies: list[dict[str, Any]], source: str) -> None:
    found = facts(*copies)
    conflicts = [i for i in found.issues if i.code == "conflicting-duplicates"]
    assert [(i.source, i.detail) for i in conflicts] == [(source, (
        "2 different copies with this id, none marked as newer (meta.versionId, meta.lastUpdated): all were used, "
        "the most severe value counts"))]


@pytest.mark.parametrize(
    "copies",
    [
        [anc(400, id="d"), anc(400, id="d")],  # identical
        [anc(3000, id="d", meta={"versionId": "1"}), anc(400, id="d", meta={"versionId": "2"})],  # ordered
        [observation("8867-4", 80, "/min", id="d"), observation("8867-4", 90, "/min", id="d")],  # irrelevant
        [condition("38341003", id="d"), condition("38341003", id="d", clinical="resolved")],  # not a risk factor
        [anc(400, effective=ago(days=1)), anc(300, effective=ago(days=9), id="d"),
         anc(900, effective=ago(days=9), id="d")],  # an older lab, not read while a current ANC exists
    ],
    ids=["identical", "versions-order-them", "irrelevant-observation", "irrelevant-condition", "older-lab-unread"],
)
def test_copies_that_agree_or_are_not_read_are_not_reported(copies: list[dict[str, Any]]) -> None:
    assert not [i for i in facts(*copies).issues if i.code == "conflicting-duplicates"]


@pytest.mark.parametrize(
    "junk",
    [None, 1, "x", [], {}, {"resourceType": 5}, {"resourceType": ["Observation"]}, {"resourceType": "Observation"},
     {"resourceType": "Observation", "status": ["final"],
      "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]}},
     {"resourceType": "Bundle", "entry": "x"}, {"resourceType": "Condition", "code": {"coding": "x"}},
     {"resourceType": "DiagnosticReport", "id": "r", "status": "final", "subject": "Patient/p1",
      "result": [{"reference": "#a"}], "contained": [{"resourceType": "Observation", "id": "a"}]}],
    ids=lambda v: repr(v)[:40],
)
def test_junk_never_raises(junk: Any) -> None:
    extract([junk], now=NOW)


def test_policy_windows_are_used() -> None:
    tight = ClinicalPolicy(temperature_window=timedelta(hours=1))
    assert facts(temperature(39, effective=ago(hours=2)), policy=tight).temperatures == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Observation/1", "Observation/1"),
        ("https://ehr/fhir/Observation/1/_history/3", "Observation/1"),
        ("Observation/", None),
        ("1", None),
        (None, None),
    ],
    ids=["relative", "absolute-history", "no-id", "bare", "none"],
)
def test_reference_normalisation(value: object, expected: str | None) -> None:
    assert reference(value) == expected


def test_older_labs_are_deferred_not_validated() -> None:
    found = facts(anc(400, effective=ago(days=8), id="old", implicitRules=123), anc(500, effective=ago(days=1)))
    assert len(found.labs) == 1 and not found.issues
    assert [item[0]["id"] for item in found.deferred] == ["old"]


@pytest.mark.parametrize(
    "old",
    [temperature(39.5, effective=ago(days=8), id="t"), observation("8867-4", 80, "/min", effective=ago(days=8)),
     anc(400, effective=ago(days=8), status="entered-in-error")],
    ids=["temperature", "irrelevant-code", "ignored-status"],
)
def test_older_than_every_window_gives_no_lab(old: dict[str, Any]) -> None:
    from service.extract import older_labs

    found = facts(old)
    assert (found.labs, found.temperatures, found.issues) == ((), (), ())
    assert all(not slab.labs and not slab.issues for slab in older_labs(found, now=NOW))


def test_older_slabs_are_cut_at_lab_times_only() -> None:
    from service.extract import older_labs

    found = facts(temperature(36.8, effective=ago(days=8)), anc(100, effective=ago(days=9), id="d9"),
                  anc(200, effective=ago(days=15.5), id="d15"))
    slabs = [sorted(lab.source for lab in slab.labs) for slab in older_labs(found, now=NOW)]
    assert slabs == [["Observation/d15", "Observation/d9"]]


@pytest.mark.parametrize(
    ("anc_window", "temperature_window", "anc_current"),
    [(timedelta(hours=12), timedelta(hours=24), False), (timedelta(days=7), timedelta(hours=24), True)],
    ids=["anc-window-shorter", "temperature-window-shorter"],
)
def test_a_temperature_inside_its_window_is_read_whichever_window_is_longer(
    anc_window: timedelta, temperature_window: timedelta, anc_current: bool
) -> None:
    policy = ClinicalPolicy(anc_current_window=anc_window, temperature_window=temperature_window)
    found = facts(temperature(38.6, effective=ago(hours=20)), anc(500, effective=ago(hours=20)), policy=policy)
    assert len(found.temperatures) == 1
    assert bool(found.labs) is anc_current
    assert len(found.deferred) == (0 if anc_current else 1)  # an older lab is kept for older_labs, not dropped


def test_older_labs_come_in_slabs_newest_first() -> None:
    from service.extract import older_labs

    found = facts(*(anc(100 * d, effective=ago(days=d), id=f"d{d}") for d in (8, 9, 16, 30, 31)))
    slabs = [sorted(lab.source for lab in slab.labs) for slab in older_labs(found, now=NOW)]
    assert slabs == [["Observation/d8", "Observation/d9"], ["Observation/d16"], ["Observation/d30", "Observation/d31"]]


_BASE_LAB = LabResult(source="Observation/a", role=LabRole.ANC, code=("http://loinc.org", "751-8"),
                      value=Decimal(400), comparator=None, effective=NOW, latest=NOW, status="final")
_BASE_TEMPERATURE = Temperature(source="Observation/t", celsius=Decimal("38.40"), effective=NOW, latest=NOW,
                                status="final")


def _one_field_changed(base: Any, changes: dict[str, Any]) -> list[Any]:
    return [base] + [dataclasses.replace(base, **{name: value}) for name, value in changes.items()]


@pytest.mark.parametrize(
    "results",
    [
        _one_field_changed(_BASE_LAB, {
            "source": "Observation/b", "role": LabRole.WBC, "code": ("http://loinc.org", "26499-4"),
            "value": None, "comparator": "<", "effective": NOW - timedelta(hours=1),
            "latest": NOW + timedelta(hours=1), "status": "preliminary", "specimen": "Specimen/s",
            "reference_low": Decimal(1500), "problem": "unit 'x' is not a count unit",
        }),
        _one_field_changed(_BASE_TEMPERATURE, {
            "source": "Observation/u", "celsius": Decimal("37.00"), "effective": NOW - timedelta(hours=1),
            "latest": NOW + timedelta(hours=1), "status": "amended", "maximum": True, "comparator": "<",
        }),
    ],
    ids=["lab-results", "temperatures"],
)
def test_sort_order_is_total_and_independent_of_arrival(results: list[Any]) -> None:
    # Every field counts (a field of None sorts before a value), so different results never tie and any arrival
    # order gives one sequence: the findings and issue lists must not depend on how the EHR ordered its Bundle.
    key = type(results[0]).order
    assert len({key(r) for r in results}) == len(results) == len(set(results))
    orders = {tuple(sorted(random.Random(seed).sample(results, len(results)), key=key)) for seed in range(20)}
    assert len(orders) == 1
    assert [key(r) for r in orders.pop()] == sorted(key(r) for r in results)


def _report(*contained: dict[str, Any], id: str = "101", named: tuple[str, ...] | None = None,
            status: str = "final") -> dict[str, Any]:
    """A DiagnosticReport carrying ``contained`` results, naming those in ``named`` (all by default)."""
    names = [c["id"] for c in contained] if named is None else list(named)
    return {"resourceType": "DiagnosticReport", "id": id, "status": status,
            "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
            "subject": {"reference": "Patient/p1"}, "contained": list(contained),
            "result": [{"reference": f"#{name}"} for name in names]}


def _inner(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` as a contained resource: no subject (the report's is the context)."""
    return {k: v for k, v in resource.items() if k != "subject"}


@pytest.mark.parametrize(
    ("resources", "sources"),
    [
        ([_report(_inner(anc(300, id="r1")))], {"Observation/101.r1"}),
        ([_report(_inner(anc(300, id="r1")), named=())], set()),  # carried, but not a result of the report
        ([_report(_inner(anc(300, id="r1")), status="entered-in-error")], set()),
        ([_report(_inner(anc(300, id="r1")), status="entered-in-error ")], set()),
        ([_report(anc(300, id="r1"))], {"Observation/101.r1"}),  # names the report's own subject
        ([_report(_inner(anc(300, id="r1"))), _report(_inner(anc(900, id="r1")), id="102")],
         {"Observation/101.r1", "Observation/102.r1"}),
        ([_report(_inner(wbc(3.0, id="w")), _inner(percent(NEUTROPHILS_PCT, 13, id="p")))],
         {"Observation/101.w", "Observation/101.p"}),
    ],
    ids=["contained-anc", "not-named-in-result", "report-entered-in-error", "report-entered-in-error-spaced",
         "same-subject", "two-reports-same-local-id", "contained-cbc"],
)
def test_results_contained_in_a_diagnostic_report_are_read(resources: list[dict[str, Any]],
                                                           sources: set[str]) -> None:
    # A report with its results inside it (the FHIR example "101") gave nothing at all: a fever with such an ANC
    # of 300 was fever-no-anc, without a word.
    found = facts(*resources)
    assert {lab.source for lab in found.labs} == sources
    assert not found.issues


def test_results_contained_in_one_report_are_linked() -> None:
    found = facts(_report(_inner(wbc(3.0, id="w")), _inner(percent(NEUTROPHILS_PCT, 13, id="p"))))
    assert frozenset({"Observation/101.w", "Observation/101.p"}) in found.links


@pytest.mark.parametrize(
    "bad_id",
    [["r1"], {"id": "r1"}, 7, None],
    ids=["list", "object", "number", "none"],
)
def test_contained_result_with_an_id_that_is_not_a_string_is_skipped(bad_id: object) -> None:
    found = facts({**_report(_inner(anc(300, id="r1"))), "contained": [{**_inner(anc(300)), "id": bad_id}]})
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101",
                                      "1 result reference(s) to '#id' match no contained Observation; not read"),)


@pytest.mark.parametrize(
    ("status", "problem"),
    [(None, "status: missing; its contained results not read"),
     (["final"], "status: not a code; its contained results not read")],
    ids=["missing", "a-list"],
)
def test_report_whose_status_cannot_be_read_is_reported_not_silently_skipped(status: object, problem: str) -> None:
    # Its results are not read (a list could hide "entered-in-error"), but a clinician must learn that a report
    # with results was left out.
    found = facts(_with_status(_report(_inner(anc(300, id="r1"))), status))
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101", problem),)


@pytest.mark.parametrize("result", ["#r1", ["#r1"], {"reference": "#r1"}, [{"reference": 1}]],
                         ids=["a-string", "list-of-strings", "an-object", "reference-a-number"])
def test_report_whose_result_is_not_a_list_of_references_is_reported(result: object) -> None:
    # Its contained ANC was not read and nothing said so: with a fever, febrile neutropenia became presumed.
    found = facts({**_report(_inner(anc(300, id="r1"))), "result": result})
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101",
                                      "result: not a list of References; contained results it may name not read"),)


def test_report_with_a_null_result_reference_is_read_without_an_issue() -> None:
    # A display-only Reference written with "reference": null (null members are absent) is valid: no data issue.
    report = _report(_inner(anc(300, id="r1")))
    report["result"].append({"reference": None, "display": "comment"})
    found = facts(report)
    assert [lab.value for lab in found.labs] == [300]
    assert not found.issues


def test_contained_result_naming_another_subject_is_not_read() -> None:
    # The prefetch drops top-level results about another patient; one hidden in a report must not be graded.
    other = {**anc(2500, id="x1"), "subject": {"reference": "Patient/someone-else"}}
    found = facts(_report(other))
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101",
                                      "1 contained result(s) name another subject than the report; not read"),)


def test_contained_result_with_a_null_subject_is_read_without_an_issue() -> None:
    # "subject": null (serialisers that write every member) is no subject, like the contained results that leave it
    # out: not another patient's result. Reported as such, a contained ANC or fever was dropped with a false issue.
    found = facts(_report({**_inner(anc(300, id="r1")), "subject": None},
                          {**_inner(temperature(38.6, id="t1")), "subject": None}))
    assert [lab.value for lab in found.labs] == [300]
    assert [reading.celsius for reading in found.temperatures] == [D("38.6")]
    assert not found.issues


def test_contained_results_of_a_report_with_a_long_id_keep_distinct_valid_ids() -> None:
    report = _report(_inner(anc(300, id="first-result")), _inner(anc(900, id="second-result")), id="r" * 60)
    sources = {lab.source for lab in facts(report).labs}
    assert len(sources) == 2
    assert all(re.fullmatch(r"Observation/[A-Za-z0-9\-.]{1,64}", source) for source in sources)


def test_contained_and_separate_results_of_one_report_are_linked() -> None:
    # A contained WBC and a separate neutrophil % of one report, drawn 5 minutes apart, make one ANC.
    report = _report(_inner(wbc(3.0, id="w", effective=ago(minutes=5))))
    report["result"].append({"reference": "Observation/n"})
    found = facts(report, percent(NEUTROPHILS_PCT, 13, id="n"))
    assert frozenset({"Observation/101.w", "Observation/n"}) in found.links


def test_report_without_an_id_says_its_contained_results_are_not_read() -> None:
    report = {k: v for k, v in _report(_inner(anc(300, id="r1"))).items() if k != "id"}
    found = facts(report)
    assert not found.labs
    assert [(i.code, i.detail) for i in found.issues] == [("malformed-resource",
                                                          "no id: its contained results not read")]


@pytest.mark.parametrize("before", [pytest.param(["junk"], id="string"), pytest.param([None], id="null"),
                                    pytest.param([[]], id="list"), pytest.param([{}], id="empty")])
@pytest.mark.parametrize("read", [
    pytest.param({"valueQuantity": {"value": "38.6", "unit": "Cel"}}, id="quoted-value"),
    pytest.param({"valueQuantity": {"value": 38.6, "unit": 5}}, id="invalid-quantity"),
])
def test_an_error_in_the_read_component_counts_behind_items_that_are_no_component(
    before: list[Any], read: dict[str, Any]
) -> None:
    # Unread components are known by index: items that are not components (or a list-level error naming no index)
    # must not shift an error of the temperature onto an unread index.
    found = facts(vital_signs_panel([*before, component("8310-5", 38.6, "Cel") | read], id="vs"))
    assert found.temperatures == ()
    assert "malformed-resource" in {i.code for i in found.issues}


def test_an_error_in_a_read_component_sent_twice_as_one_object_counts() -> None:
    shared = component("8310-5", 38.6, "Cel") | {"valueQuantity": {"value": 38.6, "unit": 5}}
    found = facts(vital_signs_panel([shared, _HEART_RATE, shared], id="vs"))
    assert found.temperatures == ()


def _without_system(resource: dict[str, Any], *, component_index: int | None = None) -> dict[str, Any]:
    holder = resource if component_index is None else resource["component"][component_index]
    holder["code"]["coding"] = [{k: v for k, v in c.items() if k != "system"} for c in holder["code"]["coding"]]
    return resource


@pytest.mark.parametrize(
    ("resource", "code"),
    [(_without_system(anc(300, "/uL", ago(hours=2), id="n")), "751-8"),
     (_without_system(temperature(38.6, "Cel", ago(hours=1), id="n")), "8310-5"),
     (_without_system(vital_signs_panel([component("8310-5", 38.6, "Cel")], ago(hours=1), id="n"),
                      component_index=0), "8310-5")],
    ids=["anc", "temperature", "temperature-in-a-panel"],
)
def test_a_code_the_rules_read_sent_without_its_system_is_reported(resource: dict[str, Any], code: str) -> None:
    # A coding is known only with its system; an ANC of 300 whose LOINC coding left the system out was dropped
    # without a word. It is still not read (a local code may look alike), but reported.
    found = facts(resource)
    assert not found.labs and not found.temperatures
    assert found.issues == (DataIssue("malformed-resource", "Observation/n",
                                      f"code {code!r} has no system, so it is not read as the LOINC code it looks like"),)


@pytest.mark.parametrize(
    "coding",
    [{"code": "8867-4"}, {"system": "urn:local", "code": "751-8"}, {"code": 751}],
    ids=["heart-rate-without-system", "local-system-same-code", "code-a-number"],
)
def test_other_codes_without_a_known_system_are_not_reported(coding: dict[str, Any]) -> None:
    resource = anc(300, "/uL", ago(hours=2), id="n")
    resource["code"]["coding"] = [coding]
    found = facts(resource)
    assert not found.labs and found.issues == ()


# Mutation-testing gaps of the reading layer (each test below pins behaviour a mutant of service/extract.py changed
# without any test noticing).


@pytest.mark.parametrize(
    "resource",
    [anc(0, id="z"), wbc(0, id="z"), percent(NEUTROPHILS_PCT, 0, id="z")],
    ids=["anc", "wbc", "neutrophil-percent"],
)
def test_a_zero_count_or_share_is_a_value_not_a_negative_one(resource: dict[str, Any]) -> None:
    # An ANC of 0/uL is the most profound neutropenia there is: read as "negative value" it became uninterpretable.
    (lab,) = facts(resource).labs
    assert (lab.value, lab.problem) == (D(0), None)


@pytest.mark.parametrize(
    ("extra_code", "kind"),
    [("770-8", "another-lab-role"), ("8310-5", "a-temperature")],
    ids=lambda v: str(v),
)
def test_codings_with_different_meanings_are_malformed(extra_code: str, kind: str) -> None:
    # An ANC also coded as a body temperature is neither: read as the ANC, the temperature coding was lost unseen.
    resource = anc(400, id="c")
    resource["code"]["coding"].append({"system": LOINC, "code": extra_code})
    found = facts(resource)
    assert (found.labs, found.temperatures) == ((), ())
    assert found.issues == (DataIssue("malformed-resource", "Observation/c", "code: codings with different meanings"),)


@pytest.mark.parametrize(
    ("resource", "issue"),
    [(temperature(1e40, id="s"), "temperature-uninterpretable"), (anc(1e40, id="s"), None)],
    ids=["temperature", "anc"],
)
def test_a_number_no_thermometer_or_counter_gives_is_not_a_number(resource: dict[str, Any], issue: str | None) -> None:
    # 1e40 is a valid FHIR decimal past service.fhir.MAX_EXPONENT: the temperature is reported, never converted.
    found = facts(resource)
    assert found.temperatures == ()
    if issue is not None:
        assert found.issues == (DataIssue(issue, "Observation/s", "value is not a number"),)
    else:
        (lab,) = found.labs
        assert (lab.value, lab.problem) == (None, "value is not a number")


def test_a_result_exactly_one_currency_window_old_is_current_not_deferred() -> None:
    # service.assessment counts a result whose time is now - anc_current_window as current (>=): extraction must
    # read it with the current results, not defer it to the older slabs.
    edge = NOW - DEFAULT_POLICY.anc_current_window
    found = facts(anc(400, effective=edge.strftime("%Y-%m-%dT%H:%M:%SZ"), id="edge"))
    assert [lab.source for lab in found.labs] == ["Observation/edge"]
    assert found.deferred == ()


def test_a_result_exactly_one_window_older_than_the_newest_starts_the_next_slab() -> None:
    from service.extract import older_labs

    found = facts(*(anc(100 * d, effective=ago(days=d), id=f"d{d}") for d in (8, 15)))
    slabs = [sorted(lab.source for lab in slab.labs) for slab in older_labs(found, now=NOW)]
    assert slabs == [["Observation/d8"], ["Observation/d15"]]


def test_an_old_result_with_an_unknown_status_is_reported_at_once() -> None:
    # A status that is no code says nothing of whether the result counts: reported whatever its age, not deferred
    # (and reported only if the older slabs are ever read).
    found = facts(anc(400, status="F", effective=ago(days=30), id="x"))
    assert found.issues == (DataIssue("malformed-resource", "Observation/x", "status: unknown value 'F'"),)
    assert found.deferred == ()


@pytest.mark.parametrize(
    ("status", "linked"),
    [("final", True), ("entered-in-error", False), ("cancelled", False)],
    ids=lambda v: str(v),
)
def test_a_panel_links_its_members_unless_it_was_retracted(status: str, linked: bool) -> None:
    panel = observation("58410-2", status=status, id="cbc",
                        hasMember=[{"reference": "Observation/w"}, {"reference": "Observation/p"}])
    found = facts(panel, wbc(3.0, id="w"), percent(NEUTROPHILS_PCT, 13, id="p"))
    assert found.links == ((frozenset({"Observation/w", "Observation/p"}),) if linked else ())


@pytest.mark.parametrize("entry", [None, [], {}], ids=["null", "empty-list", "an-object"])
def test_a_bundle_past_the_limit_with_no_entries_is_not_reported(entry: object) -> None:
    deep = _nested(MAX_BUNDLE_DEPTH, {"resourceType": "Bundle", "type": "searchset", "entry": entry})
    assert facts(deep) == facts()


def test_a_resource_with_entries_that_is_no_bundle_is_not_reported_as_one() -> None:
    listing = {"resourceType": "List", "id": "l", "status": "current", "mode": "snapshot",
               "entry": [{"item": {"reference": "Observation/a"}}]}
    assert facts(listing) == facts()


def test_a_report_without_status_naming_no_contained_result_is_no_issue() -> None:
    # Its separate results arrive on their own and are judged on their own: nothing of it is left unread.
    report = _with_status(diagnostic_report([{"id": "a"}, {"id": "b"}], id="r"), None)
    found = facts(report)
    assert found.issues == ()
    assert found.links == (frozenset({"Observation/a", "Observation/b"}),)


@pytest.mark.parametrize(("value", "unit"), [(-5, "/uL"), (-0.5, "10*9/L"), (-1, "/uL")],
                         ids=["minus-5-per-ul", "minus-half-giga-per-litre", "minus-1-per-ul"])
def test_any_negative_count_is_uninterpretable(value: float, unit: str) -> None:
    (lab,) = facts(anc(value, unit)).labs
    assert (lab.value, lab.problem) == (None, "negative value")


@pytest.mark.parametrize("comparator", [["<"], {"code": "<"}, 5], ids=["a-list", "an-object", "a-number"])
def test_an_unvalidated_count_beside_a_measured_anc_with_a_junk_comparator_never_raises(comparator: object) -> None:
    # A white cell count of the time of a usable measured ANC is not validated (the ANC makes it unused), so its
    # raw comparator may be anything JSON holds.
    count = wbc(3.0, id="w")
    count["valueQuantity"]["comparator"] = comparator
    found = facts(anc(400, id="a"), count)
    assert {(lab.source, lab.role, lab.comparator) for lab in found.labs} == {
        ("Observation/a", LabRole.ANC, None), ("Observation/w", LabRole.WBC, None)}


@pytest.mark.parametrize("report_id", ["", 7], ids=["empty", "a-number"])
def test_report_with_an_unusable_id_says_its_contained_results_are_not_read(report_id: object) -> None:
    found = facts({**_report(_inner(anc(300, id="r1"))), "id": report_id})
    assert not found.labs
    assert [(i.code, i.detail) for i in found.issues] == [("malformed-resource",
                                                          "no id: its contained results not read")]


@pytest.mark.parametrize("contained", [None, {"resourceType": "Observation", "id": "r1"}], ids=["absent", "an-object"])
def test_report_naming_contained_results_it_does_not_carry_says_so(contained: object) -> None:
    report = _report(_inner(anc(300, id="r1")))
    report["contained"] = contained
    if contained is None:
        del report["contained"]
    found = facts(report)
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101",
                                      "1 result reference(s) to '#id' match no contained Observation; not read"),)


@pytest.mark.parametrize(
    "contained",
    [None, [{"resourceType": "Specimen", "id": "s1"}], ["junk", None, 5], {"resourceType": "Observation"}],
    ids=["nothing-contained", "only-a-specimen", "junk-items", "an-object"],
)
def test_report_with_a_broken_result_but_no_contained_observation_loses_nothing(contained: object) -> None:
    # Its results, if any, are separate resources that arrive on their own: nothing of it is left unread.
    report = {k: v for k, v in _report().items() if k != "contained"}
    report["result"] = "#r1"
    if contained is not None:
        report["contained"] = contained
    assert facts(report) == facts()


@pytest.mark.parametrize(
    ("total", "kept"),
    [(63, True), (64, True), (65, False)],
    ids=["63-characters", "64-characters", "65-characters"],
)
def test_contained_result_ids_are_kept_up_to_the_64_characters_of_a_fhir_id(total: int, kept: bool) -> None:
    report_id = "r" * (total - len(".r1"))
    (lab,) = facts(_report(_inner(anc(300, id="r1")), id=report_id)).labs
    joined = f"{report_id}.r1"
    assert (lab.source == f"Observation/{joined}") is kept
    assert re.fullmatch(r"Observation/[A-Za-z0-9\-.]{1,64}", lab.source)


@pytest.mark.parametrize(
    ("effective_key", "used", "issue_code"),
    [("effectiveDateTime", True, "invalid-unread-elements"), ("effectiveInstant", True, "invalid-unread-elements"),
     ("effectivePeriod", True, "invalid-unread-elements"), ("", False, "malformed-resource")],
    ids=["date-time", "instant", "period", "no-effective"],
)
def test_issued_is_read_only_when_there_is_no_effective_time(effective_key: str, used: bool, issue_code: str) -> None:
    # A date-only "issued" is no FHIR instant. Beside an effective[x] it is never read (the result is used, the
    # element reported); as the only time it is read, so the result is malformed, not dated by an invalid element.
    found = facts(anc(400, id="i", effective_key=effective_key, issued="2025-03-10"))
    assert bool(found.labs) is used
    assert [(i.code, i.source) for i in found.issues] == [(issue_code, "Observation/i")]
    assert found.issues[0].detail is not None and found.issues[0].detail.startswith("issued")



_PER_UL = {"unit": "/uL", "system": UCUM, "code": "/uL"}


@pytest.mark.parametrize(
    ("ranges", "low"),
    [([{"high": {"value": 7500, **_PER_UL}}], None),
     ([{"high": {"value": 7500, **_PER_UL}}, {"low": {"value": 1800, **_PER_UL}}], D(1800)),
     ([{"low": _PER_UL}, {"low": {"value": 1500, **_PER_UL}}], D(1500)),
     ([{"low": {"value": 1.8, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"}}], D("1800.0")),
     ([{"low": {"value": 1800}}], D(1800)),
     ([{"low": {"value": 1.8, "unit": "furlongs"}}, {"low": {"value": 1500, **_PER_UL}}], D(1500))],
    ids=["high-only", "first-range-high-only", "first-low-without-value", "own-unit", "value-unit",
         "first-low-in-an-unknown-unit"],
)
def test_reference_range_low_is_the_first_low_with_a_value(ranges: list[dict[str, Any]], low: Decimal | None) -> None:
    (lab,) = facts(anc(1600, "/uL", referenceRange=ranges)).labs
    assert (lab.value, lab.reference_low) == (D(1600), low)


def test_issues_of_conditions_orders_and_patients_reach_the_facts() -> None:
    # service.records reports them; extraction must pass them on, or a leukaemia with a broken status, a G-CSF
    # order without a status (the R2 context) and a newborn graded on adult cut-offs would be lost without a word.
    order = {k: v for k, v in medication_request("338036", id="m").items() if k != "status"}
    found = facts(condition("165517008", clinical="actve", id="c"), order, patient("2025-02-30", id="p"))
    assert {(i.code, i.source) for i in found.issues} == {("malformed-resource", "Condition/c"),
                                                          ("malformed-resource", "MedicationRequest/m"),
                                                          ("malformed-resource", "Patient/p")}


@pytest.mark.parametrize("result", [None, "absent"], ids=["null", "absent"])
def test_report_without_results_links_nothing_and_is_no_issue(result: object) -> None:
    report = {**diagnostic_report([], id="r"), "result": result}
    if result == "absent":
        del report["result"]
    assert facts(report) == facts()


def test_observations_older_than_every_window_are_deferred_before_they_are_classified() -> None:
    # Most Observations of a large request are older than every window: they are set aside on their time alone,
    # not classified nor checked (a broken panel from last month is never read, so it is no issue either).
    old = [observation("8867-4", 80, "/min", effective=ago(days=8), id="hr"),
           vital_signs_panel([], effective=ago(days=8), id="v", component="38.6"),
           temperature(39.5, effective=ago(days=8), id="t")]
    found = facts(*old)
    assert (found.labs, found.temperatures, found.issues) == ((), (), ())
    assert sorted(item[0]["id"] for item in found.deferred) == ["hr", "t", "v"]


@pytest.mark.parametrize("subject", ["Patient/someone-else", ["Patient/p1"], {"reference": 7}],
                         ids=["a-string", "a-list", "reference-a-number"])
def test_contained_results_of_a_report_whose_subject_is_not_a_reference_are_not_read(subject: object) -> None:
    # The prefetch drops a report about another patient by its subject; one it cannot read passes, and its
    # contained ANC, which names no subject of its own, was graded as this patient's without a word.
    found = facts({**_report(_inner(anc(300, id="r1"))), "subject": subject})
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101",
                                      "subject: not a Reference; its contained results not read"),)


@pytest.mark.parametrize("subject", [None, {"display": "the patient"}, {"reference": None, "display": "x"}],
                         ids=["null", "display-only", "null-reference"])
def test_contained_results_of_a_report_with_no_subject_reference_are_read(subject: object) -> None:
    found = facts({**_report(_inner(anc(300, id="r1"))), "subject": subject})
    assert [lab.source for lab in found.labs] == ["Observation/101.r1"]
    assert found.issues == ()


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["newborn-first", "adult-first"])
def test_conflicting_birth_dates_of_one_patient_give_the_earlier_one(order: tuple[int, int]) -> None:
    # The most severe value counts: the older age, whose ANC cut-off (adult 1500/uL) is the higher one, so a
    # neutropenia is never hidden behind a newborn's lower cut-off by a contradicting copy.
    copies = [patient("2025-03-05", id="d"), patient("1970-01-01", id="d")]
    found = facts(*(copies[n] for n in order))
    assert found.birth_date == date(1970, 1, 1)


def test_report_with_a_broken_result_carrying_an_observation_among_other_resources_says_so() -> None:
    # One contained Observation among a Specimen is enough: its results cannot be told from the rest, unread.
    report = {**_report(_inner(anc(300, id="r1"))), "result": "#r1"}
    report["contained"] = [{"resourceType": "Specimen", "id": "s1"}, *report["contained"]]
    found = facts(report)
    assert not found.labs
    assert found.issues == (DataIssue("malformed-resource", "DiagnosticReport/101",
                                      "result: not a list of References; contained results it may name not read"),)


def test_a_panel_with_a_temperature_and_a_count_is_held_to_the_lab_windows() -> None:
    # A lab result beside a temperature is still a lab result: two days old, its ANC is current (7-day window)
    # though the temperature window (24 h) is over.
    panel = observation(None, id="mixed", effective=ago(days=2),
                        components=[component("8310-5", 38.6, "Cel"), component("751-8", 400, "/uL")])
    found = facts(panel)
    assert [(lab.source, lab.value) for lab in found.labs] == [("Observation/mixed", D(400))]
