"""FHIR date/dateTime/instant/Period parsing into UTC intervals."""

from __future__ import annotations

import random
import re
import time
from datetime import date, datetime, timedelta, timezone
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import timing
from service.timing import (
    EARLIEST_ZONE_LEAD,
    Timing,
    age,
    begun_by,
    birth_date,
    observation_timing,
    parse,
    period,
)

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
        ("2025-11", at(2025, 11, 1), at(2025, 11, 30, 23, 59, 59, 999999)),  # the month before December
        ("2024-02", at(2024, 2, 1), at(2024, 2, 29, 23, 59, 59, 999999)),  # a leap February
        ("2025", at(2025, 1, 1), at(2025, 12, 31, 23, 59, 59, 999999)),
        ("2016-12-31T23:59:60Z", at(2016, 12, 31, 23, 59, 59, 999999), at(2016, 12, 31, 23, 59, 59, 999999)),
        ("2016-12-31T23:59:60.25Z", at(2016, 12, 31, 23, 59, 59, 999999), at(2016, 12, 31, 23, 59, 59, 999999)),
        ("2017-01-01T08:59:60+09:00", at(2016, 12, 31, 23, 59, 59, 999999), at(2016, 12, 31, 23, 59, 59, 999999)),
        ("9999-12-31T23:59:60Z", at(9999, 12, 31, 23, 59, 59, 999999), at(9999, 12, 31, 23, 59, 59, 999999)),
    ],
    ids=["utc", "offset", "fraction", "date", "month", "december", "november", "leap-february", "year", "leap-second",
         "leap-second-fraction", "leap-second-offset", "leap-second-last-minute-of-9999"],
)
def test_parse_gives_an_interval(value: str, effective: datetime, latest: datetime) -> None:
    assert parse(value) == Timing(effective, latest)


@pytest.mark.parametrize("value", ["2016-12-31T23:59:60Z", "2017-01-01T08:59:60+09:00"], ids=["Z", "offset"])
def test_parse_never_reads_the_server_time_zone(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A leap second is built field by field: its zone must come from the value, never from the server's."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse(value) == Timing(at(2016, 12, 31, 23, 59, 59, 999999), at(2016, 12, 31, 23, 59, 59, 999999))
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    "value",
    ["", "yesterday", "2025-02-30", "2025-13", "2025-03-10T25:00:00Z", "2025-03-10T10:00:00+25:00", "9999-12-31",
     "0001-01-01T00:00:00+05:00", "2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z", None, 20250310, ["2025"]],
    ids=lambda v: repr(v),
)
def test_parse_rejects_what_is_not_a_date(value: object) -> None:
    assert parse(value) is None


def _by_fields(value: str) -> datetime | None:
    """A dateTime with a time, built field by field (the oracle for the fast path of ``parse``).

    A leap second (second 60) is the last instant of its minute, whatever its fraction."""
    y, mo, d = int(value[0:4]), int(value[5:7]), int(value[8:10])
    clock, zone = (value[11:-1], "Z") if value.endswith("Z") else (value[11:-6], value[-6:])
    hour, minute = int(clock[0:2]), int(clock[3:5])
    second = int(clock[6:8]) if len(clock) >= 8 else 0
    micro = int(clock[9:15].ljust(6, "0")) if len(clock) > 9 else 0
    if second == 60:
        second, micro = 59, 999999
    sign = -1 if zone[0] == "-" else 1
    offset = timedelta() if zone == "Z" else sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        return datetime(y, mo, d, hour, minute, second, micro, tzinfo=timezone(offset)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _date_times(count: int) -> list[str]:
    """Random dateTimes in the FHIR form: each field usually valid (often at its limit), sometimes past it."""
    rng = random.Random(20251129)

    def field(valid: tuple[int, ...], invalid: tuple[int, ...]) -> int:
        return rng.choice(invalid if rng.random() < 0.05 else valid)

    values = []
    for _ in range(count):
        day = (f"{field((1, 1970, 2025, 9999), (0,)):04d}-{field((1, 2, 6, 12), (0, 13)):02d}"
               f"-{field((1, 15, 28, 29, 30, 31), (0, 32)):02d}")
        clock = f"{field((0, 9, 12, 23), (24, 99)):02d}:{field((0, 30, 59), (60,)):02d}"
        if rng.random() < 0.8:
            clock += f":{field((0, 30, 59, 60), (61, 99)):02d}"
            if rng.random() < 0.5:
                clock += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
        zone = "Z" if rng.random() < 0.3 else (
            f"{rng.choice('+-')}{field((0, 1, 5, 9, 14, 23), (24, 99)):02d}:{field((0, 30, 45, 59), (75, 99)):02d}")
        values.append(f"{day}T{clock}{zone}")
    return values


@pytest.mark.parametrize("value", _date_times(400))
def test_parse_of_a_date_time_equals_building_it_field_by_field(value: str) -> None:
    expected = _by_fields(value)
    assert parse(value) == (None if expected is None else Timing(expected, expected))


def _formatted(moment: datetime, digits: str, offset: int | None, space: str) -> str:
    zone = "Z" if offset is None else f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    return f"{space}{moment:%Y-%m-%dT%H:%M:%S}{'.' + digits if digits else ''}{zone}{space}"


#: Valid instants: every day of years 1-9999, fractions of up to 12 digits, offsets up to a minute short of 24 h.
_INSTANTS = st.builds(_formatted, st.datetimes(), st.text("0123456789", max_size=12),
                     st.none() | st.integers(-24 * 60 + 1, 24 * 60 - 1), st.sampled_from(["", " ", "\n"]))
#: One edit of an instant that makes it another form (a dateTime without seconds or zone, a date), puts a field
#: at or past its limit (second 60, hour 24, offset 24:00), or writes it otherwise (lower case, other digits).
_EDITS = [
    lambda v: re.sub(r"(T[0-9]{2}:[0-9]{2}):[0-9]{2}(\.[0-9]*)?", r"\1", v),
    lambda v: re.sub(r"(Z|[+-][0-9]{2}:[0-9]{2})(\s*)$", r"\2", v),
    lambda v: re.sub(r"(T[0-9]{2}:[0-9]{2}:)[0-9]{2}", r"\g<1>60", v),
    lambda v: re.sub(r"T[0-9]{2}:[0-9]{2}:[0-9]{2}", "T24:00:00", v),
    lambda v: re.sub(r"(Z|[+-][0-9]{2}:[0-9]{2})(\s*)$", r"+24:00\2", v),
    lambda v: re.sub(r"(Z|[+-][0-9]{2}:[0-9]{2})(\s*)$", r"-00:00\2", v),
    lambda v: re.sub(r"([+-][0-9]{2}):([0-9]{2})(\s*)$", r"\1\2\3", v),
    lambda v: re.sub(r"(Z|[+-][0-9]{2}:[0-9]{2})(\s*)$", r".\1\2", v),
    lambda v: v.replace("T", "t").replace("Z", "z"),
    lambda v: v.replace("T", " "),
    lambda v: v.replace("0", "\u0660", 1),
    lambda v: v.replace("1", "\uff11", 1),
    lambda v: v.replace("2", "\u00b2", 1),
    lambda v: v.strip()[:10],
    lambda v: "0000" + v.strip()[4:],
    lambda v: v + "\u2028",
]
_EDITED_INSTANTS = st.builds(lambda value, edit: edit(value), _INSTANTS, st.sampled_from(_EDITS))


@settings(max_examples=400, deadline=None)
@given(_INSTANTS | _EDITED_INSTANTS | st.text(st.sampled_from("0123456789-:T.Z+ \n٣"), max_size=32))
def test_the_fast_path_of_parse_gives_what_the_long_way_gives(value: str) -> None:
    # The fast path (an ASCII instant, built by the C parser) must not change a result: without it every value
    # takes the long way, as before 88b1c86.
    fast = parse(value)
    with mock.patch.object(timing, "INSTANT", re.compile(r"(?!)")):
        slow = parse(value)
    assert fast == slow  # equal instants; and both in UTC (equal aware datetimes may differ in zone)
    assert [t.utcoffset() for t in fast or ()] == [t.utcoffset() for t in slow or ()]


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
        ({"effectiveDateTime": None, "effectivePeriod": None, "issued": "2025-03-10T11:00:00Z"}, at(2025, 3, 10, 11)),
    ],
    ids=["dateTime", "instant", "period-end", "period-open", "issued", "effective-before-issued",
         "null-effective-is-absent"],
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


