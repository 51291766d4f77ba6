"""FHIR R4 search over in-memory resources: the pure half of the fixture FHIR server.

Implements the subset of R4 search (https://hl7.org/fhir/R4/search.html) that CDS Hooks prefetch templates and
the CDS Hooks Sandbox use:

- **token** (`code`, `status`, `clinical-status`, `category`, `_id`, ...): ``system|code``, ``|code`` (no
  system), ``system|`` (any code of the system) and bare ``code`` (any system); a comma list is OR; any coding of a
  CodeableConcept may match; the ``:not`` modifier is supported.
- **reference** (`patient`, `subject`): ``X``, ``Patient/X`` or an absolute URL ending in ``Patient/X``.
- **date** (`date`, `birthdate`, `_lastUpdated`, ...): prefixes eq, ne, gt, lt, ge, le, sa, eb (and ap, taken as
  "overlaps"), at any precision (YYYY, YYYY-MM, YYYY-MM-DD, with minutes, seconds or fractions). Both the search
  value and the resource value are ranges, compared as the spec's table says (search.html#prefix). A value
  without a time zone is taken as UTC.
- **string** (Patient `name`): case-insensitive "starts with" on any name part.
- Repeating a parameter ANDs the repeats; ``_sort`` (``date``, ``-date``, ``_id``, ``_lastUpdated``, any date
  parameter), ``_count`` and ``_offset`` (this server's paging parameter) shape the result.
- ``_include=<Type>:<reference parameter>`` (e.g. ``MedicationRequest:medication``, which US Core requires of a
  server whose orders reference Medication resources) names the resources of a page to add to it (search mode
  "include"; :func:`included`).

Parameters this module does not know, and unknown modifiers on parameters it does know, are *ignored* and
reported back in ``SearchResult.ignored`` (lenient, like many servers: a search never fails for an unknown
parameter; the server lists them in an OperationOutcome entry). Bad values of a known parameter raise
SearchError (an HTTP 400).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

#: Page size when a search has no ``_count``, and the largest page served.
DEFAULT_COUNT = 100
MAX_COUNT = 1000
#: The paging parameter of this server's ``next`` links (its equivalent of HAPI's ``_getpagesoffset``).
OFFSET_PARAM = "_offset"

_MIN = datetime.min.replace(tzinfo=timezone.utc)
_MAX = datetime.max.replace(tzinfo=timezone.utc)
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")
#: Result-shaping parameters: not filters. ``_format`` and ``_pretty`` are accepted and have no effect.
_RESULT_PARAMS = frozenset({"_count", OFFSET_PARAM, "_sort", "_summary", "_format", "_pretty", "_total"})

Range = tuple[datetime, datetime]  # [start, end)


class SearchError(ValueError):
    """A search parameter has a value this server cannot interpret (HTTP 400)."""


# --- dates ------------------------------------------------------------------------------------------------------


def date_range(value: str) -> Range:
    """The implicit range [start, end) of a FHIR date, dateTime or instant at its precision (no zone: UTC).

    Raises ValueError for anything else.
    """
    match = _DATE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a FHIR date or dateTime")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = timezone.utc
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    if month is None:
        start = datetime(int(year), 1, 1, tzinfo=tz)
        end = _add_months(start, 12)
    elif day is None:
        start = datetime(int(year), int(month), 1, tzinfo=tz)
        end = _add_months(start, 1)
    elif hour is None:
        start = datetime(int(year), int(month), int(day), tzinfo=tz)
        end = _add(start, timedelta(days=1))
    else:
        start = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), tzinfo=tz)
        if fraction:
            digits = fraction[1:7]
            start += timedelta(microseconds=int(digits.ljust(6, "0")))
            step = timedelta(microseconds=max(1, 10 ** (6 - len(digits))))
        else:
            step = timedelta(seconds=1) if second else timedelta(minutes=1)
        end = _add(start, step)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def _add(moment: datetime, step: timedelta) -> datetime:
    try:
        return moment + step
    except OverflowError:
        return _MAX


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.month - 1 + months
    year = moment.year + index // 12
    return _MAX if year > 9999 else moment.replace(year=year, month=index % 12 + 1)


def element_range(value: Any) -> Range | None:
    """The range a resource element covers: a date/dateTime/instant string or a Period; None if neither."""
    if isinstance(value, str):
        try:
            return date_range(value)
        except ValueError:
            return None
    if isinstance(value, Mapping) and ("start" in value or "end" in value):
        start = element_range(value.get("start")) if isinstance(value.get("start"), str) else None
        end = element_range(value.get("end")) if isinstance(value.get("end"), str) else None
        if start is None and end is None:
            return None
        return (start[0] if start else _MIN), (end[1] if end else _MAX)
    return None


def date_matches(prefix: str, search: Range, target: Range) -> bool:
    """R4 search.html#prefix for dates: ``target`` (the resource's range) against ``search`` (the value's)."""
    low, high = search
    start, end = target
    contains = low <= start and end <= high
    if prefix == "eq":
        return contains
    if prefix == "ne":
        return not contains
    if prefix == "gt":  # the range above the search value overlaps the target
        return end > high
    if prefix == "lt":  # the range below the search value overlaps the target
        return start < low
    if prefix == "ge":
        return end > high or contains
    if prefix == "le":
        return start < low or contains
    if prefix == "sa":  # no overlap, and the target lies above
        return start >= high
    if prefix == "eb":
        return end <= low
    return start < high and end > low  # ap: this server takes "approximately" as "overlaps"


