"""A read-only FHIR R4 server over the fixture patients, for the no-prefetch path, the Sandbox and fault tests.

``neutropenia-cds fhir-server fixtures/`` (or ``python -m cds_hooks.testing.fhir_server fixtures/``) serves:

- ``GET /metadata``: a CapabilityStatement (FHIR 4.0.1, JSON) listing the types and search parameters below;
- ``GET /{type}/{id}`` (read), ``GET /{type}?...`` and ``POST /{type}/_search`` (form body, merged with the
  query) returning a ``searchset`` Bundle with ``total``, a ``self`` link and absolute ``next`` links on the
  request's own origin (paging parameter ``_offset``); ``GET /Patient/{id}/{type}`` (compartment search);
  the search semantics are those of `cds_hooks.testing.fhir_search`: unknown parameters are ignored and
  reported in an OperationOutcome entry, an unknown resource type is a 404;
- ``POST /_services/smart/Launch`` returning ``{"launch_id": ...}`` (the Sandbox's SMART link remapping);
- CORS on every response, errors and preflights included; every error is an OperationOutcome;
- fault injection per resource type or path prefix (`Fault`), from a JSON file, ``--fault`` options, or at run
  time through ``POST/GET/DELETE /_faults`` when the admin endpoint is enabled.

Fixtures are written at ``FIXTURE_BASE`` (`cds_hooks.testing.fixtures`); every zoned dateTime is moved to "now"
when served (``shift_to_now=False`` / ``--no-shift`` serves them as written; ``--now`` picks another "now"), and
so is the birthDate of a patient its fixture marks ``birthDateRelative`` (by whole days). This is a development
tool: no authentication, no writes, one process, everything in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from cds_hooks.testing.fhir_search import (
    DEFAULT_COUNT,
    MAX_COUNT,
    OFFSET_PARAM,
    SEARCH_PARAMS,
    SearchError,
    included,
    params_for,
    search,
    split_values,
)
from cds_hooks.testing.fixtures import FIXTURE_BASE, move_birth_dates, shift_times

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FHIR_VERSION = "4.0.1"
#: Types always served (with their search parameters), whether or not the fixtures hold any.
CORE_TYPES = tuple(SEARCH_PARAMS)
#: Where a ``foreign_next`` fault points ``next`` links when it names no URL (".invalid" never resolves).
DEFAULT_FOREIGN_BASE = "http://fhir.example.invalid"
CORS_HEADERS = "Authorization, Content-Type, Accept, Prefer"
_OUTCOME_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
                  410: "deleted", 413: "too-costly", 415: "not-supported", 429: "throttled", 503: "transient"}
_EXTENSION = "fhir_fixture_server"


# --- fixtures -----------------------------------------------------------------------------------------------------


class FixtureError(ValueError):
    """The fixtures cannot be loaded: a missing or empty directory, or a file that is not JSON."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FixtureError(f"{path}: {error}") from error


def _resources_in(value: Any) -> Iterator[dict[str, Any]]:
    """The resources in a JSON value: a Bundle's entries (recursively), or the value itself."""
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        return
    if value["resourceType"] == "Bundle":
        for entry in value.get("entry") or []:
            if isinstance(entry, dict):
                yield from _resources_in(entry.get("resource"))
    elif value["resourceType"] != "OperationOutcome":  # a prefetch error, not patient data
        yield value


def _patients_of(resources: Iterable[Mapping[str, Any]]) -> set[str]:
    """Ids of the patients ``resources`` describe (Patient ids and the targets of subject/patient references)."""
    found: set[str] = set()
    for resource in resources:
        if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
            found.add(resource["id"])
        for key in ("subject", "patient"):
            reference = resource.get(key)
            text = reference.get("reference") if isinstance(reference, Mapping) else None
            if isinstance(text, str) and text.startswith("Patient/"):
                found.add(text.removeprefix("Patient/"))
    return found


