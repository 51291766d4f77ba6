"""Card rendering: an `Assessment` in, CDS Hooks cards out (design.md §3 "Cards"; clinical-brief.md §4).

Pure: no clock (times come from the assessment), no uuids (the blueprint stamps them), no config lookups (the
caller passes `CardSettings`). What the cards say lives in `service.card_text`; this module picks the
templates, fills in the values and builds the protocol models.

Finding -> card kind -> indicator (the brief's §4 table; a card takes the most urgent of its findings):

==============================  =====================  ==========================================
finding                         card kind              indicator
==============================  =====================  ==========================================
febrile-neutropenia (R1)        febrile-neutropenia    critical
presumed-febrile-neutropenia    febrile-neutropenia    critical
temperature-elevated (R3)       fever-escalation       warning
fever-mild-neutropenia (R4)     fever-escalation       warning
fever-no-anc (R5)               fever-escalation       warning
fever-normal-anc (R6)           fever-escalation       info
neutropenia-severe/-profound    neutropenia            warning
neutropenia-moderate (R8)       neutropenia            warning
neutropenia-mild (R9)           neutropenia            info
anc-falling (R13)               neutropenia            warning
(R14: R1, R2, R3, R7, R8, or    infection-prevention   critical with R1/R2, else warning
current ANC below the cut-off)
medication-review (R15)         medication-review      info
anc-stale (R11)                 lab-follow-up          info
risk-factor-no-anc (R12)        lab-follow-up          info
anc-uninterpretable (R16)       data-quality           info
anc-not-computable (R17)        data-quality           info
(data issues, e.g. malformed)   data-quality           info
anc-normal (R10)                no card
==============================  =====================  ==========================================

The neutropenia card is left out beside a febrile-neutropenia card (which states the ANC, grade and trend),
and the lab-follow-up card beside R2/R5 (whose cards propose the urgent CBC and show the old ANC).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any

from cds_hooks.models import (
    SUMMARY_MAX_CHARS,
    Action,
    ActionType,
    Card,
    Coding,
    Indicator,
    Link,
    SelectionBehavior,
    Source,
    Suggestion,
)
from service import card_text
from service.assessment import DEFAULT_POLICY, Anc, Assessment, CodedRef, Fever
from service.card_text import CARD_TEMPLATES, CardTemplate, Order
from service.thresholds import ANC_MODERATE_BELOW, ANC_NORMAL_LOWER

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: Markdown characters escaped in values that come from patient data (displays, sources, details).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#])")
#: Angle brackets from patient data become look-alikes, so no detail ever carries a tag, escaped or not.
_ANGLES = str.maketrans({"<": "‹", ">": "›"})
_MAX_LISTED = 10


@dataclass(frozen=True)
class CardSettings:
    """Deployment settings for cards: the source shown on every card and the URLs its links open.

    ``febrile_neutropenia_anc_below`` must equal the engine's febrile-neutropenia ANC cut-off (cells/uL); the
    cards quote it in the escalation rule and use it for the infection-prevention add-on (brief §4 R14).
    """

    source_label: str = "Neutropenia CDS"
    source_url: str = "https://neutropenia-cds.org/"
    febrile_neutropenia_guideline_url: str = (
        "https://www.idsociety.org/practice-guideline/fever-and-neutropenia-in-adults-with-cancer/")
    neutropenic_sepsis_guideline_url: str = "https://www.nice.org.uk/guidance/cg151"
    ctcae_url: str = "https://ctep.cancer.gov/protocoldevelopment/electronic_applications/ctc.htm"
    infection_prevention_url: str = "https://www.cdc.gov/cancer-preventing-infections/patients/neutropenia.html"
    febrile_neutropenia_anc_below: Decimal = DEFAULT_POLICY.fn_anc_cutoff

    def __post_init__(self) -> None:
        if not isinstance(self.source_label, str) or not self.source_label.strip():
            raise ValueError("source_label must be a non-empty string")
        for f in fields(self):
            if f.name.endswith("_url"):
                # Source and Link refuse anything but an absolute http(s) URL; fail at start, not per request.
                Link(label=f.name, url=getattr(self, f.name))
        cutoff = self.febrile_neutropenia_anc_below
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, Decimal)) or not cutoff > 0:
            raise ValueError("febrile_neutropenia_anc_below must be a positive number of cells/uL")
        object.__setattr__(self, "febrile_neutropenia_anc_below", Decimal(cutoff))

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any]) -> CardSettings:
        """Defaults overlaid by ``overrides`` (keys: field names, any case, optional ``card_`` prefix)."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            name = key.lower().removeprefix("card_")
            if name not in names:
                raise ValueError(f"unknown card setting {key!r}; known: {', '.join(sorted(names))}")
            if name == "febrile_neutropenia_anc_below" and isinstance(value, (str, float)):
                value = Decimal(str(value).strip())
            values[name] = value.strip() if isinstance(value, str) else value
        return cls(**values)


