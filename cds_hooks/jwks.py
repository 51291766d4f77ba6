"""JSON Web Key Sets: validating them, matching a key to an algorithm, and fetching allowlisted ``jku`` URLs.

A CDS client publishes its public keys as a JWK Set and names the one it used with ``kid``; the set is either
exchanged out-of-band (pinned in our config) or fetched from the ``jku`` URL in the token header, which we do only
for URLs on the issuer's allowlist (CDS Hooks 2.0 §Trusting CDS Clients; RFC 7517).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from cds_hooks.http_body import BodyTooLarge, bounded_chunks

#: JWK members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

#: What key each allowed algorithm needs: key type and, for EC, the curve (RFC 7518 §3.1, §3.4).
ALGORITHM_KEYS: Mapping[str, tuple[str, str | None]] = MappingProxyType({
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
})

#: JWK Sets are a few kilobytes; anything near this is not a key set.
DEFAULT_MAX_JWKS_BYTES = 1024 * 1024

#: NIST SP 800-131A; PyJWT warns below this, we refuse.
MIN_RSA_BITS = 2048

_CURVES = ("P-256", "P-384", "P-521")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

JwkDict = Mapping[str, Any]
#: Fetches one URL and returns its parsed JSON body; raises on any failure.
FetchFunction = Callable[[str], Any]


class InvalidJwks(ValueError):
    """A JWK Set (or one of its keys) is malformed or unsafe to trust."""


class JwksFetchError(Exception):
    """A ``jku`` URL could not be used: not allowlisted, unreachable, too large, or not a JWK Set."""


class UnknownKid(Exception):
    """The JWK Set at a ``jku`` URL has no key with the token's ``kid``."""


def check_jku_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is https, or plain http to a loopback host (tests, local sidecars)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise ValueError(f"jku URL must be https (or http on loopback): {url!r}")


