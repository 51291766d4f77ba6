"""What the cards say, as data: one `CardTemplate` per card kind (design.md §3, clinical-brief.md §4).

Text is the project's own wording of the facts in clinical-brief.md §0 and §1.2; no sentence is copied from a
source. Details are GitHub Flavored Markdown without raw HTML and never use the less-than sign (the Cerner panel
and other EHRs do not render HTML). Counts are written "/uL" throughout.

Summary format fields, filled by `service.cards` (each already includes its unit):
``{anc}`` "400/uL (grade 4, preliminary)" · ``{temp}`` "38.4 °C" · ``{date}`` "2025-03-10" ·
``{days}`` "12" · ``{falling}`` ", falling" or "" · ``{count}`` "3" · ``{medicines}`` "3 active medicines" ·
``{fn_anc}`` "1000/uL" (the febrile-neutropenia cut-off; from `CardSettings`) · ``{normal_anc}`` "1500/uL" (the
lower limit of a normal ANC for the patient's age, brief §1.5).
Numbers written into the text (100/uL; 38.0, 38.3 °C, 60 minutes) are checked against
`service.thresholds` by the tests.
Details may use the same fields.

Each template lists the finding codes it renders in ``indicators`` (with the brief's §4 indicator for each);
a card's indicator is the most urgent of its findings. ``summaries`` is ordered: the first key whose finding
is present picks the summary; keys that are not finding codes (``infection-prevention``, ``data-issues``)
are the fall-back when none is, and ``medication-review-unlisted`` is used when no listed medicine is active.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cds_hooks.models import Indicator

CARD_KIND_SYSTEM = "https://neutropenia-cds.org/fhir/CodeSystem/card-kind"
OVERRIDE_REASON_SYSTEM = "https://neutropenia-cds.org/fhir/CodeSystem/override-reason"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"

#: Short names for the code systems shown in card details.
SYSTEM_NAMES: Mapping[str, str] = {
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://www.whocc.no/atc": "ATC",
    SNOMED: "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    LOINC: "LOINC",
}

#: Fixed phrases of the card details (the facts sections that `service.cards` builds from patient data).
RESULTS_TABLE_HEADER = "| Result | Value | Time | Status |\n|---|---|---|---|"
NO_RESULTS = "No ANC or temperature available."
ANC_METHODS: Mapping[str, str] = {"measured": "ANC, measured", "computed": "ANC, computed from WBC and differential"}
#: `Anc.formula` -> how a computed count was derived.
ANC_FORMULAS: Mapping[str, str] = {
    "segs+bands": "ANC, computed: absolute segs + bands",
    "wbc*total%": "ANC, computed: WBC x total neutrophil %",
    "wbc*(segs%+bands%)": "ANC, computed: WBC x (segs % + bands %)",
}
#: `Anc.comparator`, `Fever.comparator` -> words before the number ("<" must not reach a detail: no raw HTML).
COMPARATORS: Mapping[str, str] = {"<": "below ", ">": "above ", "<=": "at most ", ">=": "at least "}
PRELIMINARY = "**preliminary**, confirm"
ANC_STALE = "too old to grade"
TEMPERATURE_ROW = "Temperature, highest"
FEVER_CRITERIA: Mapping[str, str] = {
    "single-reading": "one reading of 38.3 °C or more",
    "sustained": "38.0 °C or more for 60 minutes",
    "none": "below the fever rule",
}
TREND = "Recent ANCs, oldest first: {points}/uL."
PROFOUND_NOTE = "ANC below 100/uL: profound neutropenia, the highest risk."
#: After the mild-neutropenia advice, only where the adult cut-off applies (brief §1.5: DANC reference intervals
#: are adults'; a neonate's "mild" band runs up to 5000/uL).
DUFFY_NULL_NOTE = ("A count in this range can be usual in Duffy-null associated neutrophil count (formerly benign "
                   "ethnic neutropenia).")
MEDICINES_HEADING = "Active medicines that can cause neutropenia:"
NO_MEDICINES = "No active medicine on our list was found; review the medicine list by hand."
RISK_FACTORS_HEADING = "Risk factors on record:"
CONTEXT_HEADING = "Why the patient counts as high risk:"
ISSUES_HEADING = "Problems found:"
NOT_AVAILABLE: Mapping[str, str] = {"anc": "not available", "temp": "temperature not available",
                                    "date": "unknown date", "days": "?"}

#: Data-issue codes (engine `DataIssue.code`) and how the data-quality card names them.
DATA_ISSUE_LABELS: Mapping[str, str] = {
    "anc-uninterpretable": "ANC result not usable",
    "temperature-uninterpretable": "Temperature not usable",
    "anc-not-computable": "ANC could not be calculated",
    "malformed-resource": "Record could not be read",
    "conflicting-duplicates": "Copies of one record disagree",
    "missing-effective-time": "Result without a time",
    "future-dated": "Result dated in the future",
    "data-unavailable": "Data could not be obtained",
}
#: Data issues shown elsewhere (the results tables flag preliminary values); they alone make no card.
DATA_ISSUES_SHOWN_ELSEWHERE = frozenset({"preliminary-result"})
#: Data issues for whoever maintains the EHR interface, not for the clinician: in the assessment extension only.
#: A record invalid only in elements the rules never read was used as it is; nothing about the patient changes.
DATA_ISSUES_FOR_INTEGRATORS = frozenset({"invalid-unread-elements"})


@dataclass(frozen=True)
class Order:
    """A lab order a suggestion can propose, as a FHIR R4 ServiceRequest (clinical-brief.md §3.1b)."""

    code: str
    display: str
    text: str
    label: str


BLOOD_CULTURES = Order("600-7", "Bacteria identified in Blood by Culture", "Blood cultures, at least two sets",
                       "Order blood cultures (at least two sets)")
CBC_WITH_DIFFERENTIAL = Order("57021-8", "CBC W Auto Differential panel - Blood", "CBC with differential",
                              "Order a CBC with differential")
#: ServiceRequest.category: SNOMED CT 108252007 "Laboratory procedure" (FHIR R4 servicerequest-category).
LAB_CATEGORY = {"system": SNOMED, "code": "108252007", "display": "Laboratory procedure"}


@dataclass(frozen=True)
class Suggested:
    """Orders a card proposes when some of ``findings`` are present (all of them if ``findings`` is empty)."""

    orders: tuple[Order, ...]
    priority: str  # ServiceRequest.priority: routine | urgent | asap | stat
    reason: str  # ServiceRequest.reasonCode text
    recommended: bool = False
    findings: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LinkTemplate:
    """A link whose URL is the `CardSettings` field named ``setting``."""

    label: str
    setting: str


@dataclass(frozen=True)
class CardTemplate:
    """Everything fixed about one card kind."""

    kind: str
    title: str  # source.topic.display
    indicators: Mapping[str, Indicator]
    summaries: Mapping[str, str]
    advice: Mapping[str, str]  # per finding, in this order; only present findings are shown
    common: str = ""  # markdown appended after the advice
    suggested: Suggested | None = None
    override_reasons: tuple[tuple[str, str], ...] = ()  # (code, display)
    links: tuple[LinkTemplate, ...] = ()


_WARNING, _INFO, _CRITICAL = Indicator.WARNING, Indicator.INFO, Indicator.CRITICAL

_ESCALATION_RULE = (
    "**When it becomes an emergency:** with an ANC below {fn_anc}, any single temperature of 38.3 °C (101 °F) "
    "or more, or readings that stay at 38.0 °C (100.4 °F) or more for 60 minutes, is febrile neutropenia."
)

FEBRILE_NEUTROPENIA = CardTemplate(
    kind="febrile-neutropenia",
    title="Febrile neutropenia",
    indicators={"febrile-neutropenia": _CRITICAL, "presumed-febrile-neutropenia": _CRITICAL},
    summaries={
        "febrile-neutropenia": "Febrile neutropenia: ANC {anc} with {temp} — emergency",
        "presumed-febrile-neutropenia": "Presumed febrile neutropenia: {temp}, no current ANC, high-risk patient "
                                        "— treat as emergency",
    },
    advice={
        "febrile-neutropenia": "Fever with an ANC below {fn_anc}: this is febrile neutropenia.",
        "presumed-febrile-neutropenia": "Fever in a patient on chemotherapy or with a high-risk condition, and "
                                        "no current ANC. Treat as suspected neutropenic sepsis now; do not wait "
                                        "for the count. Send a CBC with differential urgently.",
    },
    common=(
        "**Act now**\n\n"
        "- Take blood cultures (at least two sets); do not let this delay antibiotics.\n"
        "- Give the first dose of empirical broad-spectrum antibiotics within 1 hour of triage.\n"
        "- Look for a source of infection; avoid rectal thermometers and examinations.\n"
        "- Assess the risk of complications (MASCC score; CISNE for a clinically stable patient with a solid "
        "tumour) before any outpatient plan."
    ),
    suggested=Suggested(orders=(BLOOD_CULTURES, CBC_WITH_DIFFERENTIAL), priority="stat",
                        reason="Febrile neutropenia (suspected or confirmed)", recommended=True),
    override_reasons=(
        ("already-treated", "Already assessed; antibiotics started"),
        ("not-clinically-consistent", "Not consistent with the clinical picture"),
        ("comfort-care", "Patient receives comfort care only"),
        ("result-in-error", "Temperature or count believed to be in error"),
    ),
    links=(LinkTemplate("ASCO/IDSA fever and neutropenia guideline", "febrile_neutropenia_guideline_url"),
           LinkTemplate("NICE neutropenic sepsis guideline", "neutropenic_sepsis_guideline_url")),
)

FEVER_ESCALATION = CardTemplate(
    kind="fever-escalation",
    title="Fever escalation",
    indicators={"temperature-elevated": _WARNING, "fever-mild-neutropenia": _WARNING, "fever-no-anc": _WARNING,
                "fever-normal-anc": _INFO},
    summaries={
        "temperature-elevated": "Temperature {temp} with ANC {anc}: recheck within 1 hour",
        "fever-mild-neutropenia": "Fever {temp} with neutropenia, ANC {anc}: review today",
        "fever-no-anc": "Fever {temp} and no current ANC: get a CBC with differential urgently",
        "fever-normal-anc": "Fever {temp} with ANC {anc}: not neutropenic, usual fever assessment",
    },
    advice={
        "temperature-elevated": "A temperature from 38.0 °C to 38.29 °C, not yet held for 60 minutes: not yet a "
                                "fever by our rule, but the patient is neutropenic. Recheck the temperature within "
                                "1 hour.\n\n"
                                + _ESCALATION_RULE,
        "fever-mild-neutropenia": "Fever with an ANC of {fn_anc} or more but below {normal_anc}, the lower limit for "
                                  "the patient's age: not febrile neutropenia by our rule. "
                                  "See the patient today, repeat the CBC with differential and look for a source "
                                  "of infection.\n\n" + _ESCALATION_RULE,
        "fever-no-anc": "Fever without a current ANC. Get a CBC with differential urgently: an ANC below "
                        "{fn_anc} makes this febrile neutropenia, an emergency.",
        "fever-normal-anc": "Fever with an ANC of {normal_anc} or more, normal for the patient's age: not febrile "
                            "neutropenia. Assess the fever in the usual way.",
    },
    suggested=Suggested(orders=(CBC_WITH_DIFFERENTIAL,), priority="urgent", reason="Fever; ANC needed",
                        recommended=True, findings=frozenset({"fever-mild-neutropenia", "fever-no-anc"})),
    override_reasons=(
        ("already-assessed", "Already assessed"),
        ("not-clinically-consistent", "Not consistent with the clinical picture"),
        ("result-in-error", "Temperature believed to be in error"),
    ),
    links=(LinkTemplate("ASCO/IDSA fever and neutropenia guideline", "febrile_neutropenia_guideline_url"),),
)

NEUTROPENIA = CardTemplate(
    kind="neutropenia",
    title="Neutropenia",
    indicators={"neutropenia-profound": _WARNING, "neutropenia-severe": _WARNING,
                "neutropenia-moderate": _WARNING, "neutropenia-mild": _INFO, "anc-falling": _WARNING},
    summaries={
        "neutropenia-profound": "Profound neutropenia: ANC {anc} on {date}{falling}",
        "neutropenia-severe": "Severe neutropenia: ANC {anc} on {date}{falling}",
        "neutropenia-moderate": "Moderate neutropenia: ANC {anc} on {date}{falling}",
        "neutropenia-mild": "Mild neutropenia: ANC {anc} on {date}{falling}",
        "anc-falling": "Falling ANC: {anc} on {date}, lower than each count before it",
    },
    advice={
        "neutropenia-profound": "ANC below 100/uL (profound): the highest risk of serious infection.",
        "neutropenia-severe": "Severe neutropenia: use strict infection precautions, involve the oncology or "
                              "haematology team, decide with them on G-CSF or antimicrobial prophylaxis, and "
                              "make sure the patient knows the fever rule.",
        "neutropenia-moderate": "Moderate neutropenia: give the infection-prevention advice, have the temperature "
                                "checked twice a day and look for the cause.",
        # The Duffy-null note (DUFFY_NULL_NOTE) follows where the adult mild band (1000-1499/uL) applies.
        "neutropenia-mild": "Mild neutropenia: repeat the CBC with differential and review medicines.",
        "anc-falling": "Each recent ANC was lower than the one before. Expect the lowest count about 7 to 14 "
                       "days after chemotherapy; recheck in 24 to 48 hours.",
    },
    suggested=Suggested(orders=(CBC_WITH_DIFFERENTIAL,), priority="routine", reason="Follow-up of neutropenia",
                        findings=frozenset({"neutropenia-mild", "anc-falling"})),
    override_reasons=(
        ("known-and-managed", "Known neutropenia, already managed"),
        ("constitutional-low-count", "Known constitutional low count (e.g. Duffy-null)"),
        ("result-in-error", "Count believed to be in error"),
    ),
    links=(LinkTemplate("NCI CTCAE grading", "ctcae_url"),),
)

INFECTION_PREVENTION = CardTemplate(
    kind="infection-prevention",
    title="Infection prevention",
    # R14 is an add-on: its indicator is that of the card that triggers it (see `service.cards`).
    indicators={},
    summaries={"infection-prevention": "Infection prevention: advice to give the patient, and when to call"},
    advice={},
    common=(
        "For the clinician to pass on. General education, not individual medical advice; the patient takes "
        "part in decisions about their care.\n\n"
        "**Call the emergency number** for a temperature of 38.0 °C (100.4 °F) or more that lasts an hour or longer, "
        "or 38.3 °C (101 °F) or more even once.\n\n"
        "**Call the care team** for chills or fever, a new cough, a sore throat or new mouth sore, redness or "
        "swelling anywhere, pain in the belly or back passage, burning or pain when passing urine, diarrhoea, or "
        "feeling more tired or forgetful than usual.\n\n"
        "**Lower the risk of infection**\n\n"
        "- Clean hands before handling or eating food and after the toilet.\n"
        "- Wash every day; shave with an electric razor only.\n"
        "- Brush teeth gently twice a day with a soft brush; floss only if the care team agrees.\n"
        "- Keep away from crowds and people who are ill.\n"
        "- Avoid contact with animals' saliva, urine and droppings; leave litter boxes and fish tanks to someone "
        "else.\n"
        "- Wash raw fruit and vegetables well; cook meat and eggs through.\n"
        "- For constipation use a stool softener; no suppositories or enemas.\n"
        "- Ask the care team about vaccines (yearly flu vaccine, pneumococcal vaccine)."
    ),
    override_reasons=(
        ("already-educated", "Patient already has this advice"),
        ("not-applicable", "Not applicable to this patient"),
    ),
    links=(LinkTemplate("CDC: neutropenia and infection risk", "infection_prevention_url"),),
)

MEDICATION_REVIEW = CardTemplate(
    kind="medication-review",
    title="Medication review",
    indicators={"medication-review": _INFO},
    summaries={
        "medication-review": "Medication review: {medicines} that can lower the neutrophil count",
        "medication-review-unlisted": "Medication review: look for a medicine that may lower the neutrophil count",
    },
    advice={
        # Neutral about the count: R15 also fires on a drug-induced neutropenia on record with a normal ANC.
        "medication-review": "Consider whether a medicine is lowering the neutrophil count; stopping or switching it "
                             "is the prescriber's decision. Also treat any infection, check nutrition (vitamin B12, "
                             "folate, copper) and discuss G-CSF with a specialist if needed.",
    },
    override_reasons=(
        ("already-reviewed", "Medicines already reviewed"),
        ("benefit-outweighs-risk", "Benefit outweighs the risk"),
    ),
)

LAB_FOLLOW_UP = CardTemplate(
    kind="lab-follow-up",
    title="Lab follow-up",
    indicators={"anc-stale": _INFO, "risk-factor-no-anc": _INFO},
    summaries={
        "anc-stale": "Last ANC {anc} is {days} days old ({date}): repeat the CBC with differential",
        "risk-factor-no-anc": "Risk factors for neutropenia and no usable ANC: consider a CBC with differential",
    },
    advice={
        "anc-stale": "The newest ANC is too old to grade. Repeat the CBC with differential.",
        "risk-factor-no-anc": "No usable ANC on record, but the patient has risk factors for neutropenia. "
                              "Consider a CBC with differential.",
    },
    suggested=Suggested(orders=(CBC_WITH_DIFFERENTIAL,), priority="routine", reason="ANC missing or out of date"),
    override_reasons=(
        ("already-ordered", "CBC already ordered"),
        ("not-needed", "Count not needed now"),
    ),
)

DATA_QUALITY = CardTemplate(
    kind="data-quality",
    title="Data quality",
    indicators={"anc-uninterpretable": _INFO, "anc-not-computable": _INFO},
    summaries={
        "anc-uninterpretable": "ANC not graded: the result has no usable unit or value — check it",
        "anc-not-computable": "ANC not calculated: neutrophil % and white cell count do not match up",
        "data-issues": "Some data could not be used: {count} problem(s), the assessment may be incomplete",
    },
    advice={
        "anc-uninterpretable": "An ANC result has no unit or an unknown one, or a value no blood count can have, "
                               "so it was not graded. Check it with the laboratory.",
        "anc-not-computable": "A neutrophil percentage came without a white cell count from the same sample (or "
                              "the reverse), so no ANC could be calculated. Ask for an absolute neutrophil count.",
    },
    override_reasons=(
        ("checked", "Result checked with the laboratory"),
        ("not-relevant", "Not relevant now"),
    ),
)

#: Every card kind, in the order cards of equal urgency are shown.
CARD_TEMPLATES: Mapping[str, CardTemplate] = {
    t.kind: t
    for t in (FEBRILE_NEUTROPENIA, FEVER_ESCALATION, NEUTROPENIA, INFECTION_PREVENTION, MEDICATION_REVIEW,
              LAB_FOLLOW_UP, DATA_QUALITY)
}

#: finding code -> card kind, derived from the templates (anc-normal has no card).
FINDING_KINDS: Mapping[str, str] = {code: t.kind for t in CARD_TEMPLATES.values() for code in t.indicators}

#: A card kind is left out when one of these findings is present: the superseding card already states the
#: ANC, grade and trend (febrile neutropenia) or proposes the urgent CBC and shows the old ANC (R2, R5).
SUPPRESSED_BY: Mapping[str, frozenset[str]] = {
    "neutropenia": frozenset({"febrile-neutropenia", "presumed-febrile-neutropenia"}),
    "lab-follow-up": frozenset({"presumed-febrile-neutropenia", "fever-no-anc"}),
}

#: R14: infection-prevention advice accompanies these findings (ANC below the cut-off, or febrile neutropenia)
#: with the indicator of the card they belong to.
INFECTION_PREVENTION_TRIGGERS: Mapping[str, Indicator] = {
    "febrile-neutropenia": _CRITICAL,
    "presumed-febrile-neutropenia": _CRITICAL,
    "temperature-elevated": _WARNING,
    "neutropenia-profound": _WARNING,
    "neutropenia-severe": _WARNING,
    "neutropenia-moderate": _WARNING,
}
