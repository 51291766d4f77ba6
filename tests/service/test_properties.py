"""Property tests: order, units, noise and retracted duplicates never change the result; lower ANC or higher
temperature never lowers the urgency; no input makes ``assess`` raise."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.assessment import Assessment, assess, assessment_extension
from service.rules import INDICATOR, URGENCY
from tests.service.factories import (
    ATC,
    ICD10CM,
    NOW,
    RXNORM,
    SNOMED,
    ago,
    anc,
    condition,
    medication_request,
    observation,
    patient,
    percent,
    temperature,
    wbc,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONDITION_CODES = [("425229001", SNOMED), ("D70.1", ICD10CM), ("306058006", SNOMED), ("47318007", SNOMED),
                   ("38341003", SNOMED), ("E61.0", ICD10CM)]
MEDICATION_CODES = [("338036", RXNORM), ("L03AA02", ATC), ("3002", RXNORM), ("2626", RXNORM), ("6809", RXNORM)]
minutes_ago = st.integers(min_value=0, max_value=60 * 24 * 9)
celsius_values = st.integers(min_value=3550, max_value=4100).map(lambda v: Decimal(v) / 100)


@st.composite
def scenarios(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A patient's resources: ANCs, a CBC with differential, temperatures, conditions, medicines, a birth date."""
    resources: list[dict[str, Any]] = []
    statuses = st.sampled_from(["final", "amended", "corrected", "preliminary"])
    for i in range(draw(st.integers(0, 3))):
        resources.append(anc(draw(st.integers(0, 4000)), "/uL", ago(minutes=draw(minutes_ago)), id=f"anc{i}",
                             status=draw(statuses)))
    if draw(st.booleans()):
        when = ago(minutes=draw(minutes_ago))
        resources += [wbc(draw(st.integers(0, 9000)), "/uL", when, id="wbc"),
                      percent("769-0", draw(st.integers(0, 80)), when, id="segs"),
                      percent("764-1", draw(st.integers(0, 20)), when, id="bands")]
    for i in range(draw(st.integers(0, 4))):
        resources.append(temperature(draw(celsius_values), "Cel", ago(minutes=draw(st.integers(0, 60 * 30))),
                                     id=f"t{i}", status=draw(statuses)))
    for i, (code, system) in enumerate(draw(st.lists(st.sampled_from(CONDITION_CODES), max_size=2))):
        resources.append(condition(code, system, id=f"c{i}"))
    for i, (code, system) in enumerate(draw(st.lists(st.sampled_from(MEDICATION_CODES), max_size=2))):
        status = draw(st.sampled_from(["active", "completed"]))
        resources.append(medication_request(code, system, id=f"m{i}", status=status,
                                            authored=ago(days=draw(st.integers(0, 30)))))
    if draw(st.booleans()):
        resources.append(patient(draw(st.sampled_from(["1950-01-01", "2024-12-01", "2025-03-07"]))))
    return resources


def urgency(result: Assessment) -> int:
    return max((URGENCY[INDICATOR[f]] for f in result.findings), default=0)


def same(a: Assessment, b: Assessment) -> bool:
    return a == b and assessment_extension(a) == assessment_extension(b)


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_order_does_not_matter(resources: list[dict[str, Any]], random: Any) -> None:
    shuffled = list(resources)
    random.shuffle(shuffled)
    assert same(assess(resources, now=NOW), assess(shuffled, now=NOW))


