"""Validation of raw resources with the fhir.resources R4B models, remembered by content.

Validating one Observation costs some 25 times more than parsing its JSON, and an EHR sends the same results
every time a chart is opened (a ward round opens each chart several times a day, each with the same labs and the
temperatures since). The verdict is a pure function of the resource's content, so it is kept per process, keyed
by a digest of the resource's JSON: a resource seen before costs a serialisation and a hash, not a validation.
The memo is bounded (least recently used verdicts go first) and holds verdicts only, never resource content.

Within one request the Observations repeat most of their elements (the same ``code``, ``category`` and
``subject`` on every temperature): :class:`KnownElements` validates each distinct element once and hands the
validated instance to the resource's validation, which takes it as it is (a FHIR element's validity depends on
its content and type alone). It lives for one request, so nothing of a patient outlives the request.

:func:`screen` decides what a verdict means for the rules: a resource invalid in an element they read is not used;
one invalid only in elements they never read (a display text, an extension, an element from a later FHIR version)
is used, and the invalid elements are reported. An EHR's empty ``display`` on a temperature must not hide a fever.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import typing
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import orjson
from fhir.resources.R4B.element import Element

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
    error about the resource as a whole. ``components`` holds the same paths with the index of the
    ``component`` they lie in (None for an error outside every component): the rules read only some components.
    """

    problem: str
    elements: frozenset[str]
    components: frozenset[tuple[int | None, str]] = frozenset()


class KnownElements:
    """The complex elements of one request validated so far, by type and content, valid ones as their instance.

    Handing fhir.resources an element already validated skips its validation (pydantic takes a model instance of
    the declared class as it is); an invalid element is left as sent, so the resource's validation reports it at
    its own place. Elements are compared by their JSON, so a copy equal in content is the same element.
    """

    def __init__(self) -> None:
        self._instances: dict[tuple[type[Any], bytes], Any] = {}

    def __len__(self) -> int:
        return len(self._instances)

    def substituted(self, model: type[Any], resource: Mapping[str, Any]) -> Mapping[str, Any]:
        """``resource`` with each complex element of ``model`` that is valid replaced by its validated instance.

        A resource that is not a dict is left as it is: pydantic reads another Mapping otherwise than the dict a
        substitution would make of it.
        """
        if not isinstance(resource, dict):
            return resource
        elements = _complex_elements(model)
        copy: dict[str, Any] | None = None
        for name, value in resource.items():
            spec = elements.get(name)
            if spec is None:
                continue
            element_model, repeats = spec
            if repeats:
                if not isinstance(value, list) or not value:
                    continue
                instances = [self._instance(element_model, item) for item in value]
                if any(instance is None for instance in instances):
                    continue
                replacement: Any = instances
            else:
                replacement = self._instance(element_model, value)
                if replacement is None:
                    continue
            if copy is None:
                copy = dict(resource)
            copy[name] = replacement
        return resource if copy is None else copy

    def _instance(self, element_model: type[Any], value: object) -> Any:
        """The validated instance of ``value`` as ``element_model``; None when it is not a valid one."""
        if not isinstance(value, dict):
            return None  # the wrong shape (a list for an object, a string): the resource's validation says so
        content = _content(value)
        if content is None:  # not plain JSON (an integer beyond 64 bits, an infinity): validated with the resource
            return None
        key = (element_model, content)
        if key not in self._instances:
            try:
                self._instances[key] = element_model.model_validate(value)
            except Exception:  # noqa: BLE001 - untrusted input: the resource's validation reports it
                self._instances[key] = None
        return self._instances[key]


def _content(value: object) -> bytes | None:
    """The JSON of ``value``, which tells it apart from every other value; None when it cannot.

    orjson refuses what is not plain JSON (an integer beyond 64 bits), and writes NaN and the infinities as
    ``null``: ``1e400`` in a request body (read as infinity by the standard library) would share the key of a
    ``null`` that is valid where the number is not.
    """
    try:
        content = orjson.dumps(value)
    except TypeError:
        return None
    if b"null" in content and _holds_non_finite(value):
        return None
    return content


