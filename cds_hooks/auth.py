"""Client authentication: verifying the bearer JWT a CDS client sends with every call.

CDS Hooks 2.0 §Trusting CDS Clients: the client signs a JWT (header ``alg``/``kid``/``typ``[/``jku``], claims
``iss``/``aud``/``exp``/``iat``/``jti``[/``tenant``]) with an asymmetric key. The HL7 best-practices page adds the
checks: trusted ``iss``, ``aud`` is this endpoint, ``exp``, ``tenant``, the signature, and ``jti`` not replayed.
Every failure is an ``Unauthorized`` whose ``reason`` goes to the log only, and the token itself is never logged.

PyJWT does the cryptography only. Time, audience and issuer are checked here, against an injected clock.

The trusted-issuer file read by ``load_trusted_issuers`` (annotated here; the file is plain JSON)::

    {"issuers": [{"iss": "https://sandbox.cds-hooks.org",          # required, unique
                  "jwks": {"keys": [...]},                          # pinned public JWK Set, or instead
                  "jwks_file": "keys/sandbox.json",                 #   a file, relative to this config file
                  "jku": ["https://sandbox.cds-hooks.org/.well-known/jwks.json"],  # exact URLs; may be fetched
                  "audiences": ["sand_man"],                        # accepted besides the endpoint URL
                  "tenants": ["tenant-a"]}]}                        # omit for no tenant restriction

An issuer needs ``jwks``/``jwks_file`` or ``jku`` (or both). A token whose ``jku`` header is not listed is refused
even when its ``kid`` is pinned, so list a client's ``jku`` (e.g. the Sandbox's) even when its keys are pinned.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import jwt
from jwt.types import Options

from cds_hooks.errors import Unauthorized
from cds_hooks.jwks import (
    ALGORITHM_KEYS,
    InvalidJwks,
    JwkDict,
    JwksFetcher,
    JwksFetchError,
    UnknownKid,
    check_jku_url,
    index_jwks,
    key_mismatch,
)

logger = logging.getLogger("cds_hooks.auth")

#: The only algorithms a policy may allow: asymmetric signatures. CDS Hooks forbids ``none`` and HS*.
ALLOWED_ALGORITHMS = frozenset(ALGORITHM_KEYS)
#: Longest ``jti`` we store; a real nonce (a uuid) is 36 characters.
MAX_JTI_LENGTH = 256

_ISSUER_FIELDS = ("iss", "jwks", "jwks_file", "jku", "audiences", "tenants")
_BEARER = re.compile(r"Bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Signature only: PyJWT reads the wall clock, so every time-based check is ours (against the injected clock).
_SIGNATURE_ONLY: Options = {
    "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
    "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False,
    "require": [], "enforce_minimum_key_length": True,
}


class ConfigError(ValueError):
    """The trusted-issuer configuration or the auth policy is invalid; the message names the issuer and field."""


class AuthFailure(StrEnum):
    """Why a token was refused: the first word of ``Unauthorized.reason``, stable for log searches and tests."""

    MISSING_AUTHORIZATION = "missing-authorization"
    BAD_SCHEME = "bad-scheme"
    TOKEN_TOO_LARGE = "token-too-large"
    MALFORMED = "malformed-token"
    BAD_TYP = "bad-typ"
    ALG_NOT_ALLOWED = "alg-not-allowed"
    MISSING_KID = "missing-kid"
    MISSING_CLAIM = "missing-claim"
    INVALID_CLAIM = "invalid-claim"
    UNTRUSTED_ISSUER = "untrusted-issuer"
    JKU_NOT_ALLOWLISTED = "jku-not-allowlisted"
    JWKS_UNAVAILABLE = "jwks-unavailable"
    UNKNOWN_KID = "unknown-kid"
    ALG_KEY_MISMATCH = "alg-key-mismatch"
    KEY_REJECTED = "key-rejected"
    BAD_SIGNATURE = "bad-signature"
    AUD_MISMATCH = "aud-mismatch"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    IAT_IN_FUTURE = "iat-in-future"
    LIFETIME_TOO_LONG = "lifetime-too-long"
    TENANT_NOT_ALLOWED = "tenant-not-allowed"
    REPLAYED = "replayed-jti"


def _refuse(failure: AuthFailure, detail: str) -> Unauthorized:
    return Unauthorized(f"{failure}: {detail}")


def _short(value: object, limit: int = 120) -> str:
    """A log-safe rendering of a client-supplied value: repr (escapes control characters), truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


