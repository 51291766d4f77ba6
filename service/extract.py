"""Raw FHIR R4 resources -> frozen facts the rules read (design.md §4, brief §2 "FHIR handling").

Cheap first: each raw dict is classified by ``resourceType`` and code, and by status and time where that decides
it, before anything is validated. Only the resources that can matter (ANC-related labs of the currency window,
temperatures of the temperature window, risk-factor conditions, relevant medication orders, the Patient) are
validated with the ``fhir.resources.R4B`` models; older labs are read later, only if no current ANC exists
(:func:`older_labs`). A white cell count or differential taken at the same time as a usable measured ANC is not
validated either: the measured ANC of a group comes before anything computed from them (``service.anc``), so
their values are not read (they are still classified, and a unit or number problem still reported). A relevant
resource invalid in an element the rules read (:data:`OBSERVATION_READS`) becomes a ``malformed-resource`` data
issue and is not used, and so does an Observation whose Quantity value is a JSON string such as "0.4" (FHIR JSON
decimals are numbers, R4 §2.6.2; the models' lax mode would accept it). One invalid only elsewhere (an empty
display, an extension, narrative) is used, with an ``invalid-unread-elements`` issue (``service.validation``).
Results a DiagnosticReport carries in ``contained`` are read like any other. Nothing here raises on bad data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.observation import Observation

from service import records, timing
from service.codes import LAB_ROLES, LOINC, OBSERVATION_CODES, TEMPERATURE, TEMPERATURE_MAXIMUM, Code, LabRole
from service.fhir import (
    MAX_BUNDLE_DEPTH,
    codes_of,
    decimal,
    deduplicated,
    flatten,
    quoted_decimal,
    reference,
    references,
    references_within,
    source_of,
)
from service.model import DataIssue
from service.records import ConditionFact, MedicationFact
from service.thresholds import DEFAULT_POLICY, FEVER_SUSTAINED, ClinicalPolicy
from service.units import celsius, count_per_ul, percent
from service.validation import KnownElements, screen

#: Observation.status -> whether the result is preliminary; statuses not listed are not used (brief §2).
USED_STATUSES: Mapping[str, bool] = {"final": False, "amended": False, "corrected": False, "preliminary": True}
IGNORED_STATUSES = frozenset({"registered", "cancelled", "entered-in-error", "unknown"})
#: DiagnosticReport.status codes whose results do not count.
RETRACTED_REPORT_STATUSES = frozenset({"entered-in-error", "cancelled"})
COUNT_ROLES = frozenset({LabRole.ANC, LabRole.SEGS_ABS, LabRole.BANDS_ABS, LabRole.WBC})
_COMPARATORS = {"<": "<", "<=": "<", ">": ">", ">=": ">"}  # "<": the value is an upper bound
#: The R4 Quantity.comparator codes that make a value an upper bound (the true value is below / at most it).
UPPER_BOUNDS = frozenset({"<", "<="})

#: The Observation elements the rules read (``service.validation.screen``): an invalid one makes the result
#: unusable; invalid elements elsewhere (display texts, narrative, extensions) do not. ``issued`` is read only
#: when there is no effective[x] (:func:`timing.observation_timing`). ``meta`` is not: ordering copies of one
#: resource (``service.fhir.deduplicated``) reads only values that are valid FHIR.
OBSERVATION_READS = frozenset({
    "resourceType", "id", "implicitRules", "modifierExtension", "status",
    "code.coding.system", "code.coding.code", "subject.reference", "effectiveDateTime", "effectiveInstant",
    "effectivePeriod", "valueQuantity", "component.modifierExtension", "component.code.coding.system",
    "component.code.coding.code", "component.valueQuantity", "component.referenceRange.low", "specimen.reference",
    "referenceRange.low", "hasMember.reference",
})
_READS_WITH_ISSUED = OBSERVATION_READS | {"issued"}


@dataclass(frozen=True)
class LabResult:
    """One ANC-related result: counts in cells/uL, shares in percent; ``value`` None when uninterpretable."""

    source: str
    role: LabRole
    code: Code
    value: Decimal | None
    comparator: str | None  # "<" (value is an upper bound), ">" (a lower bound) or None
    effective: datetime
    latest: datetime
    status: str
    specimen: str | None = None
    reference_low: Decimal | None = None  # lab's lower limit of normal, cells/uL (ANC codes only)
    problem: str | None = None  # why ``value`` could not be interpreted

    @property
    def preliminary(self) -> bool:
        """Whether the result is preliminary."""
        return USED_STATUSES.get(self.status, False)

    def order(self) -> tuple[Any, ...]:
        """Sort key of a total order on results that does not depend on the order they arrived in.

        Every field counts, so only equal results tie. It replaces ``repr`` as the key: a repr costs about 5 us,
        and a request sorts its results several times.
        """
        return (self.source, self.role.value, self.code, self.effective, self.latest, self.status,
                _optional(self.value), _optional(self.comparator), _optional(self.specimen),
                _optional(self.reference_low), _optional(self.problem))


@dataclass(frozen=True)
class Temperature:
    """One body temperature reading in degrees Celsius, rounded to 2 decimals."""

    source: str
    celsius: Decimal
    effective: datetime
    latest: datetime
    status: str
    #: A maximum over a period (1 to 24 h, ``codes.TEMPERATURE_MAXIMUM``): a single reading only, never in a run.
    maximum: bool = False
    #: The R4 Quantity.comparator as sent ("<", "<=", ">=", ">"), when ``celsius`` is only a bound; None for a value.
    comparator: str | None = None

    @property
    def preliminary(self) -> bool:
        """Whether the reading is preliminary."""
        return USED_STATUSES.get(self.status, False)

    @property
    def upper_bound(self) -> bool:
        """Whether ``celsius`` is an upper bound ("<38.6"): the true temperature is below it (or at most it)."""
        return self.comparator in UPPER_BOUNDS

    @property
    def undecided(self) -> bool:
        """Whether the reading is a bound that leaves open if it was 38.0 C or more ("<38.6", "<=38.0", ">37.5").

        Brief §0 cuts at 38.0 C and 38.3 C: such a reading may or may not be a fever, so it can neither make nor
        break a run, nor be a single-reading fever. An upper bound certainly below 38.0 C ("<38.0", "<=37.9")
        decides: it is a reading below 38.0 C. A lower bound of 38.0 C or more (">38.5") decides too: read at its
        bound, it can only understate the fever. A lower bound below 38.0 C (">=37.9") read at its bound broke a
        sustained run that the true value may have continued: a missed emergency.
        """
        if self.comparator == "<":
            return self.celsius > FEVER_SUSTAINED
        if self.comparator == "<=":
            return self.celsius >= FEVER_SUSTAINED
        return self.comparator in (">", ">=") and self.celsius < FEVER_SUSTAINED

    def at_least(self, cut: Decimal) -> bool:
        """Whether the reading is known to be ``cut`` or more: an upper bound never is ("<38.0" is below 38.0)."""
        return not self.upper_bound and self.celsius >= cut

    @property
    def precise(self) -> bool:
        """Whether the reading is timed to an instant (only those can form a sustained run)."""
        return self.effective == self.latest

    def order(self) -> tuple[Any, ...]:
        """Sort key of a total order on readings that does not depend on the order they arrived in."""
        return (self.source, self.effective, self.latest, self.celsius, self.status, self.maximum,
                _optional(self.comparator))


def _optional(value: Any) -> tuple[bool, Any]:
    """A sort key for a field that may be None: None first, then the values in their own order."""
    return value is not None, value


@dataclass(frozen=True)
class Facts:
    """Everything extracted from one request's resources."""

    labs: tuple[LabResult, ...] = ()
    temperatures: tuple[Temperature, ...] = ()
    conditions: tuple[ConditionFact, ...] = ()
    medications: tuple[MedicationFact, ...] = ()
    birth_date: date | None = None
    links: tuple[frozenset[str], ...] = ()  # results reported together (DiagnosticReport.result, hasMember)
    issues: tuple[DataIssue, ...] = ()
    #: Observations older than every window (the ANC currency window, the temperature window), with their time:
    #: not validated, most not even classified by code; :func:`older_labs` reads the lab results among them.
    deferred: tuple[tuple[Mapping[str, Any], timing.Timing], ...] = ()
    #: Resources whose copies contradict each other ("Type/id", number of copies; ``service.fhir.deduplicated``).
    conflicts: tuple[tuple[str, int], ...] = ()


