"""Property tests: order, units, noise and retracted duplicates never change the result; lower ANC or higher
temperature never lowers the urgency; no input makes ``assess`` raise.

Over richer charts (ages, count units, CBCs in DiagnosticReports, Cel/[degF], risk factors, orders), rendered to
cards: another temperature, a higher one, a risk factor or an order never lowers the most urgent card (a reading
< 38.0 C may end a sustained run, brief §0); a current ANC bounds it; Bundles, zones, statuses, older versions and
irrelevant resources change nothing; every card agrees with its findings (design.md §3 card kinds). An order or a
condition the rules use with a member of the wrong JSON type is never dropped without a data issue; nor is a
temperature (single, in a vital-signs panel, contained in a report), an ANC, a computed count or a birth date, and a
null member of those reads as the member left out."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.assessment import DEFAULT_POLICY, Assessment, Finding, assess, assessment_extension, rfc3339
from service.cards import render
from service.fever import SUSTAINED
from service.fhir import source_of
from service.records import condition_fact, medication_facts
from service.rules import INDICATOR, URGENCY
from tests.service.factories import (
    ATC,
    BANDS_PCT,
    BODY_TEMPERATURE,
    ICD10CM,
    NEUTROPHILS_PCT,
    NOW,
    RXNORM,
    SEGS_PCT,
    SNOMED,
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


# -- Urgency monotonicity over richer charts: ages, units, differentials, both temperature units, cards ----------


QUICK = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: (unit, factor from cells/uL to the unit's value, whether the unit goes in Quantity.code)
COUNT_UNITS = [("/uL", Decimal(1), True), ("10*9/L", Decimal("0.001"), True), ("10*3/uL", Decimal("0.001"), True),
               ("K/uL", Decimal("0.001"), False), ("cells/mm3", Decimal(1), False)]
RISK_CONDITIONS = [("306058006", SNOMED), ("93143009", SNOMED), ("69896004", SNOMED), ("86406008", SNOMED),
                   ("425229001", SNOMED), ("D70.1", ICD10CM), ("234336002", SNOMED), ("47318007", SNOMED)]
GCSF_ORDERS = [("L03AA02", ATC), ("L03AA13", ATC), ("68442", RXNORM), ("338036", RXNORM)]
CHEMO_ORDERS = [("3002", RXNORM), ("56946", RXNORM), ("40048", RXNORM)]
BIRTH_DATES = ["1950-01-01", "1990-06-15", "2020-01-01", "2024-09-01", "2025-03-07"]  # adult, child, infant, newborn
chart_minutes = (st.integers(min_value=0, max_value=60 * 24 * 10)  # inside and outside the 7-day window
                 | st.sampled_from([60 * 24 * 7 - 1, 60 * 24 * 7, 60 * 24 * 7 + 1]))
temperature_minutes = (st.integers(min_value=0, max_value=60 * 30)  # inside and outside the 24-hour window
                       | st.sampled_from([60 * 24 - 1, 60 * 24, 60 * 24 + 1]))
chart_celsius = (st.integers(min_value=3600, max_value=4050).map(lambda v: Decimal(v) / 100)
                 | st.sampled_from(["37.99", "38.0", "38.01", "38.2", "38.29", "38.3"]).map(Decimal))
anc_cells = st.integers(0, 4000) | st.sampled_from([99, 100, 499, 500, 999, 1000, 1499, 1500, 2000])


def count(cells: int | Decimal, unit: tuple[str, Decimal, bool]) -> tuple[float, str, bool]:
    name, factor, ucum = unit
    return float(Decimal(cells) * factor), name, ucum


def reading(celsius: Decimal, unit: str, when: str, **kw: Any) -> dict[str, Any]:
    """A temperature of ``celsius`` in ``unit``, its °F value exact to 2 decimals of °C after rounding."""
    value = celsius * 9 / 5 + 32 if unit == "[degF]" else celsius
    return temperature(value, unit, when, **kw)


@st.composite
def charts(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A chart: ANCs and CBCs with differential in several units, temperatures in Cel/[degF], risk factors, orders."""
    resources: list[dict[str, Any]] = []
    statuses = st.sampled_from(["final", "final", "amended", "preliminary"])
    for i in range(draw(st.integers(0, 3))):
        value, unit, ucum = count(draw(anc_cells), draw(st.sampled_from(COUNT_UNITS)))
        resources.append(anc(value, unit, ago(minutes=draw(chart_minutes)), id=f"anc{i}", ucum=ucum,
                             status=draw(statuses)))
    for i in range(draw(st.integers(0, 2))):
        minutes = draw(chart_minutes)
        # the differential at the WBC's time, or at another time but reported with it in one DiagnosticReport
        report = draw(st.booleans())
        later = ago(minutes=minutes - draw(st.integers(1, 30))) if report else ago(minutes=minutes)
        value, unit, ucum = count(draw(st.integers(0, 9000)), draw(st.sampled_from(COUNT_UNITS)))
        cbc = [wbc(value, unit, ago(minutes=minutes), id=f"wbc{i}", ucum=ucum)]
        if draw(st.booleans()):
            cbc.append(percent("770-8", draw(st.integers(0, 90)), later, id=f"pct{i}"))
        else:
            cbc += [percent("769-0", draw(st.integers(0, 80)), later, id=f"segs{i}"),
                    percent("764-1", draw(st.integers(0, 20)), later, id=f"bands{i}")]
        resources += cbc
        if report:
            resources.append(diagnostic_report(cbc, id=f"dr{i}"))
    if draw(st.booleans()):  # a run of readings 38.0-38.29 °C, some spanning 60 minutes or more
        start = draw(st.integers(0, 60 * 26))
        for i in range(draw(st.integers(2, 4))):
            resources.append(reading(draw(st.integers(3800, 3829).map(lambda v: Decimal(v) / 100)),
                                     draw(st.sampled_from(["Cel", "[degF]"])), ago(minutes=start), id=f"run{i}"))
            start += draw(st.integers(10, 45))
    for i in range(draw(st.integers(0, 4))):
        resources.append(reading(draw(chart_celsius), draw(st.sampled_from(["Cel", "[degF]"])),
                                 ago(minutes=draw(temperature_minutes)), id=f"t{i}", status=draw(statuses)))
    for i, (code, system) in enumerate(draw(st.lists(st.sampled_from(RISK_CONDITIONS), max_size=2))):
        resources.append(condition(code, system, id=f"c{i}"))
    for i, (code, system) in enumerate(draw(st.lists(st.sampled_from(GCSF_ORDERS + CHEMO_ORDERS), max_size=2))):
        resources.append(medication_request(code, system, id=f"m{i}",
                                            status=draw(st.sampled_from(["active", "completed", "stopped"])),
                                            authored=ago(days=draw(st.integers(0, 30)))))
    if draw(st.booleans()):
        resources.append(patient(draw(st.sampled_from(BIRTH_DATES))))
    return resources