def load_fixture_resources(path: str | Path) -> list[dict[str, Any]]:
    """Every resource of a fixture directory (or of one fixture file), deduplicated by (resourceType, id).

    Reads each ``*.bundle.json``; then, for each ``*.request.json`` whose ``context.patientId`` no bundle
    describes, the resources inside its ``prefetch`` (so a directory of request files alone works, and so does a
    mix). The first copy of a (type, id) wins, bundles before requests, files in name order. Resources without
    an ``id`` and OperationOutcomes are skipped. Raises FixtureError when nothing can be loaded.
    """
    root = Path(path)
    if root.is_file():
        bundles, requests_ = ([root], []) if not root.name.endswith(".request.json") else ([], [root])
    elif root.is_dir():
        bundles, requests_ = sorted(root.glob("*.bundle.json")), sorted(root.glob("*.request.json"))
    else:
        raise FixtureError(f"{root}: no such fixture directory or file")
    if not bundles and not requests_:
        raise FixtureError(f"{root}: no fixtures (*.bundle.json or *.request.json) found")
    found: list[dict[str, Any]] = []
    for bundle_path in bundles:
        found.extend(_resources_in(_read_json(bundle_path)))
    covered = _patients_of(found)
    for request_path in requests_:
        hook_request = _read_json(request_path)
        if not isinstance(hook_request, dict):
            raise FixtureError(f"{request_path}: not a hook request (a JSON object)")
        patient_id = (hook_request.get("context") or {}).get("patientId")
        if patient_id in covered:
            continue
        for value in (hook_request.get("prefetch") or {}).values():
            found.extend(_resources_in(value))
    unique: dict[tuple[str, str], dict[str, Any]] = {}  # first copy wins
    for resource in found:
        resource_id = resource.get("id")
        if not isinstance(resource_id, str) or not resource_id:
            log.warning("fixture %s without an id skipped", resource["resourceType"])
            continue
        unique.setdefault((resource["resourceType"], resource_id), resource)
    if not unique:
        raise FixtureError(f"{root}: the fixtures hold no FHIR resources")
    return list(unique.values())


def relative_birth_dates(path: str | Path) -> frozenset[str]:
    """Ids of fixture patients whose birthDate moves with the time shift (whole days), like their times.

    The fixture set marks them with ``"birthDateRelative": true`` in ``patient-view.<name>.expected.json`` (an
    infant whose age-specific cut-off must not drift); the patient id comes from the paired request file.
    """
    root = Path(path)
    if not root.is_dir():
        return frozenset()
    found: set[str] = set()
    for expected_path in sorted(root.glob("*.expected.json")):
        expected = _read_json(expected_path)
        request_path = expected_path.with_name(expected_path.name.replace(".expected.json", ".request.json"))
        if isinstance(expected, dict) and expected.get("birthDateRelative") is True and request_path.is_file():
            hook_request = _read_json(request_path)
            context = hook_request.get("context") if isinstance(hook_request, dict) else None
            if isinstance(context, dict) and isinstance(context.get("patientId"), str):
                found.add(context["patientId"])
    return frozenset(found)


