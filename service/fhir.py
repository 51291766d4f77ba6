"""Helpers for raw FHIR JSON (untrusted dicts): flattening, de-duplication, references, codes, numbers, validation.

Every function accepts anything JSON can hold (and more) and never raises on bad data.

The functions that run for every resource of a request test ``isinstance(x, (dict, Mapping))``, not just
``Mapping``: a parsed JSON object is always a dict, found at the first, cheap test (the ABC's costs some 100 ns,
tens of thousands of times in a large request), and any other Mapping still passes the second.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from service import timing
from service.codes import Code, canonical

#: Bundles nested deeper than this are not opened (bounded recursion): :func:`flatten` passes them on unopened,
#: and the engine reports them (``service.extract``).
MAX_BUNDLE_DEPTH = 4
#: Numbers with a larger decimal exponent are not values a lab or a thermometer reports (and overflow Decimal).
MAX_EXPONENT = 30


def flatten(resources: object, depth: int = 0) -> Iterator[Mapping[str, Any]]:
    """The resources of ``resources``, with Bundles opened; anything that is not a JSON object is skipped.

    A Bundle nested more than :data:`MAX_BUNDLE_DEPTH` deep is yielded as it is, unopened, so that the caller can
    report it: a Bundle is never yielded otherwise.
    """
    for item in resources if isinstance(resources, Iterable) and not isinstance(resources, (str, bytes)) else ():
        if not isinstance(item, (dict, Mapping)):
            continue
        if item.get("resourceType") == "Bundle" and depth < MAX_BUNDLE_DEPTH:
            entries = item.get("entry")
            inner = ([e.get("resource") for e in entries if isinstance(e, (dict, Mapping))]
                     if isinstance(entries, list) else [])
            yield from flatten(inner, depth + 1)
        else:
            yield item


#: A versionId that orders copies: a number (FHIR allows any id; only numbers have an order).
_VERSION_NUMBER = re.compile(r"[0-9]{1,18}")


def _version(resource: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """What orders copies of one resource: a numeric ``versionId`` and a valid ``lastUpdated``, None when absent.

    A value that is not valid FHIR (or not a number, for the versionId) is left out, never read: a copy it cannot
    order is kept beside the others (the most severe value counts), so an invalid ``meta`` can neither make a copy
    win nor make its record unusable.
    """
    meta = resource.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    version = meta.get("versionId")
    number = int(version) if isinstance(version, str) and _VERSION_NUMBER.fullmatch(version) else None
    stamp = meta.get("lastUpdated")
    # Only a FHIR instant (to the second, with a zone) orders copies, not a date or a time without a zone.
    updated = timing.parse(stamp) if isinstance(stamp, str) and timing.INSTANT.fullmatch(stamp) else None
    return number, None if updated is None else updated.effective.timestamp()


def _latest(times: Iterable[float | None]) -> float | None:
    return max((t for t in times if t is not None), default=None)


@dataclass(frozen=True)
class Deduplicated:
    """Resources with older versions dropped, and the ones whose copies contradict each other."""

    resources: tuple[Mapping[str, Any], ...]
    #: "Type/id" -> how many different copies were all kept because nothing tells which one is current.
    conflicts: Mapping[str, int]


def deduplicated(resources: Iterable[Mapping[str, Any]]) -> Deduplicated:
    """Drop older versions of a resource that arrives more than once (same type and id, older ``meta``).

    Identical copies count once. Different copies that cannot be told apart (no ``versionId`` or
    ``lastUpdated`` on one of them, or the same on both) are all kept, so the rules see every value and grade the
    most severe (conservative), and are listed in ``conflicts``: the source contradicts itself.
    """
    kept: list[Mapping[str, Any]] = []
    # The first copy of each id, and a list only for the ids that repeat (rare): a list for every one of the
    # thousands of resources of a large request cost a tenth of the whole extraction.
    first: dict[tuple[str, str], Mapping[str, Any]] = {}
    repeated: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for resource in resources:
        rid, rtype = resource.get("id"), resource.get("resourceType")
        if isinstance(rid, str) and rid and isinstance(rtype, str):
            key = (rtype, rid)
            if key in first:
                repeated.setdefault(key, [first[key]]).append(resource)
            else:
                first[key] = resource
        else:
            kept.append(resource)
    conflicts: dict[str, int] = {}
    for key, resource in first.items():
        versions = repeated.get(key)
        if versions is None:
            kept.append(resource)
            continue
        versions = _distinct(_current(versions))
        if len(versions) > 1:
            conflicts[source_of(versions[0])] = len(versions)
        kept += versions
    return Deduplicated(tuple(kept), conflicts)


def _current(copies: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The copies that may be the current version: those no other copy is known to be newer than.

    One copy is newer than another when both have a version number and its number is higher (between equal
    numbers, when both have a valid lastUpdated and its is later), or, when one has no number, when both have a
    valid lastUpdated and its is later. A copy nothing valid orders against the others stays beside them, so the
    rules see every value it may hold. Linear in the number of copies: a request may repeat one id thousands of
    times.
    """
    keys = [_version(copy) for copy in copies]
    numbers = [number for number, _ in keys if number is not None]
    top = max(numbers, default=None)
    latest_at_top = _latest(time for number, time in keys if number is not None and number == top)
    latest_unnumbered = _latest(time for number, time in keys if number is None)
    latest_any = _latest(time for _, time in keys)

    def superseded(number: int | None, time: float | None) -> bool:
        if number is None:
            return time is not None and latest_any is not None and time < latest_any
        if top is not None and number < top:
            return True
        later = [t for t in (latest_at_top, latest_unnumbered) if t is not None]
        return time is not None and any(time < t for t in later)

    return [copy for copy, (number, time) in zip(copies, keys) if not superseded(number, time)]


