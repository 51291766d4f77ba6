"""Rules R1-R17 of brief §4 as data: the temperature x ANC table, the grade bands and the add-ons.

Pure: plain inputs in, findings (most urgent first) out. Numbers come from ``service.thresholds``.
Readings of the brief's table, literally:
- R7-R9 grade afebrile patients only (a temperature that does not meet the fever rule is afebrile: R3 asks for
  "TEMP_ELEVATED + grade"); with a fever the only grade findings are R1's severe/profound sub-flag and R10's
  anc-normal, which has no temperature condition;
- R13 needs at least two current ANCs, each lower than the one before it, the newest below 1500/uL;
DESIGN interpretations, where the brief leaves room:
- "no current ANC" (R2, R5) includes a stale ANC, an uninterpretable one and none at all; R12 needs no usable
  ANC at all (a stale one gets R11 instead);
- R3 uses the febrile-neutropenia cut-off of the policy (1000/uL by default) and fires on any reading of
  38.0 C or more in the window when the fever rule is not met;
- R4 covers [FN cut-off, age-specific neutropenia cut-off), R7-R10 use the age-specific cut-off (brief §1.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum

from service.anc import AncValue
from service.model import Fever, Finding
from service.thresholds import (
    ANC_FALLING_LATEST_BELOW,
    ANC_MODERATE_BELOW,
    ANC_NORMAL_LOWER,
    ANC_PROFOUND_BELOW,
    ANC_SEVERE_BELOW,
    DEFAULT_POLICY,
    FEVER_SUSTAINED,
    ClinicalPolicy,
    neutropenia_below,
)


class TemperatureState(str, Enum):
    """The temperatures of the window, as the rules see them."""

    FEVER = "fever"  # the fever rule is met
    ELEVATED = "elevated"  # a reading >= 38.0 C but the fever rule is not met
    AFEBRILE = "afebrile"  # readings, none >= 38.0 C, or no reading at all


class AncBand(str, Enum):
    """The current ANC relative to the febrile-neutropenia and neutropenia cut-offs."""

    BELOW_FN = "below-fn"  # < FN cut-off (1000/uL)
    NEUTROPENIC = "neutropenic"  # >= FN cut-off and < the age's neutropenia cut-off
    NORMAL = "normal"  # >= the neutropenia cut-off
    NONE = "none"  # no current ANC


#: (temperature, ANC band) -> (finding without, finding with chemotherapy/high-risk context). Brief §4 R1-R6.
TEMPERATURE_RULES: Mapping[tuple[TemperatureState, AncBand], tuple[Finding, Finding]] = {
    (TemperatureState.FEVER, AncBand.BELOW_FN): (Finding.FEBRILE_NEUTROPENIA,) * 2,  # R1
    (TemperatureState.FEVER, AncBand.NONE): (Finding.FEVER_NO_ANC, Finding.PRESUMED_FEBRILE_NEUTROPENIA),  # R5/R2
    (TemperatureState.ELEVATED, AncBand.BELOW_FN): (Finding.TEMPERATURE_ELEVATED,) * 2,  # R3
    (TemperatureState.FEVER, AncBand.NEUTROPENIC): (Finding.FEVER_MILD_NEUTROPENIA,) * 2,  # R4
    (TemperatureState.FEVER, AncBand.NORMAL): (Finding.FEVER_NORMAL_ANC,) * 2,  # R6
}

#: The card indicator of each finding (brief §4; None = no card). Used to rank urgency.
INDICATOR: Mapping[Finding, str | None] = {
    Finding.FEBRILE_NEUTROPENIA: "critical",
    Finding.PRESUMED_FEBRILE_NEUTROPENIA: "critical",
    Finding.TEMPERATURE_ELEVATED: "warning",
    Finding.FEVER_MILD_NEUTROPENIA: "warning",
    Finding.FEVER_NO_ANC: "warning",
    Finding.NEUTROPENIA_SEVERE: "warning",
    Finding.NEUTROPENIA_PROFOUND: "warning",
    Finding.NEUTROPENIA_MODERATE: "warning",
    Finding.ANC_FALLING: "warning",
    Finding.FEVER_NORMAL_ANC: "info",
    Finding.NEUTROPENIA_MILD: "info",
    Finding.ANC_STALE: "info",
    Finding.RISK_FACTOR_NO_ANC: "info",
    Finding.MEDICATION_REVIEW: "info",
    Finding.ANC_UNINTERPRETABLE: "info",
    Finding.ANC_NOT_COMPUTABLE: "info",
    Finding.ANC_NORMAL: None,
}
URGENCY: Mapping[str | None, int] = {"critical": 3, "warning": 2, "info": 1, None: 0}


@dataclass(frozen=True)
class RuleInput:
    """What the rules read."""

    anc: AncValue | None = None  # the newest usable ANC, current or stale
    anc_current: bool = False  # whether ``anc`` is within the currency window
    trend: Sequence[Decimal] = ()  # current ANCs, oldest first
    fever: Fever | None = None
    chemotherapy_context: bool = False
    risk_factor: bool = False  # any seed risk factor (condition, medicine, chemotherapy)
    drug_induced: bool = False  # an active drug-induced neutropenia diagnosis
    uninterpretable: bool = False
    not_computable: bool = False
    age_years: int | None = None
    age_days: int | None = None


def ctcae_grade(anc: AncValue) -> int:
    """CTCAE v5 "Neutrophil count decreased" grade: 4 <500, 3 <1000, 2 <1500, 1 below the lab's LLN, else 0."""
    for grade, cut in ((4, ANC_SEVERE_BELOW), (3, ANC_MODERATE_BELOW), (2, ANC_NORMAL_LOWER)):
        if anc.below(cut):
            return grade
    return 1 if anc.reference_low is not None and anc.below(anc.reference_low) else 0


