"""Card rendering: templates, finding -> card kind -> indicator, suggestions, settings (design.md §3)."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest

from cds_hooks.models import SUMMARY_MAX_CHARS, Card, Indicator, LinkType, SelectionBehavior
from service import card_text, thresholds
from service.assessment import DEFAULT_POLICY, Anc, AncPoint, Assessment, CodedRef, DataIssue, Fever, Finding, assess
from service.card_text import CARD_TEMPLATES, FINDING_KINDS
from service.cards import DEFAULT_CARD_SETTINGS, CardSettings, render
from tests.service.factories import ago, condition, medication_request, patient, temperature
from tests.service.factories import anc as anc_result

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
F = Finding
CRITICAL, WARNING, INFO = Indicator.CRITICAL, Indicator.WARNING, Indicator.INFO
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
HTML_TAG = re.compile(r"<\s*/?\s*[A-Za-z!?]")


def anc(value: str | int = 400, grade: int = 4, *, hours_ago: float = 2, **changes: Any) -> Anc:
    """An ANC observed ``hours_ago`` before NOW."""
    fields: dict[str, Any] = dict(cells_per_ul=Decimal(value), ctcae_grade=grade, method="measured",
                                  effective=NOW - timedelta(hours=hours_ago), status="final", preliminary=False,
                                  stale=False, sources=("Observation/anc-1",))
    fields.update(changes)
    return Anc(**fields)


def fever(celsius: str = "38.40", criterion: str = "single-reading", **changes: Any) -> Fever:
    """The highest temperature in the window, one hour before NOW."""
    fields: dict[str, Any] = dict(max_celsius=Decimal(celsius), criterion=criterion,
                                  effective=NOW - timedelta(hours=1), sources=("Observation/temp-1",))
    fields.update(changes)
    return Fever(**fields)


def assessment(*findings: Finding, **fields: Any) -> Assessment:
    """An assessment at NOW with ``findings`` (already most urgent first) and any other fields."""
    return Assessment(evaluated_at=NOW, findings=tuple(findings), **fields)


CLOZAPINE = CodedRef(RXNORM, "2626", "clozapine", "MedicationRequest/m1")
LEUKAEMIA = CodedRef(SNOMED, "91855006", "Acute leukemia", "Condition/c1")
STALE = anc(1200, 2, hours_ago=12 * 24, stale=True)

#: For each finding code: a realistic assessment and the cards (kind -> indicator) it must give.
SCENARIOS: list[tuple[str, Assessment, Mapping[str, Indicator]]] = [
    ("febrile-neutropenia",
     assessment(F.FEBRILE_NEUTROPENIA, F.NEUTROPENIA_SEVERE, anc=anc(400), fever=fever()),
     {"febrile-neutropenia": CRITICAL, "infection-prevention": CRITICAL}),
    ("presumed-febrile-neutropenia",
     assessment(F.PRESUMED_FEBRILE_NEUTROPENIA, fever=fever(), chemotherapy_context=True, context=(LEUKAEMIA,)),
     {"febrile-neutropenia": CRITICAL, "infection-prevention": CRITICAL}),
    ("temperature-elevated",
     assessment(F.TEMPERATURE_ELEVATED, F.NEUTROPENIA_MODERATE, anc=anc(700, 3), fever=fever("38.10", "none")),
     {"fever-escalation": WARNING, "neutropenia": WARNING, "infection-prevention": WARNING}),
    ("fever-mild-neutropenia",
     assessment(F.FEVER_MILD_NEUTROPENIA, anc=anc(1200, 2), fever=fever()),
     {"fever-escalation": WARNING}),
    ("fever-no-anc",
     assessment(F.FEVER_NO_ANC, fever=fever("39.00")),
     {"fever-escalation": WARNING}),
    ("fever-normal-anc",
     assessment(F.FEVER_NORMAL_ANC, anc=anc(4200, 0), fever=fever()),
     {"fever-escalation": INFO}),
    ("neutropenia-severe",
     assessment(F.NEUTROPENIA_SEVERE, anc=anc(300)),
     {"neutropenia": WARNING, "infection-prevention": WARNING}),
    ("neutropenia-profound",
     assessment(F.NEUTROPENIA_SEVERE, F.NEUTROPENIA_PROFOUND, anc=anc(40)),
     {"neutropenia": WARNING, "infection-prevention": WARNING}),
    ("neutropenia-moderate",
     assessment(F.NEUTROPENIA_MODERATE, anc=anc(700, 3)),
     {"neutropenia": WARNING, "infection-prevention": WARNING}),
    ("neutropenia-mild",
     assessment(F.NEUTROPENIA_MILD, anc=anc(1200, 2)),
     {"neutropenia": INFO}),
    ("anc-falling",
     assessment(F.ANC_FALLING, F.NEUTROPENIA_MILD, anc=anc(1200, 2),
                anc_trend=(AncPoint(Decimal(2100), NOW - timedelta(days=4), "Observation/a"),
                           AncPoint(Decimal(1600), NOW - timedelta(days=2), "Observation/b"),
                           AncPoint(Decimal(1200), NOW - timedelta(hours=2), "Observation/anc-1"))),
     {"neutropenia": WARNING}),
    ("anc-normal",
     assessment(F.ANC_NORMAL, anc=anc(3000, 0)),
     {}),
    ("anc-stale",
     assessment(F.ANC_STALE, anc=STALE),
     {"lab-follow-up": INFO}),
    ("risk-factor-no-anc",
     assessment(F.RISK_FACTOR_NO_ANC, risk_factors=(LEUKAEMIA,)),
     {"lab-follow-up": INFO}),
    ("medication-review",
     assessment(F.NEUTROPENIA_MILD, F.MEDICATION_REVIEW, anc=anc(1200, 2), medications=(CLOZAPINE,)),
     {"neutropenia": INFO, "medication-review": INFO}),
    ("anc-uninterpretable",
     assessment(F.ANC_UNINTERPRETABLE,
                data_issues=(DataIssue("anc-uninterpretable", "Observation/x", "no unit"),)),
     {"data-quality": INFO}),
    ("anc-not-computable",
     assessment(F.ANC_NOT_COMPUTABLE, data_issues=(DataIssue("anc-not-computable", "Observation/y", None),)),
     {"data-quality": INFO}),
]

#: Combinations: suppression, add-ons, data issues without a finding.
COMBINATIONS: list[tuple[str, Assessment, Mapping[str, Indicator]]] = [
    ("no-findings", assessment(), {}),
    ("anc-normal-with-preliminary-issue-only",
     assessment(F.ANC_NORMAL, anc=anc(3000, 0, preliminary=True, status="preliminary"),
                data_issues=(DataIssue("preliminary-result", "Observation/anc-1", None),)),
     {}),
    ("malformed-resource-only",
     assessment(data_issues=(DataIssue("malformed-resource", "Observation/bad", "invalid date"),)),
     {"data-quality": INFO}),
    ("data-unavailable-with-anc-normal",
     assessment(F.ANC_NORMAL, anc=anc(3000, 0), data_issues=(DataIssue("data-unavailable", None, "medications: timeout"),)),
     {"data-quality": INFO}),
    ("fn-suppresses-neutropenia-card",
     assessment(F.FEBRILE_NEUTROPENIA, F.NEUTROPENIA_SEVERE, F.NEUTROPENIA_PROFOUND, F.ANC_FALLING,
                F.MEDICATION_REVIEW, anc=anc(50), fever=fever(), medications=(CLOZAPINE,)),
     {"febrile-neutropenia": CRITICAL, "infection-prevention": CRITICAL, "medication-review": INFO}),
    ("presumed-fn-suppresses-stale-lab-follow-up",
     assessment(F.PRESUMED_FEBRILE_NEUTROPENIA, F.ANC_STALE, anc=STALE, fever=fever()),
     {"febrile-neutropenia": CRITICAL, "infection-prevention": CRITICAL}),
    ("fever-no-anc-suppresses-stale-lab-follow-up",
     assessment(F.FEVER_NO_ANC, F.ANC_STALE, anc=STALE, fever=fever()),
     {"fever-escalation": WARNING}),
    ("current-anc-below-cut-off-without-band-gets-prevention",  # e.g. an infant graded as mild
     assessment(F.NEUTROPENIA_MILD, anc=anc(900, 3), age_years=0),
     {"neutropenia": INFO, "infection-prevention": WARNING}),
    ("medication-review-without-listed-medicine",
     assessment(F.NEUTROPENIA_MILD, F.MEDICATION_REVIEW, anc=anc(1300, 2)),
     {"neutropenia": INFO, "medication-review": INFO}),
    ("uninterpretable-and-not-computable-share-one-card",
     assessment(F.ANC_UNINTERPRETABLE, F.ANC_NOT_COMPUTABLE,
                data_issues=(DataIssue("anc-uninterpretable", "Observation/x", "unit 'g'"),
                             DataIssue("malformed-resource", "Condition/z", None))),
     {"data-quality": INFO}),
]

ALL_FINDINGS = assessment(*Finding, anc=anc(50), fever=fever(), medications=(CLOZAPINE,),
                          risk_factors=(LEUKAEMIA,), data_issues=(DataIssue("malformed-resource", None, None),))


def kinds(cards: list[Card]) -> dict[str, Indicator]:
    return {card.kind or "": card.indicator for card in cards}


def every_card() -> list[tuple[str, Card]]:
    """Every card of every scenario, with and without suggestions."""
    out = []
    for name, a, _ in SCENARIOS + COMBINATIONS:
        for patient in (None, "p-1"):
            out += [(f"{name}/{card.kind}", card) for card in render(a, patient_id=patient)]
    return out


# -- templates ----------------------------------------------------------------------------------------------------

#: The longest values each summary field can take (ANC at the plausible maximum of 2000000/uL with every note,
#: a temperature at its plausible maximum of 45.00 °C, ...; service.thresholds).
EXTREME_FIELDS = {"anc": "at least 2000000/uL (grade 4, preliminary)", "temp": "45.00 °C",
                  "date": "2025-12-31", "days": "99999", "falling": ", falling", "count": "999",
                  "medicines": "999 active medicines", "fn_anc": "1500/uL", "normal_anc": "5000/uL"}
TEMPLATE_IDS = list(CARD_TEMPLATES)


@pytest.mark.parametrize("kind", TEMPLATE_IDS)
def test_template_summaries_fit_with_extreme_values(kind: str) -> None:
    for key, summary in CARD_TEMPLATES[kind].summaries.items():
        text = summary.format(**EXTREME_FIELDS)
        assert len(text) < 140, (key, len(text), text)


@pytest.mark.parametrize("kind", TEMPLATE_IDS)
def test_template_is_complete(kind: str) -> None:
    template = CARD_TEMPLATES[kind]
    assert template.kind == kind and template.title.strip()
    assert all(isinstance(i, Indicator) for i in template.indicators.values())
    assert set(template.advice) <= set(template.indicators)
    summary_keys = set(template.summaries)
    assert set(template.indicators) <= summary_keys  # every finding of the kind has a summary
    assert template.override_reasons and all(code and display for code, display in template.override_reasons)
    for link in template.links:
        url = getattr(DEFAULT_CARD_SETTINGS, link.setting)
        assert urlsplit(url).scheme == "https" and urlsplit(url).netloc, url


@pytest.mark.parametrize("kind", TEMPLATE_IDS)
def test_template_text_has_no_html_and_one_unit_spelling(kind: str) -> None:
    template = CARD_TEMPLATES[kind]
    texts = [*template.summaries.values(), *template.advice.values(), template.common]
    for text in texts:
        assert "<" not in text and ">" not in text, text
        assert "µL" not in text and "mm3" not in text and "microl" not in text.lower(), text
        text.format(**EXTREME_FIELDS)  # every field a template names exists


def test_findings_map_to_known_kinds() -> None:
    """Every finding code has a card kind, except anc-normal (R10: no card)."""
    assert set(FINDING_KINDS) == {f.value for f in Finding} - {"anc-normal"}
    assert set(FINDING_KINDS.values()) <= set(CARD_TEMPLATES)
    assert list(CARD_TEMPLATES) == ["febrile-neutropenia", "fever-escalation", "neutropenia",
                                    "infection-prevention", "medication-review", "lab-follow-up", "data-quality"]


def test_text_numbers_match_thresholds() -> None:
    """The numbers written into the card text are the engine's (service.thresholds)."""
    fever_text = card_text.FEVER_ESCALATION.advice["temperature-elevated"]
    prevention = card_text.INFECTION_PREVENTION.common
    for text in (fever_text, prevention):
        assert f"{thresholds.FEVER_SINGLE_READING} °C" in text
        assert f"{thresholds.FEVER_SUSTAINED} °C" in text
    assert f"{int(thresholds.FEVER_SUSTAINED_DURATION.total_seconds() // 60)} minutes" in fever_text
    assert f"{thresholds.ANC_PROFOUND_BELOW}/uL" in card_text.PROFOUND_NOTE
    # The normal ANC depends on the age (brief §1.5): the text takes the patient's, never a written 1500.
    for finding in ("fever-normal-anc", "fever-mild-neutropenia"):
        advice = card_text.FEVER_ESCALATION.advice[finding]
        assert "{normal_anc}" in advice and str(thresholds.ANC_NORMAL_LOWER) not in advice
    assert DEFAULT_CARD_SETTINGS.febrile_neutropenia_anc_below == DEFAULT_POLICY.fn_anc_cutoff


