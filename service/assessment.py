"""The neutropenia engine's entry points: ``assess`` (FHIR resources -> Assessment) and its JSON extension.

The result types are defined in ``service.model`` and re-exported here; this module is the fixed interface
described in ``notes/assessment-interface.md`` and design.md §3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from service import anc as anc_module
from service import timing
from service.codes import ConditionRole
from service.drugs import MedicationRole
from service.extract import Facts, LabResult, extract, older_labs
from service.fever import assess_fever
from service.model import Anc as Anc
from service.model import AncPoint as AncPoint
from service.model import Assessment as Assessment
from service.model import CodedRef as CodedRef
from service.model import DataIssue as DataIssue
from service.model import Fever as Fever
from service.model import Finding as Finding
from service.records import MedicationFact
from service.rules import RuleInput, ctcae_grade, evaluate
from service.thresholds import DEFAULT_POLICY as DEFAULT_POLICY
from service.thresholds import ClinicalPolicy as ClinicalPolicy
from service.thresholds import neutropenia_below

#: The key of the response extension (design.md §3).
EXTENSION_KEY = "org.neutropenia-cds.assessment"


def assess(
    resources: Iterable[Mapping[str, Any]],
    *,
    now: datetime,
    policy: ClinicalPolicy = DEFAULT_POLICY,
    unavailable: Mapping[str, str] = {},  # noqa: B006 - read only
) -> Assessment:
    """Evaluate a patient's FHIR ``resources`` at ``now`` (tz-aware) under ``policy``; never raises on bad data."""
    now = _utc(now)
    facts = extract(resources, now=now, policy=policy)
    labs, lab_issues = list(facts.labs), list(facts.issues)
    series = anc_module.compute(labs, facts.links)
    if not series.values:
        older, series = _newest_stale(facts, labs, now=now, policy=policy)
        for slab in older:
            lab_issues += slab.issues
    current_from = now - policy.anc_current_window
    newest = series.values[-1] if series.values else None
    current = [value for value in series.values if value.latest >= current_from]
    fever = assess_fever(facts.temperatures, now=now, policy=policy)
    since = newest.effective if newest is not None else current_from
    anc_issues = [timed.issue for timed in series.issues if timed.latest >= since]
    # A result older than the ANC used raises no finding, but the trend (R13) reads every result of the currency
    # window: an unreadable one left out there can make a rise look like a fall, so it is reported as a data issue.
    # (A white cell count without a differential never was an ANC: it is not reported again.)
    trend_issues = [timed.issue for timed in series.issues
                    if timed.latest >= current_from and timed.issue.code == "anc-uninterpretable"]
    context = _context(facts, now, policy)
    risk_factors = tuple(
        sorted({c.ref for c in facts.conditions if ConditionRole.RISK_FACTOR in c.roles}, key=_ref_key)
    )
    medications = _current_medications(facts.medications)
    years, days = _age(facts, now)
    findings = evaluate(
        RuleInput(
            anc=newest,
            anc_current=newest is not None and newest.latest >= current_from,
            trend=tuple(value.cells_per_ul for value in current),
            fever=fever,
            chemotherapy_context=bool(context),
            risk_factor=bool(risk_factors or medications or context),
            drug_induced=any(ConditionRole.DRUG_INDUCED in c.roles for c in facts.conditions),
            uninterpretable=any(i.code == "anc-uninterpretable" for i in anc_issues),
            not_computable=any(i.code == "anc-not-computable" for i in anc_issues),
            age_years=years,
            age_days=days,
        ),
        policy=policy,
    )
    issues = {*lab_issues, *anc_issues, *trend_issues, *_preliminary_issues(newest, fever)}
    issues |= {DataIssue("data-unavailable", None, f"{key}: {reason}") for key, reason in unavailable.items()}
    return Assessment(
        evaluated_at=now,
        findings=findings,
        anc=None if newest is None else _anc(newest, stale=newest.latest < current_from),
        fever=fever,
        anc_trend=tuple(AncPoint(tidy(v.cells_per_ul), v.effective, v.sources[0]) for v in current),
        risk_factors=risk_factors,
        medications=medications,
        chemotherapy_context=bool(context),
        age_years=years,
        neutropenia_below=neutropenia_below(years, days),
        data_issues=tuple(sorted(issues, key=lambda i: (i.code, i.source or "", i.detail or ""))),
        context=context,
    )


def _newest_stale(facts: Facts, labs: list[LabResult], *, now: datetime,
                  policy: ClinicalPolicy) -> tuple[list[Facts], anc_module.AncSeries]:
    """The older slabs up to the first that yields an ANC (all of them if none does), and the series they give.

    The newest stale ANC is found; anything older cannot change the result. Every slab count is tried, in order:
    an older result can take an ANC away (it joins the ANC's group by specimen, link or time with a conflicting
    share or bound), so a search that skips counts (doubling, then halving) missed a stale ANC and answered with
    none. GrowingGroups recomputes only the groups each slab touches, not every result read so far (quadratic:
    years of weekly counts without a differential took minutes).
    """
    slabs: list[Facts] = []
    groups = anc_module.GrowingGroups(facts.links)
    groups.add(labs)
    for slab in older_labs(facts, now=now, policy=policy):
        slabs.append(slab)
        if groups.add(slab.labs):
            break
    return slabs, anc_module.compute(labs + [lab for slab in slabs for lab in slab.labs], facts.links)