def temperature_state(fever: Fever | None) -> TemperatureState:
    """Fever, elevated (>= 38.0 C without meeting the rule) or afebrile."""
    if fever is None:
        return TemperatureState.AFEBRILE
    if fever.criterion != "none":
        return TemperatureState.FEVER
    # An upper bound ("<38.0": every reading was below it) is below the cut it equals.
    elevated = fever.max_celsius >= FEVER_SUSTAINED and fever.comparator is None
    return TemperatureState.ELEVATED if elevated else TemperatureState.AFEBRILE


def anc_band(anc: AncValue | None, cutoff: Decimal, policy: ClinicalPolicy) -> AncBand:
    """Where a current ANC falls relative to the FN cut-off and the neutropenia cut-off."""
    if anc is None:
        return AncBand.NONE
    if anc.below(policy.fn_anc_cutoff):
        return AncBand.BELOW_FN
    return AncBand.NEUTROPENIC if anc.below(cutoff) else AncBand.NORMAL


def grade_findings(anc: AncValue, cutoff: Decimal) -> tuple[Finding, ...]:
    """R7-R10: the severity findings of a current ANC (profound is a subset of severe)."""
    bands = (
        (ANC_PROFOUND_BELOW, (Finding.NEUTROPENIA_SEVERE, Finding.NEUTROPENIA_PROFOUND)),
        (ANC_SEVERE_BELOW, (Finding.NEUTROPENIA_SEVERE,)),
        (ANC_MODERATE_BELOW, (Finding.NEUTROPENIA_MODERATE,)),
        (cutoff, (Finding.NEUTROPENIA_MILD,)),
    )
    return next((findings for cut, findings in bands if anc.below(cut)), (Finding.ANC_NORMAL,))


#: The grade findings that may accompany a fever: R1's sub-flags and R10 (brief §4).
WITH_FEVER = frozenset({Finding.NEUTROPENIA_SEVERE, Finding.NEUTROPENIA_PROFOUND, Finding.ANC_NORMAL})


def falling(trend: Sequence[Decimal]) -> bool:
    """R13: at least two current ANCs, each lower than the one before it, the newest below 1500/uL."""
    return (
        len(trend) >= 2
        and all(later < earlier for earlier, later in zip(trend, trend[1:]))
        and trend[-1] < ANC_FALLING_LATEST_BELOW
    )


def evaluate(facts: RuleInput, *, policy: ClinicalPolicy = DEFAULT_POLICY) -> tuple[Finding, ...]:
    """All findings of rules R1-R17 for ``facts``, most urgent first."""
    cutoff = neutropenia_below(facts.age_years, facts.age_days)
    current = facts.anc if facts.anc_current else None
    state, band = temperature_state(facts.fever), anc_band(current, cutoff, policy)
    found: set[Finding] = set()
    rule = TEMPERATURE_RULES.get((state, band))
    if rule is not None:
        found.add(rule[facts.chemotherapy_context])
    if current is not None:
        grades = grade_findings(current, cutoff)  # R7-R10
        found.update(g for g in grades if state is not TemperatureState.FEVER or g in WITH_FEVER)
        if falling(facts.trend):
            found.add(Finding.ANC_FALLING)  # R13
        if current.below(cutoff) and not facts.chemotherapy_context:
            found.add(Finding.MEDICATION_REVIEW)  # R15
    elif facts.anc is not None:
        found.add(Finding.ANC_STALE)  # R11
    elif state is not TemperatureState.FEVER and facts.risk_factor:
        found.add(Finding.RISK_FACTOR_NO_ANC)  # R12
    if facts.drug_induced:
        found.add(Finding.MEDICATION_REVIEW)  # R15
    if facts.uninterpretable:
        found.add(Finding.ANC_UNINTERPRETABLE)  # R16
    if facts.not_computable:
        found.add(Finding.ANC_NOT_COMPUTABLE)  # R17
    return tuple(sorted(found, key=lambda finding: finding.rank))
