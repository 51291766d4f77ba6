"""CDS Hooks 2.0 response models: cards, suggestions, actions, links and codings.

Each model refuses at construction what the specification forbids
(https://cds-hooks.hl7.org/2.0/#cds-service-response) and serialises with the spec's omit-empty rule:
an optional attribute without a value is left out, never sent as ``null``, ``""``, ``[]`` or ``{}``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: The spec says "one-sentence, <140-character summary": 139 characters at most.
SUMMARY_MAX_CHARS = 139


class Indicator(str, enum.Enum):
    """Card urgency, in rising order (spec §Card Attributes)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for critical."""
        return list(Indicator).index(self)


class SelectionBehavior(str, enum.Enum):
    """How many of a card's suggestions the user may accept (spec §Card Attributes)."""

    AT_MOST_ONE = "at-most-one"
    ANY = "any"


class ActionType(str, enum.Enum):
    """The FHIR interaction a suggestion's action asks the client to perform (spec §Action)."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


class LinkType(str, enum.Enum):
    """`absolute` links open as given; `smart` links are SMART app launch URLs (spec §Link)."""

    ABSOLUTE = "absolute"
    SMART = "smart"


def _require_text(value: object, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")


def _require_absolute_url(value: str, name: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an absolute http(s) URL, got {value!r}")


#: The leaves of parsed JSON, by exact type (a str enum is a str, but is written as its value).
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def omit_empty(value: Any) -> Any:
    """Drop ``None``, ``""``, ``[]`` and ``{}`` recursively, as the spec's JSON rules require."""
    if type(value) in _JSON_SCALARS:  # most of a card: nothing to drop or convert, and no ABC check to pay for
        return value
    if isinstance(value, Mapping):
        cleaned = {k: omit_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if not _is_empty(v)}
    if isinstance(value, (list, tuple)):
        items = [omit_empty(v) for v in value]
        return [v for v in items if not _is_empty(v)]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict, tuple)) and len(value) == 0)


class _Model:
    """Serialisation shared by every response model."""

    def to_json(self) -> dict[str, Any]:
        """The spec JSON for this model, with empty optional attributes omitted."""
        # One pass: omit_empty of every attribute, nested models by their own to_json (already without empties,
        # which omit_empty would only walk again), the JSON names worked out once per class.
        result: dict[str, Any] = {}
        for attribute, name in _json_names(type(self)):
            value = _attribute_json(getattr(self, attribute))
            if not _is_empty(value):
                result[name] = value
        return result


#: Each model class's (attribute, JSON name) pairs, in declaration order.
_JSON_NAMES: dict[type[_Model], tuple[tuple[str, str], ...]] = {}


def _json_names(model: type[_Model]) -> tuple[tuple[str, str], ...]:
    """``model``'s attributes with their JSON names (camelCase); worked out once per class, not per card."""
    names = _JSON_NAMES.get(model)
    if names is None:
        fields = dataclasses.fields(model)  # type: ignore[arg-type]
        names = _JSON_NAMES[model] = tuple((f.name, _camel(f.name)) for f in fields)
    return names


def _attribute_json(value: Any) -> Any:
    """One attribute's JSON: a model by its to_json, a list or tuple item by item, an enum by its value; each with
    empties omitted (:func:`omit_empty`)."""
    if isinstance(value, _Model):
        # omit_empty would leave this as it is: nothing in it is empty, and every enum of these models has a str
        # value, already written as that str.
        return value.to_json()
    if isinstance(value, (list, tuple)):
        items = [_attribute_json(v) for v in value]
        return [v for v in items if not _is_empty(v)]
    if isinstance(value, enum.Enum):
        return omit_empty(value.value)
    return omit_empty(value)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class Coding(_Model):
    """A FHIR Coding as CDS Hooks uses it: `system` and `code` required, `display` optional."""

    system: str
    code: str
    display: str | None = None

    def __post_init__(self) -> None:
        _require_text(self.system, "Coding.system")
        _require_text(self.code, "Coding.code")
        if self.display is not None:
            _require_text(self.display, "Coding.display")


@dataclass(frozen=True)
class Source(_Model):
    """Where a card's guidance comes from; `label` is required, `url` and `icon` absolute."""

    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None

    def __post_init__(self) -> None:
        _require_text(self.label, "Source.label")
        if self.url is not None:
            _require_absolute_url(self.url, "Source.url")
        if self.icon is not None:
            _require_absolute_url(self.icon, "Source.icon")