def parse_date_param(value: str) -> tuple[str, Range]:
    """A date search value's prefix (default eq) and range; SearchError if it is not one."""
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    text = value[2:] if value[:2] in _PREFIXES else value
    try:
        return prefix, date_range(text)
    except ValueError:
        raise SearchError(f"{value!r} is not a date search value ([prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]])") \
            from None


# --- tokens and references --------------------------------------------------------------------------------------


def split_values(value: str) -> list[str]:
    """A parameter value split on commas (OR), honouring the ``\\,`` escape."""
    parts = re.split(r"(?<!\\),", value)
    return [part.replace("\\,", ",") for part in parts]


def _codings(value: Any) -> list[tuple[str | None, str | None, bool]]:
    """(system, code, system_is_implicit) for a CodeableConcept, Coding, Identifier, code or boolean."""
    if isinstance(value, bool):
        return [(None, "true" if value else "false", True)]
    if isinstance(value, str):
        return [(None, value, True)]  # a `code` element: its system is implied by the element
    if not isinstance(value, Mapping):
        return []
    if isinstance(value.get("coding"), list):
        return [item for coding in value["coding"] for item in _codings(coding) if not item[2]]
    code = value.get("code", value.get("value"))
    if isinstance(code, str):
        system = value.get("system")
        return [(system if isinstance(system, str) else None, code, False)]
    return []


def token_matches(search: str, value: Any) -> bool:
    """True when one coding of ``value`` matches the token ``search`` (``system|code``, ``|code``, ``code``...)."""
    if "|" in search:
        system, code = search.split("|", 1)
    else:
        system, code = None, search
    for have_system, have_code, implicit in _codings(value):
        if code and have_code != code:
            continue
        if implicit or system is None:
            if code:
                return True
            continue
        if system == "" and have_system is None:
            return True
        if system and have_system == system:
            return True
    return False


def reference_parts(reference: str) -> tuple[str | None, str]:
    """(type or None, id) of ``X``, ``Patient/X``, ``Patient/X/_history/1`` or ``http://host/fhir/Patient/X``."""
    path = reference.split("/_history/")[0].rstrip("/")
    segments = path.split("/")
    if len(segments) >= 2 and segments[-2][:1].isupper() and "urn:" not in path:
        return segments[-2], segments[-1]
    return None, path


