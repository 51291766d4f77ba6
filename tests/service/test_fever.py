"""The fever rule of brief §0, at, just below and just above each boundary, in both unit systems."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import timing
from service.extract import Temperature, extract
from service.fever import assess_fever, in_window
from service.model import Fever
from service.thresholds import DEFAULT_POLICY
from tests.service.factories import NOW, ago, temperature, vital_signs_panel, component

D = Decimal


def fever_of(*resources: Any) -> Fever | None:
    return assess_fever(extract(list(resources), now=NOW).temperatures, now=NOW)


def criterion(*resources: Any) -> str | None:
    found = fever_of(*resources)
    return None if found is None else found.criterion


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("38.29", "Cel", "none"),
        ("38.3", "Cel", "single-reading"),
        ("38.31", "Cel", "single-reading"),
        ("38.295", "Cel", "single-reading"),  # rounds half up to 38.30
        ("100.9", "[degF]", "none"),  # 38.28
        ("100.93", "[degF]", "none"),  # 38.29
        ("100.94", "[degF]", "single-reading"),  # 38.30
        ("101.0", "[degF]", "single-reading"),  # 38.33
        ("40", "Cel", "single-reading"),
        ("36.5", "Cel", "none"),
    ],
    ids=lambda v: str(v),
)
def test_single_reading_threshold(value: str, unit: str, expected: str) -> None:
    assert criterion(temperature(value, unit, ago(minutes=10))) == expected


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        ([("38.0", 60), ("38.0", 0)], "sustained"),
        ([("38.0", 59), ("38.0", 0)], "none"),
        ([("38.0", 61), ("38.0", 0)], "sustained"),
        ([("37.99", 60), ("38.0", 0)], "none"),
        ([("38.0", 60), ("37.99", 30), ("38.2", 0)], "none"),  # a reading < 38.0 in between breaks the run
        ([("38.0", 90), ("37.9", 70), ("38.1", 60), ("38.2", 0)], "sustained"),  # a later run qualifies
        ([("38.1", 120), ("38.2", 60), ("38.0", 0)], "sustained"),
        ([("38.2", 60)], "none"),  # one reading cannot be sustained
    ],
    ids=["60-min", "59-min", "61-min", "start-below", "broken", "second-run", "three", "single"],
)
def test_sustained_run(readings: list[tuple[str, int]], expected: str) -> None:
    resources = [temperature(v, "Cel", ago(minutes=m)) for v, m in readings]
    assert criterion(*resources) == expected


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [
        ("100.4", "100.4", "sustained"),  # 38.00 exactly
        ("100.3", "100.4", "none"),  # 37.94
        ("100.4", "101.0", "single-reading"),
    ],
    ids=["100.4F", "100.3F", "101F"],
)
def test_sustained_in_fahrenheit(first: str, last: str, expected: str) -> None:
    readings = [temperature(first, "[degF]", ago(minutes=70)), temperature(last, "[degF]", ago(minutes=5))]
    assert criterion(*readings) == expected


def test_mixed_units_form_one_run() -> None:
    readings = [temperature("100.4", "[degF]", ago(minutes=65)), temperature("38.1", "Cel", ago(minutes=1))]
    assert criterion(*readings) == "sustained"


@pytest.mark.parametrize(
    ("hours", "present"),
    [(23.99, True), (24, True), (24.01, False)],
    ids=["inside", "at-edge", "outside"],
)
def test_temperature_window(hours: float, present: bool) -> None:
    assert (fever_of(temperature(39, "Cel", ago(hours=hours))) is not None) is present


def test_no_temperature_gives_none() -> None:
    assert fever_of() is None


def test_same_instant_takes_the_highest() -> None:
    at_start = [temperature("37.5", "Cel", ago(minutes=60)), temperature("38.1", "Cel", ago(minutes=60))]
    assert criterion(*at_start, temperature("38.1", "Cel", ago(minutes=0))) == "sustained"


def test_date_only_reading_counts_once_but_not_in_a_run() -> None:
    today = NOW.date().isoformat()
    assert criterion(temperature("38.4", "Cel", today)) == "single-reading"
    assert criterion(temperature("38.1", "Cel", today), temperature("38.1", "Cel", ago(minutes=1))) == "none"


@pytest.mark.parametrize("code", ["8311-3", "8312-1", "8313-9", "8314-7", "8315-4"])
def test_a_maximum_over_hours_counts_once_but_not_in_a_run(code: str) -> None:
    # Brief §3.1: a 1-24 h maximum is a single reading. Two rolling 24 h maxima an hour apart may report one spike
    # of 38.1 °C: read as a run they made a sustained fever, and with ANC below 1000 a febrile-neutropenia emergency.
    assert criterion(temperature("38.4", "Cel", ago(minutes=1), code=code)) == "single-reading"
    assert criterion(temperature("38.1", "Cel", ago(minutes=61), code=code),
                     temperature("38.1", "Cel", ago(minutes=1), code=code)) == "none"
    assert criterion(temperature("38.1", "Cel", ago(minutes=61), code=code),
                     temperature("38.0", "Cel", ago(minutes=1))) == "none"
    # Beside it, timed readings still form a run.
    timed = [temperature("38.0", "Cel", ago(minutes=61)), temperature("38.0", "Cel", ago(minutes=1))]
    assert criterion(temperature("38.1", "Cel", ago(minutes=61), code=code), *timed) == "sustained"

#: The UTC start of the date "2025-03-11"; the test below puts the future limit (now + tolerance) before it.
TOMORROW_IN_UTC = datetime(2025, 3, 11, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("effective", "ahead", "kept"),
    [
        ("2025-03-11", timedelta(hours=13, minutes=59), True),
        ("2025-03-11", timedelta(hours=14), True),
        ("2025-03-11", timedelta(hours=14, minutes=1), False),
        ("2025-03-11T00:00:00Z", timedelta(0), True),
        ("2025-03-11T00:00:00Z", timedelta(seconds=1), False),
    ],
    ids=["date-13h59-ahead", "date-14h-ahead", "date-14h01-ahead", "timed-at-limit", "timed-1s-past-limit"],
)
def test_in_window_keeps_a_date_begun_in_the_earliest_time_zone(effective: str, ahead: timedelta,
                                                                 kept: bool) -> None:
    # The reading is built directly, so this checks in_window's own end test, not extract's future check.
    when = timing.parse(effective)
    assert when is not None
    reading = Temperature("Observation/t", D("38.60"), when.effective, when.latest, "final")
    now = TOMORROW_IN_UTC - DEFAULT_POLICY.future_tolerance - ahead
    assert in_window([reading], now=now) == ([reading] if kept else [])
    assert (assess_fever([reading], now=now) is not None) is kept


def test_fever_details() -> None:
    found = fever_of(
        temperature("38.1", "Cel", ago(minutes=90), id="a"),
        temperature("38.2", "Cel", ago(minutes=20), id="b", status="preliminary"),
        temperature("37.0", "Cel", ago(hours=5), id="c"),
    )
    assert found == Fever(
        max_celsius=D("38.20"),
        criterion="sustained",
        effective=NOW.replace(hour=11, minute=40),
        sources=("Observation/a", "Observation/b"),
        since=NOW.replace(hour=10, minute=30),
        preliminary=True,
    )


def test_single_reading_reports_the_hottest() -> None:
    found = fever_of(temperature("38.5", "Cel", ago(hours=3), id="x"), temperature("39.1", "Cel", ago(hours=5), id="y"))
    assert found is not None
    assert (found.max_celsius, found.sources, found.effective) == (D("39.10"), ("Observation/y",), NOW.replace(hour=7))


def test_afebrile_reports_the_maximum() -> None:
    found = fever_of(temperature("37.2", "Cel", ago(hours=1), id="x"), temperature("36.8", "Cel", ago(hours=2)))
    assert found is not None
    assert (found.criterion, found.max_celsius, found.sources) == ("none", D("37.20"), ("Observation/x",))


def test_panel_component_temperature_counts() -> None:
    assert criterion(vital_signs_panel([component("8310-5", 38.5, "Cel")], ago(minutes=5))) == "single-reading"


class _CountedDecimal(Decimal):
    """A temperature that counts the order comparisons made on it (work, where a timing would be a timed test)."""

    comparisons = 0

    def _count(self) -> None:
        _CountedDecimal.comparisons += 1

    def __ge__(self, other: Any) -> bool:
        self._count()
        return super().__ge__(other)

    def __gt__(self, other: Any) -> bool:
        self._count()
        return super().__gt__(other)

    def __le__(self, other: Any) -> bool:
        self._count()
        return super().__le__(other)

    def __lt__(self, other: Any) -> bool:
        self._count()
        return super().__lt__(other)


def test_a_long_sustained_run_is_found_in_linear_work() -> None:
    # A monitor's readings every 4 s for 22 h, all 38.0-38.2: the run found so far was rebuilt at every reading once
    # it spanned an hour, quadratic (20 000 readings: 20 s, long past the EHR's cut-off, for a critical card).
    # Comparisons of temperatures are counted: the quadratic search made hundreds of millions.
    count = 20_000
    readings = [Temperature(f"Observation/t{n}", _CountedDecimal("38.1"), NOW - timedelta(seconds=4 * n),
                            NOW - timedelta(seconds=4 * n), "final") for n in range(count)]
    _CountedDecimal.comparisons = 0
    found = assess_fever(readings, now=NOW)
    assert _CountedDecimal.comparisons <= 5 * count
    assert found is not None and found.criterion == "sustained" and len(found.sources) == count
    assert found.since == NOW - timedelta(seconds=4 * (count - 1)) and found.effective == NOW


def _sustained_run_reference(readings: list[Temperature]) -> list[Temperature] | None:
    """The run as 4fe857a^ gathered it, at every qualifying instant (quadratic, obviously right)."""
    from service.thresholds import FEVER_SUSTAINED, FEVER_SUSTAINED_DURATION

    by_time: dict[datetime, list[Temperature]] = {}
    for reading in readings:
        by_time.setdefault(reading.effective, []).append(reading)
    found: list[Temperature] | None = None
    run: list[datetime] = []
    for moment in sorted(by_time):
        if max(t.celsius for t in by_time[moment]) >= FEVER_SUSTAINED:
            run.append(moment)
            if run[-1] - run[0] >= FEVER_SUSTAINED_DURATION:
                found = [t for m in run for t in by_time[m] if t.celsius >= FEVER_SUSTAINED]
        else:
            run = []
    return found


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(3780, 3830)), max_size=25))
def test_latest_sustained_run_is_the_run_gathered_at_every_instant(rows: list[tuple[int, int]]) -> None:
    from service.fever import _latest_sustained_run

    readings = [Temperature(f"Observation/t{n}", D(centi) / 100, NOW - timedelta(minutes=10 * slot),
                            NOW - timedelta(minutes=10 * slot), "final") for n, (slot, centi) in enumerate(rows)]
    readings.sort(key=Temperature.order)
    assert _latest_sustained_run(readings) == _sustained_run_reference(readings)