# -- finding -> card kind -> indicator ---------------------------------------------------------------------------

@pytest.mark.parametrize(("assessed", "expected"), [(a, e) for _, a, e in SCENARIOS],
                         ids=[name for name, _, _ in SCENARIOS])
def test_finding_gives_card_kinds_and_indicators(assessed: Assessment, expected: Mapping[str, Indicator]) -> None:
    assert kinds(render(assessed)) == expected


def test_every_finding_code_has_a_scenario() -> None:
    assert {name for name, _, _ in SCENARIOS} == {f.value for f in Finding}


@pytest.mark.parametrize(("assessed", "expected"), [(a, e) for _, a, e in COMBINATIONS],
                         ids=[name for name, _, _ in COMBINATIONS])
def test_combination_gives_card_kinds_and_indicators(assessed: Assessment,
                                                     expected: Mapping[str, Indicator]) -> None:
    assert kinds(render(assessed)) == expected


def test_anc_normal_alone_gives_no_cards() -> None:
    assert render(assessment(F.ANC_NORMAL, anc=anc(2500, 0)), patient_id="p-1") == []


@pytest.mark.parametrize(("assessed", "_expected"), [(a, e) for _, a, e in SCENARIOS + COMBINATIONS]
                         + [(ALL_FINDINGS, None)],
                         ids=[name for name, _, _ in SCENARIOS + COMBINATIONS] + ["all-findings"])