def extract(resources: Iterable[Any], *, now: datetime, policy: ClinicalPolicy = DEFAULT_POLICY) -> Facts:
    """Reduce raw FHIR resources (dicts, Bundles allowed) to ``Facts`` as seen at ``now``."""
    unique = deduplicated(flatten(resources))
    flat = unique.resources
    defer_before = now - policy.anc_current_window
    collector = _Collector(now, policy, records.medication_index(flat), defer_before, unique.conflicts)
    for resource in flat:
        collector.add(resource)
    return collector.facts()


def older_labs(facts: Facts, *, now: datetime, policy: ClinicalPolicy = DEFAULT_POLICY) -> Iterator[Facts]:
    """The deferred lab results of ``facts``, validated and extracted slab by slab, newest slab first.

    A slab holds the results within one ANC currency window of the newest result not yet read, so the caller can
    stop as soon as a slab yields an ANC.
    """
    labs = [item for item in facts.deferred if _is_lab(_parts(item[0]))]
    remaining = sorted(labs, key=lambda item: (item[1].latest, source_of(item[0])), reverse=True)
    while remaining:
        edge = timing.earlier(remaining[0][1].latest, policy.anc_current_window)
        size = next((n for n, item in enumerate(remaining) if n and item[1].latest <= edge), len(remaining))
        collector = _Collector(now, policy, {}, None, dict(facts.conflicts))
        for resource, _ in remaining[:size]:
            collector.add(resource)
        remaining = remaining[size:]
        yield collector.facts()


