"""Client-side JWTs for tests and local tools: a key pair and a signer that behave like the CDS Hooks Sandbox.

The Sandbox (cds-hooks/sandbox ``retrieve-data-helpers/jwt-generator.js``) signs with ES384, header
``alg``/``kid``/``typ: JWT``/``jku``, claims ``iss``, ``aud`` (the exact URL called), ``iat``, ``exp = iat + 300``
and a uuid ``jti``. ``TokenSigner`` does the same with a key of our own, and can also forge the bad tokens a
verifier must refuse (``alg: none``, HS256 keyed with the public key, a tampered payload, missing fields).
Never trust these keys outside tests and local development.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

#: The Sandbox's issuer and JWK Set URL (cds-hooks/sandbox jwt-generator.js).
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"

_CURVES: Mapping[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_ALG_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@dataclass(frozen=True)
class ClientKey:
    """A client's signing key pair: EC (ES256/384/512) or RSA 2048 (RS*/PS*); ``kid`` defaults to its thumbprint."""

    private_key: PrivateKey
    alg: str
    kid: str

    @classmethod
    def generate(cls, alg: str = "ES384", *, kid: str | None = None) -> ClientKey:
        """A fresh key for ``alg``: ES384 gives P-384 like the Sandbox, RS384 gives RSA 2048 like Epic."""
        key: PrivateKey
        if alg in _CURVES:
            key = ec.generate_private_key(_CURVES[alg]())
        elif alg in _RSA_ALGS:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"unsupported alg {alg!r}; use one of {', '.join([*_CURVES, *_RSA_ALGS])}")
        return cls._with_kid(key, alg, kid)

    @classmethod
    def from_pem(cls, pem: bytes | str, *, alg: str | None = None, kid: str | None = None,
                 password: bytes | None = None) -> ClientKey:
        """Load a PEM private key (e.g. a saved development key); alg defaults by key type (EC curve, RSA -> RS384)."""
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=password)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            default = _ALG_BY_CURVE.get(key.curve.name, "")
            if not default or alg not in (None, default):
                raise ValueError(f"an EC key on {key.curve.name} cannot sign {alg or 'any allowed alg'}")
        elif isinstance(key, rsa.RSAPrivateKey):
            default = "RS384"
            if alg is not None and alg not in _RSA_ALGS:
                raise ValueError(f"an RSA key cannot sign {alg}")
        else:
            raise ValueError(f"unsupported private key type {type(key).__name__}")
        return cls._with_kid(key, alg or default, kid)

    @classmethod
    def load(cls, path: str | PathLike[str], **kwargs: Any) -> ClientKey:
        """``from_pem`` on the contents of ``path``."""
        return cls.from_pem(Path(path).read_bytes(), **kwargs)

    @classmethod
    def _with_kid(cls, key: PrivateKey, alg: str, kid: str | None) -> ClientKey:
        # The RFC 7638 thumbprint is stable, so a key saved to PEM and reloaded keeps its kid.
        return cls(private_key=key, alg=alg, kid=kid or jwk_thumbprint(_public_jwk_members(key)))

    def private_pem(self, password: bytes | None = None) -> bytes:
        """The private key as PKCS#8 PEM, encrypted when ``password`` is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              encryption)

    def save(self, path: str | PathLike[str], password: bytes | None = None) -> Path:
        """Write ``private_pem`` to ``path`` readable by the owner only; returns the path."""
        target = Path(path)
        target.touch(mode=0o600, exist_ok=True)
        target.write_bytes(self.private_pem(password))
        return target

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (what the HS256 key-confusion attack uses as a secret)."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK, with ``kid``, ``alg`` and ``use: sig``."""
        return {**_public_jwk_members(self.private_key), "kid": self.kid, "alg": self.alg, "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set a client would publish at its ``jku`` URL."""
        return {"keys": [self.public_jwk()]}

    def sign_compact(self, header: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
        """A compact JWS of exactly this header and payload, signed with ``header['alg']`` (default: ours)."""
        signing_input = f"{_b64url_json(header)}.{_b64url_json(payload)}"
        algorithm = jwt.get_algorithm_by_name(str(header.get("alg", self.alg)))
        return f"{signing_input}.{b64url(algorithm.sign(signing_input.encode(), self.private_key))}"


def _public_jwk_members(key: PrivateKey) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return dict(ECAlgorithm.to_jwk(public, as_dict=True))
    return {k: v for k, v in RSAAlgorithm.to_jwk(public, as_dict=True).items() if k != "key_ops"}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an EC or RSA public JWK."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True)
class TokenSigner:
    """Signs CDS Hooks client JWTs the way the Sandbox does, with ``key`` and defaults for ``iss`` and ``jku``."""

    key: ClientKey
    iss: str = SANDBOX_ISS
    jku: str | None = None
    clock: Callable[[], float] = time.time

    def header(self, *, kid: str | None = None, jku: str | None = None,
               headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JOSE header; ``headers`` overrides it, and a None value there removes the field."""
        header: dict[str, Any] = {"alg": self.key.alg, "kid": kid or self.key.kid, "typ": "JWT"}
        if jku or self.jku:
            header["jku"] = jku or self.jku
        return _overlay(header, headers)

    def claims(self, aud: str | Sequence[str], *, iss: str | None = None, lifetime: int = 300,
               extra_claims: Mapping[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
        """The payload; ``extra_claims`` overrides it, and a None value there removes the claim."""
        iat = int(self.clock() if now is None else now)
        claims: dict[str, Any] = {"iss": iss or self.iss, "aud": aud if isinstance(aud, str) else list(aud),
                                  "iat": iat, "exp": iat + lifetime, "jti": str(uuid.uuid4())}
        return _overlay(claims, extra_claims)

    def sign(self, aud: str | Sequence[str], *, iss: str | None = None, kid: str | None = None,
             jku: str | None = None, lifetime: int = 300, extra_claims: Mapping[str, Any] | None = None,
             headers: Mapping[str, Any] | None = None, now: float | None = None) -> str:
        """A signed client JWT for a call to the URL ``aud`` (``exp = iat + lifetime``, a fresh uuid ``jti``)."""
        return self.key.sign_compact(self.header(kid=kid, jku=jku, headers=headers),
                                     self.claims(aud, iss=iss, lifetime=lifetime, extra_claims=extra_claims, now=now))

    def unsigned(self, aud: str | Sequence[str], **kwargs: Any) -> str:
        """A forged token with ``alg: none`` and an empty signature; otherwise like ``sign``."""
        header = self.header(kid=kwargs.pop("kid", None), jku=kwargs.pop("jku", None),
                             headers={"alg": "none", **kwargs.pop("headers", {})})
        return f"{_b64url_json(header)}.{_b64url_json(self.claims(aud, **kwargs))}."

    def hs256_with_public_key(self, aud: str | Sequence[str], **kwargs: Any) -> str:
        """A forged token: HS256 keyed with our public PEM, the classic key-confusion attack.

        Built by hand, because PyJWT refuses a PEM public key as an HMAC secret.
        """
        header = self.header(kid=kwargs.pop("kid", None), jku=kwargs.pop("jku", None),
                             headers={"alg": "HS256", **kwargs.pop("headers", {})})
        signing_input = f"{_b64url_json(header)}.{_b64url_json(self.claims(aud, **kwargs))}"
        mac = hmac.new(self.key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set for this signer's key."""
        return self.key.jwks()

    def issuer_entry(self, iss: str | None = None, jku: str | None = None, pinned: bool = True, *,
                     audiences: Sequence[str] = (), tenants: Sequence[str] | None = None) -> dict[str, Any]:
        """A trusted-issuer config entry for this signer: its JWKS pinned and/or ``jku`` allowlisted."""
        entry: dict[str, Any] = {"iss": iss or self.iss}
        if pinned:
            entry["jwks"] = self.jwks()
        # A token naming a jku that is not allowlisted is refused, so the signer's own jku is always listed.
        url = jku or self.jku
        if url:
            entry["jku"] = [url]
        if audiences:
            entry["audiences"] = list(audiences)
        if tenants is not None:
            entry["tenants"] = list(tenants)
        return entry


def tamper_payload(token: str, changes: Mapping[str, Any]) -> str:
    """``token`` with its claims changed (None removes one) but the original header and signature kept."""
    header, payload, signature = token.split(".")
    claims = _overlay(json.loads(_b64url_decode(payload)), changes)
    return f"{header}.{_b64url_json(claims)}.{signature}"


def write_issuer_config(path: str | PathLike[str], entries: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``{"issuers": entries}`` as the trusted-issuer JSON file at ``path``; returns the path."""
    target = Path(path)
    target.write_text(json.dumps({"issuers": list(entries)}, indent=2) + "\n", encoding="utf-8")
    return target


def _overlay(base: dict[str, Any], changes: Mapping[str, Any] | None) -> dict[str, Any]:
    for name, value in (changes or {}).items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base