def test_one_card_per_kind_most_urgent_first(assessed: Assessment, _expected: object) -> None:
    cards = render(assessed, patient_id="p-1")
    order = list(CARD_TEMPLATES)
    assert len({c.kind for c in cards}) == len(cards)
    keys = [(-c.indicator.rank, order.index(c.kind or "")) for c in cards]
    assert keys == sorted(keys)


def test_all_findings_at_once() -> None:
    cards = render(ALL_FINDINGS)
    assert kinds(cards) == {"febrile-neutropenia": CRITICAL, "infection-prevention": CRITICAL,
                            "fever-escalation": WARNING, "medication-review": INFO, "data-quality": INFO}
    assert cards[0].kind == "febrile-neutropenia"


def test_render_is_pure_and_leaves_uuids_to_the_blueprint() -> None:
    a = SCENARIOS[0][1]
    first, second = render(a, patient_id="p-1"), render(a, patient_id="p-1")
    assert first == second
    for card in first:
        assert card.uuid is None and all(s.uuid is None for s in card.suggestions)
        assert "uuid" not in str(card.to_json())
    counter = itertools.count()
    stamped = first[0].stamped(lambda: f"id-{next(counter)}")
    assert stamped.uuid and all(s.uuid for s in stamped.suggestions)


# -- every rendered card --------------------------------------------------------------------------------------------

CARDS = every_card()


@pytest.mark.parametrize("card", [c for _, c in CARDS], ids=[i for i, _ in CARDS])
def test_rendered_card_follows_the_rules(card: Card) -> None:
    assert len(card.summary) <= SUMMARY_MAX_CHARS and not card.summary.endswith("…")
    assert card.indicator in (INFO, WARNING, CRITICAL)
    assert card.source.label == "Neutropenia CDS" and card.source.url
    assert card.source.topic is not None
    assert card.source.topic.system == card_text.CARD_KIND_SYSTEM and card.source.topic.display
    assert card.detail and not HTML_TAG.search(card.detail)
    assert "µL" not in card.detail + card.summary and "mm3" not in card.detail
    assert card.override_reasons and all(r.display for r in card.override_reasons)
    assert all(r.system == card_text.OVERRIDE_REASON_SYSTEM for r in card.override_reasons)
    for link in card.links:
        assert link.type is LinkType.ABSOLUTE and link.app_context is None
        assert urlsplit(link.url).scheme == "https" and urlsplit(link.url).netloc
    if card.suggestions:
        assert card.selection_behavior is SelectionBehavior.ANY
    card.to_json()


# -- extreme values ---------------------------------------------------------------------------------------------------

EXTREMES = [
    ("anc-0", anc(0, 4)),
    ("anc-99999", anc(99999, 0)),
    ("anc-99999-preliminary-upper-bound", anc("99999.99", 4, preliminary=True, comparator=">=")),
    ("anc-below-0.1-thousand", anc(100, 4, comparator="<", preliminary=True)),
    ("anc-huge", anc(10 ** 15, 0)),
    ("anc-stale-huge", anc(99999, 2, hours_ago=99999 * 24, stale=True)),
]
TEMPERATURES = [("45.55", "single-reading"), ("38.29", "none"), ("34.00", "none"), ("41.00", "sustained")]


