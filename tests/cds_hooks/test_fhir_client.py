"""The FHIR fallback fetch against a real HTTP server: reads, searches, pagination, limits, deadlines, faults."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from cds_hooks.fhir_client import (
    REASON_TEXT_LIMIT,
    WITHHELD,
    FhirFetcher,
    bundle_entries,
    clean_text,
    expected_resource_type,
    next_link,
    outcome_diagnostics,
    redact,
    same_origin,
)
from tests.support.fhir_stub_server import (  # noqa: F401  (fixtures)
    FhirStub,
    fhir_stub,
    make_fhir_stub,
    operation_outcome,
    searchset,
)

TOKEN = "tok-5f2b9c-super-secret"
PATIENT = {"resourceType": "Patient", "id": "123"}


def obs(n: int) -> dict[str, object]:
    """A minimal Observation with id ``o<n>``."""
    return {"resourceType": "Observation", "id": f"o{n}", "status": "final"}


@pytest.fixture
def fetcher() -> Iterator[FhirFetcher]:
    with FhirFetcher() as f:
        yield f


def soon(seconds: float = 3.0) -> float:
    return time.monotonic() + seconds


def test_fetch_read_returns_the_resource_with_fhir_accept_and_bearer(fhir_stub: FhirStub,
                                                                    fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", PATIENT)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=soon())
    assert outcome.ok and outcome.resources == (PATIENT,) and outcome.pages == 1
    (request,) = fhir_stub.requests
    assert request.headers["accept"] == "application/fhir+json"
    assert request.authorization == f"Bearer {TOKEN}"


def test_fetch_without_token_sends_no_authorization(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", PATIENT)
    assert fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=None, deadline=soon()).ok
    assert fhir_stub.requests[0].authorization is None


def test_fetch_search_unwraps_entries_and_counts_dropped(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    bundle = searchset([obs(1), obs(2)])
    bundle["entry"] += [{"fullUrl": "x"}, "not-an-object", {"resource": {"id": "no-type"}},
                        {"resource": operation_outcome("warning only", severity="warning"),
                         "search": {"mode": "outcome"}}]
    fhir_stub.add("/fhir/Observation", bundle, query={"patient": "123", "code": "http://loinc.org|751-8"})
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=123&code=http://loinc.org|751-8",
                            token=TOKEN, deadline=soon())
    assert outcome.ok
    assert [r["id"] for r in outcome.resources] == ["o1", "o2"]
    assert outcome.dropped_entries == 3


def test_fetch_empty_searchset_is_ok_and_empty(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Condition", searchset([]))
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Condition?patient=123", token=TOKEN, deadline=soon())
    assert outcome.ok and outcome.resources == ()


@pytest.mark.parametrize(
    ("route", "relative_url", "reason_part"),
    (
        (dict(status=401, body=operation_outcome("bad token")), "Patient/123", "HTTP 401"),
        (dict(status=403), "Patient/123", "HTTP 403"),
        (dict(status=404), "Patient/123", "HTTP 404"),
        (dict(status=500), "Patient/123", "HTTP 500"),
        (dict(status=503), "Patient/123", "HTTP 503"),
        (dict(status=400), "Patient/123", "HTTP 400"),
        (dict(body=b"<html>not json</html>", content_type="text/html"), "Patient/123", "not JSON"),
        (dict(body=b'{"resourceType": "Patient", '), "Patient/123", "not JSON"),
        (dict(body=b'{"resourceType": "Patient", "x": NaN}'), "Patient/123", "not JSON"),
        (dict(body=[PATIENT]), "Patient/123", "not a FHIR resource"),
        (dict(body={"id": "123"}), "Patient/123", "not a FHIR resource"),
        (dict(body=b""), "Patient/123", "not JSON"),
        (dict(body=obs(1)), "Patient/123", "expected Patient"),
        (dict(body=PATIENT), "Patient?_id=123", "expected Bundle"),
        (dict(body=operation_outcome("too many results")), "Patient/123", "too many results"),
        (dict(body={"resourceType": "Bundle", "entry": {"resource": PATIENT}}), "Patient?_id=123",
         "not an array"),
    ),
    ids=("401", "403", "404", "500", "503", "400", "html", "truncated-json", "nan", "json-array",
         "no-resourceType", "empty-body", "wrong-type-read", "resource-for-search", "operation-outcome",
         "bundle-entry-not-array"),
)
def test_fetch_failures_have_a_reason(fhir_stub: FhirStub, fetcher: FhirFetcher, route: dict[str, object],
                                      relative_url: str, reason_part: str) -> None:
    path = "/fhir/" + relative_url.split("?")[0]
    fhir_stub.add(path, **route)  # type: ignore[arg-type]
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), relative_url, token=TOKEN, deadline=soon())
    assert not outcome.ok and outcome.resources == () and outcome.pages == 0
    assert outcome.reason is not None and reason_part in outcome.reason
    assert "127.0.0.1" not in outcome.reason and "123" not in outcome.reason.replace("HTTP", "")


_REDIRECT = "the FHIR server answered with a redirect (HTTP {}), which is not followed"
_REFUSED = "the FHIR server refused the request (HTTP {})"
_NO_ACCESS = "the FHIR server refused access (HTTP {})"


@pytest.mark.parametrize(
    ("status", "reason"),
    ((299, None), (300, _REDIRECT), (399, _REDIRECT), (400, _REFUSED), (401, _NO_ACCESS), (402, _REFUSED),
     (403, _NO_ACCESS),
     (404, "the FHIR server found nothing at that URL (HTTP 404)"), (405, _REFUSED), (499, _REFUSED),
     (500, "the FHIR server failed (HTTP {})"), (599, "the FHIR server failed (HTTP {})")),
    ids=lambda value: str(value) if isinstance(value, int) else "",
)
def test_fetch_reason_for_each_status_class(fhir_stub: FhirStub, fetcher: FhirFetcher, status: int,
                                            reason: str | None) -> None:
    # Any 2xx is an answer; 3xx is never followed; 401 and 403 say access was refused (the token), 404 that
    # nothing is there; other 4xx blame the request and 5xx the server.
    fhir_stub.add("/fhir/Patient/123", PATIENT, status=status)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=soon())
    assert outcome.reason == (None if reason is None else reason.format(status))
    assert outcome.resources == (() if reason else (PATIENT,))


def test_fetch_does_not_follow_redirects(fhir_stub: FhirStub, make_fhir_stub: object, fetcher: FhirFetcher) -> None:
    other = make_fhir_stub()  # type: ignore[operator]
    other.add("/fhir/Patient/123", PATIENT)
    fhir_stub.add("/fhir/Patient/123", status=302, headers={"Location": other.url("/fhir/Patient/123")})
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=soon())
    assert not outcome.ok and "redirect" in (outcome.reason or "")
    assert other.requests == []


def test_fetch_unreachable_server_reason_has_no_url(fetcher: FhirFetcher) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = fetcher.fetch(f"http://127.0.0.1:{port}/fhir", "Patient/123", token=TOKEN, deadline=soon())
    assert not outcome.ok and "could not be reached" in (outcome.reason or "")
    assert str(port) not in (outcome.reason or "")


def test_fetch_decodes_gzip(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", gzip.compress(json.dumps(PATIENT).encode()),
                  headers={"Content-Encoding": "gzip"})
    assert fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=soon()).resources == (PATIENT,)


def test_fetch_keeps_no_cookies(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", PATIENT, headers={"Set-Cookie": "session=abc; Path=/"})
    for _ in range(2):
        assert fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=None, deadline=soon()).ok
    assert all("cookie" not in r.headers for r in fhir_stub.requests)


def test_fetcher_session_verifies_tls_ignores_the_environment_and_never_retries() -> None:
    # The token goes with every request: no unverified TLS, no proxy or .netrc taken from the environment, and a
    # failed request is not sent again.
    session = requests.Session()
    session.verify, session.trust_env = False, True
    with FhirFetcher(session):
        assert (session.verify, session.trust_env) == (True, False)
        for scheme in ("http://", "https://"):
            assert session.get_adapter(scheme + "ehr.example/fhir").max_retries.total == 0


def test_fetch_ignores_a_proxy_in_the_environment(fhir_stub: FhirStub, fetcher: FhirFetcher,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard: a proxy there refuses every connection
    fhir_stub.add("/fhir/Patient/123", PATIENT)
    assert fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=soon()).ok


@pytest.mark.parametrize("how", ("close", "with"))
def test_fetcher_close_closes_its_session(how: str) -> None:
    closed: list[bool] = []

    class Session(requests.Session):
        def close(self) -> None:
            closed.append(True)
            super().close()

    fetcher = FhirFetcher(Session())
    if how == "close":
        fetcher.close()
    else:
        with fetcher as entered:
            assert entered is fetcher
    assert closed == [True]


def test_fetch_logs_each_page_by_number_without_url_or_token(fhir_stub: FhirStub, fetcher: FhirFetcher,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cds_hooks.fhir_client")
    routes = [fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2"))),
              fhir_stub.add("/fhir/page/2", searchset([obs(2), obs(3)]))]
    assert fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=pt-zq", token=TOKEN, deadline=soon(),
                         label="labs").ok
    messages = [r.getMessage() for r in caplog.records if r.name == "cds_hooks.fhir_client"]
    fields = [dict(pair.split("=") for pair in m.removeprefix("fhir fetch ").split()) for m in messages]
    sizes = [len(route.payload()) for route in routes]
    assert [(f["key"], f["page"], f["status"], int(f["bytes"])) for f in fields] == [
        ("labs", "1", "200", sizes[0]), ("labs", "2", "200", sizes[1])]
    assert all(0 <= int(f["elapsed_ms"]) < 60_000 for f in fields)
    assert not any(TOKEN in m or "/fhir" in m or "pt-zq" in m for m in messages)


# --- pagination --------------------------------------------------------------------------------------------------


def chain(stub: FhirStub, pages: int, per_page: int = 2, *, relative: bool = False) -> None:
    """Register a search at /fhir/Observation whose pages 2..n live at /fhir/page/<n>."""
    for page in range(1, pages + 1):
        path = "/fhir/Observation" if page == 1 else f"/fhir/page/{page}"
        nxt = None
        if page < pages:
            nxt = f"page/{page + 1}" if relative else stub.url(f"/fhir/page/{page + 1}")
        stub.add(path, searchset([obs(page * 100 + i) for i in range(per_page)], next_url=nxt))


@pytest.mark.parametrize("relative", (False, True), ids=("absolute-next", "relative-next"))
def test_fetch_follows_next_links(fhir_stub: FhirStub, fetcher: FhirFetcher, relative: bool) -> None:
    chain(fhir_stub, 3, relative=relative)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=123", token=TOKEN, deadline=soon())
    assert outcome.ok and outcome.note is None and outcome.pages == 3
    assert [r["id"] for r in outcome.resources] == ["o100", "o101", "o200", "o201", "o300", "o301"]
    assert [r.path for r in fhir_stub.requests] == ["/fhir/Observation", "/fhir/page/2", "/fhir/page/3"]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in fhir_stub.requests)


def test_fetch_counts_entries_dropped_on_every_page(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    first = searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2"))
    first["entry"].append({"fullUrl": "no resource"})
    second = searchset([obs(2)])
    second["entry"] += [{"resource": {"id": "no-type"}}, "not-an-object"]
    fhir_stub.add("/fhir/Observation", first)
    fhir_stub.add("/fhir/page/2", second)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=1", token=TOKEN, deadline=soon())
    assert [r["id"] for r in outcome.resources] == ["o1", "o2"] and outcome.dropped_entries == 3


@pytest.mark.parametrize("loop_to", ("/fhir/page/2", "/fhir/Observation?patient=123"), ids=("self", "first-page"))
def test_fetch_stops_a_next_link_loop(fhir_stub: FhirStub, fetcher: FhirFetcher, loop_to: str) -> None:
    fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2")))
    fhir_stub.add("/fhir/page/2", searchset([obs(2)], next_url=fhir_stub.url(loop_to)))
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=123", token=TOKEN, deadline=soon())
    assert outcome.ok and [r["id"] for r in outcome.resources] == ["o1", "o2"]
    assert "repeats" in (outcome.note or "")
    assert len(fhir_stub.requests) == 2


def test_fetch_never_follows_next_to_another_origin(fhir_stub: FhirStub, make_fhir_stub: object,
                                                     fetcher: FhirFetcher) -> None:
    other = make_fhir_stub()  # type: ignore[operator]
    other.add("/fhir/page/2", searchset([obs(2)]))
    fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url=other.url("/fhir/page/2")))
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=123", token=TOKEN, deadline=soon())
    assert outcome.ok and [r["id"] for r in outcome.resources] == ["o1"]
    assert "another origin" in (outcome.note or "")
    assert other.requests == []


def test_fetch_does_not_follow_a_next_link_that_is_not_a_url(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    # urljoin raised ValueError on the unclosed bracket: the key's data was thrown away as "failed unexpectedly".
    fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url="http://[::1/fhir/page/2"))
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation?patient=123", token=TOKEN, deadline=soon())
    assert outcome.ok and [r["id"] for r in outcome.resources] == ["o1"]
    assert outcome.note == "a next link that is not a URL was not followed"
    assert len(fhir_stub.requests) == 1


def test_fetch_stops_at_max_pages(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    chain(fhir_stub, 5)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=soon(), max_pages=2)
    assert outcome.pages == 2 and len(outcome.resources) == 4
    assert "2 pages" in (outcome.note or "")
    assert len(fhir_stub.requests) == 2


@pytest.mark.parametrize(("limit", "requests", "noted"), ((3, 2, True), (4, 2, True), (6, 3, False)),
                         ids=("mid-page", "page-boundary-with-more", "exactly-all"))
def test_fetch_stops_at_max_resources(fhir_stub: FhirStub, fetcher: FhirFetcher, limit: int, requests: int,
                                      noted: bool) -> None:
    chain(fhir_stub, 3)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=soon(), max_resources=limit)
    assert len(outcome.resources) == limit
    assert len(fhir_stub.requests) == requests
    assert (outcome.note is not None) is noted


def test_fetch_keeps_earlier_pages_when_a_later_page_fails(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2")))
    fhir_stub.add("/fhir/page/2", status=500)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=soon())
    assert outcome.ok and [r["id"] for r in outcome.resources] == ["o1"]
    assert "page 2" in (outcome.note or "") and "HTTP 500" in (outcome.note or "")


@pytest.mark.parametrize(("total", "noted"),
                         ((3, True), (1, True), (0, False), (None, False), ("3", False), (True, False)),
                         ids=("total-above-zero", "total-one", "total-zero", "no-total", "total-not-a-number",
                              "total-a-boolean"))
def test_fetch_notes_a_total_that_no_page_holds(fhir_stub: FhirStub, fetcher: FhirFetcher, total: Any,
                                                noted: bool) -> None:
    bundle = searchset([])
    if total is not None:
        bundle["total"] = total
    fhir_stub.add("/fhir/Observation", bundle)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=soon())
    assert outcome.ok and not outcome.resources
    assert outcome.note == (f"its total is {total} but no page holds a resource" if noted else None)


def test_paginate_continues_a_bundle_in_hand(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/page/2", searchset([obs(2)]))
    first = searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2"))
    outcome = fetcher.paginate(fhir_stub.url("/fhir"), first, token=TOKEN, deadline=soon())
    assert [r["id"] for r in outcome.resources] == ["o1", "o2"] and outcome.pages == 2


# --- size and time limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", (False, True), ids=("content-length", "chunked-no-length"))
def test_fetch_refuses_an_oversized_page(fhir_stub: FhirStub, fetcher: FhirFetcher, chunked: bool) -> None:
    fhir_stub.add("/fhir/Observation", searchset([obs(1)]), pad_to=300_000, chunked=chunked)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=soon(),
                            max_page_bytes=100_000)
    assert not outcome.ok and "larger than 100000 bytes" in (outcome.reason or "")


def test_fetch_under_the_size_limit_is_fine(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Observation", searchset([obs(1)]), pad_to=90_000, chunked=True)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=soon(),
                            max_page_bytes=100_000)
    assert outcome.ok and len(outcome.resources) == 1


def test_fetch_gives_up_at_the_deadline_on_a_slow_server(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", PATIENT, delay=5.0)
    started = time.monotonic()
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=started + 0.5)
    assert time.monotonic() - started < 0.8
    assert outcome.reason == "timed out"


def test_fetch_enforces_the_total_deadline_on_a_trickling_body(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    # 1 KiB every 0.1 s for ~3 s: no single socket read ever times out, only the total does.
    fhir_stub.add("/fhir/Observation", searchset([obs(1)]), pad_to=30_000, drip=0.1)
    started = time.monotonic()
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Observation", token=TOKEN, deadline=started + 0.5)
    assert time.monotonic() - started < 0.8
    assert outcome.reason == "timed out"


def test_fetch_with_under_a_second_left_is_made(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", PATIENT)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=soon(0.95))
    assert outcome.resources == (PATIENT,)


def test_fetch_past_the_deadline_makes_no_request(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/123", PATIENT)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/123", token=TOKEN, deadline=time.monotonic() - 0.5)
    assert outcome.reason == "timed out" and fhir_stub.requests == []


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [("token abcdefgh-1234 is not valid", "abcdefgh-1234", "token [redacted] is not valid"),
     ("server error: token e not valid", "e", WITHHELD),
     ("no token here", "abcdefgh-1234", "no token here"),
     ("anonymous error", None, "anonymous error"),
     ("short token absent", "zq", "short token absent"),
     ("GET /Patient?access_token=ab%2Bcd%2Fef%3D%3D refused", "ab+cd/ef==", WITHHELD),
     ("GET /Patient?access_token=ab%2bcd/ef%3d%3D refused", "ab+cd/ef==", WITHHELD),
     ("token ab+cd/ef== and again ab%2Bcd%2Fef%3D%3D", "ab+cd/ef==", WITHHELD),
     ("progress 100%2B done", "abcdefgh-1234", "progress 100%2B done")],
    ids=["long-token-cut-out", "short-token-withholds-the-text", "token-absent", "anonymous", "short-token-absent",
         "percent-encoded-token", "percent-encoded-lower-case-and-partly", "plain-and-percent-encoded",
         "percent-sign-without-token"],
)
def test_redact(text: str, secret: str | None, expected: str) -> None:
    # A one-letter token was cut out of every word ("s[redacted]rv[redacted]r [redacted]rror"): garbled, and what
    # was left still hinted at the token. A short token now withholds the text whole. A server echoing a URL
    # carried the token percent-encoded past the plain comparison: such a text is withheld too.
    assert redact(text, secret) == expected


def test_fetch_never_logs_or_reports_the_token(fhir_stub: FhirStub, fetcher: FhirFetcher,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fhir_stub.add("/fhir/Patient/1", operation_outcome(f"token {TOKEN} is not valid for this patient"))
    fhir_stub.add("/fhir/Patient/2", status=401)
    fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2")))
    fhir_stub.add("/fhir/page/2", operation_outcome(f"echo {TOKEN}"))
    outcomes = [fetcher.fetch(fhir_stub.url("/fhir"), url, token=TOKEN, deadline=soon())
                for url in ("Patient/1", "Patient/2", "Observation?patient=1")]
    texts = [o.reason or o.note or "" for o in outcomes]
    assert all(texts) and "[redacted]" in texts[0]
    assert all(TOKEN not in text for text in texts)
    assert caplog.records and TOKEN not in caplog.text
    assert all(r.levelno <= logging.DEBUG for r in caplog.records if r.name.startswith("cds_hooks"))


def _at_the_limit(limit: int) -> str:
    """A server text whose token straddles the point where a reason is cut to ``limit`` characters."""
    return "x" * (limit - len(TOKEN) // 2) + TOKEN


@pytest.mark.parametrize(("path", "answer"), [
    ("Patient/1", operation_outcome(_at_the_limit(REASON_TEXT_LIMIT))),
    ("Patient/1", {"resourceType": _at_the_limit(40)}),
    ("Observation?patient=1", "page-2-outcome"),
    ("Observation?patient=1", "page-2-type"),
], ids=["outcome-diagnostics", "resource-type", "page-2-outcome-diagnostics", "page-2-resource-type"])
def test_a_token_cut_by_the_reason_limit_leaves_no_part_of_it(fhir_stub: FhirStub, fetcher: FhirFetcher,
                                                              path: str, answer: Any) -> None:
    # The server's text was cut to the reason's limit first and redacted after: the token no longer occurred
    # whole, so its first half was reported (and logged) as sent.
    if isinstance(answer, str):
        fhir_stub.add("/fhir/Observation", searchset([obs(1)], next_url=fhir_stub.url("/fhir/page/2")))
        page = (operation_outcome(_at_the_limit(REASON_TEXT_LIMIT)) if answer == "page-2-outcome"
                else {"resourceType": _at_the_limit(40)})
        fhir_stub.add("/fhir/page/2", page)
    else:
        fhir_stub.add("/fhir/" + path, answer)
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), path, token=TOKEN, deadline=soon())
    text = outcome.reason or outcome.note or ""
    assert text and TOKEN[:8] not in text, text


# --- pure helpers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative_url", "expected"),
    (
        ("Patient/123", "Patient"),
        ("Patient/123/_history/2", "Patient"),
        ("Observation?patient=1&code=http://loinc.org|751-8", "Bundle"),
        ("Observation", "Bundle"),
        ("Patient/1/Observation?code=x", "Bundle"),
        ("Patient/1/$everything", None),
        ("metadata", None),
        ("Patient/$match", None),
        ("Patient/_search", "Bundle"),
        ("Patient/1/_history", None),
        ("Patient/1/Observation/2", None),
    ),
    ids=("read", "vread", "search", "search-no-params", "compartment", "instance-operation", "metadata",
         "type-operation", "search-by-post-path", "instance-history", "compartment-read"),
)
def test_expected_resource_type(relative_url: str, expected: str | None) -> None:
    assert expected_resource_type(relative_url) == expected


@pytest.mark.parametrize(
    ("url", "base", "same"),
    (
        ("https://ehr.example/fhir/page2", "https://ehr.example/fhir", True),
        ("https://EHR.example:443/other", "https://ehr.example/fhir", True),
        ("http://ehr.example/fhir/page2", "https://ehr.example/fhir", False),
        ("https://ehr.example:8443/fhir", "https://ehr.example/fhir", False),
        ("https://ehr.example.evil.com/fhir", "https://ehr.example/fhir", False),
        ("https://user@ehr.example/fhir", "https://ehr.example/fhir", False),
        ("ftp://ehr.example/fhir", "https://ehr.example/fhir", False),
        ("https://ehr.example:99999/fhir", "https://ehr.example/fhir", False),
        ("http://ehr.example:80/fhir/page2", "http://ehr.example/fhir", True),
        ("http://ehr.example:81/fhir/page2", "http://ehr.example/fhir", False),
        ("https://ehr.example\\@evil.example/fhir", "https://ehr.example/fhir", False),
        ("https://ehr.example/fhir\\..\\page2", "https://ehr.example/fhir", False),
        ("https://ehr.example/fhir", "not a url", False),
        ("/fhir/page2", "https://ehr.example/fhir", False),
    ),
    ids=("same", "case-and-default-port", "scheme", "port", "lookalike-host", "userinfo", "not-http", "bad-port",
         "http-default-port", "http-other-port", "backslash-in-authority", "backslash-in-path", "base-not-a-url",
         "not-absolute"),
)
def test_same_origin(url: str, base: str, same: bool) -> None:
    assert same_origin(url, base) is same


@pytest.mark.parametrize(
    ("links", "expected"),
    (
        ([{"relation": "self", "url": "https://a/1"}, {"relation": "next", "url": " https://a/2 "}], "https://a/2"),
        (["next", {"relation": "next", "url": "https://a/2"}], "https://a/2"),
        ([{"relation": "previous", "url": "https://a/0"}], None),
        ([{"relation": "next", "url": 5}, {"relation": "next", "url": "https://a/2"}], "https://a/2"),
        ([{"relation": "next", "url": "  "}], None),
        ([{"relation": "next"}], None),
        ({"relation": "next", "url": "https://a/2"}, None),
        (None, None),
    ),
    ids=("next-among-others", "item-not-an-object", "no-next", "url-not-a-string", "url-blank", "url-missing",
         "link-not-an-array", "no-link"),
)
def test_next_link(links: Any, expected: str | None) -> None:
    assert next_link({"resourceType": "Bundle", "link": links}) == expected


@pytest.mark.parametrize("entry", (None, []), ids=("null", "empty"))
def test_bundle_entries_of_a_bundle_without_entries(entry: Any) -> None:
    assert bundle_entries({"resourceType": "Bundle", "entry": entry}) == ((), 0)


@pytest.mark.parametrize(
    ("secret", "expected"),
    (("abcdefg", WITHHELD), ("abcdefgh", "token [redacted] refused")),
    ids=("7-characters-withheld", "8-characters-redacted"),
)
def test_redact_shortest_redactable_secret(secret: str, expected: str) -> None:
    assert redact(f"token {secret} refused", secret) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    (("a\x1b[31mb\x00c\u202ed\u2028e", "a [31mb c d e"),
     ("x" * REASON_TEXT_LIMIT, "x" * REASON_TEXT_LIMIT),
     ("x" * (REASON_TEXT_LIMIT + 1), "x" * (REASON_TEXT_LIMIT - 1) + "…")),
    ids=("control-and-format-characters", "at-the-limit", "over-the-limit"),
)
def test_clean_text(text: str, expected: str) -> None:
    # Server text reaches reasons, logs and 412 bodies: one line of printable characters, at most the limit.
    assert clean_text(text) == expected


@pytest.mark.parametrize(
    ("issues", "expected"),
    (([{"diagnostics": "one"}, {"diagnostics": "  ", "code": "exception"}, {"diagnostics": "two"}], "one; two"),
     ([{"diagnostics": 5, "details": {"text": 6}, "code": 7}], "no diagnostics"),
     ([{"details": "not an object", "code": "processing"}], "processing"),
     ("not-a-list", "no diagnostics")),
    ids=("blank-diagnostics", "nothing-is-a-string", "details-not-an-object", "issue-not-a-list"),
)
def test_outcome_diagnostics_skips_what_is_not_text(issues: Any, expected: str) -> None:
    assert outcome_diagnostics({"resourceType": "OperationOutcome", "issue": issues}) == expected


def test_fetch_names_the_unexpected_type_cut_to_40_characters(fhir_stub: FhirStub, fetcher: FhirFetcher) -> None:
    fhir_stub.add("/fhir/Patient/1", {"resourceType": "Y" * 39 + "Z" + "tail"})
    outcome = fetcher.fetch(fhir_stub.url("/fhir"), "Patient/1", token=TOKEN, deadline=soon())
    assert outcome.reason == f"expected Patient, the FHIR server returned {'Y' * 39}…"


def test_outcome_diagnostics_and_clean_text() -> None:
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"diagnostics": "line one\nline\ttwo"}, {"details": {"text": "from details"}},
                         {"code": "exception"}, "junk"]}
    assert outcome_diagnostics(outcome) == "line one line two; from details; exception"
    assert outcome_diagnostics({"resourceType": "OperationOutcome"}) == "no diagnostics"
    long = clean_text("x" * 500)
    assert len(long) == 200 and long.endswith("…")
