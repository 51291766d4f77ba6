"""The service registry: service definitions as data, driving discovery and routing.

A definition is what discovery advertises (spec §Discovery) plus the handler the blueprint calls, which
prefetch keys are required (their absence, when the FHIR server cannot supply them, is a 412), and which
references in a key's resources the service follows on `fhirServer` (``follow_references``: not advertised).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cds_hooks.models import ServiceResponse
from cds_hooks.schemas import HookRequest

if TYPE_CHECKING:
    from cds_hooks.prefetch import PrefetchResult

#: Context fields each hook marks "Prefetch Token: Yes" (HL7 cds-hooks-library, hooks STU1).
HOOK_PREFETCH_TOKENS: Mapping[str, frozenset[str]] = {
    "patient-view": frozenset({"userId", "patientId", "encounterId"}),
    "order-select": frozenset({"userId", "patientId", "encounterId"}),
    "order-sign": frozenset({"userId", "patientId", "encounterId"}),
}
#: Tokens that are not context paths (spec §Prefetch tokens).
USER_TOKENS = frozenset({"userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId"})
_TOKEN = re.compile(r"\{\{(.*?)\}\}")
#: A FHIR element name (``medicationReference``) and a resource type name (``Medication``): a followed
#: reference's type is put into a search URL, so only plain names are accepted.
_ELEMENT_NAME = re.compile(r"[a-z][A-Za-z0-9]*")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z0-9]*")


@dataclass(frozen=True)
class HookCall:
    """Everything a handler needs: the validated request, the resolved prefetch, and the time of the call."""

    service_id: str
    request: HookRequest
    data: PrefetchResult
    now: datetime


Handler = Callable[[HookCall], ServiceResponse]


@dataclass(frozen=True)
class ServiceDefinition:
    """One CDS Service: discovery fields, the handler, which prefetch keys are required, and which references
    to follow.

    ``follow_references`` maps a prefetch key to {element name: target resource type}, e.g.
    ``{"medications": {"medicationReference": "Medication"}}``: the targets that element of the key's resources
    names on `fhirServer`, and that no key supplied, are read by ``Type?_id=`` searches and added to the key
    (`cds_hooks.prefetch`). The query subset of CDS Hooks has no ``_include``; this stands in for it.
    """

    id: str
    hook: str
    description: str
    handler: Handler = field(repr=False)
    title: str | None = None
    prefetch: Mapping[str, str] = field(default_factory=dict)
    required_prefetch: frozenset[str] = frozenset()
    #: context fields the hook requires, checked before the handler runs (checklist 50).
    required_context: frozenset[str] = frozenset()
    usage_requirements: str | None = None
    follow_references: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("id", "hook", "description"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ServiceDefinition.{name} must be a non-empty string")
        unknown = self.required_prefetch - set(self.prefetch)
        if unknown:
            raise ValueError(f"required prefetch keys without a template: {sorted(unknown)}")
        for key, template in self.prefetch.items():
            validate_template(self.hook, key, template)
        validate_follow_references(self.prefetch, self.follow_references)

    def to_json(self) -> dict[str, Any]:
        """The discovery entry for this service."""
        entry: dict[str, Any] = {"hook": self.hook, "id": self.id, "description": self.description}
        if self.title:
            entry["title"] = self.title
        if self.prefetch:
            entry["prefetch"] = dict(self.prefetch)
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


def validate_template(hook: str, key: str, template: str) -> None:
    """Refuse a prefetch template whose tokens are not CDS Hooks 2.0 tokens for ``hook``."""
    allowed = HOOK_PREFETCH_TOKENS.get(hook, frozenset())
    for token in _TOKEN.findall(template):
        token = token.strip()
        if token in USER_TOKENS:
            continue
        if token.startswith("context.") and token.removeprefix("context.") in allowed:
            continue
        raise ValueError(f"prefetch template {key!r} uses token {{{{{token}}}}}, not a 2.0 token for {hook}")


def validate_follow_references(prefetch: Mapping[str, str], follow: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse a ``follow_references`` declaration on a key without a template, or with names that are not plain
    FHIR element and resource type names."""
    if not isinstance(follow, Mapping):
        raise ValueError("follow_references must map prefetch keys to {element: resource type}")
    for key, elements in follow.items():
        if key not in prefetch:
            raise ValueError(f"follow_references: {key!r} is not a prefetch key")
        if not isinstance(elements, Mapping) or not elements:
            raise ValueError(f"follow_references[{key!r}] must map element names to resource types")
        for element, resource_type in elements.items():
            if not isinstance(element, str) or not _ELEMENT_NAME.fullmatch(element):
                raise ValueError(f"follow_references[{key!r}]: {element!r} is not an element name")
            if not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type):
                raise ValueError(f"follow_references[{key!r}][{element!r}]: {resource_type!r} is not a "
                                 "resource type")


class ServiceRegistry:
    """The services this deployment offers, in discovery order."""

    def __init__(self, definitions: Iterable[ServiceDefinition] = ()) -> None:
        self._definitions: tuple[ServiceDefinition, ...] = tuple(definitions)
        seen: set[tuple[str, str]] = set()
        for definition in self._definitions:
            pair = (definition.id, definition.hook)
            if pair in seen:
                raise ValueError(f"service {definition.id!r} is registered twice for hook {definition.hook!r}")
            seen.add(pair)

    def __iter__(self) -> Any:
        return iter(self._definitions)

    def ids(self) -> frozenset[str]:
        """Every advertised service id."""
        return frozenset(d.id for d in self._definitions)

    def find(self, service_id: str, hook: str) -> ServiceDefinition | None:
        """The definition registered for (``service_id``, ``hook``), if any."""
        for definition in self._definitions:
            if definition.id == service_id and definition.hook == hook:
                return definition
        return None

    def discovery(self) -> dict[str, Any]:
        """The discovery document: ``{"services": [...]}``."""
        return {"services": [d.to_json() for d in self._definitions]}


def fill_template(template: str, context: Mapping[str, Any], user_id: str | None = None) -> str | None:
    """Replace a template's tokens from ``context``; None when a token has no value (key then unfillable)."""
    missing = False

    def replace(match: re.Match[str]) -> str:
        nonlocal missing
        token = match.group(1).strip()
        if token.startswith("context."):
            value = context.get(token.removeprefix("context."))
        else:
            value = _user_token(token, user_id if user_id is not None else context.get("userId"))
        if value is None or isinstance(value, (dict, list)) or value == "":
            missing = True
            return ""
        return str(value)

    filled = _TOKEN.sub(replace, template)
    return None if missing else filled


def _user_token(token: str, user_id: Any) -> str | None:
    if not isinstance(user_id, str) or "/" not in user_id:
        return None
    resource_type, _, bare_id = user_id.partition("/")
    expected = {"userPractitionerId": "Practitioner", "userPractitionerRoleId": "PractitionerRole",
                "userPatientId": "Patient", "userRelatedPersonId": "RelatedPerson"}.get(token)
    return bare_id if expected == resource_type else None