@pytest.mark.parametrize("finding", list(Finding), ids=[f.value for f in Finding])
@pytest.mark.parametrize("measured", [a for _, a in EXTREMES], ids=[i for i, _ in EXTREMES])
def test_summaries_fit_with_extreme_values(finding: Finding, measured: Anc) -> None:
    for celsius, criterion in TEMPERATURES:
        findings = (finding, F.ANC_FALLING) if finding is not F.ANC_FALLING else (finding,)
        a = assessment(*findings, anc=measured, fever=fever(celsius, criterion), medications=(CLOZAPINE,) * 999,
                       data_issues=(DataIssue("malformed-resource", None, None),) * 999)
        for card in render(a, patient_id="p-1"):
            assert len(card.summary) < 140 and not card.summary.endswith("…"), card.summary


def test_summary_states_value_and_grade() -> None:
    fn = render(SCENARIOS[0][1])[0]
    assert fn.summary == "Febrile neutropenia: ANC 400/uL (grade 4) with 38.4 °C — emergency"
    severe = render(assessment(F.NEUTROPENIA_SEVERE, F.ANC_FALLING, anc=anc(300, preliminary=True)))[0]
    assert severe.summary == "Severe neutropenia: ANC 300/uL (grade 4, preliminary) on 2025-03-10, falling"


@pytest.mark.parametrize(("value", "comparator", "shown"),
                         [("99.96", None, "99/uL"), ("499.5", None, "499/uL"), ("100", "<", "below 100/uL"),
                          ("0", None, "0/uL"), ("1499.99", None, "1499/uL")],
                         ids=["99.96-floors", "499.5-floors", "upper-bound", "zero", "1499.99-floors"])
def test_anc_is_shown_without_crossing_a_band(value: str, comparator: str | None, shown: str) -> None:
    card = render(assessment(F.NEUTROPENIA_SEVERE, anc=anc(value, comparator=comparator)))[0]
    assert f"ANC {shown} (grade 4)" in card.summary


@pytest.mark.parametrize(("celsius", "shown"), [("38.30", "38.3 °C"), ("38.00", "38.0 °C"), ("45.55", "45.55 °C")],
                         ids=["38.30", "38.00", "45.55"])
def test_temperature_is_shown_to_two_decimals_at_most(celsius: str, shown: str) -> None:
    card = render(assessment(F.FEBRILE_NEUTROPENIA, anc=anc(), fever=fever(celsius)))[0]
    assert f"with {shown} —" in card.summary


@pytest.mark.parametrize(("comparator", "shown"), [("<", "below 38.0 °C"), ("<=", "at most 37.9 °C"),
                                                    (None, "37.9 °C")], ids=["below", "at-most", "value"])
def test_highest_temperature_that_is_only_an_upper_bound_says_so(comparator: str | None, shown: str) -> None:
    # Fever.comparator "<": every reading was below this bound ("<38.0"); shown as the value, 38.0 °C looked like a
    # raised temperature that the data rule out.
    celsius = "38.00" if comparator == "<" else "37.90"
    card = card_of("neutropenia", assessment(F.NEUTROPENIA_SEVERE, anc=anc(),
                                             fever=fever(celsius, "none", comparator=comparator)))
    assert f"| {shown} (" in (card.detail or "")


# -- card content -------------------------------------------------------------------------------------------------------

def card_of(kind: str, a: Assessment, **kwargs: Any) -> Card:
    (card,) = [c for c in render(a, **kwargs) if c.kind == kind]
    return card


def test_febrile_neutropenia_detail_lists_results_and_what_to_do() -> None:
    a = assessment(F.FEBRILE_NEUTROPENIA, F.NEUTROPENIA_SEVERE, F.NEUTROPENIA_PROFOUND,
                   anc=anc(80, preliminary=True, status="preliminary", method="computed", formula="wbc*total%"),
                   fever=fever("38.20", "sustained", since=NOW - timedelta(hours=2)))
    detail = card_of("febrile-neutropenia", a).detail or ""
    assert "| Result | Value | Time | Status |" in detail
    assert "| ANC, computed: WBC x total neutrophil % | 80/uL (grade 4, preliminary) | 2025-03-10 10:00 UTC |" in detail
    assert "**preliminary**" in detail
    assert "38.2 °C (100.8 °F) | 2025-03-10 10:00 UTC to 2025-03-10 11:00 UTC | 38.0 °C or more for 60 minutes" in detail
    assert "profound" in detail
    for must in ("blood cultures", "broad-spectrum antibiotics within 1 hour of triage", "MASCC"):
        assert must in detail


@pytest.mark.parametrize(
    ("finding", "must"),
    [("febrile-neutropenia", "MASCC"), ("febrile-neutropenia", "CISNE"),
     ("presumed-febrile-neutropenia", "MASCC"), ("presumed-febrile-neutropenia", "CISNE")],
    ids=["fn-mascc", "fn-cisne", "presumed-fn-mascc", "presumed-fn-cisne"],
)
def test_febrile_neutropenia_names_both_risk_scores(finding: str, must: str) -> None:
    # Brief §4 R1: "assess MASCC/CISNE" (§1.3). The card named only MASCC; CISNE is the score for the clinically
    # stable solid-tumour patient, the one an outpatient plan is most often weighed for.
    (a,) = [a for n, a, _ in SCENARIOS if n == finding]
    assert must in (card_of("febrile-neutropenia", a).detail or "")


def test_presumed_febrile_neutropenia_says_not_to_wait_for_counts() -> None:
    a = assessment(F.PRESUMED_FEBRILE_NEUTROPENIA, anc=STALE, fever=fever(), context=(LEUKAEMIA,))
    card = card_of("febrile-neutropenia", a)
    assert card.summary.startswith("Presumed febrile neutropenia: 38.4 °C, no current ANC")
    detail = card.detail or ""
    assert "do not wait" in detail and "neutropenic sepsis" in detail and "CBC with differential" in detail
    assert "too old to grade" in detail  # the old count is shown, not graded
    assert "1200/uL |" in detail and "grade 2" not in detail
    assert "Acute leukemia (SNOMED CT 91855006)" in detail
    assert {link.url for link in card.links} >= {DEFAULT_CARD_SETTINGS.neutropenic_sepsis_guideline_url}


