"""Prefetch resolution: every row of the spec's prefetch table, the fallback fetch's gates, parallelism, 412."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cds_hooks import prefetch as prefetch_module
from cds_hooks.errors import PreconditionFailed
from cds_hooks.fhir_client import FhirFetcher
from cds_hooks.models import ServiceResponse
from cds_hooks.prefetch import REFERENCE_CHUNK, FetchPolicy, KeyResult, KeyState, PrefetchResult, resolve_prefetch
from cds_hooks.registry import HookCall, ServiceDefinition
from cds_hooks.request_context import REQUEST_ID
from cds_hooks.schemas import FhirAuthorization, HookRequest
from tests.support.fhir_stub_server import (  # noqa: F401  (fixtures)
    FhirStub,
    fhir_stub,
    make_fhir_stub,
    operation_outcome,
    searchset,
)

TOKEN = "tok-7d1e0a-super-secret"
LABS_QUERY = {"patient": "123", "code": "http://loinc.org|751-8"}
VITALS_QUERY = {"patient": "123", "code": "http://loinc.org|8310-5"}
CONDITIONS_QUERY = {"patient": "123"}
PATIENT = {"resourceType": "Patient", "id": "123"}
ANC = {"resourceType": "Observation", "id": "anc1", "code": {"coding": [{"code": "751-8"}]}}
TEMP = {"resourceType": "Observation", "id": "temp1", "code": {"coding": [{"code": "8310-5"}]}}
CONDITION = {"resourceType": "Condition", "id": "c1"}
ABSENT = object()


def _handler(call: HookCall) -> ServiceResponse:
    raise NotImplementedError


DEFINITION = ServiceDefinition(
    id="test-service",
    hook="patient-view",
    description="test",
    handler=_handler,
    prefetch={
        "patient": "Patient/{{context.patientId}}",
        "labs": "Observation?patient={{context.patientId}}&code=http://loinc.org|751-8",
        "vitals": "Observation?patient={{context.patientId}}&code=http://loinc.org|8310-5",
        "conditions": "Condition?patient={{context.patientId}}",
    },
    required_prefetch=frozenset({"labs", "vitals"}),
)


def make_request(stub: FhirStub | None, prefetch: Mapping[str, Any] | None = None, *, token: str | None = TOKEN,
                 expires_in: int = 300, fhir_server: str | None = None,
                 context: Mapping[str, Any] | None = None) -> HookRequest:
    """A patient-view request; fhirServer defaults to the stub's /fhir base."""
    authorization = None
    if token is not None:
        authorization = FhirAuthorization(access_token=token, token_type="Bearer", expires_in=expires_in,
                                          scope="user/Patient.read user/Observation.read", subject="cds-service")
    return HookRequest(
        hook="patient-view",
        hook_instance="d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        context=context if context is not None else {"userId": "Practitioner/1", "patientId": "123"},
        fhir_server=fhir_server if fhir_server is not None else (stub.url("/fhir") if stub else None),
        fhir_authorization=authorization,
        prefetch=dict(prefetch or {}),
    )


def serve_all(stub: FhirStub, **faults: Any) -> None:
    """Register every template's URL on the stub with one resource each (faults apply to all)."""
    stub.add("/fhir/Patient/123", PATIENT, **faults)
    stub.add("/fhir/Observation", searchset([ANC]), query=LABS_QUERY, **faults)
    stub.add("/fhir/Observation", searchset([TEMP]), query=VITALS_QUERY, **faults)
    stub.add("/fhir/Condition", searchset([CONDITION]), query=CONDITIONS_QUERY, **faults)


FULL_PREFETCH = {"patient": PATIENT, "labs": searchset([ANC]), "vitals": searchset([TEMP]),
                 "conditions": searchset([CONDITION])}


@pytest.fixture
def fetcher() -> Iterator[FhirFetcher]:
    with FhirFetcher() as f:
        yield f


@pytest.fixture
def resolve(fhir_stub: FhirStub, fetcher: FhirFetcher) -> Callable[..., PrefetchResult]:
    """resolve_prefetch with the stub allowlisted, the test fetcher, and received_at = now."""

    def run(request: HookRequest, *, received_at: float | None = None, **policy: Any) -> PrefetchResult:
        policy.setdefault("allowed_bases", (fhir_stub.url("/fhir"),))
        return resolve_prefetch(DEFINITION, request, policy=FetchPolicy(**policy),
                                received_at=time.monotonic() if received_at is None else received_at,
                                fetcher=fetcher)

    return run


# --- the prefetch table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "state", "origin", "fetched", "ids"),
    (
        (ABSENT, KeyState.DATA, "fhir", 1, ["c1"]),
        (None, KeyState.EMPTY, "prefetch", 0, []),
        (searchset([]), KeyState.EMPTY, "prefetch", 0, []),
        ({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}, KeyState.EMPTY, "prefetch", 0, []),
        (operation_outcome("could not search"), KeyState.UNAVAILABLE, "prefetch", 0, []),
        (CONDITION, KeyState.DATA, "prefetch", 0, ["c1"]),
        (searchset([CONDITION, {**CONDITION, "id": "c2"}]), KeyState.DATA, "prefetch", 0, ["c1", "c2"]),
        ([CONDITION], KeyState.UNAVAILABLE, "prefetch", 0, []),
        ("Condition/c1", KeyState.UNAVAILABLE, "prefetch", 0, []),
        ({"id": "c1"}, KeyState.UNAVAILABLE, "prefetch", 0, []),
    ),
    ids=("absent-fetched", "null-empty-not-fetched", "empty-bundle", "empty-entry-array", "operation-outcome",
         "resource", "bundle", "json-array", "string", "no-resourceType"),
)
def test_prefetch_table_row(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult], value: Any,
                            state: KeyState, origin: str, fetched: int, ids: list[str]) -> None:
    serve_all(fhir_stub)
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    if value is not ABSENT:
        prefetch["conditions"] = value
    result = resolve(make_request(fhir_stub, prefetch)).keys["conditions"]
    assert result.state is state and result.origin == origin
    assert [r["id"] for r in result.resources] == ids
    assert len(fhir_stub.requests) == fetched
    assert (result.reason is not None) is (state is KeyState.UNAVAILABLE)


@pytest.mark.parametrize(("value", "why"),
                         (([ANC], " is not a FHIR resource"),
                          ({"resourceType": "Bundle", "entry": "x"}, ": Bundle.entry is not an array")),
                         ids=("not-a-resource", "bad-bundle"))
def test_prefetch_reason_cuts_a_long_key_the_client_sent(resolve: Callable[..., PrefetchResult], value: Any,
                                                         why: str) -> None:
    # A key the client sent unasked is its own text: it reaches the reason (and a 412) one line, 60 characters.
    key = "k" * 61
    assert resolve(make_request(None, {**FULL_PREFETCH, key: value})).keys[key].reason == f"prefetch.{'k' * 59}…{why}"


@pytest.mark.parametrize("value", ([ANC], {"id": "x"}), ids=("json-array", "no-resourceType"))
def test_prefetch_not_a_resource_reason_names_the_key(resolve: Callable[..., PrefetchResult], value: Any) -> None:
    result = resolve(make_request(None, {**FULL_PREFETCH, "conditions": value})).keys["conditions"]
    assert result.reason == "prefetch.conditions is not a FHIR resource"


def test_prefetch_operation_outcome_reason_carries_diagnostics(resolve: Callable[..., PrefetchResult]) -> None:
    value = operation_outcome("search too broad\nretry later")
    result = resolve(make_request(None, {**FULL_PREFETCH, "conditions": value}))
    assert result.unavailable() == {"conditions": "the client sent an OperationOutcome: search too broad retry later"}


def test_prefetch_operation_outcome_on_required_key_is_412_and_not_fetched(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    request = make_request(fhir_stub, {**FULL_PREFETCH, "labs": operation_outcome("lab system down")})
    with pytest.raises(PreconditionFailed) as raised:
        resolve(request)
    assert raised.value.status_code == 412
    assert set(raised.value.missing) == {"labs"} and "lab system down" in raised.value.missing["labs"]
    outcome = raised.value.to_outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["expression"] for i in outcome["issue"]] == [["prefetch.labs"]]
    assert fhir_stub.requests == []


