"""Validation with the fhir.resources models, and the memo that keeps verdicts by content."""

from __future__ import annotations

import json
import math
from types import MappingProxyType
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fhir.resources.R4B.codeableconcept import CodeableConcept
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
    # Without the component of each error (a verdict made without them), no component can be ruled out.
    assert touches(verdict, {"code.coding.code", "valueQuantity"}, unread_components={0, 1}) is touched


def test_an_unexpected_failure_touches_a_panel_with_unread_components() -> None:
    # An error that names no element (a validator that failed outright) is about the whole resource: it must
    # make a panel unusable even when some of its components are not read.
    with mock.patch.object(Observation, "model_validate", side_effect=RuntimeError("boom")):
        verdict = validate(Observation, VALID)
    assert verdict is not None
    assert touches(verdict, {"valueQuantity"}, unread_components={1})


@pytest.mark.parametrize(
    ("located", "touched"),
    [
        ({(1, "component.valueQuantity.value")}, False),  # inside a component the rules do not read
        ({(0, "component.valueQuantity.value")}, True),  # inside one they read
        ({(None, "valueQuantity")}, True),  # outside every component
        ({(1, "component.code.coding"), (None, "status")}, True),  # any one is enough
    ],
    ids=["unread-component", "read-component", "outside-components", "any-one"],
)
def test_touches_skips_components_the_rules_do_not_read(located: set[tuple[int | None, str]], touched: bool) -> None:
    verdict = Verdict("x", frozenset(element for _, element in located), frozenset(located))
    assert touches(verdict, {"status", "valueQuantity", "component.valueQuantity"}, {1, 2}) is touched


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


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan], ids=["inf", "minus-inf", "nan"])
def test_the_memo_does_not_give_a_number_that_is_not_finite_the_verdict_of_a_null(number: float) -> None:
    # orjson writes NaN and the infinities as null: a temperature of 1e400 (inf, from the body parser's slow path)
    # got the verdict "valid" of the same resource with a null value, seen before by this process.
    memo = VerdictMemo()
    assert memo.validation_error(Observation, {**VALID, "subject": {"reference": None}}) is None
    resource = {**VALID, "subject": {"reference": number}}
    assert memo.validation_error(Observation, resource) == validate(Observation, resource) is not None


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


