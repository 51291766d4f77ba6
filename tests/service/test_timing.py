"""FHIR date/dateTime/instant/Period parsing into UTC intervals."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from service.timing import Timing, age, birth_date, observation_timing, parse, period

UTC = timezone.utc


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "effective", "latest"),
    [
        ("2025-03-10T10:00:00Z", at(2025, 3, 10, 10), at(2025, 3, 10, 10)),
        ("2025-03-10T10:00:00+01:00", at(2025, 3, 10, 9), at(2025, 3, 10, 9)),
        ("2025-03-10T10:00:00.123-05:00", at(2025, 3, 10, 15, 0, 0, 123000), at(2025, 3, 10, 15, 0, 0, 123000)),
        ("2025-03-10", at(2025, 3, 10), at(2025, 3, 10, 23, 59, 59, 999999)),
        ("2025-02", at(2025, 2, 1), at(2025, 2, 28, 23, 59, 59, 999999)),
        ("2024-12", at(2024, 12, 1), at(2024, 12, 31, 23, 59, 59, 999999)),
        ("2025", at(2025, 1, 1), at(2025, 12, 31, 23, 59, 59, 999999)),
    ],
    ids=["utc", "offset", "fraction", "date", "month", "december", "year"],
)
def test_parse_gives_an_interval(value: str, effective: datetime, latest: datetime) -> None:
    assert parse(value) == Timing(effective, latest)


@pytest.mark.parametrize(
    "value",
    ["", "yesterday", "2025-02-30", "2025-13", "2025-03-10T25:00:00Z", "2025-03-10T10:00:00+25:00", "9999-12-31",
     "0001-01-01T00:00:00+05:00", None, 20250310, ["2025"]],
    ids=lambda v: repr(v),
)
def test_parse_rejects_what_is_not_a_date(value: object) -> None:
    assert parse(value) is None


def test_precise_only_for_instants() -> None:
    assert parse("2025-03-10T10:00:00Z").precise  # type: ignore[union-attr]
    assert not parse("2025-03-10").precise  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"effectiveDateTime": "2025-03-10T10:00:00Z"}, at(2025, 3, 10, 10)),
        ({"effectiveInstant": "2025-03-10T10:00:00Z"}, at(2025, 3, 10, 10)),
        ({"effectivePeriod": {"start": "2025-03-10T08:00:00Z", "end": "2025-03-10T10:00:00Z"}}, at(2025, 3, 10, 10)),
        ({"effectivePeriod": {"start": "2025-03-10T08:00:00Z"}}, at(2025, 3, 10, 8)),
        ({"issued": "2025-03-10T11:00:00Z"}, at(2025, 3, 10, 11)),
        ({"effectiveDateTime": "2025-03-10T10:00:00Z", "issued": "2025-03-10T11:00:00Z"}, at(2025, 3, 10, 10)),
    ],
    ids=["dateTime", "instant", "period-end", "period-open", "issued", "effective-before-issued"],
)
def test_observation_timing(resource: dict[str, object], expected: datetime) -> None:
    found = observation_timing(resource)
    assert found is not None and found.effective == expected


def test_observation_without_time() -> None:
    assert observation_timing({}) is None
    assert period("not a period") is None


def test_birth_date_and_age() -> None:
    assert birth_date("2020-05") == date(2020, 5, 1)
    assert birth_date("nope") is None
    assert age(date(2020, 3, 10), date(2025, 3, 10)) == (5, 1826)
    assert age(date(2020, 3, 11), date(2025, 3, 10))[0] == 4
    assert age(date(2025, 3, 3), date(2025, 3, 10)) == (0, 7)


def test_earlier_saturates_at_year_one() -> None:
    from datetime import timedelta

    from service.timing import earlier

    assert earlier(at(2025, 3, 10), timedelta(days=1)) == at(2025, 3, 9)
    assert earlier(at(1, 1, 2), timedelta(days=7)) == datetime.min.replace(tzinfo=UTC)