def test_prefetch_operation_outcome_refetched_when_policy_says_so(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    request = make_request(fhir_stub, {**FULL_PREFETCH, "labs": operation_outcome("lab system down")})
    result = resolve(request, operation_outcome_refetch=True).keys["labs"]
    assert result.state is KeyState.DATA and result.origin == "fhir" and result.resources == (ANC,)
    assert [r.params for r in fhir_stub.requests] == [{k: (v,) for k, v in LABS_QUERY.items()}]


def test_prefetch_operation_outcome_refetch_refused_keeps_both_reasons(resolve: Callable[..., PrefetchResult]) -> None:
    request = make_request(None, {**FULL_PREFETCH, "conditions": operation_outcome("down")})
    reason = resolve(request, operation_outcome_refetch=True).unavailable()["conditions"]
    assert "OperationOutcome: down" in reason and "no fhirServer" in reason


def test_prefetch_bundle_next_link_is_followed_and_merged(fhir_stub: FhirStub,
                                                          resolve: Callable[..., PrefetchResult]) -> None:
    second = {**ANC, "id": "anc2"}
    fhir_stub.add("/fhir/Observation/page2", searchset([second]))
    labs = searchset([ANC], next_url=fhir_stub.url("/fhir/Observation/page2"))
    result = resolve(make_request(fhir_stub, {**FULL_PREFETCH, "labs": labs})).keys["labs"]
    assert result.state is KeyState.DATA and result.origin == "prefetch"
    assert [r["id"] for r in result.resources] == ["anc1", "anc2"]
    assert [(r.path, r.authorization) for r in fhir_stub.requests] == [("/fhir/Observation/page2", f"Bearer {TOKEN}")]


def test_prefetch_bundle_next_link_not_followed_without_access(resolve: Callable[..., PrefetchResult]) -> None:
    labs = searchset([ANC], next_url="http://127.0.0.1:9/fhir/Observation/page2")
    result = resolve(make_request(None, {**FULL_PREFETCH, "labs": labs})).keys["labs"]
    assert result.state is KeyState.DATA and result.resources == (ANC,)
    assert "next link was not followed: no fhirServer" in (result.reason or "")


# A first page's next link that is not followed to the end: with resources, the page is data with a note; without
# any, the data lies behind the link, so the key is unavailable (412 when required), never "no data".
# (where: "none" = no fhirServer, "other-origin" = a next link to another server, "page-500" = page 2 fails,
# "slow" = page 2 past the deadline.)
@pytest.mark.parametrize(
    ("first_page", "where", "state", "reason"),
    (
        ([], "none", KeyState.UNAVAILABLE,
         "its first page holds no resources and its next link was not followed: no fhirServer in the request"),
        ([], "other-origin", KeyState.UNAVAILABLE,
         "no resource was obtained: a next link to another origin was not followed"),
        ([], "page-500", KeyState.UNAVAILABLE, "no resource was obtained: page 2 could not be fetched"),
        ([], "slow", KeyState.UNAVAILABLE,
         "no resource was obtained: page 2 could not be fetched: timed out"),
        ([CONDITION], "none", KeyState.DATA, "its next link was not followed: no fhirServer in the request"),
        ([CONDITION], "other-origin", KeyState.DATA, "a next link to another origin was not followed"),
        ([CONDITION], "page-500", KeyState.DATA, "page 2 could not be fetched"),
        ([CONDITION], "slow", KeyState.DATA, "page 2 could not be fetched: timed out"),
    ),
    ids=("empty-no-fhirServer", "empty-other-origin", "empty-page-2-fails", "empty-page-2-too-slow",
         "partial-no-fhirServer", "partial-other-origin", "partial-page-2-fails", "partial-page-2-too-slow"),
)
def test_prefetch_first_page_whose_next_link_is_not_followed(
        fhir_stub: FhirStub, make_fhir_stub: Any, resolve: Callable[..., PrefetchResult],
        first_page: list[dict[str, Any]], where: str, state: KeyState, reason: str) -> None:
    # Regression: an empty first page with a next link was "empty" (a note only), so the service assessed on
    # nothing and answered 200.
    next_url = fhir_stub.url("/fhir/Condition/page2")
    if where == "other-origin":
        next_url = make_fhir_stub().url("/fhir/Condition/page2")
    fhir_stub.add("/fhir/Condition/page2", searchset([{**CONDITION, "id": "c2"}]) if where != "page-500" else
                  operation_outcome("boom"), status=500 if where == "page-500" else 200,
                  delay=3.0 if where == "slow" else 0.0)
    stub = None if where == "none" else fhir_stub
    request = make_request(stub, {**FULL_PREFETCH, "conditions": searchset(first_page, next_url=next_url)})
    result = resolve(request, deadline_seconds=1.0).keys["conditions"]
    assert result.state is state and result.origin == "prefetch"
    assert result.resources == tuple(first_page)
    assert reason in (result.reason or ""), result.reason


class _BrokenPaginator(FhirFetcher):
    """A fetcher whose ``paginate`` fails with a bug, or outlasts the call's deadline."""

    def __init__(self, hang: bool) -> None:
        super().__init__()
        self.hang = hang

    def paginate(self, *args: Any, **kwargs: Any) -> Any:
        if self.hang:
            time.sleep(1.0)
        raise RuntimeError("a bug in the fetch path")


@pytest.mark.parametrize(
    ("first_page", "hang", "state", "reason"),
    (
        ([], True, KeyState.UNAVAILABLE, "its first page holds no resources and following its next link timed out"),
        ([], False, KeyState.UNAVAILABLE,
         "its first page holds no resources and following its next link failed unexpectedly"),
        ([CONDITION], True, KeyState.DATA, "following its next link timed out"),
        ([CONDITION], False, KeyState.DATA, "following its next link failed unexpectedly"),
    ),
    ids=("empty-follow-outlasts-the-call", "empty-follow-fails", "partial-follow-outlasts-the-call",
         "partial-follow-fails"),
)
def test_prefetch_follow_job_that_never_reports(fhir_stub: FhirStub, first_page: list[dict[str, Any]], hang: bool,
                                                state: KeyState, reason: str) -> None:
    conditions = searchset(first_page, next_url=fhir_stub.url("/fhir/Condition/page2"))
    with _BrokenPaginator(hang) as fetcher:
        result = resolve_prefetch(DEFINITION, make_request(fhir_stub, {**FULL_PREFETCH, "conditions": conditions}),
                                  policy=FetchPolicy(allowed_bases=(fhir_stub.url("/fhir"),), deadline_seconds=0.3),
                                  received_at=time.monotonic(), fetcher=fetcher).keys["conditions"]
    assert (result.state, result.resources, result.reason) == (state, tuple(first_page), reason)


def test_prefetch_required_empty_first_page_with_unfollowable_next_is_412(
        resolve: Callable[..., PrefetchResult]) -> None:
    labs = searchset([], next_url="https://ehr.example.org/fhir/Observation?page=2")
    missing = required_412(resolve, make_request(None, {**FULL_PREFETCH, "labs": labs}))
    assert missing == {"labs": "its first page holds no resources and its next link was not followed: "
                               "no fhirServer in the request"}


def test_prefetch_empty_first_page_whose_next_link_is_followed_is_data(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Observation/page2", searchset([ANC]))
    labs = searchset([], next_url=fhir_stub.url("/fhir/Observation/page2"))
    result = resolve(make_request(fhir_stub, {**FULL_PREFETCH, "labs": labs})).keys["labs"]
    assert result.state is KeyState.DATA and result.resources == (ANC,) and result.reason is None


def test_prefetch_fetched_empty_first_page_whose_next_page_fails_is_unavailable(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Condition", searchset([], next_url=fhir_stub.url("/fhir/Condition/page2")),
                  query=CONDITIONS_QUERY)
    fhir_stub.add("/fhir/Condition/page2", operation_outcome("boom"), status=500)
    result = resolve(make_request(fhir_stub, {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}))
    assert result.keys["conditions"].state is KeyState.UNAVAILABLE and result.keys["conditions"].origin == "fhir"
    assert result.unavailable()["conditions"].startswith("no resource was obtained: page 2")


@pytest.mark.parametrize(
    ("bundle", "state", "reason"),
    (
        (searchset([], total=3), KeyState.UNAVAILABLE, "its total is 3 but it holds no resources and no next link"),
        (searchset([], total=0), KeyState.EMPTY, None),
        (searchset([CONDITION], total=3), KeyState.DATA, None),
        ({**searchset([], total=2), "entry": [{"fullUrl": "urn:x"}]}, KeyState.UNAVAILABLE,
         "1 Bundle entries without a resource were dropped; its total is 2 but it holds no resources"),
        ({**searchset([]), "total": "3"}, KeyState.EMPTY, None),
        ({**searchset([]), "total": True}, KeyState.EMPTY, None),
        (searchset([], total=1), KeyState.UNAVAILABLE, "its total is 1 but it holds no resources and no next link"),
        ({**searchset([]), "entry": {"resource": CONDITION}}, KeyState.UNAVAILABLE,
         "prefetch.conditions: Bundle.entry is not an array"),
    ),
    ids=("total-above-zero-no-entries", "total-zero", "total-above-entries-kept-as-data", "entries-all-dropped",
         "total-not-a-number", "total-boolean", "total-one", "entry-not-an-array"),
)
def test_prefetch_bundle_total(resolve: Callable[..., PrefetchResult], bundle: dict[str, Any], state: KeyState,
                               reason: str | None) -> None:
    result = resolve(make_request(None, {**FULL_PREFETCH, "conditions": bundle})).keys["conditions"]
    assert result.state is state
    if reason is None:
        assert result.reason is None
    else:
        assert reason in (result.reason or ""), result.reason


def test_prefetch_bundle_next_link_to_other_origin_not_followed(
        fhir_stub: FhirStub, make_fhir_stub: Any, resolve: Callable[..., PrefetchResult]) -> None:
    other = make_fhir_stub()
    other.add("/fhir/Observation/page2", searchset([{**ANC, "id": "evil"}]))
    labs = searchset([ANC], next_url=other.url("/fhir/Observation/page2"))
    result = resolve(make_request(fhir_stub, {**FULL_PREFETCH, "labs": labs})).keys["labs"]
    assert result.resources == (ANC,) and "another origin" in (result.reason or "")
    assert other.requests == [] and fhir_stub.requests == []


def test_prefetch_partial_fetches_only_missing_keys(fhir_stub: FhirStub,
                                                    resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    result = resolve(make_request(fhir_stub, {"patient": PATIENT, "labs": searchset([ANC])}))
    assert {k: (r.state, r.origin) for k, r in result.keys.items()} == {
        "patient": (KeyState.DATA, "prefetch"), "labs": (KeyState.DATA, "prefetch"),
        "vitals": (KeyState.DATA, "fhir"), "conditions": (KeyState.DATA, "fhir")}
    assert sorted((r.path, r.params.get("code", ("",))[0]) for r in fhir_stub.requests) == [
        ("/fhir/Condition", ""), ("/fhir/Observation", "http://loinc.org|8310-5")]
    assert [r["id"] for r in result.resources()] == ["123", "anc1", "temp1", "c1"]


def test_prefetch_fetched_read_and_empty_search(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    fhir_stub.add("/fhir/Condition", searchset([]), query=CONDITIONS_QUERY)
    result = resolve(make_request(fhir_stub, {"labs": searchset([ANC]), "vitals": None}))
    assert result.keys["patient"].resources == (PATIENT,) and result.keys["patient"].origin == "fhir"
    assert result.keys["conditions"].state is KeyState.EMPTY and result.keys["conditions"].origin == "fhir"
    assert result.keys["vitals"].state is KeyState.EMPTY


# --- who may be called, with what --------------------------------------------------------------------------------


def test_prefetch_sends_bearer_token_when_authorized(fhir_stub: FhirStub,
                                                     resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    resolve(make_request(fhir_stub))
    assert len(fhir_stub.requests) == 4
    assert {r.authorization for r in fhir_stub.requests} == {f"Bearer {TOKEN}"}


def test_prefetch_token_without_expires_in_is_used_while_the_request_lasts(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    # Real clients leave expires_in out (the spec digest's pitfall 6): the token is still good for this request.
    serve_all(fhir_stub)
    request = make_request(fhir_stub)
    assert request.fhir_authorization is not None
    request = replace(request, fhir_authorization=replace(request.fhir_authorization, expires_in=None))
    assert resolve(request).unavailable() == {}
    assert {r.authorization for r in fhir_stub.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize("allow_anonymous", (False, True), ids=("anonymous-off", "anonymous-on"))
def test_prefetch_authorization_without_access_token_fetches_nothing(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult], allow_anonymous: bool) -> None:
    # A token was meant to be sent: calling the server anonymously instead is not what the client asked for.
    serve_all(fhir_stub)
    request = make_request(fhir_stub)
    request = replace(request, fhir_authorization=FhirAuthorization(expires_in=300))
    missing = required_412(resolve, request, allow_anonymous=allow_anonymous)
    assert missing == {"labs": "fhirAuthorization has no access_token", "vitals": "fhirAuthorization has no access_token"}
    assert fhir_stub.requests == []


@pytest.mark.parametrize("token", ("tok\u2028en", "tok\u20acen", "tok\nen", "tok en"),
                         ids=("line-separator", "euro", "newline", "space"))
def test_prefetch_token_no_header_can_carry_fetches_nothing(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult],
                                                            caplog: pytest.LogCaptureFixture, token: str) -> None:
    # A token beyond Latin-1 raised UnicodeEncodeError inside http.client: a traceback logged for every key and a
    # 412 saying "fetch failed unexpectedly"; CR/LF read as "the FHIR server could not be reached".
    serve_all(fhir_stub)
    missing = required_412(resolve, make_request(fhir_stub, token=token))
    assert set(missing.values()) == {"fhirAuthorization.access_token cannot be sent in an Authorization header "
                                     "(visible ASCII only)"}
    assert fhir_stub.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(("labs", "diagnostics"), (
    (ABSENT, "prefetch key 'labs' was not provided and could not be fetched: no fhirServer in the request"),
    (operation_outcome("lab system down"),
     "prefetch key 'labs' was sent but cannot be used: the client sent an OperationOutcome: lab system down"),
    ("Observation/anc1", "prefetch key 'labs' was sent but cannot be used: prefetch.labs is not a FHIR resource"),
), ids=("absent", "operation-outcome", "not-a-resource"))
def test_412_says_whether_the_key_was_sent(resolve: Callable[..., PrefetchResult], labs: Any,
                                           diagnostics: str) -> None:
    # An integrator reading "was not provided" about a key its EHR did send looks for the wrong bug.
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "labs"}
    if labs is not ABSENT:
        prefetch["labs"] = labs
    with pytest.raises(PreconditionFailed) as raised:
        resolve(make_request(None, prefetch))
    assert [i["diagnostics"] for i in raised.value.to_outcome()["issue"]] == [diagnostics]


def test_prefetch_anonymous_fetch_sends_no_authorization(fhir_stub: FhirStub,
                                                         resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    result = resolve(make_request(fhir_stub, token=None), allow_anonymous=True)
    assert all(r.state is KeyState.DATA for r in result.keys.values())
    assert len(fhir_stub.requests) == 4 and {r.authorization for r in fhir_stub.requests} == {None}


def required_412(resolve: Callable[..., PrefetchResult], request: HookRequest, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(PreconditionFailed) as raised:
        resolve(request, **kwargs)
    assert raised.value.status_code == 412
    return raised.value.missing


@pytest.mark.parametrize(
    ("request_kwargs", "policy", "reason_part"),
    (
        (dict(token=None), {}, "anonymous FHIR access is not allowed"),
        (dict(expires_in=0), {}, "expired"),
        (dict(fhir_server=""), {}, "no fhirServer"),
        (dict(), dict(allowed_bases=()), "disabled"),
        (dict(), dict(allowed_bases=("https://ehr.example/fhir",)), "not on the allowlist"),
        (dict(), dict(allowed_bases=("http://127.0.0.1",)), "not on the allowlist"),
        (dict(), dict(allowed_bases=("http://localhost:*",)), "not on the allowlist"),
        (dict(), dict(allowed_bases=("https://127.0.0.1:*",)), "not on the allowlist"),
    ),
    ids=("no-authorization", "token-expired", "no-fhir-server", "fetch-disabled", "other-host", "default-port-only",
         "localhost-is-not-127", "other-scheme"),
)
def test_prefetch_refused_fetch_is_412_without_any_request(fhir_stub: FhirStub,
                                                           resolve: Callable[..., PrefetchResult],
                                                           request_kwargs: dict[str, Any], policy: dict[str, Any],
                                                           reason_part: str) -> None:
    serve_all(fhir_stub)
    missing = required_412(resolve, make_request(fhir_stub, **request_kwargs), **policy)
    assert set(missing) == {"labs", "vitals"}
    assert all(reason_part in reason for reason in missing.values())
    assert fhir_stub.requests == []


def test_prefetch_lookalike_path_not_allowlisted(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    request = make_request(fhir_stub, fhir_server=fhir_stub.url("/fhir-evil"))
    assert required_412(resolve, request)["labs"] == "fhirServer not on the allowlist"
    assert fhir_stub.requests == []


@pytest.mark.parametrize("allowed", ("/fhir", "", "/fhir/"), ids=("exact", "origin-only", "trailing-slash"))
def test_prefetch_allowlisted_base_forms(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult],
                                         allowed: str) -> None:
    serve_all(fhir_stub)
    result = resolve(make_request(fhir_stub), allowed_bases=(fhir_stub.url(allowed),))
    assert result.unavailable() == {}


def test_prefetch_any_port_allowlist_entry(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    assert resolve(make_request(fhir_stub), allowed_bases=("http://127.0.0.1:*",)).unavailable() == {}


def test_prefetch_token_expired_by_the_clock_is_not_used(fhir_stub: FhirStub,
                                                         resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    received_at = time.monotonic() - 301
    missing = required_412(resolve, make_request(fhir_stub, expires_in=300), received_at=received_at)
    assert "expired" in missing["labs"]
    assert fhir_stub.requests == []


def test_prefetch_token_expiry_bounds_the_fetch(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub, delay=3.0)
    started = time.monotonic()
    prefetch = {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"}
    result = resolve(make_request(fhir_stub, prefetch, expires_in=1), deadline_seconds=2.0)
    assert time.monotonic() - started < 1.4
    assert result.unavailable() == {"conditions": "timed out"}


def test_prefetch_template_token_without_value(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    request = make_request(fhir_stub, {"labs": searchset([ANC]), "vitals": None},
                           context={"userId": "Practitioner/1"})
    assert resolve(request).unavailable() == {"patient": "template token has no value",
                                              "conditions": "template token has no value"}
    assert fhir_stub.requests == []


@pytest.mark.parametrize("patient_id", ("../Practitioner/1", "%2e%2e/Practitioner/1", "1 2", "a\\b"),
                         ids=("dot-dot", "encoded-dot-dot", "space", "backslash"))
def test_prefetch_filled_template_must_stay_under_the_base(fhir_stub: FhirStub,
                                                           resolve: Callable[..., PrefetchResult],
                                                           patient_id: str) -> None:
    request = make_request(fhir_stub, {"labs": None, "vitals": None, "conditions": None},
                           context={"userId": "Practitioner/1", "patientId": patient_id})
    assert "not a relative FHIR URL" in resolve(request).unavailable()["patient"]
    assert fhir_stub.requests == []


# --- parallelism and the deadline ---------------------------------------------------------------------------------


def test_prefetch_fetches_missing_keys_in_parallel(fhir_stub: FhirStub,
                                                   resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub, delay=0.5)
    started = time.monotonic()
    result = resolve(make_request(fhir_stub, {"patient": PATIENT}))
    elapsed = time.monotonic() - started
    assert all(r.state is KeyState.DATA for r in result.keys.values())
    assert len(fhir_stub.requests) == 3
    assert elapsed < 1.0


@pytest.mark.parametrize("required", (False, True), ids=("optional-key", "required-key"))
def test_prefetch_deadline_returns_promptly(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult],
                                            required: bool) -> None:
    serve_all(fhir_stub)
    fhir_stub.add("/fhir/Observation", searchset([ANC]), query=LABS_QUERY, delay=5.0)
    fhir_stub.add("/fhir/Condition", searchset([CONDITION]), query=CONDITIONS_QUERY, delay=5.0)
    prefetch = {"patient": PATIENT, "vitals": None}
    if not required:
        prefetch["labs"] = searchset([ANC])
    started = time.monotonic()
    if required:
        missing = required_412(resolve, make_request(fhir_stub, prefetch), deadline_seconds=0.5)
        assert missing == {"labs": "timed out"}
    else:
        result = resolve(make_request(fhir_stub, prefetch), deadline_seconds=0.5)
        assert result.unavailable() == {"conditions": "timed out"}
    assert time.monotonic() - started < 0.7


def test_prefetch_deadline_already_passed_makes_no_request(fhir_stub: FhirStub,
                                                           resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub)
    request = make_request(fhir_stub, {"labs": None, "vitals": None})
    result = resolve(request, received_at=time.monotonic() - 10)
    assert result.unavailable() == {"patient": "timed out", "conditions": "timed out"}
    assert fhir_stub.requests == []


def test_prefetch_abandoned_fetch_threads_do_not_pile_up(fhir_stub: FhirStub,
                                                         resolve: Callable[..., PrefetchResult]) -> None:
    serve_all(fhir_stub, delay=5.0)
    for _ in range(5):
        resolve(make_request(fhir_stub, {"labs": None, "vitals": None}), deadline_seconds=0.2)
    give_up = time.monotonic() + 3
    while any(t.name.startswith("cds-prefetch") for t in threading.enumerate()) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert not any(t.name.startswith("cds-prefetch") for t in threading.enumerate())


# --- FHIR failures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason_part"),
    (
        (dict(status=401), "HTTP 401"),
        (dict(status=403), "HTTP 403"),
        (dict(status=404), "HTTP 404"),
        (dict(status=500), "HTTP 500"),
        (dict(body=b"not json"), "not JSON"),
        (dict(body={"resourceType": "Patient", "id": "123"}), "expected Bundle"),
        (dict(body=operation_outcome("search failed")), "search failed"),
        (dict(body=searchset([CONDITION]), pad_to=200_000), "larger than"),
    ),
    ids=("401", "403", "404", "500", "non-json", "wrong-resource-type", "operation-outcome-body", "oversized"),
)
def test_prefetch_fetch_failure_is_unavailable_with_reason(fhir_stub: FhirStub,
                                                           resolve: Callable[..., PrefetchResult],
                                                           fault: dict[str, Any], reason_part: str) -> None:
    fhir_stub.add("/fhir/Condition", query=CONDITIONS_QUERY, **fault)
    request = make_request(fhir_stub, {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"})
    result = resolve(request, max_page_bytes=100_000).keys["conditions"]
    assert result.state is KeyState.UNAVAILABLE and result.origin == "fhir"
    assert reason_part in (result.reason or "")
    assert len(fhir_stub.requests) == 1


@pytest.mark.parametrize("status", (401, 403, 500), ids=("401", "403", "500"))
def test_prefetch_fetch_failure_on_required_key_is_412(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult],
                                                       status: int) -> None:
    serve_all(fhir_stub)
    fhir_stub.add("/fhir/Observation", query=VITALS_QUERY, status=status)
    missing = required_412(resolve, make_request(fhir_stub, {"labs": searchset([ANC])}))
    assert list(missing) == ["vitals"] and f"HTTP {status}" in missing["vitals"]


def test_prefetch_fetched_empty_page_with_a_total_on_required_key_is_412(
        fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult]) -> None:
    # As for a prefetched Bundle: the server says 3 results match and sends none, which is not "no data".
    serve_all(fhir_stub)
    fhir_stub.add("/fhir/Observation", query=VITALS_QUERY, body={**searchset([]), "total": 3})
    missing = required_412(resolve, make_request(fhir_stub, {"labs": searchset([ANC])}))
    assert list(missing) == ["vitals"] and "its total is 3 but no page holds a resource" in missing["vitals"]


def test_prefetch_fetch_limits_come_from_the_policy(fhir_stub: FhirStub,
                                                    resolve: Callable[..., PrefetchResult]) -> None:
    for page in range(1, 4):
        path = "/fhir/Condition" if page == 1 else f"/fhir/Condition/p{page}"
        nxt = fhir_stub.url(f"/fhir/Condition/p{page + 1}") if page < 3 else None
        fhir_stub.add(path, searchset([{**CONDITION, "id": f"c{page}"}], next_url=nxt))
    request = make_request(fhir_stub, {k: v for k, v in FULL_PREFETCH.items() if k != "conditions"})
    result = resolve(request, max_pages=2)
    assert [r["id"] for r in result.keys["conditions"].resources] == ["c1", "c2"]
    assert result.incomplete() == {"conditions": "stopped at the limit of 2 pages"}
    assert len(fhir_stub.requests) == 2


# --- result shape ----------------------------------------------------------------------------------------------


def test_prefetch_unknown_keys_are_kept_but_never_fetched(fhir_stub: FhirStub,
                                                          resolve: Callable[..., PrefetchResult]) -> None:
    extra = searchset([ANC, {**ANC, "id": "anc9"}], next_url=fhir_stub.url("/fhir/Observation/p2"))
    fhir_stub.add("/fhir/Observation/p2", searchset([{**ANC, "id": "never"}]))
    result = resolve(make_request(fhir_stub, {**FULL_PREFETCH, "extra": extra, "nothing": None}))
    assert list(result.keys) == ["patient", "labs", "vitals", "conditions", "extra", "nothing"]
    assert result.keys["extra"].state is KeyState.DATA and "not a template key" in (result.keys["extra"].reason or "")
    assert result.keys["nothing"].state is KeyState.EMPTY
    # anc1 arrives under "labs" and "extra": once in resources().
    assert [r["id"] for r in result.resources()] == ["123", "anc1", "temp1", "c1", "anc9"]
    assert fhir_stub.requests == []


def test_prefetch_unknown_key_empty_page_with_a_next_link_is_unavailable(
        resolve: Callable[..., PrefetchResult]) -> None:
    extra = searchset([], next_url="https://ehr.example.org/fhir/Observation?page=2")
    result = resolve(make_request(None, {**FULL_PREFETCH, "extra": extra}))
    assert result.unavailable() == {"extra": "its first page holds no resources and its next link was not followed "
                                             "(not a template key)"}


def test_prefetch_dropped_entries_are_counted(resolve: Callable[..., PrefetchResult]) -> None:
    labs = searchset([ANC])
    labs["entry"] += [{"fullUrl": "urn:x"}, 42]
    result = resolve(make_request(None, {**FULL_PREFETCH, "labs": labs}))
    assert result.dropped_entries == 2 and result.keys["labs"].dropped_entries == 2
    assert result.keys["labs"].resources == (ANC,)
    assert result.incomplete() == {"labs": "2 Bundle entries without a resource were dropped"}


def test_prefetch_resources_without_id_are_all_kept(resolve: Callable[..., PrefetchResult]) -> None:
    anonymous = {"resourceType": "Observation", "status": "final"}
    result = resolve(make_request(None, {**FULL_PREFETCH, "labs": searchset([anonymous, anonymous])}))
    assert sum(1 for r in result.resources() if r == anonymous) == 2


def test_prefetch_keeps_every_version_of_a_resource(resolve: Callable[..., PrefetchResult]) -> None:
    # Regression: resources() kept the first copy of each (resourceType, id) and dropped the rest, so when a
    # client sent two versions of one Observation, their order in the prefetch chose the value the engine saw
    # (meta.versionId never reached it). Only identical copies are merged now.
    old = {**ANC, "meta": {"versionId": "1"}, "valueQuantity": {"value": 3000}}
    new = {**ANC, "meta": {"versionId": "2"}, "valueQuantity": {"value": 400}}
    result = resolve(make_request(None, {**FULL_PREFETCH, "labs": searchset([new, old]), "vitals": searchset([new])}))
    assert [r for r in result.resources() if r["id"] == "anc1"] == [new, old]


def test_prefetch_merges_identical_copies_whatever_their_key_order(resolve: Callable[..., PrefetchResult]) -> None:
    reordered = dict(reversed(list(ANC.items())))
    result = resolve(make_request(None, {**FULL_PREFETCH, "labs": searchset([ANC]), "vitals": searchset([reordered])}))
    assert [r for r in result.resources() if r["id"] == "anc1"] == [ANC]


@pytest.mark.parametrize(
    ("first", "second"),
    [(None, float("inf")), (None, float("-inf")), (None, float("nan")), (float("inf"), float("-inf")), (1, 1.0),
     (1, True), (0, False), ("1", 1)],
    ids=["null-infinity", "null-minus-infinity", "null-nan", "infinity-minus-infinity", "integer-decimal",
         "one-true", "zero-false", "string-number"],
)
def test_prefetch_keeps_copies_that_differ_only_in_how_a_value_is_written(first: object, second: object) -> None:
    # orjson writes NaN and the infinities as null: a copy whose value overflowed ("1e999", read by the standard
    # library's fallback parser) was merged with one whose value is null, and one version was dropped unseen.
    copies = tuple({**ANC, "valueQuantity": {"value": value}} for value in (first, second))
    result = PrefetchResult(MappingProxyType({"labs": KeyResult("labs", KeyState.DATA, copies)}))
    assert len(list(result.resources())) == 2


def _nested(depth: int, leaf: object) -> object:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [(_nested(1000, 1), _nested(1000, 1), 1), (_nested(1000, 1), _nested(1000, 2), 2),
     (_nested(1000, float("nan")), _nested(1000, None), 2), (_nested(5000, "x"), _nested(5000, "x"), 1)],
    ids=["equal-1000-deep", "different-1000-deep", "nan-null-1000-deep", "equal-5000-deep"],
)
def test_prefetch_compares_copies_nested_as_deep_as_the_parser_reads(first: object, second: object,
                                                                     kept: int) -> None:
    # orjson reads JSON nested up to 1024 levels, but the standard library's writer recurses on the C stack and
    # raised RecursionError near 1000: two copies of one deeply nested Observation in a prefetch were a 500.
    copies = tuple({**ANC, "extension": [{"url": "https://x.example/e", "valueString": "s", "x": value}]}
                   for value in (first, second))
    result = PrefetchResult(MappingProxyType({"labs": KeyResult("labs", KeyState.DATA, copies)}))
    assert len(list(result.resources())) == kept


@pytest.mark.parametrize("value", [
    {"b": [1, 2.5, None, True], "a": {"d": "é\u2028\ud800", "c": 10 ** 40}}, [], {}, float("inf"), float("-inf"),
    float("nan"), -0.0, "x", [[{"k": []}, {}]], {"z": 1, "": 2, "é": 3, "Z": 4},
], ids=["mixed", "empty-list", "empty-object", "infinity", "minus-infinity", "nan", "minus-zero", "string",
        "nested-empties", "key-order"])
def test_prefetch_deep_canonical_writer_writes_what_the_standard_library_writes(value: object) -> None:
    # The writer used past the recursion limit must give the very bytes json.dumps gives: a copy digested by one
    # and an identical copy digested by the other are still one resource.
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    assert prefetch_module._canonical_json(value) == expected


def test_prefetch_keeps_thousands_of_versions_of_one_id_in_linear_time() -> None:
    # Regression: each copy was compared with every earlier copy of its id; 8,000 versions of one Observation
    # (a hostile or broken client, well under the body limit) took 3.5 s before any rule ran, 25,000 half a
    # minute. Counted, not timed: equality is never used now.
    versions = tuple({**ANC, "valueQuantity": {"value": n}} for n in range(5000))
    result = PrefetchResult(MappingProxyType({"labs": KeyResult("labs", KeyState.DATA, versions + versions)}))
    with mock.patch.object(prefetch_module, "_digest", wraps=prefetch_module._digest) as digest:
        assert list(result.resources()) == list(versions)
    assert digest.call_count == 10000  # one per copy after the first, and the first once


def test_prefetch_resources_with_distinct_ids_are_not_serialised() -> None:
    distinct = tuple({**ANC, "id": f"anc-{n}"} for n in range(100))
    result = PrefetchResult(MappingProxyType({"labs": KeyResult("labs", KeyState.DATA, distinct)}))
    with mock.patch.object(prefetch_module, "_digest", wraps=prefetch_module._digest) as digest:
        assert list(result.resources()) == list(distinct)
    assert digest.call_count == 0


@pytest.mark.parametrize("reference", ["Patient/456", "https://ehr.example.org/fhir/Patient/456",
                                       "Patient/456/_history/2"], ids=["relative", "absolute", "versioned"])
def test_prefetch_drops_resources_about_another_patient(resolve: Callable[..., PrefetchResult],
                                                        reference: str) -> None:
    # Regression: resources are classified by content, and nothing checked whose they were; an Observation with
    # subject Patient/456 in a call for patient 123 was graded as 123's ANC, silently.
    other = {**ANC, "id": "anc-456", "subject": {"reference": reference}}
    mine = {**ANC, "subject": {"reference": "https://ehr.example.org/fhir/Patient/123/_history/1"}}
    unnamed = {**ANC, "id": "anc-no-subject"}
    prefetch = {**FULL_PREFETCH, "patient": {"resourceType": "Patient", "id": "456"},
                "labs": searchset([other, mine, unnamed]),
                "vitals": searchset([{**TEMP, "subject": {"reference": reference}}])}
    result = resolve(make_request(None, prefetch))
    assert [r["id"] for r in result.resources()] == ["anc1", "anc-no-subject", "c1"]
    assert result.keys["vitals"].state is KeyState.EMPTY and result.keys["patient"].state is KeyState.EMPTY
    assert result.incomplete() == {key: "1 resource(s) about another patient than context.patientId were dropped"
                                   for key in ("patient", "labs", "vitals")}
    assert "456" not in json.dumps(result.incomplete())


def test_prefetch_token_never_in_logs_reasons_or_412(fhir_stub: FhirStub, resolve: Callable[..., PrefetchResult],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fhir_stub.add("/fhir/Patient/123", operation_outcome(f"bad token {TOKEN}"))
    fhir_stub.add("/fhir/Observation", query=LABS_QUERY, status=401)
    fhir_stub.add("/fhir/Observation", query=VITALS_QUERY, delay=5.0)
    request = make_request(fhir_stub, {"conditions": operation_outcome(f"client echo {TOKEN}")})
    with pytest.raises(PreconditionFailed) as raised:
        resolve(request, deadline_seconds=0.5)
    assert TOKEN not in json.dumps(raised.value.to_outcome()) and TOKEN not in str(raised.value)
    assert TOKEN not in json.dumps(raised.value.missing)
    assert caplog.records and TOKEN not in caplog.text
    result = resolve(make_request(fhir_stub, {"labs": None, "vitals": None,
                                              "conditions": operation_outcome(f"client echo {TOKEN}")}))
    assert "[redacted]" in result.unavailable()["patient"] and "[redacted]" in result.unavailable()["conditions"]
    assert all(TOKEN not in (r.reason or "") for r in result.keys.values())


# --- the policy --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "fhir_server", "allows"),
    (
        ("https://ehr.example", "https://ehr.example", True),
        ("https://ehr.example", "https://ehr.example/fhir/r4", True),
        ("https://ehr.example", "https://ehr.example.evil.com", False),
        ("https://ehr.example", "https://ehr.example:8443", False),
        ("https://ehr.example", "http://ehr.example", False),
        ("https://ehr.example:443", "https://EHR.EXAMPLE/fhir", True),
        ("https://ehr.example/fhir", "https://ehr.example/fhir", True),
        ("https://ehr.example/fhir/", "https://ehr.example/fhir/r4", True),
        ("https://ehr.example/fhir", "https://ehr.example/fhirx", False),
        ("https://ehr.example/fhir", "https://ehr.example/", False),
        ("https://ehr.example/fhir", "https://ehr.example/fhir/../admin", False),
        ("https://ehr.example/fhir", "https://ehr.example/fhir/%2e%2e/admin", False),
        ("https://ehr.example", "https://evil.com@ehr.example", False),
        ("https://ehr.example", "https://ehr.example@evil.com", False),
        ("https://ehr.example", "https://ehr.example?x=1", False),
        ("https://ehr.example", "https://ehr.example\\@evil.com", False),
        ("http://127.0.0.1:*", "http://127.0.0.1:8081/fhir", True),
        ("http://127.0.0.1", "http://127.0.0.1:8081/fhir", False),
        ("https://ehr.example", "ehr.example", False),
        ("http://127.0.0.1:*", "http://127.0.0.1:*/fhir", False),
        ("https://ehr.example", "https://ehr.exa\tmple/fhir", False),
        ("https://ehr.example/fhir", "https://ehr.example/fhir\n", False),
        ("https://ehr.example/fhir", "https://ehr.example/fhir/r4\u200b", False),
        ("https://ehr.example", "https://[::1/fhir", False),
        ("https://ehr.example/fhir", "https://ehr.example/fhir?", False),
        ("https://ehr.example/fhir", "https://ehr.example/fhir#", False),
    ),
    ids=("origin", "path-under-origin", "lookalike-host", "other-port", "other-scheme", "default-port-and-case",
         "exact-path", "trailing-slash", "lookalike-path", "parent-path", "dot-dot", "encoded-dot-dot",
         "userinfo", "userinfo-host", "query", "backslash", "any-port", "no-port-means-default", "not-a-url",
         "wildcard-port-only-in-the-policy", "tab-in-host", "newline-after-path", "invisible-character",
         "unclosed-ipv6-bracket", "empty-query", "empty-fragment"),
)
def test_fetch_policy_allows(allowed: str, fhir_server: str, allows: bool) -> None:
    assert FetchPolicy(allowed_bases=(allowed,)).allows(fhir_server) is allows


_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@given(host=st.lists(_LABEL, min_size=1, max_size=3).map(".".join), extra=_LABEL,
       joiner=st.sampled_from([".", "-", "", "_"]))
def test_fetch_policy_never_matches_a_host_extending_the_allowed_one(host: str, extra: str, joiner: str) -> None:
    policy = FetchPolicy(allowed_bases=(f"https://{host}/fhir",))
    assert policy.allows(f"https://{host}/fhir/r4")
    assert not policy.allows(f"https://{host}{joiner}{extra}/fhir")
    assert not policy.allows(f"https://{host}/fhir{joiner}{extra}")


@pytest.mark.parametrize(
    "kwargs",
    (
        dict(allowed_bases="https://ehr.example"),
        dict(allowed_bases=("ftp://ehr.example",)),
        dict(allowed_bases=("https://ehr.example?x=1",)),
        dict(allowed_bases=("ehr.example",)),
        dict(deadline_seconds=0),
        dict(max_pages=0),
        dict(max_resources=-1),
        dict(max_page_bytes=True),
    ),
    ids=("string-not-tuple", "ftp", "query", "no-scheme", "zero-deadline", "zero-pages", "negative-resources",
         "bool-bytes"),
)
def test_fetch_policy_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FetchPolicy(**kwargs)


def test_fetch_policy_names_a_bare_string_and_is_immutable() -> None:
    # A bare string would be read one character at a time; the policy is shared by every request thread.
    with pytest.raises(ValueError, match="must be a tuple of URLs, not a string"):
        FetchPolicy(allowed_bases="https://ehr.example")  # type: ignore[arg-type]
    policy = FetchPolicy(allowed_bases=("https://ehr.example",))
    with pytest.raises(FrozenInstanceError):
        policy.allowed_bases = ("https://evil.example",)  # type: ignore[misc]


def test_default_fetcher_is_one_pool_for_the_process() -> None:
    fetcher = prefetch_module.default_fetcher()
    assert isinstance(fetcher, FhirFetcher) and prefetch_module.default_fetcher() is fetcher


def test_fetch_policy_defaults() -> None:
    policy = FetchPolicy()
    assert (policy.allowed_bases, policy.deadline_seconds, policy.max_pages, policy.max_resources,
            policy.max_page_bytes, policy.allow_anonymous, policy.operation_outcome_refetch) == (
        (), 2.0, 10, 5000, 8 * 1024 * 1024, False, False)


# --- following references ---------------------------------------------------------------------------------------

FOLLOW_DEFINITION = ServiceDefinition(
    id="test-service", hook="patient-view", description="test", handler=_handler,
    prefetch={**DEFINITION.prefetch, "medications": "MedicationRequest?patient={{context.patientId}}"},
    required_prefetch=DEFINITION.required_prefetch,
    follow_references={"medications": {"medicationReference": "Medication"}, "labs": {"hasMember": "Observation"}},
)
MEDICATIONS_QUERY = {"patient": "123"}
BASE = "https://ehr.example/fhir"


def order(target: str, order_id: str = "o1") -> dict[str, Any]:
    """A MedicationRequest naming its medicine by ``target``."""
    return {"resourceType": "MedicationRequest", "id": order_id, "status": "active",
            "medicationReference": {"reference": target}}


def medication(medication_id: str) -> dict[str, Any]:
    return {"resourceType": "Medication", "id": medication_id, "code": {"text": medication_id}}


@pytest.mark.parametrize(
    ("references", "fhir_server", "ids", "elsewhere", "invalid"),
    (
        (["Medication/m1"], BASE, {"m1"}, set(), 0),
        (["Medication/m1/_history/3"], BASE, {"m1"}, set(), 0),
        ([f"{BASE}/Medication/m1"], BASE, {"m1"}, set(), 0),
        ([f"{BASE}/Medication/m1/_history/2"], BASE, {"m1"}, set(), 0),
        (["https://EHR.example:443/fhir/Medication/m1"], BASE, {"m1"}, set(), 0),
        (["#m1"], BASE, set(), set(), 0),
        (["Substance/s1", f"{BASE}/Patient/123"], BASE, set(), set(), 0),
        (["https://other.example/fhir/Medication/m1"], BASE, set(), {"m1"}, 0),
        (["https://ehr.example/fhir2/Medication/m1"], BASE, set(), {"m1"}, 0),
        (["http://ehr.example/fhir/Medication/m1"], BASE, set(), {"m1"}, 0),
        ([f"{BASE}/Medication/m1"], None, set(), {"m1"}, 0),
        (["Medication/m1"], None, {"m1"}, set(), 0),
        (["Medication/a,b", "Medication/a b", "Medication/" + "x" * 65], BASE, set(), set(), 3),
        (["Medication/m1", " Medication/m1 ", f"{BASE}/Medication/m1", "Medication/m2"], BASE, {"m1", "m2"}, set(),
         0),
        # Regression: "Medication/" named a Medication and was skipped without a word (its order silently unknown).
        (["Medication/", "Medication", f"{BASE}/Medication/", "Medication/_history/1"], BASE, set(), set(), 4),
        (["", " ", "#"], BASE, set(), set(), 0),
        # Regression: a server part urlsplit refuses (an unclosed IPv6 bracket, a netloc that NFKC-normalises to
        # a delimiter) raised ValueError out of resolve_prefetch: a 500, no card at all.
        (["https://[ehr.example/fhir/Medication/m1", "https://ehr\uff03.example/fhir/Medication/m2"], BASE, set(),
         {"m1", "m2"}, 0),
        # Regression: the other server's m1 was hidden behind fhirServer's m1 (no note), and the order naming it
        # was given the codes of fhirServer's Medication/m1, read for the other order.
        (["Medication/m1", "https://other.example/fhir/Medication/m1"], BASE, {"m1"}, {"m1"}, 0),
    ),
    ids=("relative", "relative-versioned", "absolute-under-fhirServer", "absolute-versioned",
         "absolute-default-port-and-case", "contained", "other-types", "other-server", "lookalike-path",
         "other-scheme", "absolute-without-fhirServer", "relative-without-fhirServer", "ids-not-fhir-ids",
         "repeats-once", "no-id-is-not-a-fhir-id", "empty-reference", "server-not-a-url",
         "same-id-on-another-server"),
)
def test_collect_references(references: list[str], fhir_server: str | None, ids: set[str], elsewhere: set[str],
                            invalid: int) -> None:
    resources = [order(reference, f"o{n}") for n, reference in enumerate(references)]
    found = prefetch_module.collect_references(resources, "medicationReference", "Medication", fhir_server)
    assert (found.ids, found.elsewhere, found.invalid) == (ids, elsewhere, invalid)


@pytest.mark.parametrize(
    "value",
    ([{"reference": "Medication/m1"}, {"display": "no reference"}, "Medication/m2", {"reference": 7}],
     {"reference": "Medication/m1"}),
    ids=("list-of-references", "one-reference"),
)
def test_collect_references_reads_one_or_many(value: Any) -> None:
    resources = [{"resourceType": "MedicationRequest", "medicationReference": value}, {"resourceType": "Patient"}]
    found = prefetch_module.collect_references(resources, "medicationReference", "Medication", BASE)
    assert (found.ids, found.elsewhere, found.invalid) == ({"m1"}, set(), 0)


@pytest.fixture
def follow(fhir_stub: FhirStub, fetcher: FhirFetcher) -> Callable[..., PrefetchResult]:
    """resolve_prefetch of FOLLOW_DEFINITION, the stub allowlisted."""

    def run(request: HookRequest, **policy: Any) -> PrefetchResult:
        policy.setdefault("allowed_bases", (fhir_stub.url("/fhir"),))
        return resolve_prefetch(FOLLOW_DEFINITION, request, policy=FetchPolicy(**policy),
                                received_at=time.monotonic(), fetcher=fetcher)

    return run


def with_orders(*orders: Mapping[str, Any], **keys: Any) -> dict[str, Any]:
    return {**FULL_PREFETCH, "medications": searchset(orders), **keys}


def medication_searches(stub: FhirStub) -> list[tuple[str, ...]]:
    return [r.params.get("_id", ()) for r in stub.requests_for("/fhir/Medication")]


def test_follow_fetches_the_targets_into_their_key(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1"), medication("m2")]), query={"_id": "m1,m2"})
    orders = (order("Medication/m2", "o1"), order(fhir_stub.url("/fhir/Medication/m1/_history/4"), "o2"),
              order("Medication/m1", "o3"))
    result = follow(make_request(fhir_stub, with_orders(*orders)))
    key = result.keys["medications"]
    assert key.state is KeyState.DATA and key.reason is None and key.origin == "prefetch"
    assert key.resources == (*orders, medication("m1"), medication("m2"))
    assert result.incomplete() == {} and result.unavailable() == {}
    assert [(r.path, r.authorization) for r in fhir_stub.requests] == [("/fhir/Medication", f"Bearer {TOKEN}")]


@pytest.mark.parametrize(
    ("held", "asked"),
    (
        ({"extra": medication("m1")}, [("m2",)]),
        ({"extra": searchset([medication("m1"), medication("m2")])}, []),
        ({"conditions": searchset([CONDITION, medication("m2")])}, [("m1",)]),
        ({"medications": searchset([order("Medication/m1"), order("Medication/m2", "o2"), medication("m2")])},
         [("m1",)]),
    ),
    ids=("one-under-an-unknown-key", "all-under-an-unknown-key", "one-under-another-template-key",
         "one-beside-its-order"),
)
def test_follow_skips_targets_already_held(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult],
                                           held: dict[str, Any], asked: list[tuple[str, ...]]) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1"), medication("m2")]))
    prefetch = {**with_orders(order("Medication/m1"), order("Medication/m2", "o2")), **held}
    result = follow(make_request(fhir_stub, prefetch))
    assert medication_searches(fhir_stub) == asked
    assert result.incomplete() == {}
    assert sorted(r["id"] for r in result.resources() if r["resourceType"] == "Medication") == ["m1", "m2"]


def test_follow_searches_in_chunks_of_fifty_in_parallel(fhir_stub: FhirStub,
                                                        follow: Callable[..., PrefetchResult]) -> None:
    ids = [f"m{n:03d}" for n in range(120)]
    fhir_stub.add("/fhir/Medication", searchset([medication(i) for i in ids]), delay=0.4)
    started = time.monotonic()
    result = follow(make_request(fhir_stub, with_orders(*(order(f"Medication/{i}", f"o{i}") for i in ids))))
    assert time.monotonic() - started < 1.0  # three searches of 0.4 s each, side by side
    assert sorted(medication_searches(fhir_stub)) == [
        (",".join(ids[:50]),), (",".join(ids[50:100]),), (",".join(ids[100:]),)]
    assert sorted(r["id"] for r in result.keys["medications"].resources if r["resourceType"] == "Medication") == ids
    assert result.incomplete() == {}


def test_follow_keeps_only_what_was_asked_for(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult]) -> None:
    # The resources of the wrong type come first: the first one found for (type, id) is kept.
    fhir_stub.add("/fhir/Medication", searchset([{**ANC, "id": "m1"}, {"resourceType": "Substance", "id": "m1"},
                                                 {**medication("m1"), "id": 1}, medication("m9"), medication("m1")]))
    result = follow(make_request(fhir_stub, with_orders(order("Medication/m1"))))
    assert result.keys["medications"].resources == (order("Medication/m1"), medication("m1"))


def test_follow_reads_every_page_of_a_search(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")], next_url=fhir_stub.url("/fhir/Medication/p2")))
    fhir_stub.add("/fhir/Medication/p2", searchset([medication("m2")]))
    result = follow(make_request(fhir_stub, with_orders(order("Medication/m1"), order("Medication/m2", "o2"))))
    assert [r["id"] for r in result.keys["medications"].resources[2:]] == ["m1", "m2"]
    assert result.incomplete() == {}


def test_follow_after_fetching_the_key_itself(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/MedicationRequest", searchset([order("Medication/m1")]), query=MEDICATIONS_QUERY)
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]), query={"_id": "m1"})
    result = follow(make_request(fhir_stub, FULL_PREFETCH))
    key = result.keys["medications"]
    assert key.origin == "fhir" and key.resources == (order("Medication/m1"), medication("m1"))
    assert [r.path for r in fhir_stub.requests] == ["/fhir/MedicationRequest", "/fhir/Medication"]


WHY = "1 Medication(s) named by medicationReference could not be obtained: "


@pytest.mark.parametrize(
    ("route", "reason"),
    (
        (dict(status=500, body=operation_outcome("down")), "2 ...: the FHIR server failed (HTTP 500)"),
        (dict(status=401), "2 ...: the FHIR server refused access (HTTP 401)"),
        (dict(body=operation_outcome("too costly")),
         "2 ...: the FHIR server returned an OperationOutcome: too costly"),
        (dict(body=b"{not json"), "2 ...: the FHIR server's response is not JSON"),
        (dict(body=searchset([])), "2 ...: the FHIR server did not return them"),
        (dict(body=searchset([medication("m1")])), "1 ...: the FHIR server did not return them"),
        (dict(body=searchset([medication("m1")], next_url="http://127.0.0.1:9/fhir/Medication?page=2")),
         "1 ...: a next link to another origin was not followed"),
        (dict(body=searchset([medication("m1"), medication("m2")]), delay=2.0), "2 ...: timed out"),
    ),
    ids=("500", "401", "operation-outcome", "not-json", "none-found", "one-found", "next-page-elsewhere",
         "too-slow"),
)
def test_follow_failure_leaves_the_key_usable_and_incomplete(fhir_stub: FhirStub,
                                                             follow: Callable[..., PrefetchResult],
                                                             route: dict[str, Any], reason: str) -> None:
    fhir_stub.add("/fhir/Medication", **route)
    orders = (order("Medication/m2", "o1"), order("Medication/m1", "o2"))
    result = follow(make_request(fhir_stub, with_orders(*orders)), deadline_seconds=0.5)
    key = result.keys["medications"]
    assert key.state is KeyState.DATA and key.resources[:2] == orders
    count, why = reason.split(" ...: ")
    assert result.incomplete() == {"medications": f"{count} Medication(s) named by medicationReference could not "
                                                  f"be obtained: {why}"}
    assert [r["id"] for r in key.resources[2:]] == (["m1"] if count == "1" else [])
    assert "m1" not in (key.reason or "") and "m2" not in (key.reason or "")


@pytest.mark.parametrize(
    ("request_kwargs", "policy", "reason"),
    (
        (dict(fhir_server=""), {}, "no fhirServer in the request"),
        (dict(), dict(allowed_bases=()), "the FHIR fallback fetch is disabled"),
        (dict(), dict(allowed_bases=("https://ehr.example/fhir",)), "fhirServer not on the allowlist"),
        (dict(token=None), {}, "no fhirAuthorization in the request, and anonymous FHIR access is not allowed"),
        (dict(expires_in=0), {}, "the fhirAuthorization access token has expired"),
    ),
    ids=("no-fhir-server", "fetch-disabled", "not-allowlisted", "no-authorization", "token-expired"),
)
def test_follow_refused_sends_no_request_and_says_why(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult],
                                                      request_kwargs: dict[str, Any], policy: dict[str, Any],
                                                      reason: str) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]))
    result = follow(make_request(fhir_stub, with_orders(order("Medication/m1")), **request_kwargs), **policy)
    assert result.keys["medications"].resources == (order("Medication/m1"),)
    assert result.incomplete() == {"medications": WHY + reason}
    assert fhir_stub.requests == []


def test_follow_anonymous_when_allowed(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]))
    result = follow(make_request(fhir_stub, with_orders(order("Medication/m1")), token=None), allow_anonymous=True)
    assert result.incomplete() == {} and result.keys["medications"].resources[-1] == medication("m1")
    assert [r.authorization for r in fhir_stub.requests] == [None]