class _Collector:
    """Accumulates facts and issues resource by resource."""

    def __init__(
        self,
        now: datetime,
        policy: ClinicalPolicy,
        medications: Mapping[str, frozenset[Code]],
        defer_before: datetime | None,
        conflicts: Mapping[str, int],
    ) -> None:
        self.now, self.policy, self.medication_index, self.defer_before = now, policy, medications, defer_before
        # Computed once, not for each of the thousands of Observations a large request holds.
        self.future_limit = now + policy.future_tolerance
        self.temperatures_from = now - policy.temperature_window
        # Before this, an Observation is outside every window (both are configurable: the earlier one counts).
        self.older_than_windows = None if defer_before is None else min(defer_before, self.temperatures_from)
        self.conflicts = conflicts
        self.deferred: list[tuple[Mapping[str, Any], timing.Timing]] = []
        self.labs: set[LabResult] = set()
        self.temperatures: set[Temperature] = set()
        self.conditions: set[ConditionFact] = set()
        self.medications: set[MedicationFact] = set()
        self.births: set[tuple[str, date]] = set()
        self.links: set[frozenset[str]] = set()
        self.issues: set[DataIssue] = set()
        #: In-window lab results without an ANC code, waiting to see whether a measured ANC makes them unused.
        self.components: list[_Pending] = []
        #: The Observations of a request repeat their code, category and subject: each is validated once.
        self.known = KnownElements()

    def facts(self) -> Facts:
        """The collected facts, each kind in a fixed order."""
        self._read_components()
        return Facts(
            labs=tuple(sorted(self.labs, key=LabResult.order)),
            temperatures=tuple(sorted(self.temperatures, key=Temperature.order)),
            conditions=tuple(sorted(self.conditions, key=repr)),
            medications=tuple(sorted(self.medications, key=repr)),
            birth_date=min(self.births)[1] if self.births else None,
            links=tuple(sorted(self.links, key=sorted)),
            issues=tuple(sorted(self.issues | self._conflict_issues(), key=repr)),
            deferred=tuple(self.deferred),
            conflicts=tuple(sorted(self.conflicts.items())),
        )

    def _conflict_issues(self) -> set[DataIssue]:
        """A ``conflicting-duplicates`` issue for each resource read whose copies contradict each other.

        Only resources the engine read count (those that gave a fact or an issue): conflicting copies of an
        irrelevant resource, or of an older lab never needed, change nothing and are not reported. Every copy was
        used, so the most severe value counts (the lowest ANC of a group, the highest temperature).
        """
        read = {lab.source for lab in self.labs} | {t.source for t in self.temperatures}
        read |= {c.ref.source for c in self.conditions} | {m.ref.source for m in self.medications}
        read |= {source for source, _ in self.births} | {i.source for i in self.issues if i.source}
        return {
            DataIssue("conflicting-duplicates", source, f"{copies} different copies with this id, none marked as "
                      "newer (meta.versionId, meta.lastUpdated): all were used, the most severe value counts")
            for source, copies in self.conflicts.items()
            if source in read
        }

    def add(self, resource: Mapping[str, Any]) -> None:
        """Classify one raw resource and extract what the rules need from it."""
        kind = resource.get("resourceType")
        if kind == "Observation":
            self._observation(resource)
        elif kind == "DiagnosticReport":
            self._report(resource)
        elif kind == "Condition":
            fact, issue = records.condition_fact(resource)
            self.conditions.update([fact] if fact else [])
            self.issues.update([issue] if issue else [])
        elif kind == "MedicationRequest":
            facts, issue = records.medication_facts(resource, self.medication_index)
            self.medications.update(facts)
            self.issues.update([issue] if issue else [])
        elif kind == "Patient":
            born, issue = records.birth(resource, today=self.now.date())
            self.births.update([born] if born else [])
            self.issues.update([issue] if issue else [])
        elif kind == "Bundle":
            self._too_deep(resource)

    def _report(self, report: Mapping[str, Any]) -> None:
        """Link a DiagnosticReport's results, and read those it carries in ``contained``."""
        status = report.get("status")
        if isinstance(status, str) and status.strip() in RETRACTED_REPORT_STATUSES:
            return  # a retracted report: nothing of it counts
        external = report.get("result")
        named = references_within(external)  # the results it carries in ``contained``, by their "#id"
        if _broken_references(external) and _carries_observations(report):
            # Results it carries cannot be told from the rest ("#r1" as a bare string, an object for the list):
            # unread without a word, a contained ANC vanished and R1 became R2.
            self._issue("malformed-resource", source_of(report),
                        "result: not a list of References; contained results it may name not read")
        results, foreign, missing = _contained_results(report, named)
        # The report's results are reported together, separate and contained alike, whatever its state.
        self._link([*(external if isinstance(external, list) else []),
                    *({"reference": source_of(result)} for result in results)])
        if not isinstance(status, str):
            if named:  # it names contained results: say why they are not read
                self._issue("malformed-resource", source_of(report),
                            f"status: {'missing' if status is None else 'not a code'}; its contained results not read")
            return
        if named and not (isinstance(report.get("id"), str) and report["id"]):
            # Without the report's id its contained results cannot be told apart from another report's.
            self._issue("malformed-resource", source_of(report), "no id: its contained results not read")
        if results and _broken_references([report.get("subject")]) and report.get("subject") is not None:
            # The prefetch drops a report about another patient by its subject: one it cannot read (a bare string)
            # passes, and its contained results, which name no subject of their own, were graded as this patient's.
            self._issue("malformed-resource", source_of(report),
                        "subject: not a Reference; its contained results not read")
            return
        if foreign:
            self._issue("malformed-resource", source_of(report),
                        f"{foreign} contained result(s) name another subject than the report; not read")
        if missing:
            self._issue("malformed-resource", source_of(report),
                        f"{missing} result reference(s) to '#id' match no contained Observation; not read")
        for result in results:
            self._observation(result)

    def _too_deep(self, bundle: Mapping[str, Any]) -> None:
        """A Bundle that :func:`flatten` left unopened (nested too deep): whatever it holds was not read."""
        entries = bundle.get("entry")
        if isinstance(entries, list) and entries:
            self._issue("malformed-resource", source_of(bundle),
                        f"Bundle nested over {MAX_BUNDLE_DEPTH} levels deep: {len(entries)} entry(ies) not read")

    def _issue(self, code: str, source: str, detail: str | None) -> None:
        self.issues.add(DataIssue(code, source, detail))

    def _link(self, items: object) -> None:
        refs = references(items)
        if len(refs) > 1:
            self.links.add(refs)

    def _observation(self, r: Mapping[str, Any]) -> None:
        # Most Observations of a large request are older than the windows: everything needed to see that comes
        # first and cheaply (their "Type/id" is only built for the ones that give a fact or an issue).
        raw_status = r.get("status")
        # A FHIR code has no surrounding spaces, but one EHR vendor's own examples do ("entered-in-error "): the
        # code decides which results count (validation still reports the spaces of a result that is used).
        status = raw_status.strip() if isinstance(raw_status, str) else None
        if status not in IGNORED_STATUSES:
            members = r.get("hasMember")
            if members is not None:
                self._link(members)
        when = timing.observation_timing(r) if status in USED_STATUSES else None
        if when is not None and self.older_than_windows is not None and when.latest < self.older_than_windows:
            # A temperature this old is never read, and a lab result only when no current ANC exists: not even its
            # codes are looked at now (older_labs does that, if it is ever needed).
            self.deferred.append((r, when))
            return
        parts = _parts(r)
        if not parts or status in IGNORED_STATUSES:
            if not parts and status not in IGNORED_STATUSES and _broken_components(r.get("component")):
                # A vital-signs panel whose component is an object or a string: the temperature it carries
                # cannot be seen, so nothing tells this is not an observation the rules read.
                self._issue("malformed-resource", source_of(r),
                            "component: not a list of components; a temperature or count it may hold not read")
            elif not parts and status not in IGNORED_STATUSES and (bare := _code_without_system(r)) is not None:
                # A code is only known with its system, and one of ours sent without any may be a local code that
                # looks alike: not read, but not dropped without a word either (an ANC of 300 vanished so).
                self._issue("malformed-resource", source_of(r),
                            f"code {bare!r} has no system, so it is not read as the LOINC code it looks like")
            return  # not an observation the rules read, or one that does not count
        if status is None or status not in USED_STATUSES:
            problem = "status: missing" if raw_status is None else f"status: unknown value {raw_status!r}"
            return self._issue("malformed-resource", source_of(r), problem)
        if when is None:
            return self._issue("missing-effective-time", source_of(r), "no usable effective time or issued date")
        temperature_only = not _is_lab(parts)
        # A temperature dated with a local date may run a day ahead of UTC (timing.begun_by): reading it can only
        # raise the fever. A lab result so dated is held to UTC: it would become the newest result and could hide
        # a current timed ANC, and a date ahead of UTC is as likely an error.
        if not (timing.begun_by(when, self.future_limit) if temperature_only else when.effective <= self.future_limit):
            return self._issue("future-dated", source_of(r), "effective time is in the future; ignored")
        if temperature_only and when.latest < self.temperatures_from:
            return  # outside the temperature window: never read, so never validated
        if not temperature_only and self.defer_before is not None and when.latest < self.defer_before:
            self.deferred.append((r, when))  # an older lab: read only if no current ANC exists
            return
        pending = _Pending(r, source_of(r), status, parts, when)
        if temperature_only or any(LAB_ROLES.get(code) is LabRole.ANC for _, held in parts for code in held):
            self._read(pending, validate=True)
        else:
            self.components.append(pending)  # read by facts(), once every measured ANC is known

    def _read_components(self) -> None:
        """Read the pending WBC and differential results, validating those no usable measured ANC makes unused.

        Results of one effective time always form one group in ``service.anc``, and a group's usable measured ANC
        is its ANC: the other results of that time are then never part of it, so validating them is wasted work
        (two thirds of the lab results of a typical full blood count).
        """
        measured = {lab.effective for lab in self.labs if lab.role is LabRole.ANC and lab.value is not None}
        for pending in self.components:
            self._read(pending, validate=pending.when.effective not in measured)
        self.components.clear()

    def _read(self, pending: _Pending, *, validate: bool) -> None:
        unread = _unread_components(pending.resource, pending.parts)
        if validate:
            usable, issue = screen(Observation, pending.resource, _observation_reads(pending.resource), unread,
                                   self.known)
            self.issues.update([issue] if issue else [])
            if not usable:
                return
        problem = quoted_decimal(pending.resource, unread)
        if problem is not None:
            return self._issue("malformed-resource", pending.source, problem)
        for holder, codes in pending.parts:
            self._reading(pending.source, pending.status, pending.resource, holder, codes, pending.when)

    def _reading(
        self,
        source: str,
        status: str,
        r: Mapping[str, Any],
        holder: Mapping[str, Any],
        codes: frozenset[Code],
        when: timing.Timing,
    ) -> None:
        roles = {LAB_ROLES[c] for c in codes if c in LAB_ROLES}
        if len(roles) + bool(codes & TEMPERATURE) > 1:
            return self._issue("malformed-resource", source, "code: codings with different meanings")
        value, quantity, problem = _value(holder)
        if value is None and problem is None:
            return  # no value (e.g. dataAbsentReason): nothing to read
        comparator = quantity.get("comparator")
        # Not a code the validation checks (its binding is not enforced): read as no comparator, a bound became an
        # exact value ("<500" graded one grade too low, "<38.6" in an unknown spelling a 38.6 C fever).
        unknown_comparator = (f"comparator: unknown value {comparator!r}"
                              if isinstance(comparator, str) and comparator not in _COMPARATORS else None)
        if not roles:
            degrees, problem = (None, problem) if value is None else celsius(value, quantity,
                                                                             below=comparator == "<")
            if degrees is not None and unknown_comparator is not None:
                degrees, problem = None, unknown_comparator
            if degrees is None:
                return self._issue("temperature-uninterpretable", source, problem)
            reading = Temperature(source, degrees, when.effective, when.latest, status,
                                  maximum=bool(codes & TEMPERATURE_MAXIMUM),
                                  comparator=comparator if isinstance(comparator, str) else None)
            if reading.undecided:
                # Read at its bound, "<38.6" was a febrile-neutropenia emergency the data do not show and ">=37.9"
                # broke a run the true value may have continued. Not used for the fever rule; the clinician is told.
                return self._issue("temperature-uninterpretable", source,
                                   f"comparator: {comparator!r} {degrees} °C, a bound that leaves open whether it was "
                                   f"{FEVER_SUSTAINED} °C or more; not used for the fever rule")
            self.temperatures.add(reading)
            return
        role = roles.pop()
        converted = None
        if value is not None and value < 0:
            problem = "negative value"
        elif value is not None and role in COUNT_ROLES:
            converted, problem = count_per_ul(value, quantity)
        elif value is not None:
            converted, problem = percent(value, quantity, fraction=role is LabRole.FRACTION)
        specimen = r.get("specimen")
        if unknown_comparator is not None:
            converted, problem = None, unknown_comparator
        self.labs.add(
            LabResult(
                source=source,
                role=role,
                code=min(c for c in codes if c in LAB_ROLES),
                value=converted,
                comparator=_COMPARATORS.get(comparator) if isinstance(comparator, str) else None,
                effective=when.effective,
                latest=when.latest,
                status=status,
                specimen=reference(specimen.get("reference")) if isinstance(specimen, (dict, Mapping)) else None,
                reference_low=_reference_low(holder, quantity) if role is LabRole.ANC else None,
                problem=problem,
            )
        )