# --- faults ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One injected fault: which requests it hits and what it does to them.

    ``match``: a resource type (``Observation``: reads and searches of that type), a path prefix under the base
    (``/Patient/fn-0001``, ``/metadata``), or ``*`` for every route. ``params`` narrows a search fault to queries
    carrying those values (``{"patient": "np-0003"}``; ``{"code": "8310-5"}`` also hits ``http://loinc.org|8310-5`` in a
    code list, so one prefetch key's search can fail alone); ``method`` to GET or POST.

    Effects (combine freely): ``delay`` seconds before answering; ``status`` answers that HTTP status with an
    OperationOutcome; ``wrong_type`` answers a resource of another type; ``loop`` gives a searchset a ``next``
    link to itself; ``foreign_next`` points ``next`` at another origin (``true``: DEFAULT_FOREIGN_BASE);
    ``malformed`` truncates the body (still labelled ``application/fhir+json``); ``oversize`` pads the body with
    whitespace to that many bytes.
    """

    match: str
    params: Mapping[str, str] = field(default_factory=dict)
    method: str | None = None
    status: int | None = None
    delay: float = 0.0
    malformed: bool = False
    wrong_type: bool = False
    loop: bool = False
    foreign_next: str | None = None
    oversize: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match.strip():
            raise ValueError("a fault needs a 'match': a resource type, a path prefix such as /Patient/1, or *")
        if not isinstance(self.params, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.params.items()):
            raise ValueError("fault 'params' must map parameter names to string values")
        if self.method is not None and self.method not in ("GET", "POST"):
            raise ValueError("fault 'method' must be GET or POST")
        if self.status is not None and (isinstance(self.status, bool) or not isinstance(self.status, int)
                                        or not 100 <= self.status <= 599):
            raise ValueError(f"fault 'status' must be an HTTP status code, not {self.status!r}")
        if isinstance(self.delay, bool) or not isinstance(self.delay, (int, float)) or not (
                math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"fault 'delay' must be a number of seconds >= 0, not {self.delay!r}")
        if self.oversize is not None and (isinstance(self.oversize, bool) or not isinstance(self.oversize, int)
                                          or self.oversize < 1):
            raise ValueError(f"fault 'oversize' must be a positive number of bytes, not {self.oversize!r}")
        if self.foreign_next is not None and urlsplit(self.foreign_next).scheme not in ("http", "https"):
            raise ValueError(f"fault 'foreign_next' must be true or an http(s) URL, not {self.foreign_next!r}")
        for name in ("malformed", "wrong_type", "loop"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"fault '{name}' must be true or false")
        if not (self.status or self.delay or self.malformed or self.wrong_type or self.loop or self.foreign_next
                or self.oversize):
            raise ValueError(f"the fault for {self.match!r} does nothing: set status, delay, malformed, "
                             "wrong_type, loop, foreign_next or oversize")

    @classmethod
    def from_json(cls, data: Any, match: str | None = None) -> Fault:
        """A fault from its JSON object (``match`` may come from the enclosing key); ValueError if invalid."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a fault must be a JSON object, not {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        options = dict(data)
        if match is not None:
            options.setdefault("match", match)
        if options.get("foreign_next") is True:
            options["foreign_next"] = DEFAULT_FOREIGN_BASE
        elif options.get("foreign_next") is False:
            options["foreign_next"] = None
        if isinstance(options.get("delay"), int) and not isinstance(options.get("delay"), bool):
            options["delay"] = float(options["delay"])
        if "match" not in options:
            raise ValueError("a fault needs a 'match': a resource type, a path prefix such as /Patient/1, or *")
        return cls(**options)

    def to_json(self) -> dict[str, Any]:
        """The fault as JSON, defaults left out."""
        defaults = {f.name: f.default for f in fields(self) if f.name != "params"}
        data = {key: value for key, value in asdict(self).items() if defaults.get(key, None) != value}
        if not self.params:
            data.pop("params", None)
        data["match"] = self.match
        return data

    def applies(self, method: str, path: str, resource_type: str | None,
                params: Sequence[tuple[str, str]]) -> bool:
        """True when this fault hits a request (``path`` relative to the base)."""
        if self.method and method != self.method:
            return False
        if self.match == "*":
            pass
        elif self.match.startswith("/"):
            prefix = self.match.rstrip("/")
            if not (path == prefix or path.startswith(prefix + "/") or not prefix):
                return False
        elif self.match != resource_type:
            return False
        return all(any(wanted in _reference_ids(value) for name, value in params if name.split(":")[0] == key)
                   for key, wanted in self.params.items())


def _reference_ids(value: str) -> set[str]:
    """A parameter's comma-separated values, plus the ids of ``Type/id`` values and the codes of ``system|code``."""
    items = set(split_values(value))
    return items | {item.rsplit("/", 1)[-1] for item in items} | {item.rsplit("|", 1)[-1] for item in items}


def parse_faults(data: Any) -> list[Fault]:
    """Faults from JSON: a list of fault objects, ``{"faults": [...]}``, one fault, or ``{match: {options}}``."""
    if isinstance(data, Mapping) and set(data) == {"faults"}:
        data = data["faults"]
    if isinstance(data, Mapping) and isinstance(data.get("match"), str):
        # One fault object, as GET /_faults lists them; read as {match: options} it was refused with
        # "a fault must be a JSON object, not 'Observation'".
        data = [data]
    if isinstance(data, list):
        return [Fault.from_json(item) for item in data]
    if isinstance(data, Mapping):
        return [Fault.from_json(options, match=match) for match, options in data.items()]
    raise ValueError("faults must be a JSON list of fault objects, or an object mapping a match to its options")


def load_faults(path: str | Path) -> list[Fault]:
    """Faults from a JSON file; ValueError (with the file name) if it cannot be read or is invalid."""
    try:
        return parse_faults(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def parse_fault_option(text: str) -> Fault:
    """A fault from ``MATCH[?name=value&...]:option[=value],...``, e.g. ``Observation?patient=p1:status=503``."""
    target, sep, options_text = _split_fault_option(text)
    if not sep or not options_text:
        raise ValueError(f"{text!r}: expected MATCH:OPTION[=VALUE][,OPTION[=VALUE]...], e.g. Observation:status=503")
    match, _, query = target.partition("?")
    options: dict[str, Any] = {"match": match}
    if query:
        options["params"] = dict(pair.partition("=")[::2] for pair in query.split("&"))
    for item in options_text.split(","):
        name, has_value, raw = item.strip().partition("=")
        value: Any = True if not has_value else raw
        if name in ("status", "oversize") and has_value:
            value = _number(name, raw, int)
        elif name == "delay":
            value = _number(name, raw, float)
        elif name in ("malformed", "wrong_type", "loop", "foreign_next") and has_value and raw in ("true", "false"):
            value = raw == "true"
        elif name == "method":
            value = raw.upper()
        options[name] = value
    try:
        return Fault.from_json(options)
    except TypeError as error:
        raise ValueError(f"{text!r}: {error}") from error


def _split_fault_option(text: str) -> tuple[str, str, str]:
    """``text`` split at the ':' where the options start: the first one followed by an option name.

    A parameter value may hold a ':' of its own (``code=http://loinc.org|8310-5``), so the first ':' will not do.
    """
    options = {f.name for f in fields(Fault)} - {"match", "params"}
    for index, char in enumerate(text):
        if char == ":" and re.split(r"[=,]", text[index + 1:], maxsplit=1)[0].strip() in options:
            return text[:index], ":", text[index + 1:]
    return text.partition(":")


def _number(name: str, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"fault option {name} needs a number, not {raw!r}") from None


class Faults:
    """The faults in force; replaceable at run time (thread-safe). The first fault that applies wins."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._faults: tuple[Fault, ...] = tuple(faults)
        self._lock = threading.Lock()

    @classmethod
    def coerce(cls, value: FaultsLike) -> Faults:
        """Faults from a Faults, a list of Fault or fault JSON objects, parsed-JSON faults, or None."""
        if isinstance(value, Faults):
            return value
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            return cls(parse_faults(value))
        items = list(value)
        return cls(item if isinstance(item, Fault) else Fault.from_json(item) for item in items)

    def replace(self, faults: Iterable[Fault]) -> None:
        """Put ``faults`` in force instead of the current ones."""
        new = tuple(faults)
        with self._lock:
            self._faults = new

    def __iter__(self) -> Iterator[Fault]:
        with self._lock:
            return iter(self._faults)

    def find(self, method: str, path: str, resource_type: str | None,
             params: Sequence[tuple[str, str]]) -> Fault | None:
        """The first fault that applies to a request, if any."""
        return next((f for f in self if f.applies(method, path, resource_type, params)), None)


#: What ``faults=`` accepts: a Faults, Fault objects and/or their JSON objects, JSON in any `parse_faults` form.
FaultsLike = Faults | Iterable[Fault | Mapping[str, Any]] | Mapping[str, Any] | None


# --- the app ----------------------------------------------------------------------------------------------------


class FhirError(Exception):
    """An error answered as an OperationOutcome with ``status``."""

    def __init__(self, status: int, diagnostics: str, code: str | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code or _OUTCOME_CODES.get(status, "exception" if status >= 500 else "processing")


def operation_outcome(diagnostics: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    """An OperationOutcome with one issue."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def _fhir_response(body: Mapping[str, Any], status: int = 200, mimetype: str = FHIR_JSON) -> Response:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(data, status=status, content_type=f"{mimetype}; charset=utf-8")


@dataclass
class _State:
    resources: dict[str, list[dict[str, Any]]]
    faults: Faults
    base_path: str
    shift_to_now: bool
    clock: Callable[[], datetime]
    new_uuid: Callable[[], Any]
    enable_admin: bool
    relative_birth_dates: frozenset[str] = frozenset()
    stopping: threading.Event = field(default_factory=threading.Event)

    def now(self) -> datetime:
        return self.clock()

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        """The resources of a type, as served (times moved to now unless shifting is off)."""
        return self.served(self.resources.get(resource_type, []))

    def served(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``resources`` with their times moved to now (and marked patients' birthDates by whole days)."""
        if not self.shift_to_now:
            return resources
        now = self.now()
        shifted: list[dict[str, Any]] = move_birth_dates(shift_times(resources, now - FIXTURE_BASE), now,
                                                         self.relative_birth_dates)
        return shifted

    def known(self, resource_type: str) -> bool:
        return resource_type in CORE_TYPES or resource_type in self.resources


def create_fhir_app(resources_or_dir: str | Path | Iterable[Mapping[str, Any]], *, shift_to_now: bool = True,
                    faults: FaultsLike = None, base_path: str = "",
                    enable_admin: bool = False, clock: Callable[[], datetime] | None = None,
                    new_uuid: Callable[[], Any] = uuid.uuid4) -> Flask:
    """The fixture FHIR server as a Flask app, over a fixture directory/file or a list of resources.

    Served times are moved from FIXTURE_BASE to ``clock()`` (default: the system clock) on every request, unless
    ``shift_to_now`` is false; for a directory, patients marked ``birthDateRelative`` also get their birthDate
    moved by whole days (`relative_birth_dates`). ``base_path`` (e.g. ``/fhir``) is where the FHIR base lies on
    the host; ``enable_admin`` adds ``/_faults``; ``new_uuid`` makes SMART launch ids.
    """
    birth_dates: frozenset[str] = frozenset()
    if isinstance(resources_or_dir, (str, Path)):
        loaded: list[dict[str, Any]] = load_fixture_resources(resources_or_dir)
        birth_dates = relative_birth_dates(resources_or_dir)
    else:
        loaded = [dict(r) for r in resources_or_dir if isinstance(r.get("id"), str) and r.get("resourceType")]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in loaded:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    base = "/" + base_path.strip("/") if base_path.strip("/") else ""
    state = _State(resources=by_type, faults=Faults.coerce(faults), base_path=base, shift_to_now=shift_to_now,
                   clock=clock or (lambda: datetime.now(timezone.utc)), new_uuid=new_uuid,
                   enable_admin=enable_admin, relative_birth_dates=birth_dates)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config["FHIR_BASE_PATH"] = base
    app.url_map.strict_slashes = False
    app.extensions[_EXTENSION] = state

    app.before_request(_before)
    app.after_request(_after)
    app.register_error_handler(FhirError, _fhir_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)

    app.add_url_rule(f"{base}/metadata", "metadata", _metadata, methods=["GET"])
    app.add_url_rule(f"{base}/_services/smart/Launch", "smart_launch", _smart_launch, methods=["POST"])
    if enable_admin:
        app.add_url_rule(f"{base}/_faults", "faults", _admin_faults, methods=["GET", "POST", "DELETE"])
    app.add_url_rule(f"{base}/<resource_type>", "search", _search, methods=["GET"])
    app.add_url_rule(f"{base}/<resource_type>/_search", "search_post", _search, methods=["POST"])
    app.add_url_rule(f"{base}/<resource_type>/<resource_id>", "read", _read, methods=["GET"])
    app.add_url_rule(f"{base}/Patient/<patient_id>/<resource_type>", "compartment", _compartment, methods=["GET"])
    return app


def _state() -> _State:
    state: _State = current_app.extensions[_EXTENSION]
    return state


def _relative_path(state: _State) -> str:
    path = request.path
    return path[len(state.base_path):] if path.startswith(state.base_path) else path


def _request_type(relative_path: str) -> str | None:
    """The resource type a request is about: ``Observation`` for ``/Observation``, ``/Patient/1/Observation``."""
    segments = relative_path.strip("/").split("/")
    if len(segments) == 3 and segments[0] == "Patient" and segments[2][:1].isupper():
        return segments[2]
    return segments[0] if segments[0][:1].isupper() else None


def _search_params() -> list[tuple[str, str]]:
    """The query's (name, value) pairs, plus a POST ``_search``'s form body."""
    params = list(request.args.items(multi=True))
    if request.method == "POST" and request.path.endswith("/_search"):
        if request.mimetype == "application/x-www-form-urlencoded":
            params.extend(request.form.items(multi=True))
        elif request.content_length or request.get_data(cache=True):
            raise FhirError(415, "POST _search needs an application/x-www-form-urlencoded body")
    return params


def _base_url(state: _State) -> str:
    return request.host_url.rstrip("/") + state.base_path


def _query(pairs: Iterable[tuple[str, str]]) -> str:
    return urlencode(list(pairs), quote_via=quote, safe="|,:/")


def _before() -> Response | None:
    state = _state()
    if request.method == "OPTIONS":
        return Response(status=204)
    relative = _relative_path(state)
    if relative == "/_faults" and state.enable_admin:
        return None
    fault = state.faults.find(request.method, relative, _request_type(relative), _search_params())
    g.fault = fault
    if fault is None:
        return None
    if fault.delay:
        state.stopping.wait(fault.delay)
    if fault.status:
        raise FhirError(fault.status, f"fault injection: HTTP {fault.status}")
    return None


def _after(response: Response) -> Response:
    state = _state()
    response.headers["Access-Control-Allow-Origin"] = "*"
    methods = "GET, POST, DELETE, OPTIONS" if state.enable_admin else "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Methods"] = methods
    requested = request.headers.get("Access-Control-Request-Headers", "")
    response.headers["Access-Control-Allow-Headers"] = ", ".join(
        dict.fromkeys([*CORS_HEADERS.split(", "), *(h.strip() for h in requested.split(",") if h.strip())]))
    response.headers["Access-Control-Expose-Headers"] = "Content-Location, Location, ETag"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Max-Age"] = "600"
    fault: Fault | None = g.get("fault")
    if fault is not None and request.method != "OPTIONS":
        _apply_fault(fault, response)
    return response


def _apply_fault(fault: Fault, response: Response) -> None:
    """Rewrite a response's body as the fault says (the status and delay were applied before)."""
    body = response.get_data()
    if fault.wrong_type or fault.loop or fault.foreign_next:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            if fault.wrong_type:
                other = "Patient" if data.get("resourceType") == "Basic" else "Basic"
                data = {"resourceType": other, "id": "fault-wrong-type"}
            if data.get("resourceType") == "Bundle":
                links = [link for link in data.get("link", []) if link.get("relation") != "next"]
                self_url = next((link["url"] for link in links if link.get("relation") == "self"), request.url)
                current_next = next((link["url"] for link in data.get("link", [])
                                     if link.get("relation") == "next"), self_url)
                target = self_url if fault.loop else current_next
                if fault.foreign_next:
                    parts = urlsplit(target)
                    target = fault.foreign_next.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
                data["link"] = [*links, {"relation": "next", "url": target}]
            body = json.dumps(data, separators=(",", ":")).encode()
    if fault.malformed:
        body = body[: max(1, len(body) // 2)]
    if fault.oversize and len(body) < fault.oversize:
        body += b" " * (fault.oversize - len(body))
    response.set_data(body)


def _fhir_error(error: FhirError) -> Response:
    return _fhir_response(operation_outcome(error.diagnostics, error.code), error.status)


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    messages = {404: f"Nothing here: {request.path}", 405: f"{request.method} is not supported on {request.path} "
                "(this server is read-only)"}
    response = _fhir_response(operation_outcome(messages.get(status, error.description or error.name),
                                                _OUTCOME_CODES.get(status, "processing")), status)
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _unexpected_error(error: Exception) -> Response:
    log.exception("fixture FHIR server: unexpected error")
    return _fhir_response(operation_outcome("internal error in the fixture FHIR server", "exception"), 500)


def _check_type(state: _State, resource_type: str) -> None:
    if not state.known(resource_type):
        raise FhirError(404, f"Unknown resource type {resource_type!r}: this server serves "
                             f"{', '.join(sorted(set(CORE_TYPES) | set(state.resources)))}", "not-supported")


def _metadata() -> Response:
    state = _state()
    types = sorted(set(CORE_TYPES) | set(state.resources))
    resources = [{
        "type": resource_type,
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": p.name, "type": p.type, **({"documentation": p.documentation}
                                                             if p.documentation else {})}
                        for p in params_for(resource_type).values()],
    } for resource_type in types]
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": state.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kind": "instance",
        "software": {"name": "neutropenia-cds fixture FHIR server"},
        "implementation": {"description": "Read-only fixture patients for testing (no authentication)",
                           "url": _base_url(state)},
        "fhirVersion": FHIR_VERSION,
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Unknown search parameters are ignored and listed in an OperationOutcome entry. "
                             f"Paging: _count (default {DEFAULT_COUNT}, at most {MAX_COUNT}) and {OFFSET_PARAM}.",
            "security": {"cors": True, "description": "Open: no authentication."},
            "resource": resources,
            "searchParam": [{"name": "_count", "type": "number"}, {"name": "_sort", "type": "string"},
                            {"name": OFFSET_PARAM, "type": "number"}, {"name": "_summary", "type": "token"}],
        }],
    }
    return _fhir_response(statement)


