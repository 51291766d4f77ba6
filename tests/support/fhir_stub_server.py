"""A tiny, real FHIR-speaking HTTP server for tests: canned JSON per path, injectable faults, recorded requests.

It listens on 127.0.0.1 on a free port in a background thread (stdlib ``ThreadingHTTPServer``, HTTP/1.1 with
keep-alive, so connection pooling is exercised). Tests register routes and then assert what was called::

    def test_labs(fhir_stub):
        fhir_stub.add("/fhir/Observation", searchset([obs]), query={"patient": "123"})
        fhir_stub.add("/fhir/Patient/123", status=500)
        fhir_stub.add("/fhir/Condition", searchset([]), delay=5.0)
        ... call code with fhirServer=fhir_stub.url("/fhir") ...
        assert fhir_stub.requests_for("/fhir/Observation")[0].authorization == "Bearer t0ken"

Faults per route: ``status``, ``delay`` (seconds before the response starts), ``body`` as ``bytes``/``str``
(sent verbatim: malformed JSON), ``pad_to`` (pad the body with whitespace to that many bytes: an oversized
page), ``drip`` (seconds between 1 KiB body pieces: a trickling server), ``chunked`` (no Content-Length),
``headers`` (e.g. ``Location`` for a redirect, ``Set-Cookie``). A ``next`` loop or a ``next`` link to another host
is just a Bundle built with ``searchset(..., next_url=...)``. Unmatched requests get a 404 OperationOutcome.

Reusable by black-box tests: nothing here knows the service under test.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

FHIR_JSON = "application/fhir+json"
_DRIP_PIECE = 1024


def searchset(resources: Sequence[Mapping[str, Any]] = (), *, next_url: str | None = None,
              self_url: str | None = None, total: int | None = None) -> dict[str, Any]:
    """A FHIR searchset Bundle of ``resources`` with optional ``self`` and ``next`` links."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    links = [{"relation": rel, "url": url} for rel, url in (("self", self_url), ("next", next_url)) if url]
    if links:
        bundle["link"] = links
    if resources:
        bundle["entry"] = [{"fullUrl": f"urn:uuid:{r.get('resourceType')}-{r.get('id', i)}", "resource": dict(r),
                            "search": {"mode": "match"}} for i, r in enumerate(resources)]
    return bundle