def _contained_results(
    report: Mapping[str, Any], named: frozenset[str]
) -> tuple[list[Mapping[str, Any]], int, int]:
    """The Observations a DiagnosticReport carries in ``contained`` and names (``named``: its "#id" results), how
    many of them name a subject other than the report's (those are left out: the prefetch checks only the report),
    and how many of ``named`` match no contained Observation.

    Each is given the id "<report id>.<its id>" (:func:`_contained_id`: a valid FHIR id, unique in the request), so
    that findings cite it and two reports' "#r1" stay apart. Results that are separate resources arrive on their own.
    """
    report_id = report.get("id")
    items = report.get("contained")
    if not named or not isinstance(report_id, str) or not report_id:
        return [], 0, 0
    subject = _subject(report)
    results: list[Mapping[str, Any]] = []
    foreign, found = 0, set()
    for item in items if isinstance(items, list) else ():
        if not (isinstance(item, (dict, Mapping)) and item.get("resourceType") == "Observation"
                and isinstance(item.get("id"), str) and item["id"] in named):
            continue
        found.add(item["id"])
        if item.get("subject") is not None and _subject(item) != subject:  # "subject": null is no subject
            foreign += 1
            continue
        results.append({**item, "id": _contained_id(report_id, item["id"])})
    return results, foreign, len(named - found)