@dataclass(frozen=True)
class TrustedIssuer:
    """One CDS client we accept tokens from, and where its public keys come from.

    ``jwks`` is a JWK Set exchanged out-of-band (pinned); ``jku_allowlist`` lists the exact URLs a token's ``jku``
    may name. ``audiences`` are accepted besides the endpoint URL (some clients send a configured value).
    ``tenants`` of None means no restriction; otherwise a token must carry one of them in its ``tenant`` claim.
    """

    iss: str
    jwks: Mapping[str, Any] | None = None
    jku_allowlist: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    tenants: tuple[str, ...] | None = None
    #: ``kid`` -> public JWK from the pinned set, built and validated at construction.
    pinned_keys: Mapping[str, JwkDict] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.iss, str) or not self.iss.strip():
            raise ConfigError("iss: must be a non-empty string")
        name = f"issuer {self.iss!r}"
        for label in ("jku_allowlist", "audiences", "tenants"):
            values = getattr(self, label)
            if values is None and label == "tenants":
                continue
            if values is None or isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"{name}: {label}: must be a list of non-empty strings")
            object.__setattr__(self, label, tuple(values))
        if self.tenants is not None and not self.tenants:
            raise ConfigError(f"{name}: tenants: an empty list would refuse every token; omit it for no restriction")
        if self.jwks is None and not self.jku_allowlist:
            raise ConfigError(f"{name}: jwks: no key source; give 'jwks' (or 'jwks_file') and/or 'jku'")
        for url in self.jku_allowlist:
            try:
                check_jku_url(url)
            except ValueError as exc:
                raise ConfigError(f"{name}: jku: {exc}") from None
        pinned: dict[str, JwkDict] = {}
        if self.jwks is not None:
            try:
                pinned = index_jwks(self.jwks, strict=True)
            except InvalidJwks as exc:
                raise ConfigError(f"{name}: jwks: {exc}") from None
        object.__setattr__(self, "pinned_keys", MappingProxyType(pinned))


