"""Prefetch resolution: turn a hook request's prefetch into resources, fetching what the client left out.

Every prefetch value means something different (spec §Prefetch, https://cds-hooks.hl7.org/2.0/#prefetch-template
and cds-hooks/docs#366): an absent key is fetched from `fhirServer`; ``null`` and an empty Bundle mean "no data";
an OperationOutcome means "unavailable"; a resource or a Bundle is data (a paginated Bundle's ``next`` links are
followed). Missing keys are fetched in parallel under one deadline; a required key that stays unavailable is a
412 (spec: "the service SHALL respond with an HTTP 412 Precondition Failed").

A Bundle that holds no resources is "no data" only when it says the search found nothing. When its ``next`` link
is not followed to the end, or its ``total`` counts matches it does not carry, the data exists but was not
obtained: the key is unavailable, like an OperationOutcome, never an empty assessment. A first page WITH
resources whose ``next`` link is not followed stays data, with a note saying so.

Fetching is refused, without any request, when there is no `fhirServer`, when it is not on the allowlist (no
SSRF through a request field), when there is no `fhirAuthorization` and anonymous access is off, or when the
access token has expired (never used after `expires_in`).

References a definition declares (``ServiceDefinition.follow_references``: the query subset has no ``_include``)
are followed once every key is resolved: the targets a key's resources name on `fhirServer` (relative, or absolute
under it) that no key holds are read with ``Type?_id=a,b,c`` searches, under the same gates, limits and deadline,
and added to that key. Targets that cannot be obtained (no access, a failure, not found, on another server) leave
the key usable but incomplete, with a reason that counts them; a missing target is never a 412.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cds_hooks.errors import PreconditionFailed
from cds_hooks.fhir_client import (
    DEFAULT_MAX_PAGE_BYTES,
    DEFAULT_MAX_PAGES,
    DEFAULT_MAX_RESOURCES,
    FetchOutcome,
    FhirFetcher,
    bundle_entries,
    clean_text,
    has_dot_segments,
    is_resource,
    next_link,
    origin,
    outcome_diagnostics,
)
from cds_hooks.registry import ServiceDefinition, fill_template
from cds_hooks.schemas import HookRequest

_log = logging.getLogger(__name__)

#: Most threads one call fetches with; further keys queue behind them under the same deadline.
MAX_PARALLEL_FETCHES = 8
#: Share of the deadline (at most _RESERVE_MAX_SECONDS) by which the fetch threads stop before the call does.
#: A thread stops its HTTP exchange at its own, earlier deadline and hands back the pages it already has;
#: with one shared instant it raced the call's wait, and pages already fetched were thrown away at random
#: (the same slow paginated search gave a 412 or a 200).
_RESERVE_SHARE = 0.1
_RESERVE_MAX_SECONDS = 0.25

ORIGIN_PREFETCH = "prefetch"
ORIGIN_FHIR = "fhir"
#: Ids asked for by one ``Type?_id=`` search when following references (a URL of a few kB at most).
REFERENCE_CHUNK = 50
#: A FHIR logical id (http://hl7.org/fhir/R4/datatypes.html#id): only these are put into a search.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: An access token an Authorization header can carry: visible ASCII (RFC 6750 §2.1 b64token is a subset).
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


class KeyState(str, Enum):
    """What one prefetch key yielded."""

    DATA = "data"
    EMPTY = "empty"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class KeyResult:
    """One prefetch key: its state, its resources (Bundle entries unwrapped) and where they came from.

    ``origin`` is "prefetch" (the client sent it), "fhir" (fetched from `fhirServer`) or None (neither: the
    key could not be fetched). ``reason`` says why the key is unavailable, or, with DATA or EMPTY, why the data
    is incomplete (pagination stopped early, entries dropped). It never contains the access token.
    """

    key: str
    state: KeyState
    resources: tuple[Mapping[str, Any], ...] = ()
    origin: str | None = None
    reason: str | None = None
    dropped_entries: int = 0


@dataclass(frozen=True)
class PrefetchResult:
    """Every key's result: the template keys in definition order, then keys the client sent unasked."""

    keys: Mapping[str, KeyResult] = field(default_factory=lambda: MappingProxyType({}))

    def resources(self) -> Iterator[Mapping[str, Any]]:
        """All resources of all keys, each identical copy once: one resource may arrive under two keys.

        Only copies equal in every field are merged. Two versions of one (resourceType, id) are both kept: which
        one counts (``meta.versionId``/``lastUpdated``), or that they conflict, is for the consumer to decide;
        keeping the first seen would silently let the order of the prefetch pick the value.
        """
        # Copies of one id are compared by a digest of their canonical JSON, and only when an id repeats:
        # comparing each copy with every earlier one took seconds for a request packed with thousands of
        # versions of one id, and keeping every resource's JSON cost memory for the common case of no repeats.
        first: dict[tuple[str, str], Mapping[str, Any]] = {}
        digests: dict[tuple[str, str], set[bytes]] = {}
        for result in self.keys.values():
            for resource in result.resources:
                resource_id = resource.get("id")
                if isinstance(resource_id, str) and resource_id:
                    key = (str(resource["resourceType"]), resource_id)
                    if key in first:
                        known = digests.get(key)
                        if known is None:
                            known = digests[key] = {_digest(first[key])}
                        digest = _digest(resource)
                        if digest in known:
                            continue
                        known.add(digest)
                    else:
                        first[key] = resource
                yield resource

    def unavailable(self) -> dict[str, str]:
        """Keys whose data could be neither prefetched nor fetched, with the reason."""
        return {key: r.reason or "unavailable" for key, r in self.keys.items() if r.state is KeyState.UNAVAILABLE}

    def incomplete(self) -> dict[str, str]:
        """Keys that yielded data but not all of it (pagination stopped early, entries dropped), with why."""
        return {key: r.reason for key, r in self.keys.items()
                if r.state is not KeyState.UNAVAILABLE and r.reason is not None}

    @property
    def dropped_entries(self) -> int:
        """Bundle entries dropped across all keys because they were not objects with a ``resourceType``."""
        return sum(r.dropped_entries for r in self.keys.values())