def _broken_references(items: object) -> bool:
    """Whether ``items`` (a raw element that should be a list of References) is present but not one.

    A ``reference`` sent as null is absent (a display-only Reference), as every null member is."""
    return _not_a_list_of(items, lambda item: isinstance(item, (dict, Mapping))
                          and isinstance(item.get("reference"), (str, type(None))))


def _broken_components(items: object) -> bool:
    """Whether ``items`` (a raw Observation.component) is present but not a list of objects (null is absent)."""
    return _not_a_list_of(items, lambda item: isinstance(item, (dict, Mapping)))


def _not_a_list_of(items: object, valid: Callable[[Any], bool]) -> bool:
    """Whether ``items`` is present (not None) but not a list whose every item is ``valid``."""
    return items is not None and not (isinstance(items, list) and all(valid(item) for item in items))


def _carries_observations(report: Mapping[str, Any]) -> bool:
    """Whether a DiagnosticReport holds any Observation in ``contained``."""
    items = report.get("contained")
    return any(isinstance(item, (dict, Mapping)) and item.get("resourceType") == "Observation"
               for item in (items if isinstance(items, list) else ()))


def _contained_id(report_id: str, local_id: str) -> str:
    """"<report id>.<local id>", or, past the 64 characters of a FHIR id, the report id's start and a digest of both."""
    joined = f"{report_id}.{local_id}"
    if len(joined) <= 64:
        return joined
    return f"{report_id[:40]}.{hashlib.blake2b(joined.encode(), digest_size=8).hexdigest()}"