def card_urgency(result: Assessment) -> int:
    """The most urgent card's indicator: critical 3, warning 2, info 1, no card 0."""
    return max((card.indicator.rank + 1 for card in render(result)), default=0)


def indicators(result: Assessment) -> list[tuple[str | None, str]]:
    return sorted((card.kind, card.indicator.value) for card in render(result))


@QUICK
@given(charts(), chart_celsius, st.sampled_from(["Cel", "[degF]"]), temperature_minutes, st.data())
def test_another_temperature_never_lowers_urgency_unless_it_breaks_a_run(
    resources: list[dict[str, Any]], celsius: Decimal, unit: str, minutes: int, data: st.DataObject
) -> None:
    times = sorted({r["effectiveDateTime"] for r in resources if r["id"].startswith(("t", "run"))})
    choice = data.draw(st.sampled_from(["new", "charted", "date-only"]))
    if choice == "charted" and times:
        when = data.draw(st.sampled_from(times))  # at the same instant as a charted reading
    elif choice == "date-only":
        when = ago(minutes=minutes)[:10]  # a reading timed to the day only: a single reading, never part of a run
    else:
        when = ago(minutes=minutes)
    before = assess(resources, now=NOW)
    after = assess([*resources, reading(celsius, unit, when, id="added")], now=NOW)
    if celsius < Decimal("38.0") and before.fever is not None and before.fever.criterion == SUSTAINED:
        # brief §0: a reading < 38.0 °C between the first and last of a run ends it; only then may urgency fall.
        # One at the same instant as a reading of the run counts as one reading, the highest: it breaks nothing.
        assert after.fever is not None and after.fever.criterion in (SUSTAINED, "none")
        assert before.fever.since is not None
        inside = rfc3339(before.fever.since) < when < rfc3339(before.fever.effective)
        if not inside and len(when) > 10:
            assert after.fever.criterion == SUSTAINED, (when, before.fever)
        return
    assert card_urgency(after) >= card_urgency(before)
    assert urgency(after) >= urgency(before)
    if celsius >= Decimal("38.3") and when >= ago(hours=24):
        assert after.fever is not None and after.fever.criterion != "none"


