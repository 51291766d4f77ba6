"""The service-side conformance checklist of cds-hooks-spec.md, one test per applicable item (c01..c50).

Run against the real app (the neutropenia service) in-process, auth on, with a real FHIR stub server on
loopback for the fallback fetch. Items not testable here: c35 (we emit no systemActions), c39 (HTTPS is the
deployment's TLS terminator; see README), c47 (response time: `make bench`), c51 (MAY; one hook only).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_hooks.registry import ServiceRegistry
from cds_hooks.testing.tokens import ClientKey, TokenSigner, write_issuer_config
from service.app import create_app
from service.definition import EXTENSION_KEY, SERVICE_ID, neutropenia_service
from tests.support.fhir_stub_server import FhirStub, operation_outcome, searchset

BASE = "https://cds.example.org"
SERVICE_URL = f"/cds-services/{SERVICE_ID}"
FEEDBACK_URL = f"{SERVICE_URL}/feedback"
PATIENT = "conf-patient-1"
CONTEXT = {"userId": "Practitioner/u1", "patientId": PATIENT}
ORIGIN = "https://ehr.example.org"
TOKEN = "fhir-token-" + uuid.uuid4().hex


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _observation(obs_id: str, code: str, value: float, unit: str, hours_ago: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": obs_id, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "effectiveDateTime": _iso(datetime.now(timezone.utc) - timedelta(hours=hours_ago)),
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


def febrile_prefetch() -> dict[str, Any]:
    """ANC 300/uL and 38.5 °C: febrile neutropenia, so every card kind that can appear does."""
    return {
        "patient": {"resourceType": "Patient", "id": PATIENT, "birthDate": "1960-01-01"},
        "labs": searchset([_observation("c-anc", "751-8", 300, "/uL", 3)]),
        "vitals": searchset([_observation("c-temp", "8310-5", 38.5, "Cel", 1)]),
        "conditions": searchset([]),
        "medications": searchset([]),
    }


def request_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": CONTEXT,
                            "prefetch": febrile_prefetch()}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


class Caller:
    """A Flask test client that signs each call like the Sandbox does."""

    def __init__(self, client: FlaskClient, signer: TokenSigner) -> None:
        self.client = client
        self.signer = signer

    def __call__(self, method: str, path: str, body: Any = None, *, token: str | None | bool = True,
                 **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if token is True:
            token = self.signer.sign(BASE + path)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            kwargs["json"] = body
        return self.client.open(path, method=method, headers=headers, **kwargs)


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(ClientKey.generate("ES384"))


@pytest.fixture
def app(tmp_path: Path, signer: TokenSigner, fhir_stub: FhirStub) -> Iterator[Flask]:
    issuers = write_issuer_config(tmp_path / "issuers.json", [signer.issuer_entry()])
    application = create_app({
        "AUTH": "required", "PUBLIC_BASE_URL": BASE, "TRUSTED_ISSUERS_FILE": str(issuers),
        "DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3", "CORS_ORIGINS": ORIGIN,
        "FHIR_ALLOWED_BASES": fhir_stub.url("/fhir"), "FHIR_DEADLINE_SECONDS": 2.0,
    }, environ={})
    yield application
    application.extensions["neutropenia_cds"]["store"].dispose()


@pytest.fixture
def call(app: Flask, signer: TokenSigner) -> Caller:
    return Caller(app.test_client(), signer)


def _invoke(call: Caller, **changes: Any) -> Any:
    return call("POST", SERVICE_URL, request_body(**changes))


def _empty_values(value: Any, path: str = "$") -> list[str]:
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None or item == "" or item == [] or item == {}:
                if not (path == "$" and key in ("cards", "services")):
                    found.append(f"{path}.{key}")
            found += _empty_values(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _empty_values(item, f"{path}[{index}]")
    return found


def _febrile_cards(call: Caller) -> list[dict[str, Any]]:
    response = _invoke(call)
    assert response.status_code == 200, response.json
    cards: list[dict[str, Any]] = response.json["cards"]
    assert cards, "the febrile-neutropenia request gave no cards"
    return cards


# --- discovery ---------------------------------------------------------------------------------------------


def test_c01_discovery_returns_a_services_array(call: Caller) -> None:
    response = call("GET", "/cds-services")
    assert response.status_code == 200 and isinstance(response.json["services"], list)


def test_c02_no_services_gives_an_empty_array() -> None:
    assert ServiceRegistry().discovery() == {"services": []}


def test_c03_c04_every_service_has_hook_description_id_and_title(call: Caller) -> None:
    for service in call("GET", "/cds-services").json["services"]:
        for name in ("hook", "description", "id", "title"):
            assert isinstance(service[name], str) and service[name].strip()


def test_c05_prefetch_tokens_are_2_0_tokens(call: Caller) -> None:
    allowed = {"context.userId", "context.patientId", "context.encounterId", "userPractitionerId",
               "userPractitionerRoleId", "userPatientId", "userRelatedPersonId"}
    for service in call("GET", "/cds-services").json["services"]:
        for template in service["prefetch"].values():
            assert set(t.strip() for t in re.findall(r"\{\{(.*?)\}\}", template)) <= allowed


def test_c06_prefetch_templates_stay_in_the_query_subset(call: Caller) -> None:
    search_params = {"patient", "subject", "code", "clinical-status", "status", "date", "_count", "_sort"}
    for service in call("GET", "/cds-services").json["services"]:
        for template in service["prefetch"].values():
            parts = urlsplit(template)
            segments = parts.path.split("/")
            assert segments[0][:1].isupper() and len(segments) in (1, 2), template
            assert {name for name, _ in parse_qsl(parts.query)} <= search_params, template


def test_c07_no_empty_values_anywhere(call: Caller) -> None:
    bodies = [call("GET", "/cds-services").json, _invoke(call).json,
              _invoke(call, prefetch={**febrile_prefetch(), "labs": None, "vitals": None}).json,
              _invoke(call, hook="order-sign").json, call("POST", FEEDBACK_URL, {"feedback": []}).json]
    for body in bodies:
        assert _empty_values(body) == [], body


def test_c08_every_advertised_id_accepts_post_json(call: Caller) -> None:
    for service in call("GET", "/cds-services").json["services"]:
        response = call("POST", f"/cds-services/{service['id']}", request_body())
        assert response.status_code == 200


# --- the request -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["hook", "hookInstance", "context"])
def test_c09_missing_hook_hookinstance_or_context_is_4xx(call: Caller, field: str) -> None:
    response = _invoke(call, **{field: _DROP})
    assert response.status_code == 400
    assert [field] in [issue.get("expression") for issue in response.json["issue"]]


def test_c10_a_hook_the_service_does_not_handle_is_4xx(call: Caller) -> None:
    assert _invoke(call, hook="order-select").status_code == 400


def test_c11_fhir_authorization_without_fhir_server_is_invalid(call: Caller) -> None:
    auth = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "s", "subject": "x"}
    response = _invoke(call, fhirAuthorization=auth)
    assert response.status_code == 400 and TOKEN not in response.get_data(as_text=True)


def _serve_patient(fhir_stub: FhirStub) -> None:
    data = febrile_prefetch()
    fhir_stub.add(f"/fhir/Patient/{PATIENT}", data["patient"])
    fhir_stub.add("/fhir/Observation", searchset([data["labs"]["entry"][0]["resource"],
                                                  data["vitals"]["entry"][0]["resource"]]))
    fhir_stub.add("/fhir/Condition", searchset([]))
    fhir_stub.add("/fhir/MedicationRequest", searchset([]))


def _authorization(expires_in: int = 300) -> dict[str, Any]:
    return {"access_token": TOKEN, "token_type": "Bearer", "expires_in": expires_in,
            "scope": "user/Observation.read", "subject": "cds"}


def test_c12_c14_absent_keys_are_fetched_with_the_bearer_token(call: Caller, fhir_stub: FhirStub) -> None:
    _serve_patient(fhir_stub)
    response = _invoke(call, prefetch=_DROP, fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=_authorization())
    assert response.status_code == 200
    assert response.json["extension"][EXTENSION_KEY]["findings"][0] == "febrile-neutropenia"
    assert {r.path for r in fhir_stub.requests} == {f"/fhir/Patient/{PATIENT}", "/fhir/Observation",
                                                   "/fhir/Condition", "/fhir/MedicationRequest"}
    assert all(r.authorization == f"Bearer {TOKEN}" for r in fhir_stub.requests)


def test_c13_the_access_token_is_not_logged_nor_used_after_expiry(call: Caller, fhir_stub: FhirStub,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _serve_patient(fhir_stub)
    _invoke(call, prefetch=_DROP, fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=_authorization())
    assert TOKEN not in caplog.text
    fhir_stub.clear_requests()
    expired = _invoke(call, prefetch=_DROP, fhirServer=fhir_stub.url("/fhir"),
                      fhirAuthorization=_authorization(expires_in=0))
    assert expired.status_code == 412
    assert fhir_stub.requests == []


@pytest.mark.parametrize("value", [None, searchset([])], ids=["null", "empty-bundle"])
def test_c15_null_and_empty_bundle_mean_no_data_and_are_not_refetched(call: Caller, fhir_stub: FhirStub,
                                                                     value: Any) -> None:
    _serve_patient(fhir_stub)
    prefetch = {key: value for key in febrile_prefetch()}
    response = _invoke(call, prefetch=prefetch, fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=_authorization())
    assert response.status_code == 200
    assert response.json["cards"] == []
    assert fhir_stub.requests == []


def test_c16_operation_outcome_is_unavailable_and_not_refetched(call: Caller, fhir_stub: FhirStub) -> None:
    _serve_patient(fhir_stub)
    prefetch = {**febrile_prefetch(), "conditions": operation_outcome("conditions feed down")}
    response = _invoke(call, prefetch=prefetch, fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=_authorization())
    assert response.status_code == 200
    issues = response.json["extension"][EXTENSION_KEY]["dataIssues"]
    assert any("conditions" in (issue.get("detail") or "") for issue in issues)
    assert fhir_stub.requests == []
    required = _invoke(call, prefetch={**febrile_prefetch(), "labs": operation_outcome("lab feed down")},
                       fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=_authorization())
    assert required.status_code == 412 and fhir_stub.requests == []


def test_c17_next_links_of_a_paginated_prefetch_are_followed(call: Caller, fhir_stub: FhirStub) -> None:
    data = febrile_prefetch()
    fhir_stub.add("/fhir/Observation", searchset([data["labs"]["entry"][0]["resource"]]),
                  query={"page": "2"})
    first_page = searchset([], next_url=fhir_stub.url("/fhir/Observation?page=2"))
    response = _invoke(call, prefetch={**data, "labs": first_page}, fhirServer=fhir_stub.url("/fhir"),
                       fhirAuthorization=_authorization())
    assert response.status_code == 200
    assert "Observation/c-anc" in response.json["extension"][EXTENSION_KEY]["anc"]["sources"]


@pytest.mark.parametrize("status", [401, 403, 500], ids=["401", "403", "500"])
def test_c18_required_data_neither_prefetched_nor_retrievable_is_412(call: Caller, fhir_stub: FhirStub,
                                                                    status: int) -> None:
    fhir_stub.add("/fhir/Observation", operation_outcome("no"), status=status)
    response = _invoke(call, prefetch=_DROP, fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=_authorization())
    assert response.status_code == 412
    assert {"prefetch.labs", "prefetch.vitals"} <= {i["expression"][0] for i in response.json["issue"]}


def test_c18_no_fhir_server_is_412(call: Caller) -> None:
    assert _invoke(call, prefetch=_DROP).status_code == 412


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", SERVICE_URL, {"hook": 1}, 400), ("POST", "/cds-services/none", request_body(), 404),
    ("GET", SERVICE_URL, None, 405), ("POST", SERVICE_URL, request_body(prefetch=_DROP), 412),
], ids=["400", "404", "405", "412"])
def test_c19_non_2xx_carry_an_operation_outcome(call: Caller, method: str, path: str, body: Any, status: int) -> None:
    response = call(method, path, body)
    assert response.status_code == status and response.json["resourceType"] == "OperationOutcome"


# --- the response ------------------------------------------------------------------------------------------


def test_c20_success_is_200_with_a_cards_array(call: Caller) -> None:
    empty = {key: None for key in febrile_prefetch()}
    response = _invoke(call, prefetch=empty)
    assert response.status_code == 200 and response.json["cards"] == []


def test_c21_to_c24_cards_have_summary_indicator_source_and_markdown_detail(call: Caller) -> None:
    for card in _febrile_cards(call):
        assert 0 < len(card["summary"]) < 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert card["source"]["label"]
        assert isinstance(card.get("detail", ""), str) and "<" not in card.get("detail", "")


def test_c25_every_card_and_suggestion_has_a_unique_uuid(call: Caller) -> None:
    cards = _febrile_cards(call) + _febrile_cards(call)
    ids = [c["uuid"] for c in cards] + [s["uuid"] for c in cards for s in c.get("suggestions", [])]
    assert all(ids) and len(ids) == len(set(ids))


def test_c26_to_c30_suggestions_and_actions_are_well_formed(call: Caller) -> None:
    cards = [card for card in _febrile_cards(call) if card.get("suggestions")]
    assert cards, "the febrile-neutropenia card offers suggestions"
    for card in cards:
        assert card["selectionBehavior"] in ("at-most-one", "any")
        if card["selectionBehavior"] == "at-most-one":
            assert sum(1 for s in card["suggestions"] if s.get("isRecommended")) <= 1
        for suggestion in card["suggestions"]:
            assert suggestion["label"]
            for action in suggestion.get("actions", []):
                assert action["type"] in ("create", "update", "delete") and action["description"]
                if action["type"] in ("create", "update"):
                    assert action["resource"]["resourceType"]
                else:
                    assert re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]+$", action["resourceId"])


def test_c31_to_c34_codings_links_and_source_urls(call: Caller) -> None:
    for card in _febrile_cards(call):
        for coding in card.get("overrideReasons", []):
            assert coding["code"] and coding["system"] and coding["display"]
        topic = card["source"].get("topic")
        assert topic and topic["code"] and topic["system"]
        for link in card.get("links", []):
            assert link["label"] and link["type"] in ("absolute", "smart")
            assert urlsplit(link["url"]).scheme in ("http", "https")
            assert "appContext" not in link or link["type"] == "smart"
        assert urlsplit(card["source"].get("url", "https://x")).scheme in ("http", "https")


# --- feedback ----------------------------------------------------------------------------------------------


def test_c36_c38_feedback_is_accepted_duplicates_and_bare_overrides_tolerated(call: Caller, app: Flask) -> None:
    card = _febrile_cards(call)[0]
    items = [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]
    for _ in range(2):
        response = call("POST", FEEDBACK_URL, {"feedback": items})
        assert response.status_code == 200
    assert len(app.extensions["neutropenia_cds"]["store"].feedback_for_card(card["uuid"])) == 1


@pytest.mark.parametrize("item, field", [
    ({"outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}, "feedback[0].card"),
    ({"card": "c", "outcomeTimestamp": "2025-03-10T12:00:00Z"}, "feedback[0].outcome"),
    ({"card": "c", "outcome": "overridden"}, "feedback[0].outcomeTimestamp"),
    ({"card": "c", "outcome": "accepted", "outcomeTimestamp": "2025-03-10T12:00:00Z"},
     "feedback[0].acceptedSuggestions"),
], ids=["card", "outcome", "outcomeTimestamp", "acceptedSuggestions"])
def test_c37_feedback_requires_its_fields(call: Caller, item: dict[str, Any], field: str) -> None:
    response = call("POST", FEEDBACK_URL, {"feedback": [item]})
    assert response.status_code == 400
    assert [field] in [issue.get("expression") for issue in response.json["issue"]]


# --- security ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/cds-services", None), ("POST", SERVICE_URL, request_body()),
    ("POST", FEEDBACK_URL, {"feedback": [{"card": "c", "outcome": "overridden",
                                          "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}),
], ids=["discovery", "invoke", "feedback"])
def test_c40_a_jwt_is_required_on_every_cds_call(call: Caller, method: str, path: str, body: Any) -> None:
    assert call(method, path, body, token=None).status_code == 401
    assert call(method, path, body).status_code == 200


def test_c41_none_and_hmac_are_rejected(call: Caller, signer: TokenSigner) -> None:
    url = BASE + "/cds-services"
    assert call("GET", "/cds-services", token=signer.unsigned(url)).status_code == 401
    assert call("GET", "/cds-services", token=signer.hs256_with_public_key(url)).status_code == 401


def test_c41_rs384_is_accepted(tmp_path: Path) -> None:
    rs = TokenSigner(ClientKey.generate("RS384"), iss="https://rs.example.org")
    issuers = write_issuer_config(tmp_path / "i.json", [rs.issuer_entry()])
    app = create_app({"AUTH": "required", "PUBLIC_BASE_URL": BASE, "TRUSTED_ISSUERS_FILE": str(issuers),
                      "DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3"}, environ={})
    try:
        assert Caller(app.test_client(), rs)("GET", "/cds-services").status_code == 200
    finally:
        app.extensions["neutropenia_cds"]["store"].dispose()


@pytest.mark.parametrize("header", [{"typ": None}, {"kid": None}, {"kid": "unknown-kid"}],
                         ids=["no-typ", "no-kid", "kid-not-in-jwks"])
def test_c42_typ_and_kid_are_required_and_the_key_comes_from_the_jwks(call: Caller, signer: TokenSigner,
                                                                       header: dict[str, Any]) -> None:
    token = signer.sign(BASE + "/cds-services", headers=header)
    assert call("GET", "/cds-services", token=token).status_code == 401


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_c43_required_claims(call: Caller, signer: TokenSigner, claim: str) -> None:
    token = signer.sign(BASE + "/cds-services", extra_claims={claim: None})
    assert call("GET", "/cds-services", token=token).status_code == 401


def test_c43_aud_is_the_exact_url_as_string_or_array(call: Caller, signer: TokenSigner) -> None:
    url = BASE + "/cds-services"
    assert call("GET", "/cds-services", token=signer.sign([url, "https://other"])).status_code == 200
    assert call("GET", "/cds-services", token=signer.sign(["https://other"])).status_code == 401
    assert call("GET", "/cds-services", token=signer.sign(url + "/")).status_code == 401


def test_c44_an_unlisted_jku_is_refused_and_never_fetched(call: Caller, signer: TokenSigner,
                                                          fhir_stub: FhirStub) -> None:
    fhir_stub.add("/jwks.json", signer.jwks(), content_type="application/json")
    token = signer.sign(BASE + "/cds-services", jku=fhir_stub.url("/jwks.json"))
    assert call("GET", "/cds-services", token=token).status_code == 401
    assert fhir_stub.requests == []


def test_c45_expired_and_replayed_tokens_are_refused_without_detail(call: Caller, signer: TokenSigner) -> None:
    url = BASE + "/cds-services"
    expired = call("GET", "/cds-services", token=signer.sign(url, lifetime=60, now=1_600_000_000))
    assert expired.status_code == 401 and expired.json["issue"][0]["diagnostics"] == "unauthorized"
    token = signer.sign(url)
    assert call("GET", "/cds-services", token=token).status_code == 200
    assert call("GET", "/cds-services", token=token).status_code == 401


def test_c46_cors_preflight_and_allowlist(call: Caller) -> None:
    for path in ("/cds-services", SERVICE_URL, FEEDBACK_URL):
        response = call("OPTIONS", path, token=None, headers={"Origin": ORIGIN,
                                                              "Access-Control-Request-Method": "POST"})
        assert response.status_code == 204 and response.get_data() == b"" and "Content-Type" not in response.headers
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert {"Authorization", "Content-Type"} <= set(response.headers["Access-Control-Allow-Headers"].split(", "))
        assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "POST", "OPTIONS"}
    other = call("OPTIONS", "/cds-services", token=None, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_c48_unknown_fields_and_extensions_are_ignored(call: Caller) -> None:
    response = _invoke(call, somethingNew={"x": 1}, extension={"com.example.flag": True},
                       context={**CONTEXT, "encounterId": "e1", "newField": 1})
    assert response.status_code == 200


def test_c49_the_extension_is_an_object_with_a_reverse_domain_key(call: Caller) -> None:
    extension = _invoke(call).json["extension"]
    assert isinstance(extension, dict)
    assert all(re.match(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$", key) for key in extension)


@pytest.mark.parametrize("context, status", [
    ({"userId": "Practitioner/u1", "patientId": PATIENT}, 200),
    ({"userId": "Practitioner/u1", "patientId": PATIENT, "encounterId": "e9"}, 200),
    ({"userId": "Practitioner/u1"}, 400),
    ({"patientId": PATIENT}, 400),
    ({"userId": "u1", "patientId": PATIENT}, 400),
], ids=["no-encounter", "with-encounter", "no-patientId", "no-userId", "userId-not-type-slash-id"])
def test_c50_patient_view_context(call: Caller, context: dict[str, Any], status: int) -> None:
    assert _invoke(call, context=context).status_code == status


def test_discovery_matches_the_registered_definition(call: Caller) -> None:
    assert call("GET", "/cds-services").json == ServiceRegistry([neutropenia_service()]).discovery()
    assert json.dumps(call("GET", "/cds-services").json)


# --- what real clients send (cds-clients.md) ----------------------------------------------------------------

def _feedback_body(call: Caller) -> dict[str, Any]:
    card = next(c for c in _febrile_cards(call) if c.get("overrideReasons"))
    reason = card["overrideReasons"][0]
    return {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00.123Z",
                          "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]}}}]}


@pytest.mark.parametrize("discovery", ["/cds-services", "/cds-services/"], ids=["typed-as-is", "typed-with-slash"])
@pytest.mark.parametrize("endpoint", ["discovery", "invoke", "feedback"])
def test_sandbox_urls_built_from_the_discovery_url_as_typed(call: Caller, discovery: str, endpoint: str) -> None:
    # The Sandbox calls the discovery URL as typed into "Add CDS Service", then `${discoveryURL}/${service.id}`
    # and `${serviceURL}/feedback` (cds-services-reducers.js), each with a token whose aud is that exact URL and
    # after a preflight without one. Typed with a trailing slash, the service URL holds '//': werkzeug answered it
    # with a 308 redirect (an HTML page; on the preflight, which browsers never follow, a CORS failure).
    service = f"{discovery}/{SERVICE_ID}"
    path, method, body = {"discovery": (discovery, "GET", None),
                          "invoke": (service, "POST", request_body()),
                          "feedback": (f"{service}/feedback", "POST", _feedback_body(call))}[endpoint]
    preflight = call("OPTIONS", path, token=None, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 204, preflight.headers
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    response = call(method, path, body, headers={"Origin": ORIGIN, "Accept": "application/json"})
    assert response.status_code == 200 and response.mimetype == "application/json", response.get_data()
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = call(method, path, body, token=call.signer.sign(BASE + path.replace("//", "/")))
    assert other.status_code == 401 if "//" in path else other.status_code == 200  # aud is the URL called


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json;charset=utf-8", "application/json; charset=UTF-8", "Application/JSON",
    "application/fhir+json",
], ids=["plain", "axios-0.x-browser", "java-and-dotnet", "upper-case", "fhir-json"])
@pytest.mark.parametrize("path", [SERVICE_URL, FEEDBACK_URL], ids=["invoke", "feedback"])
def test_json_content_types_clients_send_are_accepted(call: Caller, path: str, content_type: str) -> None:
    body = request_body() if path == SERVICE_URL else _feedback_body(call)
    response = call("POST", path, data=json.dumps(body), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.json


@pytest.mark.parametrize("path", [f"{SERVICE_URL}/", f"{FEEDBACK_URL}/"], ids=["invoke", "feedback"])
def test_a_trailing_slash_is_the_same_endpoint_and_part_of_the_audience(call: Caller, path: str) -> None:
    body = request_body() if path.rstrip("/") == SERVICE_URL else _feedback_body(call)
    assert call("POST", path, body).status_code == 200
    assert call("POST", path, body, token=call.signer.sign(BASE + path.rstrip("/"))).status_code == 401


def test_a_repeated_hook_instance_is_a_new_call_with_its_own_cards(call: Caller, app: Flask) -> None:
    # hookInstance is per user action or per request, the spec leaves it open (cds-hooks/docs#499): a client that
    # sends one twice (a retry, a re-render) gets cards both times, and feedback on either call's cards is known.
    store = app.extensions["neutropenia_cds"]["store"]
    body = request_body()
    first, again = call("POST", SERVICE_URL, body), call("POST", SERVICE_URL, body)
    assert first.status_code == again.status_code == 200
    uuids = [{card["uuid"] for card in response.json["cards"]} for response in (first, again)]
    assert uuids[0] and uuids[1] and uuids[0].isdisjoint(uuids[1])
    for card_uuid in (min(uuids[0]), min(uuids[1])):
        item = {"card": card_uuid, "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}
        assert call("POST", FEEDBACK_URL, {"feedback": [item]}).status_code == 200
        assert [row["unknown_card"] for row in store.feedback_for_card(card_uuid)] == [False]
        assert store.card(card_uuid)["hook_instance"] == body["hookInstance"]


_FULL_AUTHORIZATION = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
                       "scope": "user/Observation.read", "subject": "cds"}


def _authorization_without(*names: str, **changes: Any) -> dict[str, Any]:
    return {**{k: v for k, v in _FULL_AUTHORIZATION.items() if k not in names}, **changes}


@pytest.mark.parametrize("authorization, fetched", [
    (_FULL_AUTHORIZATION, True),
    (_authorization_without("expires_in"), True),
    (_authorization_without("scope", "subject"), True),
    (_authorization_without("token_type"), True),
    (_authorization_without(token_type="bearer"), True),
    (_authorization_without(patient=PATIENT, scope="patient/Observation.read patient/Patient.read"), True),
    (_authorization_without("access_token"), False),
    (_authorization_without(expires_in=0), False),
], ids=["all-members", "no-expires_in-hspc-sandbox-65", "no-scope-no-subject", "no-token_type", "token_type-lowercase",
        "patient-scopes-with-patient", "no-access_token", "expired"])
def test_fhir_authorization_as_clients_send_it(call: Caller, fhir_stub: FhirStub, authorization: dict[str, Any],
                                               fetched: bool) -> None:
    # Each member a real client may leave out or write differently: with the token, the absent keys are fetched
    # with it (and only with it); without a usable token nothing is fetched and the required keys are a 412.
    _serve_patient(fhir_stub)
    response = _invoke(call, prefetch=_DROP, fhirServer=fhir_stub.url("/fhir"), fhirAuthorization=authorization)
    if fetched:
        assert response.status_code == 200, response.json
        assert response.json["extension"][EXTENSION_KEY]["findings"][0] == "febrile-neutropenia"
        assert fhir_stub.requests and all(r.authorization == f"Bearer {TOKEN}" for r in fhir_stub.requests)
    else:
        assert response.status_code == 412 and fhir_stub.requests == []
        assert {tuple(issue["expression"]) for issue in response.json["issue"]} == {("prefetch.labs",),
                                                                                    ("prefetch.vitals",)}


def _with_outcome_entry(bundle: dict[str, Any], severity: str, code: str) -> dict[str, Any]:
    """``bundle`` with a search-outcome entry, as FHIR servers add warnings (R4 example bundle-search-warning)."""
    entry = {"fullUrl": "urn:uuid:2866af9c-137d-4458-a8a9-eeeec0ce5583", "search": {"mode": "outcome"},
             "resource": operation_outcome("no matching results", code=code, severity=severity)}
    return {**bundle, "total": len(bundle.get("entry", [])), "entry": [*bundle.get("entry", []), entry]}


@pytest.mark.parametrize("labs, first_finding", [
    (_with_outcome_entry(searchset([]), "warning", "not-found"), "fever-no-anc"),
    (_with_outcome_entry(searchset([]), "information", "informational"), "fever-no-anc"),
    (_with_outcome_entry(febrile_prefetch()["labs"], "warning", "informational"), "febrile-neutropenia"),
    ({"resourceType": "Bundle", "type": "searchset", "total": 0}, "fever-no-anc"),
    ({"resourceType": "Bundle", "type": "searchset", "entry": []}, "fever-no-anc"),
    ({**febrile_prefetch()["labs"], "type": "collection"}, "febrile-neutropenia"),
    (febrile_prefetch()["labs"]["entry"][0]["resource"], "febrile-neutropenia"),
], ids=["empty-search-with-warning-entry", "empty-search-with-information-entry", "results-with-warning-entry",
        "total-0-no-entry", "entry-empty-array", "collection-bundle", "bare-resource"])
def test_prefetch_shapes_ehrs_send(call: Caller, fhir_stub: FhirStub, labs: dict[str, Any], first_finding: str) -> None:
    # A search-outcome entry is the server's note about the search, not a result and not a failure: an empty
    # search that carries one is "no data" (not a 412), and the results beside one are used. Nothing is refetched.
    response = _invoke(call, prefetch={**febrile_prefetch(), "labs": labs}, fhirServer=fhir_stub.url("/fhir"),
                       fhirAuthorization=_authorization())
    assert response.status_code == 200, response.json
    assessment = response.json["extension"][EXTENSION_KEY]
    assert assessment["findings"][0] == first_finding
    assert "dataIssues" not in assessment and fhir_stub.requests == []


@pytest.mark.parametrize("shape, stored_code", [
    ("accept", None), ("dismiss-nested-pr-139", "reason"), ("dismiss-flat-pr-135", "reason"), ("dismiss-bare", None),
], ids=["accept", "dismiss-nested-pr-139", "dismiss-flat-pr-135", "dismiss-bare"])
def test_sandbox_feedback_shapes_are_stored_with_their_reason(call: Caller, app: Flask, shape: str,
                                                              stored_code: str | None) -> None:
    # What the Sandbox POSTs on a suggestion click and on dismiss, over its versions (cds-hooks/sandbox#135, #139).
    cards = _febrile_cards(call)
    card = next(c for c in cards if c.get("suggestions") and c.get("overrideReasons"))
    reason = card["overrideReasons"][0]
    coding = {"code": reason["code"], "system": reason["system"]}
    item: dict[str, Any] = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2020-08-25T21:18:16.375Z"}
    if shape == "accept":
        item = {**item, "outcome": "accepted", "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}
    elif shape == "dismiss-nested-pr-139":
        item["overrideReason"] = {"reason": coding}
    elif shape == "dismiss-flat-pr-135":
        item["overrideReason"] = coding
    assert call("POST", FEEDBACK_URL, {"feedback": [item]}).status_code == 200
    (row,) = app.extensions["neutropenia_cds"]["store"].feedback_for_card(card["uuid"])
    assert (row["override_system"], row["override_code"]) == ((reason["system"], reason["code"]) if stored_code
                                                              else (None, None))
    assert row["unknown_card"] is False
