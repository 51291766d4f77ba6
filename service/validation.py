"""Validation of raw resources with the fhir.resources R4B models, remembered by content.

Validating one Observation costs some 25 times more than parsing its JSON, and an EHR sends the same results
every time a chart is opened (a ward round opens each chart several times a day, each with the same labs and the
temperatures since). The verdict is a pure function of the resource's content, so it is kept per process, keyed
by a digest of the resource's JSON: a resource seen before costs a serialisation and a hash, not a validation.
The memo is bounded (least recently used verdicts go first) and holds verdicts only, never resource content.

:func:`screen` decides what a verdict means for the rules: a resource invalid in an element they read is not used;
one invalid only in elements they never read (a display text, an extension, an element from a later FHIR version)
is used, and the invalid elements are reported. An EHR's empty ``display`` on a temperature must not hide a fever.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import orjson

from service.fhir import source_of
from service.model import DataIssue

#: Verdicts kept per process; each costs about 150 bytes (a 16-byte digest, the model name and the verdict; more
#: for the rare invalid resource).
MEMO_SIZE = 32_768


#: The element path of an error that is not about one element (a rule across elements, an unexpected failure).
WHOLE_RESOURCE = ""
#: A FHIR element name (``_value`` holds a primitive's id and extensions); other location parts are the
#: validator's own steps, as are these names that no FHIR R4 element has.
_ELEMENT_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9]*")
_VALIDATOR_STEPS = frozenset({"root"})


class Verdict(NamedTuple):
    """Why a resource is not valid: its first error, and the element of every error.

    Elements are dotted paths without list indexes (``code.coding.display``); :data:`WHOLE_RESOURCE` for an
    error about the resource as a whole.
    """

    problem: str
    elements: frozenset[str]


def validate(model: type[Any], resource: Mapping[str, Any]) -> Verdict | None:
    """Why ``resource`` is not a valid ``model`` (a fhir.resources R4B class), or None when it is."""
    try:
        model.model_validate(resource)
    except Exception as error:  # noqa: BLE001 - untrusted input; pydantic raises several kinds
        errors = getattr(error, "errors", None)
        details = errors() if callable(errors) else None
        found = [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else []
        if not found:
            return Verdict(f"invalid {model.__name__}", frozenset({WHOLE_RESOURCE}))
        first = found[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "resource"
        elements = frozenset(_element(d.get("loc", ())) for d in found)
        return Verdict(f"{where}: {first.get('msg', 'invalid')}"[:200], elements)
    return None


def _element(location: object) -> str:
    """The dotted element path of a pydantic error location, with only FHIR element names in it.

    List indexes are left out, and so are the validator's own steps: fhir.resources reports an object sent as a
    list at ``subject.root``, which must count as ``subject`` (an element the rules read), not as a child of it
    they never read. Leaving a step out can only make the path shorter, so an error counts as read more often.
    """
    if not isinstance(location, (tuple, list)):
        return WHOLE_RESOURCE
    return ".".join(part for part in location
                    if isinstance(part, str) and part not in _VALIDATOR_STEPS and _ELEMENT_NAME.fullmatch(part))


def touches(verdict: Verdict, read: Collection[str]) -> bool:
    """Whether an invalid element of ``verdict`` is one of the ``read`` element paths, holds one or lies in one."""
    for element in verdict.elements:
        if element == WHOLE_RESOURCE:
            return True
        for path in read:
            if element == path or element.startswith(path + ".") or path.startswith(element + "."):
                return True
    return False


def screen(model: type[Any], resource: Mapping[str, Any], read: Collection[str]) -> tuple[bool, DataIssue | None]:
    """Whether the rules may use ``resource``, whose elements ``read`` they read, and the issue its validation gives.

    Invalid in an element that is read: not used, ``malformed-resource``. Invalid only elsewhere: used, with an
    ``invalid-unread-elements`` issue naming the elements (for whoever maintains the interface; no card shows it).
    """
    verdict = validation_error(model, resource)
    if verdict is None:
        return True, None
    if touches(verdict, read):
        return False, DataIssue("malformed-resource", source_of(resource), verdict.problem)
    elements = ", ".join(sorted(verdict.elements))
    return True, DataIssue("invalid-unread-elements", source_of(resource),
                           f"{verdict.problem} (invalid: {elements}; the rules read none of these, so the record "
                           "was used)"[:300])


class VerdictMemo:
    """A bounded, thread-safe map from (model, resource digest) to the validation verdict."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._verdicts: OrderedDict[tuple[str, bytes], Verdict | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._verdicts)

    def validation_error(self, model: type[Any], resource: Mapping[str, Any]) -> Verdict | None:
        """The verdict of :func:`validate`, from the memo when this content was validated before."""
        try:
            content = orjson.dumps(resource)
        except TypeError:  # not plain JSON (an integer beyond 64 bits, read by the standard library): no memo
            return validate(model, resource)
        key = (model.__name__, hashlib.blake2b(content, digest_size=16).digest())
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return self._verdicts[key]
        verdict = validate(model, resource)
        with self._lock:
            self._verdicts[key] = verdict
            while len(self._verdicts) > self._size:
                self._verdicts.popitem(last=False)
        return verdict

    def clear(self) -> None:
        """Forget every verdict (the benchmark measures the first sight of every resource this way)."""
        with self._lock:
            self._verdicts.clear()


#: This process's memo.
MEMO = VerdictMemo()


def validation_error(model: type[Any], resource: Mapping[str, Any]) -> Verdict | None:
    """Why ``resource`` is not a valid ``model`` (a fhir.resources R4B class), or None; remembered by content."""
    return MEMO.validation_error(model, resource)
