"""Client JWT verification (cds_hooks.auth), the JWKS fetcher (cds_hooks.jwks) and the trusted-issuer config."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cds_hooks.auth import (
    AuthFailure,
    AuthPolicy,
    ConfigError,
    ReplayCache,
    TokenVerifier,
    TrustedIssuer,
    load_trusted_issuers,
    parse_trusted_issuers,
)
from cds_hooks.errors import Unauthorized
from cds_hooks.jwks import InvalidJwks, JwksFetcher, JwksFetchError, UnknownKid, index_jwks, key_mismatch
from cds_hooks.testing.tokens import SANDBOX_ISS, ClientKey, TokenSigner, b64url, tamper_payload, write_issuer_config

NOW = 1_800_000_000.0
ENDPOINT = "https://cds.example.org/cds-services/neutropenia-patient-view"
EPIC_ISS = "https://ehr.example.org/api/FHIR/R4"
EPIC_AUD = "https://example.com/savecdshooksrequest"
CERNER_ISS = "https://cds-hooks.cerner.example"


class Clock:
    """A settable clock, for the verifier (epoch seconds) and the fetcher (monotonic seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Kit:
    """The clients of one test: the Sandbox (ES384), an Epic-like EHR (RS384) and a tenant-restricted Cerner."""

    sandbox: TokenSigner
    epic: TokenSigner
    cerner: TokenSigner
    rs_key: ClientKey
    fetches: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def es_key() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture(scope="module")
def rs_key() -> ClientKey:
    return ClientKey.generate("RS384")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def kit(es_key: ClientKey, rs_key: ClientKey, clock: Clock) -> Kit:
    return Kit(sandbox=TokenSigner(es_key, clock=clock), epic=TokenSigner(rs_key, iss=EPIC_ISS, clock=clock),
               cerner=TokenSigner(es_key, iss=CERNER_ISS, clock=clock), rs_key=rs_key)


@pytest.fixture
def verifier(kit: Kit, clock: Clock) -> Iterator[TokenVerifier]:
    issuers = parse_trusted_issuers({"issuers": [
        kit.sandbox.issuer_entry(),
        kit.epic.issuer_entry(audiences=[EPIC_AUD]),
        kit.cerner.issuer_entry(tenants=["tenant-a", "tenant-b"]),
    ]}, Path("."))

    def no_network(url: str) -> Any:
        kit.fetches.append(url)
        raise AssertionError("these issuers are pinned; nothing may be fetched")

    fetcher = JwksFetcher(fetch=no_network, clock=clock)
    yield TokenVerifier(AuthPolicy(issuers), jwks_fetcher=fetcher, clock=clock)
    fetcher.close()


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --- accepted tokens -------------------------------------------------------------------------------------------


def test_verify_accepts_sandbox_es384_token(kit: Kit, verifier: TokenVerifier) -> None:
    token = kit.sandbox.sign(ENDPOINT)
    claims = verifier.verify(bearer(token), ENDPOINT)
    assert (claims.iss, claims.aud, claims.kid, claims.sub, claims.tenant) == (
        SANDBOX_ISS, (ENDPOINT,), kit.sandbox.key.kid, None, None)
    assert (claims.iat, claims.exp) == (NOW, NOW + 300)
    assert claims.jti == claims.raw["jti"]


def test_verify_accepts_epic_rs384_with_nbf_and_sub(kit: Kit, verifier: TokenVerifier) -> None:
    token = kit.epic.sign(ENDPOINT, extra_claims={"nbf": NOW - 300, "sub": "epic-client-id"})
    claims = verifier.verify(bearer(token), ENDPOINT)
    assert (claims.iss, claims.sub, claims.raw["nbf"]) == (EPIC_ISS, "epic-client-id", NOW - 300)


#: Epic publishes its keys at a jku like this, and names them by a base64 kid that can hold '+', '/' and '='.
EPIC_JKU = "https://ehr.example.org/interconnect/api/epic/2019/Security/Open/PublicKeys/530013/530013"


@pytest.mark.parametrize("kid", ["Xk2+q/9aZ0bCdEf1Q==", "/Ab+c=", "530013"], ids=["base64", "slash-first", "digits"])
def test_verify_accepts_epic_kid_from_its_jku(rs_key: ClientKey, clock: Clock, kid: str) -> None:
    # The kid is a dictionary key here, never part of a path or a regex: base64's '+', '/' and '=' are just text.
    signer = TokenSigner(ClientKey(rs_key.private_key, "RS384", kid), iss=EPIC_ISS, jku=EPIC_JKU, clock=clock)
    jwks = signer.jwks()
    jwks["keys"][0].update({"use": "sig", "alg": "RS384"})
    fetched: list[str] = []
    fetcher = JwksFetcher(fetch=lambda url: fetched.append(url) or jwks, clock=clock)
    issuers = parse_trusted_issuers({"issuers": [signer.issuer_entry(pinned=False, audiences=[EPIC_AUD])]}, Path("."))
    verifier = TokenVerifier(AuthPolicy(issuers), jwks_fetcher=fetcher, clock=clock)
    token = signer.sign(EPIC_AUD, extra_claims={"nbf": NOW - 300, "sub": "epic-client-id"})
    assert verifier.verify(bearer(token), ENDPOINT).kid == kid
    assert fetched == [EPIC_JKU]


@pytest.mark.parametrize(
    ("signer", "aud", "header"),
    (("sandbox", [ENDPOINT, "https://other.example"], "Bearer {}"),
     ("epic", EPIC_AUD, "Bearer {}"),
     ("epic", ["https://other.example", EPIC_AUD], "Bearer {}"),
     ("sandbox", ENDPOINT, "bearer   {}  "),
     ("sandbox", ENDPOINT, "BEARER\t{}")),
    ids=("aud-array-with-ours", "issuer-extra-audience", "aud-array-with-extra", "lowercase-scheme", "tab-separated"),
)
def test_verify_accepts_audience_and_header_variants(kit: Kit, verifier: TokenVerifier, signer: str,
                                                     aud: str | list[str], header: str) -> None:
    token = getattr(kit, signer).sign(aud)
    assert verifier.verify(header.format(token), ENDPOINT).aud == ((aud,) if isinstance(aud, str) else tuple(aud))


@pytest.mark.parametrize(
    ("now_offset", "extra_claims", "headers"),
    ((-300 - 59, None, None), (59, None, None), (0, {"nbf": NOW + 59}, None), (0, None, {"typ": "jwt"}),
     (0, {"tenant": "anything"}, None)),
    ids=("exp-within-skew", "iat-within-skew", "nbf-within-skew", "typ-lowercase", "unrestricted-tenant"),
)
def test_verify_accepts_within_tolerances(kit: Kit, verifier: TokenVerifier, now_offset: int,
                                          extra_claims: dict[str, Any] | None, headers: dict[str, Any] | None) -> None:
    token = kit.sandbox.sign(ENDPOINT, now=NOW + now_offset, extra_claims=extra_claims, headers=headers)
    verifier.verify(bearer(token), ENDPOINT)


def test_verify_accepts_allowed_tenant(kit: Kit, verifier: TokenVerifier) -> None:
    token = kit.cerner.sign(ENDPOINT, extra_claims={"tenant": "tenant-b"})
    assert verifier.verify(bearer(token), ENDPOINT).tenant == "tenant-b"


# --- refused tokens: every case has its own reason -------------------------------------------------------------

Case = Callable[[Kit], "str | None"]
_REFUSALS: tuple[tuple[str, Case, AuthFailure], ...] = (
    ("no-header", lambda k: None, AuthFailure.MISSING_AUTHORIZATION),
    ("wrong-scheme", lambda k: "Basic dXNlcjpwYXNzd29yZA==", AuthFailure.BAD_SCHEME),
    ("token-without-scheme", lambda k: k.sandbox.sign(ENDPOINT), AuthFailure.BAD_SCHEME),
    ("two-tokens", lambda k: bearer(k.sandbox.sign(ENDPOINT) + " extra"), AuthFailure.BAD_SCHEME),
    ("not-a-jws", lambda k: bearer("not-a-jwt"), AuthFailure.MALFORMED),
    ("garbage-header-json", lambda k: bearer("bm90IGpzb24.e30.c2ln"), AuthFailure.MALFORMED),
    ("oversized-token", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"pad": "x" * 20_000})),
     AuthFailure.TOKEN_TOO_LARGE),
    ("alg-none", lambda k: bearer(k.sandbox.unsigned(ENDPOINT)), AuthFailure.ALG_NOT_ALLOWED),
    ("hs256-public-key-as-secret", lambda k: bearer(k.sandbox.hs256_with_public_key(ENDPOINT)),
     AuthFailure.ALG_NOT_ALLOWED),
    ("alg-not-in-policy", lambda k: bearer(TokenSigner(ClientKey.generate("ES256")).sign(ENDPOINT)),
     AuthFailure.ALG_NOT_ALLOWED),
    ("alg-key-type-mismatch", lambda k: bearer(TokenSigner(k.rs_key).sign(ENDPOINT, kid=k.sandbox.key.kid)),
     AuthFailure.ALG_KEY_MISMATCH),
    ("missing-typ", lambda k: bearer(k.sandbox.sign(ENDPOINT, headers={"typ": None})), AuthFailure.BAD_TYP),
    ("wrong-typ", lambda k: bearer(k.sandbox.sign(ENDPOINT, headers={"typ": "at+jwt"})), AuthFailure.BAD_TYP),
    ("missing-kid", lambda k: bearer(k.sandbox.sign(ENDPOINT, headers={"kid": None})), AuthFailure.MISSING_KID),
    ("missing-iss", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"iss": None})),
     AuthFailure.MISSING_CLAIM),
    ("missing-aud", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"aud": None})),
     AuthFailure.MISSING_CLAIM),
    ("missing-exp", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"exp": None})),
     AuthFailure.MISSING_CLAIM),
    ("missing-iat", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"iat": None})),
     AuthFailure.MISSING_CLAIM),
    ("missing-jti", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"jti": None})),
     AuthFailure.MISSING_CLAIM),
    ("unknown-iss", lambda k: bearer(k.sandbox.sign(ENDPOINT, iss="https://evil.example")),
     AuthFailure.UNTRUSTED_ISSUER),
    ("jku-not-allowlisted", lambda k: bearer(k.sandbox.sign(ENDPOINT, jku="https://evil.example/jwks.json")),
     AuthFailure.JKU_NOT_ALLOWLISTED),
    ("unknown-kid-pinned-only", lambda k: bearer(k.sandbox.sign(ENDPOINT, kid="rotated-away")),
     AuthFailure.UNKNOWN_KID),
    ("tampered-payload", lambda k: bearer(tamper_payload(k.sandbox.sign("https://other.example"), {"aud": ENDPOINT})),
     AuthFailure.BAD_SIGNATURE),
    ("same-kid-other-key", lambda k: bearer(TokenSigner(ClientKey.generate("ES384", kid=k.sandbox.key.kid))
                                            .sign(ENDPOINT)), AuthFailure.BAD_SIGNATURE),
    ("wrong-aud", lambda k: bearer(k.sandbox.sign("https://cds.example.org/cds-services")), AuthFailure.AUD_MISMATCH),
    ("aud-array-without-ours", lambda k: bearer(k.sandbox.sign(["https://a.example", "https://b.example"])),
     AuthFailure.AUD_MISMATCH),
    ("extra-audience-of-other-issuer", lambda k: bearer(k.sandbox.sign(EPIC_AUD)), AuthFailure.AUD_MISMATCH),
    ("aud-not-string", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"aud": 42})),
     AuthFailure.INVALID_CLAIM),
    ("exp-not-number", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"exp": "soon"})),
     AuthFailure.INVALID_CLAIM),
    ("expired", lambda k: bearer(k.sandbox.sign(ENDPOINT, now=NOW - 1000)), AuthFailure.EXPIRED),
    ("iat-in-future", lambda k: bearer(k.sandbox.sign(ENDPOINT, now=NOW + 120)), AuthFailure.IAT_IN_FUTURE),
    ("nbf-in-future", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"nbf": NOW + 300})),
     AuthFailure.NOT_YET_VALID),
    ("exp-before-iat", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"exp": NOW + 40, "iat": NOW + 50})),
     AuthFailure.INVALID_CLAIM),
    ("lifetime-over-maximum", lambda k: bearer(k.sandbox.sign(ENDPOINT, lifetime=7200)),
     AuthFailure.LIFETIME_TOO_LONG),
    ("jti-not-string", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"jti": 7})),
     AuthFailure.INVALID_CLAIM),
    ("tenant-not-allowed", lambda k: bearer(k.cerner.sign(ENDPOINT, extra_claims={"tenant": "tenant-z"})),
     AuthFailure.TENANT_NOT_ALLOWED),
    ("tenant-missing", lambda k: bearer(k.cerner.sign(ENDPOINT)), AuthFailure.TENANT_NOT_ALLOWED),
    ("sub-not-string", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"sub": 7})), AuthFailure.INVALID_CLAIM),
    ("tenant-not-string", lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"tenant": ["tenant-a"]})),
     AuthFailure.INVALID_CLAIM),
)