@QUICK
@given(charts(), st.data())
def test_raising_a_charted_temperature_never_lowers_urgency(resources: list[dict[str, Any]],
                                                            data: st.DataObject) -> None:
    readings = [r for r in resources if r["id"].startswith(("t", "run"))]
    if not readings:
        return
    target = data.draw(st.sampled_from(readings))
    raised = copy.deepcopy(resources)
    quantity = next(r for r in raised if r["id"] == target["id"])["valueQuantity"]
    quantity["value"] += data.draw(st.floats(min_value=0, max_value=3))
    before, after = assess(resources, now=NOW), assess(raised, now=NOW)
    assert card_urgency(after) >= card_urgency(before)
    assert urgency(after) >= urgency(before)


@QUICK
@given(charts())
def test_the_current_anc_bounds_the_urgency(resources: list[dict[str, Any]]) -> None:
    result = assess(resources, now=NOW)
    anc_now = result.anc
    if anc_now is None or anc_now.stale:
        return
    kinds = {card.kind: card.indicator.value for card in render(result)}
    if anc_now.cells_per_ul >= DEFAULT_POLICY.fn_anc_cutoff:
        # R1 needs ANC < 1000 and R2 no current ANC: a current ANC >= 1000 never gives a critical card
        assert "critical" not in kinds.values(), (anc_now, kinds)
        assert "infection-prevention" not in kinds
    if anc_now.cells_per_ul >= result.neutropenia_below:
        # R6 info, R10 no card, R15 info; R13 (warning) asks for the newest < 1500/uL whatever the age's cut-off, so
        # an infant's falling 1000-1499 may still warn
        allowed = 2 if anc_now.cells_per_ul < 1500 and Finding.ANC_FALLING in result.findings else 1
        assert card_urgency(result) <= allowed, (anc_now, kinds)


@QUICK
@given(charts(), st.sampled_from(RISK_CONDITIONS + [("G", None)]),
       st.sampled_from(GCSF_ORDERS + CHEMO_ORDERS + [("2626", RXNORM), ("9524", RXNORM)]),
       st.integers(0, 13))
