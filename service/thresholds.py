"""Every clinical number the engine uses, each with its citation (starlette ``status.py`` style).

Sources are the keys of ``/work/shared/clinical-brief.md`` (``[S1]`` = NCI CTCAE v5.0, ``[S2]`` = IDSA 2010,
``[S3]`` = ASCO/IDSA 2018, ``[S10]`` = CDC, ``[S15]`` = paediatric references, ``[S20]`` = FHIR bodytemp). Counts
are absolute neutrophils in cells/uL (= /mm3); temperatures are degrees Celsius, already rounded to 2 decimals.

Numbers that a deployment may reasonably set differently (staleness windows, the febrile-neutropenia ANC
cut-off, look-backs) live in :class:`ClinicalPolicy`; the rest are fixed module constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

# --- Neutrophil counts, cells/uL ------------------------------------------------------------------------------

#: ANC at or above this (and at or above the lab's LLN) is CTCAE grade 0 / not neutropenic (adults).
#: CTCAE v5 "Neutrophil count decreased" G2 "<1500 - 1000/mm3" [S1]; brief §1.1.
ANC_NORMAL_LOWER = Decimal(1500)
#: Below this is CTCAE grade 3 "moderate" (G3 "<1000 - 500/mm3") [S1]; brief §1.1.
ANC_MODERATE_BELOW = Decimal(1000)
#: Below this is CTCAE grade 4 "severe" (G4 "<500/mm3") [S1]; brief §1.1.
ANC_SEVERE_BELOW = Decimal(500)
#: Below this is "profound" neutropenia, a subset of severe (IDSA 2010 [S2]); brief §1.1.
ANC_PROFOUND_BELOW = Decimal(100)
#: R13: a falling series is flagged when its latest value is below this (brief §4 R13).
ANC_FALLING_LATEST_BELOW = Decimal(1500)

# --- Paediatric neutropenia cut-offs by age (brief §1.5, [S15]) -------------------------------------------------

#: First week of life: neutropenia below 5000/uL [S15] (applied up to day 13, see below).
NEONATE_NEUTROPENIA_BELOW = Decimal(5000)
#: Infants 2 weeks to 1 year: neutropenia below 1000/uL [S15].
INFANT_MIN_AGE_DAYS = 14
INFANT_NEUTROPENIA_BELOW = Decimal(1000)
#: DESIGN: days 7-13 fall between the two published bands; the higher (neonatal) cut-off is used there,
#: the conservative choice. After the first birthday the adult cut-off (1500) applies [S15].
INFANT_MAX_AGE_YEARS = 1
#: DESIGN: a birthDate has no time zone, and where the local date runs ahead of UTC (up to UTC+14) a baby born
#: today may carry tomorrow's UTC date: a birthDate up to this long after the evaluation date is a newborn (age
#: 0); a later one is an error in the record, reported, and the age is unknown.
BIRTH_DATE_TOLERANCE = timedelta(days=1)

# --- Temperatures, degrees Celsius (brief §0 and §1.2) --------------------------------------------------------

#: Fever on a single reading: >= 38.3 C (101 F). IDSA 2010 [S2], CDC [S10]; brief §0 (DESIGN: >= not >).
FEVER_SINGLE_READING = Decimal("38.3")
#: Fever when readings stay >= 38.0 C (100.4 F) ... IDSA 2010 [S2], CDC [S10]; brief §0.
FEVER_SUSTAINED = Decimal("38.0")
#: ... over a run whose first and last readings are at least 60 minutes apart; brief §0.
FEVER_SUSTAINED_DURATION = timedelta(minutes=60)
#: Temperatures are compared after rounding to this many decimals (brief §0, §2 DESIGN).
TEMPERATURE_DECIMALS = 2

# --- Plausibility: values no measurement of a living patient gives (DESIGN; the brief gives no range) ---------
# A value outside these limits is reported as uninterpretable (a data issue and the data-quality card) and is
# never graded: it is a unit or entry error far more often than a measurement, and grading it can raise a false
# emergency (a temperature of 98.6 recorded in Cel) or a false all clear (38.6 recorded in [degF] is 3.67 °C).

#: DESIGN: the lowest plausible body temperature, °C (inclusive, compared after rounding, brief §0). Well below
#: therapeutic hypothermia (32-34 °C) and most severe accidental hypothermia; a reading below it is far likelier
#: a °C value recorded as [degF] (38.6 [degF] = 3.67 °C) or a typing error than a measurement. A real one (deep
#: accidental hypothermia) is reported, not graded; rejecting a low reading can hide no fever (it can only join
#: two febrile readings into a sustained run).
TEMPERATURE_PLAUSIBLE_MIN = Decimal("25.00")
#: DESIGN: the highest plausible body temperature, °C (inclusive): above heat stroke (over 40 °C) and just below
#: the highest temperatures ever survived (about 46 °C, UNVERIFIED); a reading above it is far likelier a °F
#: value recorded as Cel (98.6-106 °F) or a typing error (386 for 38.6) than a measurement. [degF] readings are
#: converted first, so the same limits hold for them (77.00-113.00 °F).
TEMPERATURE_PLAUSIBLE_MAX = Decimal("45.00")
#: DESIGN: the highest plausible cell count (ANC, absolute segmented or band neutrophils, WBC), cells/uL
#: (inclusive). Twice the extreme hyperleukocytosis of leukaemia (white cell counts around 10^6/uL, UNVERIFIED),
#: so no real count is refused; anything above it (10^12/uL) is not a blood count but a unit or entry error.
COUNT_PLAUSIBLE_MAX = Decimal(2_000_000)

# --- Units (brief §2) ----------------------------------------------------------------------------------------

#: 10^9/L (= 10^3/uL) to cells/uL (mCODE EquivalentUnits-thousand-per-uL [S21]).
THOUSAND_PER_UL = Decimal(1000)
#: A percentage to a fraction.
PERCENT = Decimal("0.01")


@dataclass(frozen=True)
class ClinicalPolicy:
    """The clinical numbers a deployment may set differently; defaults are the brief's DESIGN choices."""

    #: An ANC is current if no older than this (brief §2 DESIGN: "ANC current if <= 7 days old"; no guideline).
    anc_current_window: timedelta = timedelta(days=7)
    #: Temperatures are considered if no older than this (brief §2 DESIGN: "<= 24 h old").
    temperature_window: timedelta = timedelta(hours=24)
    #: Febrile neutropenia = fever AND ANC below this (brief §1.2 DESIGN; CTCAE v5 FN "ANC <1000/mm3" [S1]).
    fn_anc_cutoff: Decimal = Decimal(1000)
    #: G-CSF given within this look-back counts as chemotherapy context for R2 (brief §4 R2).
    gcsf_lookback: timedelta = timedelta(days=14)
    #: A completed/stopped chemotherapy order within this look-back counts as chemotherapy context
    #: (brief §1.4 DESIGN: nadir window day 7-14 after a dose).
    chemotherapy_lookback: timedelta = timedelta(days=14)
    #: Results timed later than ``now`` plus this are future-dated and ignored (brief §2 DESIGN: 5 min).
    future_tolerance: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        for name in ("anc_current_window", "temperature_window", "gcsf_lookback", "chemotherapy_lookback"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.future_tolerance < timedelta(0):
            raise ValueError("future_tolerance must not be negative")
        if not Decimal(0) < self.fn_anc_cutoff <= ANC_NORMAL_LOWER:
            raise ValueError("fn_anc_cutoff must be in (0, 1500] cells/uL")


DEFAULT_POLICY = ClinicalPolicy()


def neutropenia_below(age_years: int | None, age_days: int | None) -> Decimal:
    """The ANC below which a patient of this age is neutropenic (brief §1.5).

    The adult cut-off applies when the age is unknown (brief §1.5 uses ``Patient.birthDate`` "if available"); an
    unusable birthDate is reported as a data issue, so the fall-back is never silent.
    """
    if age_years is None or age_days is None or age_years >= INFANT_MAX_AGE_YEARS:
        return ANC_NORMAL_LOWER
    if age_days < INFANT_MIN_AGE_DAYS:
        return NEONATE_NEUTROPENIA_BELOW
    return INFANT_NEUTROPENIA_BELOW
