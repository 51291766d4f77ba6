"""Token attacks over HTTP with authentication on: every forged, stale, misaimed or replayed token is a 401.

``tests/cds_hooks/test_auth.py`` proves the verifier refuses each case; this proves the service does, end to end:
every case is a 401 whose body is exactly the fixed OperationOutcome (nothing about why), whose reason is logged
(and the token is not), never a 5xx, and nothing reaches a ``jku`` that is not allowlisted. The table runs in
process against the real app; the cases that depend on the server (a 20 KiB and a 40 KiB header, a replay raced
across gunicorn workers, jku traffic from several processes) run against gunicorn on loopback.

Trusted issuers: a Sandbox-like client (ES384, pinned, no jku), an EHR whose ES384 keys are
only at an allowlisted ``jku`` on a loopback stub, an Epic-like RS384 issuer (pinned), and a tenant-restricted
issuer. The unlisted ``jku`` and the allowlisted one live on the same stub, so requests to each are counted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from cds_hooks.auth import AuthFailure
from cds_hooks.testing.tokens import (
    ClientKey,
    TokenSigner,
    b64url,
    tamper_payload,
    write_issuer_config,
)
from service.app import create_app
from tests.support.fhir_stub_server import FhirStub

SERVICE = "neutropenia-patient-view"
UNAUTHORIZED = {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}]}
EHR_ISS = "https://ehr.example.org/fhir"
EPIC_ISS = "https://epic.example.org/api/FHIR/R4"
TENANT_ISS = "https://tenanted.example.org"
JKU_PATH = "/ehr/jwks.json"
UNLISTED_JKU_PATH = "/attacker/jwks.json"
INVOKE_BODY = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
               "context": {"userId": "Practitioner/u1", "patientId": "p1"},
               "prefetch": {"patient": None, "labs": None, "vitals": None, "conditions": None, "medications": None}}


@dataclass
class Keys:
    """The trusted clients' signers and an attacker's."""

    sandbox: TokenSigner
    ehr: TokenSigner
    epic: TokenSigner
    tenanted: TokenSigner
    attacker: TokenSigner
    stub: FhirStub

    @property
    def jku(self) -> str:
        return self.stub.url(JKU_PATH)

    @property
    def unlisted_jku(self) -> str:
        return self.stub.url(UNLISTED_JKU_PATH)

    def fetches(self, path: str = JKU_PATH) -> int:
        return len(self.stub.requests_for(path))


def make_keys(stub: FhirStub) -> Keys:
    """Fresh keys; the EHR's JWK Set is served at the stub's allowlisted jku, the attacker's at an unlisted one."""
    ehr = TokenSigner(ClientKey.generate("ES384"), iss=EHR_ISS, jku=stub.url(JKU_PATH))
    attacker = TokenSigner(ClientKey.generate("ES384"), iss=EHR_ISS, jku=stub.url(UNLISTED_JKU_PATH))
    stub.add(JKU_PATH, ehr.jwks(), content_type="application/json")
    stub.add(UNLISTED_JKU_PATH, attacker.jwks(), content_type="application/json")
    # The Sandbox-like issuer is pinned only (no jku): nothing in these tests may reach the real Sandbox.
    return Keys(sandbox=TokenSigner(ClientKey.generate("ES384")), ehr=ehr,
                epic=TokenSigner(ClientKey.generate("RS384"), iss=EPIC_ISS),
                tenanted=TokenSigner(ClientKey.generate("ES384"), iss=TENANT_ISS), attacker=attacker, stub=stub)


def issuers_file(directory: Path, keys: Keys) -> Path:
    return write_issuer_config(directory / "issuers.json", [
        keys.sandbox.issuer_entry(),
        keys.ehr.issuer_entry(pinned=False),
        keys.epic.issuer_entry(),
        keys.tenanted.issuer_entry(tenants=["tenant-a"]),
    ])


# --- the attacks -------------------------------------------------------------------------------------------------

#: A case builds the Authorization header value (None: no header) for a call to the URL ``aud``.
Attack = Callable[[Keys, str], "str | None"]


def bearer(token: str) -> str:
    return f"Bearer {token}"


def _segments(token: str) -> list[str]:
    return token.split(".")