def _refusal(kit: Kit, verifier: TokenVerifier, case: Case) -> tuple[str | None, Unauthorized]:
    header = case(kit)
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(header, ENDPOINT)
    return header, caught.value


@pytest.mark.parametrize(("case", "failure"), [c[1:] for c in _REFUSALS], ids=[c[0] for c in _REFUSALS])
def test_verify_refuses(kit: Kit, verifier: TokenVerifier, caplog: pytest.LogCaptureFixture,
                        case: Case, failure: AuthFailure) -> None:
    caplog.set_level(logging.DEBUG, logger="cds_hooks.auth")
    header, refused = _refusal(kit, verifier, case)
    assert refused.reason.startswith(f"{failure}: ")
    # The caller learns nothing; the log learns the reason, and never the token.
    assert (refused.status_code, refused.message) == (401, "unauthorized")
    assert refused.reason not in json.dumps(refused.to_outcome())
    [record] = [r for r in caplog.records if r.name == "cds_hooks.auth"]
    assert record.levelno == logging.WARNING and refused.reason in record.getMessage()
    for secret in filter(None, [header, header and header.split()[-1]]):
        assert secret not in caplog.text
    assert kit.fetches == []


@pytest.mark.parametrize("jti", ["a\x00b", "\ud800", "line\nbreak", "\u202e"],
                         ids=["nul", "lone-surrogate", "newline", "bidi-override"])
def test_verify_refuses_a_jti_that_is_not_printable(kit: Kit, verifier: TokenVerifier, jti: str) -> None:
    # Regression: the jti is stored in the replay store; a lone surrogate (SQLite cannot encode it) or a NUL
    # (PostgreSQL text cannot hold it) made that insert fail, and a trusted client's call got a 500.
    _, refused = _refusal(kit, verifier, lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims={"jti": jti})))
    assert refused.reason.startswith(f"{AuthFailure.INVALID_CLAIM}: jti ")


@pytest.mark.parametrize(("length", "accepted"), ((256, True), (257, False)), ids=("at-the-limit", "over-the-limit"))
def test_verify_jti_length_limit(kit: Kit, verifier: TokenVerifier, length: int, accepted: bool) -> None:
    # 256 characters (auth.MAX_JTI_LENGTH) hold any real nonce; the store's column is sized for it.
    token = bearer(kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "j" * length}))
    if accepted:
        assert verifier.verify(token, ENDPOINT).jti == "j" * length
    else:
        _, refused = _refusal(kit, verifier, lambda k: token)
        assert refused.reason.startswith(f"{AuthFailure.INVALID_CLAIM}: jti ")


@pytest.mark.parametrize(("length", "logged"), ((118, "'" + "j" * 118 + "'"), (119, "'" + "j" * 119 + "...'")),
                         ids=("repr-of-120-shown-whole", "repr-of-121-cut-at-120"))