def _digest(resource: Mapping[str, Any]) -> bytes:
    """A digest of the resource's JSON with sorted keys: equal for copies equal in every field.

    Written by the standard library, not orjson: orjson writes NaN and the infinities as ``null``, so a copy whose
    value overflowed to infinity (``1e999``, read by the standard library's fallback parser) and one whose value is
    null were merged as identical, and one of the two versions was dropped. Only copies of a repeated id are
    digested, so the slower writer costs nothing in the common case.
    """
    try:
        text = json.dumps(resource, sort_keys=True, separators=(",", ":"), default=repr)
    except RecursionError:  # nested past the C stack's limit (about 1000 levels; orjson reads up to 1024)
        text = _canonical_json(resource)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class _Written(str):
    """Text already written by _canonical_json (told apart from a JSON string value by its type)."""


def _canonical_json(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)``, without recursion.

    The standard library's writer recurses once per level of nesting and raises RecursionError near the
    interpreter's limit; this one keeps its own stack, so any depth the parser produced can be digested.
    """
    out: list[str] = []
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if type(item) is _Written:
            out.append(item)
        elif isinstance(item, dict):
            members = sorted(item.items(), key=lambda member: member[0])
            todo.append(_Written("}"))
            for index in range(len(members) - 1, -1, -1):
                key, member = members[index]
                todo.append(member)
                todo.append(_Written(("," if index else "") + json.dumps(key) + ":"))
            todo.append(_Written("{"))
        elif isinstance(item, (list, tuple)):
            todo.append(_Written("]"))
            for index in range(len(item) - 1, -1, -1):
                todo.append(item[index])
                if index:
                    todo.append(_Written(","))
            todo.append(_Written("["))
        else:
            out.append(json.dumps(item, default=repr))
    return "".join(out)


@dataclass(frozen=True)
class FetchPolicy:
    """Where and how the fallback fetch may reach a FHIR server.

    ``allowed_bases``: `fhirServer` must lie under one of these (same scheme, host and port; path prefix at a
    segment boundary). An entry's port may be ``*`` (``http://127.0.0.1:*``) for any port, for local use. An
    empty tuple disables the fallback fetch. ``allow_anonymous`` permits fetching without `fhirAuthorization`
    (the Sandbox needs it; a development setting). ``operation_outcome_refetch`` treats an OperationOutcome in
    prefetch like an absent key (hapi-fhir#6836); by default it means "unavailable" and is not refetched.
    """

    allowed_bases: tuple[str, ...] = ()
    deadline_seconds: float = 2.0
    max_pages: int = DEFAULT_MAX_PAGES
    max_resources: int = DEFAULT_MAX_RESOURCES
    max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES
    allow_anonymous: bool = False
    operation_outcome_refetch: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.allowed_bases, str):
            raise ValueError("FetchPolicy.allowed_bases must be a tuple of URLs, not a string")
        for base in self.allowed_bases:
            if _split_base(base, allow_any_port=True) is None:
                raise ValueError(f"FetchPolicy.allowed_bases: {base!r} is not an http(s) base URL "
                                 "(no user info, query, fragment or dot segments)")
        if not self.deadline_seconds > 0:
            raise ValueError("FetchPolicy.deadline_seconds must be positive")
        for name in ("max_pages", "max_resources", "max_page_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FetchPolicy.{name} must be a positive integer")

    def allows(self, fhir_server: str) -> bool:
        """True when ``fhir_server`` lies under one of the allowed bases."""
        candidate = _split_base(fhir_server, allow_any_port=False)
        if candidate is None:
            return False
        scheme, host, port, path = candidate
        for base in self.allowed_bases:
            allowed = _split_base(base, allow_any_port=True)
            if allowed is None:
                continue
            a_scheme, a_host, a_port, a_path = allowed
            if (scheme, host) != (a_scheme, a_host) or a_port not in (port, None):
                continue
            if not a_path or path == a_path or path.startswith(a_path + "/"):
                return True
        return False


def _split_base(url: str, *, allow_any_port: bool) -> tuple[str, str, int | None, str] | None:
    """(scheme, host, port, path without trailing slash) of a base URL; port None means any. None if unsafe."""
    if not isinstance(url, str) or any(not c.isprintable() or c.isspace() for c in url):
        return None
    any_port = False
    try:
        parts = urlsplit(url)
        if allow_any_port and parts.netloc.endswith(":*"):
            any_port = True
            url = url.replace(":*", "", 1)
            parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket, a netloc that NFKC-normalises to a delimiter: not a base
        return None
    base_origin = origin(url)
    if base_origin is None or parts.query or parts.fragment or "?" in url or "#" in url:
        return None
    if has_dot_segments(parts.path):
        return None
    scheme, host, port = base_origin
    return scheme, host, None if any_port else port, parts.path.rstrip("/")


def _safe_relative(url: str) -> bool:
    """True when a filled template is a relative FHIR URL that stays under the base (no scheme, host, dots)."""
    if not url or url.startswith("/") or any(not c.isprintable() or c.isspace() or c == "\\" for c in url):
        return False
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and not has_dot_segments(parts.path)


@dataclass(frozen=True)
class _Access:
    """Permission to fetch: the base, the token (None when anonymous), and the instant it stops being usable."""

    base: str
    token: str | None
    deadline: float


def resolve_prefetch(definition: ServiceDefinition, request: HookRequest, *, policy: FetchPolicy,
                     received_at: float, fetcher: FhirFetcher | None = None) -> PrefetchResult:
    """Resolve every prefetch key of ``definition`` for ``request``; raise PreconditionFailed (412) when a
    required key is unavailable.

    ``received_at`` is ``time.monotonic()`` when the request arrived: the overall fetch deadline and the access
    token's expiry are measured from it. Absent keys are fetched in parallel; the call returns by the deadline
    even if a FHIR server hangs. Keys the client sent without a template are kept (resources are classified by
    content, not key) but never fetched. Then the definition's ``follow_references`` are followed (module
    docstring); that never raises PreconditionFailed.
    """
    fetcher = fetcher or default_fetcher()
    deadline = received_at + policy.deadline_seconds
    fetch_deadline = deadline - min(policy.deadline_seconds * _RESERVE_SHARE, _RESERVE_MAX_SECONDS)
    token = request.fhir_authorization.access_token if request.fhir_authorization else None
    access = _fetch_access(request, policy, received_at, fetch_deadline)
    results: dict[str, KeyResult] = {}
    jobs: dict[str, tuple[Callable[[], KeyResult], KeyResult]] = {}

    for key, template in definition.prefetch.items():
        refetch_note: str | None = None
        if key in request.prefetch:
            result, bundle = _from_prefetch(key, request.prefetch[key], token)
            if not (policy.operation_outcome_refetch and _is_outcome(request.prefetch[key])):
                if bundle is not None:
                    if isinstance(access, str):
                        result = _next_not_followed(result, f"its next link was not followed: {access}")
                    else:
                        jobs[key] = (_follow_job(fetcher, policy, access, key, bundle), result)
                results[key] = result
                continue
            refetch_note = result.reason  # an OperationOutcome, refetched by policy
        if isinstance(access, str):
            reason = f"{refetch_note}; not refetched: {access}" if refetch_note else access
            results[key] = KeyResult(key, KeyState.UNAVAILABLE, reason=reason)
            continue
        relative_url = fill_template(template, request.context)
        if relative_url is None:
            results[key] = KeyResult(key, KeyState.UNAVAILABLE, reason="template token has no value")
        elif not _safe_relative(relative_url):
            results[key] = KeyResult(key, KeyState.UNAVAILABLE,
                                     reason="the filled template is not a relative FHIR URL under fhirServer")
        else:
            fallback = KeyResult(key, KeyState.UNAVAILABLE, origin=ORIGIN_FHIR, reason="timed out")
            jobs[key] = (_fetch_job(fetcher, policy, access, key, relative_url), fallback)
            results[key] = fallback

    results.update(_run(jobs, deadline))
    for key, value in request.prefetch.items():
        if key not in definition.prefetch:
            results[key] = _without_next(_from_prefetch(key, value, token))
    patient_id = request.context.get("patientId")
    patient_id = patient_id if isinstance(patient_id, str) and patient_id else None
    if patient_id:
        results = {key: _only_about(patient_id, result) for key, result in results.items()}

    _log.debug("prefetch resolved: %s", {key: r.state.value for key, r in results.items()})
    missing = {key: results[key].reason or "unavailable" for key in sorted(definition.required_prefetch)
               if results[key].state is KeyState.UNAVAILABLE}
    if missing:
        _log.info("prefetch: required keys unavailable: %s", ", ".join(missing))
        # A key sent and used as sent (not refetched) was unusable, not missing: the 412 says which it was.
        sent = {key for key in missing if key in request.prefetch
                and not (policy.operation_outcome_refetch and _is_outcome(request.prefetch[key]))}
        raise PreconditionFailed(missing, sent=sent)
    if definition.follow_references:
        results = _follow_references(definition, request, results, access=access, policy=policy, fetcher=fetcher,
                                     deadline=deadline, patient_id=patient_id)
    return PrefetchResult(MappingProxyType(results))


def _fetch_access(request: HookRequest, policy: FetchPolicy, received_at: float, deadline: float) -> _Access | str:
    """Whether the fallback fetch may run for this request: an _Access, or the reason it may not."""
    if not request.fhir_server:
        return "no fhirServer in the request"
    if not policy.allowed_bases:
        return "the FHIR fallback fetch is disabled"
    if not policy.allows(request.fhir_server):
        return "fhirServer not on the allowlist"
    authorization = request.fhir_authorization
    if authorization is None:
        if not policy.allow_anonymous:
            return "no fhirAuthorization in the request, and anonymous FHIR access is not allowed"
        return _Access(request.fhir_server, None, deadline)
    if authorization.access_token is None:
        # A token was meant to be sent: calling the server without one (anonymous access) is not what was asked.
        return "fhirAuthorization has no access_token"
    if not _HEADER_TOKEN.fullmatch(authorization.access_token):
        # http.client cannot send a character beyond Latin-1 (UnicodeEncodeError, logged with a traceback for every
        # key as "failed unexpectedly") and requests refuses CR/LF: say what is wrong, and send nothing.
        return "fhirAuthorization.access_token cannot be sent in an Authorization header (visible ASCII only)"
    if authorization.expires_in is None:
        # No lifetime given: the token is used only until this request's deadline, and never kept.
        return _Access(request.fhir_server, authorization.access_token, deadline)
    expires_at = received_at + authorization.expires_in
    if time.monotonic() >= expires_at:
        return "the fhirAuthorization access token has expired"
    return _Access(request.fhir_server, authorization.access_token, min(deadline, expires_at))


def _is_outcome(value: Any) -> bool:
    return is_resource(value) and value["resourceType"] == "OperationOutcome"


def _from_prefetch(key: str, value: Any, token: str | None) -> tuple[KeyResult, Mapping[str, Any] | None]:
    """Classify one value the client sent; also return it when it is a Bundle with a next link to follow."""
    if value is None:
        return KeyResult(key, KeyState.EMPTY, origin=ORIGIN_PREFETCH), None
    if not is_resource(value):
        return KeyResult(key, KeyState.UNAVAILABLE, origin=ORIGIN_PREFETCH,
                         reason=f"prefetch.{clean_text(key, 60)} is not a FHIR resource"), None
    resource_type = value["resourceType"]
    if resource_type == "OperationOutcome":
        diagnostics = outcome_diagnostics(value, token)
        return KeyResult(key, KeyState.UNAVAILABLE, origin=ORIGIN_PREFETCH,
                         reason=f"the client sent an OperationOutcome: {diagnostics}"), None
    if resource_type != "Bundle":
        return KeyResult(key, KeyState.DATA, (value,), origin=ORIGIN_PREFETCH), None
    try:
        resources, dropped = bundle_entries(value)
    except ValueError as error:
        return KeyResult(key, KeyState.UNAVAILABLE, origin=ORIGIN_PREFETCH,
                         reason=f"prefetch.{clean_text(key, 60)}: {error}"), None
    link = next_link(value)
    total = value.get("total")
    if not resources and not link and isinstance(total, int) and not isinstance(total, bool) and total > 0:
        # Bundle.total counts the search's matches: a page that holds none of them is not "the search found
        # nothing", and there is no next link to fetch them by.
        reason = _joined(_dropped_note(dropped), f"its total is {total} but it holds no resources and no next link")
        return KeyResult(key, KeyState.UNAVAILABLE, origin=ORIGIN_PREFETCH, reason=reason,
                         dropped_entries=dropped), None
    result = KeyResult(key, KeyState.DATA if resources else KeyState.EMPTY, resources, ORIGIN_PREFETCH,
                       reason=_dropped_note(dropped), dropped_entries=dropped)
    return result, value if link else None


def _only_about(patient_id: str, result: KeyResult) -> KeyResult:
    """``result`` without the resources that name a patient other than ``patient_id`` (with a note saying so).

    The prefetch and the fallback fetch are for the context patient; an Observation whose subject is another
    Patient (a client or FHIR server mixing up records, or a hostile one) must never be graded as this patient's.
    Resources that name no patient (no subject, a contained or non-Patient reference) are kept.
    """
    targets: dict[str, str | None] = {}  # reference -> Patient id: every result of a chart names the same one
    kept = tuple(r for r in result.resources if not _about_other_patient(r, patient_id, targets))
    dropped = len(result.resources) - len(kept)
    if not dropped:
        return result
    state = result.state if result.state is KeyState.UNAVAILABLE or kept else KeyState.EMPTY
    narrowed = KeyResult(result.key, state, kept, result.origin, result.reason, result.dropped_entries)
    return _with_note(narrowed, f"{dropped} resource(s) about another patient than context.patientId were dropped")


def _about_other_patient(resource: Mapping[str, Any], patient_id: str, targets: dict[str, str | None]) -> bool:
    """Whether ``resource`` is another Patient, or its subject/patient is; ``targets`` caches the references read."""
    if resource.get("resourceType") == "Patient":
        resource_id = resource.get("id")
        return isinstance(resource_id, str) and bool(resource_id) and resource_id != patient_id
    for name in ("subject", "patient"):
        value = resource.get(name)
        if value is None:  # the usual case for one of the two: skip the rest (this runs for every resource)
            continue
        # A dict is tested first: it is what JSON gives, and the Mapping ABC's check costs five times more.
        reference = value.get("reference") if isinstance(value, (dict, Mapping)) else None
        if not isinstance(reference, str):
            continue
        if reference in targets:
            target = targets[reference]
        else:
            target = targets[reference] = _patient_reference(reference)
        if target is not None and target != patient_id:
            return True
    return False


def _patient_reference(reference: str) -> str | None:
    """The id in a reference to a Patient ("Patient/x", absolute, or with _history), else None."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1] else None