def reference_matches(search: str, value: Any, target_type: str | None) -> bool:
    """True when a Reference points at ``search`` (an id or ``Type/id``), of ``target_type`` if given."""
    reference = value.get("reference") if isinstance(value, Mapping) else None
    if not isinstance(reference, str):
        return False
    have_type, have_id = reference_parts(reference)
    want_type, want_id = reference_parts(search)
    if have_id != want_id:
        return False
    for wanted in (want_type, target_type):
        if wanted and have_type and wanted != have_type:
            return False
    return True


def string_matches(search: str, value: Any) -> bool:
    """Case-insensitive "starts with" on a string, or on any part of a HumanName / Address."""
    if isinstance(value, str):
        return value.casefold().startswith(search.casefold())
    if isinstance(value, Mapping):
        return any(string_matches(search, item) for item in value.values())
    if isinstance(value, list):
        return any(string_matches(search, item) for item in value)
    return False


# --- parameter definitions ----------------------------------------------------------------------------------------


def _elements(resource: Mapping[str, Any], path: str) -> list[Any]:
    """Values of a top-level element; ``effective[x]`` finds whichever choice is present."""
    if path.endswith("[x]"):
        stem = path[:-3]
        return [value for key, value in resource.items() if key.startswith(stem) and key[len(stem):][:1].isupper()]
    if path == "meta.lastUpdated":
        meta = resource.get("meta")
        return [meta["lastUpdated"]] if isinstance(meta, Mapping) and "lastUpdated" in meta else []
    value = resource.get(path)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass(frozen=True)
class SearchParam:
    """One search parameter: its name, FHIR type, and the elements it reads (the first present, for dates)."""

    name: str
    type: str  # "token" | "reference" | "date" | "string"
    paths: tuple[str, ...]
    documentation: str = ""
    target: str | None = None  # reference parameters: the only resource type they may point at

    def values(self, resource: Mapping[str, Any]) -> list[Any]:
        """The resource's values for this parameter (dates: those of the first path that has any)."""
        if self.name == "_id":
            return [resource["id"]] if isinstance(resource.get("id"), str) else []
        found: list[Any] = []
        for path in self.paths:
            found.extend(_elements(resource, path))
            if found and self.type == "date":
                break
        return found

    def date(self, resource: Mapping[str, Any]) -> Range | None:
        """The resource's range for a date parameter (the first value that is a date or Period)."""
        for value in self.values(resource):
            found = element_range(value)
            if found is not None:
                return found
        return None

    def matches(self, resource: Mapping[str, Any], value: str, modifier: str | None) -> bool:
        """True when ``resource`` matches one of the comma-separated ``value``\\s."""
        if self.type == "date":
            wanted = [parse_date_param(item) for item in split_values(value)]
            target = self.date(resource)
            return target is not None and any(date_matches(prefix, found, target) for prefix, found in wanted)
        values = self.values(resource)
        items = split_values(value)
        if self.type == "reference":
            kind = modifier if modifier else self.target  # `subject:Patient=X`
            return any(reference_matches(item, have, kind) for item in items for have in values)
        if self.type == "string":
            return any(string_matches(item, have) for item in items for have in values)
        hit = any(token_matches(item, have) for item in items for have in values)
        return not hit if modifier == "not" else hit

    def modifier_supported(self, modifier: str | None) -> bool:
        """True for no modifier, ``:not`` on tokens, and a resource type (``:Patient``) on references."""
        if modifier is None:
            return True
        if self.type == "token":
            return modifier == "not"
        if self.type == "reference":
            return modifier[:1].isupper() and (self.target is None or modifier == self.target)
        return False


_ID = SearchParam("_id", "token", (), "Logical id; comma list = OR.")
_LAST_UPDATED = SearchParam("_lastUpdated", "date", ("meta.lastUpdated",), "meta.lastUpdated, with prefixes.")
_PATIENT = SearchParam("patient", "reference", ("subject",), "The patient: X, Patient/X.", target="Patient")
_SUBJECT = SearchParam("subject", "reference", ("subject",), "The subject: X, Patient/X.")
_COMMON = (_ID, _LAST_UPDATED)