DEFAULT_CARD_SETTINGS = CardSettings()


def render(assessment: Assessment, *, settings: CardSettings = DEFAULT_CARD_SETTINGS,
           patient_id: str | None = None) -> list[Card]:
    """The cards for ``assessment``, most urgent first, at most one per kind.

    Suggestions (draft ServiceRequests) need the patient: they are added only when ``patient_id`` is a valid
    FHIR id.
    """
    if not assessment.findings and not assessment.data_issues:
        return []
    view = _View(assessment, settings, patient_id)
    cards: list[Card] = []
    for kind, template in CARD_TEMPLATES.items():
        if view.present & card_text.SUPPRESSED_BY.get(kind, frozenset()):
            continue
        card = view.card(template)
        if card is not None:
            cards.append(card)
    order = list(CARD_TEMPLATES)
    cards.sort(key=lambda c: (-c.indicator.rank, order.index(c.kind or "")))
    return cards


class _View:
    """One assessment seen through the templates: the present findings and the values cards quote."""

    def __init__(self, assessment: Assessment, settings: CardSettings, patient_id: str | None) -> None:
        self.assessment = assessment
        self.settings = settings
        self.findings = tuple(_code(f) for f in assessment.findings)
        self.present = frozenset(self.findings)
        valid_patient = isinstance(patient_id, str) and _FHIR_ID.fullmatch(patient_id)
        self.patient_reference = f"Patient/{patient_id}" if valid_patient else None
        hidden = card_text.DATA_ISSUES_SHOWN_ELSEWHERE | card_text.DATA_ISSUES_FOR_INTEGRATORS
        self.issues = tuple(i for i in assessment.data_issues if i.code not in hidden)
        self.fields = self._fields()

    # -- which findings a card shows, and its indicator -------------------------------------------------------

    def card(self, template: CardTemplate) -> Card | None:
        """The card of ``template``'s kind, or None when nothing in the assessment calls for it."""
        shown = [code for code in template.indicators if code in self.present]
        indicators = [template.indicators[code] for code in shown]
        if template.kind == "infection-prevention":
            indicators = self._infection_prevention_indicators()
        elif template.kind == "data-quality" and self.issues:
            indicators.append(Indicator.INFO)
        if not indicators:
            return None
        indicator = max(indicators, key=lambda i: i.rank)
        summary_key = self._summary_key(template, shown)
        return Card(
            summary=_fit(template.summaries[summary_key].format(**self.fields)),
            indicator=indicator,
            source=Source(label=self.settings.source_label, url=self.settings.source_url,
                          topic=Coding(system=card_text.CARD_KIND_SYSTEM, code=template.kind,
                                       display=template.title)),
            detail=self._detail(template, shown),
            **self._suggestions(template),
            override_reasons=tuple(Coding(system=card_text.OVERRIDE_REASON_SYSTEM, code=code, display=display)
                                   for code, display in template.override_reasons),
            links=tuple(Link(label=link.label, url=getattr(self.settings, link.setting))
                        for link in template.links),
        )

    def _infection_prevention_indicators(self) -> list[Indicator]:
        triggers = card_text.INFECTION_PREVENTION_TRIGGERS
        indicators = [triggers[code] for code in self.findings if code in triggers]
        anc = self.assessment.anc
        # R14 is "ANC <1000 (any)" (brief §4) whatever the febrile-neutropenia cut-off: with a lower one (500/uL),
        # a fever with ANC 800 is R4, which drops the moderate grade, and the advice was missing; with a higher one
        # (1500/uL) febrile neutropenia brings the advice through its finding, and an afebrile ANC of 1000-1499 (an
        # infant's normal 1200) does not call for it.
        if anc is not None and not anc.stale and _below(anc, ANC_MODERATE_BELOW):
            indicators.append(Indicator.WARNING)
        return indicators

    def _summary_key(self, template: CardTemplate, shown: list[str]) -> str:
        if template.kind == "medication-review" and not self.assessment.medications:
            return "medication-review-unlisted"
        for key in template.summaries:
            if key in shown:
                return key
        # No finding of the kind: the add-on or data-issue card, whose summary key is not a finding code.
        return next(key for key in template.summaries if key not in template.indicators)

    # -- detail ------------------------------------------------------------------------------------------------

    def _detail(self, template: CardTemplate, shown: list[str]) -> str:
        facts = {
            "febrile-neutropenia": self._febrile_facts,
            "fever-escalation": self._results_table,
            "neutropenia": self._results_and_trend,
            "medication-review": self._medicines,
            "lab-follow-up": self._lab_follow_up_facts,
            "data-quality": self._issues,
        }.get(template.kind)
        sections = [facts()] if facts else []  # patient data, already escaped: not a format string
        sections += [template.advice[code].format(**self.fields) + self._advice_note(code)
                     for code in template.advice if code in shown]
        sections.append(template.common.format(**self.fields))
        return "\n\n".join(s for s in sections if s)

    def _advice_note(self, code: str) -> str:
        """The Duffy-null note after the mild advice, only on the adult cut-off (brief §1.5)."""
        if code == "neutropenia-mild" and self.assessment.neutropenia_below == ANC_NORMAL_LOWER:
            return " " + card_text.DUFFY_NULL_NOTE
        return ""

    def _results_table(self) -> str:
        rows = []
        anc, fever = self.assessment.anc, self.assessment.fever
        if anc is not None:
            method = card_text.ANC_FORMULAS.get(anc.formula or "") or card_text.ANC_METHODS.get(
                anc.method, f"ANC, {_md(anc.method)}")
            notes = [card_text.PRELIMINARY if anc.preliminary else _md(anc.status)]
            if anc.stale:
                notes.append(card_text.ANC_STALE)
            rows.append((method, _anc_text(anc, self.assessment.neutropenia_below), _time(anc.effective),
                         ", ".join(notes)))
        if fever is not None:
            value = f"{_temperature_text(fever)} ({_fahrenheit(fever.max_celsius)})"
            notes = [card_text.FEVER_CRITERIA.get(fever.criterion, _md(fever.criterion))]
            if fever.preliminary:
                notes.append(card_text.PRELIMINARY)
            when = _time(fever.effective)
            if fever.criterion == "sustained" and fever.since is not None:
                when = f"{_time(fever.since)} to {when}"
            rows.append((card_text.TEMPERATURE_ROW, value, when, ", ".join(notes)))
        if not rows:
            return card_text.NO_RESULTS
        return "\n".join([card_text.RESULTS_TABLE_HEADER] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows])

    def _febrile_facts(self) -> str:
        facts = self._results_and_trend()
        if "neutropenia-profound" in self.present:
            facts += "\n\n" + card_text.PROFOUND_NOTE
        if "presumed-febrile-neutropenia" in self.present and self.assessment.context:
            facts += "\n\n" + card_text.CONTEXT_HEADING + "\n\n" + _bullets(_coded(c) for c in self.assessment.context)
        return facts

    def _results_and_trend(self) -> str:
        trend = self.assessment.anc_trend
        table = self._results_table()
        if len(trend) < 2:
            return table
        points = ", ".join(_count(p.cells_per_ul) for p in trend[-5:])
        return f"{table}\n\n" + card_text.TREND.format(points=points)

    def _medicines(self) -> str:
        medicines = self.assessment.medications
        if not medicines:
            return card_text.NO_MEDICINES
        return card_text.MEDICINES_HEADING + "\n\n" + _bullets(_coded(m) for m in medicines)

    def _lab_follow_up_facts(self) -> str:
        parts = []
        if self.assessment.anc is not None:
            parts.append(self._results_table())
        # R12 counts conditions, medicines that can cause neutropenia and the chemotherapy context (G-CSF, a
        # recent chemotherapy order): the card names whichever made it fire, not only the conditions.
        reasons = self.assessment.counted_risk_factors
        if "risk-factor-no-anc" in self.present and reasons:
            parts.append(card_text.RISK_FACTORS_HEADING + "\n\n" + _bullets(_coded(r) for r in reasons))
        return "\n\n".join(parts)

    def _issues(self) -> str:
        if not self.issues:
            return ""
        items = []
        for issue in self.issues:
            label = card_text.DATA_ISSUE_LABELS.get(issue.code, _md(issue.code))
            where = f" ({_md(issue.source)})" if issue.source else ""
            why = f": {_md(issue.detail)}" if issue.detail else ""
            items.append(f"{label}{where}{why}")
        return card_text.ISSUES_HEADING + "\n\n" + _bullets(items)

    # -- suggestions -------------------------------------------------------------------------------------------

    def _suggestions(self, template: CardTemplate) -> dict[str, Any]:
        suggested = template.suggested
        if suggested is None or self.patient_reference is None:
            return {}
        if suggested.findings and not suggested.findings & self.present:
            return {}
        suggestions = tuple(
            Suggestion(label=order.label, is_recommended=suggested.recommended or None,
                       actions=(Action(type=ActionType.CREATE,
                                       description=f"Create a draft {suggested.priority} order: {order.text}",
                                       resource=self._service_request(order, suggested.priority,
                                                                      suggested.reason)),))
            for order in suggested.orders)
        return {"suggestions": suggestions, "selection_behavior": SelectionBehavior.ANY}

    def _service_request(self, order: Order, priority: str, reason: str) -> dict[str, Any]:
        return {
            "resourceType": "ServiceRequest",
            "status": "draft",
            "intent": "proposal",
            "category": [{"coding": [dict(card_text.LAB_CATEGORY)]}],
            "priority": priority,
            "code": {"coding": [{"system": card_text.LOINC, "code": order.code, "display": order.display}],
                     "text": order.text},
            "subject": {"reference": self.patient_reference},
            "reasonCode": [{"text": reason}],
        }

    # -- the values summaries and details quote ----------------------------------------------------------------

    def _fields(self) -> dict[str, str]:
        a = self.assessment
        anc, fever = a.anc, a.fever
        medicines = len(a.medications)
        missing = card_text.NOT_AVAILABLE
        return {
            "anc": _anc_text(anc, a.neutropenia_below) if anc is not None else missing["anc"],
            "temp": _temperature_text(fever) if fever is not None else missing["temp"],
            "date": anc.effective.strftime("%Y-%m-%d") if anc is not None else missing["date"],
            "days": str(max((a.evaluated_at - anc.effective).days, 0)) if anc is not None else missing["days"],
            "falling": ", falling" if "anc-falling" in self.present else "",
            "count": str(len(self.issues)),
            "medicines": f"{medicines} active medicine{'s' if medicines != 1 else ''}",
            "fn_anc": f"{_count(self.settings.febrile_neutropenia_anc_below)}/uL",
            "normal_anc": f"{_count(a.neutropenia_below)}/uL",
        }