def test_fever_escalation_states_recheck_and_exact_rule() -> None:
    card = card_of("fever-escalation", SCENARIOS[2][1])
    assert card.summary == "Temperature 38.1 °C with ANC 700/uL (grade 3): recheck within 1 hour"
    detail = card.detail or ""
    assert "within 1 hour" in detail
    assert ("below 1000/uL, any single temperature of 38.3 °C (101 °F) or more, or readings that stay at "
            "38.0 °C (100.4 °F) or more for 60 minutes") in detail


def test_escalation_rule_quotes_the_configured_cut_off() -> None:
    settings = CardSettings(febrile_neutropenia_anc_below=Decimal(500))
    card = card_of("fever-escalation", SCENARIOS[2][1], settings=settings)
    assert "ANC below 500/uL" in (card.detail or "")


@pytest.mark.parametrize(
    ("value", "temp", "prevention"),
    [(800, "38.6", WARNING), (999, "38.6", WARNING), (800, None, WARNING), (400, "38.6", CRITICAL),
     (1000, "38.6", None)],
    ids=["fever-anc-800", "fever-anc-999", "afebrile-anc-800", "fever-anc-400", "fever-anc-1000"],
)
def test_infection_prevention_below_1000_whatever_the_febrile_neutropenia_cut_off(
    value: int, temp: str | None, prevention: Indicator | None
) -> None:
    # R14 "ANC <1000 (any)" (brief §4). With the febrile-neutropenia cut-off set to 500/uL, a fever with ANC 800 is
    # R4 (fever-mild-neutropenia), which carries no grade finding: the infection-prevention advice was left out.
    policy = dataclasses.replace(DEFAULT_POLICY, fn_anc_cutoff=Decimal(500))
    settings = CardSettings(febrile_neutropenia_anc_below=Decimal(500))
    resources = [anc_result(value, effective=ago(hours=2))]
    resources += [temperature(temp, effective=ago(hours=1))] if temp else []
    cards = render(assess(resources, now=NOW, policy=policy), settings=settings)
    assert {c.kind: c.indicator for c in cards}.get("infection-prevention") == prevention


def test_infection_prevention_for_an_upper_bound_at_1000_under_a_lower_cut_off() -> None:
    # "<1.0 10*9/L" is an ANC below 1000 (R14), graded so by the rules (grade 3); with the febrile-neutropenia
    # cut-off at 500/uL a fever makes it R4, which drops the grade, and the add-on compared 1000 < 1000: no advice.
    policy = dataclasses.replace(DEFAULT_POLICY, fn_anc_cutoff=Decimal(500))
    settings = CardSettings(febrile_neutropenia_anc_below=Decimal(500))
    resources = [anc_result(1.0, "10*9/L", effective=ago(hours=2), comparator="<"),
                 temperature("38.6", effective=ago(hours=1))]
    result = assess(resources, now=NOW, policy=policy)
    assert result.findings[0] is F.FEVER_MILD_NEUTROPENIA and result.anc is not None and result.anc.ctcae_grade == 3
    cards = {c.kind: c.indicator for c in render(result, settings=settings)}
    assert cards.get("infection-prevention") == WARNING

@pytest.mark.parametrize(
    ("value", "cut_off", "born", "summary"),
    [(1200, 1000, None, "Fever 38.6 °C with neutropenia, ANC 1200/uL (grade 2): review today"),
     (800, 500, None, "Fever 38.6 °C with neutropenia, ANC 800/uL (grade 3): review today"),
     (3000, 1000, "2025-03-08", "Fever 38.6 °C with neutropenia, ANC 3000/uL: review today")],
    ids=["grade-2", "grade-3-under-a-500-cut-off", "neonate-ungraded"],
)
def test_fever_with_neutropenia_below_the_cut_off_is_not_called_mild_when_it_is_not(
    value: int, cut_off: int, born: str | None, summary: str
) -> None:
    # R4 covers [febrile-neutropenia cut-off, the age's normal limit): with a cut-off of 500/uL an ANC of 800 is
    # moderate (grade 3), for a neonate 3000 is below 5000 but ungraded. The summary said "mild neutropenia".
    policy = dataclasses.replace(DEFAULT_POLICY, fn_anc_cutoff=Decimal(cut_off))
    settings = CardSettings(febrile_neutropenia_anc_below=Decimal(cut_off))
    resources = [anc_result(value, effective=ago(hours=2)), temperature("38.6", effective=ago(hours=1))]
    resources += [patient(born)] if born else []
    result = assess(resources, now=NOW, policy=policy)
    assert result.findings[0] is F.FEVER_MILD_NEUTROPENIA
    assert card_of("fever-escalation", result, settings=settings).summary == summary


@pytest.mark.parametrize(
    ("value", "temp", "birth_date", "prevention"),
    [(1200, None, "1970-01-01", None), (1499, None, "1970-01-01", None), (1200, None, "2024-09-10", None),
     (999, None, "1970-01-01", WARNING), (1200, "38.6", "1970-01-01", CRITICAL), (1200, "38.6", "2024-09-10", CRITICAL)],
    ids=["afebrile-anc-1200", "afebrile-anc-1499", "afebrile-infant-anc-1200", "afebrile-anc-999",
         "fever-anc-1200-is-febrile-neutropenia", "fever-infant-anc-1200-is-febrile-neutropenia"],
)
def test_infection_prevention_with_a_febrile_neutropenia_cut_off_above_1000(
    value: int, temp: str | None, birth_date: str, prevention: Indicator | None
) -> None:
    # R14 "ANC <1000 (any)" (brief §4), or febrile neutropenia. With the cut-off set to 1500/uL an afebrile ANC of
    # 1000-1499 got a warning infection-prevention card; an infant's 1200 (normal for age: anc-normal) got it alone.
    policy = dataclasses.replace(DEFAULT_POLICY, fn_anc_cutoff=Decimal(1500))
    settings = CardSettings(febrile_neutropenia_anc_below=Decimal(1500))
    resources = [patient(birth_date), anc_result(value, effective=ago(hours=2))]
    resources += [temperature(temp, effective=ago(hours=1))] if temp else []
    assessment = assess(resources, now=NOW, policy=policy)
    cards = render(assessment, settings=settings)
    assert {c.kind: c.indicator for c in cards}.get("infection-prevention") == prevention


