"""Validation with the fhir.resources models, and the memo that keeps verdicts by content."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.observation import Observation

from service import validation
from service.validation import WHOLE_RESOURCE, Verdict, VerdictMemo, screen, touches, validate

VALID = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}


def test_validate_names_the_field() -> None:
    assert validate(Observation, VALID) is None
    verdict = validate(Observation, {**VALID, "note": "x"})
    assert verdict is not None and verdict.problem.startswith("note:") and verdict.elements == {"note"}
    assert validate(Observation, {**VALID, "status": None}) is not None


@pytest.mark.parametrize(
    ("invalid", "elements"),
    [
        ({"code": {"coding": [{"code": "x", "display": ""}]}}, {"code.coding.display"}),
        ({"note": "x", "issued": "today"}, {"note", "issued"}),
        ({"component": [{"code": {"text": "c"}, "valueQuantity": {"value": "x"}}]}, {"component.valueQuantity.value"}),
        ({"valueString": "a", "valueBoolean": True}, {WHOLE_RESOURCE}),  # a rule across elements
    ],
    ids=["nested-in-a-list", "every-error", "in-a-component", "across-elements"],
)
def test_validate_names_every_invalid_element_without_list_indexes(invalid: dict[str, Any],
                                                                   elements: set[str]) -> None:
    verdict = validate(Observation, {**VALID, **invalid})
    assert verdict is not None and verdict.elements == elements


@pytest.mark.parametrize(
    ("elements", "touched"),
    [
        ({"code.coding.code"}, True),  # the element read
        ({"code.coding"}, True),  # holds an element read
        ({"valueQuantity.value"}, True),  # inside an element read
        ({"code.coding.display"}, False),  # a sibling of an element read
        ({"code.codingx"}, False),  # a longer name is not inside
        ({"note", "valueQuantity"}, True),  # any one is enough
        ({WHOLE_RESOURCE}, True),  # about the whole resource: cannot be ruled out
    ],
    ids=["same", "holds", "inside", "sibling", "longer-name", "any-one", "whole-resource"],
)
def test_touches(elements: set[str], touched: bool) -> None:
    verdict = Verdict("x", frozenset(elements))
    assert touches(verdict, {"code.coding.code", "valueQuantity"}) is touched


@pytest.mark.parametrize(
    ("resource", "usable", "code"),
    [
        (VALID, True, None),
        ({**VALID, "note": "x"}, True, "invalid-unread-elements"),
        ({**VALID, "implicitRules": 1}, False, "malformed-resource"),
    ],
    ids=["valid", "invalid-elsewhere", "invalid-where-read"],
)
def test_screen(resource: dict[str, Any], usable: bool, code: str | None) -> None:
    found, issue = screen(Observation, {**resource, "id": "o"}, {"status", "implicitRules"})
    assert found is usable
    assert (issue.code, issue.source) == (code, "Observation/o") if code else issue is None


@pytest.mark.parametrize("resource", [
    pytest.param(VALID, id="valid"),
    pytest.param({**VALID, "note": "x"}, id="wrong-type"),
    pytest.param({**VALID, "status": "done"}, id="unknown-code"),
    pytest.param({**VALID, "valueQuantity": {"value": 10**30}}, id="integer-beyond-64-bits"),
])
def test_the_memo_gives_the_same_verdict_as_validating_first_time_and_again(resource: dict[str, Any]) -> None:
    memo = VerdictMemo()
    assert memo.validation_error(Observation, resource) == validate(Observation, resource)
    assert memo.validation_error(Observation, resource) == validate(Observation, resource)


def test_content_seen_before_is_not_validated_again() -> None:
    memo = VerdictMemo()
    with mock.patch.object(validation, "validate", wraps=validate) as spy:
        memo.validation_error(Observation, VALID)
        memo.validation_error(Observation, dict(VALID))  # equal content, another object
        assert spy.call_count == 1
        memo.validation_error(Observation, {**VALID, "status": "amended"})  # other content
        memo.validation_error(Condition, VALID)  # same content, other model
        assert spy.call_count == 3


def test_a_changed_resource_is_validated_again() -> None:
    memo = VerdictMemo()
    resource = dict(VALID)
    assert memo.validation_error(Observation, resource) is None
    resource["note"] = "x"  # the same object, changed: its content decides, not its identity
    assert memo.validation_error(Observation, resource) is not None


def test_the_memo_is_bounded_and_forgets_the_least_recently_used() -> None:
    memo = VerdictMemo(size=2)
    first, second, third = ({**VALID, "id": name} for name in ("a", "b", "c"))
    memo.validation_error(Observation, first)
    memo.validation_error(Observation, second)
    memo.validation_error(Observation, first)  # first is now the most recently used
    memo.validation_error(Observation, third)
    assert len(memo) == 2
    with mock.patch.object(validation, "validate", wraps=validate) as spy:
        memo.validation_error(Observation, first)
        assert spy.call_count == 0
        memo.validation_error(Observation, second)
        assert spy.call_count == 1


def test_clear_forgets_every_verdict() -> None:
    memo = VerdictMemo()
    memo.validation_error(Observation, VALID)
    memo.clear()
    assert len(memo) == 0


@pytest.mark.parametrize(
    ("invalid", "elements"),
    [
        ({"subject": [{"reference": "Patient/p"}]}, {"subject"}),
        ({"valueQuantity": [{"value": 1}]}, {"valueQuantity"}),
        ({"meta": [{}]}, {"meta"}),
    ],
    ids=["subject", "value", "meta"],
)
def test_an_object_sent_as_a_list_is_an_error_of_the_element_itself(invalid: dict[str, Any],
                                                                    elements: set[str]) -> None:
    # fhir.resources locates it at "<element>.root": read as a child of it, "subject.root" escaped the rules'
    # "subject.reference", and another patient's result was used.
    verdict = validate(Observation, {**VALID, **invalid})
    assert verdict is not None and verdict.elements == elements