def _code(finding: Any) -> str:
    """A finding's code: `Finding` is a str Enum, but its hash is not the plain string's."""
    return str(getattr(finding, "value", finding))


def _anc_text(anc: Anc, neutropenia_below: Decimal) -> str:
    """"400/uL (grade 4, preliminary)"; a stale count is not graded (brief §4 R11).

    CTCAE grades 2-4 are the adult bands (below 1500/uL): a count normal for the patient's age (an infant's 1200,
    brief §1.5) shows no grade, or the card would call it neutropenic beside its own "not neutropenic". Grade 1
    (below the lab's own lower limit) is shown as it is.
    """
    notes = []
    adult_band_only = anc.ctcae_grade >= 2 and not _below(anc, neutropenia_below)
    if anc.ctcae_grade and not anc.stale and not adult_band_only:
        notes.append(f"grade {anc.ctcae_grade}")
    if anc.preliminary:
        notes.append("preliminary")
    bound = card_text.COMPARATORS.get(anc.comparator or "", "")
    return f"{bound}{_count(anc.cells_per_ul)}/uL" + (f" ({', '.join(notes)})" if notes else "")


def _below(anc: Anc, limit: Decimal) -> bool:
    """Whether ``anc`` is below ``limit``; an upper bound ("<1000") is below the limit it equals, as the rules grade
    it (AncValue.below)."""
    return anc.cells_per_ul < limit or (anc.comparator == "<" and anc.cells_per_ul <= limit)