def test_verify_log_cuts_long_values(kit: Kit, verifier: TokenVerifier, caplog: pytest.LogCaptureFixture,
                                     length: int, logged: str) -> None:
    # A client-chosen value reaches the log as its repr, cut to 120 characters, so one refused token cannot flood it.
    token = kit.sandbox.sign("https://other.example", extra_claims={"jti": "j" * length})
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), ENDPOINT)
    assert f"jti={logged} " in caplog.records[-1].getMessage()


def test_verify_key_refused_by_pyjwt_is_key_rejected(kit: Kit, es_key: ClientKey, clock: Clock) -> None:
    # A key source other than index_jwks (an injected fetcher) may hand over key material PyJWT cannot use:
    # that is a refused token, never a 500.
    class BrokenKeyFetcher(JwksFetcher):
        def get_key(self, url: str, kid: str, *, allowlist: tuple[str, ...]) -> Any:
            return {**es_key.public_jwk(), "x": "AAAA"}

    jku = "https://sandbox.example/jwks.json"
    issuers = parse_trusted_issuers({"issuers": [kit.sandbox.issuer_entry(jku=jku, pinned=False)]}, Path("."))
    verifier = TokenVerifier(AuthPolicy(issuers), jwks_fetcher=BrokenKeyFetcher(clock=clock), clock=clock)
    assert _reason(verifier, kit.sandbox.sign(ENDPOINT, jku=jku)).startswith(f"{AuthFailure.KEY_REJECTED}: ")


def test_verify_refusal_reasons_are_distinct(kit: Kit, verifier: TokenVerifier) -> None:
    # A token signed by a stranger's key is, to the verifier, the same failure as a tampered one.
    reasons = [_refusal(kit, verifier, case)[1].reason for name, case, _ in _REFUSALS if name != "same-kid-other-key"]
    assert len(set(reasons)) == len(reasons), reasons


def test_verify_aud_mismatch_reason_says_what_was_expected(kit: Kit, verifier: TokenVerifier) -> None:
    # The reason is how an operator finds a client's wrong aud (spec pitfall 2); it read "aud 'x' matches the
    # endpoint 'y'", the opposite of what happened.
    _, refused = _refusal(kit, verifier, lambda k: bearer(k.sandbox.sign(ENDPOINT + "/x")))
    assert refused.reason == (f"{AuthFailure.AUD_MISMATCH}: aud {ENDPOINT + '/x'!r} matches neither the endpoint "
                              f"{ENDPOINT!r} nor the issuer's extra audiences")


def test_verify_aud_array_mismatch_reason_counts_the_values(kit: Kit, verifier: TokenVerifier) -> None:
    _, refused = _refusal(kit, verifier, lambda k: bearer(k.sandbox.sign(["https://a.example", "https://b.example"])))
    assert refused.reason == (f"{AuthFailure.AUD_MISMATCH}: none of 2 aud values matches neither the endpoint "
                              f"{ENDPOINT!r} nor the issuer's extra audiences")


@pytest.mark.parametrize(
    ("claims", "expected"),
    (({"iat": NOW - 400, "exp": NOW - 100}, "expired: exp was 100s ago (skew 60s)"),
     ({"iat": NOW + 100, "exp": NOW + 200}, "iat-in-future: iat is 100s ahead (skew 60s)"),
     ({"nbf": NOW + 100}, "not-yet-valid: nbf is 100s ahead (skew 60s)")),
    ids=("expired", "iat-in-future", "nbf-in-future"),
)
def test_verify_time_claim_reasons_say_by_how_much(kit: Kit, verifier: TokenVerifier, claims: dict[str, float],
                                                   expected: str) -> None:
    # The reason is how an operator tells a client's slow clock from a stale token.
    _, refused = _refusal(kit, verifier, lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims=claims)))
    assert refused.reason == expected


@pytest.mark.parametrize(
    ("claims", "expected"),
    (({"iat": NOW, "exp": NOW}, "invalid-claim: exp is not after iat"),
     ({"iat": NOW - 10, "exp": NOW - 10 + 3601}, "lifetime-too-long: exp - iat is 3601s, over 3600s"),
     ({"aud": [ENDPOINT, 5]}, "invalid-claim: aud must be a string or a non-empty array of strings"),
     ({"aud": []}, "invalid-claim: aud must be a string or a non-empty array of strings")),
    ids=("exp-equal-to-iat", "lifetime-reason", "aud-array-with-a-number", "aud-empty-array"),
)
def test_verify_refuses_claims_at_their_edges(kit: Kit, verifier: TokenVerifier, claims: dict[str, Any],
                                              expected: str) -> None:
    _, refused = _refusal(kit, verifier, lambda k: bearer(k.sandbox.sign(ENDPOINT, extra_claims=claims)))
    assert refused.reason == expected


@pytest.mark.parametrize("claims", ({"iat": NOW + 60, "exp": NOW + 360}, {"nbf": NOW + 60}),
                         ids=("iat-at-the-skew", "nbf-at-the-skew"))
def test_verify_accepts_times_exactly_at_the_skew(kit: Kit, verifier: TokenVerifier, claims: dict[str, Any]) -> None:
    verifier.verify(bearer(kit.sandbox.sign(ENDPOINT, extra_claims=claims)), ENDPOINT)


@pytest.mark.parametrize(("tenant", "expected"),
                         ((None, "no tenant claim, and this issuer is restricted to tenants"),
                          ("tenant-z", "tenant is not on this issuer's tenant list")),
                         ids=("no-tenant", "other-tenant"))
def test_verify_tenant_refusal_reasons(kit: Kit, verifier: TokenVerifier, tenant: str | None, expected: str) -> None:
    claims = {"tenant": tenant} if tenant else None
    _, refused = _refusal(kit, verifier, lambda k: bearer(k.cerner.sign(ENDPOINT, extra_claims=claims)))
    assert refused.reason == f"{AuthFailure.TENANT_NOT_ALLOWED}: {expected}"


def test_verify_refuses_a_signature_with_characters_outside_base64url(kit: Kit, verifier: TokenVerifier) -> None:
    # base64 decoding skips characters outside its alphabet: a '+' slipped into a valid signature would still
    # verify, one token giving many different strings. Only the compact form is read.
    header, payload, signature = kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "j-variant"}).split(".")
    _, refused = _refusal(kit, verifier, lambda k: bearer(f"{header}.{payload}.{signature[:10]}+{signature[10:]}"))
    assert refused.reason == f"{AuthFailure.MALFORMED}: not a compact JWS (three base64url segments)"
    verifier.verify(bearer(f"{header}.{payload}.{signature}"), ENDPOINT)


def test_verify_log_names_iss_kid_jti_tenant(kit: Kit, verifier: TokenVerifier,
                                             caplog: pytest.LogCaptureFixture) -> None:
    token = kit.cerner.sign(ENDPOINT, extra_claims={"tenant": "tenant-z", "jti": "jti-123"})
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), ENDPOINT)
    message = caplog.records[-1].getMessage()
    for value in (CERNER_ISS, kit.cerner.key.kid, "jti-123", "tenant-z"):
        assert repr(value) in message


@pytest.mark.parametrize("claim", ("kid", "typ", "iss", "aud", "exp", "iat", "jti"))
def test_verify_refuses_each_missing_required_field(kit: Kit, verifier: TokenVerifier, claim: str) -> None:
    in_header = claim in ("kid", "typ")
    token = kit.sandbox.sign(ENDPOINT, headers={claim: None} if in_header else None,
                             extra_claims=None if in_header else {claim: None})
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(bearer(token), ENDPOINT)
    assert caught.value.reason in {f"missing-claim: {claim}", "missing-kid: header kid is missing or empty",
                                   "bad-typ: header typ is missing"}
    assert claim in caught.value.reason


def test_verify_hs256_attack_fails_even_if_alg_check_were_bypassed(kit: Kit) -> None:
    # Defence in depth: the key lookup also refuses to pair an HMAC alg with the client's public key.
    jwk = kit.sandbox.key.public_jwk()
    assert key_mismatch(jwk, "HS256") is not None
    assert key_mismatch(jwk, "RS384") is not None
    assert key_mismatch(jwk, "ES384") is None