def test_follow_never_calls_another_server(fhir_stub: FhirStub, make_fhir_stub: Any,
                                           follow: Callable[..., PrefetchResult]) -> None:
    other = make_fhir_stub()
    other.add("/fhir/Medication/m1", medication("m1"))
    other.add("/fhir/Medication", searchset([medication("m1")]))
    orders = (order(other.url("/fhir/Medication/m1")), order(other.url("/fhir/Medication/m2"), "o2"), order("#c1"))
    result = follow(make_request(fhir_stub, with_orders(*orders)),
                    allowed_bases=(fhir_stub.url("/fhir"), other.url("/fhir")))
    assert result.incomplete() == {"medications": "2 Medication(s) named by medicationReference could not be "
                                                  "obtained: they are on another server than fhirServer"}
    assert other.requests == [] and fhir_stub.requests == []


def test_follow_same_id_on_another_server_is_reported(fhir_stub: FhirStub,
                                                     follow: Callable[..., PrefetchResult]) -> None:
    # Regression: fhirServer's Medication/m1 (read for o1) silently stood for the other server's m1 too (o2's
    # medicine: the engine resolves medicationReference by "Type/id"), with no note that o2's was never read.
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]), query={"_id": "m1"})
    orders = (order("Medication/m1"), order("https://other.example/fhir/Medication/m1", "o2"))
    result = follow(make_request(fhir_stub, with_orders(*orders)))
    assert result.keys["medications"].resources == (*orders, medication("m1"))
    assert result.incomplete() == {"medications": WHY + "they are on another server than fhirServer"}
    assert medication_searches(fhir_stub) == [("m1",)]


