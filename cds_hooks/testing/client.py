"""A CDS client that behaves like the CDS Hooks Sandbox, for black-box tests and integration checks.

What it copies from the Sandbox (cds-hooks/sandbox `retrieve-data-helpers/*.js`): a CORS preflight OPTIONS
without a token before every call; an ES384 JWT with `kid` and `jku`, `aud` the exact URL called,
`exp = iat + 300` and a uuid `jti`; discovery first, then `{discoveryURL}/{service.id}`; prefetch templates
filled from the FHIR server, with a template whose token has no value skipped and a key that fails to fetch
omitted. What the Sandbox never does is available too: any prefetch value (``None``, an OperationOutcome),
other signers (RS384 with `nbf` and `sub`), and a deliberately wrong `aud`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import requests

from cds_hooks.registry import fill_template
from cds_hooks.testing.tokens import TokenSigner

#: The origin the Sandbox is served from; preflights carry it.
SANDBOX_ORIGIN = "https://sandbox.cds-hooks.org"


@dataclass
class SandboxClient:
    """Calls a CDS service at ``base_url`` (the part before ``/cds-services``) as the Sandbox would."""

    base_url: str
    signer: TokenSigner | None = None
    origin: str = SANDBOX_ORIGIN
    timeout: float = 10.0
    session: requests.Session = field(default_factory=requests.Session)
    #: Every (method, url, status) this client sent, preflights included, for assertions.
    sent: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def discovery_url(self) -> str:
        """``{base}/cds-services``."""
        return self.base_url.rstrip("/") + "/cds-services"

    def preflight(self, url: str, method: str) -> requests.Response:
        """The browser's CORS preflight: OPTIONS, no token, asking for Authorization and Content-Type."""
        response = self.session.options(url, timeout=self.timeout, headers={
            "Origin": self.origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
        })
        self.sent.append(("OPTIONS", url, response.status_code))
        return response

    def token(self, url: str, *, aud: str | Sequence[str] | None = None, **sign_options: Any) -> str | None:
        """A JWT for a call to ``url``; ``aud`` overrides the audience (to test a wrong one)."""
        if self.signer is None:
            return None
        return self.signer.sign(url if aud is None else aud, **sign_options)

    def discover(self, **token_options: Any) -> requests.Response:
        """Preflight, then GET the discovery document."""
        return self._call("GET", self.discovery_url, None, token_options)

    def invoke(self, service_id: str, context: Mapping[str, Any], *, hook: str = "patient-view",
               prefetch: Mapping[str, Any] | None = None, fhir_server: str | None = None,
               fhir_authorization: Mapping[str, Any] | None = None, hook_instance: str | None = None,
               extra: Mapping[str, Any] | None = None, **token_options: Any) -> requests.Response:
        """Preflight, then POST a hook request to ``{discoveryURL}/{service_id}``."""
        body: dict[str, Any] = {"hookInstance": hook_instance or str(uuid.uuid4()), "hook": hook,
                                "context": dict(context)}
        if fhir_server is not None:
            body["fhirServer"] = fhir_server
        if fhir_authorization is not None:
            body["fhirAuthorization"] = dict(fhir_authorization)
        if prefetch is not None:
            body["prefetch"] = dict(prefetch)
        body.update(extra or {})
        return self._call("POST", f"{self.discovery_url}/{service_id}", body, token_options)

    def feedback(self, service_id: str, items: Sequence[Mapping[str, Any]], **token_options: Any) -> requests.Response:
        """Preflight, then POST ``{"feedback": items}`` to the service's feedback endpoint."""
        return self._call("POST", f"{self.discovery_url}/{service_id}/feedback", {"feedback": list(items)},
                          token_options)

    def accept(self, service_id: str, card: Mapping[str, Any], suggestion: Mapping[str, Any],
               **token_options: Any) -> requests.Response:
        """What the Sandbox sends when a suggestion button is clicked."""
        return self.feedback(service_id, [{"card": card["uuid"], "outcome": "accepted",
                                           "acceptedSuggestions": [{"id": suggestion["uuid"]}],
                                           "outcomeTimestamp": _now()}], **token_options)

    def dismiss(self, service_id: str, card: Mapping[str, Any], reason: Mapping[str, Any] | None = None,
                **token_options: Any) -> requests.Response:
        """What the Sandbox sends on dismiss: the reason's system and code, no comment."""
        item: dict[str, Any] = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": _now()}
        if reason is not None:
            item["overrideReason"] = {"reason": {"code": reason["code"], "system": reason["system"]}}
        return self.feedback(service_id, [item], **token_options)

    def prefetch_from(self, service: Mapping[str, Any], fhir_server: str,
                      context: Mapping[str, Any], *, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Fill the service's prefetch templates from ``fhir_server``: unfillable templates skipped, failures omitted.

        ``headers`` are added to each FHIR request (e.g. ``Authorization`` with the EHR's FHIR access token).
        A key whose response is not 200 or not JSON counts as failed, so it is omitted too.
        """
        prefetch: dict[str, Any] = {}
        for key, template in (service.get("prefetch") or {}).items():
            relative = fill_template(template, context)
            if relative is None:
                continue
            try:
                response = self.session.get(f"{fhir_server.rstrip('/')}/{relative}", timeout=self.timeout,
                                            headers={"Accept": "application/fhir+json", **(headers or {})})
                if response.status_code == 200:
                    prefetch[key] = response.json()
            except (requests.RequestException, ValueError):
                continue
        return prefetch

    def _call(self, method: str, url: str, body: Any, token_options: Mapping[str, Any]) -> requests.Response:
        self.preflight(url, method)
        # A browser sends its Origin on the actual request too, not only on the preflight.
        headers = {"Accept": "application/json", "Origin": self.origin}
        token = self.token(url, **token_options)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = self.session.request(method, url, json=body, headers=headers, timeout=self.timeout)
        self.sent.append((method, url, response.status_code))
        return response


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