def _without_next(classified: tuple[KeyResult, Mapping[str, Any] | None]) -> KeyResult:
    result, bundle = classified
    if bundle is None:
        return result
    return _next_not_followed(result, "its next link was not followed (not a template key)")


def _next_not_followed(first_page: KeyResult, note: str) -> KeyResult:
    """The key when its first page's ``next`` link was not followed to the end (``note`` says why).

    A page with resources is data with the note: the service uses what it has and reports the rest as missing.
    A page without resources is unavailable, not empty: its data lies behind the link, so "no data" would be
    an assessment on nothing; for a required key the 412 machinery then applies.
    """
    if first_page.resources:
        return _with_note(first_page, note)
    return KeyResult(first_page.key, KeyState.UNAVAILABLE, origin=first_page.origin,
                     reason=_joined(first_page.reason, f"its first page holds no resources and {note}"),
                     dropped_entries=first_page.dropped_entries)


def _with_note(result: KeyResult, note: str) -> KeyResult:
    return KeyResult(result.key, result.state, result.resources, result.origin, _joined(result.reason, note),
                     result.dropped_entries)


def _joined(reason: str | None, note: str) -> str:
    return f"{reason}; {note}" if reason else note


def _dropped_note(dropped: int) -> str | None:
    return f"{dropped} Bundle entries without a resource were dropped" if dropped else None


