"""marshmallow schemas for what clients send: the hook request envelope and feedback.

Unknown fields are tolerated everywhere (spec §Extensions: "not prescriptive about support"), and the
schemas load into frozen dataclasses so nothing downstream handles raw dicts.
https://cds-hooks.hl7.org/2.0/#http-request_1 and https://cds-hooks.hl7.org/2.0/#feedback
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema

from cds_hooks.errors import InvalidRequest

#: Absent prefetch key vs. a key sent as JSON null are different things (spec §Prefetch); this marks absent.
_ABSENT = object()

#: The offset's minutes are 00-59 (RFC 3339 §5.6 time-numoffset): datetime.fromisoformat reads "+14:60" as +15:00.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:(?P<second>\d{2})(\.\d+)?([Zz]|[+-]\d{2}:[0-5]\d)$"
)
#: RFC 3339 §5.6 allows second 60, a leap second, which ``datetime`` cannot hold.
_LEAP_SECOND = "60"
_SECOND = slice(17, 19)  # "YYYY-MM-DDTHH:MM:SS": where the seconds are in a value the pattern matched
#: Longest feedback `card` accepted. Ours are 36-character uuids; the store indexes the value, and PostgreSQL
#: refuses an index entry over 2704 bytes (ProgramLimitExceeded, a 503 the client retried for ever); 512
#: characters are at most 2048 bytes of UTF-8.
MAX_CARD_UUID_LENGTH = 512


class _StrictString(fields.String):
    """A string that is not silently coerced from numbers or booleans, and holds no NUL character."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError("must be a string")
        # PostgreSQL text cannot hold U+0000: a hookInstance, card uuid or comment with one made the insert
        # fail with DataError (a 500, and on invoke no cards at all). No CDS Hooks string needs it.
        if "\x00" in value:
            raise ValidationError("must not contain the NUL character (U+0000)")
        return str(super()._deserialize(value, attr, data, **kwargs))


class _StrictInteger(fields.Integer):
    """A JSON integer: a number without a fractional part (JSON Schema's ``integer``, which openapi.yaml states).

    ``300.0`` is one (a .NET or Java client writing a double sends it so); ``"300"``, ``true`` and ``300.5`` are not.
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError("must be an integer")
        return int(super()._deserialize(value, attr, data, **kwargs))


#: ``expires_in`` sent as a string of digits: OAuth servers that write it so (Azure AD's v1 token endpoint sends
#: ``"expires_in": "3599"``) are passed on by clients that copy the token response into fhirAuthorization. Nine
#: digits at most keeps every such string under the documented maximum.
_DIGITS = re.compile(r"[0-9]{1,9}")


class _Seconds(_StrictInteger):
    """``expires_in``: a JSON integer, or a string of up to nine ASCII digits read as one.

    The spec says integer, but refusing ``"3599"`` showed the clinician no card at all, for a value that can be
    read only one way (the spec digest's pitfall 6: validate fhirAuthorization tolerantly).
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str):
            if not _DIGITS.fullmatch(value):
                raise ValidationError("must be an integer, or a string of up to 9 digits")
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


class _JSONObject(fields.Field[dict[str, Any]]):
    """Any JSON object, kept as is."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ValidationError("must be a JSON object")
        return dict(value)


class _Timestamp(fields.Field[datetime]):
    """An RFC 3339 date-time with a time zone, as feedback's `outcomeTimestamp` requires."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        match = _RFC3339.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValidationError("must be an RFC 3339 date-time with a time zone, e.g. 2021-12-11T10:05:31Z")
        text = value.replace("z", "Z").replace("Z", "+00:00")
        leap = match.group("second") == _LEAP_SECOND
        if leap:
            # Read as the last instant of its minute (59.999999 s), as service/timing.py reads FHIR times: the
            # order of timestamps is kept and the instant never moves into the next minute, day or year.
            text = text[: _SECOND.start] + "59" + text[_SECOND.stop :]
        try:
            parsed = datetime.fromisoformat(text)
            if leap:
                parsed = parsed.replace(microsecond=999_999)
            return parsed.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            # OverflowError: a valid offset that moves the instant outside years 1-9999.
            raise ValidationError("is not a valid date-time") from None


class _Body(Schema):
    """A JSON object a client sends: unknown members are ignored, and an OPTIONAL member sent as ``null`` is absent.

    The spec says an optional member without a value is omitted (§Use of JSON), but clients do send ``null``
    ("fhirServer": null beside "fhirAuthorization": null); it means "no value" either way, so every optional
    member reads it as absent, alike. A REQUIRED member sent as ``null`` is still refused, naming the member.
    """

    class Meta:
        unknown = EXCLUDE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._optional_keys = frozenset(f.data_key or name for name, f in self.load_fields.items() if not f.required)

    @pre_load
    def _null_means_absent(self, data: Any, **_: Any) -> Any:
        if not isinstance(data, Mapping) or not any(data.get(key, _ABSENT) is None for key in self._optional_keys):
            return data
        return {key: value for key, value in data.items() if value is not None or key not in self._optional_keys}