@pytest.mark.parametrize("reference", ("https://[ehr.example/fhir/Medication/m1",
                                       "https://ehr\uff03.example/fhir/Medication/m1"),
                         ids=("unclosed-ipv6-bracket", "netloc-nfkc-delimiter"))
def test_follow_reference_whose_server_is_not_a_url(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult],
                                                    reference: str) -> None:
    # Regression: urlsplit's ValueError escaped resolve_prefetch (HTTP 500: the clinician saw no card at all).
    result = follow(make_request(fhir_stub, with_orders(order(reference))))
    assert result.keys["medications"].resources == (order(reference),)
    assert result.incomplete() == {"medications": WHY + "they are on another server than fhirServer"}
    assert fhir_stub.requests == []


def test_follow_reference_without_id_is_reported(fhir_stub: FhirStub,
                                                 follow: Callable[..., PrefetchResult]) -> None:
    # Regression: "Medication/" was skipped like a reference to another type: the order's medicine silently unknown.
    result = follow(make_request(fhir_stub, with_orders(order("Medication/"))))
    assert result.incomplete() == {"medications": WHY + "their id is not a FHIR id"}
    assert fhir_stub.requests == []


def test_follow_ids_that_are_not_fhir_ids_are_never_searched(fhir_stub: FhirStub,
                                                             follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]))
    result = follow(make_request(fhir_stub, with_orders(order("Medication/m1,m2&_format=xml"))))
    assert result.incomplete() == {"medications": WHY + "their id is not a FHIR id"}
    assert fhir_stub.requests == []