def _params(*params: SearchParam) -> dict[str, SearchParam]:
    return {param.name: param for param in (*_COMMON, *params)}


#: Search parameters per resource type. Types found in the fixtures but not listed get GENERIC_PARAMS.
SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    "Patient": _params(
        SearchParam("gender", "token", ("gender",)),
        SearchParam("birthdate", "date", ("birthDate",)),
        SearchParam("name", "string", ("name",), "Starts-with on any part of a name."),
        SearchParam("identifier", "token", ("identifier",)),
    ),
    "Observation": _params(
        _PATIENT, _SUBJECT,
        SearchParam("code", "token", ("code",), "system|code, |code or code; comma list = OR."),
        SearchParam("status", "token", ("status",)),
        SearchParam("category", "token", ("category",)),
        SearchParam("date", "date", ("effective[x]", "issued"), "effective[x], else issued."),
    ),
    "Condition": _params(
        _PATIENT, _SUBJECT,
        SearchParam("code", "token", ("code",)),
        SearchParam("clinical-status", "token", ("clinicalStatus",)),
        SearchParam("verification-status", "token", ("verificationStatus",)),
        SearchParam("category", "token", ("category",)),
        SearchParam("onset-date", "date", ("onset[x]",)),
        SearchParam("recorded-date", "date", ("recordedDate",)),
        SearchParam("date", "date", ("onset[x]", "recordedDate"), "onset[x], else recordedDate."),
    ),
    "MedicationRequest": _params(
        _PATIENT, _SUBJECT,
        SearchParam("code", "token", ("medicationCodeableConcept",)),
        SearchParam("medication", "reference", ("medicationReference",), "The Medication: X, Medication/X.",
                    target="Medication"),
        SearchParam("status", "token", ("status",)),
        SearchParam("intent", "token", ("intent",)),
        SearchParam("category", "token", ("category",)),
        SearchParam("authoredon", "date", ("authoredOn",)),
        SearchParam("date", "date", ("authoredOn",), "authoredOn."),
    ),
}
GENERIC_PARAMS = _params(
    SearchParam("patient", "reference", ("subject", "patient"), target="Patient"),
    SearchParam("subject", "reference", ("subject",)),
)


def params_for(resource_type: str) -> Mapping[str, SearchParam]:
    """The search parameters of ``resource_type``."""
    return SEARCH_PARAMS.get(resource_type, GENERIC_PARAMS)


# --- the search ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    """All matches in order, the page asked for, and which parameters were applied or ignored."""

    matches: tuple[Mapping[str, Any], ...]
    count: int
    offset: int
    used: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]
    summary_count: bool = False
    #: The reference parameters of ``_include``, each with the resource type it is limited to (None: any).
    includes: tuple[tuple[SearchParam, str | None], ...] = ()

    @property
    def page(self) -> tuple[Mapping[str, Any], ...]:
        """The matches on the requested page (none for ``_summary=count``)."""
        if self.summary_count:
            return ()
        return self.matches[self.offset:self.offset + self.count]

    @property
    def next_offset(self) -> int | None:
        """The offset of the next page, or None when this is the last one."""
        following = self.offset + self.count
        return following if not self.summary_count and self.count and following < len(self.matches) else None


