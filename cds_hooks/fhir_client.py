"""The FHIR fallback fetch: read or search the client's FHIR server when prefetch did not supply a key.

CDS Hooks lets a service fetch what the client did not prefetch, from `fhirServer`, with
``Authorization: Bearer {access_token}`` (https://cds-hooks.hl7.org/2.0/#fhir-resource-access). This module is
the HTTP half: one pooled ``requests.Session``, hard per-call deadlines, bounded bodies, and searchset
pagination that never leaves the FHIR server's origin. Deciding *whether* to fetch (allowlist, token expiry,
which keys) belongs to `cds_hooks.prefetch`.

The access token is passed per call and never stored, logged or put into a failure reason; URLs (which carry
patient ids) are never logged by this module and never appear in reasons either.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookiejar import Cookie, CookiePolicy
from typing import Any, TypeGuard
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import Request

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from cds_hooks.http_body import BodyTooLarge, bounded_chunks

_log = logging.getLogger(__name__)

#: The FHIR JSON media type (http://hl7.org/fhir/R4/http.html#mime-type).
FHIR_JSON = "application/fhir+json"
DEFAULT_MAX_PAGES = 10
DEFAULT_MAX_RESOURCES = 5000
DEFAULT_MAX_PAGE_BYTES = 8 * 1024 * 1024
#: Longest server-supplied text (OperationOutcome diagnostics) copied into a reason.
REASON_TEXT_LIMIT = 200
_READ_CHUNK = 64 * 1024
#: The port an http(s) URL without one means.
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class FetchOutcome:
    """What one fetch produced: resources (Bundle entries unwrapped), or why it failed.

    ``reason`` is set when the fetch failed and nothing usable came back. ``note`` is set when data came back
    but is incomplete (pagination stopped early: page limit, resource limit, a loop, a link to another origin,
    or a later page failing). Neither ever contains the access token or a URL.
    """

    resources: tuple[Mapping[str, Any], ...] = ()
    reason: str | None = None
    note: str | None = None
    dropped_entries: int = 0
    pages: int = 0

    @property
    def ok(self) -> bool:
        """True when the fetch succeeded (possibly with no resources, possibly incomplete)."""
        return self.reason is None


class _FetchFailed(Exception):
    """Internal: one HTTP exchange failed; the message is a safe, human-readable reason."""


class _NoCookies(CookiePolicy):
    """Refuse every cookie: the session is shared by calls made with different users' tokens."""

    netscape = True
    rfc2965 = False
    hide_cookie2 = False

    def set_ok(self, cookie: Cookie, request: Request) -> bool:
        """Never store a cookie."""
        return False

    def return_ok(self, cookie: Cookie, request: Request) -> bool:
        """Never send a cookie."""
        return False

    def domain_return_ok(self, domain: str, request: Request) -> bool:
        """Never send a cookie."""
        return False

    def path_return_ok(self, path: str, request: Request) -> bool:
        """Never send a cookie."""
        return False


# --- pure helpers, shared with cds_hooks.prefetch -------------------------------------------------------------