def test_follow_stops_at_the_resource_limit(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Medication", searchset([medication("m1"), medication("m2"), medication("m3")]))
    orders = [order(f"Medication/m{n}", f"o{n}") for n in (3, 1, 2)]
    result = follow(make_request(fhir_stub, with_orders(*orders)), max_resources=2)
    assert medication_searches(fhir_stub) == [("m1,m2",)]
    assert result.incomplete() == {"medications": WHY + "over the limit of 2 references followed"}


def test_follow_searches_no_more_than_a_key_has_pages(fhir_stub: FhirStub,
                                                      follow: Callable[..., PrefetchResult]) -> None:
    # A request naming thousands of Medications must not turn into a hundred searches of the EHR's server.
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]))
    orders = [order(f"Medication/m{n:03d}", f"o{n}") for n in range(REFERENCE_CHUNK + 1)]
    result = follow(make_request(fhir_stub, with_orders(*orders)), max_pages=1)
    assert [len(ids[0].split(",")) for ids in medication_searches(fhir_stub)] == [REFERENCE_CHUNK]
    assert WHY + f"over the limit of {REFERENCE_CHUNK} references followed" in result.incomplete()["medications"]


def test_follow_drops_targets_about_another_patient(fhir_stub: FhirStub,
                                                    follow: Callable[..., PrefetchResult]) -> None:
    panel = {**ANC, "id": "panel", "hasMember": [{"reference": "Observation/mine"},
                                                 {"reference": "Observation/theirs"}]}
    mine = {**ANC, "id": "mine", "subject": {"reference": "Patient/123"}}
    theirs = {**ANC, "id": "theirs", "subject": {"reference": "Patient/456"}}
    fhir_stub.add("/fhir/Observation", searchset([mine, theirs]), query={"_id": "mine,theirs"})
    result = follow(make_request(fhir_stub, {**FULL_PREFETCH, "labs": searchset([panel]), "medications": None}))
    assert result.keys["labs"].resources == (panel, mine)
    assert result.incomplete() == {"labs": "1 resource(s) about another patient than context.patientId were dropped"}