_EC_P384 = "es"
_RSA = "rs"
_MISMATCHES: tuple[tuple[str, str, dict[str, Any], str, str | None], ...] = (
    ("ec-fits", _EC_P384, {}, "ES384", None),
    ("ec-other-curve", _EC_P384, {}, "ES256", "alg ES256 needs curve P-256, the key is on 'P-384'"),
    ("ec-for-rsa-alg", _EC_P384, {}, "RS384", "alg RS384 needs kty RSA"),
    ("hmac-alg", _EC_P384, {}, "HS256", "not an asymmetric signature algorithm"),
    ("ec-bound-to-its-alg", _EC_P384, {"alg": "ES384"}, "ES384", None),
    ("rsa-any-rsa-alg", _RSA, {}, "PS384", None),
    ("rsa-bound-to-another-alg", _RSA, {"alg": "RS384"}, "PS384", "the key is bound to alg 'RS384'"),
    ("key-ops-verify", _EC_P384, {"key_ops": ["verify"]}, "ES384", None),
    ("key-ops-without-verify", _EC_P384, {"key_ops": ["sign"]}, "ES384", "key_ops"),
    ("key-ops-not-a-list", _EC_P384, {"key_ops": "verify"}, "ES384", "key_ops"),
)


@pytest.mark.parametrize(("which", "changes", "alg", "expected"), [c[1:] for c in _MISMATCHES],
                         ids=[c[0] for c in _MISMATCHES])
def test_key_mismatch(es_key: ClientKey, rs_key: ClientKey, which: str, changes: dict[str, Any], alg: str,
                      expected: str | None) -> None:
    # What defeats algorithm confusion: a token's alg only ever meets a key of the type, curve and use it needs.
    unbound = {k: v for k, v in (es_key if which == _EC_P384 else rs_key).public_jwk().items() if k != "alg"}
    jwk = {**unbound, **changes}
    reason = key_mismatch(jwk, alg)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


# --- replay ----------------------------------------------------------------------------------------------------


def test_verify_refuses_replayed_jti(kit: Kit, verifier: TokenVerifier) -> None:
    token = kit.sandbox.sign(ENDPOINT)
    verifier.verify(bearer(token), ENDPOINT)
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(bearer(token), ENDPOINT)
    assert caught.value.reason.startswith(f"{AuthFailure.REPLAYED}: ")


def test_verify_failed_token_does_not_burn_its_jti(kit: Kit, verifier: TokenVerifier) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(kit.sandbox.sign("https://wrong.example", extra_claims={"jti": "j-1"})), ENDPOINT)
    verifier.verify(bearer(kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "j-1"})), ENDPOINT)


def test_verify_jti_is_scoped_per_issuer(kit: Kit, verifier: TokenVerifier) -> None:
    verifier.verify(bearer(kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "shared"})), ENDPOINT)
    verifier.verify(bearer(kit.epic.sign(ENDPOINT, extra_claims={"jti": "shared"})), ENDPOINT)


def test_replay_cache_forgets_after_expiry(clock: Clock) -> None:
    cache = ReplayCache(clock=clock)
    assert cache.add_if_new(("iss", "a"), NOW + 10)
    assert not cache.add_if_new(("iss", "a"), NOW + 10)
    clock.advance(10)
    assert len(cache) == 1 and cache.add_if_new(("iss", "b"), NOW + 20) and len(cache) == 1
    assert cache.add_if_new(("iss", "a"), NOW + 30)


def test_replay_cache_is_bounded_and_evicts_soonest_expiring(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    cache = ReplayCache(max_entries=3, clock=clock)
    for jti, ttl in (("a", 30), ("b", 10), ("c", 20)):
        assert cache.add_if_new(("iss", jti), NOW + ttl)
    assert cache.add_if_new(("iss", "d"), NOW + 40)
    assert len(cache) == 3
    assert cache.add_if_new(("iss", "b"), NOW + 10)  # evicted, so accepted again
    assert not cache.add_if_new(("iss", "d"), NOW + 40)
    assert "replay cache full" in caplog.text


def test_replay_cache_does_not_let_an_expired_key_evict_a_live_one(clock: Clock) -> None:
    # Nothing to remember for a key already expired: storing it in a full cache evicted a live jti, whose
    # replay was then accepted.
    cache = ReplayCache(max_entries=1, clock=clock)
    assert cache.add_if_new(("iss", "live"), NOW + 60)
    assert cache.add_if_new(("iss", "expired"), NOW)
    assert len(cache) == 1
    assert not cache.add_if_new(("iss", "live"), NOW + 60)


def test_replay_cache_drops_the_expired_entries_first(clock: Clock) -> None:
    cache = ReplayCache(clock=clock)
    assert cache.add_if_new(("iss", "soon"), NOW + 10) and cache.add_if_new(("iss", "later"), NOW + 30)
    clock.advance(20)
    assert cache.add_if_new(("iss", "new"), NOW + 40)
    assert len(cache) == 2 and not cache.add_if_new(("iss", "later"), NOW + 30)


def test_verify_uses_the_replay_store_it_is_given(kit: Kit, clock: Clock) -> None:
    # The app passes the database-backed store so that a jti is used once across workers and replicas.
    class Shared:
        def __init__(self) -> None:
            self.seen: list[tuple[tuple[str, str], float]] = []

        def add_if_new(self, key: tuple[str, str], expires_at: float) -> bool:
            self.seen.append((key, expires_at))
            return len(self.seen) == 1

    shared = Shared()
    issuers = parse_trusted_issuers({"issuers": [kit.sandbox.issuer_entry()]}, Path("."))
    verifier = TokenVerifier(AuthPolicy(issuers), replay_cache=shared, clock=clock)
    verifier.verify(bearer(kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "j-1"})), ENDPOINT)
    assert shared.seen == [((SANDBOX_ISS, "j-1"), NOW + 300 + 60)]
    # Another worker saw this jti: the shared store refuses it though this process never did.
    assert _reason(verifier, kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "j-2"})).startswith(
        f"{AuthFailure.REPLAYED}: ")


