"""openapi.yaml is a valid OpenAPI 3.1 document, matches the app's routes, and real responses conform to it.

Bodies are validated with jsonschema (Draft 2020-12, the OpenAPI 3.1 dialect) against the document itself: the whole
document is one resource in a `referencing.Registry`, so every `$ref` resolves exactly as a client's would.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.test import EnvironBuilder, TestResponse

from cds_hooks.errors import ServiceUnavailable
from cds_hooks.models import ServiceResponse
from service.app import create_app
from service.assessment import (EXTENSION_KEY, Anc, AncPoint, Assessment, CodedRef, DataIssue, Fever, Finding,
                                assessment_extension)
from service.cards import render

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
DOC_URI = "urn:neutropenia-cds:openapi"
SERVICE_ID = "neutropenia-patient-view"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


# ------------------------------------------------------------------------------------------------ the document

def _load_document() -> dict[str, Any]:
    with OPENAPI_PATH.open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.safe_load(handle)
    return document


DOCUMENT = _load_document()
REGISTRY: Registry[Any] = Registry().with_resource(
    DOC_URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012))


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local `$ref` (components/responses, components/examples) to the object it names."""
    while "$ref" in node:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        target: Any = DOCUMENT
        for part in pointer[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def _validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    # A schema at a pointer inside the document: reference it so relative `$ref`s resolve against the document.
    return Draft202012Validator(schema, registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _schema_ref(pointer: str) -> dict[str, str]:
    return {"$ref": f"{DOC_URI}#{pointer}"}


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def assert_valid(instance: Any, pointer: str) -> None:
    """Raise with every schema error of ``instance`` against the schema at ``pointer`` in the document."""
    errors = sorted(_validator(_schema_ref(pointer)).iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:400]}" for e in errors)


def _document_response(path: str, method: str, status: int) -> tuple[str, Mapping[str, Any]]:
    """(JSON pointer to, resolved object of) the documented response for ``status``, falling back to ``default``."""
    responses = DOCUMENT["paths"][path][method]["responses"]
    for key in (str(status), f"{str(status)[0]}XX", "default"):
        if key in responses:
            node = responses[key]
            pointer = node["$ref"][1:] if "$ref" in node else _pointer("paths", path, method, "responses", key)
            return pointer, _resolve(node)
    raise AssertionError(f"{method.upper()} {path}: status {status} is not documented "
                         f"(documented: {', '.join(responses)})")


def documented_json_schema(path: str, method: str, status: int) -> str:
    """The JSON pointer to the schema of the JSON body documented for ``status`` of an operation."""
    pointer, response_object = _document_response(path, method, status)
    assert "application/json" in response_object.get("content", {}), (path, method, status)
    return f"{pointer}/content/application~1json/schema"


def _check_against(pointer: str, response_object: Mapping[str, Any], response: TestResponse) -> Any:
    """Check the content type, body and required headers of ``response`` against a Response Object."""
    # info.description: every response carries these.
    assert re.fullmatch(r"[A-Za-z0-9\-_.]{1,64}", response.headers.get("X-Request-ID", "")), response.headers
    assert "no-store" in response.headers.get("Cache-Control", ""), response.headers
    assert response.headers.get("X-Content-Type-Options") == "nosniff", response.headers
    for name, header in response_object.get("headers", {}).items():
        header = _resolve(header)
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, f"required header {name} missing (status {response.status_code})"
        if value is not None and "schema" in header:
            errors = [e.message for e in _validator(header["schema"]).iter_errors(value)]
            assert not errors, f"header {name}: {errors}"
    content = response_object.get("content")
    if not content:
        assert not response.get_data(), f"undocumented body for status {response.status_code}"
        return None
    mimetype = response.mimetype or ""
    assert mimetype in content, f"content type {response.content_type!r} not in {list(content)}"
    body = json.loads(response.get_data(as_text=True))
    assert_valid(body, f"{pointer}/content/{mimetype.replace('/', '~1')}/schema")
    return body


def conforms(path: str, method: str, response: TestResponse, expected_status: int) -> Any:
    """Assert ``response`` has ``expected_status`` and conforms to the document; return the parsed body."""
    assert response.status_code == expected_status, (response.status_code, response.get_data(as_text=True)[:2000])
    pointer, response_object = _document_response(path, method, expected_status)
    return _check_against(pointer, response_object, response)


def conforms_to_component(name: str, response: TestResponse, expected_status: int) -> Any:
    """Like `conforms`, for a component response that no operation lists (404 on any path, 405 on any method)."""
    assert response.status_code == expected_status, (response.status_code, response.get_data(as_text=True)[:2000])
    return _check_against(_pointer("components", "responses", name), DOCUMENT["components"]["responses"][name],
                          response)


# ------------------------------------------------------------------------------------------------ the app

@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps with local settings (auth off, SQLite in ``tmp_path``) plus overrides; dispose their stores."""
    created: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        config = {"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{tmp_path}/f.db", **overrides}
        app = create_app(config, environ={})
        created.append(app)
        return app

    yield make
    for app in created:
        app.extensions["neutropenia_cds"]["store"].dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _observation(obs_id: str, code: str, value: float, unit: str, hours_ago: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": obs_id, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": "Patient/1"},
        "effectiveDateTime": _iso(datetime.now(timezone.utc) - timedelta(hours=hours_ago)),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def _searchset(*resources: Mapping[str, Any]) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(resources)}
    if resources:
        bundle["entry"] = [{"fullUrl": f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r}
                           for r in resources]
    return bundle


def hook_request(prefetch: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/oncall-7", "patientId": "1"},
    }
    if prefetch is not None:
        body["prefetch"] = dict(prefetch)
    body.update(fields)
    return body


def empty_prefetch() -> dict[str, Any]:
    return {"patient": None, "labs": _searchset(), "vitals": _searchset(), "conditions": _searchset(),
            "medications": _searchset()}


def febrile_neutropenic_prefetch() -> dict[str, Any]:
    """ANC falling to 400/uL (grade 4), 38.4 °C an hour ago and 38.1 °C before: febrile neutropenia."""
    labs = _searchset(
        _observation("anc-new", "751-8", 0.4, "10*3/uL", hours_ago=2),
        _observation("anc-old", "751-8", 0.9, "10*3/uL", hours_ago=30),
    )
    vitals = _searchset(
        _observation("temp-new", "8310-5", 38.4, "Cel", hours_ago=1),
        _observation("temp-old", "8310-5", 38.1, "Cel", hours_ago=3),
    )
    return {"patient": {"resourceType": "Patient", "id": "1", "birthDate": "1961-04-02"},
            "labs": labs, "vitals": vitals, "conditions": _searchset(), "medications": _searchset()}


def post_json(app: Flask, path: str, body: Any, content_type: str = "application/json") -> TestResponse:
    return app.test_client().post(path, data=json.dumps(body), content_type=content_type)


INVOKE = "/cds-services/{id}"
FEEDBACK = "/cds-services/{id}/feedback"
INVOKE_URL = f"/cds-services/{SERVICE_ID}"
FEEDBACK_URL = f"/cds-services/{SERVICE_ID}/feedback"


# ------------------------------------------------------------------------------------------------ the document

def test_document_is_a_valid_openapi_31_document() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in OpenAPIV31SpecValidator(DOCUMENT).iter_errors()]
    assert errors == []


def test_document_info_servers_and_security() -> None:
    info = DOCUMENT["info"]
    assert info["version"] == "0.1.0"
    assert info["title"] and info["description"] and info["license"]["name"]
    assert {"url": "http://127.0.0.1:8080"}.items() <= DOCUMENT["servers"][0].items()
    scheme = DOCUMENT["components"]["securitySchemes"]["cdsClientJwt"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    for claim in ("iss", "aud", "exp", "iat", "jti"):
        assert f"`{claim}`" in scheme["description"]


def _operations() -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method, item[method]


@pytest.mark.parametrize(("path", "method"), [
    ("/cds-services", "get"), (INVOKE, "post"), (FEEDBACK, "post"),
])
def test_protocol_operations_require_the_jwt(path: str, method: str) -> None:
    operation = DOCUMENT["paths"][path][method]
    assert operation.get("security", DOCUMENT["security"]) == [{"cdsClientJwt": []}]
    assert "401" in operation["responses"]


def test_probes_and_preflight_are_unauthenticated() -> None:
    for path, method, operation in _operations():
        if method == "options" or path in ("/healthz", "/readyz"):
            assert operation["security"] == [], f"{method.upper()} {path}"


def test_every_error_response_is_an_operation_outcome() -> None:
    for path, method, operation in _operations():
        for status, node in operation["responses"].items():
            response = _resolve(node)
            if int(status) < 400:
                continue
            schema = response["content"]["application/json"]["schema"]
            refs = [schema.get("$ref")] + [part.get("$ref") for part in schema.get("allOf", [])]
            assert "#/components/schemas/OperationOutcome" in refs, f"{method.upper()} {path} {status}"
    for name in ("NotFound", "MethodNotAllowed"):
        schema = DOCUMENT["components"]["responses"][name]["content"]["application/json"]["schema"]
        assert {"$ref": "#/components/schemas/OperationOutcome"} in schema["allOf"]


def test_request_bodies_accept_json_and_fhir_json() -> None:
    for path, method in ((INVOKE, "post"), (FEEDBACK, "post")):
        content = DOCUMENT["paths"][path][method]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/fhir+json"}


def _examples() -> Iterator[tuple[str, str, Any]]:
    """(id, JSON pointer to the schema, example value) for every example of every media type in the document."""
    for path, method, operation in _operations():
        media: list[tuple[str, str, Mapping[str, Any]]] = []
        if "requestBody" in operation:
            for media_type, item in operation["requestBody"]["content"].items():
                base = _pointer("paths", path, method, "requestBody", "content", media_type)
                media.append((f"{method.upper()} {path} request {media_type}", base, item))
        for status, node in operation["responses"].items():
            if "$ref" in node:
                base_response = node["$ref"][1:]
            else:
                base_response = _pointer("paths", path, method, "responses", status)
            for media_type, item in _resolve(node).get("content", {}).items():
                base = f"{base_response}/content/{media_type.replace('/', '~1')}"
                media.append((f"{method.upper()} {path} {status} {media_type}", base, item))
        for label, base, item in media:
            for name, example in item.get("examples", {}).items():
                yield f"{label} example {name}", f"{base}/schema", _resolve(example)["value"]
            if "example" in item:
                yield f"{label} example", f"{base}/schema", item["example"]


EXAMPLES = list(_examples())


def test_the_document_has_realistic_examples() -> None:
    labels = [label for label, _, _ in EXAMPLES]
    assert any("POST /cds-services/{id} request" in label and "febrileNeutropenia" in label for label in labels)
    assert any("POST /cds-services/{id} 200" in label and "febrileNeutropenia" in label for label in labels)
    response = _resolve({"$ref": "#/components/examples/FebrileNeutropeniaResponse"})["value"]
    assessment = response["extension"]["org.neutropenia-cds.assessment"]
    assert assessment["findings"][0] == "febrile-neutropenia"
    assert response["cards"][0]["source"]["topic"]["code"] == "febrile-neutropenia"


@pytest.mark.parametrize(("label", "pointer", "value"), EXAMPLES, ids=[label for label, _, _ in EXAMPLES])
def test_every_example_conforms_to_its_schema(label: str, pointer: str, value: Any) -> None:
    assert_valid(value, pointer)


# ------------------------------------------------------------------------------------------------ routes

def _template(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?[^<>]+>", "{}", rule)


def _document_template(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_app_route_is_documented_with_the_same_methods_and_vice_versa(app: Flask) -> None:
    # werkzeug adds HEAD to every GET rule (RFC 9110 §9.3.2: HEAD is GET without the body); the document's GET
    # stands for both, so HEAD is compared through GET.
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = {m.lower() for m in rule.methods or ()}
        if "head" in methods:
            assert "get" in methods, rule.rule
            methods.discard("head")
        routes.setdefault(_template(rule.rule), set()).update(methods)
    documented = {_document_template(path): {m for m in HTTP_METHODS if m in item}
                  for path, item in DOCUMENT["paths"].items()}
    assert routes == documented


def test_path_parameter_names_match_the_document() -> None:
    for path, item in DOCUMENT["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        declared = {_resolve(p)["name"] for p in item.get("parameters", []) if _resolve(p)["in"] == "path"}
        for method in HTTP_METHODS:
            if method in item:
                declared |= {_resolve(p)["name"] for p in item[method].get("parameters", [])
                             if _resolve(p)["in"] == "path"}
        assert names == declared, path


# ------------------------------------------------------------------------------------------------ 2xx

def test_discovery_conforms(app: Flask) -> None:
    body = conforms("/cds-services", "get", app.test_client().get("/cds-services"), 200)
    assert [service["id"] for service in body["services"]] == [SERVICE_ID]
    enum = DOCUMENT["components"]["parameters"]["ServiceId"]["schema"]["enum"]
    assert sorted(service["id"] for service in body["services"]) == sorted(enum)


def test_the_discovery_example_is_the_real_discovery_document(app: Flask) -> None:
    example = _resolve({"$ref": "#/components/examples/DiscoveryResponse"})["value"]
    assert app.test_client().get("/cds-services").get_json() == example


def test_invoke_with_empty_prefetch_bundles_conforms(app: Flask) -> None:
    body = conforms(INVOKE, "post", post_json(app, INVOKE_URL, hook_request(empty_prefetch())), 200)
    assert body["cards"] == []


def test_invoke_with_fhir_json_content_type_conforms(app: Flask) -> None:
    response = post_json(app, INVOKE_URL, hook_request(empty_prefetch()), content_type="application/fhir+json")
    conforms(INVOKE, "post", response, 200)


def test_invoke_with_a_febrile_neutropenic_patient_conforms(app: Flask) -> None:
    response = post_json(app, INVOKE_URL, hook_request(febrile_neutropenic_prefetch()))
    body = conforms(INVOKE, "post", response, 200)
    # design.md §3: the emergency comes first, in the extension and in the cards.
    assert body["extension"]["org.neutropenia-cds.assessment"]["findings"][0] == "febrile-neutropenia"
    first = body["cards"][0]
    assert (first["source"]["topic"]["code"], first["indicator"]) == ("febrile-neutropenia", "critical")


def test_invoke_with_each_observation_alone_conforms(app: Flask) -> None:
    """Neutropenia without fever, fever without an ANC, and an ANC without a unit each give a conforming answer."""
    anc = _observation("anc-1", "751-8", 0.8, "10*3/uL", hours_ago=4)
    temperature = _observation("temp-1", "8310-5", 38.6, "Cel", hours_ago=1)
    unitless = _observation("anc-2", "751-8", 700, "10*3/uL", hours_ago=2)
    del unitless["valueQuantity"]["unit"], unitless["valueQuantity"]["code"], unitless["valueQuantity"]["system"]
    for labs, vitals in (([anc], []), ([], [temperature]), ([unitless], [temperature])):
        prefetch = {**empty_prefetch(), "labs": _searchset(*labs), "vitals": _searchset(*vitals)}
        conforms(INVOKE, "post", post_json(app, INVOKE_URL, hook_request(prefetch)), 200)


def test_the_request_example_gets_a_conforming_answer(app: Flask) -> None:
    example = _resolve({"$ref": "#/components/examples/FebrileNeutropeniaRequest"})["value"]
    conforms(INVOKE, "post", post_json(app, INVOKE_URL, example), 200)


def test_feedback_conforms(app: Flask) -> None:
    invoked = conforms(INVOKE, "post", post_json(app, INVOKE_URL, hook_request(febrile_neutropenic_prefetch())), 200)
    cards = invoked["cards"]
    card_uuid = cards[0]["uuid"] if cards else str(uuid.uuid4())
    suggestion = cards[0]["suggestions"][0]["uuid"] if cards and cards[0].get("suggestions") else str(uuid.uuid4())
    feedback = {"feedback": [
        {"card": card_uuid, "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion}],
         "outcomeTimestamp": _iso(datetime.now(timezone.utc))},
        {"card": str(uuid.uuid4()), "outcome": "overridden",
         "overrideReason": {"reason": {"system": "https://example.org/reasons", "code": "not-applicable"}},
         "outcomeTimestamp": "2025-03-10T12:02:40+01:00"},
    ]}
    assert conforms(FEEDBACK, "post", post_json(app, FEEDBACK_URL, feedback), 200) == {}
    # A repeated report is accepted too.
    assert conforms(FEEDBACK, "post", post_json(app, FEEDBACK_URL, feedback), 200) == {}


@pytest.mark.parametrize(("sent", "echoed"), [("abc-123_X.y", True), ("x" * 65, False), ("bad id!", False)])
def test_x_request_id_is_echoed_only_when_valid(app: Flask, sent: str, echoed: bool) -> None:
    response = app.test_client().get("/healthz", headers={"X-Request-ID": sent})
    conforms("/healthz", "get", response, 200)
    assert (response.headers["X-Request-ID"] == sent) is echoed


def test_healthz_and_readyz_conform(app: Flask) -> None:
    client = app.test_client()
    assert conforms("/healthz", "get", client.get("/healthz"), 200) == {"status": "ok"}
    assert conforms("/readyz", "get", client.get("/readyz"), 200) == {"status": "ready"}


@pytest.mark.parametrize("path", ["/cds-services", INVOKE_URL, FEEDBACK_URL, "/healthz", "/readyz"])
def test_cors_preflight_conforms_without_a_token(make_app: Callable[..., Flask], path: str) -> None:
    app = make_app(AUTH="disabled", CORS_ORIGINS="https://sandbox.cds-hooks.org")
    document_path = {INVOKE_URL: INVOKE, FEEDBACK_URL: FEEDBACK}.get(path, path)
    response = app.test_client().options(path, headers={
        "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code in (200, 204)
    conforms(document_path, "options", response, response.status_code)
    assert response.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_cors_preflight_from_an_unknown_origin_gets_no_cors_headers(make_app: Callable[..., Flask]) -> None:
    app = make_app(CORS_ORIGINS="https://sandbox.cds-hooks.org")
    response = app.test_client().options(INVOKE_URL, headers={"Origin": "https://evil.example"})
    conforms(INVOKE, "options", response, response.status_code)
    assert "Access-Control-Allow-Origin" not in response.headers


def test_preflight_needs_no_token_when_auth_is_on(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = make_app(**_auth_required(tmp_path), CORS_ORIGINS="*")
    for path, document_path in (("/cds-services", "/cds-services"), (INVOKE_URL, INVOKE), (FEEDBACK_URL, FEEDBACK)):
        response = app.test_client().options(path, headers={"Origin": "https://sandbox.cds-hooks.org"})
        conforms(document_path, "options", response, response.status_code)
        assert response.headers["Access-Control-Allow-Origin"] == "*"


# ------------------------------------------------------------------------------------------------ errors

def _auth_required(tmp_path: Path) -> dict[str, str]:
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({"issuers": [
        {"iss": "https://ehr.example.org", "jku": ["https://ehr.example.org/.well-known/jwks.json"]}]}))
    return {"AUTH": "required", "PUBLIC_BASE_URL": "https://cds.example.org", "TRUSTED_ISSUERS_FILE": str(issuers)}


@pytest.mark.parametrize(("path", "method", "url", "body"), [
    ("/cds-services", "get", "/cds-services", None),
    (INVOKE, "post", INVOKE_URL, "invoke"),
    (FEEDBACK, "post", FEEDBACK_URL, "feedback"),
])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-jwt", "Basic dXNlcjpwYXNz"])
def test_401_conforms(make_app: Callable[..., Flask], tmp_path: Path, path: str, method: str, url: str,
                      body: str | None, authorization: str | None) -> None:
    app = make_app(**_auth_required(tmp_path))
    headers = {"Authorization": authorization} if authorization else {}
    payload = {"invoke": hook_request(empty_prefetch()),
               "feedback": {"feedback": [{"card": "c", "outcome": "overridden",
                                          "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}}.get(body or "")
    response = app.test_client().open(url, method=method.upper(), headers=headers,
                                      data=None if payload is None else json.dumps(payload),
                                      content_type=None if payload is None else "application/json")
    body_json = conforms(path, method, response, 401)
    assert body_json["issue"] == [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}]


@pytest.mark.parametrize(("raw", "content_type"), [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b"[]", "application/json"),
    (b'{"hook": "patient-view", "hookInstance": "x", "context": {}, "x": NaN}', "application/json"),
    (b"\xff\xfe{}", "application/json"),
])
def test_400_for_a_body_that_is_not_a_json_object_conforms(app: Flask, raw: bytes, content_type: str) -> None:
    response = app.test_client().post(INVOKE_URL, data=raw, content_type=content_type)
    conforms(INVOKE, "post", response, 400)


@pytest.mark.parametrize(("change", "expression"), [
    ({"hookInstance": None}, "hookInstance"),
    ({"hook": "order-sign"}, "hook"),
    ({"context": {"patientId": "1"}}, "context.userId"),
    ({"context": {"userId": "Practitioner/1", "patientId": "../Patient/1"}}, "context.patientId"),
    ({"context": {"userId": "1", "patientId": "1"}}, "context.userId"),
    ({"fhirAuthorization": {"access_token": "t", "token_type": "Bearer", "expires_in": 300, "scope": "s",
                            "subject": "s"}}, "fhirServer"),
    ({"fhirServer": "ftp://ehr.example.org"}, "fhirServer"),
])
def test_400_for_an_invalid_hook_request_names_the_field(app: Flask, change: dict[str, Any], expression: str) -> None:
    body = hook_request(empty_prefetch())
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    outcome = conforms(INVOKE, "post", post_json(app, INVOKE_URL, body), 400)
    assert expression in [e for issue in outcome["issue"] for e in issue.get("expression", [])]


@pytest.mark.parametrize("feedback", [
    {},
    {"feedback": []},
    {"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]},
    {"feedback": [{"card": "c", "outcome": "maybe", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]},
    {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "yesterday"}]},
])
def test_400_for_invalid_feedback_conforms(app: Flask, feedback: dict[str, Any]) -> None:
    conforms(FEEDBACK, "post", post_json(app, FEEDBACK_URL, feedback), 400)


def test_404_for_an_unknown_service_conforms(app: Flask) -> None:
    conforms(INVOKE, "post", post_json(app, "/cds-services/no-such-service", hook_request(empty_prefetch())), 404)
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}
    conforms(FEEDBACK, "post", post_json(app, "/cds-services/no-such-service/feedback", feedback), 404)


@pytest.mark.parametrize("path", ["/", "/nope", "/cds-services/a/b/c", "/cds-services/x/feedback/y"])
def test_404_for_an_unknown_path_conforms(app: Flask, path: str) -> None:
    conforms_to_component("NotFound", app.test_client().get(path), 404)


@pytest.mark.parametrize(("method", "url", "allowed"), [
    ("GET", INVOKE_URL, {"OPTIONS", "POST"}),
    ("PUT", INVOKE_URL, {"OPTIONS", "POST"}),
    ("DELETE", "/cds-services", {"GET", "HEAD", "OPTIONS"}),
    ("POST", "/cds-services", {"GET", "HEAD", "OPTIONS"}),
    ("GET", FEEDBACK_URL, {"OPTIONS", "POST"}),
    ("POST", "/healthz", {"GET", "HEAD", "OPTIONS"}),
    ("PATCH", "/readyz", {"GET", "HEAD", "OPTIONS"}),
])
def test_405_conforms_with_an_allow_header(app: Flask, method: str, url: str, allowed: set[str]) -> None:
    response = app.test_client().open(url, method=method)
    conforms_to_component("MethodNotAllowed", response, 405)
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


def test_413_conforms(make_app: Callable[..., Flask]) -> None:
    app = make_app(MAX_BODY_BYTES=512)
    body = hook_request(empty_prefetch(), extension={"padding": "x" * 1024})
    conforms(INVOKE, "post", post_json(app, INVOKE_URL, body), 413)
    feedback = {"feedback": [{"card": "c" * 1024, "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}
    conforms(FEEDBACK, "post", post_json(app, FEEDBACK_URL, feedback), 413)


def test_413_without_a_content_length_conforms(make_app: Callable[..., Flask]) -> None:
    """A chunked upload (no Content-Length) over the limit is refused as it is read."""
    app = make_app(MAX_BODY_BYTES=512)
    raw = json.dumps(hook_request(empty_prefetch(), extension={"padding": "x" * 1024})).encode()
    environ = EnvironBuilder(INVOKE_URL, method="POST", input_stream=io.BytesIO(raw),
                             content_type="application/json").get_environ()
    # As gunicorn presents a chunked upload: no Content-Length, the server terminates (de-chunks) the stream.
    # (The Transfer-Encoding header is left out: werkzeug's test client would try to de-chunk the raw body.)
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    conforms(INVOKE, "post", app.test_client().open(environ), 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None])
def test_415_conforms(app: Flask, content_type: str | None) -> None:
    raw = json.dumps(hook_request(empty_prefetch()))
    headers = {"Content-Type": content_type} if content_type else {}
    conforms(INVOKE, "post", app.test_client().post(INVOKE_URL, data=raw, headers=headers), 415)
    raw_feedback = json.dumps({"feedback": [{"card": "c", "outcome": "overridden",
                                             "outcomeTimestamp": "2025-03-10T12:00:00Z"}]})
    conforms(FEEDBACK, "post", app.test_client().post(FEEDBACK_URL, data=raw_feedback, headers=headers), 415)


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_415_for_a_content_coding_conforms(app: Flask, encoding: str) -> None:
    raw = json.dumps(hook_request(empty_prefetch())).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    response = app.test_client().post(INVOKE_URL, data=gzip.compress(raw), headers=headers)
    conforms(INVOKE, "post", response, 415)
    assert response.headers["Accept-Encoding"] == "identity"
    raw_feedback = json.dumps({"feedback": [{"card": "c", "outcome": "overridden",
                                             "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}).encode()
    conforms(FEEDBACK, "post", app.test_client().post(FEEDBACK_URL, data=raw_feedback, headers=headers), 415)


def test_412_without_prefetch_or_fhir_server_names_the_required_keys(app: Flask) -> None:
    outcome = conforms(INVOKE, "post", post_json(app, INVOKE_URL, hook_request()), 412)
    expressions = {e for issue in outcome["issue"] for e in issue["expression"]}
    assert expressions == {"prefetch.labs", "prefetch.vitals"}


def test_412_when_the_client_sent_an_operation_outcome_for_labs(app: Flask) -> None:
    prefetch = {**empty_prefetch(), "labs": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "timeout", "diagnostics": "lab system timed out"}]}}
    outcome = conforms(INVOKE, "post", post_json(app, INVOKE_URL, hook_request(prefetch)), 412)
    assert [issue["expression"] for issue in outcome["issue"]] == [["prefetch.labs"]]


def test_412_when_fhir_server_is_not_on_the_allowlist(app: Flask) -> None:
    body = hook_request({"patient": None}, fhirServer="https://ehr.example.org/fhir",
                        fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "patient/*.read", "subject": "cds"})
    conforms(INVOKE, "post", post_json(app, INVOKE_URL, body), 412)


def test_503_from_readyz_conforms(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.extensions["neutropenia_cds"]["store"], "ping", lambda: False)
    conforms("/readyz", "get", app.test_client().get("/readyz"), 503)


def test_503_from_feedback_when_the_store_is_down_conforms(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_: Any, **__: Any) -> Any:
        raise ServiceUnavailable("feedback store unavailable")

    monkeypatch.setattr(app.extensions["neutropenia_cds"]["store"], "save_feedback", down)
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}
    conforms(FEEDBACK, "post", post_json(app, FEEDBACK_URL, feedback), 503)


def test_500_is_still_an_operation_outcome(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.extensions["neutropenia_cds"]["store"], "save_feedback", bug)
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}
    outcome = conforms(FEEDBACK, "post", post_json(app, FEEDBACK_URL, feedback), 500)
    assert "a bug" not in json.dumps(outcome)


# ------------------------------------------------------------------------------------------------ card rendering

def _assessment(findings: tuple[Finding, ...]) -> Assessment:
    """An assessment carrying ``findings`` with every optional part filled, as the engine could produce it."""
    now = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
    return Assessment(
        evaluated_at=now,
        findings=findings,
        anc=Anc(cells_per_ul=Decimal("400"), ctcae_grade=4, method="computed", effective=now - timedelta(hours=3),
                status="preliminary", preliminary=True, stale=False,
                sources=("Observation/wbc-1", "Observation/neut-pct-1"), formula="wbc*total%"),
        fever=Fever(max_celsius=Decimal("38.45"), criterion="sustained", effective=now - timedelta(hours=1),
                    sources=("Observation/temp-1", "Observation/temp-2"), since=now - timedelta(hours=2)),
        anc_trend=(AncPoint(Decimal("900"), now - timedelta(days=2), "Observation/anc-0"),
                   AncPoint(Decimal("400"), now - timedelta(hours=3), "Observation/wbc-1")),
        risk_factors=(CodedRef("http://snomed.info/sct", "91861009", "Acute myeloid leukemia", "Condition/aml"),),
        medications=(CodedRef("http://www.nlm.nih.gov/research/umls/rxnorm", "2626", None,
                              "MedicationRequest/clozapine"),),
        chemotherapy_context=True,
        age_years=63,
        data_issues=(DataIssue("anc-uninterpretable", "Observation/anc-x", "no unit"),
                     DataIssue("data-unavailable", None, "medications: timed out")),
    )


@pytest.mark.parametrize("finding", list(Finding), ids=[f.value for f in Finding])
def test_rendered_cards_and_extension_conform_for_every_finding(finding: Finding) -> None:
    """cards.render + assessment_extension, independent of the engine: every finding gives a conforming body."""
    findings = (finding, Finding.NEUTROPENIA_SEVERE) if finding is Finding.NEUTROPENIA_PROFOUND else (finding,)
    assessment = _assessment(findings)
    counter = iter(range(10**6))
    cards = [card.stamped(lambda: uuid.UUID(int=next(counter) + 1))
             for card in render(assessment, patient_id="1")]
    body = ServiceResponse(cards=cards, extension={EXTENSION_KEY: assessment_extension(assessment)}).to_json()
    assert_valid(body, "/components/schemas/ServiceResponse")


def test_rendered_cards_conform_for_all_findings_at_once() -> None:
    assessment = _assessment(tuple(Finding))
    cards = [card.stamped(uuid.uuid4) for card in render(assessment, patient_id="1")]
    body = ServiceResponse(cards=cards, extension={EXTENSION_KEY: assessment_extension(assessment)}).to_json()
    assert_valid(body, "/components/schemas/ServiceResponse")
    kinds = [card["source"]["topic"]["code"] for card in body["cards"]]
    assert len(kinds) == len(set(kinds))


# ------------------------------------------------------------------------------------------------ never a 5xx
# Inputs at the edges of the value space that a conforming client (or a careless EHR) can send. Each must get a
# documented 200 or 4xx, never a 500.

def _status_in(response: TestResponse, path: str, method: str, allowed: tuple[int, ...]) -> None:
    assert response.status_code in allowed, (response.status_code, response.get_data(as_text=True)[:500])
    conforms(path, method, response, response.status_code)


@pytest.mark.parametrize("timestamp", [
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "2025-03-10T12:00:00.123456789+14:00",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
])
def test_feedback_timestamps_at_the_ends_of_the_calendar_are_not_a_server_error(app: Flask, timestamp: str) -> None:
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": timestamp}]}
    _status_in(post_json(app, FEEDBACK_URL, feedback), FEEDBACK, "post", (200, 400))


@pytest.mark.parametrize("expires_in", [
    0, 2**31, 10**20, 10**400,
], ids=["0", "2**31", "10**20", "10**400"])
def test_a_huge_expires_in_is_not_a_server_error(make_app: Callable[..., Flask], expires_in: int) -> None:
    app = make_app(FHIR_ALLOWED_BASES="https://ehr.example.org")
    # Every key is prefetched, so nothing is fetched whatever the outcome.
    body = hook_request(empty_prefetch(), fhirServer="https://ehr.example.org/fhir",
                        fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": expires_in,
                                           "scope": "patient/*.read", "subject": "cds"})
    _status_in(post_json(app, INVOKE_URL, body), INVOKE, "post", (200, 400))


def _with_raw_value(prefetch: dict[str, Any], raw: str) -> str:
    """The request JSON with the sentinel value replaced by ``raw`` verbatim (numbers Python would not write)."""
    return json.dumps(hook_request(prefetch)).replace('"__VALUE__"', raw)


@pytest.mark.parametrize(("code", "unit", "raw"), [
    ("751-8", "10*3/uL", "1e400"),
    ("751-8", "10*3/uL", "-0.0"),
    ("751-8", "10*3/uL", "123456789012345678901234567890"),
    ("8310-5", "Cel", "1e400"),
    ("8310-5", "[degF]", "-459.67"),
    ("8310-5", "Cel", "10000000000000000000"),
    ("8310-5", "Cel", "1e30"),
    ("8310-5", "[degF]", "123456789012345678901234567890"),
])
def test_absurd_observation_values_are_not_a_server_error(app: Flask, code: str, unit: str, raw: str) -> None:
    observation = _observation("odd-1", code, 0, unit, hours_ago=1)
    observation["valueQuantity"]["value"] = "__VALUE__"
    key = "vitals" if code == "8310-5" else "labs"
    body = _with_raw_value({**empty_prefetch(), key: _searchset(observation)}, raw)
    response = app.test_client().post(INVOKE_URL, data=body, content_type="application/json")
    _status_in(response, INVOKE, "post", (200,))


@pytest.mark.parametrize("effective", [
    "1000-01-01", "9999-12-31", "9999-12-31T23:59:59-01:00", "2025-03-10T10:00:00",
    "0001-02-01", "0999-06-15T08:00:00Z", "0001", "0001-01-01", "0001-01-01T00:00:00Z",
])
def test_odd_effective_times_are_not_a_server_error(app: Flask, effective: str) -> None:
    anc = _observation("anc-odd", "751-8", 0.4, "10*3/uL", hours_ago=1)
    anc["effectiveDateTime"] = effective
    temperature = _observation("temp-odd", "8310-5", 38.6, "Cel", hours_ago=1)
    temperature["effectiveDateTime"] = effective
    for labs, vitals in (([anc], []), ([], [temperature]), ([anc], [temperature])):
        prefetch = {**empty_prefetch(), "labs": _searchset(*labs), "vitals": _searchset(*vitals)}
        _status_in(post_json(app, INVOKE_URL, hook_request(prefetch)), INVOKE, "post", (200,))