def _bearer(value: str) -> bool:
    """RFC 6749 §5.1: a token type is case insensitive ("BEARER" was a 400, and the clinician got no card)."""
    if value.lower() != "bearer":
        raise ValidationError("must be 'Bearer' (in any case)")
    return True


def _non_empty(value: str) -> bool:
    if not value.strip():
        raise ValidationError("must not be empty")
    return True


@dataclass(frozen=True)
class FhirAuthorization:
    """The client's short-lived FHIR access token (spec §FHIR Resource Access). Never logged or stored.

    Members the client left out are None (see :class:`FhirAuthorizationSchema`): without ``access_token`` there
    is nothing to call the FHIR server with; without ``expires_in`` the token is used only while the request
    that brought it lasts, which is all this service ever uses a token for.
    """

    access_token: str | None = field(default=None, repr=False)
    token_type: str = "Bearer"
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None
    patient: str | None = None


@dataclass(frozen=True)
class HookRequest:
    """A validated hook call. `prefetch` holds only the keys the client sent (values may be None)."""

    hook: str
    hook_instance: str
    context: Mapping[str, Any]
    fhir_server: str | None = None
    fhir_authorization: FhirAuthorization | None = None
    prefetch: Mapping[str, Any] = field(default_factory=dict)
    extension: Mapping[str, Any] = field(default_factory=dict)


class FhirAuthorizationSchema(_Body):
    """`fhirAuthorization`: every member sent is checked (a wrong type or value is a 400 naming it), but a member
    the spec marks REQUIRED that the client left out is tolerated.

    Real clients omit `expires_in` (cds-hooks/sandbox issues 22 and 65; the spec digest's pitfall 6: "validate
    tolerantly and fall back to 412"). Refusing such a request would show the clinician no card at all, although
    its prefetch may hold everything needed; tolerated, the prefetch is used, and a key that must be fetched is
    fetched with the token while the request lasts, or is unavailable (412 for a required key) when there is no
    `access_token` to fetch with.
    """

    access_token = _StrictString(validate=_non_empty)
    token_type = _StrictString(validate=_bearer)
    # Seconds; the upper bound (int32, 68 years) only keeps absurd values out of the expiry arithmetic.
    expires_in = _Seconds(validate=validate.Range(min=0, max=2**31 - 1))
    scope = _StrictString()
    subject = _StrictString()
    patient = _StrictString()

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> FhirAuthorization:
        return FhirAuthorization(**data)