def _from_outcome(key: str, outcome: FetchOutcome, origin_: str, prior_reason: str | None = None) -> KeyResult:
    """A KeyResult from what the fetcher produced."""
    if not outcome.ok:
        return KeyResult(key, KeyState.UNAVAILABLE, origin=origin_, reason=outcome.reason)
    notes = [n for n in (prior_reason, outcome.note, _dropped_note(outcome.dropped_entries)) if n]
    unique_notes = list(dict.fromkeys(notes))
    if outcome.note and not outcome.resources:
        # Pagination stopped early (a next link failed, looped or left the origin) before any resource came, or
        # the search's total counts matches no page held: the data exists but was not obtained, so the key is
        # unavailable, not empty (see _next_not_followed).
        return KeyResult(key, KeyState.UNAVAILABLE, origin=origin_, dropped_entries=outcome.dropped_entries,
                         reason="no resource was obtained: " + "; ".join(unique_notes))
    return KeyResult(key, KeyState.DATA if outcome.resources else KeyState.EMPTY, outcome.resources, origin_,
                     "; ".join(unique_notes) or None, outcome.dropped_entries)


def _fetch_job(fetcher: FhirFetcher, policy: FetchPolicy, access: _Access, key: str,
               relative_url: str) -> Callable[[], KeyResult]:
    def job() -> KeyResult:
        outcome = fetcher.fetch(access.base, relative_url, token=access.token, deadline=access.deadline,
                                label=key, max_pages=policy.max_pages, max_resources=policy.max_resources,
                                max_page_bytes=policy.max_page_bytes)
        return _from_outcome(key, outcome, ORIGIN_FHIR)
    return job