def _holds_non_finite(value: object) -> bool:
    """Whether ``value`` (parsed JSON) holds a float that is NaN or infinite, at any depth."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


#: :func:`_complex_elements` of each model asked for (a handful: worked out once per process).
_ELEMENTS_OF: dict[type[Any], Mapping[str, tuple[type[Any], bool]]] = {}


def _complex_elements(model: type[Any]) -> Mapping[str, tuple[type[Any], bool]]:
    """The JSON names of ``model``'s complex data-type elements: their model, and whether the element repeats.

    Resources held in an element (``contained``) and the ``_name`` extensions of primitives are left out: only
    data types, whose validity is their own.
    """
    known = _ELEMENTS_OF.get(model)
    if known is not None:
        return known
    found: dict[str, tuple[type[Any], bool]] = {}
    for name, field in model.model_fields.items():
        json_name = field.alias or name
        if json_name.startswith("_"):
            continue
        declared = [arg for arg in typing.get_args(field.annotation) or (field.annotation,) if arg is not type(None)]
        if len(declared) != 1:
            continue
        inner, repeats = declared[0], typing.get_origin(declared[0]) is list
        if repeats:
            inner = typing.get_args(inner)[0]
        klass = getattr(inner, "get_model_klass", None)
        element_model = klass() if callable(klass) else None
        if isinstance(element_model, type) and issubclass(element_model, Element):
            found[json_name] = (element_model, repeats)
    _ELEMENTS_OF[model] = found
    return found


def validate(model: type[Any], resource: Mapping[str, Any], known: KnownElements | None = None) -> Verdict | None:
    """Why ``resource`` is not a valid ``model`` (a fhir.resources R4B class), or None when it is.

    ``known`` (the elements of the request validated so far) spares validating an element seen before.
    """
    try:
        model.model_validate(resource if known is None else known.substituted(model, resource))
    except Exception as error:  # noqa: BLE001 - untrusted input; pydantic raises several kinds
        errors = getattr(error, "errors", None)
        details = errors() if callable(errors) else None
        found = [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else []
        if not found:
            whole = frozenset({WHOLE_RESOURCE})
            return Verdict(f"invalid {model.__name__}", whole, frozenset({(None, WHOLE_RESOURCE)}))
        first = found[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "resource"
        located = frozenset((_component(d.get("loc", ())), _element(d.get("loc", ()))) for d in found)
        elements = frozenset(element for _, element in located)
        return Verdict(f"{where}: {first.get('msg', 'invalid')}"[:200], elements, located)
    return None


def _component(location: object) -> int | None:
    """The index of the Observation ``component`` a pydantic error location lies in, if it lies in one."""
    if isinstance(location, (tuple, list)) and len(location) > 1 and location[0] == "component":
        index = location[1]
        return index if isinstance(index, int) and not isinstance(index, bool) else None
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


def touches(verdict: Verdict, read: Collection[str], unread_components: Collection[int] = ()) -> bool:
    """Whether an invalid element of ``verdict`` is one of the ``read`` element paths, holds one or lies in one.

    An error inside one of ``unread_components`` (indexes of Observation components the rules do not read, such as
    the heart rate beside a temperature in a vital-signs panel) is not in an element read.
    """
    elements = verdict.elements
    if unread_components and verdict.components:  # without located errors, nothing can be ruled out
        elements = frozenset(e for n, e in verdict.components if n is None or n not in unread_components)
    for element in elements:
        if element == WHOLE_RESOURCE:
            return True
        for path in read:
            if element == path or element.startswith(path + ".") or path.startswith(element + "."):
                return True
    return False


def screen(
    model: type[Any], resource: Mapping[str, Any], read: Collection[str], unread_components: Collection[int] = (),
    known: KnownElements | None = None,
) -> tuple[bool, DataIssue | None]:
    """Whether the rules may use ``resource``, whose elements ``read`` they read, and the issue its validation gives.

    Invalid in an element that is read: not used, ``malformed-resource``. Invalid only elsewhere (including inside
    ``unread_components``, see :func:`touches`): used, with an ``invalid-unread-elements`` issue naming the
    elements (for whoever maintains the interface; no card shows it). ``known``: see :func:`validate`.
    """
    verdict = validation_error(model, resource, known)
    if verdict is None:
        return True, None
    if touches(verdict, read, unread_components):
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

    def validation_error(self, model: type[Any], resource: Mapping[str, Any],
                         known: KnownElements | None = None) -> Verdict | None:
        """The verdict of :func:`validate`, from the memo when this content was validated before."""
        content = _content(resource)
        if content is None:  # not plain JSON (an integer beyond 64 bits, an infinity, read by the standard library)
            return validate(model, resource, known)
        key = (model.__name__, hashlib.blake2b(content, digest_size=16).digest())
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return self._verdicts[key]
        verdict = validate(model, resource, known)
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


def validation_error(model: type[Any], resource: Mapping[str, Any],
                     known: KnownElements | None = None) -> Verdict | None:
    """Why ``resource`` is not a valid ``model`` (a fhir.resources R4B class), or None; remembered by content."""
    return MEMO.validation_error(model, resource, known)