def test_neutropenia_card_shows_method_trend_and_date() -> None:
    card = card_of("neutropenia", SCENARIOS[10][1])
    assert card.summary == "Mild neutropenia: ANC 1200/uL (grade 2) on 2025-03-10, falling"
    detail = card.detail or ""
    assert "ANC, measured" in detail and "2025-03-10 10:00 UTC" in detail and "| final |" in detail
    assert "Recent ANCs, oldest first: 2100, 1600, 1200/uL." in detail
    assert "24 to 48 hours" in detail


def test_infection_prevention_is_education_with_when_to_call() -> None:
    detail = card_of("infection-prevention", SCENARIOS[6][1]).detail or ""
    assert "not individual medical advice" in detail
    assert "38.0 °C (100.4 °F) or more that lasts an hour or longer" in detail
    assert "38.3 °C (101 °F) or more even once" in detail
    for must in ("new cough", "mouth sore", "redness or swelling", "belly", "urine", "diarrhoea", "forgetful",
                 "electric razor", "soft brush", "crowds", "stool softener", "suppositories", "vaccine"):
        assert must in detail


@pytest.mark.parametrize(
    "fact",
    ["saliva", "urine and droppings", "litter boxes and fish tanks", "burning or pain when passing urine"],
    ids=["animal-saliva", "animal-urine-faeces", "someone-else-cleans", "pain-passing-urine"],
)
def test_infection_prevention_gives_every_source_fact(fact: str) -> None:
    # Brief §0 (the source document's facts, R14): avoid animal saliva, urine and faeces; call for burning or pain
    # when passing urine. The card said only "pet waste" (no saliva: being licked) and only "burning".
    assert fact in (card_of("infection-prevention", SCENARIOS[6][1]).detail or "")


@pytest.mark.parametrize(
    ("phrase", "present"),
    [("lasts an hour or longer", True), ("over an hour", False), ("more than an hour", False)],
    ids=["an-hour-or-longer", "not-over-an-hour", "not-more-than-an-hour"],
)
def test_patient_emergency_rule_is_the_engines_sustained_fever_rule(phrase: str, present: bool) -> None:
    # The engine calls a fever sustained when readings of 38.0 °C or more span at least 60 minutes (brief §0), and
    # the clinician's cards say "for 60 minutes"; the advice for the patient said "lasting over an hour", so at
    # exactly one hour the clinician saw an emergency while the patient was told to wait.
    assert thresholds.FEVER_SUSTAINED_DURATION == timedelta(minutes=60)
    detail = card_of("infection-prevention", SCENARIOS[6][1]).detail or ""
    assert (phrase in detail) is present


def test_medication_review_lists_medicines() -> None:
    methotrexate = CodedRef("http://example.org/local", "MTX", None, "MedicationRequest/m2")
    card = card_of("medication-review", assessment(F.NEUTROPENIA_MILD, F.MEDICATION_REVIEW, anc=anc(1200, 2),
                                                   medications=(CLOZAPINE, methotrexate)))
    assert card.summary == "Medication review: 2 active medicines that can lower the neutrophil count"
    assert "- clozapine (RxNorm 2626)" in (card.detail or "")
    assert "- MTX (http://example.org/local MTX)" in (card.detail or "")


def test_medication_review_on_a_recorded_drug_induced_neutropenia_with_a_normal_count() -> None:
    # R15 also fires on an active drug-induced neutropenia diagnosis whatever the count: its advice must not speak of
    # a low count beside an ANC of 3000.
    card = card_of("medication-review", assessment(F.ANC_NORMAL, F.MEDICATION_REVIEW, anc=anc(3000, 0),
                                                   medications=(CLOZAPINE,)))
    assert "low count" not in (card.detail or "") and "lowering the neutrophil count" in (card.detail or "")


def test_lab_follow_up_for_stale_anc_is_not_graded() -> None:
    card = card_of("lab-follow-up", SCENARIOS[12][1])
    assert card.summary == "Last ANC 1200/uL is 12 days old (2025-02-26): repeat the CBC with differential"


@pytest.mark.parametrize(
    "resources",
    [[], [anc_result(0.9, None, ago(hours=2))], [anc_result(None, None, ago(hours=2))]],
    ids=["no-anc", "anc-without-unit", "anc-without-value"],
)
def test_risk_factor_card_does_not_deny_an_anc_the_data_quality_card_shows(resources: list[dict[str, Any]]) -> None:
    # R12 fires when there is no usable ANC, which includes an uninterpretable one (R16): the lab-follow-up card
    # said "no ANC on record" beside the data-quality card's "ANC result not usable (Observation/...)".
    result = assess([*resources, condition("55464009")], now=NOW)
    assert F.RISK_FACTOR_NO_ANC in result.findings
    card = card_of("lab-follow-up", result)
    text = card.summary + " " + (card.detail or "")
    assert "no ANC on record" not in text.replace("No ANC", "no ANC")
    assert "no usable ANC" in card.summary


def test_lab_follow_up_lists_risk_factors() -> None:
    card = card_of("lab-follow-up", SCENARIOS[13][1])
    assert "Acute leukemia (SNOMED CT 91855006)" in (card.detail or "")