def _anc(value: anc_module.AncValue, *, stale: bool) -> Anc:
    return Anc(
        cells_per_ul=tidy(value.cells_per_ul),
        ctcae_grade=ctcae_grade(value),
        method=value.method,
        effective=value.effective,
        status=value.status,
        preliminary=value.preliminary,
        stale=stale,
        sources=value.sources,
        comparator=value.comparator,
        formula=value.formula,
    )


def tidy(value: Decimal) -> Decimal:
    """``value`` without trailing zeros (400.0 -> 400, 520.50 -> 520.5), never in exponent form."""
    return Decimal(int(value)) if value == value.to_integral_value() else value.normalize()


def _ref_key(ref: CodedRef) -> tuple[str, str, str]:
    return (ref.source, ref.system, ref.code)


def _context(facts: Facts, now: datetime, policy: ClinicalPolicy) -> tuple[CodedRef, ...]:
    """What makes this a chemotherapy / high-risk context (brief §4 R2): conditions, chemotherapy, G-CSF."""
    lookback = {MedicationRole.GCSF: policy.gcsf_lookback, MedicationRole.CHEMOTHERAPY: policy.chemotherapy_lookback}

    def recent(fact: MedicationFact) -> bool:
        """A current order, or an ended one inside its look-back."""
        window = lookback.get(fact.role)
        return window is not None and (fact.current or (fact.last is not None and fact.last >= now - window))

    refs = {c.ref for c in facts.conditions if ConditionRole.CHEMOTHERAPY_CONTEXT in c.roles}
    refs |= {m.ref for m in facts.medications if recent(m)}
    return tuple(sorted(refs, key=_ref_key))


def _current_medications(medications: Iterable[MedicationFact]) -> tuple[CodedRef, ...]:
    """Current orders for medicines that can cause neutropenia (chemotherapy included), one per order."""
    causes = (MedicationRole.CAUSE, MedicationRole.CHEMOTHERAPY)
    by_order: dict[str, CodedRef] = {}
    for fact in sorted(medications, key=lambda m: (_ref_key(m.ref), m.role.value)):
        if fact.current and fact.role in causes:
            by_order.setdefault(fact.ref.source, fact.ref)
    return tuple(sorted(by_order.values(), key=_ref_key))


def _age(facts: Facts, now: datetime) -> tuple[int | None, int | None]:
    if facts.birth_date is None:
        return None, None
    years, days = timing.age(facts.birth_date, now.date())
    # Extraction refuses (and reports) a birthDate later than BIRTH_DATE_TOLERANCE after today; one within it is a
    # newborn whose local date runs ahead of UTC.
    return max(years, 0), max(days, 0)


def _preliminary_issues(anc: anc_module.AncValue | None, fever: Fever | None) -> set[DataIssue]:
    issues = set()
    if anc is not None and anc.preliminary:
        issues.add(DataIssue("preliminary-result", anc.sources[0], "the ANC comes from a preliminary result"))
    if fever is not None and fever.preliminary:
        issues.add(DataIssue("preliminary-result", fever.sources[0], "a temperature used is preliminary"))
    return issues


def assessment_extension(assessment: Assessment) -> dict[str, Any]:
    """The value of the ``org.neutropenia-cds.assessment`` response extension (design.md §3); empties omitted."""
    value: dict[str, Any] = {"evaluatedAt": rfc3339(assessment.evaluated_at)}
    if assessment.findings:
        value["findings"] = [finding.value for finding in assessment.findings]
    if assessment.anc is not None:
        anc = assessment.anc
        value["anc"] = _omit_empty(
            {
                "cellsPerMicroliter": _number(anc.cells_per_ul),
                "ctcaeGrade": anc.ctcae_grade,
                "method": anc.method,
                "effective": rfc3339(anc.effective),
                "status": anc.status,
                "stale": anc.stale,
                "sources": list(anc.sources),
            }
        )
    if assessment.fever is not None:
        fever = assessment.fever
        value["fever"] = _omit_empty(
            {
                "maxCelsius": _number(fever.max_celsius),
                "criterion": fever.criterion,
                "effective": rfc3339(fever.effective),
                "sources": list(fever.sources),
            }
        )
    # What R12 counted, as the lab-follow-up card lists it: without the chemotherapy context, a risk-factor-no-anc
    # raised by G-CSF alone had no riskFactors in the extension.
    refs = assessment.counted_risk_factors
    if refs:
        value["riskFactors"] = [
            _omit_empty({"system": r.system, "code": r.code, "display": r.display, "source": r.source}) for r in refs
        ]
    if assessment.data_issues:
        value["dataIssues"] = [
            _omit_empty({"code": i.code, "source": i.source, "detail": i.detail}) for i in assessment.data_issues
        ]
    return value


def rfc3339(moment: datetime) -> str:
    """``moment`` as an RFC 3339 UTC timestamp with a ``Z`` suffix, to the second."""
    m = _utc(moment)  # formatted by hand: strftime("%Y") does not zero-pad years below 1000
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}Z"


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return moment.astimezone(timezone.utc)


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _omit_empty(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None and v != [] and v != ""}
