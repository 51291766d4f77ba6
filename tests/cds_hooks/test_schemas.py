"""The request envelope and feedback schemas: what they accept, and what they refuse and how they say so."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from cds_hooks.errors import InvalidRequest
from cds_hooks.schemas import OverrideReason, load_feedback, load_hook_request

VALID: dict[str, Any] = {
    "hook": "patient-view",
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "fhirServer": "https://ehr.example.org/fhir/",
    "fhirAuthorization": {"access_token": "secret-token", "token_type": "Bearer", "expires_in": 300,
                          "scope": "user/Patient.read user/Observation.read", "subject": "cds-service"},
    "context": {"userId": "Practitioner/abc", "patientId": "1288992"},
    "prefetch": {"patient": None, "labs": {"resourceType": "Bundle", "type": "searchset"}},
}


def with_(**changes: Any) -> dict[str, Any]:
    body = {k: v for k, v in VALID.items()}
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_DROP = object()


def test_valid_request_loads_into_a_dataclass() -> None:
    request = load_hook_request(VALID)
    assert request.hook == "patient-view"
    assert request.fhir_server == "https://ehr.example.org/fhir"
    assert request.fhir_authorization is not None and request.fhir_authorization.expires_in == 300
    assert request.prefetch == {"patient": None, "labs": {"resourceType": "Bundle", "type": "searchset"}}


def test_access_token_is_not_in_the_repr() -> None:
    assert "secret-token" not in repr(load_hook_request(VALID))


def test_unknown_fields_are_tolerated() -> None:
    request = load_hook_request(with_(futureField={"x": 1}, extension={"com.example.x": 1},
                                      context={"userId": "Practitioner/a", "patientId": "1", "newField": 2}))
    assert request.context["newField"] == 2
    assert request.extension == {"com.example.x": 1}


def test_minimal_request_without_optional_fields() -> None:
    request = load_hook_request({"hook": "patient-view", "hookInstance": "x", "context": {}})
    assert request.fhir_server is None and request.fhir_authorization is None and request.prefetch == {}


MINIMAL: dict[str, Any] = {"hook": "patient-view", "hookInstance": "x", "context": {}}
AUTHORIZATION: dict[str, Any] = VALID["fhirAuthorization"]


_SANDBOX_REASON = {"system": "http://terminology.cds-hooks.org/CodeSystem/OverrideReasons",
                   "code": "patient-requested-brand"}


@pytest.mark.parametrize("override_reason, expected", [
    ({"reason": _SANDBOX_REASON}, OverrideReason(system=_SANDBOX_REASON["system"], code=_SANDBOX_REASON["code"])),
    (_SANDBOX_REASON, OverrideReason(system=_SANDBOX_REASON["system"], code=_SANDBOX_REASON["code"])),
    ({**_SANDBOX_REASON, "display": "Patient asked", "userComment": "x"},
     OverrideReason(system=_SANDBOX_REASON["system"], code=_SANDBOX_REASON["code"], display="Patient asked",
                    user_comment="x")),
    ({"userComment": "seen by the oncologist"}, OverrideReason(user_comment="seen by the oncologist")),
    ({}, OverrideReason()),
], ids=["nested-sandbox-since-pr-139", "flat-sandbox-pr-135", "flat-with-display-and-comment", "comment-only",
        "empty"])
def test_override_reason_shapes_clients_send(override_reason: dict[str, Any], expected: OverrideReason) -> None:
    # The Sandbox sent the reason's Coding flat in overrideReason from cds-hooks/sandbox#135 (May 2020) until #139
    # nested it under `reason` (Aug 2020, spec PR cds-hooks/docs#531). Read flat, the reason was dropped without a
    # word: an overridden card stored as overridden for no reason, though the client sent one.
    (item,) = load_feedback({"feedback": [{**OVERRIDDEN, "overrideReason": override_reason}]})
    assert item.override_reason == expected


def test_a_flat_override_reason_beside_a_nested_one_is_ignored() -> None:
    # Only when `reason` is absent is a flat Coding read: the spec's shape wins.
    sent = {"reason": {"system": "s", "code": "nested"}, "system": "s", "code": "flat"}
    (item,) = load_feedback({"feedback": [{**OVERRIDDEN, "overrideReason": sent}]})
    assert item.override_reason is not None and item.override_reason.code == "nested"


@pytest.mark.parametrize("override_reason, field", [
    ({"code": 5, "system": "s"}, "feedback[0].overrideReason.code"),
    ({"code": "", "system": "s"}, "feedback[0].overrideReason.code"),
    ({"code": "c"}, "feedback[0].overrideReason.system"),
    ({"code": "c", "system": None}, "feedback[0].overrideReason.system"),
    ({"system": "s"}, "feedback[0].overrideReason.code"),
    ({"code": "c", "system": ["s"]}, "feedback[0].overrideReason.system"),
    ({"code": "c", "system": "s", "display": 3}, "feedback[0].overrideReason.display"),
    ({"code": "c\x00", "system": "s"}, "feedback[0].overrideReason.code"),
    ({"code": 5, "system": "s", "userComment": 3}, "feedback[0].overrideReason.userComment"),
    ({"display": "Patient asked"}, "feedback[0].overrideReason.code"),
    ({"display": "Patient asked", "userComment": "x"}, "feedback[0].overrideReason.system"),
], ids=["code-a-number", "code-empty", "system-missing", "system-null", "code-missing", "system-a-list",
        "display-a-number", "code-with-nul", "comment-a-number-beside", "display-only", "display-and-comment"])
def test_a_bad_flat_override_reason_names_the_member_sent(override_reason: dict[str, Any], field: str) -> None:
    # A flat Coding is read as `reason`, but the client sent no `reason`: an OperationOutcome naming
    # 'overrideReason.reason.code' points the integrator at a member that is not in the body.
    with pytest.raises(InvalidRequest) as caught:
        load_feedback({"feedback": [{**OVERRIDDEN, "overrideReason": override_reason}]})
    expressions = [issue.expression for issue in caught.value.issues]
    assert field in expressions and not any(".reason" in e for e in expressions if e), expressions


@pytest.mark.parametrize("sent, same_as", [
    ({**MINIMAL, "fhirServer": None}, MINIMAL),
    ({**MINIMAL, "fhirAuthorization": None}, MINIMAL),
    ({**MINIMAL, "prefetch": None}, MINIMAL),
    ({**MINIMAL, "extension": None}, MINIMAL),
    ({**MINIMAL, "fhirServer": None, "fhirAuthorization": None, "prefetch": None, "extension": None}, MINIMAL),
    (with_(fhirAuthorization={**AUTHORIZATION, "patient": None}), VALID),
], ids=["fhirServer", "fhirAuthorization", "prefetch", "extension", "all-four", "fhirAuthorization.patient"])
def test_optional_request_member_null_is_absent(sent: dict[str, Any], same_as: dict[str, Any]) -> None:
    # Regression: "fhirServer": null was a 400 while the other optional members read null as absent.
    assert load_hook_request(sent) == load_hook_request(same_as)


def test_null_fhir_server_with_authorization_names_fhir_server() -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_hook_request(with_(fhirServer=None))
    assert [issue.expression for issue in caught.value.issues] == ["fhirServer"]
    assert "required when fhirAuthorization is provided" in caught.value.message


@pytest.mark.parametrize("sent, read", [(300, 300), (300.0, 300), (0.0, 0), (2**31 - 1, 2**31 - 1), ("3599", 3599),
                                        ("0", 0), ("000000300", 300), ("999999999", 999_999_999)],
                         ids=["integer", "integer-written-as-a-decimal", "zero-as-a-decimal", "documented-maximum",
                              "digits-as-azure-ad-v1-sends", "zero-as-digits", "nine-digits-leading-zeros",
                              "nine-digits"])
def test_expires_in_is_a_json_integer(sent: float | str, read: int) -> None:
    # openapi.yaml says `type: integer`, which JSON Schema reads as a number without a fraction: 300.0 is one, and
    # a .NET or Java client writing a double sends it so. It was a 400, and the clinician got no cards. So was
    # "3599", as an OAuth server writes it and a client copies it from the token response.
    request = load_hook_request(with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": sent}))
    assert request.fhir_authorization is not None and request.fhir_authorization.expires_in == read
    assert type(request.fhir_authorization.expires_in) is int


@pytest.mark.parametrize("body, field", [
    (with_(hook=_DROP), "hook"),
    (with_(hookInstance=_DROP), "hookInstance"),
    (with_(context=_DROP), "context"),
    (with_(hook=7), "hook"),
    (with_(hook=""), "hook"),
    (with_(hookInstance=None), "hookInstance"),
    (with_(context=None), "context"),
    (with_(hook=None), "hook"),
    (with_(context="patient 1"), "context"),
    (with_(context=[1]), "context"),
    (with_(prefetch=[]), "prefetch"),
    (with_(prefetch="x"), "prefetch"),
    (with_(fhirServer="not a url"), "fhirServer"),
    (with_(fhirServer="ftp://ehr.example.org"), "fhirServer"),
    (with_(fhirServer=_DROP), "fhirServer"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "access_token": ""}), "fhirAuthorization.access_token"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": "300s"}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": "-1"}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": " 300"}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": "300.0"}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": "\u0663\u0660\u0660"}),
     "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": "1000000000"}),
     "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": ""}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": True}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": -1}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": 300.5}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": 2**31}), "fhirAuthorization.expires_in"),
    (with_(fhirAuthorization={**VALID["fhirAuthorization"], "token_type": "MAC"}), "fhirAuthorization.token_type"),
    (with_(fhirAuthorization="token"), "fhirAuthorization"),
    (with_(extension=[1]), "extension"),
], ids=["missing-hook", "missing-hookInstance", "missing-context", "hook-not-string", "hook-empty",
        "hookInstance-null", "context-null", "hook-null", "context-string", "context-array",
        "prefetch-array", "prefetch-string",
        "fhirServer-not-url", "fhirServer-ftp", "fhirAuthorization-without-fhirServer", "access_token-empty",
        "expires_in-not-only-digits", "expires_in-negative-digits",
        "expires_in-digits-with-a-space", "expires_in-decimal-string", "expires_in-arabic-indic-digits",
        "expires_in-ten-digits", "expires_in-empty-string", "expires_in-boolean", "expires_in-negative", "expires_in-fraction",
        "expires_in-over-the-documented-maximum", "token_type-not-bearer",
        "fhirAuthorization-string", "extension-array"])
def test_invalid_request_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_hook_request(body)
    assert field in [issue.expression for issue in caught.value.issues], caught.value.issues
    outcome = caught.value.to_outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert all(issue["diagnostics"] for issue in outcome["issue"])


AUTHORIZATION = VALID["fhirAuthorization"]


@pytest.mark.parametrize(("left_out", "read_as"), [
    (("expires_in",), {"expires_in": None}),
    (("scope", "subject"), {"scope": None, "subject": None}),
    (("token_type",), {"token_type": "Bearer"}),
    (("access_token",), {"access_token": None}),
    (("access_token", "token_type", "expires_in", "scope", "subject"),
     {"access_token": None, "expires_in": None, "scope": None, "subject": None}),
], ids=["expires_in", "scope-and-subject", "token_type", "access_token", "all"])
@pytest.mark.parametrize("how", ["absent", "null"])
def test_required_authorization_members_left_out_are_tolerated(left_out: tuple[str, ...], read_as: dict[str, Any],
                                                               how: str) -> None:
    # Real clients leave expires_in out (cds-hooks/sandbox issues 22 and 65): refusing the request would show no
    # card at all, though its prefetch may hold everything needed. Whether the token can be used is decided when
    # fetching (cds_hooks.prefetch), never by refusing the call.
    sent = {k: v for k, v in AUTHORIZATION.items() if k not in left_out}
    if how == "null":
        sent.update(dict.fromkeys(left_out))
    authorization = load_hook_request(with_(fhirAuthorization=sent)).fhir_authorization
    assert authorization is not None
    expected = {**AUTHORIZATION, "token_type": "Bearer", "patient": None, **read_as}
    assert {name: getattr(authorization, name) for name in expected} == expected


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER"])
def test_token_type_is_case_insensitive(token_type: str) -> None:
    # RFC 6749 §5.1; "BEARER" was a 400, so a request with a complete prefetch got no card at all.
    authorization = load_hook_request(with_(fhirAuthorization={**AUTHORIZATION, "token_type": token_type}))
    assert authorization.fhir_authorization is not None


@pytest.mark.parametrize("body", [[], "x", 1, None], ids=["array", "string", "number", "null"])
def test_request_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        load_hook_request(body)


def test_access_token_never_appears_in_error_messages() -> None:
    bad = with_(fhirAuthorization={**VALID["fhirAuthorization"], "expires_in": "soon"})
    with pytest.raises(InvalidRequest) as caught:
        load_hook_request(bad)
    assert "secret-token" not in str(caught.value.to_outcome())


ACCEPTED = {"card": "c1", "outcome": "accepted", "acceptedSuggestions": [{"id": "s1"}],
            "outcomeTimestamp": "2021-12-11T10:05:31Z"}
OVERRIDDEN = {"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2021-12-11T10:05:31+01:00",
              "overrideReason": {"reason": {"system": "https://example.org/r", "code": "treated"},
                                 "userComment": "on antibiotics"}}


def test_feedback_loads_accepted_and_overridden() -> None:
    without_reason = {k: v for k, v in OVERRIDDEN.items() if k != "overrideReason"}
    accepted, overridden, bare = load_feedback({"feedback": [ACCEPTED, OVERRIDDEN, without_reason]})
    assert accepted.accepted_suggestions == ("s1",)
    assert accepted.outcome_timestamp == datetime(2021, 12, 11, 10, 5, 31, tzinfo=timezone.utc)
    assert overridden.override_reason is not None and overridden.override_reason.code == "treated"
    assert overridden.override_reason.user_comment == "on antibiotics"
    assert overridden.outcome_timestamp == datetime(2021, 12, 11, 9, 5, 31, tzinfo=timezone.utc)
    assert bare.override_reason is None


@pytest.mark.parametrize(("timestamp", "expected"), [
    ("2016-12-31T23:59:59Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=timezone.utc)),
    ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
    ("2016-12-31T23:59:60.5Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
    ("2017-01-01T00:59:60+01:00", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
    ("2017-01-01T00:00:00Z", datetime(2017, 1, 1, tzinfo=timezone.utc)),
], ids=["second-59", "leap-second", "leap-second-fraction", "leap-second-offset", "next-minute"])
def test_feedback_timestamp_leap_second_is_the_last_instant_of_its_minute(timestamp: str, expected: datetime) -> None:
    # RFC 3339 §5.6 allows second 60; it is read as service/timing.py reads FHIR times (59.999999 s).
    (item,) = load_feedback({"feedback": [{**ACCEPTED, "outcomeTimestamp": timestamp}]})
    assert item.outcome_timestamp == expected


@pytest.mark.parametrize("sent, same_as", [
    ({**OVERRIDDEN, "overrideReason": None}, {k: v for k, v in OVERRIDDEN.items() if k != "overrideReason"}),
    ({**OVERRIDDEN, "acceptedSuggestions": None}, OVERRIDDEN),
    ({**OVERRIDDEN, "overrideReason": {"reason": None, "userComment": "x"}},
     {**OVERRIDDEN, "overrideReason": {"userComment": "x"}}),
    ({**OVERRIDDEN, "overrideReason": {"reason": {"system": "s", "code": "c"}, "userComment": None}},
     {**OVERRIDDEN, "overrideReason": {"reason": {"system": "s", "code": "c"}}}),
    ({**OVERRIDDEN, "overrideReason": {"reason": {"system": "s", "code": "c", "display": None}}},
     {**OVERRIDDEN, "overrideReason": {"reason": {"system": "s", "code": "c"}}}),
], ids=["overrideReason", "acceptedSuggestions-when-overridden", "overrideReason.reason",
        "overrideReason.userComment", "overrideReason.reason.display"])
def test_optional_feedback_member_null_is_absent(sent: dict[str, Any], same_as: dict[str, Any]) -> None:
    assert load_feedback({"feedback": [sent]}) == load_feedback({"feedback": [same_as]})


@pytest.mark.parametrize("body, field", [
    ({}, "feedback"),
    ({"feedback": []}, "feedback"),
    ({"feedback": {"card": "c1"}}, "feedback"),
    ({"feedback": None}, "feedback"),
    ({"feedback": [{**ACCEPTED, "card": None}]}, "feedback[0].card"),
    ({"feedback": [{**ACCEPTED, "outcome": None}]}, "feedback[0].outcome"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": None}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "acceptedSuggestions": None}]}, "feedback[0].acceptedSuggestions"),
    ({"feedback": [{**ACCEPTED, "acceptedSuggestions": [{"id": None}]}]}, "feedback[0].acceptedSuggestions[0].id"),
    ({"feedback": [{**OVERRIDDEN, "overrideReason": {"reason": {"system": None, "code": "c"}}}]},
     "feedback[0].overrideReason.reason.system"),
    ({"feedback": [{k: v for k, v in ACCEPTED.items() if k != "card"}]}, "feedback[0].card"),
    ({"feedback": [{**ACCEPTED, "outcome": "ignored"}]}, "feedback[0].outcome"),
    ({"feedback": [{k: v for k, v in ACCEPTED.items() if k != "outcomeTimestamp"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": "yesterday"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": "2021-12-11T10:05:31"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": "2021-13-41T10:05:31Z"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": "2016-12-31T23:59:61Z"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": "2016-12-31T23:59:60Z\n"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{**ACCEPTED, "outcomeTimestamp": "2021-12-11T10:05:31+00:99"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [{k: v for k, v in ACCEPTED.items() if k != "acceptedSuggestions"}]},
     "feedback[0].acceptedSuggestions"),
    ({"feedback": [{**ACCEPTED, "acceptedSuggestions": [{}]}]}, "feedback[0].acceptedSuggestions[0].id"),
    ({"feedback": [ACCEPTED, {**OVERRIDDEN, "overrideReason": {"reason": {"code": "x"}}}]},
     "feedback[1].overrideReason.reason.system"),
], ids=["no-feedback-key", "empty-list", "not-a-list", "feedback-null", "card-null", "outcome-null",
        "timestamp-null", "accepted-with-null-suggestions", "suggestion-id-null", "reason-system-null", "card-missing",
        "unknown-outcome",
        "timestamp-missing", "timestamp-not-a-date", "timestamp-without-zone", "timestamp-impossible",
        "timestamp-second-61", "timestamp-leap-second-trailing-newline", "timestamp-offset-minute-99",
        "accepted-without-suggestions", "suggestion-without-id", "reason-without-system"])
def test_invalid_feedback_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_feedback(body)
    assert field in [issue.expression for issue in caught.value.issues], caught.value.issues


@pytest.mark.parametrize("load, body, field", [
    (load_hook_request, with_(hookInstance="hi\x00"), "hookInstance"),
    (load_hook_request, with_(hook="patient-view\x00"), "hook"),
    (load_feedback, {"feedback": [{**ACCEPTED, "card": "c\x00"}]}, "feedback[0].card"),
    (load_feedback, {"feedback": [{**ACCEPTED, "acceptedSuggestions": [{"id": "s\x00"}]}]},
     "feedback[0].acceptedSuggestions[0].id"),
    (load_feedback, {"feedback": [{**OVERRIDDEN, "overrideReason": {"userComment": "a\x00b"}}]},
     "feedback[0].overrideReason.userComment"),
], ids=["hookInstance", "hook", "feedback-card", "accepted-suggestion-id", "user-comment"])
def test_nul_characters_are_refused_naming_the_field(load: Any, body: dict[str, Any], field: str) -> None:
    # Regression: PostgreSQL text cannot store U+0000, so these reached the feedback store and failed there
    # with a DataError (500); a hookInstance with NUL lost the whole invoke response.
    with pytest.raises(InvalidRequest) as caught:
        load(body)
    assert field in [issue.expression for issue in caught.value.issues], caught.value.issues