class HookRequestSchema(_Body):
    """The request envelope (spec §HTTP Request). Unknown fields are ignored, not rejected."""

    hook = _StrictString(required=True, validate=_non_empty)
    hookInstance = _StrictString(required=True, validate=_non_empty, data_key="hookInstance",
                                 attribute="hook_instance")
    fhirServer = _StrictString(data_key="fhirServer", attribute="fhir_server",
                               validate=validate.URL(schemes={"http", "https"}, require_tld=False))
    fhirAuthorization = fields.Nested(FhirAuthorizationSchema, data_key="fhirAuthorization",
                                      attribute="fhir_authorization")
    context = _JSONObject(required=True)
    prefetch = _JSONObject()
    extension = _JSONObject()

    @validates_schema
    def _authorization_needs_server(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("fhir_authorization") is not None and not data.get("fhir_server"):
            raise ValidationError("is required when fhirAuthorization is provided", "fhirServer")

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> HookRequest:
        return HookRequest(
            hook=data["hook"],
            hook_instance=data["hook_instance"],
            context=data["context"],
            fhir_server=(data.get("fhir_server") or "").rstrip("/") or None,
            fhir_authorization=data.get("fhir_authorization"),
            prefetch=data.get("prefetch") or {},
            extension=data.get("extension") or {},
        )


@dataclass(frozen=True)
class OverrideReason:
    """Why a card was dismissed: a Coding from the card's overrideReasons and/or a free-text comment."""

    system: str | None = None
    code: str | None = None
    display: str | None = None
    user_comment: str | None = None


@dataclass(frozen=True)
class Feedback:
    """One feedback report on one card (spec §Feedback)."""

    card: str
    outcome: str
    outcome_timestamp: datetime
    accepted_suggestions: tuple[str, ...] = ()
    override_reason: OverrideReason | None = None


class _CodingSchema(_Body):
    system = _StrictString(required=True, validate=_non_empty)
    code = _StrictString(required=True, validate=_non_empty)
    display = _StrictString()


#: The members of a Coding, as the Sandbox once sent them flat in `overrideReason` (see _OverrideReasonSchema).
_CODING_MEMBERS = ("system", "code", "display")


class _OverrideReasonSchema(_Body):
    """`overrideReason`: a Coding under `reason` and/or a `userComment`.

    The Sandbox sent the Coding flat in `overrideReason` (``{"code": ..., "system": ...}``, cds-hooks/sandbox#135)
    until #139 nested it under `reason`, as the spec did after cds-hooks/docs#531; clients built then may still.
    When `reason` is absent, such a flat Coding is read as the reason (and checked like one), not dropped.
    """

    reason = fields.Nested(_CodingSchema)
    userComment = _StrictString(data_key="userComment", attribute="user_comment")

    @pre_load
    def _flat_coding_is_the_reason(self, data: Any, **_: Any) -> Any:
        if not _sends_a_flat_coding(data):
            return data
        flat = {key: data[key] for key in _CODING_MEMBERS if data.get(key) is not None}
        rest = {key: value for key, value in data.items() if key not in _CODING_MEMBERS}
        return {**rest, "reason": flat}

    def handle_error(self, error: ValidationError, data: Any, **kwargs: Any) -> None:
        """Name a bad member of a flat Coding as sent (``overrideReason.code``), not as read (``.reason.code``)."""
        messages = error.messages
        if not _sends_a_flat_coding(data) or not isinstance(messages, dict):
            return
        reason = messages.get("reason")
        if not isinstance(reason, dict):
            return
        raise ValidationError({**{k: v for k, v in messages.items() if k != "reason"}, **reason}) from None

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> OverrideReason:
        reason = data.get("reason") or {}
        return OverrideReason(system=reason.get("system"), code=reason.get("code"),
                              display=reason.get("display"), user_comment=data.get("user_comment"))


def _sends_a_flat_coding(data: Any) -> bool:
    """Whether an `overrideReason` as sent holds a Coding flat (a system, code or display, and no `reason`).

    A display alone counts: read as unknown members, it was dropped with a 200, while the same Coding nested under
    `reason` is a 400 naming its missing code and system.
    """
    return (isinstance(data, Mapping) and data.get("reason") is None
            and any(data.get(key) is not None for key in _CODING_MEMBERS))


class _AcceptedSuggestionSchema(_Body):
    id = _StrictString(required=True, validate=_non_empty)


class FeedbackItemSchema(_Body):
    """One element of `feedback`: card uuid, outcome, timestamp, accepted suggestions or a reason."""

    card = _StrictString(required=True, validate=[_non_empty, validate.Length(
        max=MAX_CARD_UUID_LENGTH, error="must be at most {max} characters (a card uuid)")])
    outcome = _StrictString(required=True, validate=validate.OneOf(["accepted", "overridden"]))
    outcomeTimestamp = _Timestamp(required=True, data_key="outcomeTimestamp", attribute="outcome_timestamp")
    acceptedSuggestions = fields.List(fields.Nested(_AcceptedSuggestionSchema), data_key="acceptedSuggestions",
                                      attribute="accepted_suggestions")
    overrideReason = fields.Nested(_OverrideReasonSchema, data_key="overrideReason", attribute="override_reason")

    @validates_schema
    def _accepted_needs_suggestions(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("outcome") == "accepted" and not data.get("accepted_suggestions"):
            raise ValidationError("is required (with at least one id) when outcome is 'accepted'",
                                  "acceptedSuggestions")

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Feedback:
        return Feedback(
            card=data["card"],
            outcome=data["outcome"],
            outcome_timestamp=data["outcome_timestamp"],
            accepted_suggestions=tuple(s["id"] for s in data.get("accepted_suggestions") or ()),
            override_reason=data.get("override_reason"),
        )


class FeedbackRequestSchema(_Body):
    """The feedback body: ``{"feedback": [Feedback, ...]}`` with at least one element."""

    feedback = fields.List(fields.Nested(FeedbackItemSchema), required=True,
                           validate=validate.Length(min=1, error="must hold at least one feedback element"))


_HOOK_REQUEST = HookRequestSchema()
_FEEDBACK_REQUEST = FeedbackRequestSchema()


def load_hook_request(body: Any) -> HookRequest:
    """Validate a parsed JSON body as a hook request; raise InvalidRequest naming each bad field."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object", )
    try:
        result: HookRequest = _HOOK_REQUEST.load(body)
    except ValidationError as error:
        raise InvalidRequest.from_messages(_as_mapping(error.messages)) from None
    return result


def load_feedback(body: Any) -> tuple[Feedback, ...]:
    """Validate a parsed JSON body as a feedback request; raise InvalidRequest naming each bad field."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the feedback body must be a JSON object")
    try:
        loaded = _FEEDBACK_REQUEST.load(body)
    except ValidationError as error:
        raise InvalidRequest.from_messages(_as_mapping(error.messages)) from None
    return tuple(loaded["feedback"])


def _as_mapping(messages: Any) -> Mapping[str, Any]:
    return messages if isinstance(messages, Mapping) else {"_schema": messages}