TEMPERATURE = {
    "resourceType": "Observation", "id": "t1", "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                              "code": "vital-signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5", "display": "Body temperature"}]},
    "subject": {"reference": "Patient/p"}, "effectiveDateTime": "2025-03-10T08:00:00Z",
    "valueQuantity": {"value": 38.4, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
}


@pytest.mark.parametrize("changes", [
    pytest.param({}, id="valid"),
    pytest.param({"code": {"coding": [{"system": "http://loinc.org", "code": "8310-5", "display": ""}]}},
                 id="invalid-nested-display"),
    pytest.param({"category": [TEMPERATURE["category"][0], {"coding": "x"}]}, id="one-invalid-item-of-a-list"),
    pytest.param({"category": [None]}, id="null-in-a-list"),
    pytest.param({"category": TEMPERATURE["category"][0]}, id="object-for-a-list"),
    pytest.param({"subject": [{"reference": "Patient/p"}]}, id="list-for-an-object"),
    pytest.param({"subject": "Patient/p"}, id="string-for-an-object"),
    pytest.param({"valueQuantity": {"value": 10**30}}, id="integer-beyond-64-bits"),
    pytest.param({"valueQuantity": {"value": "38.4"}}, id="quoted-value"),
    pytest.param({"valueString": "38.4"}, id="two-values"),
    pytest.param({"status": "done"}, id="invalid-primitive-beside-known-elements"),
    pytest.param({"component": [{"code": TEMPERATURE["code"], "valueQuantity": {"value": "x"}}]},
                 id="invalid-component"),
    pytest.param({"extension": [{"url": "http://example.org/x", "valueString": ""}]}, id="invalid-extension"),
    pytest.param({"_effectiveDateTime": {"extension": [{"url": 1}]}}, id="invalid-primitive-extension"),
    pytest.param({"contained": [{"resourceType": "Observation", "status": "x"}]}, id="invalid-contained"),
])
def test_known_elements_give_the_verdict_validation_gives(changes: dict[str, Any]) -> None:
    # The elements of a valid sibling are known first, so the resource's own elements are handed over as
    # instances wherever they are equal: the verdict must be the one a validation from scratch gives.
    known = validation.KnownElements()
    assert validate(Observation, TEMPERATURE, known) is None
    resource = {**TEMPERATURE, "id": "t2", **changes}
    assert validate(Observation, resource, known) == validate(Observation, resource)
    assert validate(Observation, resource, known) == validate(Observation, resource)  # and once known


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan], ids=["inf", "minus-inf", "nan"])
def test_a_number_that_is_not_finite_does_not_take_the_instance_of_a_null(number: float) -> None:
    # orjson writes NaN and the infinities as null, so {"reference": 1e400} (read as inf by the standard library,
    # the body parser's slow path) was keyed as {"reference": null}: a sibling's valid instance was handed over,
    # and a temperature whose subject.reference (read) is a number was used instead of malformed-resource.
    known = validation.KnownElements()
    nulls = {**TEMPERATURE, "subject": {"reference": None}, "valueQuantity": {**TEMPERATURE["valueQuantity"],
                                                                            "value": None}}
    assert validate(Observation, nulls, known) is None
    for changes in ({"subject": {"reference": number}}, {"valueQuantity": {**nulls["valueQuantity"], "value": number}},
                    {"component": [{"code": TEMPERATURE["code"], "valueQuantity": {"value": number}}]}):
        resource = {**nulls, "id": "t2", **changes}
        if "component" in changes:  # its twin with null, known first
            validate(Observation, {**resource, "component": [{"code": TEMPERATURE["code"],
                                                              "valueQuantity": {"value": None}}]}, known)
        assert validate(Observation, resource, known) == validate(Observation, resource) is not None, changes


def test_a_number_beyond_a_double_in_a_request_body_is_not_the_null_of_a_sibling() -> None:
    text = json.dumps([{**TEMPERATURE, "subject": {"reference": None}},
                       {**TEMPERATURE, "id": "t2", "subject": {"reference": "1e400"}}]).replace('"1e400"', "1e400")
    first, second = json.loads(text)  # as the request body's slow path reads it: 1e400 is inf
    known = validation.KnownElements()
    assert validate(Observation, first, known) is None
    assert validate(Observation, second, known) == validate(Observation, second) is not None


def test_known_elements_leave_a_resource_that_is_not_a_dict_as_it_is() -> None:
    # pydantic reads a Mapping that is not a dict otherwise (fhir_core's checks look at dicts only: there
    # "resourceType" is an extra input); substituting made it a dict, and an invalid resource valid.
    known = validation.KnownElements()
    for changes in ({}, {"category": [None]}):
        resource = MappingProxyType({**TEMPERATURE, **changes})
        assert validate(Observation, resource, known) == validate(Observation, resource) is not None


def test_an_element_seen_before_in_the_request_is_validated_once() -> None:
    known = validation.KnownElements()
    validate(Observation, TEMPERATURE, known)
    assert len(known) == 4  # category's item, code, subject, valueQuantity
    second = {**TEMPERATURE, "id": "t2", "valueQuantity": {**TEMPERATURE["valueQuantity"], "value": 37.0}}
    substituted = known.substituted(Observation, second)
    assert len(known) == 5  # only the new value was validated
    assert substituted["code"] is known.substituted(Observation, TEMPERATURE)["code"]  # the same instance
    assert second["code"] == TEMPERATURE["code"] and isinstance(second["code"], dict)  # the resource is not changed


def test_known_elements_hand_over_only_data_types() -> None:
    names = validation._complex_elements(Observation)
    assert {"code", "category", "subject", "valueQuantity", "component", "referenceRange"} <= set(names)
    assert not {"contained", "_effectiveDateTime", "status", "effectiveDateTime"} & set(names)
    assert names["category"][1] is True and names["code"][1] is False