@pytest.mark.parametrize(
    ("resources", "listed"),
    [([{"code": "2626"}], "clozapine (RxNorm 2626)"),
     ([{"code": "68442"}], "filgrastim (RxNorm 68442)"),
     ([{"code": "338036", "status": "completed", "authored": ago(days=3)}], "pegfilgrastim (RxNorm 338036)")],
    ids=["cause-medicine", "current-g-csf", "completed-g-csf"],
)
def test_risk_factor_card_names_the_medicine_that_made_it_fire(resources: list[dict[str, Any]], listed: str) -> None:
    # R12 fired on a medicine (or G-CSF context) alone, but the card listed only conditions: "the patient has risk
    # factors" with none named.
    orders = [medication_request(r["code"], **{k: v for k, v in r.items() if k != "code"}) for r in resources]
    result = assess(orders, now=NOW)
    assert result.findings == (F.RISK_FACTOR_NO_ANC,)
    assert f"- {listed}" in (card_of("lab-follow-up", result).detail or "")


def test_data_quality_lists_issues() -> None:
    card = card_of("data-quality", COMBINATIONS[-1][1])
    detail = card.detail or ""
    assert card.summary.startswith("ANC not graded")
    assert "ANC result not usable (Observation/x): unit 'g'" in detail
    assert "Record could not be read (Condition/z)" in detail
    assert "absolute neutrophil count" in detail


@pytest.mark.parametrize(("name", "kind", "summary"), [
    ("malformed-resource-only", "data-quality",
     "Some data could not be used: 1 problem(s), the assessment may be incomplete"),
    ("medication-review-without-listed-medicine", "medication-review",
     "Medication review: look for a medicine that may lower the neutrophil count"),
    ("current-anc-below-cut-off-without-band-gets-prevention", "infection-prevention",
     "Infection prevention: advice to give the patient, and when to call"),
], ids=["data-issues-only", "medicine-unlisted", "add-on-prevention"])
def test_summary_without_a_finding_of_the_kind(name: str, kind: str, summary: str) -> None:
    (a,) = [a for n, a, _ in COMBINATIONS if n == name]
    assert card_of(kind, a).summary == summary


def test_every_data_issue_the_engine_reports_has_a_label() -> None:
    """Each code written into a DataIssue in service/ is named in words on the data-quality card."""
    source = "\n".join(path.read_text() for path in Path(card_text.__file__).parent.glob("*.py"))
    codes = set(re.findall(r'(?:DataIssue|_issue|_malformed)\("([a-z][a-z-]+)"', source))
    assert {"conflicting-duplicates", "temperature-uninterpretable", "malformed-resource",
            "invalid-unread-elements"} <= codes
    unlabelled = card_text.DATA_ISSUES_SHOWN_ELSEWHERE | card_text.DATA_ISSUES_FOR_INTEGRATORS
    assert codes - set(card_text.DATA_ISSUE_LABELS) <= unlabelled


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("conflicting-duplicates", "Copies of one record disagree"),
        ("temperature-uninterpretable", "Temperature not usable"),
        ("anc-uninterpretable", "ANC result not usable"),
    ],
    ids=lambda v: str(v),
)
def test_data_quality_card_names_the_issue(code: str, label: str) -> None:
    issue = DataIssue(code, "Observation/d", "why")
    card = card_of("data-quality", assessment(data_issues=(issue,)))
    assert card.summary == "Some data could not be used: 1 problem(s), the assessment may be incomplete"
    assert f"- {label} (Observation/d): why" in (card.detail or "")


def test_patient_data_cannot_inject_markup() -> None:
    hostile = CodedRef(RXNORM, "1|2", "<script>alert(1)</script> | **x**", "MedicationRequest/m3")
    issue = DataIssue("<img src=x>", "Observation/<b>", "<iframe>")
    a = assessment(F.NEUTROPENIA_MILD, F.MEDICATION_REVIEW, anc=anc(1200, 2), medications=(hostile,),
                   data_issues=(issue,))
    for card in render(a):
        assert not HTML_TAG.search(card.detail or ""), card.detail
    detail = card_of("medication-review", a).detail or ""
    assert r"‹script›alert(1)‹/script› \| \*\*x\*\* (RxNorm 1\|2)" in detail


# -- suggestions -----------------------------------------------------------------------------------------------------------

SUGGESTING = [
    ("febrile-neutropenia", SCENARIOS[0][1], {"600-7", "57021-8"}, "stat"),
    ("presumed-febrile-neutropenia", SCENARIOS[1][1], {"600-7", "57021-8"}, "stat"),
    ("fever-mild-neutropenia", SCENARIOS[3][1], {"57021-8"}, "urgent"),
    ("fever-no-anc", SCENARIOS[4][1], {"57021-8"}, "urgent"),
    ("neutropenia-mild", SCENARIOS[9][1], {"57021-8"}, "routine"),
    ("anc-stale", SCENARIOS[12][1], {"57021-8"}, "routine"),
    ("risk-factor-no-anc", SCENARIOS[13][1], {"57021-8"}, "routine"),
]


@pytest.mark.parametrize(("assessed", "codes", "priority"), [(a, c, p) for _, a, c, p in SUGGESTING],
                         ids=[name for name, *_ in SUGGESTING])
def test_suggestions_create_valid_draft_service_requests(assessed: Assessment, codes: set[str],
                                                         priority: str) -> None:
    card = render(assessed, patient_id="pat-1.A")[0]
    assert card.selection_behavior is SelectionBehavior.ANY
    found = set()
    for suggestion in card.suggestions:
        assert suggestion.label
        (action,) = suggestion.actions
        assert action.type.value == "create" and action.description and action.resource is not None
        resource = ServiceRequest.model_validate(dict(action.resource))
        assert resource.status == "draft" and resource.intent == "proposal" and resource.priority == priority
        assert resource.subject.reference == "Patient/pat-1.A"
        (coding,) = resource.code.coding
        assert coding.system == "http://loinc.org" and coding.display
        found.add(coding.code)
    assert found == codes


@pytest.mark.parametrize("patient_id", [None, "", "has space", "a/b", "x" * 65],
                         ids=["none", "empty", "space", "slash", "too-long"])
def test_no_suggestions_without_a_valid_patient_id(patient_id: str | None) -> None:
    for card in render(SCENARIOS[0][1], patient_id=patient_id):
        assert card.suggestions == () and card.selection_behavior is None