def test_verify_logs_an_accepted_token_at_debug_without_the_token(kit: Kit, verifier: TokenVerifier,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cds_hooks.auth")
    token = kit.sandbox.sign(ENDPOINT, extra_claims={"jti": "jti-ok"})
    claims = verifier.verify(bearer(token), ENDPOINT)
    [record] = [r for r in caplog.records if r.name == "cds_hooks.auth"]
    assert record.levelno == logging.DEBUG and record.getMessage() == (
        f"CDS client token accepted (iss={SANDBOX_ISS!r} kid={claims.kid!r} jti='jti-ok' tenant=None)")
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


def test_replay_cache_holds_100000_entries_by_default(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    cache = ReplayCache(clock=clock)
    for n in range(100_000):
        cache.add_if_new(("iss", str(n)), NOW + 60)
    assert len(cache) == 100_000 and "replay cache full" not in caplog.text
    assert cache.add_if_new(("iss", "one more"), NOW + 60)
    assert len(cache) == 100_000 and "replay cache full" in caplog.text


@pytest.mark.parametrize(("max_entries", "valid"), ((0, False), (-1, False), (1, True)),
                         ids=("zero", "negative", "one"))
def test_replay_cache_size_must_be_positive(max_entries: int, valid: bool) -> None:
    if valid:
        assert len(ReplayCache(max_entries=max_entries)) == 0
    else:
        with pytest.raises(ValueError, match="max_entries must be positive"):
            ReplayCache(max_entries=max_entries)


def test_replay_cache_admits_a_key_once_across_threads(clock: Clock) -> None:
    cache = ReplayCache(clock=clock)
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def add() -> None:
        barrier.wait()
        results.append(cache.add_if_new(("iss", "race"), NOW + 60))

    threads = [threading.Thread(target=add) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 15 + [True]


# --- jku over real HTTP ----------------------------------------------------------------------------------------


class JwksServer:
    """A loopback HTTP server publishing JWK Sets by path, counting every request it receives."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.requests.append(self.path)
                if self.path == "/slow":
                    time.sleep(1.0)
                status, body = owner.routes.get(self.path, (404, b"{}"))
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", body.decode())
                    body = b""
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up early on purpose (size cap, timeout)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def publish(self, path: str, jwks: Any, status: int = 200) -> str:
        self.routes[path] = (status, jwks if isinstance(jwks, bytes) else json.dumps(jwks).encode())
        return self.url(path)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@dataclass
class JkuSetup:
    server: JwksServer
    url: str
    signer: TokenSigner
    verifier: TokenVerifier
    fetch_clock: Clock


@pytest.fixture
def jku(jwks_server: JwksServer, es_key: ClientKey, clock: Clock) -> Iterator[JkuSetup]:
    """An issuer that publishes its JWKS only at an allowlisted loopback jku (nothing pinned)."""
    url = jwks_server.publish("/jwks.json", es_key.jwks())
    iss = "https://ehr.loopback.example"
    signer = TokenSigner(es_key, iss=iss, jku=url, clock=clock)
    policy = AuthPolicy({iss: TrustedIssuer(iss, jku_allowlist=(url,))}, jwks_refetch_interval_seconds=30,
                        jwks_cache_seconds=600)
    fetch_clock = Clock(1000.0)
    fetcher = JwksFetcher(cache_seconds=600, refetch_interval_seconds=30, timeout_seconds=0.5, clock=fetch_clock)
    yield JkuSetup(jwks_server, url, signer, TokenVerifier(policy, jwks_fetcher=fetcher, clock=clock), fetch_clock)
    fetcher.close()


def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(bearer(token), ENDPOINT)
    return caught.value.reason


def test_jku_fetches_once_then_serves_from_cache(jku: JkuSetup) -> None:
    for _ in range(3):
        jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    assert jku.server.requests == ["/jwks.json"]


def test_jku_not_allowlisted_makes_no_request(jku: JkuSetup, kit: Kit) -> None:
    # The unlisted URL is on the same server and would serve the right key; it must still never be asked.
    unlisted = jku.server.publish("/other.json", kit.sandbox.key.jwks())
    reason = _reason(jku.verifier, jku.signer.sign(ENDPOINT, jku=unlisted))
    assert reason.startswith(f"{AuthFailure.JKU_NOT_ALLOWLISTED}: ")
    assert jku.server.requests == []


def test_jku_not_allowlisted_refused_even_when_kid_is_pinned(kit: Kit, verifier: TokenVerifier,
                                                           jwks_server: JwksServer) -> None:
    unlisted = jwks_server.publish("/jwks.json", kit.sandbox.key.jwks())
    reason = _reason(verifier, kit.sandbox.sign(ENDPOINT, jku=unlisted))
    assert reason.startswith(f"{AuthFailure.JKU_NOT_ALLOWLISTED}: ")
    assert jwks_server.requests == [] and kit.fetches == []


def test_jku_allowlisted_but_kid_pinned_needs_no_request(jwks_server: JwksServer, es_key: ClientKey,
                                                         clock: Clock) -> None:
    url = jwks_server.publish("/jwks.json", es_key.jwks())
    signer = TokenSigner(es_key, jku=url, clock=clock)
    issuers = parse_trusted_issuers({"issuers": [signer.issuer_entry()]}, Path("."))
    assert issuers[SANDBOX_ISS].jku_allowlist == (url,) and issuers[SANDBOX_ISS].pinned_keys
    TokenVerifier(AuthPolicy(issuers), clock=clock).verify(bearer(signer.sign(ENDPOINT)), ENDPOINT)
    assert jwks_server.requests == []


def test_jku_unknown_kid_refetches_once_then_is_rate_limited(jku: JkuSetup, kit: Kit) -> None:
    jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    assert len(jku.server.requests) == 1

    jku.fetch_clock.advance(31)
    first = _reason(jku.verifier, jku.signer.sign(ENDPOINT, kid="unknown-1"))
    assert first.startswith(f"{AuthFailure.UNKNOWN_KID}: ") and "after a refetch" in first
    assert len(jku.server.requests) == 2  # exactly one refetch

    jku.fetch_clock.advance(10)  # still inside the 30 s interval
    second = _reason(jku.verifier, jku.signer.sign(ENDPOINT, kid="unknown-2"))
    assert second.startswith(f"{AuthFailure.UNKNOWN_KID}: ") and "rate-limited" in second
    assert len(jku.server.requests) == 2  # no request at all

    # Known kids are still served from the cache while the refetch is rate-limited.
    jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    assert len(jku.server.requests) == 2


def test_jku_rotated_key_is_found_after_interval(jku: JkuSetup, rs_key: ClientKey) -> None:
    jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    new_key = ClientKey.generate("ES384")
    jku.server.publish("/jwks.json", {"keys": [jku.signer.key.public_jwk(), new_key.public_jwk()]})
    rotated = TokenSigner(new_key, iss=jku.signer.iss, jku=jku.url, clock=jku.signer.clock)
    jku.fetch_clock.advance(30)
    jku.verifier.verify(bearer(rotated.sign(ENDPOINT)), ENDPOINT)
    assert len(jku.server.requests) == 2


def test_jku_cache_expires(jku: JkuSetup) -> None:
    jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    jku.fetch_clock.advance(599)
    jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    assert len(jku.server.requests) == 1
    jku.fetch_clock.advance(1)
    jku.verifier.verify(bearer(jku.signer.sign(ENDPOINT)), ENDPOINT)
    assert len(jku.server.requests) == 2


@pytest.mark.parametrize(
    ("path", "status", "body", "detail"),
    (("/jwks.json", 500, b"{}", "HTTP 500"),
     ("/jwks.json", 200, b"<html>", "not JSON"),
     ("/jwks.json", 200, b'{"keys": []}', "not a usable JWK Set"),
     ("/jwks.json", 200, b'{"kid": "x"}', "not a usable JWK Set"),
     ("/jwks.json", 200, b'{"keys": [' + b" " * (1024 * 1024) + b"]}", "over 1048576 bytes"),
     ("/slow", 200, b"{}", "request failed: ReadTimeout"),
     ("/jwks.json", 302, b"/elsewhere.json", "HTTP 302")),
    ids=("http-500", "not-json", "no-keys", "not-a-set", "over-1-mib", "timeout", "redirect-not-followed"),
)
def test_jku_unusable_responses(jwks_server: JwksServer, es_key: ClientKey, clock: Clock,
                                path: str, status: int, body: bytes, detail: str) -> None:
    url = jwks_server.publish(path, body, status)
    jwks_server.publish("/elsewhere.json", es_key.jwks())
    iss = "https://ehr.loopback.example"
    fetcher = JwksFetcher(timeout_seconds=0.3, clock=Clock(0))
    verifier = TokenVerifier(AuthPolicy({iss: TrustedIssuer(iss, jku_allowlist=(url,))}),
                             jwks_fetcher=fetcher, clock=clock)
    signer = TokenSigner(es_key, iss=iss, jku=url, clock=clock)
    first = _reason(verifier, signer.sign(ENDPOINT))
    assert first.startswith(f"{AuthFailure.JWKS_UNAVAILABLE}: ") and detail in first
    # A failed fetch counts towards the rate limit too: the next token within the interval asks nobody.
    second = _reason(verifier, signer.sign(ENDPOINT))
    assert second.startswith(f"{AuthFailure.JWKS_UNAVAILABLE}: ") and "rate-limited" in second
    assert jwks_server.requests == [path]
    fetcher.close()


@pytest.mark.parametrize("chunked", (False, True), ids=("content-length", "chunked"))
def test_jku_set_trickled_is_cut_off_at_the_deadline(make_fhir_stub: Any, es_key: ClientKey, chunked: bool) -> None:
    """A JWK Set sent 1 KiB every 0.2 s (20 KiB: 4 s) is abandoned at the 0.5 s deadline, not read to its end."""
    stub = make_fhir_stub()
    stub.add("/jwks.json", es_key.jwks(), content_type="application/json", pad_to=20 * 1024, drip=0.2,
             chunked=chunked)
    url = stub.url("/jwks.json")
    fetcher = JwksFetcher(timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(JwksFetchError, match="deadline"):
        fetcher.get_key(url, es_key.kid, allowlist=(url,))
    assert time.monotonic() - started < 1.5
    fetcher.close()


def test_jku_unreachable_is_unavailable(es_key: ClientKey, clock: Clock) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/jwks.json"
    fetcher = JwksFetcher(timeout_seconds=0.5)
    with pytest.raises(JwksFetchError, match="request failed: ConnectionError"):
        fetcher.get_key(url, es_key.kid, allowlist=(url,))
    fetcher.close()


def test_jwks_fetcher_single_flight_under_concurrency(jwks_server: JwksServer, es_key: ClientKey) -> None:
    url = jwks_server.publish("/jwks.json", es_key.jwks())
    fetcher = JwksFetcher(clock=Clock(0))
    barrier = threading.Barrier(8)
    found: list[str] = []

    def lookup() -> None:
        barrier.wait()
        found.append(fetcher.get_key(url, es_key.kid, allowlist=(url,))["kid"])

    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [es_key.kid] * 8 and jwks_server.requests == ["/jwks.json"]
    fetcher.close()


def test_jwks_fetcher_injected_fetch_and_allowlist(es_key: ClientKey) -> None:
    calls: list[str] = []

    def fetch(url: str) -> Any:
        calls.append(url)
        return es_key.jwks()

    fetcher = JwksFetcher(fetch=fetch, clock=Clock(0))
    with pytest.raises(JwksFetchError, match="allowlist"):
        fetcher.get_key("https://a.example/jwks", es_key.kid, allowlist=("https://b.example/jwks",))
    assert calls == []
    assert fetcher.get_key("https://b.example/jwks", es_key.kid, allowlist=("https://b.example/jwks",))["kid"]
    with pytest.raises(UnknownKid):
        fetcher.get_key("https://b.example/jwks", "nope", allowlist=("https://b.example/jwks",))
    assert calls == ["https://b.example/jwks"]


@pytest.mark.parametrize(("age", "fetches"), ((3599, 1), (3600, 2)), ids=("within-an-hour", "after-an-hour"))
def test_jwks_fetcher_caches_a_set_for_an_hour_by_default(es_key: ClientKey, age: int, fetches: int) -> None:
    calls: list[str] = []

    def fetch(url: str) -> Any:
        calls.append(url)
        return es_key.jwks()

    clock = Clock(0)
    fetcher = JwksFetcher(fetch=fetch, clock=clock)
    fetcher.get_key("https://b.example/jwks", es_key.kid, allowlist=("https://b.example/jwks",))
    clock.advance(age)
    fetcher.get_key("https://b.example/jwks", es_key.kid, allowlist=("https://b.example/jwks",))
    assert len(calls) == fetches


def test_jwks_fetcher_any_fetch_failure_is_unavailable(es_key: ClientKey) -> None:
    # An injected fetch may raise anything: each is "unavailable" (a 401), never an escaping error (a 500).
    def fetch(url: str) -> Any:
        raise ConnectionResetError("peer went away")

    fetcher = JwksFetcher(fetch=fetch, clock=Clock(0))
    with pytest.raises(JwksFetchError, match="^fetch failed: ConnectionResetError$"):
        fetcher.get_key("https://b.example/jwks", es_key.kid, allowlist=("https://b.example/jwks",))


def test_jwks_fetcher_uses_a_fetched_set_beside_keys_it_cannot_use(es_key: ClientKey) -> None:
    # A client may publish an encryption key next to its signing key: the fetched set is read leniently.
    published = {"keys": [{**es_key.public_jwk(), "kid": "enc", "use": "enc"}, es_key.public_jwk()]}
    fetcher = JwksFetcher(fetch=lambda url: published, clock=Clock(0))
    assert fetcher.get_key("https://b.example/jwks", es_key.kid,
                           allowlist=("https://b.example/jwks",)) == es_key.public_jwk()


def test_jwks_fetcher_close_closes_its_session() -> None:
    closed: list[bool] = []

    class Session(requests.Session):
        def close(self) -> None:
            closed.append(True)
            super().close()

    JwksFetcher(session=Session()).close()
    assert closed == [True]


def test_index_jwks_lenient_skips_unusable_and_ambiguous_keys(es_key: ClientKey, rs_key: ClientKey) -> None:
    twin = {**rs_key.public_jwk(), "kid": "twin"}
    data = {"keys": [es_key.public_jwk(), {**es_key.public_jwk(), "kid": "priv", "d": "AAAA"},
                     {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                     {**es_key.public_jwk(), "kid": "enc", "use": "enc"},
                     {k: v for k, v in rs_key.public_jwk().items() if k != "kid"}, twin, {**twin}]}
    assert list(index_jwks(data, strict=False)) == [es_key.kid]


@pytest.mark.parametrize("alg", (["ES384"], {"ES384": True}, 384), ids=("list", "object", "number"))
def test_index_jwks_key_with_an_alg_that_is_not_a_string(es_key: ClientKey, rs_key: ClientKey, alg: Any) -> None:
    odd = {**rs_key.public_jwk(), "alg": alg}
    assert list(index_jwks({"keys": [es_key.public_jwk(), odd]}, strict=False)) == [es_key.kid]
    with pytest.raises(InvalidJwks, match=r"keys\[1\]: .*alg"):
        index_jwks({"keys": [es_key.public_jwk(), odd]}, strict=True)


def test_index_jwks_key_that_is_not_an_object(es_key: ClientKey) -> None:
    # A fetched set may hold anything; a pinned one is our config and names the bad entry.
    data = {"keys": ["not-a-key", [es_key.public_jwk()], es_key.public_jwk()]}
    assert list(index_jwks(data, strict=False)) == [es_key.kid]
    with pytest.raises(InvalidJwks, match=r"^keys\[0\]: not a JSON object$"):
        index_jwks(data, strict=True)


def _okp_jwk() -> dict[str, Any]:
    public = Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": "okp"}


@pytest.mark.parametrize("kty", ("OKP", "oct-without-k", None), ids=("okp-ed25519", "oct-without-k", "no-kty"))
def test_index_jwks_refuses_key_types_other_than_ec_and_rsa(es_key: ClientKey, kty: str | None) -> None:
    # PyJWT parses an Ed25519 key: only our kty check keeps a key no allowed alg can use out of a pinned set.
    odd = {"OKP": _okp_jwk(), "oct-without-k": {"kty": "oct", "kid": "oct"},
           None: {k: v for k, v in es_key.public_jwk().items() if k != "kty"} | {"kid": "none"}}[kty]
    assert list(index_jwks({"keys": [es_key.public_jwk(), odd]}, strict=False)) == [es_key.kid]
    with pytest.raises(InvalidJwks, match=r"^keys\[1\]: kid '[a-z]+': kty must be EC or RSA"):
        index_jwks({"keys": [es_key.public_jwk(), odd]}, strict=True)


@pytest.mark.parametrize(("bits", "usable"), ((2047, False), (2048, True)), ids=("2047-bits", "2048-bits"))
def test_index_jwks_rsa_key_size(bits: int, usable: bool) -> None:
    # NIST SP 800-131A: RSA keys below 2048 bits are refused, in a pinned set and a fetched one alike.
    public = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)), "kid": "rsa"}
    if usable:
        assert list(index_jwks({"keys": [jwk]}, strict=True)) == ["rsa"]
    else:
        with pytest.raises(InvalidJwks, match=f"^keys\\[0\\]: kid 'rsa': RSA key is {bits} bits, below 2048$"):
            index_jwks({"keys": [jwk]}, strict=True)


# --- trusted-issuer config ---------------------------------------------------------------------------------------


def test_load_trusted_issuers_reads_full_entry(tmp_path: Path, es_key: ClientKey) -> None:
    path = write_issuer_config(tmp_path / "issuers.json", [{
        "iss": SANDBOX_ISS, "jwks": es_key.jwks(), "jku": ["https://sandbox.cds-hooks.org/.well-known/jwks.json"],
        "audiences": ["sand_man"], "tenants": ["t1", "t2"]}])
    issuer = load_trusted_issuers(path)[SANDBOX_ISS]
    assert issuer.jku_allowlist == ("https://sandbox.cds-hooks.org/.well-known/jwks.json",)
    assert (issuer.audiences, issuer.tenants, list(issuer.pinned_keys)) == (("sand_man",), ("t1", "t2"), [es_key.kid])


@pytest.mark.parametrize("absolute", (False, True), ids=("relative", "absolute"))
def test_load_trusted_issuers_jwks_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, es_key: ClientKey,
                                        absolute: bool) -> None:
    (tmp_path / "conf" / "keys").mkdir(parents=True)
    keys = tmp_path / "conf" / "keys" / "sandbox.json"
    keys.write_text(json.dumps(es_key.jwks()))
    path = write_issuer_config(tmp_path / "conf" / "issuers.json",
                               [{"iss": SANDBOX_ISS, "jwks_file": str(keys) if absolute else "keys/sandbox.json"}])
    monkeypatch.chdir(tmp_path)  # relative to the config file, not to the working directory
    assert list(load_trusted_issuers(path)[SANDBOX_ISS].pinned_keys) == [es_key.kid]


def _jwks(key: ClientKey, **changes: Any) -> dict[str, Any]:
    return {"keys": [{**key.public_jwk(), **changes}]}


_BAD_CONFIGS: tuple[tuple[str, Callable[[ClientKey], Any], tuple[str, ...]], ...] = (
    ("not-an-object", lambda k: [], ("issuers:",)),
    ("no-issuers", lambda k: {}, ("issuers:",)),
    ("empty-issuers", lambda k: {"issuers": []}, ("issuers: empty",)),
    ("unknown-top-level", lambda k: {"issuers": [{"iss": "a", "jwks": k.jwks()}], "extra": 1}, ("extra:",)),
    ("two-unknown-top-level", lambda k: {"issuers": [{"iss": "a", "jwks": k.jwks()}], "zeta": 1, "alpha": 2},
     ("alpha: unknown top-level field",)),
    ("entry-not-object", lambda k: {"issuers": ["https://a"]}, ("issuers[0]:",)),
    ("missing-iss", lambda k: {"issuers": [{"jwks": k.jwks()}]}, ("issuers[0]: iss:",)),
    ("iss-not-string", lambda k: {"issuers": [{"iss": 5, "jwks": k.jwks()}]}, ("issuers[0]: iss:",)),
    ("no-key-source", lambda k: {"issuers": [{"iss": "https://a"}]}, ("'https://a'", "jwks:", "jku")),
    ("jwks-not-a-set", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.public_jwk()}]},
     ("'https://a'", "jwks:", "'keys' array")),
    ("jwks-without-keys", lambda k: {"issuers": [{"iss": "https://a", "jwks": {"keys": []}}]},
     ("'https://a'", "jwks:", "no usable")),
    ("private-key-material", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, d="AAAA")}]},
     ("'https://a'", "jwks:", "private")),
    ("symmetric-key", lambda k: {"issuers": [{"iss": "https://a", "jwks": {"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}}]}, ("'https://a'", "jwks:", "symmetric")),
    ("key-without-kid", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, kid="")}]},
     ("'https://a'", "jwks:", "kid")),
    ("duplicate-kid", lambda k: {"issuers": [{"iss": "https://a", "jwks": {"keys": [k.public_jwk()] * 2}}]},
     ("'https://a'", "jwks:", "duplicate kid")),
    ("bad-key-material", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, x="AAAA")}]},
     ("'https://a'", "jwks:", "unusable key material")),
    ("alg-does-not-fit-key", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, alg="RS384")}]},
     ("'https://a'", "jwks:", "alg")),
    ("alg-not-a-string", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, alg=["ES384"])}]},
     ("'https://a'", "jwks:", "alg")),
    ("encryption-key", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, use="enc")}]},
     ("'https://a'", "jwks:", "use")),
    ("unsupported-curve", lambda k: {"issuers": [{"iss": "https://a", "jwks": _jwks(k, crv="secp256k1")}]},
     ("'https://a'", "jwks:", "crv")),
    ("duplicate-iss", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks()}] * 2},
     ("issuers[1]", "'https://a'", "iss: duplicate")),
    ("jwks-and-jwks-file", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks(), "jwks_file": "k.json"}]},
     ("'https://a'", "jwks_file: give either 'jwks' or 'jwks_file', not both",)),
    ("jwks-file-missing", lambda k: {"issuers": [{"iss": "https://a", "jwks_file": "missing.json"}]},
     ("'https://a'", "jwks_file:", "cannot read")),
    ("jwks-file-not-json", lambda k: {"issuers": [{"iss": "https://a", "jwks_file": "notjson.json"}]},
     ("'https://a'", "jwks_file:", "not valid JSON")),
    ("jwks-file-private", lambda k: {"issuers": [{"iss": "https://a", "jwks_file": "private.json"}]},
     ("'https://a'", "jwks_file:", "contains private or symmetric key material")),
    ("jku-not-list", lambda k: {"issuers": [{"iss": "https://a", "jku": "https://a/jwks"}]},
     ("'https://a'", "jku: must be an array of non-empty strings")),
    ("audiences-blank", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks(),
                                                 "audiences": ["sand_man", "  "]}]},
     ("'https://a'", "audiences: must be an array of non-empty strings")),
    ("jwks-file-not-a-string", lambda k: {"issuers": [{"iss": "https://a", "jwks_file": 5}]},
     ("'https://a'", "jwks_file: must be a non-empty path string")),
    ("jwks-file-blank", lambda k: {"issuers": [{"iss": "https://a", "jwks_file": "  "}]},
     ("'https://a'", "jwks_file: must be a non-empty path string")),
    ("jku-plain-http", lambda k: {"issuers": [{"iss": "https://a", "jku": ["http://a.example/jwks"]}]},
     ("'https://a'", "jku:", "https")),
    ("audiences-not-strings", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks(), "audiences": [1]}]},
     ("'https://a'", "audiences:")),
    ("tenants-empty", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks(), "tenants": []}]},
     ("'https://a'", "tenants:")),
    ("unknown-field", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks(), "jwks_url": "x"}]},
     ("'https://a'", "jwks_url: unknown field")),
    ("two-unknown-fields", lambda k: {"issuers": [{"iss": "https://a", "jwks": k.jwks(), "zeta": 1, "alpha": 2}]},
     ("'https://a'", "alpha: unknown field")),
)


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in _BAD_CONFIGS], ids=[c[0] for c in _BAD_CONFIGS])
def test_load_trusted_issuers_refuses_bad_config(tmp_path: Path, es_key: ClientKey,
                                                 make: Callable[[ClientKey], Any], expected: tuple[str, ...]) -> None:
    (tmp_path / "notjson.json").write_text("{not json")
    (tmp_path / "private.json").write_text(json.dumps(_jwks(es_key, d="AAAA")))
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps(make(es_key)))
    with pytest.raises(ConfigError) as caught:
        load_trusted_issuers(path)
    assert str(caught.value).startswith(f"{path}: ")
    for fragment in expected:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), (("{not json", "not valid JSON"), (None, "cannot read")),
                         ids=("bad-json", "missing-file"))
def test_load_trusted_issuers_refuses_unreadable_file(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "issuers.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_trusted_issuers(path)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- policy ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithms",
    (("none",), ("HS256",), ("RS384", "HS512"), ("EdDSA",), (), "ES384"),
    ids=("none", "hs256", "mixed-with-hs512", "eddsa", "empty", "bare-string"),
)
def test_auth_policy_refuses_algorithms(es_key: ClientKey, algorithms: Any) -> None:
    with pytest.raises(ConfigError, match="algorithms"):
        AuthPolicy({}, algorithms=algorithms)


def test_auth_policy_accepts_every_asymmetric_algorithm() -> None:
    algorithms = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    assert AuthPolicy({}, algorithms=list(algorithms)).algorithms == algorithms  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "expected"),
    (({"clock_skew_seconds": -1}, "clock_skew_seconds"), ({"max_lifetime_seconds": 0}, "max_lifetime_seconds"),
     ({"max_token_bytes": 0}, "max_token_bytes"), ({"jwks_fetch_timeout_seconds": 0}, "jwks_fetch_timeout_seconds"),
     ({"jwks_refetch_interval_seconds": -0.5}, "jwks_refetch_interval_seconds"),
     ({"jwks_cache_seconds": 0}, "jwks_cache_seconds")),
    ids=("negative-skew", "zero-lifetime", "zero-token-bytes", "zero-timeout", "negative-refetch-interval",
         "zero-cache"),
)
def test_auth_policy_refuses_bad_limits(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        AuthPolicy({}, **changes)


@pytest.mark.parametrize("iss", ("", "  ", None), ids=("empty", "blank", "none"))
def test_trusted_issuer_refuses_a_blank_iss(es_key: ClientKey, iss: Any) -> None:
    with pytest.raises(ConfigError, match="^iss: must be a non-empty string$"):
        TrustedIssuer(iss, jwks=es_key.jwks())


@pytest.mark.parametrize(
    ("field", "value"),
    (("audiences", "sand_man"), ("audiences", None), ("audiences", ("",)), ("jku_allowlist", None),
     ("jku_allowlist", ("https://a/jwks", 5)), ("tenants", "tenant-a"), ("tenants", ())),
    ids=("audiences-a-bare-string", "audiences-none", "audiences-empty-string", "jku-none", "jku-not-string",
         "tenants-a-bare-string", "tenants-empty"),
)
def test_trusted_issuer_refuses_bad_lists(es_key: ClientKey, field: str, value: Any) -> None:
    # A bare string would be read one character at a time: audiences "sand_man" would accept aud "s".
    with pytest.raises(ConfigError, match=f"^issuer 'https://a': {field}: "):
        TrustedIssuer("https://a", jwks=es_key.jwks(), **{field: value})


def test_trusted_issuer_keeps_its_own_copy_of_each_list(es_key: ClientKey) -> None:
    audiences, jku, tenants = ["sand_man"], ["https://a.example/jwks"], ["tenant-a"]
    issuer = TrustedIssuer("https://a", jwks=es_key.jwks(), audiences=audiences,  # type: ignore[arg-type]
                           jku_allowlist=jku, tenants=tenants)  # type: ignore[arg-type]
    audiences.append("https://evil.example")
    jku.append("https://evil.example/jwks")
    tenants.append("tenant-z")
    assert (issuer.audiences, issuer.jku_allowlist, issuer.tenants) == (
        ("sand_man",), ("https://a.example/jwks",), ("tenant-a",))


def test_trusted_issuer_and_policy_are_immutable(es_key: ClientKey) -> None:
    # The issuer table is read by every request thread: nothing may change who is trusted after startup.
    issuer = TrustedIssuer("https://a", jwks=es_key.jwks())
    policy = AuthPolicy({"https://a": issuer})
    with pytest.raises(dataclasses.FrozenInstanceError):
        issuer.jku_allowlist = ("https://evil.example/jwks",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.algorithms = ("HS256",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.issuers["https://evil"] = issuer  # type: ignore[index]


def test_verified_claims_are_immutable(kit: Kit, verifier: TokenVerifier) -> None:
    claims = verifier.verify(bearer(kit.sandbox.sign(ENDPOINT)), ENDPOINT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.iss = "https://evil.example"  # type: ignore[misc]
    with pytest.raises(TypeError):
        claims.raw["aud"] = "https://evil.example"  # type: ignore[index]


def test_auth_policy_accepts_the_smallest_limits() -> None:
    # No skew and no refetch interval are allowed (a test rig, a client fetched on every unknown kid); every
    # other limit only has to be positive, however small.
    policy = AuthPolicy({}, clock_skew_seconds=0, jwks_refetch_interval_seconds=0, max_lifetime_seconds=1,
                        max_token_bytes=1, jwks_cache_seconds=1, jwks_fetch_timeout_seconds=0.5)
    assert (policy.clock_skew_seconds, policy.max_lifetime_seconds, policy.jwks_fetch_timeout_seconds) == (0, 1, 0.5)


def test_auth_policy_issuer_key_must_match_iss(es_key: ClientKey) -> None:
    with pytest.raises(ConfigError, match="issuers"):
        AuthPolicy({"https://a": TrustedIssuer("https://b", jwks=es_key.jwks())})


_DEFAULT_LIMITS: tuple[tuple[str, Callable[[Kit], str], AuthFailure | None], ...] = (
    ("lifetime-of-an-hour", lambda k: k.sandbox.sign(ENDPOINT, lifetime=3600), None),
    ("lifetime-over-an-hour", lambda k: k.sandbox.sign(ENDPOINT, lifetime=3601), AuthFailure.LIFETIME_TOO_LONG),
    ("expired-by-the-skew", lambda k: k.sandbox.sign(ENDPOINT, now=NOW - 300 - 60), AuthFailure.EXPIRED),
    ("token-of-16-kib", lambda k: "a" * 16381 + ".b.", AuthFailure.MALFORMED),
    ("token-over-16-kib", lambda k: "a" * 16382 + ".b.", AuthFailure.TOKEN_TOO_LARGE),
)


@pytest.mark.parametrize(("make", "failure"), [c[1:] for c in _DEFAULT_LIMITS], ids=[c[0] for c in _DEFAULT_LIMITS])
def test_auth_policy_default_limits(kit: Kit, verifier: TokenVerifier, make: Callable[[Kit], str],
                                    failure: AuthFailure | None) -> None:
    # The documented defaults (README, SECURITY.md): tokens live at most an hour, 60 s of skew, 16 KiB at most.
    token = make(kit)
    if failure is None:
        verifier.verify(bearer(token), ENDPOINT)
    else:
        assert _reason(verifier, token).startswith(f"{failure}: ")


@pytest.mark.parametrize(("padding", "failure"), ((9, AuthFailure.MALFORMED), (10, AuthFailure.TOKEN_TOO_LARGE)),
                         ids=("header-of-16-kib-and-16", "header-over-16-kib-and-16"))
def test_verify_refuses_an_oversized_header_before_reading_it(verifier: TokenVerifier, padding: int,
                                                              failure: AuthFailure) -> None:
    # The header is measured before any regex scans it: "Bearer " and a 16 KiB token, plus 16 bytes of slack.
    header = "Bearer " + "a" * 16381 + ".b." + " " * padding
    assert len(header) == 16384 + 7 + padding
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(header, ENDPOINT)
    assert caught.value.reason.startswith(f"{failure}: ")


def test_token_verifier_builds_its_jwks_fetcher_from_the_policy(monkeypatch: pytest.MonkeyPatch,
                                                                es_key: ClientKey) -> None:
    # The app sets none of these, so the defaults are what production uses: a set is cached for an hour.
    built: list[dict[str, Any]] = []
    monkeypatch.setattr("cds_hooks.auth.JwksFetcher", lambda **kwargs: built.append(kwargs))
    issuers = {"https://a": TrustedIssuer("https://a", jwks=es_key.jwks())}
    TokenVerifier(AuthPolicy(issuers))
    TokenVerifier(AuthPolicy(issuers, jwks_cache_seconds=60, jwks_refetch_interval_seconds=5,
                             jwks_fetch_timeout_seconds=0.5))
    assert built == [{"cache_seconds": 3600, "refetch_interval_seconds": 30.0, "timeout_seconds": 2.0},
                     {"cache_seconds": 60, "refetch_interval_seconds": 5, "timeout_seconds": 0.5}]


def test_auth_policy_max_lifetime_is_configurable(kit: Kit, clock: Clock) -> None:
    issuers = parse_trusted_issuers({"issuers": [kit.sandbox.issuer_entry()]}, Path("."))
    verifier = TokenVerifier(AuthPolicy(issuers, max_lifetime_seconds=120), clock=clock)
    assert _reason(verifier, kit.sandbox.sign(ENDPOINT)).startswith(f"{AuthFailure.LIFETIME_TOO_LONG}: ")
    verifier.verify(bearer(kit.sandbox.sign(ENDPOINT, lifetime=120)), ENDPOINT)