def reexpressed(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same resources with counts in 10*9/L instead of /uL and temperatures in [degF] instead of Cel."""
    result = copy.deepcopy(resources)
    for resource in result:
        quantity = resource.get("valueQuantity")
        if not quantity:
            continue
        value = Decimal(repr(quantity["value"])) if isinstance(quantity["value"], float) else Decimal(quantity["value"])
        if quantity.get("code") == "/uL":
            quantity.update(value=float(value / 1000), unit="10*9/L", code="10*9/L")
        elif quantity.get("code") == "Cel":
            quantity.update(value=float(value * 9 / 5 + 32), unit="[degF]", code="[degF]")
    return result


@PROPERTY
@given(scenarios())
def test_units_do_not_matter(resources: list[dict[str, Any]]) -> None:
    assert same(assess(resources, now=NOW), assess(reexpressed(resources), now=NOW))


NOISE = [
    {"resourceType": "Encounter", "id": "e1", "status": "finished"},
    observation("8867-4", 80, "/min", ago(minutes=5), id="hr"),
    observation("718-7", 12, "g/dL", ago(hours=1), id="hb"),
    condition("38341003", id="htn"),
    medication_request("6809", id="metformin"),
    {"resourceType": "Observation", "id": "junk", "status": "final"},
    {"not": "a resource"},
    temperature("40", "Cel", ago(hours=30), id="old-fever"),
    anc(100, "/uL", ago(minutes=-60), id="future"),
]


@PROPERTY
@given(scenarios(), st.lists(st.sampled_from(NOISE), max_size=5))
def test_irrelevant_resources_do_not_matter(resources: list[dict[str, Any]], noise: list[dict[str, Any]]) -> None:
    baseline = assess(resources, now=NOW)
    noisy = assess(resources + copy.deepcopy(noise), now=NOW)
    # a future-dated result is reported as a data issue but never used
    assert noisy.findings == baseline.findings
    assert (noisy.anc, noisy.fever, noisy.anc_trend, noisy.risk_factors, noisy.medications) == (
        baseline.anc, baseline.fever, baseline.anc_trend, baseline.risk_factors, baseline.medications)
    assert {i for i in noisy.data_issues if i.code != "future-dated"} == set(baseline.data_issues)


def retracted(resource: dict[str, Any], index: int) -> dict[str, Any]:
    """A copy of ``resource`` under a new id, marked entered-in-error."""
    duplicate = copy.deepcopy(resource)
    duplicate["id"] = f"eie{index}"
    if duplicate["resourceType"] == "Condition":
        duplicate["verificationStatus"]["coding"][0]["code"] = "entered-in-error"
    elif duplicate["resourceType"] in ("Observation", "MedicationRequest"):
        duplicate["status"] = "entered-in-error"
    if "valueQuantity" in duplicate:
        duplicate["valueQuantity"]["value"] = 0  # a wrong value, retracted
    return duplicate


@PROPERTY
@given(scenarios())
def test_entered_in_error_duplicates_do_not_matter(resources: list[dict[str, Any]]) -> None:
    duplicates = [retracted(r, i) for i, r in enumerate(resources) if r["resourceType"] != "Patient"]
    assert same(assess(resources, now=NOW), assess(resources + duplicates, now=NOW))


@PROPERTY
@given(scenarios(), st.integers(0, 4000), st.integers(0, 4000), st.sampled_from(["/uL", "10*9/L"]))
def test_lower_anc_never_lowers_urgency(resources: list[dict[str, Any]], a: int, b: int, unit: str) -> None:
    low, high = sorted((a, b))
    when = ago(minutes=1)
    # The newest ANC must be the newest result: after a later CBC, a lower earlier ANC rightly reads as a rise, not
    # a fall (R13), so urgency is not monotonic in an ANC that is not the current one.
    others = [r for r in resources
              if not r["id"].startswith("anc") and not (r["id"] in ("wbc", "segs", "bands") and
                                                        r["effectiveDateTime"] >= when)]

    def newest(cells: int) -> dict[str, Any]:
        value = Decimal(cells) / 1000 if unit == "10*9/L" else cells
        return anc(value, unit, when, id="newest")

    assert urgency(assess([*others, newest(low)], now=NOW)) >= urgency(assess([*others, newest(high)], now=NOW))


@PROPERTY
@given(scenarios(), celsius_values, celsius_values, st.sampled_from(["Cel", "[degF]"]))
def test_higher_temperature_never_lowers_urgency(
    resources: list[dict[str, Any]], a: Decimal, b: Decimal, unit: str
) -> None:
    low, high = sorted((a, b))

    def reading(value: Decimal) -> dict[str, Any]:
        return temperature(value * 9 / 5 + 32 if unit == "[degF]" else value, unit, ago(minutes=2), id="raised")

    assert urgency(assess([*resources, reading(high)], now=NOW)) >= urgency(assess([*resources, reading(low)], now=NOW))


FHIR_KEYS = ["resourceType", "id", "status", "code", "coding", "system", "valueQuantity", "value", "unit",
             "comparator", "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued", "component",
             "specimen", "reference", "hasMember", "result", "clinicalStatus", "verificationStatus",
             "medicationCodeableConcept", "medicationReference", "contained", "authoredOn", "birthDate", "entry",
             "resource", "meta", "versionId", "lastUpdated", "referenceRange", "low", "dosageInstruction", "timing",
             "repeat", "boundsPeriod", "event", "abatementDateTime", "doNotPerform", "start", "end", "valueString"]
FHIR_STRINGS = ["Observation", "Condition", "MedicationRequest", "Patient", "DiagnosticReport", "Medication",
                "Bundle", "final", "preliminary", "entered-in-error", "active", "completed", "http://loinc.org",
                SNOMED, RXNORM, ATC, "751-8", "6690-2", "770-8", "71676-1", "8310-5", "425229001", "338036",
                "L01XA01", "Cel", "[degF]", "10*9/L", "/uL", "%", "<", ">=", "2025-03-10T11:00:00Z", "2025-03-10",
                "2025", "Observation/a", "#m", "Medication/m", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z",
                "0001-01-01", "1e30"]
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
          | st.sampled_from(FHIR_STRINGS) | st.decimals(allow_nan=True))
json_like = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FHIR_KEYS) | st.text(max_size=5), children, max_size=6),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_like, max_size=6))
def test_messy_input_never_raises(resources: list[Any]) -> None:
    assessment_extension(assess(resources, now=NOW))


def _containers(value: Any, found: list[Any]) -> list[Any]:
    """Every dict and list inside ``value``, itself included."""
    if isinstance(value, (dict, list)):
        found.append(value)
        for item in value.values() if isinstance(value, dict) else value:
            _containers(item, found)
    return found


@PROPERTY
@given(scenarios(), st.data())
def test_damaged_resources_never_raise(resources: list[dict[str, Any]], data: st.DataObject) -> None:
    damaged = copy.deepcopy(resources)
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from(_containers(damaged, [])))
        if isinstance(target, dict) and target:
            target[data.draw(st.sampled_from(sorted(target)))] = data.draw(json_like)
        elif isinstance(target, list) and target:
            target[data.draw(st.integers(0, len(target) - 1))] = data.draw(json_like)
    assessment_extension(assess(damaged, now=NOW))


@st.composite
def draws_with_broken_parts(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A scenario plus full blood counts (ANC, WBC, neutrophil %) of one time each, some parts not valid FHIR."""
    resources = draw(scenarios())
    for i in range(draw(st.integers(1, 3))):
        when = ago(minutes=draw(minutes_ago))
        draw_resources = [anc(draw(st.integers(0, 4000)), "/uL", when, id=f"cbc{i}-anc"),
                          wbc(draw(st.integers(0, 9000)), "/uL", when, id=f"cbc{i}-wbc"),
                          percent("770-8", draw(st.integers(0, 90)), when, id=f"cbc{i}-pct")]
        for resource in draw_resources:
            if draw(st.booleans()):
                resource["implicitRules"] = 123  # fhir.resources refuses it (a uri), and the rules read it
        resources += draw_resources
    return resources


@PROPERTY
@given(draws_with_broken_parts())
def test_parts_left_unvalidated_beside_a_measured_anc_never_change_the_result(
    resources: list[dict[str, Any]]
) -> None:
    from unittest import mock

    from service.extract import _Collector

    def validate_every_part(collector: _Collector) -> None:
        for pending in collector.components:
            collector._read(pending, validate=True)
        collector.components.clear()

    lazy = assess(resources, now=NOW)
    with mock.patch.object(_Collector, "_read_components", validate_every_part):
        strict = assess(resources, now=NOW)
    assert (lazy.findings, lazy.anc, lazy.anc_trend, lazy.fever) == (strict.findings, strict.anc, strict.anc_trend,
                                                                   strict.fever)
    # The only difference: parts that were not read are not reported as malformed.
    assert set(lazy.data_issues) <= set(strict.data_issues)
    assert {i.code for i in set(strict.data_issues) - set(lazy.data_issues)} <= {"malformed-resource"}
