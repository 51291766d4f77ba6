"""Validation with the fhir.resources models, and the memo that keeps verdicts by content."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.observation import Observation

from service import validation
from service.validation import VerdictMemo, validate

VALID = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}


def test_validate_names_the_field() -> None:
    assert validate(Observation, VALID) is None
    problem = validate(Observation, {**VALID, "note": "x"})
    assert problem is not None and problem.startswith("note:")
    assert validate(Observation, {**VALID, "status": None}) is not None


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