@pytest.mark.parametrize("issues", [
    [{"severity": "error", "code": "security", "diagnostics": "x" * 190 + " " + TOKEN}],
    [{"severity": "error", "code": "security", "details": {"text": "y" * 180 + TOKEN}}],
    [{"severity": "error", "code": "x", "diagnostics": "z" * 100}, {"severity": "error", "code": "x",
                                                                    "diagnostics": "w" * 80 + TOKEN}],
], ids=["diagnostics", "details-text", "second-issue"])
def test_a_client_outcome_cut_at_the_token_leaves_no_part_of_it(resolve: Callable[..., PrefetchResult],
                                                                issues: list[dict[str, Any]]) -> None:
    # The client's OperationOutcome was summarised (cut to 200 characters) before the token was redacted, so a
    # token across the cut was quoted in part in the 412 and the reason.
    outcome = {"resourceType": "OperationOutcome", "issue": issues}
    result = resolve(make_request(None, {**FULL_PREFETCH, "conditions": outcome}))
    reason = result.unavailable()["conditions"]
    assert TOKEN[:8] not in reason, reason


def test_follow_not_attempted_when_a_required_key_is_412(fhir_stub: FhirStub,
                                                         follow: Callable[..., PrefetchResult]) -> None:
    fhir_stub.add("/fhir/Observation", query=LABS_QUERY, status=500)
    fhir_stub.add("/fhir/Medication", searchset([medication("m1")]))
    with pytest.raises(PreconditionFailed):
        follow(make_request(fhir_stub, {k: v for k, v in with_orders(order("Medication/m1")).items() if k != "labs"}))
    assert [r.path for r in fhir_stub.requests] == ["/fhir/Observation"]