def _int_param(name: str, value: str, minimum: int) -> int:
    if not value.strip().isdigit() or int(value) < minimum:
        raise SearchError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def search(resources: Iterable[Mapping[str, Any]], resource_type: str,
           params: Sequence[tuple[str, str]]) -> SearchResult:
    """Search ``resources`` of ``resource_type`` with the (name, value) pairs of a query; SearchError on a bad value."""
    definitions = params_for(resource_type)
    filters: list[tuple[SearchParam, str, str | None]] = []
    used: list[tuple[str, str]] = []
    ignored: list[str] = []
    count, offset, sort, summary_count = DEFAULT_COUNT, 0, "", False
    includes: list[tuple[SearchParam, str | None]] = []
    for name, value in params:
        base, _, modifier = name.partition(":")
        if base == "_count":
            count = min(_int_param(name, value, 0), MAX_COUNT)
        elif base == OFFSET_PARAM:
            offset = _int_param(name, value, 0)
            continue  # paging is not part of the self link's parameters
        elif base == "_sort":
            sort = value
        elif base == "_summary":
            summary_count = value == "count"
        elif base == "_include":
            source, _, rest = value.partition(":")
            reference_name, _, target = rest.partition(":")
            param = definitions.get(reference_name) if source == resource_type else None
            if (param is None or param.type != "reference" or modifier
                    or (target and param.target is not None and target != param.target)):
                ignored.append(f"{name}={value}")
                continue
            includes.append((param, target or param.target))
        elif base in _RESULT_PARAMS:
            continue
        elif base in definitions and definitions[base].modifier_supported(modifier or None):
            param = definitions[base]
            if param.type == "date":
                for item in split_values(value):
                    parse_date_param(item)  # validate before searching
            filters.append((param, value, modifier or None))
        else:
            ignored.append(name)
            continue
        used.append((name, value))
    matches = [r for r in resources if r.get("resourceType") == resource_type
               and all(param.matches(r, value, modifier) for param, value, modifier in filters)]
    ordered, ignored_sort = sort_resources(matches, sort, definitions)
    ignored.extend(ignored_sort)
    return SearchResult(tuple(ordered), count, offset, tuple(used), tuple(ignored), summary_count, tuple(includes))


def included(result: SearchResult, find: Callable[[str, str], Mapping[str, Any] | None]) -> list[Mapping[str, Any]]:
    """The resources the ``_include`` parameters of ``result`` add to its page, each once, in page order.

    ``find(type, id)`` looks a resource up; references it cannot resolve (an absolute URL: another server; a
    contained resource; a resource not held) add nothing, as on a real server.
    """
    found: dict[tuple[str, str], Mapping[str, Any]] = {}
    for resource in result.page:
        for param, target in result.includes:
            for value in param.values(resource):
                ref = value.get("reference") if isinstance(value, Mapping) else None
                local = isinstance(ref, str) and not ref.startswith("#") and "://" not in ref
                kind, rid = reference_parts(ref) if local and isinstance(ref, str) else (None, "")
                if kind is None or (target is not None and kind != target) or (kind, rid) in found:
                    continue
                held = find(kind, rid)
                if held is not None:
                    found[(kind, rid)] = held
    return list(found.values())


def sort_resources(resources: Sequence[Mapping[str, Any]], sort: str,
                   definitions: Mapping[str, SearchParam]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """``resources`` ordered by a ``_sort`` value (comma list, ``-`` for descending; resources without a value
    last either way), and the sort keys that were ignored."""
    ordered = list(resources)
    ignored: list[str] = []
    keys = [key.strip() for key in sort.split(",") if key.strip()]
    for key in reversed(keys):  # stable sorts, least significant key first
        descending = key.startswith("-")
        name = key.lstrip("-")
        getter: Callable[[Mapping[str, Any]], Any]
        if name == "_id":
            def getter(resource: Mapping[str, Any]) -> Any:
                return resource.get("id")
        elif name in definitions and definitions[name].type == "date":
            param = definitions[name]

            def getter(resource: Mapping[str, Any], param: SearchParam = param) -> Any:
                found = param.date(resource)
                return found[0] if found else None
        else:
            ignored.append(f"_sort={key}")
            continue
        present = [r for r in ordered if getter(r) is not None]
        absent = [r for r in ordered if getter(r) is None]
        present.sort(key=getter, reverse=descending)
        ordered = present + absent
    return ordered, ignored