def test_every_fixture_resource_gets_the_same_verdict_with_known_elements() -> None:
    import json
    from pathlib import Path

    from fhir.resources.R4B.medicationrequest import MedicationRequest
    from fhir.resources.R4B.patient import Patient

    from service.fhir import flatten
    models = {"Observation": Observation, "Condition": Condition, "MedicationRequest": MedicationRequest,
              "Patient": Patient}
    known = validation.KnownElements()
    checked = 0
    for path in sorted(Path(__file__).parents[2].joinpath("fixtures").glob("*.json")):
        for resource in flatten([json.loads(path.read_text())]):
            model = models.get(resource.get("resourceType"))
            if model is not None:
                assert validate(model, resource, known) == validate(model, resource), (path.name, resource.get("id"))
                checked += 1
    assert checked > 100


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.sampled_from(["", "x", "8310-5", "Cel"]),
                     lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
                         st.sampled_from(["coding", "code", "system", "value", "reference", "text", "display"]),
                         inner, max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["code", "category", "subject", "valueQuantity", "component", "note"]),
                       _JSON, max_size=3))
def test_known_elements_never_change_a_verdict(changes: dict[str, Any]) -> None:
    known = validation.KnownElements()
    validate(Observation, TEMPERATURE, known)
    resource = {**TEMPERATURE, **changes}
    assert validate(Observation, resource, known) == validate(Observation, resource)


def _twin(value: Any, how: str) -> Any:
    """``value`` with equal JSON text but other Python values: NaN/inf for null, 1.0 or True for 1; or reordered."""
    if isinstance(value, dict):
        items = [(k, _twin(v, how)) for k, v in value.items()]
        return dict(reversed(items) if how == "reorder" else items)
    if isinstance(value, list):
        return [_twin(v, how) for v in value]
    if how == "inf" and value is None:
        return math.inf
    if how == "float" and type(value) is int:
        return float(value)
    if how == "bool" and type(value) is int and value in (0, 1):
        return bool(value)
    return value


_ELEMENT = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 1, 2**63, 38.4, 1.0, -0.0, "", "x", "Cel", "Patient/p", "2025"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
        st.sampled_from(["coding", "code", "system", "value", "reference", "text", "unit", "url", "valueString",
                         "extension", "_code", "low", "start", "id"]), inner, max_size=3),
    max_leaves=6)
#: Valid elements of several types, some with a null (valid there, unlike a number that is not finite).
_VALID_ELEMENTS = st.sampled_from([
    {"text": "x"}, {"reference": None}, {"reference": "Patient/p", "display": None}, {"value": None, "unit": "Cel"},
    {"value": 1, "unit": "Cel"}, {"coding": [{"system": "http://loinc.org", "code": "8310-5", "display": None}]},
    {"url": "http://x", "valueString": "a"}, {"start": "2025-03-10", "end": None}, {"low": {"value": 1}},
])
_NAMES = st.sampled_from(["code", "category", "subject", "valueQuantity", "component", "extension", "focus", "meta",
                          "interpretation", "referenceRange", "valueRange", "effectivePeriod", "note"])


@settings(max_examples=150, deadline=None)
@given(st.lists(_VALID_ELEMENTS | _ELEMENT, min_size=1, max_size=3), st.sampled_from(["inf", "float", "bool", "reorder"]),
       st.data())
def test_known_elements_never_change_a_verdict_across_the_resources_of_a_request(pool: list[Any], how: str,
                                                                                  data: Any) -> None:
    # Resources of one request share elements (also inside components), then come again with elements whose JSON
    # text is equal or nearly so but whose Python values differ: each verdict must be the one a validation from
    # scratch gives.
    element = st.sampled_from(pool)
    component = st.fixed_dictionaries({"code": element}, optional={"valueQuantity": element,
                                                                   "interpretation": st.lists(element, max_size=2)})
    value = element | st.lists(element, min_size=1, max_size=2) | st.lists(component, min_size=1, max_size=2)
    changes = data.draw(st.lists(st.dictionaries(_NAMES, value, max_size=4), min_size=1, max_size=3))
    known = validation.KnownElements()
    for change in changes + [_twin(change, how) for change in changes]:
        resource = {**TEMPERATURE, **change}
        assert validate(Observation, resource, known) == validate(Observation, resource)