def index_jwks(data: Any, *, strict: bool) -> dict[str, JwkDict]:
    """Map ``kid`` to JWK for a JWK Set; ``strict`` (pinned config) raises on any bad key, else bad keys are skipped.

    Fetched sets are lenient because a client may publish keys we cannot use (an encryption key, a key without
    ``kid``) next to its signing key; a pinned set is our own config, so every problem there is a mistake.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise InvalidJwks("a JWK Set must be a JSON object with a 'keys' array")
    indexed: dict[str, JwkDict] = {}
    ambiguous: set[str] = set()
    for position, jwk in enumerate(data["keys"]):
        try:
            kid = _check_public_jwk(jwk)
        except InvalidJwks as exc:
            if strict:
                raise InvalidJwks(f"keys[{position}]: {exc}") from None
            continue
        if kid in indexed:
            if strict:
                raise InvalidJwks(f"keys[{position}]: duplicate kid {kid!r}")
            # Two keys under one kid: we cannot tell which the client meant, so trust neither.
            ambiguous.add(kid)
        indexed[kid] = MappingProxyType(dict(jwk))
    for kid in ambiguous:
        del indexed[kid]
    if not indexed:
        raise InvalidJwks("the JWK Set has no usable signing keys")
    return indexed


def _check_public_jwk(jwk: Any) -> str:
    if not isinstance(jwk, Mapping):
        raise InvalidJwks("not a JSON object")
    private = sorted(PRIVATE_MEMBERS.intersection(jwk))
    if private:
        raise InvalidJwks(f"contains private or symmetric key material ({', '.join(private)})")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidJwks("has no 'kid'")
    if jwk.get("kty") not in ("EC", "RSA"):
        raise InvalidJwks(f"kid {kid!r}: kty must be EC or RSA, got {jwk.get('kty')!r}")
    if jwk.get("kty") == "EC" and jwk.get("crv") not in _CURVES:
        raise InvalidJwks(f"kid {kid!r}: crv must be one of {', '.join(_CURVES)}, got {jwk.get('crv')!r}")
    if jwk.get("use", "sig") != "sig":
        raise InvalidJwks(f"kid {kid!r}: 'use' is {jwk.get('use')!r}, not 'sig'")
    alg = jwk.get("alg")
    # A string first: a list or object here made ``in ALGORITHM_KEYS`` raise TypeError (unhashable), which
    # escaped a fetched set as a 500 and a pinned one as a traceback instead of a ConfigError.
    if alg is not None and (not isinstance(alg, str) or alg not in ALGORITHM_KEYS or key_mismatch(jwk, alg)):
        raise InvalidJwks(f"kid {kid!r}: alg {alg!r} is not an allowed algorithm for this key")
    # Parse the key material now, so a typo in x/y/n/e fails at load time rather than on the first request.
    try:
        key = jwt.PyJWK(dict(jwk)).key
    except jwt.PyJWTError as exc:
        raise InvalidJwks(f"kid {kid!r}: unusable key material: {exc}") from None
    if isinstance(key, RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise InvalidJwks(f"kid {kid!r}: RSA key is {key.key_size} bits, below {MIN_RSA_BITS}")
    return kid


def key_mismatch(jwk: JwkDict, alg: str) -> str | None:
    """Why ``jwk`` must not verify a token signed with ``alg``, or None if it may.

    This is what defeats algorithm confusion: a token that names RS384 is never checked against an EC key, and
    a key bound to one ``alg`` in its JWK is never used with another.
    """
    wanted = ALGORITHM_KEYS.get(alg)
    if wanted is None:
        return f"alg {alg!r} is not an asymmetric signature algorithm"
    kty, crv = wanted
    if jwk.get("kty") != kty:
        return f"alg {alg} needs kty {kty}, the kid resolves to kty {jwk.get('kty')!r}"
    if crv is not None and jwk.get("crv") != crv:
        return f"alg {alg} needs curve {crv}, the key is on {jwk.get('crv')!r}"
    if jwk.get("alg") not in (None, alg):
        return f"the key is bound to alg {jwk.get('alg')!r}, the token says {alg}"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "the key's key_ops do not include 'verify'"
    return None


@dataclass(frozen=True)
class _CachedSet:
    keys: Mapping[str, JwkDict]
    fetched_at: float


class JwksFetcher:
    """Fetches and caches the JWK Sets at allowlisted ``jku`` URLs; thread-safe.

    A set is cached for ``cache_seconds``. An unknown ``kid`` (a client rotated its key) triggers one refetch,
    but each URL is fetched at most once per ``refetch_interval_seconds``, so a stream of tokens with made-up
    kids cannot turn us into a traffic amplifier against the client. Failed fetches count towards that limit.
    """

    def __init__(self, *, cache_seconds: float = 3600, refetch_interval_seconds: float = 30.0,
                 timeout_seconds: float = 2.0, max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
                 session: requests.Session | None = None, fetch: FetchFunction | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cache_seconds = cache_seconds
        self._refetch_interval = refetch_interval_seconds
        self._timeout = timeout_seconds
        self._max_bytes = max_bytes
        self._session = session or requests.Session()
        self._fetch = fetch or self._http_get_json
        self._clock = clock
        self._cache: dict[str, _CachedSet] = {}
        self._last_attempt: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def get_key(self, url: str, kid: str, *, allowlist: tuple[str, ...]) -> JwkDict:
        """The JWK with ``kid`` from the set at ``url``; raises JwksFetchError or UnknownKid.

        ``url`` must be on ``allowlist`` (exact match); otherwise no request is made.
        """
        # Checked here as well as by the caller: nothing may ever reach the network for an unlisted URL.
        if url not in allowlist:
            raise JwksFetchError("jku is not on the issuer's allowlist")
        # One lock per URL: concurrent misses wait for a single fetch instead of stampeding the client.
        with self._lock_for(url):
            now = self._clock()
            cached = self._cache.get(url)
            fresh = cached is not None and now - cached.fetched_at < self._cache_seconds
            if cached is not None and fresh and kid in cached.keys:
                return cached.keys[kid]
            last = self._last_attempt.get(url)
            if last is not None and now - last < self._refetch_interval:
                if fresh:
                    raise UnknownKid("kid not in the cached JWK Set (refetch rate-limited)")
                raise JwksFetchError("JWK Set unavailable (last fetch failed; refetch rate-limited)")
            self._last_attempt[url] = now
            keys = self._fetch_set(url)
            self._cache[url] = _CachedSet(keys, now)
            if kid not in keys:
                raise UnknownKid("kid not in the JWK Set, even after a refetch")
            return keys[kid]

    def close(self) -> None:
        """Close the HTTP session's pooled connections."""
        self._session.close()

    def _lock_for(self, url: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(url, threading.Lock())

    def _fetch_set(self, url: str) -> Mapping[str, JwkDict]:
        try:
            data = self._fetch(url)
        except JwksFetchError:
            raise
        except Exception as exc:  # an injected fetch may raise anything; each is just "unavailable"
            raise JwksFetchError(f"fetch failed: {type(exc).__name__}") from exc
        try:
            return MappingProxyType(index_jwks(data, strict=False))
        except InvalidJwks as exc:
            raise JwksFetchError(f"not a usable JWK Set: {exc}") from exc

    def _http_get_json(self, url: str) -> Any:
        # requests' timeout bounds each socket operation, not the whole body; the deadline bounds a slow drip.
        deadline = time.monotonic() + self._timeout
        body = bytearray()
        try:
            # No redirects: the allowlist names exact URLs, and a redirect would lead somewhere unlisted.
            with self._session.get(url, timeout=self._timeout, stream=True, allow_redirects=False,
                             headers={"Accept": "application/jwk-set+json, application/json"}) as response:
                if response.status_code != 200:
                    raise JwksFetchError(f"HTTP {response.status_code}")
                for chunk in bounded_chunks(response, deadline=deadline, max_bytes=self._max_bytes):
                    body += chunk
        except BodyTooLarge:
            raise JwksFetchError(f"body over {self._max_bytes} bytes") from None
        except (ReadTimeoutError, TimeoutError):  # a body read that waited out the time left
            raise JwksFetchError("fetch exceeded its deadline") from None
        except (requests.RequestException, Urllib3Error, OSError) as exc:
            raise JwksFetchError(f"request failed: {type(exc).__name__}") from exc
        try:
            return json.loads(bytes(body))
        except ValueError as exc:
            raise JwksFetchError("body is not JSON") from exc