def _read(resource_type: str, resource_id: str) -> Response:
    state = _state()
    _check_type(state, resource_type)
    for resource in state.resources.get(resource_type, []):
        if resource.get("id") == resource_id:
            return _fhir_response(state.served([resource])[0])
    raise FhirError(404, f"{resource_type}/{resource_id} is not known")


def _compartment(patient_id: str, resource_type: str) -> Response:
    return _run_search(resource_type, [("patient", patient_id), *_search_params()])


def _search(resource_type: str) -> Response:
    return _run_search(resource_type, _search_params())


def _run_search(resource_type: str, params: list[tuple[str, str]]) -> Response:
    state = _state()
    _check_type(state, resource_type)
    try:
        result = search(state.of_type(resource_type), resource_type, params)
    except SearchError as error:
        raise FhirError(400, str(error)) from None
    base = _base_url(state)
    self_pairs = list(result.used) + ([(OFFSET_PARAM, str(result.offset))] if result.offset else [])
    links = [{"relation": "self", "url": f"{base}/{resource_type}?{_query(self_pairs)}".rstrip("?")}]
    if result.next_offset is not None:
        pairs = [(name, value) for name, value in params if name != OFFSET_PARAM]
        if not any(name == "_count" for name, _ in pairs):
            pairs.append(("_count", str(result.count)))
        pairs.append((OFFSET_PARAM, str(result.next_offset)))
        links.append({"relation": "next", "url": f"{base}/{resource_type}?{_query(pairs)}"})
    entries: list[dict[str, Any]] = [{"fullUrl": f"{base}/{resource_type}/{resource['id']}",
                                      "resource": resource, "search": {"mode": "match"}}
                                     for resource in result.page]

    def find(kind: str, resource_id: str) -> Mapping[str, Any] | None:
        held = [r for r in state.resources.get(kind, []) if r.get("id") == resource_id]
        return state.served(held)[0] if held else None

    entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "include"}}
                for r in included(result, find)]
    if result.ignored:
        outcome = operation_outcome(f"Ignored search parameters (not supported): {', '.join(result.ignored)}",
                                    "not-supported", "warning")
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(result.matches),
                              "link": links}
    if entries:
        bundle["entry"] = entries
    return _fhir_response(bundle)


