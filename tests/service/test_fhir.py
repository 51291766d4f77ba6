"""Raw FHIR JSON helpers: they take anything and never raise."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B.observation import Observation
from hypothesis import given, settings
from hypothesis import strategies as st

from service.fhir import (
    codes_of,
    decimal,
    deduplicated,
    flatten,
    quoted_decimal,
    reference,
    references,
    references_within,
    source_of,
)

D = Decimal


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.4, D("0.4")),
        (38.3, D("38.3")),
        (400, D(400)),
        ("1.5", None),  # FHIR JSON decimals are JSON numbers (R4 §2.6.2), never strings
        ("0.4", None),
        ("38.6", None),
        (D("2"), D(2)),
        (True, None),
        (float("nan"), None),
        (float("inf"), None),
        ("x", None),
        (None, None),
        ([1], None),
        (1e40, None),
        ("1e-40", None),
        # MAX_EXPONENT: a decimal exponent of 30 either way is still a number, 31 is not.
        (1e30, D("1e30")),
        (1e31, None),
        (1e-30, D("1e-30")),
        (1e-31, None),
    ],
    ids=lambda v: repr(v),
)
def test_decimal(value: Any, expected: Decimal | None) -> None:
    assert decimal(value) == expected


OBSERVATION: dict[str, Any] = {"resourceType": "Observation", "valueQuantity": {"value": 0.4, "unit": "10*3/uL"}}


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({}, None),
        ({"valueQuantity": {"value": "0.4"}}, "valueQuantity.value"),
        ({"valueQuantity": {"value": "four"}}, "valueQuantity.value"),
        ({"valueQuantity": {"value": 1, "unit": "1"}}, None),  # a unit may be a string, of course
        ({"valueString": "0.4", "valueQuantity": None}, None),  # valueString is a string by type
        ({"referenceRange": [{"low": {"value": 1.8}}, {"high": {"value": "7.5"}}]}, "referenceRange[1].high.value"),
        ({"component": [{"valueQuantity": {"value": 38.6}}, {"valueQuantity": {"value": "38.6"}}]},
         "component[1].valueQuantity.value"),
        ({"component": [{"referenceRange": [{"low": {"value": "1.8"}}]}]}, "component[0].referenceRange[0].low.value"),
        ({"component": "junk", "referenceRange": [None, {"low": "x"}]}, None),
    ],
    ids=["number", "numeric-string", "text-string", "string-unit", "valueString", "range-high", "component-value",
         "component-range", "junk"],
)
def test_quoted_decimal_finds_strings_where_numbers_belong(changes: dict[str, Any], where: str | None) -> None:
    problem = quoted_decimal({**OBSERVATION, **changes})
    assert (problem.split(":")[0] if problem else None) == where


def test_quoted_decimal_skips_components_not_read() -> None:
    changes = {"component": [{"valueQuantity": {"value": 38.6}}, {"valueQuantity": {"value": "72"}}]}
    assert quoted_decimal({**OBSERVATION, **changes}, {1}) is None
    assert quoted_decimal({**OBSERVATION, **changes}, {0}) is not None


def test_flatten_opens_nested_bundles_and_skips_junk() -> None:
    inner = {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "p"}}, "junk", {}]}
    outer = {"resourceType": "Bundle", "entry": [{"resource": inner}, {"resource": {"resourceType": "Condition"}}]}
    assert [r["resourceType"] for r in flatten([outer, None, 3, "Observation"])] == ["Patient", "Condition"]
    assert list(flatten("not a list")) == [] and list(flatten(None)) == []


@pytest.mark.parametrize("entry", ["absent", None, {}, "x"], ids=["absent", "null", "an-object", "a-string"])
def test_flatten_opens_a_bundle_without_an_entry_list_to_nothing(entry: object) -> None:
    # A searchset with no match (total 0) leaves "entry" out: no resources, and never an error.
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    if entry != "absent":
        bundle["entry"] = entry
    assert list(flatten([bundle, {"resourceType": "Patient", "id": "p"}])) == [{"resourceType": "Patient", "id": "p"}]


def test_flatten_stops_at_depth() -> None:
    bundle: dict[str, Any] = {"resourceType": "Patient", "id": "deep"}
    for _ in range(10):
        bundle = {"resourceType": "Bundle", "entry": [{"resource": bundle}]}
    assert [r["resourceType"] for r in flatten([bundle])] == ["Bundle"]


@pytest.mark.parametrize(
    ("metas", "kept", "conflicts"),
    [
        ([{"versionId": "1"}, {"versionId": "2"}], [1], {}),
        ([{"versionId": "3"}, {"versionId": "2"}], [0], {}),
        ([{"lastUpdated": "2025-03-10T10:00:00Z"}, {"lastUpdated": "2025-03-09T10:00:00Z"}], [0], {}),
        ([{}, {"versionId": "2"}], [0, 1], {"Observation/o": 2}),  # cannot tell: keep both, and say so
        ([{"versionId": "2"}, {"versionId": "2"}], [0, 1], {"Observation/o": 2}),
        ([{}, {}, {}], [0, 1, 2], {"Observation/o": 3}),
        ([{"versionId": "1"}, {"versionId": "2"}, {"versionId": "2"}], [1, 2], {"Observation/o": 2}),
        # not an instant (no seconds; no zone): read as no order, so both are kept and the most severe counts
        ([{"lastUpdated": "2025-03-09T10:00:00Z"}, {"lastUpdated": "2025-03-10T10:00Z"}], [0, 1], {"Observation/o": 2}),
        ([{"lastUpdated": "2025-03-09T10:00:00Z"}, {"lastUpdated": "2025-03-10T10:00:00"}], [0, 1],
         {"Observation/o": 2}),
        ([{"lastUpdated": "2025-03-09T10:00:00Z"}, {"lastUpdated": "2025-03-10"}], [0, 1], {"Observation/o": 2}),
        ([{"lastUpdated": "2025-03-09T10:00:00.123+01:00"}, {"lastUpdated": "2025-03-10T10:00:00Z"}], [1], {}),
        # the same version: an invalid time neither wins nor loses
        ([{"versionId": "1", "lastUpdated": "2025-03-10T10:00:00Z"},
          {"versionId": "1", "lastUpdated": "2025-03-10T11:00Z"}], [0, 1], {"Observation/o": 2}),
        # a higher version still wins
        ([{"versionId": "2", "lastUpdated": "2025-03-10T11:00Z"},
          {"versionId": "1", "lastUpdated": "2025-03-10T12:00:00Z"}], [0], {}),
        ([{"lastUpdated": "2025-03-09T10:00:00Z"}, {"lastUpdated": "٢٠٢٥-03-10T10:00:00Z"}], [0, 1],
         {"Observation/o": 2}),  # digits of another script are not an instant
    ],
    ids=["v2-wins", "v3-wins", "last-updated", "unknown", "tie", "three-unversioned", "tie-for-newest",
         "last-updated-without-seconds", "last-updated-without-zone", "last-updated-a-date", "instant-fraction-zone",
         "same-version-one-invalid-time", "higher-version-wins", "non-ascii-digits"],
)
def test_deduplicated_keeps_the_newest_version(
    metas: list[dict[str, str]], kept: list[int], conflicts: dict[str, int]
) -> None:
    copies = [{"resourceType": "Observation", "id": "o", "meta": meta, "n": n} for n, meta in enumerate(metas)]
    result = deduplicated(copies)
    assert sorted(r["n"] for r in result.resources) == kept
    assert result.conflicts == conflicts


@pytest.mark.parametrize(
    ("copies", "kept", "conflicts"),
    [
        ([{"id": "o", "v": 1}, {"v": 1, "id": "o"}], 1, {}),  # identical (key order aside): one copy, no conflict
        ([{"id": "o", "v": 1}] * 1000, 1, {}),
        ([{"id": "o", "v": 1}, {"id": "o", "v": 2}, {"id": "o", "v": 1}], 2, {"Observation/o": 2}),
        ([{"id": "", "v": 1}, {"id": "", "v": 2}], 2, {}),  # an empty id is no id: nothing to contradict
        ([{"v": 1}, {"v": 2}], 2, {}),
        ([{"id": "o", 1: "x", "a": 1}, {"id": "o", 1: "x", "a": 1}], 2, {"Observation/o": 2}),  # not JSON: distinct
    ],
    ids=["identical", "many-identical", "two-differ", "empty-id", "no-id", "mixed-key-types"],
)
def test_deduplicated_reports_copies_that_contradict_each_other(
    copies: list[dict[Any, Any]], kept: int, conflicts: dict[str, int]
) -> None:
    result = deduplicated({"resourceType": "Observation", **c} for c in copies)
    assert len(result.resources) == kept
    assert result.conflicts == conflicts


@pytest.mark.parametrize(
    ("items", "expected"),
    [([{"reference": "#r1"}, {"reference": "#r2"}], {"r1", "r2"}),
     ([{"reference": "Observation/a"}, {"reference": "#"}, {"reference": 5}, "x"], set()),
     ("#r1", set()), (None, set()), ({"reference": "#r1"}, set())],
    ids=["local", "not-local", "not-a-list", "null", "an-object"],
)
def test_references_within(items: object, expected: set[str]) -> None:
    assert references_within(items) == expected


def test_references_and_sources() -> None:
    assert references([{"reference": "Observation/a"}, {"reference": 5}, "x", {}]) == {"Observation/a"}
    assert references("nope") == frozenset()
    assert references(None) == references({"reference": "Observation/a"}) == frozenset()
    assert source_of({"resourceType": "Observation", "id": "a"}) == "Observation/a"
    assert source_of({"resourceType": "Observation", "id": ""}) == "Observation/(no id)"


def test_codes_of_ignores_malformed_codings() -> None:
    concept = {"coding": [{"system": "http://loinc.org", "code": "751-8"}, {"code": "x"}, "junk", {"system": 1}]}
    assert codes_of(concept) == {("http://loinc.org", "751-8")}
    assert codes_of({"coding": "x"}) == frozenset() and codes_of(None) == frozenset()


_VERSIONS = [None, "1", "2", "3", "abc", "²", "٣"]
_STAMPS = [None, "2025-03-10T09:00:00Z", "2025-03-10T10:00:00Z", "2025-03-10T11:00:00+01:00", "2025-03-10T11:00Z"]


def _ordered_pairwise(metas: list[dict[str, str]]) -> set[int]:
    """The copies no other copy is newer than, by the rule stated in service.fhir._current, pair by pair."""
    def key(meta: dict[str, str]) -> tuple[int | None, datetime | None]:
        version = meta.get("versionId")
        number = int(version) if version is not None and re.fullmatch("[0-9]+", version) else None
        stamp = meta.get("lastUpdated")
        time = datetime.fromisoformat(stamp) if stamp is not None and re.fullmatch(
            r"[0-9-]{10}T[0-9:]{8}(Z|[+-][0-9:]{5})", stamp) else None
        return number, time

    def newer(a: tuple[int | None, datetime | None], b: tuple[int | None, datetime | None]) -> bool:
        if a[0] is not None and b[0] is not None and a[0] != b[0]:
            return a[0] > b[0]
        return a[1] is not None and b[1] is not None and a[1] > b[1]

    keys = [key(m) for m in metas]
    return {i for i, k in enumerate(keys) if not any(newer(other, k) for other in keys)}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_VERSIONS), st.sampled_from(_STAMPS)), min_size=2, max_size=5))
def test_deduplicated_keeps_exactly_the_copies_nothing_orders_as_older(pairs: list[tuple[str | None, str | None]]
                                                                       ) -> None:
    metas = [{k: v for k, v in (("versionId", version), ("lastUpdated", stamp)) if v is not None}
             for version, stamp in pairs]
    copies = [{"resourceType": "Observation", "id": "o", "meta": meta, "n": n} for n, meta in enumerate(metas)]
    assert {r["n"] for r in deduplicated(copies).resources} == _ordered_pairwise(metas)


def test_deduplicated_reads_a_versionid_of_other_digits_as_no_number() -> None:
    # "²".isdigit() is true and int("²") raises: a superscript versionId was a 500.
    copies = [{"resourceType": "Observation", "id": "o", "meta": {"versionId": v}, "n": n}
              for n, v in enumerate(["²", "1"])]
    assert {r["n"] for r in deduplicated(copies).resources} == {0, 1}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Observation/1", "Observation/1"), ("Observation//1", None), ("//1", None), ("https://ehr/fhir//1", None),
     (" Observation/1/ ", "Observation/1")],
    ids=["relative", "empty-type-segment", "only-slashes-and-id", "absolute-with-empty-type", "spaces-and-slash"],
)
def test_reference_needs_a_type_and_an_id(value: str, expected: str | None) -> None:
    # "Observation//1" names no resource: read as "/1" it became a link or a Medication key nothing else has.
    assert reference(value) == expected