@dataclass(frozen=True)
class Action(_Model):
    """One FHIR change a suggestion proposes (spec §Action)."""

    type: ActionType
    description: str
    resource: Mapping[str, Any] | None = None
    resource_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ActionType(self.type))
        _require_text(self.description, "Action.description")
        if self.type in (ActionType.CREATE, ActionType.UPDATE):
            if not self.resource or "resourceType" not in self.resource:
                raise ValueError(f"a {self.type.value} action needs a full FHIR resource")
        if self.resource_id is not None and "/" not in self.resource_id:
            raise ValueError("Action.resourceId must be a relative reference such as 'ServiceRequest/123'")
        if self.type is ActionType.DELETE and self.resource_id is None:
            raise ValueError("a delete action needs resourceId")


@dataclass(frozen=True)
class Suggestion(_Model):
    """A set of actions the clinician can accept with one click (spec §Suggestion)."""

    label: str
    uuid: str | None = None
    is_recommended: bool | None = None
    actions: tuple[Action, ...] = ()

    def __post_init__(self) -> None:
        _require_text(self.label, "Suggestion.label")
        object.__setattr__(self, "actions", tuple(self.actions))


@dataclass(frozen=True)
class Link(_Model):
    """A link shown on a card; `appContext` is only allowed on `smart` links (spec §Link)."""

    label: str
    url: str
    type: LinkType = LinkType.ABSOLUTE
    app_context: str | None = None
    autolaunchable: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", LinkType(self.type))
        _require_text(self.label, "Link.label")
        _require_absolute_url(self.url, "Link.url")
        if self.app_context is not None and self.type is not LinkType.SMART:
            raise ValueError("Link.appContext is only allowed on smart links")


@dataclass(frozen=True)
class Card(_Model):
    """One piece of guidance (spec §Card Attributes)."""

    summary: str
    indicator: Indicator
    source: Source
    detail: str | None = None
    uuid: str | None = None
    suggestions: tuple[Suggestion, ...] = ()
    selection_behavior: SelectionBehavior | None = None
    override_reasons: tuple[Coding, ...] = ()
    links: tuple[Link, ...] = ()

    def __post_init__(self) -> None:
        _require_text(self.summary, "Card.summary")
        if len(self.summary) > SUMMARY_MAX_CHARS:
            raise ValueError(
                f"Card.summary must be under 140 characters, got {len(self.summary)}: {self.summary!r}"
            )
        object.__setattr__(self, "indicator", Indicator(self.indicator))
        for name in ("suggestions", "override_reasons", "links"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.selection_behavior is not None:
            object.__setattr__(self, "selection_behavior", SelectionBehavior(self.selection_behavior))
        if self.suggestions and self.selection_behavior is None:
            raise ValueError("a card with suggestions must set selectionBehavior")
        if self.selection_behavior is SelectionBehavior.AT_MOST_ONE:
            if sum(1 for s in self.suggestions if s.is_recommended) > 1:
                raise ValueError("at most one suggestion may be recommended with selectionBehavior at-most-one")
        for reason in self.override_reasons:
            if reason.display is None:
                raise ValueError("every overrideReasons Coding needs a display")

    @property
    def kind(self) -> str | None:
        """The card kind, carried as `source.topic.code`."""
        return self.source.topic.code if self.source.topic else None

    def stamped(self, new_uuid: Any) -> Card:
        """A copy with a card uuid and a uuid on every suggestion, drawn from ``new_uuid()``."""
        card_uuid = self.uuid or str(new_uuid())
        suggestions = tuple(dataclasses.replace(s, uuid=s.uuid or str(new_uuid())) for s in self.suggestions)
        return dataclasses.replace(self, uuid=card_uuid, suggestions=suggestions)


@dataclass(frozen=True)
class ServiceResponse:
    """What a service handler returns: cards and an optional response extension."""

    cards: Sequence[Card] = ()
    extension: Mapping[str, Any] = field(default_factory=dict)
    system_actions: Sequence[Action] = ()

    def to_json(self) -> dict[str, Any]:
        """The response body; `cards` is always present, even empty, as the spec requires."""
        body: dict[str, Any] = {"cards": [card.to_json() for card in self.cards]}
        if self.system_actions:
            body["systemActions"] = [a.to_json() for a in self.system_actions]
        extension = omit_empty(dict(self.extension))
        if extension:
            body["extension"] = extension
        return body