def _smart_launch() -> Response:
    state = _state()
    return _fhir_response({"launch_id": str(state.new_uuid())}, mimetype="application/json")


def _admin_faults() -> Response:
    state = _state()
    if request.method == "POST":
        data = request.get_json(force=True, silent=True)
        if data is None:
            raise FhirError(400, "invalid faults: the body is not JSON; send a JSON list of fault objects")
        try:
            state.faults.replace(parse_faults(data))
        except (ValueError, TypeError) as error:
            raise FhirError(400, f"invalid faults: {error}") from None
    elif request.method == "DELETE":
        state.faults.replace(())
    return _fhir_response({"faults": [fault.to_json() for fault in state.faults]}, mimetype="application/json")


# --- serving ------------------------------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log."""


class FixtureServer:
    """A fixture FHIR app listening on ``host:port`` (0: a free port), served in a thread or in the foreground.

    Binding happens in the constructor, so a port in use raises OSError there.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True) -> None:
        self._app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family)
        try:
            self._server: BaseWSGIServer = make_server(
                host, listener.getsockname()[1], app, threaded=True, fd=listener.fileno(),
                request_handler=_QuietHandler if quiet else None)
        finally:
            listener.close()  # werkzeug serves a duplicate of it
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    @property
    def url(self) -> str:
        """The FHIR base URL, e.g. ``http://127.0.0.1:8081`` (plus the base path, if any)."""
        host = f"[{self._server.host}]" if ":" in self._server.host else self._server.host
        return f"http://{host}:{self._server.port}{self._app.config['FHIR_BASE_PATH']}"

    def start(self) -> FixtureServer:
        """Serve in a daemon thread."""
        self._serving.set()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fhir-fixture-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until stop() (from another thread) or KeyboardInterrupt."""
        self._serving.set()
        try:
            self._server.serve_forever(poll_interval=0.05)
        finally:
            self._serving.clear()
            self._server.server_close()

    def stop(self) -> None:
        """Stop serving (in whichever thread), cut injected delays short, and close the socket."""
        self._app.extensions[_EXTENSION].stopping.set()
        if self._serving.is_set():
            self._server.shutdown()  # returns once serve_forever has left its loop
            self._serving.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FixtureServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def serve(directory: str | Path, host: str = "127.0.0.1", port: int = 8081, *, shift_to_now: bool = True,
          faults: FaultsLike = None, base_path: str = "",
          enable_admin: bool = False, quiet: bool = False, clock: Callable[[], datetime] | None = None,
          ready: Callable[[FixtureServer], None] | None = None) -> None:
    """Serve the fixtures in ``directory`` until interrupted (FixtureError, OSError if the port is taken)."""
    app = create_fhir_app(directory, shift_to_now=shift_to_now, faults=faults, base_path=base_path,
                          enable_admin=enable_admin, clock=clock)
    server = FixtureServer(app, host, port, quiet=quiet)
    state: _State = app.extensions[_EXTENSION]
    count = sum(len(items) for items in state.resources.values())
    patients = len(state.resources.get("Patient", []))
    times = "shifted to now" if shift_to_now else "as written (not shifted)"
    print(f"Fixture FHIR server: {count} resources, {patients} patients, times {times}", file=sys.stderr)
    for fault in state.faults:
        print(f"  fault: {json.dumps(fault.to_json())}", file=sys.stderr)
    if enable_admin:
        print(f"  admin: POST/GET/DELETE {server.url}/_faults", file=sys.stderr)
    print(f"Serving FHIR R4 at {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopped.", file=sys.stderr)


# --- command line ---------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def _fault_option(text: str) -> Fault:
    try:
        return parse_fault_option(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _instant(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError("--now needs a time zone, e.g. 2025-03-10T12:00:00Z")
    return moment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fhir-server`` arguments to ``parser`` (a subcommand parser of the console script)."""
    parser.description = "Serve the fixture patients as a read-only FHIR R4 server (development and testing)."
    parser.add_argument("directory", type=Path, help="fixture directory (*.bundle.json, else *.request.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8081, help="port to listen on (default: %(default)s)")
    parser.add_argument("--base-path", default="", help="path of the FHIR base on the server, e.g. /fhir")
    # Exclusive: with both, --now was silently ignored and the times served as written.
    shift = parser.add_mutually_exclusive_group()
    shift.add_argument("--no-shift", action="store_true",
                       help="serve fixture times as written instead of moving them to now")
    shift.add_argument("--now", type=_instant, help="shift fixture times to this RFC 3339 time instead of now")
    parser.add_argument("--faults", type=Path, metavar="FILE", help="JSON file of faults to inject")
    parser.add_argument("--fault", type=_fault_option, action="append", default=[], metavar="SPEC",
                        help="a fault to inject: MATCH[?param=value]:option[=value],... "
                             "e.g. Observation:status=503 or /Patient:delay=3 (repeatable)")
    parser.add_argument("--admin", action="store_true",
                        help="enable POST/GET/DELETE /_faults to change faults at run time")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    parser.set_defaults(fhir_server_parser=parser)


def run(args: argparse.Namespace, *, ready: Callable[[FixtureServer], None] | None = None) -> int:
    """Run the server for parsed arguments; the exit status (2: bad fixtures or faults, 1: cannot listen)."""
    parser: argparse.ArgumentParser | None = getattr(args, "fhir_server_parser", None)
    prog = parser.prog if parser is not None else "fhir-server"

    def fail(status: int, message: str) -> int:
        if status == 2 and parser is not None:
            parser.print_usage(sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status

    faults = list(args.fault or [])
    if args.faults is not None:
        try:
            faults = load_faults(args.faults) + faults
        except ValueError as error:
            return fail(2, str(error))
    now: datetime | None = args.now
    serve_kwargs: dict[str, Any] = {
        "host": args.host, "port": args.port, "shift_to_now": not args.no_shift, "faults": faults,
        "base_path": args.base_path, "enable_admin": args.admin, "quiet": args.quiet,
        "clock": (lambda: now) if now is not None else None, "ready": ready,
    }
    try:
        with _SigtermAsInterrupt():
            serve(args.directory, **serve_kwargs)
    except FixtureError as error:
        return fail(2, str(error))
    except OSError as error:
        return fail(1, f"cannot listen on {args.host}:{args.port}: {error.strerror or error}")
    return 0


class _SigtermAsInterrupt:
    """In the main thread, turn SIGTERM into KeyboardInterrupt so ``kill`` stops the server cleanly."""

    def __enter__(self) -> None:
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *_: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``fhir-server`` as a stand-alone command."""
    parser = argparse.ArgumentParser(prog="neutropenia-cds fhir-server")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