def load_trusted_issuers(path: str | PathLike[str]) -> dict[str, TrustedIssuer]:
    """Read the trusted-issuer JSON file at ``path``; relative ``jwks_file`` paths are relative to it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the trusted-issuer config: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    try:
        return parse_trusted_issuers(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_trusted_issuers(data: Mapping[str, Any], base_dir: Path) -> dict[str, TrustedIssuer]:
    """Build the issuer table from parsed config ``{"issuers": [...]}``; ``jwks_file`` resolves against ``base_dir``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("issuers"), list):
        raise ConfigError("issuers: the config must be a JSON object with an 'issuers' array")
    unknown = sorted(set(data) - {"issuers"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level field (only 'issuers' is allowed)")
    if not data["issuers"]:
        raise ConfigError("issuers: empty; no client could authenticate")
    issuers: dict[str, TrustedIssuer] = {}
    for position, entry in enumerate(data["issuers"]):
        issuer = _parse_issuer(entry, position, base_dir)
        if issuer.iss in issuers:
            raise ConfigError(f"issuers[{position}]: issuer {issuer.iss!r}: iss: duplicate issuer")
        issuers[issuer.iss] = issuer
    return issuers


def _parse_issuer(entry: Any, position: int, base_dir: Path) -> TrustedIssuer:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"issuers[{position}]: must be a JSON object")
    iss = entry.get("iss")
    if not isinstance(iss, str) or not iss.strip():
        raise ConfigError(f"issuers[{position}]: iss: required, a non-empty string")
    where = f"issuers[{position}]: issuer {iss!r}"
    unknown = sorted(set(entry) - set(_ISSUER_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown field (expected {', '.join(_ISSUER_FIELDS)})")
    if "jwks" in entry and "jwks_file" in entry:
        raise ConfigError(f"{where}: jwks_file: give either 'jwks' or 'jwks_file', not both")
    jwks = entry.get("jwks")
    if "jwks_file" in entry:
        jwks = _read_jwks_file(entry["jwks_file"], base_dir, where)
    lists: dict[str, tuple[str, ...] | None] = {}
    for key in ("jku", "audiences", "tenants"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, list)
                                  or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ConfigError(f"{where}: {key}: must be an array of non-empty strings")
        lists[key] = None if value is None else tuple(value)
    try:
        return TrustedIssuer(iss=iss, jwks=jwks, jku_allowlist=lists["jku"] or (),
                             audiences=lists["audiences"] or (), tenants=lists["tenants"])
    except ConfigError as exc:
        raise ConfigError(f"issuers[{position}]: {exc}") from None  # TrustedIssuer names the issuer and field


def _read_jwks_file(value: Any, base_dir: Path, where: str) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: jwks_file: must be a non-empty path string")
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: jwks_file: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: jwks_file: {path} is not valid JSON: {exc}") from None
    try:
        index_jwks(data, strict=True)
    except InvalidJwks as exc:
        raise ConfigError(f"{where}: jwks_file: {path}: {exc}") from None
    return data


@dataclass(frozen=True)
class AuthPolicy:
    """Who is trusted and how strictly tokens are checked; validated at construction."""

    issuers: Mapping[str, TrustedIssuer]
    algorithms: tuple[str, ...] = ("ES384", "RS384")
    clock_skew_seconds: int = 60
    max_lifetime_seconds: int = 3600
    max_token_bytes: int = 16384
    jwks_cache_seconds: int = 3600
    jwks_refetch_interval_seconds: float = 30.0
    jwks_fetch_timeout_seconds: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.algorithms, str) or not self.algorithms:
            raise ConfigError("algorithms: must be a non-empty list of algorithm names")
        refused = [alg for alg in self.algorithms if alg not in ALLOWED_ALGORITHMS]
        if refused:
            raise ConfigError(f"algorithms: {', '.join(map(repr, refused))} not allowed; CDS Hooks forbids 'none' "
                              f"and symmetric (HS*) algorithms; choose from {', '.join(sorted(ALLOWED_ALGORITHMS))}")
        for key, issuer in self.issuers.items():
            if not isinstance(issuer, TrustedIssuer) or key != issuer.iss:
                raise ConfigError(f"issuers: entry {key!r} must be a TrustedIssuer with that iss")
        for name in ("clock_skew_seconds", "jwks_refetch_interval_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        for name in ("max_lifetime_seconds", "max_token_bytes", "jwks_cache_seconds", "jwks_fetch_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        object.__setattr__(self, "issuers", MappingProxyType(dict(self.issuers)))


class JtiStore(Protocol):
    """Where seen ``(iss, jti)`` pairs are remembered; a shared store (e.g. the database) can replace the default."""

    def add_if_new(self, key: tuple[str, str], expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (epoch seconds); False if it is already recorded and unexpired."""
        ...


class ReplayCache:
    """A thread-safe, bounded, in-process ``JtiStore``; each entry lives until its token's ``exp`` plus skew.

    When full it drops expired entries, then the ones expiring soonest. Only tokens that passed every other
    check (a valid signature from a trusted issuer) are stored, so filling it takes a trusted client's key;
    size it at least at peak requests per second times the maximum token lifetime.
    """

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def add_if_new(self, key: tuple[str, str], expires_at: float) -> bool:
        """Record ``key`` until ``expires_at``; False if it was already recorded and has not expired."""
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            if key in self._expiry:
                return False
            if expires_at <= now:
                return True  # nothing to remember: the token can no longer be accepted anyway
            while len(self._expiry) >= self._max_entries:
                _, oldest = heapq.heappop(self._heap)
                del self._expiry[oldest]
                logger.warning("jti replay cache full (%d entries); dropped the entry expiring soonest",
                               self._max_entries)
            self._expiry[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def _drop_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]


@dataclass(frozen=True)
class Claims:
    """A verified token's identity: who sent it, for which audience, and its raw claims."""

    iss: str
    sub: str | None
    aud: tuple[str, ...]
    jti: str
    tenant: str | None
    exp: int
    iat: int
    kid: str
    raw: Mapping[str, Any]


@dataclass
class _Seen:
    """What the log may say about a refused token: unverified header and claim values, never the token."""

    iss: object = None
    kid: object = None
    jti: object = None
    tenant: object = None

    def fields(self) -> tuple[str, str, str, str]:
        return (_short(self.iss), _short(self.kid), _short(self.jti), _short(self.tenant))


class TokenVerifier:
    """Verifies ``Authorization: Bearer <JWT>`` headers against an ``AuthPolicy``; thread-safe."""

    def __init__(self, policy: AuthPolicy, *, replay_cache: JtiStore | None = None,
                 jwks_fetcher: JwksFetcher | None = None, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self._clock = clock
        self._replay: JtiStore = replay_cache if replay_cache is not None else ReplayCache(clock=clock)
        self._fetcher = jwks_fetcher or JwksFetcher(
            cache_seconds=policy.jwks_cache_seconds,
            refetch_interval_seconds=policy.jwks_refetch_interval_seconds,
            timeout_seconds=policy.jwks_fetch_timeout_seconds)

    def verify(self, authorization_header: str | None, audience: str) -> Claims:
        """The verified claims of the bearer token, for a call to the endpoint URL ``audience``.

        Raises ``Unauthorized`` (reason for the log only) on any failure, and logs a warning with the reason,
        ``iss``, ``kid``, ``jti`` and ``tenant``.
        """
        seen = _Seen()
        try:
            claims = self._verify(authorization_header, audience, seen)
        except Unauthorized as exc:
            logger.warning("CDS client token refused: %s (iss=%s kid=%s jti=%s tenant=%s)",
                           exc.reason, *seen.fields())
            raise
        logger.debug("CDS client token accepted (iss=%s kid=%s jti=%s tenant=%s)", *seen.fields())
        return claims

    def _verify(self, authorization_header: str | None, audience: str, seen: _Seen) -> Claims:
        token = self._bearer_token(authorization_header)
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _refuse(AuthFailure.MALFORMED, f"{type(exc).__name__}: {exc}") from None
        header: dict[str, Any] = unverified["header"]
        # Read only to choose the issuer and the key, and to name the token in the log: claims are checked on the
        # verified payload alone, kept under another name so no later branch can check these instead.
        unverified_payload: dict[str, Any] = unverified["payload"]
        seen.iss, seen.kid = unverified_payload.get("iss"), header.get("kid")
        seen.jti, seen.tenant = unverified_payload.get("jti"), unverified_payload.get("tenant")

        typ = header.get("typ")
        if not isinstance(typ, str) or typ.upper() != "JWT":
            raise _refuse(AuthFailure.BAD_TYP,
                          "header typ is missing" if typ is None else f"header typ is {_short(typ)}")
        alg = header.get("alg")
        if alg not in self.policy.algorithms:
            raise _refuse(AuthFailure.ALG_NOT_ALLOWED,
                          f"header alg {_short(alg)} (allowed: {', '.join(self.policy.algorithms)})")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _refuse(AuthFailure.MISSING_KID, "header kid is missing or empty")
        # The unverified iss only selects whose keys to try; nothing else is trusted before the signature.
        iss = unverified_payload.get("iss")
        if iss is None:
            raise _refuse(AuthFailure.MISSING_CLAIM, "iss")
        issuer = self.policy.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _refuse(AuthFailure.UNTRUSTED_ISSUER, "iss is not a trusted issuer")

        jwk = self._resolve_key(issuer, header, kid)
        mismatch = key_mismatch(jwk, alg)
        if mismatch:
            raise _refuse(AuthFailure.ALG_KEY_MISMATCH, mismatch)
        try:
            verified_payload = jwt.decode(token, key=jwt.PyJWK(dict(jwk), algorithm=alg), algorithms=[alg],
                                          options=_SIGNATURE_ONLY)
        except jwt.InvalidSignatureError:
            raise _refuse(AuthFailure.BAD_SIGNATURE, "signature does not verify with the kid's key") from None
        except (jwt.InvalidKeyError, jwt.PyJWKError) as exc:
            raise _refuse(AuthFailure.KEY_REJECTED, str(exc)) from None
        except jwt.PyJWTError as exc:
            raise _refuse(AuthFailure.MALFORMED, f"{type(exc).__name__}: {exc}") from None
        return self._check_claims(verified_payload, issuer, audience, kid)

    def _bearer_token(self, authorization_header: str | None) -> str:
        if authorization_header is None or not authorization_header.strip():
            raise _refuse(AuthFailure.MISSING_AUTHORIZATION, "no Authorization header")
        # Size first (allowing for "Bearer " and stray whitespace), so nothing below scans an oversized header.
        if len(authorization_header.encode("utf-8", "replace")) > self.policy.max_token_bytes + 16:
            raise _refuse(AuthFailure.TOKEN_TOO_LARGE, f"over {self.policy.max_token_bytes} bytes")
        match = _BEARER.fullmatch(authorization_header.strip())
        if match is None:
            # Name the scheme only if it looks like one: a bare token in the header must not reach the log.
            scheme = authorization_header.strip().split(None, 1)[0]
            shown = _short(scheme) if re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,19}", scheme) else "unrecognised"
            raise _refuse(AuthFailure.BAD_SCHEME, f"not 'Bearer <token>' (scheme {shown})")
        token = match.group(1)
        if len(token) > self.policy.max_token_bytes:
            raise _refuse(AuthFailure.TOKEN_TOO_LARGE, f"over {self.policy.max_token_bytes} bytes")
        if not _COMPACT_JWS.fullmatch(token):
            raise _refuse(AuthFailure.MALFORMED, "not a compact JWS (three base64url segments)")
        return token

    def _resolve_key(self, issuer: TrustedIssuer, header: Mapping[str, Any], kid: str) -> JwkDict:
        jku = header.get("jku")
        # An unlisted jku is refused even when the pinned set has the kid: a client naming a URL we never agreed
        # on is misconfigured or hostile, and accepting it would hide that. Nothing is fetched.
        if jku is not None and (not isinstance(jku, str) or jku not in issuer.jku_allowlist):
            raise _refuse(AuthFailure.JKU_NOT_ALLOWLISTED, f"jku {_short(jku)} is not allowlisted for this issuer")
        # Pinned keys first: an out-of-band key needs no network.
        pinned = issuer.pinned_keys.get(kid)
        if pinned is not None:
            return pinned
        if jku is None:
            raise _refuse(AuthFailure.UNKNOWN_KID, "kid is not in the pinned JWK Set and the token has no jku")
        try:
            return self._fetcher.get_key(jku, kid, allowlist=issuer.jku_allowlist)
        except UnknownKid as exc:
            raise _refuse(AuthFailure.UNKNOWN_KID, f"{exc} ({jku})") from None
        except JwksFetchError as exc:
            raise _refuse(AuthFailure.JWKS_UNAVAILABLE, f"{jku}: {exc}") from None

    def _check_claims(self, payload: Mapping[str, Any], issuer: TrustedIssuer, audience: str, kid: str) -> Claims:
        for name in ("aud", "exp", "iat", "jti"):
            if name not in payload:
                raise _refuse(AuthFailure.MISSING_CLAIM, name)
        aud = _audiences(payload["aud"])
        accepted = {audience, *issuer.audiences}
        if accepted.isdisjoint(aud):
            what = f"aud {_short(aud[0])}" if isinstance(payload["aud"], str) else f"none of {len(aud)} aud values"
            raise _refuse(AuthFailure.AUD_MISMATCH,
                          f"{what} matches neither the endpoint {audience!r} nor the issuer's extra audiences")
        exp, iat = _numeric_date(payload, "exp"), _numeric_date(payload, "iat")
        nbf = _numeric_date(payload, "nbf") if "nbf" in payload else None
        now, skew = self._clock(), self.policy.clock_skew_seconds
        if exp <= now - skew:
            raise _refuse(AuthFailure.EXPIRED, f"exp was {now - exp:.0f}s ago (skew {skew}s)")
        if iat > now + skew:
            raise _refuse(AuthFailure.IAT_IN_FUTURE, f"iat is {iat - now:.0f}s ahead (skew {skew}s)")
        if nbf is not None and nbf > now + skew:
            raise _refuse(AuthFailure.NOT_YET_VALID, f"nbf is {nbf - now:.0f}s ahead (skew {skew}s)")
        if exp <= iat:
            raise _refuse(AuthFailure.INVALID_CLAIM, "exp is not after iat")
        if exp - iat > self.policy.max_lifetime_seconds:
            raise _refuse(AuthFailure.LIFETIME_TOO_LONG,
                          f"exp - iat is {exp - iat}s, over {self.policy.max_lifetime_seconds}s")
        jti, sub, tenant = payload["jti"], payload.get("sub"), payload.get("tenant")
        # Printable only: the jti is stored (the shared replay store), and a lone surrogate (SQLite cannot
        # encode it) or a NUL (PostgreSQL text cannot hold it) made that insert fail with a 500.
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH or not jti.isprintable():
            raise _refuse(AuthFailure.INVALID_CLAIM,
                          f"jti must be a string of 1-{MAX_JTI_LENGTH} printable characters")
        if sub is not None and not isinstance(sub, str):
            raise _refuse(AuthFailure.INVALID_CLAIM, "sub is not a string")
        if tenant is not None and not isinstance(tenant, str):
            raise _refuse(AuthFailure.INVALID_CLAIM, "tenant is not a string")
        if issuer.tenants is not None and tenant not in issuer.tenants:
            raise _refuse(AuthFailure.TENANT_NOT_ALLOWED, "no tenant claim, and this issuer is restricted to tenants"
                          if tenant is None else "tenant is not on this issuer's tenant list")
        # Last, so that a token failing any other check cannot use up (burn) a legitimate jti.
        if not self._replay.add_if_new((issuer.iss, jti), exp + skew):
            raise _refuse(AuthFailure.REPLAYED, "jti was already used by this issuer")
        return Claims(iss=issuer.iss, sub=sub, aud=aud, jti=jti, tenant=tenant, exp=exp, iat=iat, kid=kid,
                      raw=MappingProxyType(dict(payload)))


def _audiences(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _refuse(AuthFailure.INVALID_CLAIM, "aud must be a string or a non-empty array of strings")


def _numeric_date(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    # bool is an int in Python, and not a date. An integer beyond a double (JSON allows 4300 digits) made
    # math.isfinite raise OverflowError: a 500 for a signed token with "exp": 1e400 written out as digits.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise _refuse(AuthFailure.INVALID_CLAIM, f"{name} is not a NumericDate (epoch seconds)")
    return math.floor(value)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
