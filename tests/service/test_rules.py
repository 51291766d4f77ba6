"""Rules R1-R17 (brief §4) end to end through ``assess``, at every threshold, in both unit systems."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from service.assessment import assess
from service.model import Finding
from service.anc import AncValue
from service.rules import INDICATOR, URGENCY, RuleInput, TemperatureState, evaluate, falling, temperature_state
from service.thresholds import ClinicalPolicy
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
    temperature,
    wbc,
)

D = Decimal
CHEMO = condition("425229001", id="chemo")  # chemotherapy-induced neutropenia: R2 context

TEMPERATURES: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "afebrile": [temperature("37.2", "Cel", ago(hours=1))],
    "elevated": [temperature("38.29", "Cel", ago(minutes=30))],
    "elevated-F": [temperature("100.9", "[degF]", ago(minutes=30))],
    "elevated-38.0": [temperature("38.0", "Cel", ago(minutes=30))],
    "elevated-100.4F": [temperature("100.4", "[degF]", ago(minutes=30))],  # 38.00 C exactly
    "afebrile-37.99": [temperature("37.99", "Cel", ago(minutes=30))],
    "fever": [temperature("38.3", "Cel", ago(minutes=30))],
    "fever-F": [temperature("101", "[degF]", ago(minutes=30))],
    "sustained": [temperature("38.0", "Cel", ago(minutes=70)), temperature("38.1", "Cel", ago(minutes=10))],
    "sustained-F": [temperature("100.4", "[degF]", ago(minutes=70)), temperature("100.4", "[degF]", ago(minutes=10))],
}


def anc_in(cells: int, units: str, **kw: Any) -> dict[str, Any]:
    """A measured ANC of ``cells``/uL expressed in /uL or in 10*9/L."""
    if units == "si":
        return anc(str(D(cells) / 1000), "10*9/L", kw.pop("effective", ago(hours=3)), **kw)
    return anc(cells, "/uL", kw.pop("effective", ago(hours=3)), **kw)


def findings(*resources: Any, **kw: Any) -> tuple[str, ...]:
    return tuple(f.value for f in assess(list(resources), now=NOW, **kw).findings)


FN, PFN, TE, FMN, FNA = "febrile-neutropenia", "presumed-febrile-neutropenia", "temperature-elevated", \
    "fever-mild-neutropenia", "fever-no-anc"
SEV, PROF, MOD, FALL, FNORM, MILD = "neutropenia-severe", "neutropenia-profound", "neutropenia-moderate", \
    "anc-falling", "fever-normal-anc", "neutropenia-mild"
STALE, RISK, MR, UNINT, NOTC, NORMAL = "anc-stale", "risk-factor-no-anc", "medication-review", \
    "anc-uninterpretable", "anc-not-computable", "anc-normal"

# (ANC cells/uL, temperatures, chemotherapy context, expected findings). The ANC sits at, just below and just
# above every cut-off (100, 500, 1000, 1500); R15 (medication review) accompanies ANC < 1500 without context.
# With a fever only R1's severe/profound sub-flag and R10 accompany the fever finding (R7-R9 are afebrile).
ANC_TABLE = [
    # R1 febrile neutropenia: fever and ANC < 1000
    (99, "fever", True, (FN, SEV, PROF)),
    (100, "fever", True, (FN, SEV)),
    (101, "fever-F", True, (FN, SEV)),
    (499, "sustained", True, (FN, SEV)),
    (500, "sustained-F", True, (FN,)),
    (999, "fever", True, (FN,)),
    (999, "fever", False, (FN, MR)),
    # R4 fever with mild neutropenia: 1000 <= ANC < 1500
    (1000, "fever", True, (FMN,)),
    (1001, "sustained", False, (FMN, MR)),
    (1499, "fever-F", True, (FMN,)),
    # R6 fever with normal ANC
    (1500, "fever", False, (FNORM, NORMAL)),
    (1501, "sustained-F", False, (FNORM, NORMAL)),
    (1500, "fever", True, (FNORM, NORMAL)),  # R6 whatever the context: R2 is for a missing ANC only
    # R3 elevated temperature (38.0-38.29, not sustained) with ANC < 1000
    (999, "elevated", True, (TE, MOD)),
    (999, "elevated-38.0", True, (TE, MOD)),  # 38.0 C itself is elevated (>=), 37.99 is not
    (999, "elevated-100.4F", False, (TE, MOD, MR)),
    (999, "afebrile-37.99", True, (MOD,)),
    (400, "elevated-F", False, (TE, SEV, MR)),
    (1000, "elevated", True, (MILD,)),
    # R7-R10 afebrile grades
    (99, "afebrile", True, (SEV, PROF)),
    (100, "none", True, (SEV,)),
    (499, "afebrile", True, (SEV,)),
    (500, "afebrile", True, (MOD,)),
    (501, "none", True, (MOD,)),
    (999, "afebrile", True, (MOD,)),
    (1000, "afebrile", True, (MILD,)),
    (1499, "none", False, (MILD, MR)),
    (1500, "afebrile", False, (NORMAL,)),
    (1501, "none", True, (NORMAL,)),
]


@pytest.mark.parametrize("units", ["per-ul", "si"])
@pytest.mark.parametrize(
    ("cells", "temps", "context", "expected"),
    ANC_TABLE,
    ids=[f"{c}-{t}-{'ctx' if x else 'noctx'}" for c, t, x, _ in ANC_TABLE],
)
def test_anc_and_temperature_rules(
    cells: int, temps: str, context: bool, expected: tuple[str, ...], units: str
) -> None:
    resources = [anc_in(cells, units), *TEMPERATURES[temps], *([CHEMO] if context else [])]
    assert findings(*resources) == expected


@pytest.mark.parametrize(
    ("temps", "context", "expected"),
    [
        ("fever", True, (PFN,)),  # R2
        ("sustained-F", True, (PFN,)),
        ("fever", False, (FNA,)),  # R5
        ("fever-F", False, (FNA,)),
        ("elevated", True, (RISK,)),  # not fever: R12 (the chemotherapy condition is a risk factor)
        ("afebrile", False, ()),
        ("none", False, ()),
    ],
    ids=["R2", "R2-sustained-F", "R5", "R5-F", "elevated-context", "afebrile", "nothing"],
)
def test_fever_without_anc(temps: str, context: bool, expected: tuple[str, ...]) -> None:
    assert findings(*TEMPERATURES[temps], *([CHEMO] if context else [])) == expected


@pytest.mark.parametrize(
    "context",
    [
        condition("425229001"),
        condition("328301000119102"),
        condition("D70.1", ICD10CM),
        condition("91855006"),
        condition("91861009"),
        condition("91857003"),
        condition("C91.00", ICD10CM),
        condition("C9201", ICD10CM),
        condition("C92.A2", ICD10CM),
        condition("C95.00", ICD10CM),
        condition("234336002"),
        condition("409089005"),
        medication_request("338036"),
        medication_request("L03AA02", ATC, status="completed", authored=ago(days=13)),
        medication_request("68442", status="stopped", authored=ago(days=14)),
        medication_request("3002"),
        medication_request("L01XA01", ATC, status="completed", authored=ago(days=10)),
        medication_request("338036", status="on-hold", authored=ago(days=60)),
    ],
    ids=["chemo-neutropenia", "chemo-pancytopenia", "D70.1", "acute-leukaemia", "aml", "all",
         "icd-all-not-in-remission", "icd-aml-in-remission-undotted", "icd-aml-multilineage-relapse",
         "icd-acute-leukaemia-unspecified", "hsct", "fn-history",
         "pegfilgrastim", "gcsf-13d", "gcsf-14d", "cyclophosphamide", "cisplatin-10d", "gcsf-on-hold"],
)
def test_r2_chemotherapy_context(context: dict[str, Any]) -> None:
    assert findings(*TEMPERATURES["fever"], context)[0] == PFN


@pytest.mark.parametrize(
    "not_context",
    [
        medication_request("338036", status="completed", authored=ago(days=15)),
        medication_request("3002", status="completed", authored=ago(days=15)),
        medication_request("2626"),  # clozapine causes neutropenia but is not chemotherapy context
        condition("425229001", clinical="resolved"),
        condition("425229001", verification="refuted"),
        condition("55464009"),  # lupus: a risk factor, not chemotherapy context
        medication_request("338036", status="cancelled"),
        condition("C91.10", ICD10CM),  # chronic lymphocytic leukaemia: not an acute leukaemia
        condition("C92.10", ICD10CM),  # chronic myeloid leukaemia
    ],
    ids=["gcsf-15d", "chemo-15d", "clozapine", "resolved", "refuted", "lupus", "cancelled", "icd-cll", "icd-cml"],
)
def test_r5_without_chemotherapy_context(not_context: dict[str, Any]) -> None:
    assert findings(*TEMPERATURES["fever"], not_context)[0] == FNA


def test_gcsf_lookback_is_configurable() -> None:
    order = medication_request("338036", status="completed", authored=ago(days=20))
    policy = ClinicalPolicy(gcsf_lookback=timedelta(days=21))
    assert findings(*TEMPERATURES["fever"], order, policy=policy)[0] == PFN


@pytest.mark.parametrize(
    ("days", "stale"),
    [(6.99, False), (7, False), (7.01, True), (30, True)],
    ids=["6.99d", "7d", "7.01d", "30d"],
)
def test_r11_anc_currency_boundary(days: float, stale: bool) -> None:
    result = assess([anc_in(400, "per-ul", effective=ago(days=days))], now=NOW)
    assert result.anc is not None and result.anc.stale is stale
    current = (Finding.NEUTROPENIA_SEVERE, Finding.MEDICATION_REVIEW)
    assert result.findings == ((Finding.ANC_STALE,) if stale else current)


def test_stale_anc_with_fever_is_no_current_anc() -> None:
    assert findings(anc_in(400, "si", effective=ago(days=8)), *TEMPERATURES["fever"], CHEMO) == (PFN, STALE)
    assert findings(anc_in(400, "si", effective=ago(days=8)), *TEMPERATURES["fever"]) == (FNA, STALE)


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ([condition("306058006")], (RISK,)),  # aplastic anaemia
        ([condition("D70.9", ICD10CM)], (RISK,)),
        ([condition("E61.0", ICD10CM)], (RISK,)),  # copper deficiency
        ([medication_request("2626")], (RISK,)),  # clozapine
        ([medication_request("1191")], (RISK,)),  # aspirin
        ([medication_request("338036")], (RISK,)),  # G-CSF: chemotherapy context
        ([condition("38341003")], ()),  # hypertension is no risk factor
        ([], ()),
        ([condition("306058006"), anc_in(2000, "si")], (NORMAL,)),
        ([condition("306058006"), anc_in(2000, "si", effective=ago(days=10))], (STALE,)),
    ],
    ids=["aplastic", "D70.9", "copper", "clozapine", "aspirin", "gcsf", "hypertension", "nothing", "with-anc",
         "with-stale-anc"],
)
def test_r12_risk_factor_without_anc(resources: list[Any], expected: tuple[str, ...]) -> None:
    assert findings(*resources) == expected


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        ([1400, 1200], (FALL, MILD, MR)),
        ([1200, 1400], (MILD, MR)),
        ([1800, 1600], (NORMAL,)),  # falling but latest >= 1500
        ([1600, 1499], (FALL, MILD, MR)),
        ([1600, 1500], (NORMAL,)),
        ([900, 700, 400], (SEV, FALL, MR)),
        ([400, 700, 600], (MOD, MR)),  # recovering: 400 -> 700 rose, so not every ANC is lower
        ([600, 600], (MOD, MR)),
        ([800], (MOD, MR)),
    ],
    ids=["falling", "rising", "above-1500", "1499", "1500", "three-falling", "recovering", "flat", "single"],
)
def test_r13_falling_trend(series: list[int], expected: tuple[str, ...]) -> None:
    resources = [anc_in(v, "per-ul", effective=ago(days=len(series) - i)) for i, v in enumerate(series)]
    assert findings(*resources) == expected


def test_r13_ignores_ancs_outside_the_window() -> None:
    assert findings(anc_in(1400, "si", effective=ago(days=8)), anc_in(1200, "si", effective=ago(days=1))) == (MILD, MR)


def test_falling_helper() -> None:
    assert falling([D(1400), D(1200)]) and falling([D(1400), D(1300), D(1200)])
    assert not falling([D(800), D(1400), D(1200)]) and not falling([D(1200)]) and not falling([])


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ([condition("47318007"), anc_in(2000, "si")], (MR, NORMAL)),  # drug-induced neutropenia, normal ANC
        ([condition("D70.2", ICD10CM)], (RISK, MR)),
        ([anc_in(1200, "si")], (MILD, MR)),
        ([anc_in(1200, "si"), CHEMO], (MILD,)),
        ([anc_in(1200, "si"), condition("47318007"), CHEMO], (MILD, MR)),
    ],
    ids=["drug-induced-normal", "D70.2-no-anc", "mild", "mild-chemo", "drug-induced-chemo"],
)
def test_r15_medication_review(resources: list[Any], expected: tuple[str, ...]) -> None:
    assert findings(*resources) == expected


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ([anc(400, None, ago(hours=1))], (UNINT,)),
        ([anc(400, "mmol/L", ago(hours=1))], (UNINT,)),
        ([anc(400, None, ago(hours=1)), *TEMPERATURES["fever"], CHEMO], (PFN, UNINT)),
        # a newer uninterpretable result is flagged even when an older ANC is used
        ([anc(2000, "/uL", ago(days=2)), anc("0.3", None, ago(hours=1))], (UNINT, NORMAL)),
        # an older uninterpretable result than the ANC used is not
        ([anc(2000, "/uL", ago(hours=1)), anc("0.3", None, ago(days=2))], (NORMAL,)),
        ([anc("0.3", None, ago(days=8))], ()),  # outside the currency window, nothing to act on
    ],
    ids=["no-unit", "wrong-unit", "fever", "newer-than-anc", "older-than-anc", "old"],
)
def test_r16_uninterpretable(resources: list[Any], expected: tuple[str, ...]) -> None:
    assert findings(*resources) == expected


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ([wbc(3, effective=ago(hours=1))], (NOTC,)),
        ([observation("770-8", 40, "%", ago(hours=1))], (NOTC,)),
        ([wbc("0.8", effective=ago(hours=1)), *TEMPERATURES["fever"]], (FNA, NOTC)),
        ([wbc(3, effective=ago(hours=1)), observation("770-8", 60, "%", ago(hours=1))], (NORMAL,)),  # 1800/uL
    ],
    ids=["wbc-only", "pct-only", "fever-wbc-only", "computable"],
)
def test_r17_not_computable(resources: list[Any], expected: tuple[str, ...]) -> None:
    assert findings(*resources) == expected


@pytest.mark.parametrize(
    ("birth", "cells", "temps", "expected"),
    [
        (NOW.date() - timedelta(days=3), 3000, "none", (MILD, MR)),  # first week: < 5000
        (NOW.date() - timedelta(days=3), 5000, "none", (NORMAL,)),
        (NOW.date() - timedelta(days=3), 3000, "fever", (FMN, MR)),
        (NOW.date() - timedelta(days=200), 1200, "none", (NORMAL,)),  # infant: < 1000
        (NOW.date() - timedelta(days=200), 999, "none", (MOD, MR)),
        (NOW.date() - timedelta(days=200), 1200, "fever", (FNORM, NORMAL)),
        (NOW.date() - timedelta(days=200), 999, "fever", (FN, MR)),
        (NOW.date().replace(year=NOW.year - 1), 1200, "none", (MILD, MR)),  # one year old: < 1500
        (NOW.date().replace(year=NOW.year - 40), 1200, "none", (MILD, MR)),
    ],
    ids=["neonate-3000", "neonate-5000", "neonate-fever", "infant-1200", "infant-999", "infant-fever-1200",
         "infant-fever-999", "one-year", "adult"],
)
def test_paediatric_cutoffs(birth: Any, cells: int, temps: str, expected: tuple[str, ...]) -> None:
    resources = [patient(birth.isoformat()), anc_in(cells, "per-ul"), *TEMPERATURES[temps]]
    assert findings(*resources) == expected


def test_fn_cutoff_is_configurable() -> None:
    policy = ClinicalPolicy(fn_anc_cutoff=D(500))
    assert findings(anc_in(700, "si"), *TEMPERATURES["fever"], CHEMO, policy=policy) == (FMN,)
    assert findings(anc_in(499, "si"), *TEMPERATURES["fever"], CHEMO, policy=policy) == (FN, SEV)


def test_upper_bound_anc_is_graded_below_its_value() -> None:
    result = assess([anc("0.1", "10*9/L", ago(hours=1), comparator="<"), CHEMO], now=NOW)
    assert [f.value for f in result.findings] == [SEV, PROF]
    assert result.anc is not None and result.anc.ctcae_grade == 4


@pytest.mark.parametrize(
    ("cells", "low", "grade"),
    [(99, None, 4), (499, None, 4), (500, None, 3), (999, None, 3), (1000, None, 2), (1499, None, 2),
     (1500, None, 0), (1600, 1800, 1), (1800, 1800, 0), (1400, 1800, 2)],
    ids=lambda v: str(v),
)
def test_ctcae_grade(cells: int, low: int | None, grade: int) -> None:
    result = assess([anc(cells, "/uL", ago(hours=1), reference_low=low)], now=NOW)
    assert result.anc is not None and result.anc.ctcae_grade == grade


def test_every_finding_has_an_indicator() -> None:
    assert set(INDICATOR) == set(Finding)
    assert INDICATOR[Finding.FEBRILE_NEUTROPENIA] == "critical" and INDICATOR[Finding.ANC_NORMAL] is None


def test_snomed_fever_condition_is_not_a_temperature() -> None:
    assert findings(condition("386661006", SNOMED), anc_in(400, "si")) == (SEV, MR)


def test_rxnorm_code_in_wrong_system_is_ignored() -> None:
    assert findings(medication_request("338036", system=SNOMED), *TEMPERATURES["fever"]) == (FNA,)
    assert findings(medication_request("338036", system=RXNORM), *TEMPERATURES["fever"]) == (PFN,)


def test_urgency_ranks_critical_over_warning_over_info_over_no_card() -> None:
    assert sorted(URGENCY, key=URGENCY.__getitem__) == [None, "info", "warning", "critical"]
    assert len(set(URGENCY.values())) == len(URGENCY)


def test_no_temperature_is_afebrile() -> None:
    assert temperature_state(None) is TemperatureState.AFEBRILE


NEUTROPENIC_1200 = AncValue(D(1200), None, "measured", None, NOW, NOW, "final", False, ("Observation/a",))


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (RuleInput(), ()),  # no ANC, no fever, no risk factor, no data issue: no finding
        (RuleInput(anc=NEUTROPENIC_1200), (STALE,)),  # an ANC is stale unless said current
        (RuleInput(anc=NEUTROPENIC_1200, anc_current=True), (MILD, MR)),  # no chemotherapy context unless said
    ],
    ids=["nothing", "anc-not-current", "anc-current"],
)
def test_rule_input_defaults_know_nothing(facts: RuleInput, expected: tuple[str, ...]) -> None:
    assert tuple(f.value for f in evaluate(facts)) == expected


def test_rule_input_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RuleInput().anc_current = True  # type: ignore[misc]