def _subject(resource: Mapping[str, Any]) -> str | None:
    """The "Type/id" a resource's ``subject`` refers to, if it is a readable reference."""
    value = resource.get("subject")
    return reference(value.get("reference")) if isinstance(value, (dict, Mapping)) else None


def _observation_reads(r: Mapping[str, Any]) -> frozenset[str]:
    """The elements of ``r`` the rules read: :data:`OBSERVATION_READS`, and ``issued`` when it gives the time."""
    # The effective[x] keys written out (as timing.observation_timing reads them, a null member as absent): any()
    # over a generator cost more than the three look-ups.
    timed = (r.get("effectiveDateTime") is not None or r.get("effectiveInstant") is not None
             or r.get("effectivePeriod") is not None)
    return OBSERVATION_READS if timed else _READS_WITH_ISSUED


def _parts(r: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], frozenset[Code]]]:
    """The Observation and its components that carry a code the rules read, each with those codes."""
    codes = codes_of(r.get("code")) & OBSERVATION_CODES
    parts = [(r, codes)] if codes else []
    components = r.get("component")
    if isinstance(components, list):
        for component in components:
            if isinstance(component, (dict, Mapping)):
                component_codes = codes_of(component.get("code")) & OBSERVATION_CODES
                if component_codes:
                    parts.append((component, component_codes))
    return parts