# Mutation-testing gaps of the reading layer (each test below pins behaviour a mutant of service/validation.py
# changed without any test noticing).


def test_known_elements_hand_over_valid_elements_as_instances_and_invalid_ones_as_sent() -> None:
    # The substitution is what spares validating an element twice: a valid element (a repeating one item by item)
    # becomes its instance; an invalid one, or a list with one invalid item, is left for the resource's validation.
    known = validation.KnownElements()
    category = TEMPERATURE["category"][0]
    resource = {**TEMPERATURE, "subject": {"reference": 5}, "category": [category, {"coding": "x"}]}
    substituted = known.substituted(Observation, resource)
    assert isinstance(substituted["code"], CodeableConcept)
    assert substituted["subject"] is resource["subject"] and substituted["category"] is resource["category"]
    valid = known.substituted(Observation, {**TEMPERATURE, "category": [category, category]})
    assert [type(item) for item in valid["category"]] == [CodeableConcept, CodeableConcept]
    assert isinstance(resource["code"], dict)  # the resource itself is never changed
    bare = {"resourceType": "Observation", "status": "final", "category": []}
    assert known.substituted(Observation, bare) is bare  # nothing to hand over: the resource as it is


def test_elements_that_are_not_plain_json_never_share_an_instance() -> None:
    # Neither an integer beyond 64 bits nor an infinity has a JSON key: each is validated with its resource, never
    # handed the instance of another element without a key (a valid 1e30 value made an infinite one valid).
    known = validation.KnownElements()
    big = {**TEMPERATURE, "valueQuantity": {**TEMPERATURE["valueQuantity"], "value": 10**30}}
    infinite = {**TEMPERATURE, "id": "t2", "valueQuantity": {**TEMPERATURE["valueQuantity"], "value": math.inf}}
    assert validate(Observation, big, known) == validate(Observation, big)
    assert validate(Observation, infinite, known) == validate(Observation, infinite) is not None


@pytest.mark.parametrize("number", [math.inf, math.nan], ids=["inf", "nan"])
def test_the_memo_does_not_give_a_number_that_is_not_finite_in_a_list_the_verdict_of_a_null(number: float) -> None:
    # The same as for a member of an object, for one inside a list (an Observation's component).
    memo = VerdictMemo()

    def with_value(value: object) -> dict[str, Any]:
        return {**VALID, "component": [{"code": {"text": "t"}, "valueQuantity": {"value": value}}]}

    assert memo.validation_error(Observation, with_value(None)) is None
    assert memo.validation_error(Observation, with_value(number)) == validate(Observation, with_value(number)) \
        is not None


def test_the_problem_is_the_first_error_and_every_element_is_named() -> None:
    verdict = validate(Observation, {**VALID, "language": 5, "implicitRules": 123})
    assert verdict is not None
    assert verdict.problem == "implicitRules: Input should be a valid string"  # the model's order, not the JSON's
    assert verdict.elements == {"implicitRules", "language"}


def test_a_long_problem_is_cut_at_200_characters_and_its_issue_at_300() -> None:
    # The problem becomes a data issue's detail: bounded, however deep the invalid element lies.
    inner: dict[str, Any] = {"url": "x", "valueQuantity": {"value": "x"}}
    for _ in range(12):
        inner = {"url": "x", "extension": [inner]}
    resource = {**VALID, "extension": [inner]}
    verdict = validate(Observation, resource)
    assert verdict is not None and len(verdict.problem) == 200
    assert verdict.problem.startswith("extension.0.extension.0.")
    usable, issue = screen(Observation, resource, {"status"})
    assert usable and issue is not None and issue.code == "invalid-unread-elements"
    assert issue.detail is not None and len(issue.detail) == 300 and issue.detail.startswith(verdict.problem)