def _follow_job(fetcher: FhirFetcher, policy: FetchPolicy, access: _Access, key: str,
                bundle: Mapping[str, Any]) -> Callable[[], KeyResult]:
    def job() -> KeyResult:
        outcome = fetcher.paginate(access.base, bundle, token=access.token, deadline=access.deadline, label=key,
                                   max_pages=policy.max_pages, max_resources=policy.max_resources,
                                   max_page_bytes=policy.max_page_bytes)
        return _from_outcome(key, outcome, ORIGIN_PREFETCH)
    return job


def _run(jobs: Mapping[str, tuple[Callable[[], KeyResult], KeyResult]], deadline: float) -> dict[str, KeyResult]:
    """Run the jobs in parallel until ``deadline``; a job not done by then yields its fallback result.

    The pool is per call and shut down without waiting: a thread stuck on a slow server finishes on its own
    (every socket wait of the fetcher ends at the fetch deadline, a little before this one) while this call
    returns on time.
    """
    results: dict[str, KeyResult] = {}
    remaining = deadline - time.monotonic()
    if not jobs:
        return results
    if remaining <= 0:
        return {key: _timed_out(fallback) for key, (_, fallback) in jobs.items()}
    executor = ThreadPoolExecutor(max_workers=min(len(jobs), MAX_PARALLEL_FETCHES),
                                  thread_name_prefix="cds-prefetch")
    try:
        # Each job runs in a copy of this context, so its log lines carry the request's id (REQUEST_ID).
        futures: dict[Future[KeyResult], str] = {executor.submit(contextvars.copy_context().run, job): key
                                                 for key, (job, _) in jobs.items()}
        done, _ = wait(futures, timeout=remaining)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    for future, key in futures.items():
        fallback = jobs[key][1]
        if future not in done:
            results[key] = _timed_out(fallback)
            continue
        try:
            results[key] = future.result()
        except Exception:  # a bug in the fetch path must not turn into a 500 for one optional key
            _log.exception("prefetch: fetching key %s failed unexpectedly", key)
            results[key] = (_next_not_followed(fallback, "following its next link failed unexpectedly")
                            if fallback.state is not KeyState.UNAVAILABLE else
                            KeyResult(key, KeyState.UNAVAILABLE, origin=fallback.origin,
                                      reason="fetch failed unexpectedly"))
    return results