#: The LOINC codes the rules read, for recognising one sent without its system.
_LOINC_CODES_READ = frozenset(code for system, code in OBSERVATION_CODES if system == LOINC)


def _code_without_system(r: Mapping[str, Any]) -> str | None:
    """A code the rules read (as LOINC) that ``r`` or one of its components sends in a coding without a system."""
    components = r.get("component")
    holders = [r, *(components if isinstance(components, list) else ())]
    for holder in holders:
        concept = holder.get("code") if isinstance(holder, (dict, Mapping)) else None
        codings = concept.get("coding") if isinstance(concept, (dict, Mapping)) else None
        for coding in codings if isinstance(codings, list) else ():
            if isinstance(coding, (dict, Mapping)) and coding.get("system") is None:
                code = coding.get("code")
                if isinstance(code, str) and code.strip() in _LOINC_CODES_READ:
                    return code.strip()
    return None


def _unread_components(
    r: Mapping[str, Any], parts: list[tuple[Mapping[str, Any], frozenset[Code]]]
) -> frozenset[int]:
    """The indexes of ``r``'s components that are none of ``parts``: the rules never read them (a heart rate
    beside a temperature in a vital-signs panel), so an error in one must not make the others unusable."""
    components = r.get("component")
    if not isinstance(components, list):
        return frozenset()
    read = {id(holder) for holder, _ in parts}
    return frozenset(n for n, component in enumerate(components) if id(component) not in read)