#: A date-only value and the instant at its UTC start: the tests below move ``now`` around that start.
DATE = parse("2025-03-11")
STARTS = at(2025, 3, 11)


@pytest.mark.parametrize(
    ("when", "ahead", "begun"),
    [
        (DATE, timedelta(0), True),
        (DATE, timedelta(hours=13, minutes=59), True),
        (DATE, EARLIEST_ZONE_LEAD, True),
        (DATE, timedelta(hours=14, minutes=1), False),
        (DATE, timedelta(days=1), False),
        (parse("2025-03"), EARLIEST_ZONE_LEAD, True),
        (parse("2025-03"), EARLIEST_ZONE_LEAD + timedelta(microseconds=1), False),
        (parse("2025"), EARLIEST_ZONE_LEAD, True),
        (parse("2025"), EARLIEST_ZONE_LEAD + timedelta(microseconds=1), False),
        (parse("2025-03-11T00:00:00Z"), timedelta(0), True),
        (parse("2025-03-11T00:00:00Z"), timedelta(microseconds=1), False),
        (parse("2025-03-11T00:00:00Z"), timedelta(hours=1), False),
        (parse("2025-03-11T14:00:00+14:00"), timedelta(microseconds=1), False),
        (period({"start": "2025-03-10T23:00:00Z", "end": "2025-03-11T00:00:00Z"}), timedelta(0), True),
        (period({"start": "2025-03-10T23:00:00Z", "end": "2025-03-11T00:00:00Z"}), timedelta(seconds=1), False),
        (period({"end": "2025-03-11"}), EARLIEST_ZONE_LEAD, True),
        (period({"end": "2025-03-11"}), timedelta(hours=14, minutes=1), False),
    ],
    ids=["date-at-utc-start", "date-13h59-ahead", "date-14h-ahead", "date-14h01-ahead", "date-a-day-ahead",
         "month-14h-ahead", "month-past-14h-ahead", "year-14h-ahead", "year-past-14h-ahead", "instant-at-limit",
         "instant-1us-ahead", "instant-1h-ahead", "instant-at-plus-14-1us-ahead", "period-at-limit",
         "period-1s-ahead", "period-ending-on-a-date-14h-ahead", "period-ending-on-a-date-14h01-ahead"],
)
def test_begun_by_allows_a_date_to_start_in_the_earliest_zone(when: Timing | None, ahead: timedelta,
                                                                begun: bool) -> None:
    # ``ahead``: how long after the limit the value starts in UTC (the limit is now plus the future tolerance).
    assert when is not None
    assert begun_by(when, when.effective - ahead) is begun


def test_begun_by_at_year_one() -> None:
    assert begun_by(parse("0001-01-01"), datetime.min.replace(tzinfo=UTC))  # type: ignore[arg-type]