def _timed_out(fallback: KeyResult) -> KeyResult:
    if fallback.state is KeyState.UNAVAILABLE:
        return KeyResult(fallback.key, KeyState.UNAVAILABLE, origin=fallback.origin, reason="timed out")
    return _next_not_followed(fallback, "following its next link timed out")


# --- following references -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class References:
    """What one element of some resources names of one resource type.

    ``ids``: targets on `fhirServer` (relative references, or absolute ones under it); ``elsewhere``: ids of
    targets named by absolute URLs on another server (never followed); ``invalid``: references to the type whose
    id is not a FHIR id (never put into a search). Contained ("#id") references and other types are left out.
    """

    ids: frozenset[str] = frozenset()
    elsewhere: frozenset[str] = frozenset()
    invalid: int = 0


def collect_references(resources: Iterable[Mapping[str, Any]], element: str, resource_type: str,
                       fhir_server: str | None) -> References:
    """The references to ``resource_type`` in ``element`` (a Reference or a list of them) of ``resources``."""
    base = _split_base(fhir_server, allow_any_port=False) if fhir_server else None
    ids: set[str] = set()
    elsewhere: set[str] = set()
    invalid: set[str] = set()
    for resource in resources:
        value = resource.get(element)
        for item in value if isinstance(value, list) else (value,):
            reference = item.get("reference") if isinstance(item, (dict, Mapping)) else None
            if not isinstance(reference, str):
                continue
            target = _reference_target(reference.strip(), resource_type)
            if target is None:
                continue
            server, target_id = target
            if not _FHIR_ID.fullmatch(target_id):
                invalid.add(reference)
            elif not server or (base is not None and _split_base(server, allow_any_port=False) == base):
                ids.add(target_id)
            else:
                elsewhere.add(target_id)
    # Another server's id is counted even when fhirServer has one alike: they are different resources.
    return References(frozenset(ids), frozenset(elsewhere), len(invalid))