def _count(value: Decimal) -> str:
    """Whole cells/uL, rounded down so the shown number is in the same band as the value (99.9 -> 99)."""
    return str(int(Decimal(value).to_integral_value(rounding=ROUND_FLOOR)))


def _temperature_text(fever: Fever) -> str:
    """"38.4 °C"; "below 38.0 °C" when the highest value is only an upper bound."""
    return card_text.COMPARATORS.get(fever.comparator or "", "") + _celsius(fever.max_celsius)


def _celsius(value: Decimal) -> str:
    text = f"{Decimal(value).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):.2f}".rstrip("0")
    return (text + "0" if text.endswith(".") else text) + " °C"


def _fahrenheit(value: Decimal) -> str:
    degrees = (Decimal(value) * 9 / 5 + 32).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{degrees} °F"


def _time(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _coded(ref: CodedRef) -> str:
    system = card_text.SYSTEM_NAMES.get(ref.system, ref.system)
    name = ref.display or ref.code
    return f"{_md(name)} ({_md(system)} {_md(ref.code)})"


def _bullets(items: Iterable[str]) -> str:
    listed = list(items)
    lines = [f"- {item}" for item in listed[:_MAX_LISTED]]
    if len(listed) > _MAX_LISTED:
        lines.append(f"- and {len(listed) - _MAX_LISTED} more")
    return "\n".join(lines)


def _md(text: str) -> str:
    """Patient data as inert Markdown: one line, special characters escaped (so no HTML, no table breaks)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split())).translate(_ANGLES)


def _fit(summary: str) -> str:
    """Never let an outlandish value break the spec's summary limit; real values stay far below it."""
    return summary if len(summary) <= SUMMARY_MAX_CHARS else summary[: SUMMARY_MAX_CHARS - 1] + "…"