def test_follow_token_never_in_reasons(fhir_stub: FhirStub, follow: Callable[..., PrefetchResult],
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fhir_stub.add("/fhir/Medication", operation_outcome(f"bad token {TOKEN} for Medication/m1"))
    result = follow(make_request(fhir_stub, with_orders(order("Medication/m1"))))
    reason = result.incomplete()["medications"]
    assert "[redacted]" in reason and TOKEN not in reason and TOKEN not in caplog.text


def test_follow_unexpected_failure_is_a_reason_not_a_500(fhir_stub: FhirStub) -> None:
    class Broken(FhirFetcher):
        def fetch(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in the fetch path")

    with Broken() as fetcher:
        result = resolve_prefetch(FOLLOW_DEFINITION, make_request(fhir_stub, with_orders(order("Medication/m1"))),
                                  policy=FetchPolicy(allowed_bases=(fhir_stub.url("/fhir"),)),
                                  received_at=time.monotonic(), fetcher=fetcher)
    assert result.incomplete() == {"medications": WHY + "fetch failed unexpectedly"}


def test_parallel_fetches_log_with_the_request_id() -> None:
    # The fetches ran in pool threads without the request's context: their log lines (DEBUG "fhir fetch ...")
    # carried request_id "-", though the README promises every log line a request id.
    seen: dict[str, str] = {}

    def job(key: str) -> Callable[[], KeyResult]:
        def run() -> KeyResult:
            seen[key] = REQUEST_ID.get()
            return KeyResult(key, KeyState.EMPTY)
        return run

    token = REQUEST_ID.set("abc123")
    try:
        prefetch_module._run({key: (job(key), KeyResult(key, KeyState.EMPTY)) for key in ("labs", "vitals")},
                             time.monotonic() + 5)
    finally:
        REQUEST_ID.reset(token)
    assert seen == {"labs": "abc123", "vitals": "abc123"}
