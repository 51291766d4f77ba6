"""The Flask edge of the protocol: discovery, invoke and feedback routes, CORS, and errors as OperationOutcome.

This and `service/app.py` are the only modules that import Flask. Everything the routes need (registry,
token verifier, feedback store, fetch policy, clock, uuid source) is injected, so tests can swap any of it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

import orjson
from flask import Blueprint, Flask, Response, g, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException

from cds_hooks.auth import TokenVerifier
from cds_hooks.errors import (
    CDSHooksError,
    InternalError,
    InvalidRequest,
    Issue,
    PayloadTooLarge,
    TransferCodingNotImplemented,
    UnknownService,
    UnsupportedMediaType,
    operation_outcome,
)
from cds_hooks.fhir_client import FhirFetcher, clean_text
from cds_hooks.prefetch import FetchPolicy, resolve_prefetch
from cds_hooks.request_context import REQUEST_ID
from cds_hooks.registry import HookCall, ServiceDefinition, ServiceRegistry
from cds_hooks.schemas import HookRequest, load_feedback, load_hook_request
from cds_hooks.store import CardRecord, FeedbackStore

log = logging.getLogger("cds_hooks.http")

#: FHIR `id` datatype (R4 §2.24.0.1): also keeps context ids from smuggling paths into fallback fetch URLs.
#: Always used with ``fullmatch``: ``$`` also matches before a trailing newline, so "p1\n" would pass ``match``.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_USER_ID = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}")
_JSON_TYPES = ("application/json", "application/fhir+json")
_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_.]{1,64}")
_REPEATED_SLASHES = re.compile(r"/{2,}")
#: WSGI environ key: the path as the client sent it, when repeated slashes were merged for routing.
CALLED_PATH = "cds_hooks.called_path"


@dataclass(frozen=True)
class ProtocolOptions:
    """Edge settings: the public URL (JWT audience), body limit and CORS origins."""

    public_base_url: str = ""
    max_body_bytes: int = 16 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    fetch_policy: FetchPolicy = field(default_factory=lambda: FetchPolicy(allowed_bases=()))


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def create_blueprint(
    registry: ServiceRegistry,
    *,
    options: ProtocolOptions,
    store: FeedbackStore,
    verifier: TokenVerifier | None,
    fetcher: FhirFetcher | None = None,
    clock: Callable[[], datetime] = _utcnow,
    new_uuid: Callable[[], Any] = uuid.uuid4,
) -> Blueprint:
    """Build the CDS Hooks blueprint. ``verifier=None`` means authentication is disabled."""
    bp = Blueprint("cds_hooks", __name__)
    bp.record_once(_merge_slashes_before_routing)

    @bp.before_app_request
    def _start() -> None:
        supplied = request.headers.get("X-Request-ID", "")
        g.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        REQUEST_ID.set(g.request_id)
        g.started = time.perf_counter()

    @bp.teardown_app_request
    def _end(_error: BaseException | None) -> None:
        # The worker thread serves other requests, and logs between them: those lines are no request's.
        REQUEST_ID.set("-")

    @bp.after_app_request
    def _finish(response: Response) -> Response:
        if request.method == "OPTIONS":
            _no_content_preflight(response)
        _apply_cors(response, options.cors_origins)
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        # The route template, not the URL: no ids from the path, no query string, no body, no headers.
        route = request.url_rule.rule if request.url_rule else "<unmatched>"
        log.info("request", extra={"http_method": request.method, "route": route,
                                   "status": response.status_code, "duration_ms": round(elapsed_ms, 1)})
        return response

    @bp.app_errorhandler(CDSHooksError)
    def _protocol_error(error: CDSHooksError) -> Response:
        if error.status_code == 401:
            log.warning("authentication failed: %s", getattr(error, "reason", "unauthorized"))
        elif error.status_code >= 500:
            log.error("request failed: %s", error.message)
        return _outcome_response(error.status_code, error.to_outcome(), error.headers)

    @bp.app_errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return _protocol_error(PayloadTooLarge(f"request body exceeds {options.max_body_bytes} bytes"))
        # Keep what werkzeug adds for the status (the Allow header on 405), not its HTML content type.
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        message = f"{request.method} {request.path}: {error.name.lower()}"
        return _outcome_response(status, operation_outcome(status, [Issue(message)]), headers)

    @bp.app_errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.url_rule.rule if request.url_rule else "?")
        return _protocol_error(InternalError())

    def _authenticate() -> None:
        if verifier is None:
            return
        audience = options.public_base_url + _called_path()
        g.claims = verifier.verify(request.headers.get("Authorization"), audience)

    @bp.get("/cds-services")
    def discovery() -> Response:
        """Discovery: every registered service (spec §Discovery)."""
        _authenticate()
        return _json_response(200, registry.discovery())

    @bp.post("/cds-services/<service_id>")
    def invoke(service_id: str) -> Response:
        """Call a service on its hook (spec §Calling a CDS Service)."""
        received_at = time.monotonic()
        _authenticate()
        if service_id not in registry.ids():
            raise UnknownService(f"no CDS service with id '{service_id}'")
        hook_request = load_hook_request(_read_json(options.max_body_bytes))
        definition = registry.find(service_id, hook_request.hook)
        if definition is None:
            raise InvalidRequest(f"hook: service '{service_id}' does not handle hook '{hook_request.hook}'",
                                 issues=[Issue(f"service '{service_id}' does not handle hook "
                                               f"'{hook_request.hook}'", expression="hook")])
        _check_context(definition, hook_request)
        data = resolve_prefetch(definition, hook_request, policy=options.fetch_policy,
                                received_at=received_at, fetcher=fetcher)
        now = clock()
        result = definition.handler(HookCall(service_id=service_id, request=hook_request, data=data, now=now))
        cards = [card.stamped(new_uuid) for card in result.cards]
        _record(service_id, hook_request.hook_instance, cards, now)
        body = type(result)(cards=cards, extension=result.extension, system_actions=result.system_actions)
        return _json_response(200, body.to_json())

    def _record(service_id: str, hook_instance: str, cards: list[Any], now: datetime) -> None:
        if not cards:
            return
        records = [CardRecord(uuid=c.uuid, kind=c.kind, indicator=c.indicator.value) for c in cards]
        try:
            store.record_cards(service_id, hook_instance, records, now)
        except CDSHooksError as error:
            # Patient safety first: an emergency card is still returned when the audit store is down.
            # Feedback on these cards will be kept and flagged as for an unknown card.
            log.error("could not record %d card(s): %s", len(records), error.message)

    @bp.post("/cds-services/<service_id>/feedback")
    def feedback(service_id: str) -> Response:
        """Store feedback on cards durably; 200 only after the commit (spec §Feedback)."""
        _authenticate()
        if service_id not in registry.ids():
            raise UnknownService(f"no CDS service with id '{service_id}'")
        items = load_feedback(_read_json(options.max_body_bytes))
        receipt = store.save_feedback(service_id, items, clock())
        log.info("feedback stored", extra={"stored": receipt.stored, "duplicates": receipt.duplicates,
                                           "unknown_cards": len(receipt.unknown_cards)})
        return _json_response(200, {})

    @bp.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers."""
        return _json_response(200, {"status": "ok"})

    @bp.get("/readyz")
    def readyz() -> Response:
        """Readiness: the feedback store answers."""
        if store.ping():
            return _json_response(200, {"status": "ready"})
        return _outcome_response(503, operation_outcome(503, [Issue("feedback store unavailable")]),
                                 {"Retry-After": "5"})

    return bp