def _distinct(copies: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``copies`` without repeats, in order; compared by canonical JSON (linear, however many copies arrive)."""
    seen: set[str] = set()
    distinct = []
    for n, copy in enumerate(copies):
        try:
            text = json.dumps(copy, sort_keys=True, default=repr)
        except (TypeError, ValueError, RecursionError):  # not JSON (keys of mixed types): count it as different
            text = f"#{n}"
        if text not in seen:
            seen.add(text)
            distinct.append(copy)
    return distinct


def reference(value: object) -> str | None:
    """A FHIR reference string reduced to "Type/id" (absolute URLs and ``_history`` dropped)."""
    if not isinstance(value, str):
        return None
    parts = value.strip().split("/_history/")[0].strip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 and parts[-2] and parts[-1] else None


def references(items: object) -> frozenset[str]:
    """The "Type/id" targets of a raw list of Reference objects."""
    if not isinstance(items, list):
        return frozenset()
    return frozenset(ref for item in items
                     if isinstance(item, (dict, Mapping)) and (ref := reference(item.get("reference"))))


def references_within(items: object) -> frozenset[str]:
    """The ids a raw list of References names inside the resource itself ("#id": its ``contained`` resources)."""
    if not isinstance(items, list):
        return frozenset()
    return frozenset(ref[1:] for item in items if isinstance(item, (dict, Mapping))
                     and isinstance(ref := item.get("reference"), str) and ref.startswith("#") and len(ref) > 1)


#: What :func:`source_of` cites as the id of a resource without one (shared by every such resource).
NO_ID = "/(no id)"


def source_of(resource: Mapping[str, Any]) -> str:
    """How findings cite ``resource``: "Type/id" ("Type/(no id)" without an id)."""
    rid = resource.get("id")
    return f"{resource.get('resourceType')}{f'/{rid}' if isinstance(rid, str) and rid else NO_ID}"


def codes_of(concept: object) -> frozenset[Code]:
    """The (system, code) pairs of a raw CodeableConcept, system aliases resolved."""
    codings = concept.get("coding") if isinstance(concept, (dict, Mapping)) else None
    if not isinstance(codings, list):
        return frozenset()
    pairs = set()
    for coding in codings:  # a plain loop: this runs for every coded element of a request
        if isinstance(coding, (dict, Mapping)):
            pair = canonical(coding.get("system"), coding.get("code"))
            if pair is not None:
                pairs.add(pair)
    return frozenset(pairs)


def status_codes(concept: object) -> frozenset[str]:
    """The codes of a raw status CodeableConcept (their system is fixed by FHIR, so only the code counts)."""
    return frozenset(code for _, code in codes_of(concept))


def decimal(value: object) -> Decimal | None:
    """A finite ``Decimal`` from a JSON number of sane magnitude; None otherwise.

    A string is never a number here, not even "0.4": FHIR JSON represents decimals as JSON numbers (R4 §2.6.2).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() and abs(number.adjusted()) <= MAX_EXPONENT else None


def quoted_decimal(observation: Mapping[str, Any], unread_components: Collection[int] = ()) -> str | None:
    """Where a Quantity value of an Observation (or a component) is a JSON string instead of a number.

    FHIR JSON decimals are JSON numbers (R4 §2.6.2), but fhir.resources' lax validation turns "0.4" into 0.4, so
    this is checked on the raw JSON: the value, and the reference range limits, of the resource and its components,
    except the components numbered in ``unread_components`` (ones the rules do not read).
    """
    path = _quoted_path(observation)
    if path is not None:
        return _quoted_problem(path)
    components = observation.get("component")
    for n, component in enumerate(components if isinstance(components, list) else ()):
        if isinstance(component, (dict, Mapping)) and n not in unread_components:
            path = _quoted_path(component)
            if path is not None:
                return _quoted_problem(f"component[{n}].{path}")
    return None


def _quoted_path(holder: Mapping[str, Any]) -> str | None:
    """The first of ``holder``'s valueQuantity and reference range limits whose value is a string, by its path.

    Paths are only written for the one found: this runs for every Observation read, nearly all of them clean.
    """
    if _quoted(holder.get("valueQuantity")):
        return "valueQuantity"
    ranges = holder.get("referenceRange")
    for n, limits in enumerate(ranges if isinstance(ranges, list) else ()):
        if isinstance(limits, (dict, Mapping)):
            for end in ("low", "high"):
                if _quoted(limits.get(end)):
                    return f"referenceRange[{n}].{end}"
    return None


def _quoted(quantity: object) -> bool:
    """Whether ``quantity`` is a Quantity whose value is a JSON string."""
    return isinstance(quantity, (dict, Mapping)) and isinstance(quantity.get("value"), str)


def _quoted_problem(path: str) -> str:
    return f"{path}.value: a JSON string, not a number (FHIR JSON decimals are numbers)"
