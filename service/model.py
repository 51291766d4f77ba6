"""The engine's result types: the fixed interface between the engine and card rendering.

``service.assessment`` re-exports every name here; see ``notes/assessment-interface.md``. The types live in their
own module so that the engine's parts (``extract``, ``anc``, ``fever``, ``rules``) can use them without importing
``service.assessment``, which imports those parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum

from service.thresholds import ANC_NORMAL_LOWER


class Finding(str, Enum):
    """Finding codes of design.md §3; declaration order is urgency order (most urgent first)."""

    FEBRILE_NEUTROPENIA = "febrile-neutropenia"  # R1
    PRESUMED_FEBRILE_NEUTROPENIA = "presumed-febrile-neutropenia"  # R2
    TEMPERATURE_ELEVATED = "temperature-elevated"  # R3
    FEVER_MILD_NEUTROPENIA = "fever-mild-neutropenia"  # R4
    FEVER_NO_ANC = "fever-no-anc"  # R5
    NEUTROPENIA_SEVERE = "neutropenia-severe"  # R7
    NEUTROPENIA_PROFOUND = "neutropenia-profound"  # R7 (<100/uL, always with SEVERE)
    NEUTROPENIA_MODERATE = "neutropenia-moderate"  # R8
    ANC_FALLING = "anc-falling"  # R13
    FEVER_NORMAL_ANC = "fever-normal-anc"  # R6
    NEUTROPENIA_MILD = "neutropenia-mild"  # R9
    ANC_STALE = "anc-stale"  # R11
    RISK_FACTOR_NO_ANC = "risk-factor-no-anc"  # R12
    MEDICATION_REVIEW = "medication-review"  # R15
    ANC_UNINTERPRETABLE = "anc-uninterpretable"  # R16
    ANC_NOT_COMPUTABLE = "anc-not-computable"  # R17
    ANC_NORMAL = "anc-normal"  # R10

    @property
    def rank(self) -> int:
        """0 for the most urgent finding, rising with declaration order."""
        return _RANK[self]


_RANK = {finding: index for index, finding in enumerate(Finding)}


@dataclass(frozen=True)
class Anc:
    """The newest usable absolute neutrophil count."""

    cells_per_ul: Decimal
    ctcae_grade: int  # 0..4 (1 only when below the lab's LLN)
    method: str  # "measured" | "computed"
    effective: datetime  # tz-aware UTC
    status: str  # FHIR Observation.status of the (newest) source
    preliminary: bool
    stale: bool  # older than the ANC currency window
    sources: tuple[str, ...]  # "Observation/<id>"
    #: Addition: "<" when the value is an upper bound (e.g. a result reported as "<0.1 10*9/L"), ">" when a lower
    #: bound, else None. An upper bound is graded as if the count were just below the value.
    comparator: str | None = None
    #: Addition: how a computed count was derived: "segs+bands", "wbc*total%" or "wbc*(segs%+bands%)".
    formula: str | None = None


@dataclass(frozen=True)
class Fever:
    """The temperatures in the window and whether they meet the fever rule (brief §0)."""

    max_celsius: Decimal  # 2 decimals
    criterion: str  # "single-reading" | "sustained" | "none"
    effective: datetime  # time of the qualifying (or max) reading
    sources: tuple[str, ...]
    #: Addition: for "sustained", the time of the first reading of the qualifying run.
    since: datetime | None = None
    #: Addition: True when a reading used is preliminary.
    preliminary: bool = False
    #: Addition: "<" (or "<=") when ``max_celsius`` is only an upper bound: every reading of the highest value was
    #: sent as below (at most) it, certainly below 38.0 C ("<38.0"), and no reading is above it; else None (a value,
    #: or a lower bound such as ">38.5", read at its bound).
    comparator: str | None = None


@dataclass(frozen=True)
class CodedRef:
    """A risk factor or a medication, as coded in the patient's record."""

    system: str
    code: str
    display: str | None
    source: str  # "Condition/x" / "MedicationRequest/y"


@dataclass(frozen=True)
class DataIssue:
    """A problem with the data that the clinician should know about."""

    #: "anc-uninterpretable", "anc-not-computable", "temperature-uninterpretable", "malformed-resource",
    #: "conflicting-duplicates", "missing-effective-time", "future-dated", "preliminary-result", "data-unavailable",
    #: "invalid-unread-elements" (used as it is; for the interface's maintainers, never on a card)
    code: str
    source: str | None
    detail: str | None


@dataclass(frozen=True)
class AncPoint:
    """One ANC of the trend."""

    cells_per_ul: Decimal
    effective: datetime
    source: str


@dataclass(frozen=True)
class Assessment:
    """The result of evaluating one patient's data at ``evaluated_at``."""

    evaluated_at: datetime
    findings: tuple[Finding, ...] = ()  # most urgent first
    anc: Anc | None = None  # newest usable ANC (stale ones too, flagged)
    fever: Fever | None = None  # omitted when no temperature in the window
    anc_trend: tuple[AncPoint, ...] = ()  # ANCs within the currency window, oldest first
    risk_factors: tuple[CodedRef, ...] = ()
    medications: tuple[CodedRef, ...] = ()  # active medicines that can cause neutropenia
    chemotherapy_context: bool = False
    age_years: int | None = None
    #: The ANC below which a patient of this age is neutropenic (brief §1.5; the adult one when the age is unknown).
    neutropenia_below: Decimal = ANC_NORMAL_LOWER
    data_issues: tuple[DataIssue, ...] = ()
    #: Addition: what established the chemotherapy/high-risk context (conditions, chemotherapy, G-CSF).
    context: tuple[CodedRef, ...] = ()

    def has(self, finding: Finding) -> bool:
        """Whether ``finding`` is among the findings."""
        return finding in self.findings

    @property
    def counted_risk_factors(self) -> tuple[CodedRef, ...]:
        """Everything R12 counts as a risk factor, each once: the conditions, the current medicines that can cause
        neutropenia, then what established the chemotherapy context (a G-CSF or chemotherapy order)."""
        return tuple(dict.fromkeys((*self.risk_factors, *self.medications, *self.context)))