def test_a_risk_factor_gcsf_chemotherapy_or_causative_order_never_lowers_urgency(
    resources: list[dict[str, Any]], risk: tuple[str, str | None], gcsf: tuple[str, str], days: int
) -> None:
    before = assess(resources, now=NOW)
    code, system = risk
    if system is None:
        added = medication_request(*gcsf, id="added", status=("active", "on-hold", "completed")[days % 3],
                                   authored=ago(days=days))
    else:
        added = condition(code, system, id="added", clinical=("active", "recurrence", "relapse")[days % 3],
                          verification=("confirmed", "provisional", None)[days // 3 % 3])
    after = assess([*resources, added], now=NOW)
    assert card_urgency(after) >= card_urgency(before)
    assert urgency(after) >= urgency(before)


IRRELEVANT = [
    condition("38341003", id="x-htn"),  # hypertension: in no table
    condition("44054006", id="x-diabetes"),
    condition("306058006", clinical="resolved", id="x-resolved"),
    condition("425229001", verification="refuted", id="x-refuted"),
    condition("93143009", clinical="inactive", id="x-inactive"),
    observation("2345-7", 110, "mg/dL", ago(hours=1), id="x-glucose"),
    observation("751-8", 100, "/uL", ago(hours=1), id="x-othersystem", system="http://example.org/local"),
    anc(50, "/uL", ago(hours=1), id="x-cancelled", status="cancelled"),
    anc(50, "/uL", ago(hours=1), id="x-eie", status="entered-in-error"),
    temperature("40.1", "Cel", ago(hours=1), id="x-registered", status="registered"),
    temperature("104", "[degF]", ago(hours=2), id="x-eie-temp", status="entered-in-error"),
    temperature("40.1", "Cel", ago(hours=25), id="x-old-temp"),
    medication_request("L03AA02", ATC, id="x-eie-gcsf", status="entered-in-error"),
    medication_request("3002", RXNORM, id="x-cancelled-chemo", status="cancelled"),
    medication_request("6809", RXNORM, id="x-metformin"),
    condition("93143009", ICD10CM, id="x-wrong-system"),  # a SNOMED leukaemia code under ICD-10-CM: no match
    condition("425229001", "http://example.org/local", id="x-local"),
    medication_request("L03AA02", "http://example.org/local", id="x-local-gcsf"),
    temperature("40.1", "Cel", ago(hours=1), id="x-unknown", status="unknown"),
    temperature(None, None, ago(hours=1), id="x-absent", dataAbsentReason={"text": "refused"}),
    anc(None, None, ago(hours=1), id="x-absent-anc", dataAbsentReason={"text": "clotted"}),
    medication_request("L03AA02", ATC, id="x-gcsf-old", status="completed", authored=ago(days=40)),
    {"resourceType": "Procedure", "id": "x-proc", "status": "completed"},
]


@QUICK
@given(charts(), st.lists(st.sampled_from(IRRELEVANT), max_size=4, unique_by=lambda r: r["id"]))
def test_an_irrelevant_resource_never_changes_findings(resources: list[dict[str, Any]],
                                                        noise: list[dict[str, Any]]) -> None:
    before = assess(resources, now=NOW)
    after = assess([*resources, *copy.deepcopy(noise)], now=NOW)
    assert after.findings == before.findings
    assert (after.anc, after.fever, after.risk_factors, after.chemotherapy_context) == (
        before.anc, before.fever, before.risk_factors, before.chemotherapy_context)
    assert indicators(after) == indicators(before)


@QUICK
@given(charts(), st.randoms(use_true_random=False), st.integers(1, 4), st.booleans())
def test_order_and_bundles_never_change_findings_or_cards(
    resources: list[dict[str, Any]], random: Any, parts: int, nest: bool
) -> None:
    shuffled = copy.deepcopy(resources)
    random.shuffle(shuffled)
    groups: list[list[dict[str, Any]]] = [[] for _ in range(parts)]
    for resource in shuffled:
        groups[random.randrange(parts)].append(resource)
        if random.random() < 0.2:  # the same resource again, under another prefetch key
            groups[random.randrange(parts)].append(copy.deepcopy(resource))
    bundles: list[dict[str, Any]] = [bundle(group) for group in groups]
    if nest and bundles:
        bundles = [bundle(bundles)]
    before, after = assess(resources, now=NOW), assess(bundles, now=NOW)
    assert after.findings == before.findings
    assert (after.anc, after.fever, after.anc_trend) == (before.anc, before.fever, before.anc_trend)
    assert indicators(after) == indicators(before)


#: The card kind each finding belongs to and the indicator that card must at least show (design.md §3, brief §4).
FINDING_CARDS = {
    "febrile-neutropenia": ("febrile-neutropenia", "critical"),
    "presumed-febrile-neutropenia": ("febrile-neutropenia", "critical"),
    "temperature-elevated": ("fever-escalation", "warning"),
    "fever-mild-neutropenia": ("fever-escalation", "warning"),
    "fever-no-anc": ("fever-escalation", "warning"),
    "fever-normal-anc": ("fever-escalation", "info"),
    "neutropenia-severe": ("neutropenia", "warning"),
    "neutropenia-profound": ("neutropenia", "warning"),
    "neutropenia-moderate": ("neutropenia", "warning"),
    "neutropenia-mild": ("neutropenia", "info"),
    "anc-falling": ("neutropenia", "warning"),
    "medication-review": ("medication-review", "info"),
    "anc-stale": ("lab-follow-up", "info"),
    "risk-factor-no-anc": ("lab-follow-up", "info"),
    "anc-uninterpretable": ("data-quality", "info"),
    "anc-not-computable": ("data-quality", "info"),
}
RANK = {"info": 1, "warning": 2, "critical": 3}


@QUICK
@given(charts())
def test_cards_agree_with_findings(resources: list[dict[str, Any]]) -> None:
    result = assess(resources, now=NOW)
    cards = render(result)
    kinds = [card.kind for card in cards]
    assert len(kinds) == len(set(kinds)), kinds  # at most one card per kind
    shown = {card.kind: card.indicator.value for card in cards}
    codes = {finding.value for finding in result.findings}
    critical = {"febrile-neutropenia", "presumed-febrile-neutropenia"} & codes
    assert bool(critical) == ("critical" in shown.values()), (codes, shown)
    if critical:
        assert shown.get("febrile-neutropenia") == "critical"
        assert shown.get("infection-prevention") == "critical"
    for code in codes - {"anc-normal"}:
        kind, least = FINDING_CARDS[code]
        suppressed = (kind == "neutropenia" and "febrile-neutropenia" in shown) or (
            kind == "lab-follow-up" and codes & {"presumed-febrile-neutropenia", "fever-no-anc"})
        if not suppressed:
            assert kind in shown, (code, shown)
    for card_kind, indicator in shown.items():
        # a card shows the indicator of the most urgent finding of its kind (the add-on follows its parent)
        mine = [RANK[least] for code, (k, least) in FINDING_CARDS.items() if k == card_kind and code in codes]
        if mine:
            assert RANK[indicator] == max(mine), (card_kind, indicator, codes)
    if not codes - {"anc-normal"} and not result.data_issues:
        assert cards == []


@QUICK
@given(charts(), st.decimals(min_value=Decimal("95"), max_value=Decimal("106"), places=3), temperature_minutes)
def test_fahrenheit_is_rounded_celsius(resources: list[dict[str, Any]], fahrenheit: Decimal, minutes: int) -> None:
    """Brief §0: °F is converted to °C and rounded to 2 decimals before any comparison."""
    celsius = ((fahrenheit - 32) * 5 / 9).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    when = ago(minutes=minutes)
    in_f = assess([*resources, temperature(fahrenheit, "[degF]", when, id="added")], now=NOW)
    in_c = assess([*resources, temperature(celsius, "Cel", when, id="added")], now=NOW)
    assert in_f.findings == in_c.findings
    assert in_f.fever == in_c.fever


@QUICK
@given(charts(), st.integers(0, 9000), st.integers(0, 9000), st.integers(0, 90), st.sampled_from(COUNT_UNITS))
def test_a_higher_wbc_in_the_newest_cbc_never_raises_urgency(
    resources: list[dict[str, Any]], a: int, b: int, pct: int, unit: tuple[str, Decimal, bool]
) -> None:
    low, high = sorted((a, b))
    when = ago(minutes=1)
    others = [r for r in resources if not r["id"].startswith(("anc", "wbc", "pct", "segs", "bands", "dr"))]

    def cbc(cells: int) -> list[dict[str, Any]]:
        value, name, ucum = count(cells, unit)
        return [wbc(value, name, when, id="new-wbc", ucum=ucum), percent("770-8", pct, when, id="new-pct")]

    assert card_urgency(assess([*others, *cbc(high)], now=NOW)) <= card_urgency(assess([*others, *cbc(low)], now=NOW))


@QUICK
@given(charts(), st.data())
def test_a_preliminary_or_amended_status_never_changes_findings(resources: list[dict[str, Any]],
                                                               data: st.DataObject) -> None:
    """Brief §2: preliminary results are used (and flagged), never suppressing an alert; amended/corrected count."""
    changed = copy.deepcopy(resources)
    for resource in changed:
        if resource["resourceType"] == "Observation":
            resource["status"] = data.draw(st.sampled_from(["final", "amended", "corrected", "preliminary"]))
    before, after = assess(resources, now=NOW), assess(changed, now=NOW)
    assert after.findings == before.findings
    assert indicators(after) == indicators(before)


def moved(moment: str, hours: int, minutes: int) -> str:
    """``moment`` (a UTC RFC 3339 string) written in the zone +hours:minutes (negative: west), the same instant."""
    zone = timezone(timedelta(hours=hours, minutes=minutes if hours >= 0 else -minutes))
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).astimezone(zone).isoformat()


@QUICK
@given(charts(), st.data())
def test_the_same_instant_written_otherwise_never_changes_findings(resources: list[dict[str, Any]],
                                                                   data: st.DataObject) -> None:
    """A time in another zone, or as effectiveInstant / a zero-length effectivePeriod, is the same time."""
    changed = copy.deepcopy(resources)
    for resource in changed:
        when = resource.get("effectiveDateTime")
        if when is None:
            continue
        when = moved(when, data.draw(st.integers(-11, 13)), data.draw(st.sampled_from([0, 30, 45])))  # valid zones
        key = data.draw(st.sampled_from(["effectiveDateTime", "effectiveInstant", "effectivePeriod"]))
        del resource["effectiveDateTime"]
        resource[key] = {"start": when, "end": when} if key == "effectivePeriod" else when
    before, after = assess(resources, now=NOW), assess(changed, now=NOW)
    assert after.findings == before.findings
    assert (after.anc, after.fever, after.anc_trend) == (before.anc, before.fever, before.anc_trend)
    assert indicators(after) == indicators(before)


@QUICK
@given(charts(), st.integers(1, 4000), st.sampled_from(["<", "<="]))
def test_a_less_than_anc_is_at_least_as_urgent_as_its_bound(resources: list[dict[str, Any]], bound: int,
                                                            comparator: str) -> None:
    others = [r for r in resources if not r["id"].startswith(("anc", "wbc", "pct", "segs", "bands", "dr"))]
    exact = assess([*others, anc(bound, "/uL", ago(minutes=1), id="new")], now=NOW)
    below = assess([*others, anc(bound, "/uL", ago(minutes=1), id="new", comparator=comparator)], now=NOW)
    assert card_urgency(below) >= card_urgency(exact)
    assert urgency(below) >= urgency(exact)


@QUICK
@given(charts(), st.data())
def test_an_older_version_of_a_resource_never_changes_findings(resources: list[dict[str, Any]],
                                                               data: st.DataObject) -> None:
    """The newest version of a resource that arrives twice is the one read (meta.versionId / lastUpdated)."""
    current = copy.deepcopy(resources)
    for resource in current:
        resource["meta"] = {"versionId": "2", "lastUpdated": "2025-03-10T11:00:00Z"}
    older = []
    chosen = st.lists(st.sampled_from(current), max_size=4, unique_by=lambda r: r["id"]) if current else st.just([])
    for resource in data.draw(chosen):
        version = copy.deepcopy(resource)
        version["meta"] = {"versionId": "1", "lastUpdated": "2025-03-01T11:00:00Z"}
        if "valueQuantity" in version:
            version["valueQuantity"]["value"] = data.draw(st.integers(0, 45))
        if version["resourceType"] == "Condition":
            version["clinicalStatus"]["coding"][0]["code"] = "resolved"
        older.append(version)
    mixed = [*older, *current]
    data.draw(st.randoms(use_true_random=False)).shuffle(mixed)
    before, after = assess(current, now=NOW), assess(mixed, now=NOW)
    assert after.findings == before.findings
    assert (after.anc, after.fever, after.anc_trend) == (before.anc, before.fever, before.anc_trend)
    assert indicators(after) == indicators(before)


#: A JSON value of another type than the member holds, by the member's type.
WRONG_TYPE = {"string": st.sampled_from([0, -1, 1.5, True, [], ["x"], {}, {"a": 1}]),
              "object": st.sampled_from(["x", "", 0, 1.5, True, [], [{}], ["x"]]),
              "list": st.sampled_from(["x", 0, True, {}, {"a": 1}, [None], [1], ["x"]])}
ORDER_MEMBERS = {"status": "string", "authoredOn": "string", "medicationCodeableConcept": "object",
                 "dispenseRequest": "object", "dosageInstruction": "list", "subject": "object", "intent": "string",
                 "id": "string"}
#: Not ``code``: a Condition whose code cannot be read is not known to be one the rules read (like an Observation).
CONDITION_MEMBERS = {"clinicalStatus": "object", "verificationStatus": "object", "subject": "object", "id": "string",
                     "abatementDateTime": "string", "onsetDateTime": "string", "category": "list"}


@QUICK
@given(st.sampled_from(["active", "completed"]), st.sampled_from(sorted(ORDER_MEMBERS)), st.data())
def test_an_order_the_rules_use_is_never_dropped_silently(status: str, member: str, data: st.DataObject) -> None:
    """A G-CSF order with one member of the wrong JSON type gives the same facts, or a data issue says why not.

    A status, a date or a medicine of the wrong type dropped the order without a word, and with it the R2 context.
    """
    order = medication_request("338036", status=status, id="m", authored=ago(days=3),
                               dispenseRequest={"validityPeriod": {"end": ago(days=2)}},
                               dosageInstruction=[{"timing": {"event": [ago(days=3)]}}])
    before, _ = medication_facts(order, {})
    assert before
    after, issue = medication_facts({**order, member: data.draw(WRONG_TYPE[ORDER_MEMBERS[member]])}, {})
    assert after == before or issue is not None


@QUICK
@given(st.sampled_from(sorted(CONDITION_MEMBERS)), st.data())
def test_a_condition_the_rules_use_is_never_dropped_silently(member: str, data: st.DataObject) -> None:
    """A leukaemia with one member of the wrong JSON type gives the same fact, or a data issue says why not."""
    leukaemia = condition("91861009", id="n")
    before, _ = condition_fact(leukaemia)
    assert before is not None
    after, issue = condition_fact({**leukaemia, member: data.draw(WRONG_TYPE[CONDITION_MEMBERS[member]])})
    assert after == before or issue is not None


def _charts() -> dict[str, tuple[list[dict[str, Any]], int, tuple[Any, ...]]]:
    """Charts whose findings an Observation or the Patient decides: (resources, the one mutated, path to it)."""
    at = ago(hours=1)
    contained = {k: v for k, v in temperature(38.6, effective=at, id="c").items() if k != "subject"}
    report = {"resourceType": "DiagnosticReport", "id": "r", "status": "final", "code": {"text": "vitals"},
              "subject": {"reference": "Patient/p1"}, "contained": [contained], "result": [{"reference": "#c"}]}
    count: dict[str, Any] = {"specimen": "Specimen/s", "hasMember": [{"reference": "Observation/z"}]}
    return {
        "temperature": ([patient(), temperature(38.6, effective=at, id="t", **count)], 1, ()),
        "panel": ([patient(), vital_signs_panel([component(BODY_TEMPERATURE, 38.6, "Cel"),
                                                 component("8867-4", 80, "/min")], effective=at, id="v")], 1,
                  ("component", 0)),
        "report": ([patient(), report], 1, ("contained", 0)),
        "anc": ([patient(), anc(400, effective=at, id="a", reference_low=1500, comparator="<", **count)], 1, ()),
        "wbc": ([patient(), wbc(1.0, effective=at, id="w", **count), percent(NEUTROPHILS_PCT, 40, at, id="n")], 1,
                ()),
        "bands": ([patient(), wbc(1.0, effective=at, id="w"), percent(SEGS_PCT, 30, at, id="s"),
                   percent(BANDS_PCT, 10, at, id="b")], 3, ()),
        "infant": ([patient(ago(days=20)[:10]), anc(1200, effective=at, id="a")], 0, ()),
    }


CHARTS = _charts()
WRONG_TYPE["number"] = st.sampled_from(["x", "400", True, [], [1], {}, {"a": 1}])
#: Not ``code``: an Observation whose code cannot be read is not known to be one the rules read.
OBSERVATION_MEMBERS: dict[tuple[str, ...], str] = {
    ("status",): "string", ("effectiveDateTime",): "string", ("issued",): "string", ("id",): "string",
    ("subject",): "object", ("specimen",): "object", ("hasMember",): "list", ("referenceRange",): "list",
    ("component",): "list", ("valueQuantity",): "object", ("valueQuantity", "value"): "number",
    ("valueQuantity", "unit"): "string", ("valueQuantity", "system"): "string", ("valueQuantity", "code"): "string",
    ("valueQuantity", "comparator"): "string"}
PATIENT_MEMBERS: dict[tuple[str, ...], str] = {("birthDate",): "string", ("id",): "string"}


def _mutated(resources: list[dict[str, Any]], index: int, path: tuple[Any, ...], value: Any,
             ) -> list[dict[str, Any]]:
    """A deep copy of ``resources`` with the member at ``path`` of resource ``index`` set to ``value`` (..., deleted
    when ``value`` is ``...``)."""
    copied = copy.deepcopy(resources)
    *parents, last = path
    holder: Any = copied[index]
    for step in parents:
        holder = holder[step]
    if value is ...:
        holder.pop(last, None)
    else:
        holder[last] = value
    return copied


def _member(chart: str, data: st.DataObject) -> tuple[list[dict[str, Any]], int, tuple[Any, ...], str]:
    resources, index, prefix = CHARTS[chart]
    members = PATIENT_MEMBERS if resources[index]["resourceType"] == "Patient" else OBSERVATION_MEMBERS
    member = data.draw(st.sampled_from(sorted(members)))
    if chart != "panel" or member[0] in ("valueQuantity", "code"):  # a panel's own members are its members
        return resources, index, prefix + member, members[member]
    return resources, index, member, members[member]


@QUICK
@given(st.sampled_from(sorted(CHARTS)), st.data())
def test_an_observation_or_patient_the_rules_use_is_never_dropped_silently(chart: str, data: st.DataObject) -> None:
    """A temperature, an ANC, a count or a birth date with one member of the wrong JSON type gives the same
    findings, or a data issue names the resource (or the report that carries it)."""
    resources, index, path, kind = _member(chart, data)
    before = assess(resources, now=NOW)
    assert not before.data_issues
    mutated = _mutated(resources, index, path, data.draw(WRONG_TYPE[kind]))
    after = assess(mutated, now=NOW)
    sources = {source_of(resources[index]), source_of(mutated[index]), "Observation/r.c"}  # r.c: the contained one
    named = {issue.source for issue in after.data_issues if issue.code != "invalid-unread-elements"}
    assert after.findings == before.findings or named & sources


@QUICK
@given(st.sampled_from(sorted(CHARTS)), st.data())
def test_a_null_member_of_an_observation_or_patient_is_absent(chart: str, data: st.DataObject) -> None:
    """A member sent as null reads as the member left out (serialisers that write every member)."""
    resources, index, path, _ = _member(chart, data)
    if isinstance(path[-1], int):
        return  # an item of a list, not a member
    null, absent = assess(_mutated(resources, index, path, None), now=NOW), assess(
        _mutated(resources, index, path, ...), now=NOW)
    assert (null.findings, null.data_issues) == (absent.findings, absent.data_issues)
