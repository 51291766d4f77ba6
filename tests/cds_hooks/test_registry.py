"""The registry drives discovery; prefetch templates may only use CDS Hooks 2.0 tokens."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cds_hooks.models import ServiceResponse
from cds_hooks.registry import ServiceDefinition, ServiceRegistry, fill_template


def _handler(call: Any) -> ServiceResponse:
    return ServiceResponse()


def definition(**overrides: Any) -> ServiceDefinition:
    fields: dict[str, Any] = {"id": "svc", "hook": "patient-view", "description": "d", "handler": _handler}
    fields.update(overrides)
    return ServiceDefinition(**fields)


@pytest.mark.parametrize("template", [
    "Patient/{{context.patientId}}",
    "Observation?patient={{context.patientId}}&code=http://loinc.org|751-8",
    "Encounter/{{context.encounterId}}",
    "Practitioner/{{userPractitionerId}}",
    "{{context.userId}}",
    "Condition?patient={{ context.patientId }}",
], ids=["patient-read", "observation-search", "encounter", "user-practitioner", "user-id", "spaces-in-token"])
def test_valid_templates_are_accepted(template: str) -> None:
    definition(prefetch={"k": template})


@pytest.mark.parametrize("template", [
    "Observation?date=ge{{today() - 90 days}}",
    "Medication/{{context.medication.id}}",
    "Patient/{{context.selections}}",
    "Patient/{{patientId}}",
], ids=["3.0-fhirpath", "nested-context-path", "non-token-context-field", "bare-name"])
def test_templates_with_non_2_0_tokens_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="not a 2.0 token"):
        definition(prefetch={"k": template})


@pytest.mark.parametrize("overrides", [
    {"id": ""}, {"hook": " "}, {"description": ""}, {"required_prefetch": frozenset({"labs"})},
], ids=["empty-id", "blank-hook", "empty-description", "required-key-without-template"])
def test_definition_refuses_missing_required_fields(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        definition(**overrides)


def test_discovery_lists_every_definition_with_required_fields() -> None:
    registry = ServiceRegistry([definition(title="T", prefetch={"p": "Patient/{{context.patientId}}"}),
                                definition(id="svc", hook="order-sign")])
    assert registry.discovery() == {"services": [
        {"hook": "patient-view", "id": "svc", "description": "d", "title": "T",
         "prefetch": {"p": "Patient/{{context.patientId}}"}},
        {"hook": "order-sign", "id": "svc", "description": "d"},
    ]}
    assert registry.find("svc", "order-sign") is not None
    assert registry.find("svc", "order-select") is None


MEDICATIONS = {"medications": "MedicationRequest?patient={{context.patientId}}"}


@pytest.mark.parametrize(("follow", "message"), [
    ({"labs": {"medicationReference": "Medication"}}, "'labs' is not a prefetch key"),
    ({"medications": {}}, "must map element names to resource types"),
    ({"medications": "medicationReference"}, "must map element names to resource types"),
    ({"medications": {"": "Medication"}}, "'' is not an element name"),
    ({"medications": {"medicationReference.reference": "Medication"}}, "is not an element name"),
    ({"medications": {"medicationReference": ""}}, "'' is not a resource type"),
    ({"medications": {"medicationReference": "medication"}}, "is not a resource type"),
    ({"medications": {"medicationReference": "Medication?_id=x"}}, "is not a resource type"),
    (["medications"], "must map prefetch keys"),
], ids=["key-without-template", "no-elements", "elements-not-a-mapping", "empty-element", "dotted-element",
        "empty-type", "lower-case-type", "type-with-query", "not-a-mapping"])
def test_follow_references_refuses_bad_declarations(follow: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        definition(prefetch=MEDICATIONS, follow_references=follow)


def test_follow_references_are_accepted_and_not_advertised() -> None:
    follow = {"medications": {"medicationReference": "Medication", "requester": "Practitioner"}}
    service = definition(prefetch=MEDICATIONS, follow_references=follow)
    assert service.follow_references == follow
    assert service.to_json() == {"hook": "patient-view", "id": "svc", "description": "d", "prefetch": MEDICATIONS}


def test_empty_registry_discovers_an_empty_services_array() -> None:
    assert ServiceRegistry().discovery() == {"services": []}


def test_same_id_and_hook_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        ServiceRegistry([definition(), definition()])


@pytest.mark.parametrize("template, context, expected", [
    ("Patient/{{context.patientId}}", {"patientId": "123"}, "Patient/123"),
    ("Encounter/{{context.encounterId}}", {"patientId": "123"}, None),
    ("Practitioner/{{userPractitionerId}}", {"userId": "Practitioner/abc"}, "Practitioner/abc"),
    ("PractitionerRole/{{userPractitionerRoleId}}", {"userId": "Practitioner/abc"}, None),
    ("Patient/{{context.patientId}}", {"patientId": {"x": 1}}, None),
], ids=["filled", "missing-optional-context", "user-token", "user-token-wrong-type", "non-primitive"])
def test_fill_template(template: str, context: dict[str, Any], expected: str | None) -> None:
    assert fill_template(template, context) == expected