def _reference_target(reference: str, resource_type: str) -> tuple[str, str] | None:
    """(server base or "", id) of a reference to ``resource_type``: "Type/id" or "{base}/Type/id", with any
    ``/_history/{version}`` dropped (the current version is read); the id is "" for "Type/" (a reference to the
    type without an id: reported, never skipped); None for "#id" and other types."""
    if reference.startswith("#"):
        return None
    path = reference.split("/_history/")[0].rstrip("/")
    rest, _, target_id = path.rpartition("/")
    server, _, kind = rest.rpartition("/")
    if kind == resource_type and target_id:
        return server, target_id
    return (rest, "") if target_id == resource_type else None


def _follow_references(definition: ServiceDefinition, request: HookRequest, results: Mapping[str, KeyResult], *,
                       access: _Access | str, policy: FetchPolicy, fetcher: FhirFetcher, deadline: float,
                       patient_id: str | None) -> dict[str, KeyResult]:
    """``results`` with the targets of the declared references added to their keys, and notes for those missing.

    Targets already among any key's resources are not fetched. The rest are searched by id, per type, in chunks
    of REFERENCE_CHUNK ids run in parallel under ``deadline``; only resources of the type whose id was asked for
    are kept.
    """
    wanted: dict[tuple[str, str, str], References] = {}  # (key, element, type) -> what the key's resources name
    for key, elements in definition.follow_references.items():
        result = results.get(key)
        if result is None or result.state is KeyState.UNAVAILABLE or not result.resources:
            continue
        for element, resource_type in elements.items():
            found = collect_references(result.resources, element, resource_type, request.fhir_server)
            if found.ids or found.elsewhere or found.invalid:
                wanted[(key, element, resource_type)] = found
    if not wanted:
        return dict(results)
    present = {(str(r["resourceType"]), r["id"]) for result in results.values() for r in result.resources
               if isinstance(r.get("id"), str)}
    wanted = {where: References(frozenset(i for i in refs.ids if (where[2], i) not in present),
                                frozenset(i for i in refs.elsewhere if (where[2], i) not in present), refs.invalid)
              for where, refs in wanted.items()}
    asked: dict[str, set[str]] = {}
    for (_, _, resource_type), refs in wanted.items():
        asked.setdefault(resource_type, set()).update(refs.ids)
    fetched, why_not = _fetch_by_id(asked, access=access, policy=policy, fetcher=fetcher, deadline=deadline)

    followed = dict(results)
    for (key, element, resource_type), refs in wanted.items():
        result = followed[key]
        resources = tuple(fetched[(resource_type, i)] for i in sorted(refs.ids) if (resource_type, i) in fetched)
        about_other = 0
        if patient_id:
            kept = tuple(r for r in resources if not _about_other_patient(r, patient_id, {}))
            about_other, resources = len(resources) - len(kept), kept
        result = KeyResult(key, result.state, result.resources + resources, result.origin, result.reason,
                           result.dropped_entries)
        reasons: dict[str, int] = {}
        for target_id in sorted(refs.ids):
            if (resource_type, target_id) not in fetched:
                reason = why_not.get((resource_type, target_id), "the FHIR server did not return them")
                reasons[reason] = reasons.get(reason, 0) + 1
        if refs.elsewhere:
            reasons["they are on another server than fhirServer"] = len(refs.elsewhere)
        if refs.invalid:
            reasons["their id is not a FHIR id"] = refs.invalid
        for reason, count in reasons.items():
            result = _with_note(result, f"{count} {resource_type}(s) named by {element} could not be obtained: "
                                        f"{reason}")
        if about_other:
            result = _with_note(result, f"{about_other} resource(s) about another patient than context.patientId "
                                        "were dropped")
        followed[key] = result
    _log.debug("prefetch: followed references: %s",
               {f"{key}.{element}": len(refs.ids) for (key, element, _), refs in wanted.items()})
    return followed


