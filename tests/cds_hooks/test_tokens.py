"""The Sandbox-like client key and signer in cds_hooks.testing.tokens, checked against PyJWT directly."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwt.types import Options

from cds_hooks.auth import load_trusted_issuers
from cds_hooks.jwks import PRIVATE_MEMBERS
from cds_hooks.testing.tokens import (
    SANDBOX_ISS,
    SANDBOX_JKU,
    ClientKey,
    TokenSigner,
    jwk_thumbprint,
    tamper_payload,
    write_issuer_config,
)

NOW = 1_800_000_000
AUD = "https://cds.example.org/cds-services/neutropenia-patient-view"


def _segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    return dict(json.loads(jwt.utils.base64url_decode(part)))


def _decode(token: str, key: ClientKey, *, verify_aud: bool = True) -> dict[str, Any]:
    """Verify with PyJWT alone (no wall-clock checks: the tokens are stamped at a fixed NOW)."""
    options: Options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": verify_aud}
    return dict(jwt.decode(token, jwt.PyJWK(key.public_jwk()), algorithms=[key.alg], audience=AUD, options=options))


@pytest.fixture(scope="module")
def es384() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture(scope="module")
def rs384() -> ClientKey:
    return ClientKey.generate("RS384")


@pytest.mark.parametrize(
    ("alg", "kty", "crv"),
    (("ES256", "EC", "P-256"), ("ES384", "EC", "P-384"), ("ES512", "EC", "P-521"),
     ("RS256", "RSA", None), ("RS384", "RSA", None), ("PS384", "RSA", None)),
    ids=("es256", "es384", "es512", "rs256", "rs384", "ps384"),
)
def test_client_key_generate_publishes_public_jwk(alg: str, kty: str, crv: str | None) -> None:
    key = ClientKey.generate(alg)
    jwk = key.public_jwk()
    assert (jwk["kty"], jwk.get("crv"), jwk["alg"], jwk["use"], jwk["kid"]) == (kty, crv, alg, "sig", key.kid)
    assert not PRIVATE_MEMBERS.intersection(jwk)
    assert key.kid == jwk_thumbprint(jwk)
    assert key.jwks() == {"keys": [jwk]}
    if kty == "RSA":
        assert jwt.PyJWK(jwk).key.key_size == 2048


@pytest.mark.parametrize("alg", ("HS256", "none", "EdDSA"), ids=("hs256", "none", "eddsa"))
def test_client_key_generate_refuses_non_cds_algorithms(alg: str) -> None:
    with pytest.raises(ValueError, match="unsupported alg"):
        ClientKey.generate(alg)


def test_jwk_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 §3.1; members other than e/kty/n must not change the digest.
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29", "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdA"
        "ZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-"
        "kEgU8awapJzKnqDKgw")}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_token_signer_sign_has_sandbox_shape(es384: ClientKey) -> None:
    token = TokenSigner(es384, jku=SANDBOX_JKU).sign(AUD, now=NOW)
    header, claims = _segment(token, 0), _segment(token, 1)
    assert header == {"alg": "ES384", "kid": es384.kid, "typ": "JWT", "jku": SANDBOX_JKU}
    assert set(claims) == {"iss", "aud", "iat", "exp", "jti"}
    assert (claims["iss"], claims["aud"], claims["iat"], claims["exp"]) == (SANDBOX_ISS, AUD, NOW, NOW + 300)
    assert uuid.UUID(claims["jti"]).version == 4
    assert _decode(token, es384) == claims


def test_token_signer_sign_rs384_verifies_with_pyjwt(rs384: ClientKey) -> None:
    signer = TokenSigner(rs384, iss="https://ehr.example.org/fhir", clock=lambda: NOW)
    token = signer.sign([AUD, "other"], lifetime=60, extra_claims={"sub": "client-1", "nbf": NOW - 300})
    claims = _decode(token, rs384)
    assert (claims["aud"], claims["exp"] - claims["iat"], claims["sub"]) == ([AUD, "other"], 60, "client-1")
    assert "jku" not in _segment(token, 0)


def test_token_signer_jti_is_fresh_per_token(es384: ClientKey) -> None:
    signer = TokenSigner(es384)
    assert _segment(signer.sign(AUD), 1)["jti"] != _segment(signer.sign(AUD), 1)["jti"]


@pytest.mark.parametrize(
    ("headers", "extra_claims", "missing_header", "missing_claim"),
    (({"typ": None}, None, "typ", None), ({"kid": None}, None, "kid", None),
     (None, {"exp": None}, None, "exp"), (None, {"jti": None}, None, "jti")),
    ids=("no-typ", "no-kid", "no-exp", "no-jti"),
)
def test_token_signer_none_override_removes_field(es384: ClientKey, headers: dict[str, Any] | None,
                                                  extra_claims: dict[str, Any] | None,
                                                  missing_header: str | None, missing_claim: str | None) -> None:
    token = TokenSigner(es384).sign(AUD, headers=headers, extra_claims=extra_claims)
    assert missing_header not in _segment(token, 0)
    assert missing_claim not in _segment(token, 1)
    _decode(token, es384)  # still properly signed


@pytest.mark.parametrize("password", (None, b"correct horse"), ids=("plain", "encrypted"))
@pytest.mark.parametrize("alg", ("ES384", "RS384"), ids=("es384", "rs384"))
def test_client_key_pem_round_trip_keeps_kid_and_key(alg: str, password: bytes | None,
                                                     es384: ClientKey, rs384: ClientKey) -> None:
    key = es384 if alg == "ES384" else rs384
    pem = key.private_pem(password)
    assert pem.startswith(b"-----BEGIN " + (b"ENCRYPTED " if password else b"") + b"PRIVATE KEY-----")
    again = ClientKey.from_pem(pem, password=password)
    assert (again.alg, again.kid, again.public_jwk()) == (alg, key.kid, key.public_jwk())
    _decode(TokenSigner(again).sign(AUD), key)


def test_client_key_save_and_load_owner_only(tmp_path: Path, es384: ClientKey) -> None:
    path = es384.save(tmp_path / "dev-key.pem")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ClientKey.load(path, kid="dev").public_jwk() == {**es384.public_jwk(), "kid": "dev"}


@pytest.mark.parametrize(("alg", "other"), (("ES384", "RS384"), ("ES384", "ES256"), ("RS384", "ES384")),
                         ids=("ec-as-rsa", "p384-as-es256", "rsa-as-ec"))
def test_client_key_from_pem_refuses_wrong_alg(alg: str, other: str, es384: ClientKey, rs384: ClientKey) -> None:
    key = es384 if alg == "ES384" else rs384
    with pytest.raises(ValueError, match="cannot sign"):
        ClientKey.from_pem(key.private_pem(), alg=other)


def test_token_signer_unsigned_is_alg_none(es384: ClientKey) -> None:
    token = TokenSigner(es384).unsigned(AUD)
    assert token.endswith(".") and _segment(token, 0)["alg"] == "none"
    with pytest.raises(jwt.InvalidAlgorithmError):
        _decode(token, es384)


def test_token_signer_hs256_with_public_key_is_hmac_over_public_pem(es384: ClientKey) -> None:
    token = TokenSigner(es384).hs256_with_public_key(AUD)
    signing_input, signature = token.rsplit(".", 1)
    expected = hmac.new(es384.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    assert jwt.utils.base64url_decode(signature) == expected
    assert _segment(token, 0)["alg"] == "HS256"
    # Why it is built by hand: PyJWT will not use a PEM public key as an HMAC secret.
    with pytest.raises(jwt.InvalidKeyError):
        jwt.decode(token, es384.public_pem(), algorithms=["HS256"], audience=AUD)


def test_tamper_payload_keeps_header_and_signature(es384: ClientKey) -> None:
    token = TokenSigner(es384).sign(AUD)
    forged = tamper_payload(token, {"aud": "https://evil.example", "jti": None})
    assert forged.split(".")[0::2] == token.split(".")[0::2]
    assert _segment(forged, 1)["aud"] == "https://evil.example" and "jti" not in _segment(forged, 1)
    with pytest.raises(jwt.InvalidSignatureError):
        _decode(forged, es384, verify_aud=False)


def test_issuer_entry_round_trips_through_loader(tmp_path: Path, es384: ClientKey, rs384: ClientKey) -> None:
    sandbox = TokenSigner(es384, jku=SANDBOX_JKU)
    epic = TokenSigner(rs384, iss="https://ehr.example.org/fhir")
    entries = [
        sandbox.issuer_entry(),
        epic.issuer_entry(jku="https://ehr.example.org/jwks", pinned=False, audiences=["sand_man"], tenants=["t1"]),
    ]
    assert entries[0] == {"iss": SANDBOX_ISS, "jwks": es384.jwks(), "jku": [SANDBOX_JKU]}
    issuers = load_trusted_issuers(write_issuer_config(tmp_path / "issuers.json", entries))
    assert set(issuers[SANDBOX_ISS].pinned_keys) == {es384.kid}
    epic_issuer = issuers["https://ehr.example.org/fhir"]
    assert (epic_issuer.jwks, epic_issuer.jku_allowlist) == (None, ("https://ehr.example.org/jwks",))
    assert (epic_issuer.audiences, epic_issuer.tenants) == (("sand_man",), ("t1",))