def _merge_slashes_before_routing(state: BlueprintSetupState) -> None:
    """Route a path with repeated slashes as the same path with single ones, and answer it there.

    The Sandbox builds a service URL as ``${discoveryURL}/${service.id}`` (and feedback as ``.../feedback``), so
    a discovery URL typed with a trailing slash gives ``/cds-services//{id}``. werkzeug answered that with a 308
    redirect: an HTML page, never followed for a CORS preflight, so the browser reported a CORS failure. The
    path as called is kept for the JWT audience, which the client sets to the exact URL it called.
    """
    app = cast(Flask, state.app)
    inner = app.wsgi_app

    def merged(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ[CALLED_PATH] = path
            environ["PATH_INFO"] = _REPEATED_SLASHES.sub("/", path)
        return inner(environ, start_response)

    app.wsgi_app = merged  # type: ignore[method-assign]


def _called_path() -> str:
    """The request path as the client sent it (repeated slashes included), decoded as werkzeug decodes it.

    Leading ones too: werkzeug's ``request.path`` strips them, but a client whose base URL was typed with a
    trailing slash calls ``//cds-services`` and signs that URL as the audience, like ``/cds-services//{id}``.
    """
    called: str | None = request.environ.get(CALLED_PATH)
    if called is None:
        return request.path
    decoded = called.encode("latin-1").decode("utf-8", "replace")
    return decoded if decoded.startswith("/") else "/" + decoded


def _check_context(definition: ServiceDefinition, hook_request: HookRequest) -> None:
    issues = []
    for name in sorted(definition.required_context):
        value = hook_request.context.get(name)
        if not isinstance(value, str) or not value:
            issues.append(Issue(f"context.{name}: is required for hook '{definition.hook}'",
                                expression=f"context.{name}"))
    patient_id = hook_request.context.get("patientId")
    if isinstance(patient_id, str) and patient_id and not _FHIR_ID.fullmatch(patient_id):
        issues.append(Issue("context.patientId: must be a FHIR id (letters, digits, '-', '.'; 1-64 characters)",
                            expression="context.patientId"))
    user_id = hook_request.context.get("userId")
    if isinstance(user_id, str) and user_id and not _USER_ID.fullmatch(user_id):
        issues.append(Issue("context.userId: must be 'Practitioner/<id>', 'PractitionerRole/<id>', "
                            "'Patient/<id>' or 'RelatedPerson/<id>'", expression="context.userId"))
    if issues:
        raise InvalidRequest("; ".join(i.diagnostics for i in issues), issues=issues)


def _read_json(limit: int) -> Any:
    """The request body parsed as strict JSON, or the right 4xx."""
    mimetype = request.mimetype
    if mimetype not in _JSON_TYPES and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got '{mimetype or 'none'}'")
    _check_content_encoding()
    _check_transfer_coding()
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    try:
        raw = request.get_data(cache=False)
    except HTTPException as error:
        # The server bounds the time a body may take (gunicorn.conf.py): werkzeug reports a read that timed out
        # as a client disconnect, which this client did not do.
        if isinstance(error.__cause__ or error.__context__, TimeoutError):
            raise InvalidRequest("the request body was not received in time: send it at once") from None
        raise  # werkzeug's own answers (413 over MAX_CONTENT_LENGTH, 400 client disconnected)
    except Exception as error:
        # The server's body reader refused the framing (gunicorn raises InvalidChunkSize and friends from
        # wsgi.input on a malformed chunked body): the client's fault, not a bug, so not a 500.
        raise InvalidRequest(f"the request body could not be read ({type(error).__name__}): malformed "
                             "Content-Length or chunked transfer coding") from None
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    if not raw.strip():
        raise InvalidRequest("the request body is empty; a JSON object is required")
    try:
        # Fast path. orjson refuses all that the slow path below refuses (invalid UTF-8, NaN and Infinity, lone
        # surrogate escapes, nesting past 1024) and also what it cannot represent (numbers beyond a double, a
        # BOM): anything it refuses goes the slow way, which says precisely what is wrong or accepts it.
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _read_json_slowly(raw)


def _check_content_encoding() -> None:
    """Refuse a body sent with a content coding other than identity: 415 (RFC 9110 §15.5.16).

    The body is never decoded: read as JSON text, gzip said "not valid UTF-8" and a plain body labelled br was
    accepted. ``Accept-Encoding: identity`` names the only coding that is supported (RFC 9110 §12.5.3).
    """
    codings = [c.strip() for value in request.headers.getlist("Content-Encoding") for c in value.split(",")]
    refused = [c for c in codings if c and c.lower() != "identity"]
    if refused:
        shown = clean_text(", ".join(refused), 60)
        raise UnsupportedMediaType(f"Content-Encoding '{shown}' is not supported: send the body uncompressed "
                                   "(no Content-Encoding, or identity)", headers={"Accept-Encoding": "identity"})


def _check_transfer_coding() -> None:
    """Refuse a body sent with a transfer coding other than chunked: 501 (RFC 9112 §6.1).

    gunicorn answers a coding it does not know with 501 itself, but passes gzip, deflate and compress through
    undecoded: read as JSON text, the compressed bytes gave a 400 'not valid UTF-8'.
    """
    codings = [c.strip() for value in request.headers.getlist("Transfer-Encoding") for c in value.split(",")]
    refused = [c for c in codings if c and c.lower() not in ("chunked", "identity")]
    if refused:
        shown = clean_text(", ".join(refused), 60)
        raise TransferCodingNotImplemented(f"Transfer-Encoding '{shown}' is not supported: send the body "
                                           "with a Content-Length or chunked only, uncompressed")


def _read_json_slowly(raw: bytes) -> Any:
    """``raw`` parsed with the standard library, or an InvalidRequest naming what is wrong."""
    try:
        # RFC 8259: JSON exchanged between systems is UTF-8; json.loads would guess UTF-16/32 from bytes.
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error.msg} at line {error.lineno} "
                             f"column {error.colno}") from None
    except ValueError as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    # A "\ud800" escape without its pair parses into a str that cannot be encoded as UTF-8: echoed in a
    # diagnostic, stored, or written to the log it raised UnicodeEncodeError (a 500). Refuse it here, once.
    # Raw UTF-8 cannot carry a surrogate (the decode above refuses it), so only an escape can: search first.
    if _SURROGATE_ESCAPE.search(text):
        where = _lone_surrogate(body)
        if where is not None:
            shown = where[:200] or "the request body"
            issue = Issue(f"{shown}: holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its pair); "
                          "JSON text must be valid Unicode (RFC 8259 §8.2)", expression=where[:200] or None)
            raise InvalidRequest(issue.diagnostics, issues=[issue])
    return body


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """The path ("a.b[2]") of the first string or member name holding a surrogate, or None if there is none.

    Iterative, because a body may nest as deep as the JSON parser allows. A member name that holds the surrogate
    is reported by its parent's path, so the diagnostic never contains the surrogate itself.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    return path
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(item))
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _no_content_preflight(response: Response) -> None:
    """Make Flask's automatic OPTIONS answer (an empty 200 typed ``text/html``) a 204 with no Content-Type.

    A preflight answer carries headers only (Allow, the Access-Control-* ones): 204 No Content says so, and a
    body-less answer has no media type (RFC 9110 §8.3, §15.3.5); werkzeug drops the Content-Length for a 204.
    Any other OPTIONS answer (a JSON 404 for an unknown path) keeps its status and body.
    """
    if response.status_code == 200 and response.calculate_content_length() == 0:
        response.status_code = 204
        response.headers.remove("Content-Type")


def _apply_cors(response: Response, origins: tuple[str, ...]) -> None:
    origin = request.headers.get("Origin")
    if not origins or origin is None:
        return
    if origins == ("*",):
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin.rstrip("/") in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.vary.add("Origin")
    else:
        return
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-ID"
    response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After"
    response.headers["Access-Control-Max-Age"] = "600"


def _json_response(status: int, body: Any) -> Response:
    try:
        text = orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits (echoed from a request), which only the standard library writes
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(text, status=status, mimetype="application/json")


def _outcome_response(status: int, outcome: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    response = _json_response(status, outcome)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