def is_resource(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """True when ``value`` is a JSON object with a non-empty string ``resourceType``."""
    # A dict is tested first: it is what JSON gives, and the Mapping ABC's check costs five times more.
    return (isinstance(value, (dict, Mapping)) and isinstance(value.get("resourceType"), str)
            and bool(value["resourceType"]))


def bundle_entries(bundle: Mapping[str, Any]) -> tuple[tuple[Mapping[str, Any], ...], int]:
    """A Bundle's entry resources and how many entries were dropped (not objects with a ``resourceType``).

    Search-outcome entries (``search.mode == "outcome"``, the server's warnings) are skipped, not counted.
    Raises ValueError when ``entry`` is present but not an array.
    """
    entries = bundle.get("entry", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ValueError("Bundle.entry is not an array")
    resources: list[Mapping[str, Any]] = []
    dropped = 0
    for entry in entries:  # dicts tested first, as in is_resource: this runs for every entry
        resource = entry.get("resource") if isinstance(entry, (dict, Mapping)) else None
        if not is_resource(resource):
            dropped += 1
            continue
        search = entry.get("search")
        if isinstance(search, (dict, Mapping)) and search.get("mode") == "outcome":
            continue
        resources.append(resource)
    return tuple(resources), dropped


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The URL of the Bundle's ``link`` with relation ``next``, if any."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, Mapping) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url.strip():
                return url.strip()
    return None


def outcome_diagnostics(outcome: Mapping[str, Any], secret: str | None = None) -> str:
    """A short, single-line summary of an OperationOutcome's issues (diagnostics, else details, else code).

    ``secret`` (the access token) is redacted before the summary is cut to length: cut first, a token across the
    cut no longer occurs whole and its first part would be quoted.
    """
    texts: list[str] = []
    issues = outcome.get("issue")
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, Mapping):
            continue
        details = issue.get("details")
        text = issue.get("diagnostics")
        if not isinstance(text, str) and isinstance(details, Mapping):
            text = details.get("text")
        if not isinstance(text, str):
            text = issue.get("code")
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return clean_text(redact("; ".join(texts), secret)) or "no diagnostics"


def clean_text(text: str, limit: int = REASON_TEXT_LIMIT) -> str:
    """Collapse whitespace and control characters (log injection) and truncate to ``limit`` characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


#: A secret shorter than this is likely to occur in a text by chance: the text is withheld instead of redacted.
_SHORTEST_REDACTABLE = 8
WITHHELD = "[text withheld: it contains the access token]"


def _shown_type(resource_type: object, secret: str | None) -> str:
    """A resourceType a server sent, fit to quote in a reason: redacted before it is cut (a token across the cut
    would no longer occur whole), then cut to 40 characters."""
    return clean_text(redact(str(resource_type), secret), 40)


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced, so a token can never leak through a reason.

    A short secret (a one-letter test token) would be cut out of ordinary words ("[redacted]rror"), leaving a
    garbled reason that still hints at the token: such a text is withheld whole. So is a text that holds the
    secret percent-encoded (a server echoing a URL with ``access_token=...``), in whatever case and choice of
    escaped characters the server used.
    """
    if not secret:
        return text
    if secret in text:
        if len(secret) < _SHORTEST_REDACTABLE:
            return WITHHELD
        text = text.replace(secret, "[redacted]")
    if secret in unquote(text):
        return WITHHELD
    return text


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL, default ports filled in; None if not one or if it
    carries user info (requests would turn that into Basic credentials)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc or "\\" in url:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def same_origin(url: str, base: str) -> bool:
    """True when ``url`` has the same scheme, host and port as ``base``."""
    url_origin = origin(url)
    return url_origin is not None and url_origin == origin(base)


def has_dot_segments(path: str) -> bool:
    """True when a URL path has ``.`` or ``..`` segments, also percent-encoded ones."""
    return any(segment in (".", "..") for segment in unquote(path).replace("\\", "/").split("/"))


def expected_resource_type(relative_url: str) -> str | None:
    """What a relative FHIR URL should return: "Bundle" for a search, the type for a read, None if unsure."""
    segments = urlsplit(relative_url).path.strip("/").split("/")
    if not segments[0][:1].isupper():
        return None
    if len(segments) == 1 or (len(segments) == 2 and segments[1] == "_search"):
        return "Bundle"  # type search
    if segments[1].startswith(("$", "_")):
        return None
    if len(segments) == 2 or (len(segments) == 4 and segments[2] == "_history"):
        return segments[0]  # read or vread
    if len(segments) == 3 and segments[2][:1].isupper():
        return "Bundle"  # compartment search, e.g. Patient/1/Observation
    return None


def join_url(base: str, relative_url: str) -> str:
    """``relative_url`` appended to the FHIR base (not RFC 3986 resolution: the base's last segment stays)."""
    return base.rstrip("/") + "/" + relative_url.lstrip("/")


# --- the fetcher ------------------------------------------------------------------------------------------------


class FhirFetcher:
    """Reads and searches a FHIR server over one pooled ``requests.Session``. Safe to share between threads.

    The session keeps no cookies (it serves calls made with different users' tokens), ignores proxy and
    ``.netrc`` settings from the environment unless ``trust_env`` is set, and never follows redirects.
    """

    def __init__(self, session: requests.Session | None = None, *, pool_size: int = 16,
                 verify: bool | str = True, trust_env: bool = False) -> None:
        self._session = session or requests.Session()
        self._session.trust_env = trust_env
        self._session.verify = verify
        self._session.cookies.set_policy(_NoCookies())
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def __enter__(self) -> FhirFetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def fetch(self, base: str, relative_url: str, *, token: str | None, deadline: float,
              label: str | None = None, max_pages: int = DEFAULT_MAX_PAGES,
              max_resources: int = DEFAULT_MAX_RESOURCES,
              max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES) -> FetchOutcome:
        """Run one prefetch-style query (a read or a search, relative to ``base``) before ``deadline``.

        ``deadline`` is a ``time.monotonic()`` instant covering every page; ``token`` is sent as a bearer token
        when given. A search's ``next`` links are followed within the limits and only on ``base``'s origin.
        """
        url = join_url(base, relative_url)
        expected = expected_resource_type(relative_url)
        try:
            body = self._get_json(url, token=token, deadline=deadline, label=label, max_bytes=max_page_bytes,
                                  page=1)
            resource_type = body.get("resourceType")
            if resource_type == "OperationOutcome" and expected != "OperationOutcome":
                raise _FetchFailed(f"the FHIR server returned an OperationOutcome: {outcome_diagnostics(body, token)}")
            if expected is not None and resource_type != expected:
                raise _FetchFailed(f"expected {expected}, the FHIR server returned {_shown_type(resource_type, token)}")
            if resource_type != "Bundle":
                return FetchOutcome(resources=(body,), pages=1)
        except _FetchFailed as failure:
            return FetchOutcome(reason=redact(str(failure), token))
        return self.paginate(base, body, token=token, deadline=deadline, label=label, first_url=url,
                             max_pages=max_pages, max_resources=max_resources, max_page_bytes=max_page_bytes)

    def paginate(self, base: str, bundle: Mapping[str, Any], *, token: str | None, deadline: float,
                 label: str | None = None, first_url: str | None = None, max_pages: int = DEFAULT_MAX_PAGES,
                 max_resources: int = DEFAULT_MAX_RESOURCES,
                 max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES) -> FetchOutcome:
        """The resources of ``bundle`` (page 1, already in hand) plus those of its ``next`` pages.

        Fails only when ``bundle`` itself is malformed; after that, data already gathered is kept and the reason
        pagination stopped early goes in ``note``.
        Links to another origin are not followed, a link already visited stops pagination (a loop), and at most
        ``max_pages`` pages and ``max_resources`` resources are gathered.
        """
        try:
            resources, dropped = bundle_entries(bundle)
        except ValueError as error:
            return FetchOutcome(reason=str(error))
        gathered = list(resources)
        total = bundle.get("total")
        visited = {first_url} if first_url else set()
        pages = 1
        note: str | None = None
        while True:
            if len(gathered) >= max_resources:
                if len(gathered) > max_resources or next_link(bundle):
                    note = f"stopped at the limit of {max_resources} resources"
                del gathered[max_resources:]
                break
            link = next_link(bundle)
            if link is None:
                break
            try:
                url = urljoin(base.rstrip("/") + "/", link)
            except ValueError:  # "http://[::1/x": an unclosed IPv6 bracket escaped as a bug, logged with its stack
                note = "a next link that is not a URL was not followed"
                break
            if not same_origin(url, base):
                note = "a next link to another origin was not followed"
                break
            if url in visited:
                note = "pagination stopped: a next link repeats an earlier page"
                break
            if pages >= max_pages:
                note = f"stopped at the limit of {max_pages} pages"
                break
            visited.add(url)
            try:
                page = self._get_json(url, token=token, deadline=deadline, label=label, max_bytes=max_page_bytes,
                                      page=pages + 1)
                if page.get("resourceType") != "Bundle":
                    raise _FetchFailed(f"it is a {_shown_type(page.get('resourceType'), token)}, not a Bundle")
                more, more_dropped = bundle_entries(page)
            except (_FetchFailed, ValueError) as failure:
                note = redact(f"page {pages + 1} could not be fetched: {failure}", token)
                break
            pages += 1
            gathered.extend(more)
            dropped += more_dropped
            bundle = page
        if not gathered and note is None and isinstance(total, int) and not isinstance(total, bool) and total > 0:
            # Bundle.total counts the search's matches: pages that hold none of them are not "nothing found".
            note = f"its total is {total} but no page holds a resource"
        return FetchOutcome(resources=tuple(gathered), note=note, dropped_entries=dropped, pages=pages)

    def _get_json(self, url: str, *, token: str | None, deadline: float, label: str | None, max_bytes: int,
                  page: int) -> Mapping[str, Any]:
        """GET one page and parse it as a JSON object, within the deadline and the size limit."""
        started = time.monotonic()
        remaining = deadline - started
        if remaining <= 0:
            raise _FetchFailed("timed out")
        headers = {"Accept": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        status: int | str = "-"
        size = 0
        try:
            # requests' timeout bounds each socket operation, not the exchange: the total is enforced below.
            response = self._session.get(url, headers=headers, timeout=(remaining, remaining), stream=True,
                                         allow_redirects=False)
            with response:
                status = response.status_code
                _check_status(status)
                chunks: list[bytes] = []
                for chunk in bounded_chunks(response, deadline=deadline, max_bytes=max_bytes,
                                            chunk_size=_READ_CHUNK):
                    size += len(chunk)
                    chunks.append(chunk)
        except BodyTooLarge:
            raise _FetchFailed(f"the response is larger than {max_bytes} bytes") from None
        except (requests.Timeout, ReadTimeoutError, TimeoutError):
            # A timeout while reading the body comes from urllib3 (ReadTimeoutError), not requests.
            raise _FetchFailed("timed out") from None
        except (requests.RequestException, Urllib3Error, OSError) as error:
            # The exception text holds the URL (patient ids): report only its kind.
            raise _FetchFailed(f"the FHIR server could not be reached ({type(error).__name__})") from None
        finally:
            _log.debug("fhir fetch key=%s page=%d status=%s bytes=%d elapsed_ms=%d", label or "-", page, status,
                       size, (time.monotonic() - started) * 1000)
        return _parse_json(b"".join(chunks))


def _check_status(status: int) -> None:
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        raise _FetchFailed(f"the FHIR server answered with a redirect (HTTP {status}), which is not followed")
    if status in (401, 403):
        raise _FetchFailed(f"the FHIR server refused access (HTTP {status})")
    if status == 404:
        raise _FetchFailed("the FHIR server found nothing at that URL (HTTP 404)")
    if status >= 500:
        raise _FetchFailed(f"the FHIR server failed (HTTP {status})")
    raise _FetchFailed(f"the FHIR server refused the request (HTTP {status})")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> Mapping[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = _parse_json_slowly(body)
    if not is_resource(parsed):
        raise _FetchFailed("the FHIR server's response is not a FHIR resource")
    result: Mapping[str, Any] = parsed
    return result


def _parse_json_slowly(body: bytes) -> Any:
    """What orjson refuses but the standard library reads (numbers beyond a double), or _FetchFailed."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _FetchFailed("the FHIR server's response is not JSON") from None