@pytest.mark.parametrize("name", ["temperature-elevated", "fever-normal-anc", "neutropenia-severe"])
def test_cards_without_an_order_to_propose(name: str) -> None:
    (a,) = [a for n, a, _ in SCENARIOS if n == name]
    assert all(card.suggestions == () for card in render(a, patient_id="p-1"))


# -- settings ------------------------------------------------------------------------------------------------------------

def test_settings_from_mapping_override_links_and_source() -> None:
    settings = CardSettings.from_mapping({
        "SOURCE_LABEL": " Our CDS ", "card_source_url": "https://cds.example.org/about",
        "infection_prevention_url": "https://intranet.example.org/neutropenia-leaflet",
        "febrile_neutropenia_anc_below": "500",
    })
    assert settings.source_label == "Our CDS" and settings.febrile_neutropenia_anc_below == Decimal(500)
    assert settings.ctcae_url == DEFAULT_CARD_SETTINGS.ctcae_url
    card = card_of("infection-prevention", SCENARIOS[6][1], settings=settings)
    assert card.source.label == "Our CDS" and card.source.url == "https://cds.example.org/about"
    assert [link.url for link in card.links] == ["https://intranet.example.org/neutropenia-leaflet"]


@pytest.mark.parametrize("overrides", [{"nonsense": "x"}, {"ctcae_url": "/relative"}, {"source_url": "ftp://x.org/"},
                                       {"source_label": " "}, {"febrile_neutropenia_anc_below": "0"},
                                       {"febrile_neutropenia_anc_below": True}],
                         ids=["unknown-key", "relative-url", "not-http", "blank-label", "zero-cut-off",
                              "bool-cut-off"])
def test_settings_refuse_bad_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CardSettings.from_mapping(overrides)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_CARD_SETTINGS.source_label = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("born", "value", "reference_low", "temp", "kind", "grade"),
    [
        ("2024-09-10", 1200, None, "38.6", "fever-escalation", None),  # 6 months old: not neutropenic
        ("2024-09-10", 1000, None, "38.6", "fever-escalation", None),
        ("2024-09-10", 900, None, None, "neutropenia", "grade 3"),  # neutropenic for the age: graded
        ("1970-01-01", 1200, None, "38.6", "fever-escalation", "grade 2"),  # adult R4
        ("1970-01-01", 1600, 1800, "38.6", "fever-escalation", "grade 1"),  # adult below the lab's LLN (R10)
        ("2025-03-05", 1200, None, None, "neutropenia", "grade 2"),  # 5 days old: neutropenic below 5000
    ],
    ids=["infant-1200-fever", "infant-1000-fever", "infant-900", "adult-1200-fever", "adult-below-lln-fever",
         "neonate-1200"],
)
def test_ctcae_grade_is_not_shown_beside_a_count_normal_for_the_age(
    born: str, value: int, reference_low: int | None, temp: str | None, kind: str, grade: str | None
) -> None:
    # CTCAE grade 2 is "<1500 - 1000/mm3", the adult cut-off. For an infant (2 weeks to 1 year, neutropenic only
    # below 1000/uL, brief §1.5) an ANC of 1200 is normal (R6), yet the card read "ANC 1200/uL (grade 2): not
    # neutropenic": an adult threshold stated on an infant's chart, contradicting the card's own finding.
    resources = [patient(born), anc_result(value, "/uL", ago(hours=2), reference_low=reference_low)]
    resources += [temperature(temp, "Cel", ago(hours=1))] if temp else []
    card = card_of(kind, assess(resources, now=NOW))
    text = card.summary + (card.detail or "")
    if grade is None:
        assert "grade" not in text, text
    else:
        assert f"({grade})" in card.summary and f"({grade})" in (card.detail or "")


@pytest.mark.parametrize(
    ("born", "value", "noted"),
    [("1970-01-01", 1200, True), ("2020-01-01", 1200, True), ("2025-03-05", 1200, False),
     ("2025-03-05", 3000, False)],
    ids=["adult", "child-over-one", "neonate-1200", "neonate-3000"],
)
def test_duffy_null_note_only_where_the_adult_mild_band_applies(born: str, value: int, noted: bool) -> None:
    # Brief §1.5: in DANC an ANC of 1000-1499 is not escalated (adult Duffy-null reference intervals). A neonate is
    # neutropenic below 5000/uL, so its "mild" band runs 1000-4999: the note told the clinician a neonate's 3000
    # "can be usual" in Duffy-null, a reading of the adult range onto a newborn.
    result = assess([patient(born), anc_result(value, "/uL", ago(hours=2))], now=NOW)
    assert F.NEUTROPENIA_MILD in result.findings
    assert ("Duffy-null" in (card_of("neutropenia", result).detail or "")) is noted


@pytest.mark.parametrize(
    ("born", "anc", "finding", "limit"),
    [
        ("1970-01-01", 1200, "fever-mild-neutropenia", "1500/uL"),
        ("1970-01-01", 1500, "fever-normal-anc", "1500/uL"),
        ("2025-03-05", 3000, "fever-mild-neutropenia", "5000/uL"),  # 5 days old (brief §1.5)
        ("2025-03-05", 5000, "fever-normal-anc", "5000/uL"),
        ("2024-09-10", 1000, "fever-normal-anc", "1000/uL"),  # 6 months old
    ],
    ids=["adult-mild", "adult-normal", "neonate-mild", "neonate-normal", "infant-normal"],
)
def test_fever_card_names_the_normal_anc_for_the_patients_age(born: str, anc: int, finding: str, limit: str) -> None:
    # The card used to print 1500/uL whatever the age: a neonate's ANC of 3000 read as "from 1000 to 1499".
    assessed = assess([patient(born), anc_result(anc, "/uL", ago(hours=2)), temperature("38.6", "Cel", ago(hours=1))],
                      now=NOW)
    assert finding in {f.value for f in assessed.findings}
    (card,) = [c for c in render(assessed) if c.kind == "fever-escalation"]
    assert limit in (card.detail or "")
