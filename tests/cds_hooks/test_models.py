"""Card models refuse what the spec forbids and serialise with the omit-empty rule."""

from __future__ import annotations

import itertools
import json

import pytest

from cds_hooks.models import (
    Action,
    Card,
    Coding,
    Indicator,
    Link,
    ServiceResponse,
    Source,
    Suggestion,
    omit_empty,
)

SOURCE = Source(label="Neutropenia CDS", url="https://example.org/cds",
                topic=Coding("https://example.org/kind", "neutropenia", "Neutropenia"))
SERVICE_REQUEST = {"resourceType": "ServiceRequest", "status": "draft", "intent": "proposal",
                   "subject": {"reference": "Patient/1"}}


def card(**overrides: object) -> Card:
    fields = {"summary": "ANC 400/uL — severe neutropenia (grade 4)", "indicator": "warning", "source": SOURCE}
    fields.update(overrides)
    return Card(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("length, ok", [(138, True), (139, True), (140, False), (200, False)],
                         ids=["138-chars", "139-chars", "140-chars-refused", "200-chars-refused"])
def test_card_summary_must_be_under_140_characters(length: int, ok: bool) -> None:
    if ok:
        assert len(card(summary="x" * length).summary) == length
    else:
        with pytest.raises(ValueError, match="under 140"):
            card(summary="x" * length)


@pytest.mark.parametrize("bad", [
    {"indicator": "hard-stop"},
    {"indicator": "urgent"},
    {"summary": ""},
    {"summary": "   "},
    {"suggestions": [Suggestion(label="Order CBC")]},
    {"suggestions": [Suggestion(label="a", is_recommended=True), Suggestion(label="b", is_recommended=True)],
     "selection_behavior": "at-most-one"},
    {"selection_behavior": "all"},
    {"override_reasons": [Coding("https://example.org/r", "x")]},
], ids=["hard-stop-indicator", "unknown-indicator", "empty-summary", "blank-summary",
        "suggestions-without-selectionBehavior", "two-recommended-with-at-most-one",
        "unknown-selectionBehavior", "override-reason-without-display"])
def test_card_refuses_what_the_spec_forbids(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        card(**bad)


@pytest.mark.parametrize("make", [
    lambda: Link(label="App", url="https://app.example.org", type="absolute", app_context="{}"),
    lambda: Link(label="App", url="/relative", type="absolute"),
    lambda: Link(label="App", url="https://app.example.org", type="iframe"),
    lambda: Source(label=""),
    lambda: Source(label="x", url="example.org/no-scheme"),
    lambda: Coding("", "x"),
    lambda: Coding("http://loinc.org", ""),
    lambda: Action(type="create", description="Order"),
    lambda: Action(type="delete", description="Remove"),
    lambda: Action(type="delete", description="Remove", resource_id="123"),
    lambda: Action(type="patch", description="x", resource=SERVICE_REQUEST),
    lambda: Suggestion(label=""),
], ids=["appContext-on-absolute-link", "relative-link-url", "unknown-link-type", "empty-source-label",
        "source-url-not-absolute", "coding-without-system", "coding-without-code", "create-without-resource",
        "delete-without-resourceId", "resourceId-not-relative-reference", "unknown-action-type",
        "suggestion-without-label"])
def test_models_refuse_invalid_parts(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_smart_link_may_carry_app_context() -> None:
    link = Link(label="App", url="https://app.example.org/launch", type="smart", app_context='{"a":1}')
    assert link.to_json() == {"label": "App", "url": "https://app.example.org/launch", "type": "smart",
                              "appContext": '{"a":1}'}


def test_card_json_omits_every_empty_optional_attribute() -> None:
    body = card().to_json()
    assert body == {"summary": "ANC 400/uL — severe neutropenia (grade 4)", "indicator": "warning",
                    "source": {"label": "Neutropenia CDS", "url": "https://example.org/cds",
                               "topic": {"system": "https://example.org/kind", "code": "neutropenia",
                                         "display": "Neutropenia"}}}
    assert _no_empty_values(body)


def test_full_card_json_uses_spec_field_names() -> None:
    full = card(
        detail="**Do** this",
        uuid="c1",
        indicator=Indicator.CRITICAL,
        suggestions=[Suggestion(label="Order blood cultures", uuid="s1", is_recommended=True,
                                actions=[Action(type="create", description="Blood culture",
                                                resource=SERVICE_REQUEST)])],
        selection_behavior="any",
        override_reasons=[Coding("https://example.org/r", "treated", "Already treated")],
        links=[Link(label="Guideline", url="https://example.org/g")],
    ).to_json()
    assert set(full) == {"summary", "indicator", "source", "detail", "uuid", "suggestions", "selectionBehavior",
                         "overrideReasons", "links"}
    assert full["indicator"] == "critical"
    assert full["selectionBehavior"] == "any"
    assert full["suggestions"][0] == {"label": "Order blood cultures", "uuid": "s1", "isRecommended": True,
                                      "actions": [{"type": "create", "description": "Blood culture",
                                                   "resource": SERVICE_REQUEST}]}
    assert full["links"] == [{"label": "Guideline", "url": "https://example.org/g", "type": "absolute"}]
    json.dumps(full)


def test_is_recommended_false_is_kept_not_dropped() -> None:
    assert Suggestion(label="x", is_recommended=False).to_json() == {"label": "x", "isRecommended": False}


def test_stamped_gives_every_card_and_suggestion_a_distinct_uuid() -> None:
    counter = itertools.count()
    stamped = card(suggestions=[Suggestion(label="a"), Suggestion(label="b")],
                   selection_behavior="any").stamped(lambda: f"u{next(counter)}")
    ids = [stamped.uuid] + [s.uuid for s in stamped.suggestions]
    assert ids == ["u0", "u1", "u2"]


@pytest.mark.parametrize("response, expected", [
    (ServiceResponse(), {"cards": []}),
    (ServiceResponse(extension={"org.x": {"findings": [], "a": None}}), {"cards": []}),
    (ServiceResponse(extension={"org.x": {"evaluatedAt": "t"}}), {"cards": [], "extension": {"org.x": {"evaluatedAt": "t"}}}),
], ids=["no-cards-keeps-empty-array", "empty-extension-dropped", "extension-kept"])
def test_service_response_keeps_cards_array_and_omits_empty_extension(response: ServiceResponse,
                                                                      expected: dict[str, object]) -> None:
    assert response.to_json() == expected


@pytest.mark.parametrize("value, expected", [
    ({"a": None, "b": "", "c": [], "d": {}, "e": 0, "f": False}, {"e": 0, "f": False}),
    ({"a": {"b": {"c": []}}}, {}),
    ([None, "", {"x": 1}], [{"x": 1}]),
], ids=["flat", "nested-empties-collapse", "list"])
def test_omit_empty(value: object, expected: object) -> None:
    assert omit_empty(value) == expected


def _no_empty_values(value: object) -> bool:
    if isinstance(value, dict):
        return all(v not in (None, "", [], {}) and _no_empty_values(v) for v in value.values())
    if isinstance(value, list):
        return all(v not in (None, "", [], {}) and _no_empty_values(v) for v in value)
    return True