def _is_lab(parts: list[tuple[Mapping[str, Any], frozenset[Code]]]) -> bool:
    """Whether ``parts`` (see :func:`_parts`) hold a lab result (anything but a temperature)."""
    return any(not held <= TEMPERATURE for _, held in parts)


@dataclass(frozen=True)
class _Pending:
    """An Observation in its window, classified but not yet read: its parts are (holder, codes the rules read)."""

    resource: Mapping[str, Any]
    source: str
    status: str
    parts: list[tuple[Mapping[str, Any], frozenset[Code]]]
    when: timing.Timing


def _value(holder: Mapping[str, Any]) -> tuple[Decimal | None, Mapping[str, Any], str | None]:
    """The numeric value and its Quantity; a problem when the value is not a Quantity with a number.

    A member sent as null is absent, as everywhere: ``"valueQuantity": null`` or ``"value": null`` is no value."""
    quantity = holder.get("valueQuantity")
    if isinstance(quantity, (dict, Mapping)):
        value = decimal(quantity.get("value"))
        return value, quantity, None if value is not None or quantity.get("value") is None else "value is not a number"
    if any(isinstance(key, str) and key.startswith("value") and value is not None for key, value in holder.items()):
        return None, {}, "value is not a Quantity"
    return None, {}, None


def _reference_low(holder: Mapping[str, Any], quantity: Mapping[str, Any]) -> Decimal | None:
    """The lower limit of the first reference range with one, in cells/uL (its own unit, else the value's)."""
    ranges = holder.get("referenceRange")
    for item in ranges if isinstance(ranges, list) else ():
        low = item.get("low") if isinstance(item, Mapping) else None
        value = decimal(low.get("value")) if isinstance(low, Mapping) else None
        if value is not None and isinstance(low, Mapping):
            converted, _ = count_per_ul(value, low if ("code" in low or "unit" in low) else quantity)
            if converted is not None:
                return converted
    return None