def _hmac_with_public_key(signer: TokenSigner, aud: str, alg: str) -> str:
    """alg HS256/384/512 keyed with the client's public PEM: the classic key-confusion forgery."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header = b64url(json.dumps(signer.header(headers={"alg": alg})).encode())
    payload = b64url(json.dumps(signer.claims(aud)).encode())
    mac = hmac.new(signer.key.public_pem(), f"{header}.{payload}".encode(), digest).digest()
    return f"{header}.{payload}.{b64url(mac)}"


def _unsigned(signer: TokenSigner, aud: str, alg: str) -> str:
    return signer.unsigned(aud, headers={"alg": alg})


def _rs384_header_with_the_ec_key(k: Keys, aud: str) -> str:
    # Signed with some RSA key, but the kid names the Sandbox's pinned EC key: the verifier must not even try.
    return TokenSigner(ClientKey.generate("RS384")).sign(aud, kid=k.sandbox.key.kid)


def _es384_header_with_the_rsa_key(k: Keys, aud: str) -> str:
    return TokenSigner(ClientKey.generate("ES384"), iss=EPIC_ISS).sign(aud, kid=k.epic.key.kid)


def _embedded_jwk(k: Keys, aud: str) -> str:
    # The attacker ships its own public key in the header (RFC 7515 "jwk"); it must never be trusted.
    return k.attacker.sign(aud, iss=k.sandbox.iss, headers={"jku": None, "jwk": k.attacker.key.public_jwk()})


def _spliced_signature(k: Keys, aud: str) -> str:
    """The header and claims of one valid token with the (valid) signature of another."""
    first, second = k.sandbox.sign(aud), k.sandbox.sign(aud)
    return ".".join(_segments(first)[:2] + _segments(second)[2:])


def _now() -> int:
    return int(time.time())


ATTACKS: list[tuple[str, Attack, AuthFailure]] = [
    ("no-authorization-header", lambda k, aud: None, AuthFailure.MISSING_AUTHORIZATION),
    ("empty-authorization-header", lambda k, aud: "", AuthFailure.MISSING_AUTHORIZATION),
    ("basic-scheme", lambda k, aud: "Basic dXNlcjpwYXNzd29yZA==", AuthFailure.BAD_SCHEME),
    ("token-without-scheme", lambda k, aud: k.sandbox.sign(aud), AuthFailure.BAD_SCHEME),
    ("two-tokens", lambda k, aud: bearer(k.sandbox.sign(aud) + " " + k.sandbox.sign(aud)), AuthFailure.BAD_SCHEME),
    ("not-a-jws", lambda k, aud: bearer("eyJhbGciOiJFUzM4NCJ9"), AuthFailure.MALFORMED),
    ("header-not-json", lambda k, aud: bearer("bm90IGpzb24." + _segments(k.sandbox.sign(aud))[1] + ".c2ln"),
     AuthFailure.MALFORMED),
    ("jwe-five-segments", lambda k, aud: bearer("a.b.c.d.e"), AuthFailure.MALFORMED),
    ("alg-none", lambda k, aud: bearer(_unsigned(k.sandbox, aud, "none")), AuthFailure.ALG_NOT_ALLOWED),
    ("alg-None-capitalised", lambda k, aud: bearer(_unsigned(k.sandbox, aud, "None")), AuthFailure.ALG_NOT_ALLOWED),
    ("alg-NONE", lambda k, aud: bearer(_unsigned(k.sandbox, aud, "NONE")), AuthFailure.ALG_NOT_ALLOWED),
    ("alg-missing", lambda k, aud: bearer(k.sandbox.unsigned(aud, headers={"alg": None})),
     AuthFailure.ALG_NOT_ALLOWED),
    ("hs256-public-key-as-secret", lambda k, aud: bearer(k.sandbox.hs256_with_public_key(aud)),
     AuthFailure.ALG_NOT_ALLOWED),
    ("hs384-public-key-as-secret", lambda k, aud: bearer(_hmac_with_public_key(k.epic, aud, "HS384")),
     AuthFailure.ALG_NOT_ALLOWED),
    ("hs512-public-key-as-secret", lambda k, aud: bearer(_hmac_with_public_key(k.sandbox, aud, "HS512")),
     AuthFailure.ALG_NOT_ALLOWED),
    ("rs384-header-with-an-ec-key", lambda k, aud: bearer(_rs384_header_with_the_ec_key(k, aud)),
     AuthFailure.ALG_KEY_MISMATCH),
    ("es384-header-with-an-rsa-key", lambda k, aud: bearer(_es384_header_with_the_rsa_key(k, aud)),
     AuthFailure.ALG_KEY_MISMATCH),
    ("es256-not-in-policy", lambda k, aud: bearer(TokenSigner(ClientKey.generate("ES256")).sign(aud)),
     AuthFailure.ALG_NOT_ALLOWED),
    ("ps384-not-in-policy", lambda k, aud: bearer(k.epic.sign(aud, headers={"alg": "PS384"})),
     AuthFailure.ALG_NOT_ALLOWED),
    ("typ-missing", lambda k, aud: bearer(k.sandbox.sign(aud, headers={"typ": None})), AuthFailure.BAD_TYP),
    ("typ-access-token", lambda k, aud: bearer(k.sandbox.sign(aud, headers={"typ": "at+jwt"})), AuthFailure.BAD_TYP),
    ("kid-missing", lambda k, aud: bearer(k.sandbox.sign(aud, headers={"kid": None})), AuthFailure.MISSING_KID),
    ("kid-not-a-string", lambda k, aud: bearer(k.sandbox.sign(aud, headers={"kid": 7})), AuthFailure.MALFORMED),
    ("expired", lambda k, aud: bearer(k.sandbox.sign(aud, now=_now() - 3600)), AuthFailure.EXPIRED),
    ("expired-just-past-the-skew", lambda k, aud: bearer(k.sandbox.sign(aud, now=_now() - 300 - 65)),
     AuthFailure.EXPIRED),
    ("iat-in-the-future-past-the-skew", lambda k, aud: bearer(k.sandbox.sign(aud, now=_now() + 120)),
     AuthFailure.IAT_IN_FUTURE),
    ("nbf-in-the-future", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"nbf": _now() + 600})),
     AuthFailure.NOT_YET_VALID),
    ("exp-before-iat", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"exp": _now() - 10,
                                                                               "iat": _now() - 5})),
     AuthFailure.INVALID_CLAIM),
    ("lifetime-over-the-maximum", lambda k, aud: bearer(k.sandbox.sign(aud, lifetime=3601)),
     AuthFailure.LIFETIME_TOO_LONG),
    ("exp-in-the-year-5000", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"exp": 95617584000})),
     AuthFailure.LIFETIME_TOO_LONG),
    ("exp-a-string", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"exp": "tomorrow"})),
     AuthFailure.INVALID_CLAIM),
    ("exp-a-boolean", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"exp": True})),
     AuthFailure.INVALID_CLAIM),
    # Integers beyond a double (JSON has no limit; Python reads 4300 digits): math.isfinite raised OverflowError.
    ("exp-an-integer-beyond-a-double", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"exp": 10**400})),
     AuthFailure.INVALID_CLAIM),
    ("iat-an-integer-beyond-a-double", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"iat": -10**400})),
     AuthFailure.INVALID_CLAIM),
    ("nbf-an-integer-beyond-a-double", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"nbf": 10**309})),
     AuthFailure.INVALID_CLAIM),
    ("wrong-aud", lambda k, aud: bearer(k.sandbox.sign("https://cds.example.org/cds-services")),
     AuthFailure.AUD_MISMATCH),
    ("aud-of-another-endpoint", lambda k, aud: bearer(k.sandbox.sign(aud.rsplit("/", 1)[0] + "/other")),
     AuthFailure.AUD_MISMATCH),
    ("aud-with-a-trailing-slash", lambda k, aud: bearer(k.sandbox.sign(aud + "/")), AuthFailure.AUD_MISMATCH),
    ("aud-https-for-http", lambda k, aud: bearer(k.sandbox.sign(aud.replace("http://", "https://"))),
     AuthFailure.AUD_MISMATCH),
    ("aud-array-without-ours", lambda k, aud: bearer(k.sandbox.sign(["https://a.example", aud + "x"])),
     AuthFailure.AUD_MISMATCH),
    ("aud-another-issuers-extra-audience", lambda k, aud: bearer(k.sandbox.sign("https://example.com/epic-aud")),
     AuthFailure.AUD_MISMATCH),
    ("aud-empty-array", lambda k, aud: bearer(k.sandbox.sign([])), AuthFailure.INVALID_CLAIM),
    ("aud-a-number", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"aud": 42})),
     AuthFailure.INVALID_CLAIM),
    ("unknown-iss", lambda k, aud: bearer(TokenSigner(ClientKey.generate("ES384"), iss="https://evil.example")
                                          .sign(aud)), AuthFailure.UNTRUSTED_ISSUER),
    ("iss-case-variant", lambda k, aud: bearer(k.sandbox.sign(aud, iss=k.sandbox.iss.upper())),
     AuthFailure.UNTRUSTED_ISSUER),
    ("iss-with-trailing-slash", lambda k, aud: bearer(k.sandbox.sign(aud, iss=k.sandbox.iss + "/")),
     AuthFailure.UNTRUSTED_ISSUER),
    ("iss-a-list", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"iss": [k.sandbox.iss]})),
     AuthFailure.UNTRUSTED_ISSUER),
    ("jku-not-allowlisted", lambda k, aud: bearer(k.attacker.sign(aud)), AuthFailure.JKU_NOT_ALLOWLISTED),
    ("jku-allowlisted-host-other-path", lambda k, aud: bearer(k.attacker.sign(aud, jku=k.jku + "/../../attacker")),
     AuthFailure.JKU_NOT_ALLOWLISTED),
    ("jku-allowlisted-url-plus-query", lambda k, aud: bearer(k.attacker.sign(aud, jku=k.jku + "?x=1")),
     AuthFailure.JKU_NOT_ALLOWLISTED),
    ("jku-not-a-string", lambda k, aud: bearer(k.ehr.sign(aud, jku=None, headers={"jku": [k.jku]})),
     AuthFailure.JKU_NOT_ALLOWLISTED),
    ("jku-unlisted-even-with-a-pinned-kid", lambda k, aud: bearer(k.sandbox.sign(aud, jku=k.unlisted_jku)),
     AuthFailure.JKU_NOT_ALLOWLISTED),
    ("embedded-jwk-header", lambda k, aud: bearer(_embedded_jwk(k, aud)), AuthFailure.UNKNOWN_KID),
    # Keys named in the header (RFC 7515 x5u/x5c) are never used or fetched: the attacker's key, the Sandbox's kid.
    ("x5u-header-names-the-attackers-key", lambda k, aud: bearer(k.attacker.sign(
        aud, iss=k.sandbox.iss, kid=k.sandbox.key.kid, headers={"jku": None, "x5u": k.unlisted_jku})),
     AuthFailure.BAD_SIGNATURE),
    ("x5c-header", lambda k, aud: bearer(k.attacker.sign(aud, iss=k.sandbox.iss, kid=k.sandbox.key.kid,
                                                         headers={"jku": None, "x5c": [b64url(b"\x30\x82")]})),
     AuthFailure.BAD_SIGNATURE),
    # A critical header extension we do not implement must refuse the token (RFC 7515 §4.1.11), as must
    # an unencoded payload (RFC 7797 b64: false).
    ("crit-unknown-extension", lambda k, aud: bearer(k.sandbox.sign(aud, headers={"crit": ["exp"], "exp": 1})),
     AuthFailure.MALFORMED),
    ("b64-false", lambda k, aud: bearer(k.sandbox.sign(aud, headers={"b64": False, "crit": ["b64"]})),
     AuthFailure.MALFORMED),
    ("unknown-kid-pinned-issuer", lambda k, aud: bearer(k.sandbox.sign(aud, kid="rotated-away")),
     AuthFailure.UNKNOWN_KID),
    ("kid-path-traversal", lambda k, aud: bearer(k.sandbox.sign(aud, kid="../../../etc/passwd")),
     AuthFailure.UNKNOWN_KID),
    ("missing-iss", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"iss": None})), AuthFailure.MISSING_CLAIM),
    ("missing-aud", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"aud": None})), AuthFailure.MISSING_CLAIM),
    ("missing-exp", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"exp": None})), AuthFailure.MISSING_CLAIM),
    ("missing-iat", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"iat": None})), AuthFailure.MISSING_CLAIM),
    ("missing-jti", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"jti": None})), AuthFailure.MISSING_CLAIM),
    ("jti-a-number", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"jti": 12345})),
     AuthFailure.INVALID_CLAIM),
    ("jti-empty", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"jti": ""})), AuthFailure.INVALID_CLAIM),
    ("jti-over-256-characters", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"jti": "j" * 257})),
     AuthFailure.INVALID_CLAIM),
    ("jti-with-nul", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"jti": "j\x00"})),
     AuthFailure.INVALID_CLAIM),
    ("jti-lone-surrogate", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"jti": "\ud800"})),
     AuthFailure.INVALID_CLAIM),
    ("sub-not-a-string", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"sub": {"id": 1}})),
     AuthFailure.INVALID_CLAIM),
    ("tenant-not-allowed", lambda k, aud: bearer(k.tenanted.sign(aud, extra_claims={"tenant": "tenant-b"})),
     AuthFailure.TENANT_NOT_ALLOWED),
    ("tenant-missing", lambda k, aud: bearer(k.tenanted.sign(aud)), AuthFailure.TENANT_NOT_ALLOWED),
    ("tampered-payload-aud", lambda k, aud: bearer(tamper_payload(k.sandbox.sign("https://elsewhere.example"),
                                                                  {"aud": aud})), AuthFailure.BAD_SIGNATURE),
    ("tampered-payload-exp", lambda k, aud: bearer(tamper_payload(k.sandbox.sign(aud, now=_now() - 3600),
                                                                  {"exp": _now() + 200, "iat": _now()})),
     AuthFailure.BAD_SIGNATURE),
    ("tampered-payload-iss", lambda k, aud: bearer(tamper_payload(k.epic.sign(aud), {"iss": k.sandbox.iss})),
     AuthFailure.UNKNOWN_KID),
    ("signature-stripped", lambda k, aud: bearer(k.sandbox.sign(aud).rsplit(".", 1)[0] + "."),
     AuthFailure.BAD_SIGNATURE),
    ("signature-of-another-token", lambda k, aud: bearer(_spliced_signature(k, aud)), AuthFailure.BAD_SIGNATURE),
    ("same-kid-other-key", lambda k, aud: bearer(TokenSigner(ClientKey.generate("ES384", kid=k.sandbox.key.kid))
                                                 .sign(aud)), AuthFailure.BAD_SIGNATURE),
    ("oversized-token-20kib", lambda k, aud: bearer(k.sandbox.sign(aud, extra_claims={"pad": "x" * 15_000})),
     AuthFailure.TOKEN_TOO_LARGE),
]



# --- in process --------------------------------------------------------------------------------------------------

BASE = "http://localhost"  # the Flask test client's host; CDS_PUBLIC_BASE_URL, so aud is BASE + path
ROUTES = [("GET", "/cds-services", None), ("POST", f"/cds-services/{SERVICE}", INVOKE_BODY),
          ("POST", f"/cds-services/{SERVICE}/feedback",
           {"feedback": [{"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:05:00Z"}]})]


@dataclass
class InProcess:
    app: Flask
    keys: Keys


def _in_process(directory: Path, stub: FhirStub) -> InProcess:
    keys = make_keys(stub)
    app = create_app({"AUTH": "required", "PUBLIC_BASE_URL": BASE,
                      "TRUSTED_ISSUERS_FILE": str(issuers_file(directory, keys)),
                      "DATABASE_URL": f"sqlite:///{directory}/f.db"}, environ={})
    return InProcess(app, keys)


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    """One app for the attack table (no attack is ever accepted, so no case changes another's state)."""
    with FhirStub() as stub:
        service = _in_process(tmp_path_factory.mktemp("attacks"), stub)
        yield service
        service.app.extensions["neutropenia_cds"]["store"].dispose()


@pytest.fixture
def service(tmp_path: Path, make_fhir_stub: Any) -> Iterator[InProcess]:
    """A fresh app (so the jku cache, its rate limit and the jti store start empty), auth on."""
    service = _in_process(tmp_path, make_fhir_stub())
    yield service
    service.app.extensions["neutropenia_cds"]["store"].dispose()


def call(app: Flask, method: str, path: str, body: Any, authorization: str | None) -> Any:
    headers = {} if authorization is None else {"Authorization": authorization}
    return app.test_client().open(path, method=method, json=body, headers=headers)


def assert_refused(response: Any) -> None:
    """Exactly the fixed 401: never a 5xx, never a hint of why."""
    assert response.status_code == 401, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    assert json.loads(response.get_data(as_text=True)) == UNAUTHORIZED
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="cds-services"'


@pytest.mark.parametrize("route", ROUTES, ids=["discovery", "invoke", "feedback"])
@pytest.mark.parametrize(("attack", "failure"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_is_a_bare_401_with_its_reason_logged(shared_service: InProcess, caplog: pytest.LogCaptureFixture,
                                                      route: tuple[str, str, Any], attack: Attack,
                                                      failure: AuthFailure) -> None:
    service = shared_service
    caplog.set_level(logging.WARNING)
    method, path, body = route
    header = attack(service.keys, BASE + path)
    assert_refused(call(service.app, method, path, body, header))
    reasons = [r.getMessage() for r in caplog.records if r.name == "cds_hooks.auth"]
    assert len(reasons) == 1 and reasons[0].startswith(f"CDS client token refused: {failure}: "), reasons
    token = (header or "").split()[-1] if header else ""
    for secret in [token, *[part for part in token.split(".") if len(part) > 8]]:
        assert not secret or secret not in caplog.text
    assert service.keys.fetches(UNLISTED_JKU_PATH) == 0


@pytest.mark.parametrize("route", ROUTES, ids=["discovery", "invoke", "feedback"])
def test_the_same_clients_well_formed_tokens_are_accepted(service: InProcess, route: tuple[str, str, Any]) -> None:
    """The control: every trusted issuer's proper token passes, so the refusals above are about the attack."""
    method, path, body = route
    aud = BASE + path
    now = _now()
    for header in [bearer(service.keys.sandbox.sign(aud)), bearer(service.keys.ehr.sign(aud)),
                   bearer(service.keys.epic.sign([aud, "https://other.example"], extra_claims={"nbf": now - 30})),
                   bearer(service.keys.tenanted.sign(aud, extra_claims={"tenant": "tenant-a"})),
                   bearer(service.keys.sandbox.sign(aud, now=now - 300 - 30)),  # expired 30 s ago: inside the skew
                   bearer(service.keys.sandbox.sign(aud, now=now + 30)),  # iat 30 s ahead: inside the skew
                   "bearer " + service.keys.sandbox.sign(aud)]:  # the scheme is case-insensitive (RFC 7235)
        response = call(service.app, method, path, body, header)
        assert response.status_code in (200, 412), (header[:40], response.get_data(as_text=True)[:300])


def test_replayed_jti_is_refused(service: InProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    aud = f"{BASE}/cds-services"
    token = service.keys.sandbox.sign(aud)
    assert call(service.app, "GET", "/cds-services", None, bearer(token)).status_code == 200
    for _ in range(3):
        assert_refused(call(service.app, "GET", "/cds-services", None, bearer(token)))
    assert sum(AuthFailure.REPLAYED in r.getMessage() for r in caplog.records if r.name == "cds_hooks.auth") == 3
    # The jti is per issuer: the same jti from another issuer is a different token.
    jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["jti"]
    other = service.keys.epic.sign(aud, extra_claims={"jti": jti})
    assert call(service.app, "GET", "/cds-services", None, bearer(other)).status_code == 200


def test_a_refused_token_does_not_burn_its_jti(service: InProcess) -> None:
    aud = f"{BASE}/cds-services"
    jti = str(uuid.uuid4())
    wrong_aud = service.keys.sandbox.sign(aud + "/x", extra_claims={"jti": jti})
    assert_refused(call(service.app, "GET", "/cds-services", None, bearer(wrong_aud)))
    right = service.keys.sandbox.sign(aud, extra_claims={"jti": jti})
    assert call(service.app, "GET", "/cds-services", None, bearer(right)).status_code == 200


def test_unlisted_jku_is_never_fetched(service: InProcess) -> None:
    for _ in range(10):
        assert_refused(call(service.app, "GET", "/cds-services", None,
                            bearer(service.keys.attacker.sign(f"{BASE}/cds-services"))))
    assert service.keys.stub.requests == []


def test_unknown_kid_is_fetched_once_then_rate_limited(service: InProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    keys, aud = service.keys, f"{BASE}/cds-services"
    # The first token names a kid the EHR never published: one fetch of its (allowlisted) JWK Set, then 401.
    assert_refused(call(service.app, "GET", "/cds-services", None, bearer(keys.ehr.sign(aud, kid="made-up-0"))))
    assert keys.fetches() == 1
    # A stream of made-up kids must not turn the service into an amplifier against the client: no more fetches.
    for index in range(1, 26):
        assert_refused(call(service.app, "GET", "/cds-services", None,
                            bearer(keys.ehr.sign(aud, kid=f"made-up-{index}"))))
    assert keys.fetches() == 1
    assert sum("refetch rate-limited" in r.getMessage() for r in caplog.records if r.name == "cds_hooks.auth") == 25
    # The real kid is served from the cached set: still one fetch.
    assert call(service.app, "GET", "/cds-services", None, bearer(keys.ehr.sign(aud))).status_code == 200
    assert keys.fetches() == 1 and keys.fetches(UNLISTED_JKU_PATH) == 0


def test_jku_serving_a_key_whose_alg_is_not_a_string_is_a_401(service: InProcess) -> None:
    """The allowlisted JWK Set holds a key with ``"alg": ["ES384"]``: that key is unusable (401), never a 500."""
    keys, aud = service.keys, f"{BASE}/cds-services"
    odd = keys.ehr.jwks()
    odd["keys"][0]["alg"] = [odd["keys"][0]["alg"]]
    keys.stub.add(JKU_PATH, odd, content_type="application/json")
    for _ in range(2):  # the fetch, then the rate-limited answer
        assert_refused(call(service.app, "GET", "/cds-services", None, bearer(keys.ehr.sign(aud))))
    assert keys.fetches() == 1


def test_public_base_url_with_a_trailing_slash_accepts_the_audience_clients_send(tmp_path: Path,
                                                                                make_fhir_stub: Any) -> None:
    keys = make_keys(make_fhir_stub())
    app = create_app({"AUTH": "required", "PUBLIC_BASE_URL": BASE + "/",
                      "TRUSTED_ISSUERS_FILE": str(issuers_file(tmp_path, keys)),
                      "DATABASE_URL": f"sqlite:///{tmp_path}/f.db"}, environ={})
    try:
        token = keys.sandbox.sign(f"{BASE}/cds-services")
        assert call(app, "GET", "/cds-services", None, bearer(token)).status_code == 200
        assert_refused(call(app, "GET", "/cds-services", None, bearer(keys.sandbox.sign(f"{BASE}//cds-services"))))
    finally:
        app.extensions["neutropenia_cds"]["store"].dispose()


def test_token_in_the_query_string_is_not_a_token(service: InProcess) -> None:
    token = service.keys.sandbox.sign(f"{BASE}/cds-services")
    assert_refused(service.app.test_client().get(f"/cds-services?access_token={token}"))


def test_count_of_attack_cases() -> None:
    assert len(ATTACKS) >= 60 and len({name for name, _, _ in ATTACKS}) == len(ATTACKS)


# --- under gunicorn ----------------------------------------------------------------------------------------------


@dataclass
class Served:
    base_url: str
    keys: Keys
    log: Callable[[], str]
    workers: int


@pytest.fixture
def served(tmp_path: Path, gunicorn_factory: Any, make_fhir_stub: Any) -> Served:
    keys = make_keys(make_fhir_stub())
    server = gunicorn_factory({"CDS_AUTH": "required", "CDS_PUBLIC_BASE_URL": "{base_url}",
                               "CDS_TRUSTED_ISSUERS_FILE": str(issuers_file(tmp_path, keys)),
                               "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3", "CDS_WORKERS": "4"})
    return Served(server.base_url, keys, server.log, 4)


GUNICORN_ATTACKS = ["alg-none", "hs256-public-key-as-secret", "rs384-header-with-an-ec-key", "expired",
                    "iat-in-the-future-past-the-skew", "nbf-in-the-future", "wrong-aud", "aud-array-without-ours",
                    "unknown-iss", "jku-not-allowlisted", "lifetime-over-the-maximum", "missing-jti",
                    "tampered-payload-aud", "oversized-token-20kib"]


@pytest.mark.gunicorn
def test_attacks_under_gunicorn(served: Served) -> None:
    url = f"{served.base_url}/cds-services"
    by_name = {name: (attack, failure) for name, attack, failure in ATTACKS}
    sent: list[str] = []
    for name in GUNICORN_ATTACKS:
        attack, failure = by_name[name]
        header = attack(served.keys, url)
        assert header is not None
        sent.append(header.split()[-1])
        response = requests.get(url, headers={"Authorization": header}, timeout=10)
        assert response.status_code == 401 and response.json() == UNAUTHORIZED, (name, response.text[:300])
        assert response.headers["Content-Type"] == "application/json"
    time.sleep(0.3)
    log = served.log()
    for name in GUNICORN_ATTACKS:
        assert f"CDS client token refused: {by_name[name][1]}: " in log, name
    leaked = [part for token in sent for part in token.split(".") if len(part) > 8 and part in log]
    assert leaked == []
    assert served.keys.fetches(UNLISTED_JKU_PATH) == 0


def _raw_request(base_url: str, request: bytes) -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


#: (Authorization header size, the answer): up to gunicorn's limit_request_field_size (32 KiB, gunicorn.conf.py)
#: the app refuses the token (over its 16 KiB limit: 401); beyond it gunicorn refuses the header (431).
OVERSIZED = [(20 * 1024, 401), (31 * 1024, 401), (40 * 1024, 431), (256 * 1024, 431)]


@pytest.mark.gunicorn
def test_oversized_authorization_headers_under_gunicorn(served: Served) -> None:
    """Every size gets a JSON OperationOutcome, never gunicorn's HTML page, and no part of the token is logged."""
    for size, status in OVERSIZED:
        claims = served.keys.sandbox.claims(f"{served.base_url}/cds-services")
        pad = (size - len("Authorization: Bearer ") - 2 - 450) * 3 // 4 - len(json.dumps(claims))
        token = served.keys.sandbox.sign(f"{served.base_url}/cds-services", extra_claims={"pad": "p" * pad})
        header = b"Authorization: Bearer " + token.encode()
        assert size - 1024 < len(header) + 2 <= size, (size, len(header))
        answer = _raw_request(served.base_url, b"GET /cds-services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                              + header + b"\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), (size, head[:200])
        assert b"Content-Type: application/json" in head and b"<html" not in body.lower()
        outcome = json.loads(body)
        if status == 401:
            assert outcome == UNAUTHORIZED
        else:
            assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "too-costly"
        log = served.log()
        assert all(part not in log for part in token.split(".")), size


@pytest.mark.gunicorn
def test_replay_raced_across_workers_is_accepted_once(served: Served) -> None:
    """One token sent 24 times at once on separate connections to 4 workers: exactly one 200 (the jti store is
    shared through the database), every other answer the bare 401, none a 5xx."""
    url = f"{served.base_url}/cds-services"
    for round_ in range(3):
        token = served.keys.sandbox.sign(url)
        barrier = threading.Barrier(24)
        statuses: list[int] = []
        lock = threading.Lock()

        def replay() -> None:
            barrier.wait()
            response = requests.get(url, headers={"Authorization": f"Bearer {token}", "Connection": "close"},
                                    timeout=15)
            with lock:
                statuses.append(response.status_code)

        threads = [threading.Thread(target=replay) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [200] + [401] * 23, (round_, statuses)


@pytest.mark.gunicorn
def test_jku_traffic_under_gunicorn(served: Served) -> None:
    """Unlisted jku: never a request. Unknown kids: at most one fetch per worker process, however many tokens."""
    url = f"{served.base_url}/cds-services"
    for index in range(40):
        response = requests.get(url, headers={"Authorization": bearer(served.keys.attacker.sign(url))}, timeout=10)
        assert response.status_code == 401
        response = requests.get(url, headers={"Authorization": bearer(served.keys.ehr.sign(url, kid=f"k{index}"))},
                                timeout=10)
        assert response.status_code == 401
    assert served.keys.fetches(UNLISTED_JKU_PATH) == 0
    assert 1 <= served.keys.fetches() <= served.workers