def _fetch_by_id(asked: Mapping[str, set[str]], *, access: _Access | str, policy: FetchPolicy,
                 fetcher: FhirFetcher, deadline: float,
                 ) -> tuple[dict[tuple[str, str], Mapping[str, Any]], dict[tuple[str, str], str]]:
    """The resources found for each (type, id) asked for, and why each one not found was not obtained."""
    fetched: dict[tuple[str, str], Mapping[str, Any]] = {}
    why_not: dict[tuple[str, str], str] = {}
    jobs: dict[str, tuple[Callable[[], KeyResult], KeyResult]] = {}
    chunks: dict[str, tuple[str, list[str]]] = {}
    for resource_type, ids in asked.items():
        ordered = sorted(ids)
        if isinstance(access, str):
            why_not.update({(resource_type, i): access for i in ordered})
            continue
        # Bounded like a key's pages: a request naming thousands of targets must not become a hundred searches.
        limit = min(policy.max_resources, policy.max_pages * REFERENCE_CHUNK)
        over = ordered[limit:]
        why_not.update({(resource_type, i): f"over the limit of {limit} references followed"
                        for i in over})
        ordered = ordered[:limit]
        for start in range(0, len(ordered), REFERENCE_CHUNK):
            label = f"{resource_type} references {start // REFERENCE_CHUNK + 1}"
            chunk = ordered[start:start + REFERENCE_CHUNK]
            chunks[label] = (resource_type, chunk)
            jobs[label] = (_fetch_job(fetcher, policy, access, label, f"{resource_type}?_id={','.join(chunk)}"),
                           KeyResult(label, KeyState.UNAVAILABLE, origin=ORIGIN_FHIR, reason="timed out"))
    for label, outcome in _run(jobs, deadline).items():
        resource_type, chunk = chunks[label]
        wanted = set(chunk)
        for resource in outcome.resources:
            target_id = resource.get("id")
            if resource.get("resourceType") == resource_type and isinstance(target_id, str) and target_id in wanted:
                fetched.setdefault((resource_type, target_id), resource)
        if outcome.reason:
            why_not.update({(resource_type, i): outcome.reason for i in chunk})
    return fetched, why_not


_default_lock = threading.Lock()
_default: FhirFetcher | None = None


def default_fetcher() -> FhirFetcher:
    """The process-wide fetcher (one connection pool), created on first use, after any gunicorn fork."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FhirFetcher(pool_size=MAX_PARALLEL_FETCHES * 2)
        return _default