def operation_outcome(diagnostics: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    """A FHIR OperationOutcome with one issue."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the stub received."""

    method: str
    path: str
    query: str
    params: Mapping[str, tuple[str, ...]]
    headers: Mapping[str, str]  # lower-cased names
    body: bytes = b""

    @property
    def authorization(self) -> str | None:
        """The Authorization header, if sent."""
        return self.headers.get("authorization")


@dataclass
class Route:
    """A canned response for (method, path[, query])."""

    path: str
    body: Any = None
    method: str = "GET"
    query: Mapping[str, tuple[str, ...]] | None = None
    status: int = 200
    delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = FHIR_JSON
    pad_to: int | None = None
    drip: float | None = None
    chunked: bool = False

    def matches(self, method: str, path: str, params: Mapping[str, tuple[str, ...]]) -> bool:
        """True when this route answers the request."""
        return self.method == method and self.path == path and (self.query is None or self.query == params)

    def payload(self) -> bytes:
        """The body bytes to send."""
        if self.body is None:
            data = b""
        elif isinstance(self.body, bytes):
            data = self.body
        elif isinstance(self.body, str):
            data = self.body.encode()
        else:
            data = json.dumps(self.body).encode()
        if self.pad_to is not None and len(data) < self.pad_to:
            data += b" " * (self.pad_to - len(data))
        return data


def _params(query: str) -> dict[str, tuple[str, ...]]:
    return {name: tuple(values) for name, values in parse_qs(query, keep_blank_values=True).items()}


def _query_spec(query: str | Mapping[str, str | Sequence[str]] | None) -> dict[str, tuple[str, ...]] | None:
    if query is None:
        return None
    if isinstance(query, str):
        return _params(query)
    return {name: (value,) if isinstance(value, str) else tuple(value) for name, value in query.items()}


class FhirStub:
    """The stub server. Use as a context manager, or via the ``fhir_stub`` / ``make_fhir_stub`` fixtures."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._routes: list[Route] = []
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server((host, 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fhir-stub", daemon=True)
        self._started = False

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: the stub's origin."""
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # IPv4: a str (server_address is typed for AF_UNIX's bytes too)
        return f"http://{host}:{port}"

    def url(self, path: str = "") -> str:
        """An absolute URL on this stub, e.g. ``url("/fhir")`` for a fhirServer base."""
        return self.base_url + path

    def start(self) -> FhirStub:
        """Start serving in a background thread."""
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def stop(self) -> None:
        """Stop serving, wake delayed handlers, and close every open connection."""
        self._stopping.set()
        if self._started:
            self._server.shutdown()
            self._thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()

    def __enter__(self) -> FhirStub:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def add(self, path: str, body: Any = None, *, status: int = 200, delay: float = 0.0,
            query: str | Mapping[str, str | Sequence[str]] | None = None, method: str = "GET",
            headers: Mapping[str, str] | None = None, content_type: str = FHIR_JSON, pad_to: int | None = None,
            drip: float | None = None, chunked: bool = False) -> Route:
        """Serve ``body`` (JSON-serialisable, or bytes/str verbatim) at ``path`` (and ``query``, if given:
        the request's parameters must then equal it, in any order). Replaces a route with the same key;
        a route with a query wins over one without."""
        route = Route(path=path, body=body, method=method.upper(), query=_query_spec(query), status=status,
                      delay=delay, headers=dict(headers or {}), content_type=content_type, pad_to=pad_to,
                      drip=drip, chunked=chunked)
        with self._lock:
            self._routes = [r for r in self._routes
                            if (r.method, r.path, r.query) != (route.method, route.path, route.query)]
            self._routes.append(route)
        return route

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The requests received for ``path``."""
        return [r for r in self.requests if r.path == path]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _route(self, method: str, path: str, params: Mapping[str, tuple[str, ...]]) -> Route | None:
        with self._lock:
            candidates = [r for r in self._routes if r.matches(method, path, params)]
        candidates.sort(key=lambda r: r.query is None)
        return candidates[0] if candidates else None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], stub: FhirStub) -> None:
        self.stub = stub
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.stub._lock:
            self.stub._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.stub._lock:
            self.stub._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts are the point of some tests) are not errors worth printing."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        stub = self.server.stub
        parts = urlsplit(self.path)
        params = _params(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        stub._record(RecordedRequest(method=method, path=parts.path, query=parts.query, params=params,
                                     headers={k.lower(): v for k, v in self.headers.items()}, body=body))
        route = stub._route(method, parts.path, params)
        if route is None:
            route = Route(path=parts.path, status=404, body=operation_outcome(
                f"no stub route for {method} {parts.path}", code="not-found"))
        if route.delay and stub._stopping.wait(route.delay):
            self.close_connection = True
            return
        payload = route.payload()
        self.send_response(route.status)
        if payload:
            self.send_header("Content-Type", route.content_type)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if route.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        pieces = [payload[i:i + _DRIP_PIECE] for i in range(0, len(payload), _DRIP_PIECE)] if route.drip else [payload]
        for piece in pieces:
            if route.drip and stub._stopping.wait(route.drip):
                self.close_connection = True
                return
            if not piece:
                continue
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if route.chunked else piece)
            self.wfile.flush()
        if route.chunked:
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def fhir_stub() -> Iterator[FhirStub]:
    """A running FhirStub, stopped after the test."""
    with FhirStub() as stub:
        yield stub


@pytest.fixture
def make_fhir_stub() -> Iterator[Any]:
    """A factory for more running stubs (e.g. a second origin); all stopped after the test."""
    stubs: list[FhirStub] = []

    def make() -> FhirStub:
        stub = FhirStub().start()
        stubs.append(stub)
        return stub

    yield make
    for stub in stubs:
        stub.stop()
